//! Key claims: what is served, to whom, in parallel, at scale, and never
//! without its durable write.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use crate::common::*;
use axum::http::{Method, StatusCode};
use bridgekeys_appservice::{Limits, paths};
use bridgekeys_store::Store;
use serde_json::{Value, json};

fn keys_of<'a>(body: &'a Value, user: &str, device: &str) -> &'a serde_json::Map<String, Value> {
    body[user][device].as_object().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_every_path_returns_the_requested_number_of_fresh_signed_keys() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let user = puppet(0);
    let mut seen_ids = HashSet::new();
    let mut seen_keys = HashSet::new();
    for path in paths::CLAIM {
        let req = json!({user.as_str(): {"PUPPETDEV": vec!["signed_curve25519"; 3]}});
        let (status, body) = fx.call(authed(Method::POST, path, json_body(&req))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let keys = keys_of(&body, user.as_str(), "PUPPETDEV");
        assert_eq!(keys.len(), 3, "{path}: one key per repeated algorithm");
        for (id, key) in keys {
            assert_signed_key(&fx.manager, &user, &device(), id, key);
            assert!(seen_ids.insert(id.clone()), "key id {id} issued twice");
            assert!(seen_keys.insert(key["key"].to_string()), "key issued twice");
        }
    }
    assert_eq!(fx.manager.stats().keys_issued, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_claim_serves_only_provisioned_in_namespace_devices_and_the_known_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(2).await;
    let req = json!({
        "@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519", "org.example.unknown"], "OTHER": ["signed_curve25519"]},
        "@echo_1:localhost": {"PUPPETDEV": ["signed_curve25519", "signed_curve25519"]},
        "@echo_9:localhost": {"PUPPETDEV": ["signed_curve25519"]},
        "@alice:localhost": {"PUPPETDEV": ["signed_curve25519"]},
    });
    let (status, body) = fx
        .call(authed(Method::POST, paths::CLAIM[1], json_body(&req)))
        .await;
    assert_eq!(status, StatusCode::OK);
    let users: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    assert_eq!(users, ["@echo_0:localhost", "@echo_1:localhost"]);
    assert_eq!(
        body["@echo_0:localhost"].as_object().unwrap().len(),
        1,
        "OTHER was never provisioned"
    );
    assert_eq!(keys_of(&body, "@echo_0:localhost", "PUPPETDEV").len(), 1);
    assert_eq!(keys_of(&body, "@echo_1:localhost", "PUPPETDEV").len(), 2);
    assert_eq!(
        fx.manager.stats().devices_created,
        2,
        "nothing was created on the fly"
    );
    let metrics = fx.metrics().await;
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_claims_total"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "bridgekeys_appservice_keys_issued_total"),
        3.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_claim_devices_skipped_total"
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_claim_duration_seconds_count"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_for_1000_users_with_one_device_each_is_answered_completely_and_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1000).await;
    let mut req = serde_json::Map::new();
    for i in 0..1000 {
        req.insert(
            puppet(i).to_string(),
            json!({"PUPPETDEV": ["signed_curve25519"]}),
        );
    }
    let writes_before = fx.store.commit_stats();
    let (status, body) = fx
        .call(authed(
            Method::POST,
            paths::CLAIM[1],
            json_body(&Value::Object(req)),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_object().unwrap().len(), 1000);
    let mut all_keys = HashSet::new();
    for i in 0..1000 {
        let user = puppet(i);
        let keys = keys_of(&body, user.as_str(), "PUPPETDEV");
        assert_eq!(keys.len(), 1, "{user}");
        let (id, key) = keys.iter().next().unwrap();
        assert_signed_key(&fx.manager, &user, &device(), id, key);
        assert!(all_keys.insert(key["key"].to_string()));
        let stored = fx
            .store
            .count_one_time_keys(&bridgekeys_store::DeviceKey::new(
                user.as_str(),
                "PUPPETDEV",
            ))
            .unwrap();
        assert_eq!(stored, 1, "{user}: the private half is stored");
    }
    assert_eq!(fx.manager.stats().keys_issued, 1000);
    let after = fx.store.commit_stats();
    assert_eq!(after.writes - writes_before.writes, 1000);
    assert!(
        after.flushes - writes_before.flushes < 1000,
        "parallel device claims share flushes (group commit)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_of_one_claim_are_served_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(2).await;
    // Each device's write waits until the other device's write has started:
    // served one after the other, the first would wait in vain.
    let (a_tx, a_rx) = std::sync::mpsc::channel::<()>();
    let (b_tx, b_rx) = std::sync::mpsc::channel::<()>();
    let overlapped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ov = Arc::clone(&overlapped);
    // Whichever write starts first takes one end, the second the other.
    let ends = Arc::new(Mutex::new(vec![(a_tx, b_rx), (b_tx, a_rx)]));
    let e = Arc::clone(&ends);
    fx.faults.set_hook(move |_device| {
        let Some((tell, wait)) = e.lock().unwrap().pop() else {
            return;
        };
        let _ = tell.send(());
        if wait.recv_timeout(Duration::from_secs(10)).is_ok() {
            ov.fetch_add(1, Ordering::SeqCst);
        }
    });
    let req = json!({
        "@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]},
        "@echo_1:localhost": {"PUPPETDEV": ["signed_curve25519"]},
    });
    let (status, body) = fx
        .call(authed(Method::POST, paths::CLAIM[0], json_body(&req)))
        .await;
    fx.faults.clear_hook();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_object().unwrap().len(), 2);
    assert_eq!(
        overlapped.load(Ordering::SeqCst),
        2,
        "both device claims were in flight at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_write_fails_is_left_out_never_answered_with_undurable_keys() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    fx.faults.fail_device_writes.store(true, Ordering::SeqCst);
    let req = json!({"@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]}});
    let (status, body) = fx
        .call(authed(Method::POST, paths::CLAIM[1], json_body(&req)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({}), "no key without its durable write");
    assert_eq!(fx.manager.stats().keys_issued, 0);
    let metrics = fx.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "bridgekeys_appservice_errors_total{errcode=\"claim_device\"}"
        ),
        1.0
    );
    // The disk recovers: the device is served again, with a fresh key.
    fx.faults.fail_device_writes.store(false, Ordering::SeqCst);
    let (_, body) = fx
        .call(authed(Method::POST, paths::CLAIM[1], json_body(&req)))
        .await;
    assert_eq!(keys_of(&body, "@echo_0:localhost", "PUPPETDEV").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_at_the_outstanding_key_bound_show_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open_with(dir.path(), Limits::default(), {
        let mut c = bridgekeys_olm::ManagerConfig::default();
        c.max_keys_per_claim = 5;
        c.max_outstanding_keys = 5;
        c
    });
    fx.provision(1).await;
    let req = json!({"@echo_0:localhost": {"PUPPETDEV": vec!["signed_curve25519"; 4]}});
    for _ in 0..2 {
        let (status, body) = fx
            .call(authed(Method::POST, paths::CLAIM[1], json_body(&req)))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(keys_of(&body, "@echo_0:localhost", "PUPPETDEV").len(), 4);
    }
    assert_eq!(fx.manager.stats().evicted_keys, 3);
    assert_eq!(
        fx.metric("bridgekeys_appservice_evicted_keys_total").await,
        3.0
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_keys_issued_total").await,
        8.0
    );
}
