//! A minimal JSON client for loopback calls to the homeserver, on reqwest
//! (the transport bridgekeys' own homeserver client uses).
//!
//! One process-wide client without idle connections: a test's calls are
//! few, and a pooled connection belongs to the tokio runtime that opened it
//! (each `#[tokio::test]` has its own, and a connection left in a shared
//! pool by a finished test would be dead for the next).

use std::sync::OnceLock;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::TestkitError;

fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| format!("building the http client: {e}"))?;
    Ok(CLIENT.get_or_init(|| client))
}

/// Send `body` (if any) as JSON and read the JSON answer (a body that is
/// not JSON comes back as a string).
pub(crate) async fn json(
    port: u16,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), TestkitError> {
    let what = format!("{method} {path}");
    let fail = |detail: String| TestkitError::Request {
        what: what.clone(),
        detail,
    };
    let mut request = client()
        .map_err(fail)?
        .request(method.clone(), format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/json")
        .body(body.map(Value::to_string).unwrap_or_default());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    // Only the error's own text: reqwest's source chain names the URL,
    // never the Authorization header.
    let response = request.send().await.map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| fail(e.to_string()))?;
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, value))
}
