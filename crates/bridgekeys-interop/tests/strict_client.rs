//! A strict client (MSC4153: room keys only for devices their owner has
//! cross-signed) talks to an echo-bridge puppet in an encrypted DM.
//!
//! The client is matrix-rust-sdk (`matrix-sdk`, in-memory stores) with
//! identity-based room-key sharing (`CollectStrategy::IdentityBasedStrategy`),
//! its own cross-signing bootstrapped (the strategy refuses to send
//! otherwise). The homeserver is a real Synapse (bridgekeys-testkit); the
//! bridge is echo-bridge, in this process, as `demo::Local` sets it up.
//!
//! 1. The client sees the puppet's device as cross-signed by its owner, with
//!    the master key the bridge holds for the puppet.
//! 2. It shares its room key with the puppet (no `m.room_key.withheld` for
//!    the session on the homeserver), the puppet decrypts "hello" and its
//!    encrypted echo "echo: hello" decrypts on the client.
//! 3. Negative control: the puppet's cross-signing identity is replaced
//!    (as the appservice, which Synapse lets skip interactive auth) by one
//!    that has not signed the device. The same client now withholds its new
//!    room key from the puppet with `m.unverified`, as MSC4153 clients did
//!    before the bridge cross-signed its puppets: the homeserver carries the
//!    withheld notice for the new session, and the bridge holds the event it
//!    cannot decrypt.
#![allow(clippy::unwrap_used)]
// matrix-sdk's sync future is deep enough to overflow the default limit
// when `tokio::spawn` checks that it is `Send`.
#![recursion_limit = "256"]

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bridgekeys::{
    appservice::DEFAULT_PUPPET_DEVICE_ID,
    olm::{canonical_json_for_signing, vodozemac::Ed25519SecretKey},
};
use bridgekeys_testkit::{Method, StatusCode, TestUser};
use echo_bridge::demo::{Local, poll};
use matrix_sdk::{
    Client, Room,
    config::SyncSettings,
    deserialized_responses::EncryptionInfo,
    ruma::{
        OwnedEventId, OwnedRoomId, OwnedUserId, UserId,
        events::room::{
            encrypted::OriginalSyncRoomEncryptedEvent,
            member::MembershipState,
            message::{OriginalSyncRoomMessageEvent, RoomMessageEventContent},
        },
    },
};
use matrix_sdk_base::crypto::CollectStrategy;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);
const PUPPET: &str = "@echo_bob:localhost";
const PASSWORD: &str = "correct horse battery";

/// A room message as the client's sync handed it over.
#[derive(Clone, Debug)]
struct Seen {
    room_id: OwnedRoomId,
    event_id: OwnedEventId,
    sender: OwnedUserId,
    body: String,
    encryption: Option<EncryptionInfo>,
}

/// What the client has seen since it started syncing.
#[derive(Default)]
struct Inbox {
    messages: Vec<Seen>,
    /// Events still `m.room.encrypted` after the client tried: (event id,
    /// sender, session id).
    undecryptable: Vec<(OwnedEventId, OwnedUserId, String)>,
}

type SharedInbox = Arc<Mutex<Inbox>>;

/// A matrix-sdk client with identity-based sharing, logged in as `alice`,
/// its cross-signing bootstrapped, collecting room messages into the inbox.
async fn strict_client(local: &Local) -> (Client, SharedInbox) {
    let client = Client::builder()
        .homeserver_url(local.synapse.url())
        .with_room_key_recipient_strategy(CollectStrategy::IdentityBasedStrategy)
        .build()
        .await
        .unwrap();
    client
        .matrix_auth()
        .login_username("alice", PASSWORD)
        .initial_device_display_name("strict client")
        .await
        .unwrap();
    // Identity-based sharing refuses to send from a device without a
    // (verified) own identity: bootstrap it (no interactive auth for a
    // first upload, MSC3967).
    client
        .encryption()
        .bootstrap_cross_signing(None)
        .await
        .unwrap();
    let status = client.encryption().cross_signing_status().await.unwrap();
    assert!(status.is_complete(), "own cross-signing: {status:?}");

    let inbox = SharedInbox::default();
    let messages = inbox.clone();
    client.add_event_handler(
        move |ev: OriginalSyncRoomMessageEvent, room: Room, info: Option<EncryptionInfo>| {
            let messages = messages.clone();
            async move {
                messages.lock().unwrap().messages.push(Seen {
                    room_id: room.room_id().to_owned(),
                    event_id: ev.event_id.clone(),
                    sender: ev.sender.clone(),
                    body: ev.content.body().to_owned(),
                    encryption: info,
                });
            }
        },
    );
    let undecryptable = inbox.clone();
    client.add_event_handler(move |ev: OriginalSyncRoomEncryptedEvent| {
        let undecryptable = undecryptable.clone();
        async move {
            let session = match &ev.content.scheme {
                matrix_sdk::ruma::events::room::encrypted::EncryptedEventScheme::MegolmV1AesSha2(
                    m,
                ) => m.session_id.clone(),
                _ => String::new(),
            };
            undecryptable.lock().unwrap().undecryptable.push((
                ev.event_id.clone(),
                ev.sender.clone(),
                session,
            ));
        }
    });
    (client, inbox)
}

/// The first message in `room` from `sender` with `body`, once the client's
/// sync delivered it.
async fn wait_message(inbox: &SharedInbox, room: &Room, sender: &str, body: &str) -> Seen {
    let found = poll(TIMEOUT, || async {
        let inbox = inbox.lock().unwrap();
        Ok(inbox
            .messages
            .iter()
            .find(|m| m.room_id == room.room_id() && m.sender == sender && m.body == body)
            .cloned())
    })
    .await;
    found.unwrap_or_else(|e| {
        let inbox = inbox.lock().unwrap();
        panic!(
            "no {body:?} from {sender}: {e:#}\nseen: {:#?}\nundecryptable: {:#?}",
            inbox.messages, inbox.undecryptable
        )
    })
}

/// The client's view of the puppet's device, once it is `cross_signed` (or
/// not) by the puppet's identity as the client knows it.
async fn wait_puppet_device_cross_signed(client: &Client, puppet: &UserId, cross_signed: bool) {
    poll(TIMEOUT, || async {
        let device = client
            .encryption()
            .get_device(puppet, DEFAULT_PUPPET_DEVICE_ID.into())
            .await?;
        Ok(device
            .filter(|d| d.is_cross_signed_by_owner() == cross_signed)
            .map(|_| ()))
    })
    .await
    .unwrap_or_else(|e| {
        panic!("the client never saw the puppet's device with cross-signed = {cross_signed}: {e:#}")
    });
}

/// The puppet's master key as the client knows it.
async fn puppet_master_key(client: &Client, puppet: &UserId) -> Option<String> {
    let identity = client
        .encryption()
        .get_user_identity(puppet)
        .await
        .unwrap()?;
    identity.master_key().get_first_key().map(|k| k.to_base64())
}

/// The `content` of every to-device event of `event_type` Synapse has queued
/// for the puppet's device (read from its SQLite database: to-device
/// messages for an appservice's devices stay in `device_inbox`).
fn to_device_for_puppet(local: &Local, event_type: &str) -> Vec<Value> {
    let python = bridgekeys_testkit::default_venv_dir()
        .join("bin")
        .join("python");
    let db = local.synapse.data_dir().join("homeserver.db");
    let script = "import sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1])\n\
        for (m,) in c.execute('SELECT message_json FROM device_inbox WHERE user_id = ? AND device_id = ? ORDER BY stream_id', (sys.argv[2], sys.argv[3])):\n    print(m)\n";
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&db)
        .arg(PUPPET)
        .arg(DEFAULT_PUPPET_DEVICE_ID)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reading Synapse's device_inbox: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m["type"] == event_type)
        .map(|m| m["content"].clone())
        .collect()
}

/// `m.room_key.withheld` notices Synapse queued for the puppet's device for
/// `session_id`.
fn withheld_for(local: &Local, session_id: &str) -> Vec<Value> {
    to_device_for_puppet(local, "m.room_key.withheld")
        .into_iter()
        .filter(|c| c["session_id"] == session_id)
        .collect()
}

/// `{"user_id", "usage", "keys"}` of a cross-signing key, as uploaded.
fn key_object(user_id: &str, usage: &str, key: &Ed25519SecretKey) -> Value {
    let public = key.public_key().to_base64();
    json!({
        "user_id": user_id,
        "usage": [usage],
        "keys": { format!("ed25519:{public}"): public },
    })
}

fn sign(object: &mut Value, user_id: &str, key: &Ed25519SecretKey) {
    let signature = key.sign(canonical_json_for_signing(&*object).unwrap().as_bytes());
    object["signatures"] = json!({
        user_id: { format!("ed25519:{}", key.public_key().to_base64()): signature.to_base64() }
    });
}

/// Replace the puppet's cross-signing identity, as the appservice, with a
/// fresh one that has not signed the puppet's device; its master key.
async fn replace_puppet_identity(local: &Local) -> String {
    let master = Ed25519SecretKey::new();
    let self_signing = Ed25519SecretKey::new();
    let user_signing = Ed25519SecretKey::new();
    let mut ssk = key_object(PUPPET, "self_signing", &self_signing);
    sign(&mut ssk, PUPPET, &master);
    let mut usk = key_object(PUPPET, "user_signing", &user_signing);
    sign(&mut usk, PUPPET, &master);
    let body = json!({
        "master_key": key_object(PUPPET, "master", &master),
        "self_signing_key": ssk,
        "user_signing_key": usk,
    });
    let path = format!(
        "/_matrix/client/v3/keys/device_signing/upload?user_id={}",
        PUPPET.replace('@', "%40").replace(':', "%3A")
    );
    let (status, answer) = local
        .synapse
        .request(
            Method::POST,
            &path,
            Some(&local.registration.as_token),
            Some(&body),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "replacing the identity: {answer}");
    master.public_key().to_base64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_client_shares_its_room_key_with_a_cross_signed_puppet_and_reads_its_echo() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let local = Local::start(dir.path()).await.unwrap();
    local
        .synapse
        .register_user("alice", PASSWORD)
        .await
        .unwrap();
    let (client, inbox) = strict_client(&local).await;
    let alice = TestUser {
        user_id: client.user_id().unwrap().to_string(),
        access_token: client.access_token().unwrap(),
        device_id: client.device_id().unwrap().to_string(),
    };
    client.sync_once(SyncSettings::default()).await.unwrap();
    let syncing = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .sync(SyncSettings::default().timeout(Duration::from_secs(5)))
                .await
        })
    };
    eprintln!(
        "Synapse, bridge and client ready in {:.1?}",
        started.elapsed()
    );

    // The encrypted DM; the bridge provisions (and cross-signs) the puppet
    // on the invite and joins.
    let puppet = UserId::parse(PUPPET).unwrap();
    let room = client.create_dm(&puppet).await.unwrap();
    assert!(
        room.latest_encryption_state().await.unwrap().is_encrypted(),
        "the DM is not encrypted"
    );
    local
        .wait_for_join(&alice, room.room_id().as_str(), PUPPET, TIMEOUT)
        .await
        .unwrap();
    poll(TIMEOUT, || async {
        let member = room.get_member_no_sync(&puppet).await?;
        Ok(member
            .filter(|m| *m.membership() == MembershipState::Join)
            .map(|_| ()))
    })
    .await
    .context("the client never saw the puppet join")
    .unwrap();
    let provisioner_master = local
        .manager()
        .unwrap()
        .cross_signing_keys(&bridgekeys::ruma::UserId::parse(PUPPET).unwrap())
        .await
        .unwrap()
        .master_public()
        .unwrap()
        .to_owned();

    // 1. What the strict client decides on: the puppet's device is signed
    //    by the puppet's self-signing key, under the bridge's master key.
    wait_puppet_device_cross_signed(&client, &puppet, true).await;
    assert_eq!(
        puppet_master_key(&client, &puppet).await.as_deref(),
        Some(provisioner_master.as_str()),
        "the client knows another master key for the puppet than the bridge"
    );

    // 2. "hello", encrypted for the puppet; its echo, encrypted for us.
    let keys_before = local.manager().unwrap().stats().room_keys_stored;
    let hello = room
        .send(RoomMessageEventContent::text_plain("hello"))
        .await
        .unwrap();
    let mine = wait_message(&inbox, &room, &alice.user_id, "hello").await;
    assert_eq!(mine.event_id, hello.event_id);
    let hello_session = mine
        .encryption
        .as_ref()
        .and_then(|i| i.session_id())
        .expect("our hello went out encrypted")
        .to_owned();
    let echo = wait_message(&inbox, &room, PUPPET, "echo: hello").await;
    let info = echo
        .encryption
        .as_ref()
        .expect("the echo came in the clear");
    assert_eq!(info.sender.as_str(), PUPPET);
    assert_eq!(
        info.sender_device.as_deref().map(|d| d.as_str()),
        Some(DEFAULT_PUPPET_DEVICE_ID)
    );
    let stats = local.manager().unwrap().stats();
    assert!(
        stats.room_keys_stored > keys_before,
        "the puppet got no room key: {stats:?}"
    );
    // The key went to the puppet's device over Olm, and Synapse still has
    // that to-device message (so the absence of a withheld notice next to
    // it means something).
    let our_key = client
        .encryption()
        .curve25519_key()
        .await
        .unwrap()
        .to_base64();
    let olm_to_puppet = to_device_for_puppet(&local, "m.room.encrypted");
    assert!(
        olm_to_puppet
            .iter()
            .any(|c| c["sender_key"] == our_key.as_str()),
        "no Olm message from the client to the puppet on the homeserver: {olm_to_puppet:?}"
    );
    assert_eq!(
        withheld_for(&local, &hello_session),
        Vec::<Value>::new(),
        "the client withheld the hello session from the puppet"
    );
    eprintln!(
        "encrypted echo read by the strict client after {:.1?}",
        started.elapsed()
    );

    // 3. Negative control: the puppet's device no longer signed by its
    //    (new) identity. The client withholds its next room key from it.
    let new_master = replace_puppet_identity(&local).await;
    wait_puppet_device_cross_signed(&client, &puppet, false).await;
    assert_eq!(
        puppet_master_key(&client, &puppet).await.as_deref(),
        Some(new_master.as_str())
    );
    let keys_before = local.manager().unwrap().stats().room_keys_stored;
    let withheld_body = "not for unsigned devices";
    let sent = room
        .send(RoomMessageEventContent::text_plain(withheld_body))
        .await
        .unwrap();
    let mine = wait_message(&inbox, &room, &alice.user_id, withheld_body).await;
    assert_eq!(mine.event_id, sent.event_id);
    let session = mine
        .encryption
        .as_ref()
        .and_then(|i| i.session_id())
        .expect("encrypted")
        .to_owned();
    assert_ne!(
        session, hello_session,
        "the client did not rotate its session away from the puppet"
    );
    // `send` returned after the key was shared (and withheld): the notice
    // is on the homeserver already.
    let withheld = withheld_for(&local, &session);
    assert_eq!(withheld.len(), 1, "withheld notices: {withheld:?}");
    assert_eq!(withheld[0]["code"], "m.unverified", "{withheld:?}");
    // The bridge gets the event and, without the key, holds it.
    let store = local.store().unwrap().clone();
    poll(TIMEOUT, || async {
        Ok(store
            .held_events(None)?
            .into_iter()
            .find(|h| h.event_id == sent.event_id.as_str()))
    })
    .await
    .context("the bridge never held the event")
    .unwrap();
    assert_eq!(
        local.manager().unwrap().stats().room_keys_stored,
        keys_before,
        "the puppet got a room key all the same"
    );
    assert!(
        !inbox
            .lock()
            .unwrap()
            .messages
            .iter()
            .any(|m| m.body == format!("echo: {withheld_body}")),
        "the puppet echoed a message whose key was withheld"
    );

    syncing.abort();
    local.stop().await.unwrap();
    eprintln!("done in {:.1?}", started.elapsed());
}
