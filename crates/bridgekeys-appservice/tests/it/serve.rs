//! The listener over a real socket: graceful shutdown lets in-flight claims
//! finish with their durable write; queries, ping and the operations
//! endpoints; errors counted by errcode.

use std::{
    sync::{Mutex, atomic::Ordering},
    time::Duration,
};

use crate::common::*;
use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use bridgekeys_appservice::{Limits, paths};
use bridgekeys_store::{DeviceKey, Store};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

/// One HTTP/1.1 request over a fresh connection; returns status and JSON.
async fn raw_post(addr: std::net::SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let body = serde_json::to_vec(body).unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    let status = text[9..12].parse().unwrap();
    let (_, json) = text.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(json).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_lets_an_in_flight_claim_finish_with_its_durable_write() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;

    // Hold the claim inside its store write until the test says go.
    let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    fx.faults.set_hook(move |_| {
        let _ = entered_tx.send(());
        let _ = release_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20));
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(fx.appservice.clone().serve_on(listener, async {
        let _ = stop_rx.await;
    }));

    let req =
        json!({"@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519", "signed_curve25519"]}});
    let client = tokio::spawn(async move { raw_post(addr, paths::CLAIM[1], &req).await });
    entered.recv().await.unwrap();

    // Shutdown begins while the claim is in flight.
    stop_tx.send(()).unwrap();
    let router = fx.router.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (status, _) = call(
                &router,
                Request::get(paths::READY).body(Body::empty()).unwrap(),
            )
            .await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("readiness turns 503 once draining");
    tokio::time::timeout(Duration::from_secs(10), async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("no new connection is accepted while draining");
    assert!(
        !server.is_finished(),
        "the server waits for the claim in flight"
    );

    release_tx.send(()).unwrap();
    let (status, body) = client.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["@echo_0:localhost"]["PUPPETDEV"]
            .as_object()
            .unwrap()
            .len(),
        2
    );
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops once the claim is answered")
        .unwrap()
        .unwrap();
    fx.faults.clear_hook();
    // The answered keys are on disk: flushed before the 200.
    let dk = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
    assert_eq!(fx.store.count_one_time_keys(&dk).unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_user_query_provisions_the_puppet_device_and_its_keys_can_then_be_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let claim = json!({"@echo_3:localhost": {"PUPPETDEV": ["signed_curve25519"]}});
    let (_, body) = fx
        .call(authed(Method::POST, paths::CLAIM[1], json_body(&claim)))
        .await;
    assert_eq!(body, json!({}), "not provisioned yet: nothing served");

    let (status, _) = fx
        .call(authed(
            Method::GET,
            "/_matrix/app/v1/users/@echo_3:localhost",
            Body::empty(),
        ))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the bridge rejects by default"
    );
    assert_eq!(fx.manager.stats().devices_created, 0);

    fx.handler.accept_users.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let (status, body) = fx
            .call(authed(
                Method::GET,
                "/_matrix/app/v1/users/@echo_3:localhost",
                Body::empty(),
            ))
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({})));
    }
    assert_eq!(
        fx.manager.stats().devices_created,
        1,
        "provisioning is idempotent"
    );
    let (_, body) = fx
        .call(authed(Method::POST, paths::CLAIM[1], json_body(&claim)))
        .await;
    assert_eq!(
        body["@echo_3:localhost"]["PUPPETDEV"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn ping_room_queries_and_operations_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let (status, body) = fx
        .call(authed(
            Method::POST,
            paths::PING,
            json_body(&json!({"transaction_id": "p1"})),
        ))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let (status, _) = fx
        .call(authed(
            Method::GET,
            "/_matrix/app/v1/rooms/%23echo_lobby:localhost",
            Body::empty(),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    for path in [paths::LIVE, paths::READY] {
        let (status, body) = fx
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(status, StatusCode::OK, "{path} needs no token");
        assert!(body["status"].is_string());
    }
    let (status, body) = fx
        .call(Request::post(paths::METRICS).body(Body::empty()).unwrap())
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("M_UNRECOGNIZED"))
    );
    let metrics = fx.metrics().await;
    assert!(metrics.contains("bridgekeys_appservice_claims_total"));
    assert!(metrics.contains("bridgekeys_appservice_keys_issued_total"));
    assert!(metrics.contains("bridgekeys_appservice_evicted_keys_total"));
    assert!(metrics.contains("bridgekeys_appservice_transactions_total"));
    assert!(metrics.contains("bridgekeys_appservice_transactions_duplicate_total"));
    assert!(metrics.contains("bridgekeys_appservice_claim_duration_seconds_bucket"));
}

#[tokio::test]
async fn error_responses_are_counted_by_errcode() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let (status, _) = fx
        .call(
            Request::post(paths::CLAIM[1])
                .header("authorization", "Bearer nope")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = fx
        .call(authed(Method::GET, "/nonsense", Body::empty()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let metrics = fx.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_errors_total{errcode=\"M_FORBIDDEN\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_errors_total{errcode=\"M_UNRECOGNIZED\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_router_mounts_inside_a_bridge_authors_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let app = axum::Router::new()
        .route(
            "/bridge/status",
            axum::routing::get(|| async { "own route" }),
        )
        .fallback_service(fx.appservice.router());
    let resp = tower::ServiceExt::oneshot(
        app.clone(),
        Request::get("/bridge/status").body(Body::empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) = call(
        &app,
        authed(Method::POST, paths::PING, json_body(&json!({}))),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let (status, body) = call(&app, authed(Method::GET, "/unknown", Body::empty())).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED"))
    );
}

/// Read one HTTP/1.1 response with a `Content-Length` body: status and JSON.
async fn read_response(stream: &mut TcpStream) -> (u16, String, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed before a whole answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if body.len() >= length {
                let status = head[9..12].parse().unwrap();
                let content_type = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-type:")
                            .map(|v| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                return (
                    status,
                    content_type,
                    serde_json::from_str(&body[..length]).unwrap(),
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_a_408_and_one_declared_too_large_a_413_before_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut limits = Limits::default();
    limits.request_timeout = Duration::from_secs(1);
    let fx = Fixture::open(dir.path(), limits);
    fx.provision(1).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(fx.appservice.clone().serve_on(listener, async {
        let _ = stop_rx.await;
    }));
    let before = fx.state();

    // A claim whose body stops after 10 of its 100 bytes: the client's
    // fault, answered 408 when the request timeout runs out (not the 503
    // of work of ours that ran too long).
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"@echo_0:",
        paths::CLAIM[0]
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, content_type, body) =
        tokio::time::timeout(Duration::from_secs(20), read_response(&mut stream))
            .await
            .expect("answered at the request timeout");
    assert_eq!(status, 408, "{body}");
    assert_eq!(content_type, "application/json");
    assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");

    // A body declared far over the limit, with `Expect: 100-continue`:
    // refused from the header, without a `100 Continue` and without waiting
    // for the body (which would take the request timeout and end in a 408).
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\nExpect: 100-continue\r\n\r\n",
        paths::CLAIM[0]
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["errcode"], "M_TOO_LARGE", "{body}");

    assert_eq!(fx.state(), before, "no key issued, nothing written");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}
