//! The builder wires a bridge from its registration, and the bridge it
//! builds serves, runs its background tasks and leaves nothing behind.
#![allow(clippy::unwrap_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::Request, http::StatusCode};
use bridgekeys::{
    BridgeError, Bridgekeys, Parts,
    appservice::{BridgeHandler, HandlerError, Registration, Transaction},
    store::{SledStore, SledStoreConfig, StoreKey},
};
use ruma::{OwnedDeviceId, UserId};
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(Default)]
struct Counting {
    transactions: AtomicUsize,
}

impl BridgeHandler for Counting {
    async fn transaction(&self, _t: &Transaction) -> Result<(), HandlerError> {
        self.transactions.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn registration() -> Registration {
    Registration::generate("test-bridge", "http://127.0.0.1:1", "bot", "@my_.*")
}

fn store_config(dir: &std::path::Path) -> SledStoreConfig {
    SledStoreConfig::new(dir.join("store"), StoreKey::new([7; 32]))
}

/// A homeserver that knows nothing (404 `M_UNRECOGNIZED` to every call)
/// and records the paths it was asked.
async fn homeserver() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let app = Router::new().fallback(move |req: Request| {
        let recorded = Arc::clone(&recorded);
        async move {
            recorded.lock().unwrap().push(req.uri().path().to_owned());
            (
                StatusCode::NOT_FOUND,
                Json(json!({"errcode": "M_UNRECOGNIZED", "error": "not here"})),
            )
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parts_are_wired_from_the_registration() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::create(store_config(dir.path())).unwrap());
    let registration = registration();
    let bridge = Bridgekeys::builder(registration.clone(), "example.org".try_into().unwrap())
        .homeserver_url("http://127.0.0.1:1")
        .store(store.clone())
        .pool_config({
            let mut c = bridgekeys::appservice::PoolConfig::default();
            c.puppet_device_id = "ELSEWHERE".into();
            c
        })
        .handler(|parts: &Parts| {
            assert_eq!(parts.registration.id, "test-bridge");
            Counting::default()
        })
        .build()
        .unwrap();
    let parts = bridge.parts();
    assert_eq!(parts.bot.as_str(), "@bot:example.org");
    assert!(
        parts
            .puppets
            .contains(UserId::parse("@my_alice:example.org").unwrap().as_ref())
    );
    assert!(
        !parts.puppets.contains(&parts.bot),
        "the bot is not a puppet"
    );
    let ours: Arc<dyn bridgekeys::store::Backend> = store.clone();
    assert!(Arc::ptr_eq(bridge.store(), &ours));
    assert_eq!(
        bridge.key_pool().config().puppet_device_id,
        "BRIDGEKEYS",
        "the provisioner's device id"
    );
    assert!(Arc::ptr_eq(bridge.olm().manager(), bridge.manager()));
    // One account manager behind everything: a device made through one
    // piece is known to the others.
    let puppet = UserId::parse("@my_alice:example.org").unwrap();
    let device = OwnedDeviceId::from("BRIDGEKEYS");
    bridge
        .manager()
        .create_device(&puppet, &device)
        .await
        .unwrap();
    assert!(parts.manager.identity_keys(&puppet, &device).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_without_its_store_or_homeserver_or_with_a_bad_one_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::create(store_config(dir.path())).unwrap());
    let server: ruma::OwnedServerName = "example.org".try_into().unwrap();
    let no_store = Bridgekeys::builder(registration(), server.clone())
        .homeserver_url("http://127.0.0.1:1")
        .handler(|_: &Parts| Counting::default())
        .build();
    assert!(matches!(no_store, Err(BridgeError::Missing(what)) if what.contains("store")));
    let no_url = Bridgekeys::builder(registration(), server.clone())
        .store(store.clone())
        .handler(|_: &Parts| Counting::default())
        .build();
    assert!(matches!(no_url, Err(BridgeError::Missing(what)) if what.contains("homeserver")));
    let bad_url = Bridgekeys::builder(registration(), server.clone())
        .homeserver_url("not a url")
        .store(store.clone())
        .handler(|_: &Parts| Counting::default())
        .build();
    assert!(
        matches!(bad_url, Err(BridgeError::Homeserver(_))),
        "{bad_url:?}"
    );
    let bad_pem = Bridgekeys::builder(registration(), server.clone())
        .homeserver_url("https://127.0.0.1:1")
        .root_certificate_pem(b"not a certificate".to_vec())
        .store(store.clone())
        .handler(|_: &Parts| Counting::default())
        .build();
    assert!(
        matches!(bad_pem, Err(BridgeError::Homeserver(_))),
        "{bad_pem:?}"
    );
    let mut bad_regex = registration();
    bad_regex.namespaces.users[0].regex = "x)|(.*".into();
    let bad_regex = Bridgekeys::builder(bad_regex, server)
        .homeserver_url("http://127.0.0.1:1")
        .store(store)
        .handler(|_: &Parts| Counting::default())
        .build();
    assert!(
        matches!(bad_regex, Err(BridgeError::Appservice(_))),
        "{bad_regex:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_bridge_serves_claims_and_transactions_pings_and_leaves_the_store_free() {
    let dir = tempfile::tempdir().unwrap();
    let (url, homeserver_saw) = homeserver().await;
    let registration = registration();
    let hs_token = registration.hs_token.clone();
    let bridge = Bridgekeys::builder(registration, "example.org".try_into().unwrap())
        .homeserver_url(url)
        .store(Arc::new(
            SledStore::create(store_config(dir.path())).unwrap(),
        ))
        .handler(|_: &Parts| Counting::default())
        .build()
        .unwrap();
    let puppet = UserId::parse("@my_alice:example.org").unwrap();
    let device = OwnedDeviceId::from("BRIDGEKEYS");
    bridge
        .manager()
        .create_device(&puppet, &device)
        .await
        .unwrap();
    let handler = Arc::clone(bridge.handler());
    assert!(
        SledStore::open(store_config(dir.path())).is_err(),
        "the store is locked while the bridge holds it (sled gives up after a few seconds)"
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bridge_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(bridge.serve_on(listener, async move {
        let _ = stopped.await;
    }));

    let client = reqwest::Client::new();
    let answer = client
        .post(format!("{bridge_url}/_matrix/app/v1/keys/claim"))
        .bearer_auth(&hs_token)
        .body(json!({puppet.as_str(): {"BRIDGEKEYS": ["signed_curve25519"]}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(
        body[puppet.as_str()]["BRIDGEKEYS"]
            .as_object()
            .unwrap()
            .len(),
        1,
        "{body}"
    );
    let put = client
        .put(format!("{bridge_url}/_matrix/app/v1/transactions/t1"))
        .bearer_auth(&hs_token)
        .body(json!({"events": []}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(handler.transactions.load(Ordering::SeqCst), 1);
    let ready = client
        .get(format!("{bridge_url}/_bridgekeys/ready"))
        .send()
        .await
        .unwrap();
    let ready: Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(ready["claim_mode"], "unknown", "the key pool is attached");

    // Once serving, the bridge asks the homeserver to ping it.
    let ping = "/_matrix/client/v1/appservice/test-bridge/ping";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !homeserver_saw.lock().unwrap().iter().any(|p| p == ping) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ping: {:?}",
            homeserver_saw.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("serve_on returns after shutdown")
        .unwrap()
        .unwrap();
    drop(handler);
    // Nothing of the bridge outlived serve_on: the store opens again at
    // once, with the puppet's device in it.
    let reopened = SledStore::open(store_config(dir.path())).expect("the store is free");
    let manager = bridgekeys::olm::AccountManager::new(
        Arc::new(reopened),
        bridgekeys::olm::ManagerConfig::default(),
    );
    assert!(manager.identity_keys(&puppet, &device).is_ok());
}
