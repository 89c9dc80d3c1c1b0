//! `m.room_key_request` for held events: an event whose room key has not
//! come within the wait makes the puppet device the bridge names ask all of
//! the sender's devices once per session (not per event, not again after a
//! second transaction or a restart), nothing before the wait, a failed send
//! is tried again, and when the key comes the event is decrypted and the
//! request cancelled. The homeserver is a local stand-in that records each
//! `sendToDevice` as the puppet sent it.

use std::{
    collections::BTreeMap,
    path::Path as FsPath,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::common::{
    authed, claimed_public_key, config, device, json_body, metric_value, puppet, room_events,
    store_key,
};
use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{Method, StatusCode},
    routing::put,
};
use bridgekeys_appservice::{
    Appservice, AsToken, BridgeHandler, HandlerError, HomeserverClient, Limits, PuppetOlm,
    Transaction, paths,
};
use bridgekeys_olm::{
    AccountManager, ManagerConfig,
    vodozemac::{
        Curve25519PublicKey,
        megolm::{GroupSession, SessionConfig as MegolmConfig},
        olm::{Account, IdentityKeys, OlmMessage, Session, SessionConfig},
    },
};
use bridgekeys_store::{
    SledStore, SledStoreConfig, Store, TransactionLog,
    testing::{Intercepted, Write},
};
use ruma::{OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};
use tower::ServiceExt;

const ROOM: &str = "!keys:localhost";
const ALICE: &str = "@alice:localhost";

/// One `sendToDevice` the stand-in homeserver took.
#[derive(Clone, Debug)]
struct Sent {
    event_type: String,
    txn_id: String,
    as_user: String,
    as_device: String,
    body: Value,
}

#[derive(Default)]
struct Hs {
    sent: Vec<Sent>,
    /// Answer this many `sendToDevice` calls with a 500 first.
    fail: usize,
    refused: usize,
}

type Shared = Arc<Mutex<Hs>>;

async fn send_to_device(
    State(hs): State<Shared>,
    Path((event_type, txn_id)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut hs = hs.lock().unwrap();
    if hs.fail > 0 {
        hs.fail -= 1;
        hs.refused += 1;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"errcode": "M_UNKNOWN", "error": "injected"})),
        );
    }
    hs.sent.push(Sent {
        event_type,
        txn_id,
        as_user: query.get("user_id").cloned().unwrap_or_default(),
        as_device: query.get("device_id").cloned().unwrap_or_default(),
        body,
    });
    (StatusCode::OK, Json(json!({})))
}

/// A homeserver that records to-device messages; its base URL.
async fn homeserver() -> (Shared, String) {
    let hs: Shared = Arc::default();
    let app = Router::new()
        .route(
            "/_matrix/client/v3/sendToDevice/{event_type}/{txn_id}",
            put(send_to_device),
        )
        .with_state(Arc::clone(&hs));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hs, url)
}

/// An encrypted room event handed over: its id, and its inner content or
/// why not.
type RoomEvent = (String, Result<String, String>);

/// A bridge that names puppet 0's device to ask for keys (or nobody), and
/// records the encrypted room events it is handed.
#[derive(Default)]
struct Bridge {
    requester: Option<(OwnedUserId, OwnedDeviceId)>,
    asked: Mutex<Vec<(String, String)>>,
    /// Per transaction: (event id, inner content or why not).
    seen: Mutex<Vec<Vec<RoomEvent>>>,
}

impl BridgeHandler for Bridge {
    async fn transaction(&self, t: &Transaction) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push(room_events(t));
        Ok(())
    }

    async fn room_key_requester(
        &self,
        room_id: &RoomId,
        sender: &UserId,
    ) -> Option<(OwnedUserId, OwnedDeviceId)> {
        self.asked
            .lock()
            .unwrap()
            .push((room_id.to_string(), sender.to_string()));
        self.requester.clone()
    }
}

/// A listener with puppet 0 provisioned and a `PuppetOlm` on `hs_url`.
struct Rig {
    appservice: Appservice<Bridge>,
    router: Router,
    manager: Arc<AccountManager>,
    /// The sled store, behind a hook a test can use to stand in for
    /// another process writing to the same store.
    store: Arc<Intercepted>,
    bridge: Arc<Bridge>,
}

impl Rig {
    async fn open(dir: &FsPath, wait: Option<Duration>, hs_url: &str, names: bool) -> Self {
        let store = Arc::new(Intercepted::new(Arc::new(
            SledStore::open_or_create(SledStoreConfig::new(dir.join("store"), store_key()))
                .unwrap(),
        )));
        let manager = Arc::new(AccountManager::new(
            Arc::clone(&store) as Arc<dyn Store>,
            ManagerConfig::default(),
        ));
        if manager.identity_keys(&puppet(0), &device()).is_err() {
            manager.create_device(&puppet(0), &device()).await.unwrap();
        }
        let bridge = Arc::new(Bridge {
            requester: names.then(|| (puppet(0), device())),
            ..Bridge::default()
        });
        let limits = {
            let mut c = Limits::default();
            c.room_key_request_after = wait;
            c
        };
        let client = HomeserverClient::new(hs_url, AsToken::new("as-token")).unwrap();
        let appservice = Appservice::new(
            config(limits),
            Arc::clone(&manager),
            Arc::clone(&store) as Arc<dyn TransactionLog>,
            Arc::clone(&bridge),
        )
        .unwrap()
        .with_olm(Arc::new(PuppetOlm::new(Arc::clone(&manager), client)));
        let router = appservice.router();
        Self {
            appservice,
            router,
            manager,
            store,
            bridge,
        }
    }

    async fn put(&self, txn_id: &str, body: Value) {
        let (status, _) = crate::common::call(
            &self.router,
            authed(
                Method::PUT,
                &format!("/_matrix/app/v1/transactions/{txn_id}"),
                json_body(&body),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    async fn metric(&self, name: &str) -> f64 {
        let resp = self
            .router
            .clone()
            .oneshot(
                axum::http::Request::get("/metrics")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        metric_value(std::str::from_utf8(&bytes).unwrap(), name)
    }

    fn held(&self) -> usize {
        self.store.held_events(None).unwrap().len()
    }
}

/// Alice's device: an Olm session to puppet 0 (from a claimed one-time
/// key) and a Megolm session in the room.
struct Alice {
    account: Account,
    olm: Session,
    puppet_keys: IdentityKeys,
    group: GroupSession,
}

impl Alice {
    async fn new(rig: &Rig) -> Self {
        let req = json!({"@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]}});
        let (_, body) = crate::common::call(
            &rig.router,
            authed(Method::POST, paths::CLAIM[1], json_body(&req)),
        )
        .await;
        let otk = Curve25519PublicKey::from_base64(claimed_public_key(&body)).unwrap();
        let puppet_keys = rig.manager.identity_keys(&puppet(0), &device()).unwrap();
        let account = Account::new();
        let olm = account
            .create_outbound_session(SessionConfig::version_1(), puppet_keys.curve25519, otk)
            .unwrap();
        Self {
            account,
            olm,
            puppet_keys,
            group: GroupSession::new(MegolmConfig::version_1()),
        }
    }

    fn sender_key(&self) -> String {
        self.account.curve25519_key().to_base64()
    }

    /// An encrypted room event of the current session.
    fn event(&mut self, id: &str, body: &str) -> Value {
        let plaintext =
            json!({"type": "m.room.message", "room_id": ROOM, "content": {"body": body}});
        json!({
            "type": "m.room.encrypted", "event_id": id, "room_id": ROOM, "sender": ALICE,
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": self.group.encrypt(plaintext.to_string()).to_base64(),
                "session_id": self.group.session_id(),
                "sender_key": self.sender_key(),
                "device_id": "ALICEDEV",
            }
        })
    }

    /// The session's key (from index 0) as an Olm to-device message to
    /// puppet 0, as the homeserver delivers it.
    fn room_key(&mut self) -> Value {
        let payload = json!({
            "type": "m.room_key",
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2", "room_id": ROOM,
                "session_id": self.group.session_id(),
                "session_key": self.group.session_key().to_base64(),
            },
            "sender": ALICE, "sender_device": "ALICEDEV",
            "recipient": "@echo_0:localhost",
            "recipient_keys": {"ed25519": self.puppet_keys.ed25519.to_base64()},
            "keys": {"ed25519": self.account.ed25519_key().to_base64()},
        });
        let (kind, body) = match self.olm.encrypt(payload.to_string()).unwrap() {
            OlmMessage::PreKey(m) => (0, m.to_base64()),
            OlmMessage::Normal(m) => (1, m.to_base64()),
        };
        json!({
            "to_user_id": "@echo_0:localhost", "to_device_id": "PUPPETDEV",
            "type": "m.room.encrypted", "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": self.sender_key(),
                "ciphertext": {self.puppet_keys.curve25519.to_base64(): {"type": kind, "body": body}}
            }
        })
    }
}

/// The `m.room_key_request` contents sent so far, to all of Alice's
/// devices, checking each was sent as puppet 0's device.
fn key_requests(hs: &Shared) -> Vec<(String, Value)> {
    hs.lock()
        .unwrap()
        .sent
        .iter()
        .map(|s| {
            assert_eq!(s.event_type, "m.room_key_request");
            assert_eq!(
                (s.as_user.as_str(), s.as_device.as_str()),
                ("@echo_0:localhost", "PUPPETDEV"),
                "sent as the puppet device that asks"
            );
            let messages = s.body["messages"].as_object().unwrap();
            assert_eq!(messages.len(), 1, "{messages:?}");
            let to_alice = messages[ALICE].as_object().unwrap();
            assert_eq!(to_alice.len(), 1, "{to_alice:?}");
            (s.txn_id.clone(), to_alice["*"].clone())
        })
        .collect()
}

/// Check a request's shape; its request id.
fn assert_request(content: &Value, alice: &Alice) -> String {
    let request_id = content["request_id"].as_str().unwrap().to_owned();
    assert!(!request_id.is_empty());
    assert_eq!(
        *content,
        json!({
            "action": "request",
            "body": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "room_id": ROOM,
                "sender_key": alice.sender_key(),
                "session_id": alice.group.session_id(),
            },
            "request_id": request_id,
            "requesting_device_id": "PUPPETDEV",
        })
    );
    request_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_event_past_the_wait_asks_all_the_senders_devices_once_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, url) = homeserver().await;
    let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, true).await;
    let mut alice = Alice::new(&rig).await;
    let (one, two) = (alice.event("$one", "1"), alice.event("$two", "2"));
    rig.put("k-1", json!({"events": [one, two]})).await;

    let sent = key_requests(&hs);
    assert_eq!(sent.len(), 1, "one request for two events of one session");
    let request_id = assert_request(&sent[0].1, &alice);
    assert_eq!(
        *rig.bridge.asked.lock().unwrap(),
        vec![(ROOM.to_owned(), ALICE.to_owned())]
    );
    assert_eq!(rig.held(), 2, "still held");
    assert!(rig.bridge.seen.lock().unwrap()[0].is_empty());

    // Later transactions, another event of the same session, and an
    // explicit check ask nothing more.
    rig.put("k-2", json!({"events": []})).await;
    rig.put("k-3", json!({"events": [alice.event("$three", "3")]}))
        .await;
    rig.appservice.request_room_keys().await;
    assert_eq!(key_requests(&hs).len(), 1);
    assert_eq!(
        rig.metric("bridgekeys_appservice_room_key_requests_total")
            .await,
        1.0
    );
    assert_eq!(rig.held(), 3);

    // The same transaction retried is a duplicate: nothing is asked.
    rig.put("k-1", json!({"events": []})).await;
    assert_eq!(key_requests(&hs).len(), 1);

    // A new session of the same sender is asked for on its own.
    alice.group = GroupSession::new(MegolmConfig::version_1());
    rig.put("k-4", json!({"events": [alice.event("$four", "4")]}))
        .await;
    let sent = key_requests(&hs);
    assert_eq!(sent.len(), 2);
    let second = assert_request(&sent[1].1, &alice);
    assert_ne!(second, request_id);
    assert_ne!(
        sent[0].0, sent[1].0,
        "each request its own sendToDevice txn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_asked_before_the_wait_and_a_restart_does_not_ask_again() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, url) = homeserver().await;
    let alice = {
        let rig = Rig::open(dir.path(), Some(Duration::from_secs(3600)), &url, true).await;
        let mut alice = Alice::new(&rig).await;
        rig.put("r-1", json!({"events": [alice.event("$early", "x")]}))
            .await;
        rig.put("r-2", json!({"events": []})).await;
        rig.appservice.request_room_keys().await;
        assert!(key_requests(&hs).is_empty(), "asked before the wait");
        assert_eq!(rig.held(), 1);
        alice
    };
    // Restarted with the wait over: asked once.
    {
        let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, true).await;
        rig.put("r-3", json!({"events": []})).await;
        let sent = key_requests(&hs);
        assert_eq!(sent.len(), 1);
        assert_request(&sent[0].1, &alice);
    }
    // Restarted again: the request is on record, not sent again.
    let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, true).await;
    rig.put("r-4", json!({"events": []})).await;
    rig.appservice.request_room_keys().await;
    assert_eq!(key_requests(&hs).len(), 1, "asked again after a restart");
    assert_eq!(
        rig.metric("bridgekeys_appservice_room_key_requests_total")
            .await,
        0.0,
        "counted again after the restart"
    );
    assert_eq!(rig.held(), 1);
}

/// With several processes on one store, another process may hand a held
/// event over (its key came there) and forget it while this one notes its
/// key request in the event's record. The note must not bring the event
/// back, or it would later be handed over a second time, as undecryptable.
/// The other process's forget is forced between this one's read of the
/// held records and its write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_request_noted_after_another_process_handed_the_event_over_does_not_bring_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, url) = homeserver().await;
    {
        let rig = Rig::open(dir.path(), Some(Duration::from_secs(3600)), &url, true).await;
        let mut alice = Alice::new(&rig).await;
        rig.put("o-1", json!({"events": [alice.event("$early", "x")]}))
            .await;
        assert_eq!(rig.held(), 1);
    }
    let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, true).await;
    let inner = Arc::clone(rig.store.inner());
    let forgotten = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::clone(&forgotten);
    rig.store.intercept(move |write| {
        if let Write::HeldEvent(room, session, event) = write
            && !done.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // The other process hands the event over and forgets it.
            let _applied = inner.hold_event(room, session, event, None)?;
        }
        Ok(())
    });
    rig.put("o-2", json!({"events": []})).await;
    assert!(
        forgotten.load(std::sync::atomic::Ordering::SeqCst),
        "the request was never noted"
    );
    assert_eq!(key_requests(&hs).len(), 1, "the key was asked for");
    assert_eq!(
        rig.held(),
        0,
        "noting the key request brought back an event handed over elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_key_arrives_the_held_event_is_decrypted_and_the_request_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, url) = homeserver().await;
    let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, true).await;
    let mut alice = Alice::new(&rig).await;
    let key = alice.room_key();
    rig.put("c-1", json!({"events": [alice.event("$late", "at last")]}))
        .await;
    let sent = key_requests(&hs);
    assert_eq!(sent.len(), 1);
    let request_id = assert_request(&sent[0].1, &alice);

    rig.put("c-2", json!({"events": [], "to_device": [key]}))
        .await;
    assert_eq!(
        rig.bridge.seen.lock().unwrap()[1],
        vec![(
            "$late".to_owned(),
            Ok(json!({"body": "at last"}).to_string())
        )]
    );
    assert_eq!(rig.held(), 0);
    let sent = key_requests(&hs);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        sent[1].1,
        json!({
            "action": "request_cancellation",
            "request_id": request_id,
            "requesting_device_id": "PUPPETDEV",
        })
    );
    assert_ne!(sent[0].0, sent[1].0);
    assert_eq!(
        rig.metric("bridgekeys_appservice_room_key_request_cancellations_total")
            .await,
        1.0
    );

    rig.put("c-3", json!({"events": []})).await;
    assert_eq!(key_requests(&hs).len(), 2, "sent more after the key came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_homeserver_refused_is_not_recorded_and_is_sent_at_the_next_check() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, url) = homeserver().await;
    hs.lock().unwrap().fail = 1;
    let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, true).await;
    let mut alice = Alice::new(&rig).await;
    rig.put("f-1", json!({"events": [alice.event("$e", "x")]}))
        .await;
    assert_eq!(hs.lock().unwrap().refused, 1);
    assert!(key_requests(&hs).is_empty());
    assert_eq!(
        rig.metric("bridgekeys_appservice_room_key_requests_failed_total")
            .await,
        1.0
    );
    rig.put("f-2", json!({"events": []})).await;
    let sent = key_requests(&hs);
    assert_eq!(sent.len(), 1);
    assert_request(&sent[0].1, &alice);
    rig.put("f-3", json!({"events": []})).await;
    assert_eq!(key_requests(&hs).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_puppet_named_or_with_no_wait_nothing_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, url) = homeserver().await;
    {
        let rig = Rig::open(dir.path(), Some(Duration::ZERO), &url, false).await;
        let mut alice = Alice::new(&rig).await;
        rig.put("n-1", json!({"events": [alice.event("$e", "x")]}))
            .await;
        assert_eq!(rig.bridge.asked.lock().unwrap().len(), 1);
        assert_eq!(rig.held(), 1);
    }
    let rig = Rig::open(dir.path(), None, &url, true).await;
    rig.put("n-2", json!({"events": []})).await;
    rig.appservice.request_room_keys().await;
    assert!(rig.bridge.asked.lock().unwrap().is_empty());
    assert!(hs.lock().unwrap().sent.is_empty());
}
