//! Nothing secret reaches the logs: no token (header or query), no key, no
//! event content, even at TRACE level.
//!
//! Alone in its own test binary: tracing caches per-callsite interest
//! process-wide, so a thread-local subscriber only sees everything when no
//! other test thread hits the same callsites first.
#![allow(clippy::unwrap_used)]

#[path = "it/common.rs"]
mod common;

use axum::http::{Method, Request, StatusCode};
use bridgekeys_appservice::{Limits, paths};
use common::*;
use serde_json::json;

#[tokio::test]
async fn logs_at_trace_level_carry_no_token_key_or_plaintext() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let claim = json!({"@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]}});
    let uri = format!("{}?access_token={TOKEN}", paths::CLAIM[1]);
    let req = Request::post(uri).body(json_body(&claim)).unwrap();
    let (_, body) = fx.call(req).await;
    let public_key = claimed_public_key(&body).to_owned();
    let (_, _) = fx
        .call(
            Request::post(paths::CLAIM[1])
                .header("authorization", "Bearer wrong-token-xyz")
                .body(json_body(&claim))
                .unwrap(),
        )
        .await;
    let txn = json!({"events": [{"content": {"body": "top secret plaintext"}}]});
    let (status, _) = fx
        .call(authed(Method::PUT, "/transactions/log-1", json_body(&txn)))
        .await;
    assert_eq!(status, StatusCode::OK);
    // The caller's own text, logged escaped and cut short: a control
    // character cannot forge a log line, a huge id cannot make a huge line.
    let id = format!("ping\nforged line {}", "x".repeat(10_000));
    let (status, _) = fx
        .call(authed(
            Method::POST,
            "/_matrix/app/v1/ping",
            json_body(&json!({ "transaction_id": id })),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Sent twice: the second is a duplicate, which is logged with its id.
    for attempt in ["first", "duplicate"] {
        let (status, _) = fx
            .call(authed(
                Method::PUT,
                "/_matrix/app/v1/transactions/txn%0Aforged",
                json_body(&json!({"events": []})),
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{attempt}");
    }

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("appservice_request"),
        "requests are traced: {logs}"
    );
    assert!(!logs.contains(TOKEN), "the hs_token was logged");
    assert!(
        !logs.contains("wrong-token-xyz"),
        "a presented token was logged"
    );
    assert!(!logs.contains(&public_key), "a one-time key was logged");
    assert!(
        !logs.contains("top secret plaintext"),
        "event content was logged"
    );
    assert!(
        logs.contains("pinged by the homeserver"),
        "the ping is logged: {logs}"
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("forged")),
        "a newline in a caller's id started a log line of its own"
    );
    assert!(
        !logs.contains(&"x".repeat(200)),
        "a ping's whole 10 000-character id was logged"
    );
}
