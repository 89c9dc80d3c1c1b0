//! The key-claim service mounted alone in a bridge's own axum app, and the
//! whole listener mounted without its operations endpoints.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::common::*;
use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode},
    routing::{get, put},
};
use bridgekeys_appservice::{ClaimService, HsToken, Limits, paths};
use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{SledStore, SledStoreConfig};
use serde_json::{Value, json};

/// An account manager over a fresh store, with puppets `0..n` provisioned.
async fn manager(dir: &std::path::Path, n: usize) -> Arc<AccountManager> {
    let store = SledStore::create(SledStoreConfig::new(dir.join("store"), store_key())).unwrap();
    let manager = Arc::new(AccountManager::new(
        Arc::new(store),
        ManagerConfig::default(),
    ));
    for i in 0..n {
        manager.create_device(&puppet(i), &device()).await.unwrap();
    }
    manager
}

fn claims(manager: Arc<AccountManager>, limits: Limits) -> ClaimService {
    ClaimService::from_config(&config(limits), manager).unwrap()
}

/// A bridge's own app, as an existing appservice framework would have it:
/// its own transaction endpoint and health check, and the claim service
/// merged in.
fn app(claims: &ClaimService, transactions: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/health", get(|| async { "own route" }))
        .route(
            paths::TRANSACTION[0],
            put(move || {
                let transactions = Arc::clone(&transactions);
                async move {
                    transactions.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({"handled_by": "the app"}))
                }
            }),
        )
        .merge(claims.router())
}

fn claim_request(token: Option<&str>, body: &Value) -> Request<Body> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(paths::CLAIM[1])
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(json_body(body)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_through_the_mounted_service_returns_keys_signed_by_the_puppet_device() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), 2).await;
    let claims = claims(Arc::clone(&manager), Limits::default());
    let app = app(&claims, Arc::default());
    let user = puppet(0);
    let mut seen = Vec::new();
    for path in paths::CLAIM {
        let req = json!({
            user.as_str(): {"PUPPETDEV": ["signed_curve25519", "signed_curve25519"]},
            "@echo_9:localhost": {"PUPPETDEV": ["signed_curve25519"]},
            "@alice:localhost": {"PUPPETDEV": ["signed_curve25519"]},
        });
        let (status, body) = call(&app, authed(Method::POST, path, json_body(&req))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(
            body.as_object().unwrap().keys().collect::<Vec<_>>(),
            [user.as_str()],
            "{path}: only the provisioned puppet in the namespace is served"
        );
        let keys = body[user.as_str()]["PUPPETDEV"].as_object().unwrap();
        assert_eq!(keys.len(), 2, "{path}");
        for (id, key) in keys {
            assert_signed_key(&manager, &user, &device(), id, key);
            assert!(
                !seen.contains(&key["key"]),
                "{path}: a key handed out twice"
            );
            seen.push(key["key"].clone());
        }
    }
    assert_eq!(manager.stats().keys_issued, 6);
    let metrics = claims.metrics_text().unwrap();
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_claims_total"),
        3.0
    );
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_keys_issued_total"),
        6.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_claim_devices_skipped_total"
        ),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_paths_refuse_a_missing_or_wrong_token_and_hand_out_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), 1).await;
    let claims = claims(Arc::clone(&manager), Limits::default());
    let app = app(&claims, Arc::default());
    let req = json!({puppet(0).as_str(): {"PUPPETDEV": ["signed_curve25519"]}});

    let (status, body) = call(&app, claim_request(None, &req)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["errcode"], "M_MISSING_TOKEN");

    let (status, body) = call(&app, claim_request(Some("not-the-token"), &req)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["errcode"], "M_FORBIDDEN");

    // The query-string token is checked the same way.
    let (status, body) = call(
        &app,
        Request::post(format!("{}?access_token=wrong", paths::CLAIM[0]))
            .body(json_body(&req))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["errcode"], "M_FORBIDDEN");

    assert_eq!(manager.stats().keys_issued, 0, "no key left the bridge");
    let metrics = claims.metrics_text().unwrap();
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_errors_total{errcode=\"M_FORBIDDEN\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_claims_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_service_serves_nothing_but_claims_and_leaves_the_apps_routes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), 1).await;
    let claims = claims(Arc::clone(&manager), Limits::default());

    // Alone, a transaction (or any other appservice path) is not its
    // business: axum's plain 404, no Matrix error, nothing processed.
    let alone = claims.router();
    let txn = || {
        authed(
            Method::PUT,
            "/_matrix/app/v1/transactions/t1",
            json_body(&json!({"events": []})),
        )
    };
    for req in [
        txn(),
        authed(Method::GET, paths::METRICS, Body::empty()),
        authed(Method::GET, paths::LIVE, Body::empty()),
        authed(Method::POST, paths::PING, json_body(&json!({}))),
    ] {
        let uri = req.uri().clone();
        let (status, body) = call(&alone, req).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body, Value::Null, "{uri}: not answered by the service");
    }

    // Mounted: the app's own transaction endpoint and health check answer,
    // without the homeserver token (the check guards the claim paths only).
    let transactions = Arc::new(AtomicUsize::new(0));
    let app = app(&claims, Arc::clone(&transactions));
    let (status, body) = call(&app, txn()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["handled_by"], "the app");
    assert_eq!(transactions.load(Ordering::SeqCst), 1);
    let (status, body) = call(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "own route");

    // A wrong method on a claim path is the service's: a Matrix 405.
    let (status, body) = call(&app, authed(Method::GET, paths::CLAIM[0], Body::empty())).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["errcode"], "M_UNRECOGNIZED");
    assert_eq!(manager.stats().keys_issued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mounted_claim_service_keeps_the_body_limit_the_caps_and_matrix_errors() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), 1).await;
    let limits = {
        let mut c = Limits::default();
        c.max_body_bytes = 256;
        c.max_keys_per_device = 2;
        c
    };
    let claims = claims(Arc::clone(&manager), limits);
    let app = app(&claims, Arc::default());
    let user = puppet(0);

    let big = json!({user.as_str(): {"PUPPETDEV": ["signed_curve25519"]}, "pad": "x".repeat(400)});
    let (status, body) = call(&app, authed(Method::POST, paths::CLAIM[0], json_body(&big))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["errcode"], "M_TOO_LARGE");

    let (status, body) = call(
        &app,
        authed(Method::POST, paths::CLAIM[0], Body::from("not json")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errcode"], "M_NOT_JSON");

    let greedy = json!({user.as_str(): {"PUPPETDEV": vec!["signed_curve25519"; 3]}});
    let (status, body) = call(
        &app,
        authed(Method::POST, paths::CLAIM[0], json_body(&greedy)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errcode"], "M_INVALID_PARAM");
    assert_eq!(
        manager.stats().keys_issued,
        0,
        "refused whole, nothing made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_service_can_add_the_fallback_key_like_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), 1).await;
    let user = puppet(0);
    let fallback = manager
        .fallback_key_for_upload(&user, &device(), 1_000)
        .await
        .unwrap()
        .unwrap();
    assert!(
        manager
            .mark_fallback_published(&user, &device(), &fallback.key_id, 2_000)
            .await
            .unwrap()
    );
    let claims = ClaimService::new(
        HsToken::new(TOKEN),
        config(Limits::default()).namespace,
        Limits::default(),
        Arc::clone(&manager),
    )
    .unwrap()
    .with_fallback_in_claims(true);
    let req = json!({user.as_str(): {"PUPPETDEV": ["signed_curve25519"]}});
    let (status, body) = call(
        &claims.router(),
        authed(Method::POST, paths::CLAIM[0], json_body(&req)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys = body[user.as_str()]["PUPPETDEV"].as_object().unwrap();
    assert_eq!(
        keys.len(),
        2,
        "one one-time key and the fallback key: {body}"
    );
    assert_eq!(
        keys.values()
            .filter(|k| k["fallback"] == json!(true))
            .count(),
        1
    );
    for (id, key) in keys {
        assert_signed_key(&manager, &user, &device(), id, key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_without_operations_serves_the_matrix_api_but_no_health_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let router = fx.appservice.router_without_operations();
    for path in [paths::LIVE, paths::READY, paths::METRICS] {
        let (status, body) = call(&router, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert_eq!(body["errcode"], "M_MISSING_TOKEN", "{path}");
        let (status, body) = call(&router, authed(Method::GET, path, Body::empty())).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["errcode"], "M_UNRECOGNIZED", "{path}");
    }
    let req = json!({puppet(0).as_str(): {"PUPPETDEV": ["signed_curve25519"]}});
    let (status, body) = call(
        &router,
        authed(Method::POST, paths::CLAIM[1], json_body(&req)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body[puppet(0).as_str()]["PUPPETDEV"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
    let (status, _) = call(
        &router,
        authed(
            Method::PUT,
            "/_matrix/app/v1/transactions/t1",
            json_body(&json!({"events": []})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "transactions are served");
    assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 1);
    // The metrics stay available to the author's own endpoint.
    let metrics = fx.appservice.metrics_text().unwrap();
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_claims_total"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_transactions_total"),
        1.0
    );
    // The full router still has them.
    let (status, _) = call(
        &fx.appservice.router(),
        Request::get(paths::LIVE).body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// Issue 14, item 2: a bridge with its own Prometheus registry gets the
/// claim counters in it, under the same names as on the listener's
/// `/metrics`, and they count the claims served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_counters_land_in_the_authors_own_registry_under_the_usual_names() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), 1).await;
    let claims = claims(Arc::clone(&manager), Limits::default());
    let mine = prometheus::Registry::new();
    let own = prometheus::IntCounter::new("my_bridge_messages_total", "mine").unwrap();
    mine.register(Box::new(own.clone())).unwrap();
    claims.register_metrics(&mine).unwrap();
    let app = app(&claims, Arc::default());
    let req =
        json!({puppet(0).as_str(): {"PUPPETDEV": ["signed_curve25519", "signed_curve25519"]}});
    let (status, body) = call(&app, authed(Method::POST, paths::CLAIM[0], json_body(&req))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&mine.gather())
        .unwrap();
    assert_eq!(
        metric_value(&text, "bridgekeys_appservice_claims_total"),
        1.0
    );
    assert_eq!(
        metric_value(&text, "bridgekeys_appservice_keys_issued_total"),
        2.0
    );
    assert!(text.contains("my_bridge_messages_total"), "{text}");
    // The same names as the service's own exposition.
    assert_eq!(
        metric_value(
            &claims.metrics_text().unwrap(),
            "bridgekeys_appservice_claims_total"
        ),
        1.0
    );
    // Registering twice in one registry is refused, not silently doubled.
    assert!(claims.register_metrics(&mine).is_err());
}
