//! The homeserver client's transport logs no `as_token`, even at TRACE
//! level with the `log` records of its dependencies (reqwest, rustls)
//! captured too: across a retried call, a refused one and an error.
//!
//! Alone in its own test binary: the subscriber is process-wide.
#![allow(clippy::unwrap_used)]

#[path = "it/common.rs"]
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, http::StatusCode, response::IntoResponse, routing::post};
use bridgekeys_appservice::{AsToken, HomeserverClient, RetryPolicy};
use common::Captured;
use serde_json::json;

const AS_TOKEN: &str = "as-token-that-must-not-be-logged";

#[tokio::test]
async fn no_token_in_trace_logs_of_retried_and_failed_calls() {
    let captured = Captured::default();
    let writer = captured.clone();
    // try_init also routes `log` records (reqwest, rustls) into tracing.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .try_init()
        .unwrap();

    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let app = Router::new().route(
        "/_matrix/client/v1/appservice/{id}/ping",
        post(move || {
            let counter = Arc::clone(&counter);
            async move {
                match counter.fetch_add(1, Ordering::SeqCst) {
                    0 => (
                        StatusCode::TOO_MANY_REQUESTS,
                        Json(json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 5})),
                    )
                        .into_response(),
                    1 => (StatusCode::BAD_GATEWAY, "upstream down").into_response(),
                    2 => Json(json!({"duration_ms": 1})).into_response(),
                    _ => (
                        StatusCode::FORBIDDEN,
                        Json(json!({"errcode": "M_FORBIDDEN", "error": "no"})),
                    )
                        .into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let hs = HomeserverClient::new(&url, AsToken::new(AS_TOKEN))
        .unwrap()
        .with_retry_policy({
            let mut c = RetryPolicy::default();
            c.max_retries = 3;
            c.base_delay = Duration::from_millis(1);
            c.max_delay = Duration::from_secs(1);
            c
        });
    hs.ping_appservice("bridge").await.unwrap();
    let refused = hs.ping_appservice("bridge").await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // And an https:// homeserver nobody listens on.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_url = format!("https://{}", gone.local_addr().unwrap());
    drop(gone);
    let unreachable = HomeserverClient::new(&gone_url, AsToken::new(AS_TOKEN))
        .unwrap()
        .with_retry_policy(RetryPolicy::none())
        .ping_appservice("bridge")
        .await
        .unwrap_err();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("retrying"),
        "the retries were logged (the capture works): {logs}"
    );
    assert!(!logs.contains(AS_TOKEN), "token in the logs:\n{logs}");
    for text in [
        refused.to_string(),
        format!("{refused:?}"),
        unreachable.to_string(),
        format!("{unreachable:?}"),
        format!("{hs:?}"),
    ] {
        assert!(!text.contains(AS_TOKEN), "{text}");
    }
}
