//! Homeservers that do not proxy key claims (MSC3983 off): the bridge
//! finds that out, keeps a small uploaded pool for contacted puppets,
//! refills it as clients claim, and a real client's encrypted DM starts on
//! a pool key. With claims proxied, it uploads none.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use bridgekeys::{
    appservice::{
        AsToken, ClaimMode, DEFAULT_PUPPET_DEVICE_ID, HomeserverClient, KeyPool, PoolConfig,
        Registration,
    },
    olm::vodozemac::Ed25519Signature,
    store::DeviceKey,
};
use bridgekeys_testkit::{Method, NewRoom, OlmPeer, PeerLogin, RoomMessageQuery, TestUser};
use echo_bridge::{
    PoolMode, PoolSettings,
    demo::{Local, LocalOptions, poll},
};
use ruma::UserId;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(45);
const BOB: &str = "@echo_bob:localhost";
const PASSWORD: &str = "correct horse battery";

fn settings(pool_size: usize, refill_below: usize) -> PoolSettings {
    PoolSettings {
        mode: PoolMode::Detect,
        pool_size,
        refill_below,
        probe_interval_secs: 600,
        // Contacted devices' counts are read every second: claims by a
        // client bring no transaction for the puppet, so this is what
        // notices them here.
        check_interval_secs: 1,
    }
}

async fn ready_body(local: &Local) -> Value {
    serde_json::from_slice(&get(local, "/_bridgekeys/ready").await).unwrap()
}

/// GET `path` from the bridge's listener (no token: operations endpoints).
async fn get(local: &Local, path: &str) -> bytes::Bytes {
    let url = format!("http://{}{path}", local.config.listen);
    let stream = tokio::net::TcpStream::connect(local.config.listen)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(url)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes()
}

async fn wait_mode(local: &Local, wanted: ClaimMode) {
    poll(TIMEOUT, || async {
        let mode = local.key_pool().unwrap().mode();
        Ok((mode == wanted).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("the claim mode never became {wanted}: {e:#}"));
    assert_eq!(ready_body(local).await["claim_mode"], wanted.as_str());
}

/// Claim one key of Bob's puppet device as `user`: (key id, key object).
async fn claim_one(local: &Local, user: &TestUser) -> Option<(String, Value)> {
    let answer = local
        .call(
            user,
            Method::POST,
            "/_matrix/client/v3/keys/claim",
            Some(&json!({ "one_time_keys": { BOB: { DEFAULT_PUPPET_DEVICE_ID: "signed_curve25519" } } })),
        )
        .await
        .unwrap();
    let keys = answer["one_time_keys"][BOB][DEFAULT_PUPPET_DEVICE_ID].as_object()?;
    keys.iter()
        .next()
        .map(|(id, key)| (id.clone(), key.clone()))
}

fn assert_signed_by_bob(local: &Local, key_id: &str, key: &Value) {
    assert!(key_id.starts_with("signed_curve25519:"), "{key_id}");
    assert!(
        key.get("fallback").is_none(),
        "a fallback key was served: the pool ran dry ({key_id})"
    );
    let bob = UserId::parse(BOB).unwrap();
    let identity = local
        .manager()
        .unwrap()
        .identity_keys(&bob, DEFAULT_PUPPET_DEVICE_ID.into())
        .unwrap();
    let signature = key["signatures"][BOB][format!("ed25519:{DEFAULT_PUPPET_DEVICE_ID}")]
        .as_str()
        .unwrap();
    let signed = bridgekeys::olm::canonical_json_for_signing(key).unwrap();
    identity
        .ed25519
        .verify(
            signed.as_bytes(),
            &Ed25519Signature::from_base64(signature).unwrap(),
        )
        .expect("a pool key signed by the puppet device");
}

fn outstanding_keys(local: &Local) -> usize {
    local
        .store()
        .unwrap()
        .count_one_time_keys(&DeviceKey::new(BOB, DEFAULT_PUPPET_DEVICE_ID))
        .unwrap()
}

/// Synapse (claims proxied or not) and the bridge, once the bridge found
/// the mode `expected`; Alice registered.
async fn start(
    dir: &std::path::Path,
    proxy_key_claims: bool,
    expected: ClaimMode,
) -> (Local, TestUser) {
    let local = Local::start_with(
        dir,
        LocalOptions {
            proxy_key_claims,
            one_time_keys: settings(10, 5),
            ..LocalOptions::default()
        },
    )
    .await
    .unwrap();
    wait_mode(&local, expected).await;
    let alice = local
        .synapse
        .register_user("alice", PASSWORD)
        .await
        .unwrap();
    (local, alice)
}

async fn client(local: &Local) -> OlmPeer {
    let mut peer = OlmPeer::start().await.unwrap();
    peer.login(&PeerLogin::new(
        local.synapse.url(),
        "@alice:localhost",
        PASSWORD,
    ))
    .await
    .unwrap();
    peer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_proxied_claims_contacted_puppets_keep_an_uploaded_pool_that_refills_and_starts_sessions()
 {
    let dir = tempfile::tempdir().unwrap();
    let (local, alice) = start(dir.path(), false, ClaimMode::Pool).await;
    let mut phone = client(&local).await;

    // 1. Alice invites the puppet to an encrypted DM: the invite contacts
    //    its device, which gets its pool (10 keys, durable before upload).
    let room = phone
        .create_room(&NewRoom::encrypted_dm(BOB))
        .await
        .unwrap();
    assert!(phone.wait_joined(&room, BOB, TIMEOUT).await.unwrap());
    let pool = local.key_pool().unwrap().clone();
    poll(TIMEOUT, || async {
        Ok((pool.stats().keys_uploaded >= 10).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(outstanding_keys(&local), 10);

    // 2. Her client (matrix-nio) claims a pool key and sends the room key
    //    in a pre-key message on it; the echo decrypts, so the puppet
    //    decrypted the pre-key message, and the key's record is gone.
    phone.room_send(&room, "hello").await.unwrap();
    let echo = phone
        .wait_room_message(
            &RoomMessageQuery::in_room(&room)
                .sent_by(BOB)
                .body_prefix("echo: hello"),
            TIMEOUT,
        )
        .await
        .unwrap()
        .expect("the echo");
    assert!(echo.decrypted);
    assert_eq!(
        outstanding_keys(&local),
        9,
        "the pre-key message was not on a pool key"
    );

    // 3. Claims drain the pool; the bridge notices and refills it. Every
    //    key served is a one-time key (never the fallback), signed by the
    //    device, and none is served twice.
    let mut seen_ids = BTreeSet::new();
    let mut seen_keys = BTreeSet::new();
    let uploads_before = pool.stats().uploads;
    for round in 0..3 {
        for _ in 0..6 {
            let (key_id, key) = claim_one(&local, &alice)
                .await
                .unwrap_or_else(|| panic!("no key in round {round}"));
            assert_signed_by_bob(&local, &key_id, &key);
            assert!(seen_ids.insert(key_id.clone()), "{key_id} served twice");
            assert!(
                seen_keys.insert(key["key"].as_str().unwrap().to_owned()),
                "a key was served twice"
            );
        }
        // Six claimed: the homeserver holds fewer than 5, so the next
        // check tops the pool up.
        let wanted = uploads_before + round + 1;
        poll(TIMEOUT, || async {
            Ok((pool.stats().uploads >= wanted).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("the pool was not refilled after round {round}: {e:#}"));
    }
    assert_eq!(seen_ids.len(), 18);
    assert_eq!(pool.stats().failures, 0);

    phone.quit().await.unwrap();
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_proxied_claims_no_one_time_key_is_uploaded_and_keys_come_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let (local, alice) = start(dir.path(), true, ClaimMode::Proxied).await;
    let room = local.create_dm(&alice, BOB).await.unwrap();
    local
        .wait_for_join(&alice, &room, BOB, TIMEOUT)
        .await
        .unwrap();
    // Keys are made per claim, by the listener, and differ every time.
    let (first, _) = claim_one(&local, &alice).await.unwrap();
    let (second, _) = claim_one(&local, &alice).await.unwrap();
    assert_ne!(first, second);
    // The homeserver holds no uploaded one-time key of the puppet.
    let bob = UserId::parse(BOB).unwrap();
    let counts = local
        .key_pool()
        .unwrap()
        .read_counts(&bob, DEFAULT_PUPPET_DEVICE_ID.into())
        .await
        .unwrap();
    assert_eq!(counts, 0, "one-time keys were uploaded while proxied");
    // Key queries are proxied too (MSC3984): Alice's query of Bob's keys
    // is answered by the bridge, from its store.
    let devices = bob_devices(&local, &alice).await;
    assert!(
        devices.contains_key(DEFAULT_PUPPET_DEVICE_ID),
        "{devices:?}"
    );
    let metrics = String::from_utf8(get(&local, "/metrics").await.to_vec()).unwrap();
    let answered = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bridgekeys_appservice_key_queries_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        answered >= 1.0,
        "the homeserver never asked the bridge: {answered}"
    );
    assert_eq!(local.key_pool().unwrap().stats().keys_uploaded, 0);

    // Another bridge process behind the same registration, on the same
    // store, whose listener the homeserver never asks: its detection's
    // probe is proxied to this bridge's listener, and the marker that one
    // answers with comes back through Synapse untouched, so it too finds
    // the claims proxied.
    let registration = Registration::load(&local.config.registration).unwrap();
    let seen_here = local.key_pool().unwrap().stats().probes_seen;
    let other = KeyPool::new(
        Arc::clone(local.manager().unwrap()),
        HomeserverClient::new(&local.synapse.url(), AsToken::new(registration.as_token)).unwrap(),
        registration.id,
        UserId::parse(format!("@{}:localhost", registration.sender_localpart)).unwrap(),
        PoolConfig::default(),
    );
    assert_eq!(other.detect().await, ClaimMode::Proxied);
    assert_eq!(
        other.stats().probes_seen,
        0,
        "the other process saw no probe"
    );
    assert_eq!(
        local.key_pool().unwrap().stats().probes_seen,
        seen_here + 1,
        "this bridge's listener answered it"
    );
    local.stop().await.unwrap();
}

/// Bob's devices as `user` sees them through `keys/query`: device id ->
/// ed25519 key.
async fn bob_devices(local: &Local, user: &TestUser) -> serde_json::Map<String, Value> {
    let answer = local
        .call(
            user,
            Method::POST,
            "/_matrix/client/v3/keys/query",
            Some(&json!({ "device_keys": { BOB: [] } })),
        )
        .await
        .unwrap();
    answer["device_keys"][BOB]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puppet_device_deleted_by_an_admin_is_provisioned_again_with_the_same_keys() {
    let dir = tempfile::tempdir().unwrap();
    // Key queries show the homeserver's own copy of the device (with
    // MSC3984 the bridge would answer them from its store).
    let local = Local::start_with(
        dir.path(),
        LocalOptions {
            proxy_key_queries: false,
            ..LocalOptions::default()
        },
    )
    .await
    .unwrap();
    let alice = local
        .synapse
        .register_user("alice", PASSWORD)
        .await
        .unwrap();
    let admin = local
        .synapse
        .register_admin("admin", PASSWORD)
        .await
        .unwrap();
    let room = local.create_dm(&alice, BOB).await.unwrap();
    local
        .wait_for_join(&alice, &room, BOB, TIMEOUT)
        .await
        .unwrap();
    let before = bob_devices(&local, &alice).await;
    let ed25519 = format!("ed25519:{DEFAULT_PUPPET_DEVICE_ID}");
    let identity = before[DEFAULT_PUPPET_DEVICE_ID]["keys"][&ed25519].clone();
    assert!(identity.is_string(), "{before:?}");

    // Stale-device pruning, done by hand: the admin API deletes the device.
    let path = format!(
        "/_synapse/admin/v2/users/{}/devices/{DEFAULT_PUPPET_DEVICE_ID}",
        BOB.replace('@', "%40").replace(':', "%3A")
    );
    local
        .call(&admin, Method::DELETE, &path, None)
        .await
        .unwrap();
    assert!(
        bob_devices(&local, &alice).await.is_empty(),
        "the device is still there"
    );

    // The next transaction tells the bridge Bob's device list changed; it
    // finds the device gone and provisions it again, with the same keys.
    local
        .send_text(&alice, &room, "lost-device-1", "are you there?")
        .await
        .unwrap();
    let after = poll(TIMEOUT, || async {
        let devices = bob_devices(&local, &alice).await;
        Ok(devices
            .contains_key(DEFAULT_PUPPET_DEVICE_ID)
            .then_some(devices))
    })
    .await
    .expect("the puppet device was not provisioned again");
    assert_eq!(
        after[DEFAULT_PUPPET_DEVICE_ID]["keys"][&ed25519], identity,
        "the device came back with other keys"
    );
    // Signed by its user's self-signing key again.
    let signatures = after[DEFAULT_PUPPET_DEVICE_ID]["signatures"][BOB]
        .as_object()
        .unwrap();
    assert!(
        signatures.len() >= 2,
        "not cross-signed again: {signatures:?}"
    );

    // Claims work again, signed by the same device key.
    let (key_id, key) = claim_one(&local, &alice)
        .await
        .expect("a key of the device provisioned again");
    assert_signed_by_bob(&local, &key_id, &key);
    assert_eq!(local.key_pool().unwrap().stats().keys_uploaded, 0);
    local.stop().await.unwrap();
}
