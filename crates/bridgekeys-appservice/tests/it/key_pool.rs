//! The key pool's detection and its probe, against homeservers that answer
//! in ways a real Synapse does not show on demand (no ping endpoint, a
//! listener it cannot reach, claims proxied to another process's listener).
//! The real homeserver cases (claims proxied or not, and another process's
//! detection) are in `examples/echo-bridge/tests/it/pool.rs`, against
//! Synapse.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::common::*;
use axum::{
    Json, Router,
    http::{Method, StatusCode},
    routing::post,
};
use bridgekeys_appservice::{
    AsToken, ClaimMode, HomeserverClient, KeyPool, Limits, ModeSetting, PoolConfig, paths,
};
use serde_json::{Value, json};

const BOT: &str = "@echo_bot:localhost";

fn pool(fx: &Fixture, homeserver: &str, mode: ModeSetting) -> Arc<KeyPool> {
    let client = HomeserverClient::new(homeserver, AsToken::new("as-token")).unwrap();
    Arc::new(KeyPool::new(
        Arc::clone(&fx.manager),
        client,
        "echo",
        BOT.try_into().unwrap(),
        {
            let mut c = PoolConfig::default();
            c.mode = mode;
            c
        },
    ))
}

/// A homeserver whose ping answers `ping_status` and whose claims answer
/// `{}` (nothing proxied); counts the claims.
async fn homeserver(ping_status: StatusCode) -> (SocketAddr, Arc<AtomicUsize>) {
    homeserver_proxying_to(ping_status, None).await
}

/// The same, but when `listener` is given its claims are proxied there as
/// Synapse proxies them (MSC3983: the claim's devices posted to the unstable
/// path, the listener's answer passed back untouched as `one_time_keys`).
async fn homeserver_proxying_to(
    ping_status: StatusCode,
    listener: Option<Router>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let claims = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&claims);
    let app = Router::new()
        .route(
            "/_matrix/client/v1/appservice/{id}/ping",
            post(move || async move {
                if ping_status == StatusCode::OK {
                    return (ping_status, Json(json!({"duration_ms": 1})));
                }
                // What MSC2659 names: no endpoint, or the listener unreachable.
                let errcode = if ping_status == StatusCode::NOT_FOUND {
                    "M_UNRECOGNIZED"
                } else {
                    "M_CONNECTION_FAILED"
                };
                (
                    ping_status,
                    Json(json!({"errcode": errcode, "error": "ping failed"})),
                )
            }),
        )
        .route(
            "/_matrix/client/v3/keys/claim",
            post(move |Json(body): Json<Value>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let listener = listener.clone();
                async move {
                    let Some(listener) = listener else {
                        return Json(json!({"one_time_keys": {}, "failures": {}}));
                    };
                    let mut asked = serde_json::Map::new();
                    for (user, devices) in body["one_time_keys"].as_object().unwrap() {
                        let devices: serde_json::Map<String, Value> = devices
                            .as_object()
                            .unwrap()
                            .iter()
                            .map(|(device, algorithm)| (device.clone(), json!([algorithm])))
                            .collect();
                        asked.insert(user.clone(), Value::Object(devices));
                    }
                    let (status, answer) = call(
                        &listener,
                        authed(
                            Method::POST,
                            paths::CLAIM[1],
                            json_body(&Value::Object(asked)),
                        ),
                    )
                    .await;
                    assert_eq!(status, StatusCode::OK, "{answer}");
                    Json(json!({"one_time_keys": answer, "failures": {}}))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, claims)
}

/// The marker a listener answers the probe with, as JSON.
fn probe_marker() -> Value {
    json!({"signed_curve25519:bridgekeys_probe": {"key": "YnJpZGdla2V5cyBwcm9iZQ", "signatures": {}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_mode_holds_from_the_start_and_detection_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    // Nothing listens there: any call would fail.
    for (setting, mode) in [
        (ModeSetting::Pool, ClaimMode::Pool),
        (ModeSetting::Proxied, ClaimMode::Proxied),
    ] {
        let pool = pool(&fx, "http://127.0.0.1:9", setting);
        assert_eq!(pool.mode(), mode);
        assert_eq!(pool.detect().await, mode);
        assert_eq!(pool.stats().probes, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ping_endpoint_the_probe_still_runs_and_an_unanswered_probe_means_pool() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let (addr, claims) = homeserver(StatusCode::NOT_FOUND).await;
    let pool = pool(&fx, &format!("http://{addr}"), ModeSetting::Detect);
    assert_eq!(pool.mode(), ClaimMode::Unknown);
    assert_eq!(pool.detect().await, ClaimMode::Pool);
    assert_eq!(claims.load(Ordering::SeqCst), 1, "one probe claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homeserver_that_cannot_reach_the_listener_leaves_the_mode_unknown_and_probes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    // Synapse answers a ping it could not deliver with 502.
    let (addr, claims) = homeserver(StatusCode::BAD_GATEWAY).await;
    let pool = pool(&fx, &format!("http://{addr}"), ModeSetting::Detect);
    assert_eq!(pool.detect().await, ClaimMode::Unknown);
    assert_eq!(claims.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_device_is_answered_with_the_marker_and_no_key_and_counted_while_the_rest_is_served()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let pool = pool(&fx, "http://127.0.0.1:9", ModeSetting::Detect);
    fx.appservice = fx.appservice.clone().with_key_pool(Arc::clone(&pool));
    fx.router = fx.appservice.router();
    let issued_before = fx.manager.stats().keys_issued;
    let request = json!({
        BOT: {"BRIDGEKEYS_PROBE": ["signed_curve25519"]},
        "@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]},
    });
    let (status, body) = fx
        .call(authed(Method::POST, paths::CLAIM[1], json_body(&request)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body[BOT],
        json!({"BRIDGEKEYS_PROBE": probe_marker()}),
        "the probe got more than the marker: {body}"
    );
    assert_eq!(
        body["@echo_0:localhost"]["PUPPETDEV"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(pool.stats().probes_seen, 1);
    assert_eq!(
        fx.manager.stats().keys_issued,
        issued_before + 1,
        "the marker was made or counted as a key"
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_keys_issued_total").await,
        1.0,
        "the marker was counted as an issued key"
    );
    let ready = fx
        .call(
            axum::http::Request::get(paths::READY)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .1;
    assert_eq!(ready["claim_mode"], "unknown");
    assert!(
        fx.metrics()
            .await
            .contains("bridgekeys_appservice_claim_mode{mode=\"unknown\"} 1")
    );
}

/// With several bridge processes behind one registration, the homeserver
/// may send the probe to another process's listener: this process never
/// sees it, but the marker that listener answers with comes back in the
/// homeserver's answer, and detection reads "proxied". (The real Synapse
/// case: `examples/echo-bridge/tests/it/pool.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_by_another_processs_listener_reads_proxied() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let detecting = Fixture::open(dirs.0.path(), Limits::default());
    let mut answering = Fixture::open(dirs.1.path(), Limits::default());
    let other_pool = pool(&answering, "http://127.0.0.1:9", ModeSetting::Detect);
    answering.appservice = answering
        .appservice
        .clone()
        .with_key_pool(Arc::clone(&other_pool));
    let (addr, claims) =
        homeserver_proxying_to(StatusCode::OK, Some(answering.appservice.router())).await;
    let pool = pool(&detecting, &format!("http://{addr}"), ModeSetting::Detect);
    assert_eq!(pool.detect().await, ClaimMode::Proxied);
    assert_eq!(claims.load(Ordering::SeqCst), 1, "one probe claim");
    assert_eq!(pool.stats().probes_seen, 0, "this process saw no probe");
    assert_eq!(other_pool.stats().probes_seen, 1, "the other one did");
}

/// A listener without a key pool (an older build, or none attached)
/// answers the probe with nothing: then detection reads "not proxied", as
/// before the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_without_the_marker_by_another_listener_reads_pool() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let detecting = Fixture::open(dirs.0.path(), Limits::default());
    let answering = Fixture::open(dirs.1.path(), Limits::default());
    let (addr, claims) =
        homeserver_proxying_to(StatusCode::OK, Some(answering.appservice.router())).await;
    let pool = pool(&detecting, &format!("http://{addr}"), ModeSetting::Detect);
    assert_eq!(pool.detect().await, ClaimMode::Pool);
    assert_eq!(claims.load(Ordering::SeqCst), 1);
}
