//! `PuppetOlm` against a scripted homeserver: queries are batched and never
//! run twice at once for a user, invalidated users are queried again,
//! sessions are reused or made from a verified claimed key, and each
//! unreachable device is reported on its own. (The same paths against a
//! real Synapse and a real client are in `synapse.rs`.)

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    routing::{post, put},
};
use bridgekeys_appservice::{
    AsToken, DeviceFailure, DeviceLists, Devices, HomeserverClient, PuppetOlm,
};
use bridgekeys_olm::{AccountManager, ManagerConfig, canonical_json_for_signing, vodozemac};
use bridgekeys_store::{SledStore, SledStoreConfig, StoreKey};
use ruma::{OwnedDeviceId, OwnedUserId, UserId, device_id, user_id};
use serde_json::{Value, json};
use vodozemac::olm::{Account, OlmMessage, SessionConfig};

/// How a scripted device answers a claim.
#[derive(Clone, Copy, PartialEq)]
enum Claim {
    Good,
    /// A key signed by some other key.
    Forged,
    /// No key left.
    Empty,
}

struct Device {
    account: Account,
    claim: Claim,
}

#[derive(Default)]
struct Hs {
    devices: BTreeMap<(String, String), Device>,
    queries: Vec<Vec<String>>,
    claims: usize,
    sent: Vec<(String, Value)>,
    /// Queries wait here until released (to overlap two callers).
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

type Shared = Arc<Mutex<Hs>>;

fn device_keys(user: &str, device: &str, account: &Account) -> Value {
    let mut keys = json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): account.curve25519_key().to_base64(),
            format!("ed25519:{device}"): account.ed25519_key().to_base64(),
        },
    });
    let signature = account.sign(canonical_json_for_signing(&keys).unwrap());
    keys["signatures"] = json!({ user: { format!("ed25519:{device}"): signature.to_base64() } });
    keys
}

async fn query(State(hs): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let gate = hs.lock().unwrap().gate.clone();
    if let Some(gate) = gate {
        let _permit = gate.acquire().await.unwrap();
    }
    let mut hs = hs.lock().unwrap();
    let users: Vec<String> = body["device_keys"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    hs.queries.push(users.clone());
    let mut out = serde_json::Map::new();
    for user in users {
        let mut devices = serde_json::Map::new();
        for ((u, d), device) in &hs.devices {
            if *u == user {
                devices.insert(d.clone(), device_keys(u, d, &device.account));
            }
        }
        out.insert(user, Value::Object(devices));
    }
    Json(json!({ "device_keys": out }))
}

async fn claim(State(hs): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let mut hs = hs.lock().unwrap();
    hs.claims += 1;
    let mut out = serde_json::Map::new();
    for (user, devices) in body["one_time_keys"].as_object().unwrap() {
        let mut per_device = serde_json::Map::new();
        for device in devices.as_object().unwrap().keys() {
            let Some(d) = hs.devices.get_mut(&(user.clone(), device.clone())) else {
                continue;
            };
            if d.claim == Claim::Empty {
                continue;
            }
            d.account.generate_one_time_keys(1);
            let (id, otk) = d.account.one_time_keys().into_iter().next().unwrap();
            d.account.mark_keys_as_published();
            let mut key = json!({ "key": otk.to_base64() });
            let signed = canonical_json_for_signing(&key).unwrap();
            let sig = match d.claim {
                Claim::Forged => Account::new().sign(&signed),
                _ => d.account.sign(&signed),
            };
            key["signatures"] =
                json!({ user.as_str(): { format!("ed25519:{device}"): sig.to_base64() } });
            per_device.insert(
                device.clone(),
                json!({ format!("signed_curve25519:{}", id.to_base64()): key }),
            );
        }
        out.insert(user.clone(), Value::Object(per_device));
    }
    Json(json!({ "one_time_keys": out }))
}

async fn send(
    State(hs): State<Shared>,
    Path((_event_type, txn_id)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    assert_eq!(query["user_id"], "@echo_p:localhost", "sent as the puppet");
    assert_eq!(
        query["device_id"], "PUPPETDEV",
        "sent as the puppet's device"
    );
    hs.lock().unwrap().sent.push((txn_id, body));
    Json(json!({}))
}

struct Fixture {
    hs: Shared,
    olm: PuppetOlm,
    _dir: tempfile::TempDir,
}

const PUPPET: (&str, &str) = ("@echo_p:localhost", "PUPPETDEV");

impl Fixture {
    async fn new(devices: &[(&str, &str, Claim)]) -> Self {
        let hs: Shared = Arc::default();
        for (user, device, claim) in devices {
            hs.lock().unwrap().devices.insert(
                ((*user).into(), (*device).into()),
                Device {
                    account: Account::new(),
                    claim: *claim,
                },
            );
        }
        let app = Router::new()
            .route("/_matrix/client/v3/keys/query", post(query))
            .route("/_matrix/client/v3/keys/claim", post(claim))
            .route(
                "/_matrix/client/v3/sendToDevice/{event_type}/{txn_id}",
                put(send),
            )
            .with_state(hs.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_or_create(SledStoreConfig::new(
            dir.path().join("store"),
            StoreKey::generate(),
        ))
        .unwrap();
        let manager = Arc::new(AccountManager::new(
            Arc::new(store),
            ManagerConfig::default(),
        ));
        manager
            .create_device(user_id!("@echo_p:localhost"), device_id!("PUPPETDEV"))
            .await
            .unwrap();
        let client = HomeserverClient::new(&url, AsToken::new("as-token")).unwrap();
        Self {
            hs,
            olm: PuppetOlm::new(manager, client),
            _dir: dir,
        }
    }

    fn puppet(&self) -> (&UserId, &ruma::DeviceId) {
        (
            <&UserId>::try_from(PUPPET.0).unwrap(),
            <&ruma::DeviceId>::from(PUPPET.1),
        )
    }

    fn queries(&self) -> Vec<Vec<String>> {
        self.hs.lock().unwrap().queries.clone()
    }
}

fn uid(s: &str) -> OwnedUserId {
    UserId::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_batched_never_concurrent_for_a_user_and_repeated_after_invalidation() {
    let fx = Fixture::new(&[
        ("@a:hs", "A1", Claim::Good),
        ("@a:hs", "A2", Claim::Good),
        ("@b:hs", "B1", Claim::Good),
    ])
    .await;
    // Hold the homeserver's answer until both callers are waiting on it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    fx.hs.lock().unwrap().gate = Some(gate.clone());
    let users = [uid("@a:hs"), uid("@b:hs")];
    let (first, second) = tokio::join!(fx.olm.devices(fx.puppet(), &users), async {
        // The second caller arrives while the first query is in flight.
        while fx.olm.queries() == 0 {
            tokio::task::yield_now().await;
        }
        let a_only = [uid("@a:hs")];
        let pending = fx.olm.devices(fx.puppet(), &a_only);
        tokio::pin!(pending);
        // Poll it once: it gets as far as waiting for user @a's query.
        tokio::select! {
            biased;
            _ = &mut pending => panic!("answered before the query in flight finished"),
            () = std::future::ready(()) => {}
        }
        gate.add_permits(10);
        pending.await
    });
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first[&uid("@a:hs")].devices.len(), 2);
    assert_eq!(first[&uid("@b:hs")].devices.len(), 1);
    assert_eq!(second[&uid("@a:hs")], first[&uid("@a:hs")]);
    assert_eq!(
        fx.queries(),
        vec![vec!["@a:hs".to_owned(), "@b:hs".to_owned()]],
        "one batched query for both users, none for the waiting caller"
    );

    // Tracked users are not queried again...
    fx.olm.devices(fx.puppet(), &users).await.unwrap();
    assert_eq!(fx.queries().len(), 1);
    // ...until device_lists says they changed; users that left are forgotten.
    let mut lists = DeviceLists::new();
    lists.changed = vec!["@a:hs".try_into().unwrap()];
    lists.left = vec!["@b:hs".try_into().unwrap()];
    fx.olm.note_device_lists(&lists).await.unwrap();
    assert!(
        fx.olm
            .manager()
            .tracked_devices(&uid("@b:hs"))
            .unwrap()
            .is_none()
    );
    fx.hs
        .lock()
        .unwrap()
        .devices
        .remove(&("@a:hs".into(), "A2".into()));
    let again = fx.olm.devices(fx.puppet(), &[uid("@a:hs")]).await.unwrap();
    assert_eq!(fx.queries().len(), 2);
    assert_eq!(fx.queries()[1], vec!["@a:hs".to_owned()]);
    assert_eq!(
        again[&uid("@a:hs")]
            .devices
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![OwnedDeviceId::from("A1")],
        "the re-query saw the removed device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypting_reuses_sessions_claims_for_new_devices_and_reports_each_failure() {
    let fx = Fixture::new(&[
        ("@a:hs", "GOOD", Claim::Good),
        ("@a:hs", "FORGED", Claim::Forged),
        ("@a:hs", "EMPTY", Claim::Empty),
    ])
    .await;
    let recipients = BTreeMap::from([(uid("@a:hs"), Devices::All)]);
    let report = fx
        .olm
        .encrypt_to_device(fx.puppet(), &recipients, "m.test", &json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(
        report.sent,
        vec![(uid("@a:hs"), OwnedDeviceId::from("GOOD"))]
    );
    assert_eq!((report.sessions_reused, report.sessions_created), (0, 1));
    let mut failed = report.failed.clone();
    failed.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        failed,
        vec![
            (
                uid("@a:hs"),
                OwnedDeviceId::from("EMPTY"),
                DeviceFailure::NoKeyToClaim
            ),
            (
                uid("@a:hs"),
                OwnedDeviceId::from("FORGED"),
                DeviceFailure::BadKeySignature
            ),
        ]
    );

    // The second message reuses the session: no claim for GOOD.
    let only_good = BTreeMap::from([(uid("@a:hs"), Devices::Only(vec!["GOOD".into()]))]);
    let claims_before = fx.hs.lock().unwrap().claims;
    let report = fx
        .olm
        .encrypt_to_device(fx.puppet(), &only_good, "m.test", &json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!((report.sessions_reused, report.sessions_created), (1, 0));
    assert_eq!(fx.hs.lock().unwrap().claims, claims_before);
    // An unknown device is reported, not fatal.
    let unknown = BTreeMap::from([(uid("@a:hs"), Devices::Only(vec!["NOPE".into()]))]);
    let report = fx
        .olm
        .encrypt_to_device(fx.puppet(), &unknown, "m.test", &json!({}))
        .await
        .unwrap();
    assert!(report.sent.is_empty());
    assert_eq!(report.failed[0].2, DeviceFailure::UnknownDevice);
    assert_eq!(report.txn_id, None, "nothing to send, nothing sent");

    // What reached the homeserver: the device GOOD decrypts both messages,
    // in order, each with the spec payload.
    let sent = fx.hs.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0].0, sent[1].0, "each send has its own transaction id");
    let mut hs = fx.hs.lock().unwrap();
    let good = hs
        .devices
        .get_mut(&("@a:hs".into(), "GOOD".into()))
        .unwrap();
    let identity = fx
        .olm
        .manager()
        .identity_keys(fx.puppet().0, fx.puppet().1)
        .unwrap();
    let mut session = None;
    for (n, (_, body)) in sent.iter().enumerate() {
        let content = &body["messages"]["@a:hs"]["GOOD"];
        assert_eq!(
            content["sender_key"],
            json!(identity.curve25519.to_base64())
        );
        let ciphertext = &content["ciphertext"][good.account.curve25519_key().to_base64()];
        let message = OlmMessage::from_parts(
            ciphertext["type"].as_u64().unwrap() as usize,
            &vodozemac::base64_decode(ciphertext["body"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let plaintext = match (&mut session, &message) {
            (None, OlmMessage::PreKey(m)) => {
                let created = good
                    .account
                    .create_inbound_session(SessionConfig::version_1(), identity.curve25519, m)
                    .unwrap();
                session = Some(created.session);
                created.plaintext
            }
            (Some(s), m) => s.decrypt(m).unwrap(),
            (None, OlmMessage::Normal(_)) => panic!("the first message must start the session"),
        };
        let payload: Value = serde_json::from_slice(&plaintext).unwrap();
        assert_eq!(payload["content"], json!({"n": n + 1}));
        assert_eq!(payload["recipient"], "@a:hs");
        assert_eq!(
            payload["recipient_keys"]["ed25519"],
            json!(good.account.ed25519_key().to_base64())
        );
        assert_eq!(payload["sender"], PUPPET.0);
        assert_eq!(payload["sender_device"], PUPPET.1);
        assert_eq!(
            payload["keys"]["ed25519"],
            json!(identity.ed25519.to_base64())
        );
    }
}
