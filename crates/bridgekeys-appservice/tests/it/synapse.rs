//! Against a real Synapse (started by bridgekeys-testkit): the homeserver
//! proxies key claims to this listener, falls back to our uploaded fallback
//! key when the bridge is down, reports its use so we rotate, and delivers
//! pre-key to-device messages that the listener decrypts.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bridgekeys_appservice::{
    Appservice, AppserviceConfig, AsToken, BridgeHandler, HandlerError, HomeserverClient,
    ProvisionConfig, Provisioner, Registration, RotationTask, ToDevice, Transaction,
};
use bridgekeys_olm::{AccountManager, ManagerConfig, vodozemac};
use bridgekeys_store::{DeviceKey, SledStore, SledStoreConfig, Store, StoreKey};
use bridgekeys_testkit::{
    Method, OlmPeer, PeerDevice, PeerLogin, StatusCode, Synapse, SynapseOptions, TestUser,
};
use ruma::{
    CanonicalJsonObject, OwnedDeviceId, OwnedUserId, ServerName, UserId, serde::Base64,
    signatures::verify_json,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// What the bridge's handler saw: decrypted pre-key messages, and how many
/// room events arrived.
struct Recorder(mpsc::UnboundedSender<(String, Vec<u8>)>, AtomicUsize);

impl BridgeHandler for Recorder {
    async fn transaction(&self, txn: &Transaction) -> Result<(), HandlerError> {
        self.1.fetch_add(txn.events.len(), Ordering::SeqCst);
        for message in &txn.to_device {
            if let ToDevice::Decrypted(d) = message {
                let _ = self
                    .0
                    .send((d.sender.to_string(), d.olm.plaintext.to_vec()));
            }
        }
        Ok(())
    }
}

/// A bridge (listener + provisioner + rotation) and a Synapse that knows it.
struct World {
    _data: tempfile::TempDir,
    store_key: StoreKey,
    store: Arc<SledStore>,
    manager: Arc<AccountManager>,
    registration: Registration,
    addr: SocketAddr,
    provisioner: Arc<Provisioner>,
    recorder: Arc<Recorder>,
    seen: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    running: Option<(
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
        RotationTask,
    )>,
    synapse: Synapse,
    bob: OwnedUserId,
    device: OwnedDeviceId,
    alice: TestUser,
}

impl World {
    /// A client's Olm account (sending as Alice) opens a session on the
    /// puppet's key `key` (base64): the `m.dummy` payload of its first,
    /// pre-key message, and the `sendToDevice` body that carries it.
    fn prekey_message_to_puppet(&self, key: &str) -> (Value, Value) {
        let identity = self.manager.identity_keys(&self.bob, &self.device).unwrap();
        let peer = vodozemac::olm::Account::new();
        let key = vodozemac::Curve25519PublicKey::from_base64(key).unwrap();
        let mut session = peer
            .create_outbound_session(
                vodozemac::olm::SessionConfig::version_1(),
                identity.curve25519,
                key,
            )
            .unwrap();
        let payload = json!({
            "type": "m.dummy",
            "content": {},
            "sender": self.alice.user_id,
            "recipient": self.bob,
            "recipient_keys": { "ed25519": identity.ed25519.to_base64() },
            "keys": { "ed25519": peer.ed25519_key().to_base64() }
        });
        let vodozemac::olm::OlmMessage::PreKey(message) =
            session.encrypt(payload.to_string()).unwrap()
        else {
            panic!("a new session starts with a pre-key message");
        };
        let content = json!({
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": peer.curve25519_key().to_base64(),
            "ciphertext": { identity.curve25519.to_base64(): { "type": 0, "body": message.to_base64() } }
        });
        let body = json!({ "messages": { self.bob.as_str(): { self.device.as_str(): content } } });
        (payload, body)
    }

    /// Alice's second device: a real client we did not write (matrix-nio on
    /// libolm), doing its own Olm, logged in.
    async fn alice_peer(&self) -> (OlmPeer, PeerDevice) {
        let mut peer = OlmPeer::start()
            .await
            .unwrap_or_else(|e| panic!("could not start the Olm peer: {e}"));
        let me = peer
            .login(&PeerLogin::new(
                self.synapse.url(),
                self.alice.user_id.clone(),
                "correct horse battery",
            ))
            .await
            .unwrap();
        (peer, me)
    }

    async fn new() -> Self {
        let data = tempfile::tempdir().unwrap();
        let store_key = StoreKey::generate();
        let store = Arc::new(
            SledStore::open_or_create(SledStoreConfig::new(
                data.path().join("store"),
                store_key.clone(),
            ))
            .unwrap(),
        );
        let manager = Arc::new(AccountManager::new(store.clone(), ManagerConfig::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registration = Registration::generate(
            "bridgekeys-e2e",
            format!("http://{addr}"),
            "echo_bot",
            "@echo_.*:localhost",
        );
        let registration_path = data.path().join("registration.yaml");
        registration.write_new(&registration_path).unwrap();
        let synapse = Synapse::start(SynapseOptions {
            appservice_registrations: vec![registration_path],
            ..SynapseOptions::default()
        })
        .await
        .unwrap_or_else(|e| panic!("could not provide Synapse: {e}"));
        let client =
            HomeserverClient::new(&synapse.url(), AsToken::new(registration.as_token.clone()))
                .unwrap();
        let provisioner = Arc::new(Provisioner::new(
            client,
            manager.clone(),
            store.clone(),
            ProvisionConfig::from_registration(&registration),
        ));
        let (tx, seen) = mpsc::unbounded_channel();
        let bob = UserId::parse("@echo_bob:localhost").unwrap();
        let device = provisioner.ensure_puppet(&bob).await.unwrap();
        let alice = synapse
            .register_user("alice", "correct horse battery")
            .await
            .unwrap();
        let mut world = World {
            _data: data,
            store_key,
            store,
            manager,
            registration,
            addr,
            provisioner,
            recorder: Arc::new(Recorder(tx, AtomicUsize::new(0))),
            seen,
            running: None,
            synapse,
            bob,
            device,
            alice,
        };
        world.start_bridge(listener);
        world
    }

    fn start_bridge(&mut self, listener: tokio::net::TcpListener) {
        let server_name = <&ServerName>::try_from("localhost").unwrap();
        let config = AppserviceConfig::from_registration(&self.registration, server_name).unwrap();
        let appservice = Appservice::new(
            config,
            self.manager.clone(),
            self.store.clone(),
            self.recorder.clone(),
        )
        .unwrap()
        .with_provisioner(self.provisioner.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            appservice
                .serve_on(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        self.running = Some((stop, server, self.provisioner.start_rotation()));
    }

    async fn stop_bridge(&mut self) {
        let (stop, server, rotation) = self.running.take().unwrap();
        let _ = stop.send(());
        server.await.unwrap();
        rotation.stop().await;
    }

    async fn restart_bridge(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.start_bridge(listener);
    }

    /// A whole bridge restart: the listener stops, every handle on the
    /// store is dropped (so the store is closed), and a new store, account
    /// manager and provisioner are opened from disk before the listener
    /// starts again. Only what was durable survives.
    async fn reopen_bridge(&mut self) {
        self.stop_bridge().await;
        let path = self._data.path().join("store");
        let open = |path: &std::path::Path| {
            let store = Arc::new(
                SledStore::open_or_create(SledStoreConfig::new(path, self.store_key.clone()))
                    .unwrap(),
            );
            let manager = Arc::new(AccountManager::new(store.clone(), ManagerConfig::default()));
            let client = HomeserverClient::new(
                &self.synapse.url(),
                AsToken::new(self.registration.as_token.clone()),
            )
            .unwrap();
            let provisioner = Arc::new(Provisioner::new(
                client,
                manager.clone(),
                store.clone(),
                ProvisionConfig::from_registration(&self.registration),
            ));
            (store, manager, provisioner)
        };
        // Swap in a throw-away bridge so the real store's handles drop.
        let scratch = tempfile::tempdir().unwrap();
        let (store, manager, provisioner) = open(&scratch.path().join("store"));
        self.provisioner = provisioner;
        self.manager = manager;
        self.store = store;
        let (store, manager, provisioner) = open(&path);
        self.provisioner = provisioner;
        self.manager = manager;
        self.store = store;
        self.restart_bridge().await;
        // As a bridge does at start: Synapse then delivers at once.
        HomeserverClient::new(
            &self.synapse.url(),
            AsToken::new(self.registration.as_token.clone()),
        )
        .unwrap()
        .ping_appservice(&self.registration.id)
        .await
        .expect("Synapse pinged the restarted listener");
    }

    async fn alice(&self, method: Method, path: &str, body: &Value) -> Value {
        let (status, answer) = self
            .synapse
            .request(method, path, Some(&self.alice.access_token), Some(body))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        answer
    }

    /// One key claimed for bob's device through the stable client endpoint.
    async fn claim_one(&self) -> (String, Value) {
        let body = json!({ "one_time_keys": { self.bob.as_str(): { self.device.as_str(): "signed_curve25519" } } });
        let claim = self
            .alice(Method::POST, "/_matrix/client/v3/keys/claim", &body)
            .await;
        let keys = claim["one_time_keys"][self.bob.as_str()][self.device.as_str()]
            .as_object()
            .unwrap();
        assert_eq!(keys.len(), 1, "{claim}");
        let (id, key) = keys.iter().next().unwrap();
        (id.clone(), key.clone())
    }

    fn device_key(&self) -> DeviceKey {
        DeviceKey::new(self.bob.as_str(), self.device.as_str())
    }

    fn is_our_one_time_key(&self, key: &Value) -> bool {
        let public =
            Base64::<ruma::serde::base64::Standard>::parse(key["key"].as_str().unwrap()).unwrap();
        let public: [u8; 32] = public.as_bytes().try_into().unwrap();
        self.store
            .one_time_key(&self.device_key(), &public)
            .unwrap()
            .is_some()
    }

    fn published_fallback(&self) -> String {
        let key = self
            .manager
            .published_fallback_key(&self.bob, &self.device)
            .unwrap()
            .unwrap();
        key.key.key.encode()
    }
}

/// Percent-encode the characters of Matrix ids that matter in a URL.
fn encode(id: &str) -> String {
    id.replace('%', "%25")
        .replace('!', "%21")
        .replace('@', "%40")
        .replace(':', "%3A")
        .replace('#', "%23")
}

/// Poll `check` until it holds or `limit` passes (then fail with `what`).
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_proxies_key_claims_to_the_listener_and_hands_out_our_signed_keys() {
    let mut w = World::new().await;
    let (bob, device) = (w.bob.clone(), w.device.clone());

    // keys/query through Synapse shows our device keys.
    let query = w
        .alice(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            &json!({ "device_keys": { bob.as_str(): [] } }),
        )
        .await;
    let published = &query["device_keys"][bob.as_str()][device.as_str()];
    let ours = serde_json::to_value(w.manager.device_keys(&bob, &device).unwrap()).unwrap();
    assert_eq!(
        published["keys"], ours["keys"],
        "Synapse serves other device keys: {published}"
    );
    let ed25519 = published["keys"][format!("ed25519:{device}")]
        .as_str()
        .unwrap();
    let key_map = BTreeMap::from([(
        bob.to_string(),
        BTreeMap::from([(format!("ed25519:{device}"), Base64::parse(ed25519).unwrap())]),
    )]);
    // The puppet is cross-signed (MSC4153 clients trust only that): Synapse
    // shows its master and self-signing keys, the self-signing key carries
    // the master's signature, and the device carries the self-signing key's.
    let master = &query["master_keys"][bob.as_str()];
    let ssk = &query["self_signing_keys"][bob.as_str()];
    let only_key = |key: &Value| -> String {
        let keys = key["keys"]
            .as_object()
            .unwrap_or_else(|| panic!("no keys in {key}"));
        assert_eq!(keys.len(), 1, "{key}");
        keys.values().next().unwrap().as_str().unwrap().to_owned()
    };
    let (master_public, ssk_public) = (only_key(master), only_key(ssk));
    let by = |public: &str| {
        BTreeMap::from([(
            bob.to_string(),
            BTreeMap::from([(format!("ed25519:{public}"), Base64::parse(public).unwrap())]),
        )])
    };
    let canonical =
        |v: &Value| -> CanonicalJsonObject { serde_json::from_value(v.clone()).unwrap() };
    verify_json(&by(&master_public), &canonical(ssk))
        .expect("the master signed the self-signing key");
    assert!(
        published["signatures"][bob.as_str()][format!("ed25519:{ssk_public}")].is_string(),
        "the device is not signed by the self-signing key: {published}"
    );
    let mut by_ssk = published.clone();
    // Check that signature alone (the device's own is checked below).
    by_ssk["signatures"][bob.as_str()]
        .as_object_mut()
        .unwrap()
        .retain(|id, _| id == &format!("ed25519:{ssk_public}"));
    verify_json(&by(&ssk_public), &canonical(&by_ssk))
        .expect("the self-signing key signed the device");

    let check_ours = |id: &str, key: &Value| {
        let object: CanonicalJsonObject = serde_json::from_value(key.clone()).unwrap();
        verify_json(&key_map, &object).unwrap_or_else(|e| panic!("{id}: bad signature: {e}"));
        assert!(
            w.is_our_one_time_key(key),
            "{id} was not generated by our listener"
        );
    };

    // Ten claims on the stable client endpoint: ten different keys, all ours.
    let mut ids = HashSet::new();
    for _ in 0..10 {
        let (id, key) = w.claim_one().await;
        assert!(
            key.get("fallback").is_none(),
            "a fallback key while the bridge is up: {key}"
        );
        check_ours(&id, &key);
        assert!(ids.insert(id.clone()), "key id {id} handed out twice");
    }

    // The unstable client endpoint Synapse offers for MSC3983: two keys in
    // one claim, both ours (plus the homeserver's fallback key, marked).
    let body = json!({
        "one_time_keys": { bob.as_str(): { device.as_str(): ["signed_curve25519", "signed_curve25519"] } }
    });
    let claim = w
        .alice(
            Method::POST,
            "/_matrix/client/unstable/org.matrix.msc3983/keys/claim",
            &body,
        )
        .await;
    let keys = claim["one_time_keys"][bob.as_str()][device.as_str()]
        .as_object()
        .unwrap();
    let fresh: Vec<_> = keys
        .iter()
        .filter(|(_, k)| k.get("fallback").is_none())
        .collect();
    assert_eq!(fresh.len(), 2, "{claim}");
    for (id, key) in fresh {
        check_ours(id, key);
        assert!(ids.insert(id.clone()), "key id {id} handed out twice");
    }
    assert_eq!(w.manager.stats().keys_issued, 12);
    w.stop_bridge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bridge_down_synapse_serves_our_fallback_key_and_its_reported_use_rotates_it() {
    let mut w = World::new().await;
    let first = w.published_fallback();

    // Bob shares a room with alice, so room traffic makes him "interesting"
    // to Synapse's MSC3202 reporting. (Synapse drops to-device messages
    // while it considers the appservice down, but queues room events.)
    let room = w
        .alice(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &json!({ "invite": [w.bob] }),
        )
        .await;
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    let join = format!(
        "/_matrix/client/v3/rooms/{}/join?user_id={}",
        encode(&room_id),
        encode(w.bob.as_str())
    );
    let (status, joined) = w
        .synapse
        .request(
            Method::POST,
            &join,
            Some(&w.registration.as_token),
            Some(&json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{joined}");

    // Bridge down: Synapse cannot ask us, so it hands out the uploaded fallback key.
    w.stop_bridge().await;
    let (_, key) = w.claim_one().await;
    assert_eq!(key["fallback"], true, "{key}");
    assert_eq!(key["key"], first.as_str());

    // Bridge back. Synapse replays what it queued while we were down, but
    // its catch-up transactions carry no MSC3202 fields (a Synapse
    // limitation); the next live transaction reports that bob's fallback
    // key was used, and the bridge rotates and uploads.
    w.restart_bridge().await;
    let seen_before = w.recorder.1.load(Ordering::SeqCst);
    let send = |n: u32| {
        format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/t{n}",
            encode(&room_id)
        )
    };
    w.alice(
        Method::PUT,
        &send(1),
        &json!({ "msgtype": "m.text", "body": "hello bob" }),
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "Synapse to deliver to the restarted bridge",
        async || w.recorder.1.load(Ordering::SeqCst) > seen_before,
    )
    .await;
    w.alice(
        Method::PUT,
        &send(2),
        &json!({ "msgtype": "m.text", "body": "still there?" }),
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "the fallback key to rotate",
        async || {
            w.manager
                .published_fallback_key(&w.bob, &w.device)
                .unwrap()
                .is_some_and(|k| k.key.key.encode() != first)
        },
    )
    .await;
    let second = w.published_fallback();

    // Down again: the homeserver now serves the NEW fallback key.
    w.stop_bridge().await;
    let (_, key) = w.claim_one().await;
    assert_eq!(key["fallback"], true, "{key}");
    assert_eq!(
        key["key"],
        second.as_str(),
        "Synapse still serves the old fallback key"
    );
    assert!(w.provisioner.stats().uploads >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prekey_message_sent_through_synapse_is_decrypted_by_the_bridge_and_consumes_its_key() {
    let mut w = World::new().await;
    let (id, key) = w.claim_one().await;
    assert!(w.is_our_one_time_key(&key), "{id}");

    // A client's Olm account opens a session with the claimed key.
    let (payload, body) = w.prekey_message_to_puppet(key["key"].as_str().unwrap());
    w.alice(
        Method::PUT,
        "/_matrix/client/v3/sendToDevice/m.room.encrypted/olm1",
        &body,
    )
    .await;

    let (sender, plaintext) = tokio::time::timeout(Duration::from_secs(60), w.seen.recv())
        .await
        .expect("the bridge never received the pre-key message")
        .unwrap();
    assert_eq!(sender, w.alice.user_id);
    let decrypted: Value = serde_json::from_slice(&plaintext).unwrap();
    assert_eq!(decrypted, payload);
    assert!(
        !w.is_our_one_time_key(&key),
        "the used one-time key is still stored"
    );
    assert_eq!(w.manager.stats().prekeys_decrypted, 1);
    w.stop_bridge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puppet_and_a_real_client_exchange_olm_messages_both_ways_through_synapse_across_a_restart()
 {
    use bridgekeys_appservice::{Devices, PuppetOlm};
    const WAIT: Duration = Duration::from_secs(30);

    let mut w = World::new().await;
    // Alice's second device is a real client we did not write (matrix-nio
    // on libolm), doing its own Olm.
    let (mut peer, me) = w.alice_peer().await;
    let alice = UserId::parse(&me.user_id).unwrap();
    let alice_device = OwnedDeviceId::from(me.device_id.as_str());
    let puppet_olm = |w: &World| {
        PuppetOlm::new(
            w.manager.clone(),
            HomeserverClient::new(
                &w.synapse.url(),
                AsToken::new(w.registration.as_token.clone()),
            )
            .unwrap(),
        )
    };
    let to_alice = BTreeMap::from([(alice.clone(), Devices::Only(vec![alice_device.clone()]))]);
    let next_from_peer = async |w: &mut World| {
        let (sender, plaintext) = tokio::time::timeout(WAIT, w.seen.recv())
            .await
            .expect("the bridge never received the peer's message")
            .unwrap();
        assert_eq!(sender, alice.as_str());
        serde_json::from_slice::<Value>(&plaintext).unwrap()
    };

    // 1. The client claims a key of the puppet (proxied to our listener),
    //    starts a session and sends a pre-key message.
    let sent = peer
        .send_olm(
            w.bob.as_str(),
            w.device.as_str(),
            "org.bridgekeys.test.ping",
            &json!({"n": 1}),
        )
        .await
        .unwrap();
    assert_eq!(sent.message_type, 0);
    let got = next_from_peer(&mut w).await;
    assert_eq!(got["type"], "org.bridgekeys.test.ping");
    assert_eq!(got["content"], json!({"n": 1}));
    assert_eq!(got["sender_device"], json!(me.device_id));

    // 2. The puppet answers on that session, through the homeserver as the
    //    puppet device; nio decrypts it and checks the payload itself.
    let olm = puppet_olm(&w);
    let report = olm
        .encrypt_to_device(
            (&w.bob, &w.device),
            &to_alice,
            "org.bridgekeys.test.pong",
            &json!({"n": 1}),
        )
        .await
        .unwrap();
    assert_eq!(
        report.sent,
        vec![(alice.clone(), alice_device.clone())],
        "{report:?}"
    );
    assert_eq!((report.sessions_reused, report.sessions_created), (1, 0));
    let pong = peer
        .wait_to_device("org.bridgekeys.test.pong", WAIT)
        .await
        .unwrap()
        .expect("the client never received the puppet's answer");
    assert!(pong.verified_payload);
    assert_eq!(pong.keys_match, Some(true), "{pong:?}");
    assert_eq!(pong.sender, w.bob.as_str());
    assert_eq!(pong.content, json!({"n": 1}));
    assert_eq!(pong.message_type, 1);
    drop(olm);

    // 3. Several rounds of normal messages both ways, with a whole bridge
    //    restart in the middle: the sessions come back from the store.
    for round in 2..=4 {
        if round == 3 {
            w.reopen_bridge().await;
        }
        let sent = peer
            .send_olm(
                w.bob.as_str(),
                w.device.as_str(),
                "org.bridgekeys.test.ping",
                &json!({"n": round}),
            )
            .await
            .unwrap();
        assert_eq!(sent.message_type, 1, "round {round}");
        let got = next_from_peer(&mut w).await;
        assert_eq!(got["content"], json!({"n": round}));
        let olm = puppet_olm(&w);
        let report = olm
            .encrypt_to_device(
                (&w.bob, &w.device),
                &to_alice,
                "org.bridgekeys.test.pong",
                &json!({"n": round}),
            )
            .await
            .unwrap();
        assert_eq!(report.sessions_reused, 1, "round {round}: {report:?}");
        let pong = peer
            .wait_to_device("org.bridgekeys.test.pong", WAIT)
            .await
            .unwrap()
            .expect("the client never received the puppet's answer");
        assert_eq!(pong.content, json!({"n": round}));
        assert_eq!(pong.message_type, 1);
        assert_eq!(pong.keys_match, Some(true));
    }
    assert!(w.manager.stats().olm_decrypted >= 1);
    peer.quit().await.unwrap();
    w.stop_bridge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puppet_starts_a_session_with_a_real_client_by_claiming_its_key_through_synapse() {
    use bridgekeys_appservice::{Devices, PuppetOlm};
    const WAIT: Duration = Duration::from_secs(30);

    let mut w = World::new().await;
    let (mut peer, me) = w.alice_peer().await;
    let alice = UserId::parse(&me.user_id).unwrap();
    let olm = PuppetOlm::new(
        w.manager.clone(),
        HomeserverClient::new(
            &w.synapse.url(),
            AsToken::new(w.registration.as_token.clone()),
        )
        .unwrap(),
    );
    // Every device of Alice's: the one the test user registered has no
    // keys (not an encrypting device) and is not listed as verified; the
    // client's device is.
    let devices = olm
        .devices((&w.bob, &w.device), std::slice::from_ref(&alice))
        .await
        .unwrap();
    let tracked = &devices[&alice];
    assert!(
        tracked
            .devices
            .contains_key(<&ruma::DeviceId>::from(me.device_id.as_str()))
    );
    let to_alice = BTreeMap::from([(alice.clone(), Devices::All)]);
    let report = olm
        .encrypt_to_device(
            (&w.bob, &w.device),
            &to_alice,
            "org.bridgekeys.test.hello",
            &json!({"from": "puppet"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (report.sessions_reused, report.sessions_created),
        (0, 1),
        "{report:?}"
    );
    assert!(report.failed.is_empty(), "{report:?}");
    let hello = peer
        .wait_to_device("org.bridgekeys.test.hello", WAIT)
        .await
        .unwrap()
        .expect("the client never received the puppet's pre-key message");
    assert_eq!(hello.message_type, 0);
    assert!(hello.verified_payload);
    assert_eq!(hello.keys_match, Some(true));
    assert_eq!(hello.content, json!({"from": "puppet"}));
    // One query served both calls: the user was tracked after the first.
    assert_eq!(olm.queries(), 1);

    // The client answers on the session the puppet started: the bridge
    // decrypts its normal message.
    let sent = peer
        .send_olm(
            w.bob.as_str(),
            w.device.as_str(),
            "org.bridgekeys.test.ping",
            &json!({"n": 9}),
        )
        .await
        .unwrap();
    assert_eq!(sent.message_type, 1);
    let (sender, plaintext) = tokio::time::timeout(WAIT, w.seen.recv())
        .await
        .expect("the bridge never received the answer")
        .unwrap();
    assert_eq!(sender, alice.as_str());
    let got: Value = serde_json::from_slice(&plaintext).unwrap();
    assert_eq!(got["content"], json!({"n": 9}));
    peer.quit().await.unwrap();
    w.stop_bridge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prekey_message_on_the_fallback_key_rotates_it_at_once_and_synapse_serves_the_new_one() {
    let mut w = World::new().await;
    let first = w.published_fallback();

    // Bridge down: a client gets the fallback key from Synapse.
    w.stop_bridge().await;
    let (_, key) = w.claim_one().await;
    assert_eq!(key["fallback"], true, "{key}");
    assert_eq!(key["key"], first.as_str());

    // Bridge up: the client's pre-key message on that key arrives. Bob
    // shares no room with Alice, so no MSC3202 "fallback used" report comes:
    // only the bridge's own finding can trigger the rotation, and the
    // periodic pass is minutes away.
    w.restart_bridge().await;
    // Synapse marked the appservice down while it was away and drops
    // to-device messages until it is up again: a ping (what a bridge does
    // at start) makes it retry now and mark it up.
    let client = HomeserverClient::new(
        &w.synapse.url(),
        AsToken::new(w.registration.as_token.clone()),
    )
    .unwrap();
    client
        .ping_appservice(&w.registration.id)
        .await
        .expect("Synapse pinged the listener");
    let (_, body) = w.prekey_message_to_puppet(&first);
    // Synapse drops to-device messages for an appservice it still counts
    // as down, and when it notices it is up again depends on its retry
    // timer: send again (a new transaction id) until one copy arrives.
    // Later copies are replays of the same message and decrypt to nothing.
    let mut delivered = false;
    for attempt in 0..12 {
        w.alice(
            Method::PUT,
            &format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/fb{attempt}"),
            &body,
        )
        .await;
        if tokio::time::timeout(Duration::from_secs(5), w.seen.recv())
            .await
            .is_ok()
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "the bridge never received the pre-key message");
    eventually(
        Duration::from_secs(10),
        "the used fallback key to be replaced",
        async || {
            w.manager
                .published_fallback_key(&w.bob, &w.device)
                .unwrap()
                .is_some_and(|k| k.key.key.encode() != first)
        },
    )
    .await;
    let second = w.published_fallback();
    assert_eq!(
        w.provisioner.stats().urgent_rotations,
        1,
        "the pre-key message's finding started the rotation"
    );

    // Down again: Synapse hands out the new fallback key.
    w.stop_bridge().await;
    let (_, key) = w.claim_one().await;
    assert_eq!(key["fallback"], true, "{key}");
    assert_eq!(
        key["key"],
        second.as_str(),
        "Synapse still serves the used key"
    );
}
