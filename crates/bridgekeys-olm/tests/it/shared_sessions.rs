//! Several bridge processes on one store (issue 15): two account managers
//! on one shared store stand for two processes. Olm session ratchets and a
//! puppet's outbound Megolm session are compare-and-swap in the store, so
//! when both advance the same session one write loses, and its manager
//! reloads the session and redoes the step: no Megolm message index and no
//! Olm chain step is handed out twice, none is lost, and a pre-key message
//! whose session the other process started meanwhile is read on that
//! session.
//!
//! Each race is forced, not hoped for: an [`Intercepted`] store runs the other
//! process's operation right between this process's load and its write
//! (the moment a race needs), and the test checks that the write was
//! refused and redone (`session_conflicts`). Without the version check
//! that write would have been stored and its ciphertext returned, with the
//! index (or chain step) the other process had just used: the distinct
//! index and "every message decrypts" assertions would fail. Then both
//! processes encrypt concurrently from several tasks each, and every
//! message must decrypt on the receiving side at an index of its own.
//!
//! On a shared [`MemoryStore`] and on two [`PgStore`]s over one real
//! PostgreSQL database.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use bridgekeys_olm::{
    AccountManager, ManagerConfig, OlmError, Recipient, RotationSettings,
    canonical_json_for_signing,
};
use bridgekeys_store::{
    Backend, DeviceKey, Store,
    testing::{Intercepted, MemoryStore, Write},
};
use ruma::{OwnedDeviceId, OwnedUserId, RoomId, device_id, room_id};
use serde_json::{Value, json};
use vodozemac::{
    megolm::{InboundGroupSession, MegolmMessage, SessionConfig as MegolmConfig, SessionKey},
    olm::{Account, OlmMessage, SessionConfig},
};

use crate::common::{Peer, alice, decrypt, peer_user, postgres_pair};

/// Two "processes" on one store: `a` writes through an [`Intercepted`]
/// one, so the test can make `b` act between `a`'s load and its write.
struct Two {
    a: Arc<AccountManager>,
    b: Arc<AccountManager>,
    racing: Arc<Intercepted>,
    user: OwnedUserId,
    device: OwnedDeviceId,
}

impl Two {
    async fn on(first: Arc<dyn Backend>, second: Arc<dyn Backend>, config: ManagerConfig) -> Self {
        let racing = Arc::new(Intercepted::new(first));
        let a = Arc::new(AccountManager::new(
            Arc::clone(&racing) as Arc<dyn Store>,
            config.clone(),
        ));
        let b = Arc::new(AccountManager::new(second as Arc<dyn Store>, config));
        let (user, device) = alice();
        a.create_device(&user, &device).await.unwrap();
        Self {
            a,
            b,
            racing,
            user,
            device,
        }
    }

    /// Run `work` on `b` (on a thread of its own, as another process would)
    /// right before `a`'s next session write; its answer lands in the slot.
    fn b_acts_before_a_writes<T, F, Fut>(&self, work: F) -> Arc<Mutex<Option<T>>>
    where
        T: Send + 'static,
        F: FnOnce(Arc<AccountManager>, OwnedUserId, OwnedDeviceId) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let (out, b) = (Arc::clone(&slot), Arc::clone(&self.b));
        let (user, device) = (self.user.clone(), self.device.clone());
        let handle = tokio::runtime::Handle::current();
        // Once, at a's next write of a session or of its device.
        let work = Mutex::new(Some(work));
        self.racing.intercept(move |write| {
            if !matches!(
                write,
                Write::Device(_) | Write::Sessions(_) | Write::OutboundGroupSession(..)
            ) {
                return Ok(());
            }
            // Taken first, so no lock is held while b acts.
            let taken = work.lock().unwrap().take();
            if let Some(work) = taken {
                let (b, user, device, handle) =
                    (Arc::clone(&b), user.clone(), device.clone(), handle.clone());
                let answer = std::thread::spawn(move || handle.block_on(work(b, user, device)))
                    .join()
                    .unwrap();
                *out.lock().unwrap() = Some(answer);
            }
            Ok(())
        });
        slot
    }
}

fn room() -> &'static RoomId {
    room_id!("!shared:example.org")
}

/// A member's view of the room: the inbound session from the shared key.
fn member(room_key: &str) -> InboundGroupSession {
    let key: Value = serde_json::from_str(room_key).unwrap();
    let session_key = SessionKey::from_base64(key["session_key"].as_str().unwrap()).unwrap();
    InboundGroupSession::new(&session_key, MegolmConfig::version_1())
}

/// The index and body of a room event, as a member decrypts it.
fn member_reads(inbound: &mut InboundGroupSession, content: &Value) -> (u32, String) {
    let message = MegolmMessage::from_base64(content["ciphertext"].as_str().unwrap()).unwrap();
    let decrypted = inbound.decrypt(&message).unwrap();
    let event: Value = serde_json::from_slice(&decrypted.plaintext).unwrap();
    (
        decrypted.message_index,
        event["content"]["body"].as_str().unwrap().to_owned(),
    )
}

const TASKS: usize = 3;
const MESSAGES: usize = 4;

/// Both processes encrypt room events in the same room with the puppet's
/// one outbound session: first a forced race, then concurrently.
async fn megolm_indexes_are_never_handed_out_twice(two: &Two) {
    let from = (two.user.as_ref(), two.device.as_ref());
    let settings = RotationSettings {
        period_msgs: 1000,
        ..RotationSettings::default()
    };
    let prepared = two
        .a
        .prepare_group_session(from, room(), settings, &[])
        .await
        .unwrap();
    let mut inbound = member(&prepared.room_key);

    // B encrypts between A's load and A's write: both start from index 0.
    let b_sent = two.b_acts_before_a_writes(|b, user, device| async move {
        b.encrypt_room_event(
            (&user, &device),
            room(),
            "m.room.message",
            &json!({"body": "B"}),
        )
        .await
        .unwrap()
    });
    let a_sent = two
        .a
        .encrypt_room_event(from, room(), "m.room.message", &json!({"body": "A"}))
        .await
        .unwrap();
    let b_sent = b_sent.lock().unwrap().take().expect("B ran in the race");
    assert_eq!(
        two.a.stats().session_conflicts,
        1,
        "A's write from the stale ratchet was refused and redone"
    );
    assert_eq!(member_reads(&mut inbound, &b_sent), (0, "B".to_owned()));
    assert_eq!(
        member_reads(&mut inbound, &a_sent),
        (1, "A".to_owned()),
        "A re-encrypted on the ratchet B left"
    );

    // Then both at once, from several tasks each.
    let start = Arc::new(tokio::sync::Barrier::new(2 * TASKS));
    let mut tasks = Vec::new();
    for (name, manager) in [("a", &two.a), ("b", &two.b)] {
        for t in 0..TASKS {
            let (manager, start) = (Arc::clone(manager), Arc::clone(&start));
            let (user, device) = (two.user.clone(), two.device.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let mut sent = Vec::new();
                for n in 0..MESSAGES {
                    let body = format!("{name}{t}.{n}");
                    let content = manager
                        .encrypt_room_event(
                            (&user, &device),
                            room(),
                            "m.room.message",
                            &json!({ "body": body }),
                        )
                        .await
                        .unwrap();
                    sent.push((body, content));
                }
                sent
            }));
        }
    }
    let mut indexes = BTreeSet::from([0, 1]);
    for task in tasks {
        for (body, content) in task.await.unwrap() {
            let (index, read) = member_reads(&mut inbound, &content);
            assert_eq!(read, body);
            assert!(
                indexes.insert(index),
                "message index {index} handed out twice"
            );
        }
    }
    assert_eq!(indexes.len(), 2 + 2 * TASKS * MESSAGES);
    assert_eq!(
        indexes.last().copied(),
        Some((1 + 2 * TASKS * MESSAGES) as u32),
        "an index was skipped: a ratchet step was lost"
    );
}

/// A peer's signed one-time key, as a claim through the homeserver returns it.
fn signed_one_time_key(peer: &mut Account) -> Value {
    peer.generate_one_time_keys(1);
    let otk = *peer.one_time_keys().values().next().unwrap();
    peer.mark_keys_as_published();
    let mut key = json!({ "key": otk.to_base64() });
    let signature = peer.sign(canonical_json_for_signing(&key).unwrap());
    key["signatures"] =
        json!({ peer_user().as_str(): { "ed25519:PEERDEV": signature.to_base64() } });
    key
}

fn recipient(peer: &Account) -> Recipient<'static> {
    Recipient {
        user_id: peer_user(),
        device_id: device_id!("PEERDEV"),
        curve25519: peer.curve25519_key(),
        ed25519: peer.ed25519_key(),
    }
}

/// The Olm message a puppet encrypted for the peer.
fn olm_body(peer: &Account, content: &Value) -> OlmMessage {
    let entry = &content["ciphertext"][peer.curve25519_key().to_base64()];
    OlmMessage::from_parts(
        entry["type"].as_u64().unwrap() as usize,
        &vodozemac::base64_decode(entry["body"].as_str().unwrap()).unwrap(),
    )
    .unwrap()
}

/// Both processes encrypt to the same peer on the puppet's one Olm
/// session: a forced race, then concurrently. The peer must read every
/// message, which it cannot if a chain step was used twice (its message
/// key is gone after the first).
async fn olm_chain_steps_are_never_handed_out_twice(two: &Two) {
    let from = (two.user.as_ref(), two.device.as_ref());
    let mut peer = Account::new();
    let key = signed_one_time_key(&mut peer);
    let to = recipient(&peer);
    two.a
        .create_outbound_session(from, &to, &key)
        .await
        .unwrap();
    let conflicts_before = two.a.stats().session_conflicts;

    let b_sent = two.b_acts_before_a_writes(move |b, user, device| async move {
        b.encrypt_olm((&user, &device), &to, "m.test", &json!({"body": "B"}))
            .await
            .unwrap()
    });
    let a_sent = two
        .a
        .encrypt_olm(from, &to, "m.test", &json!({"body": "A"}))
        .await
        .unwrap();
    let b_sent = b_sent.lock().unwrap().take().expect("B ran in the race");
    assert_eq!(
        two.a.stats().session_conflicts - conflicts_before,
        1,
        "A's write from the stale chain was refused and redone"
    );
    assert_eq!(a_sent.session_id, b_sent.session_id);
    let mut sent = vec![
        ("B".to_owned(), b_sent.content),
        ("A".to_owned(), a_sent.content),
    ];

    let start = Arc::new(tokio::sync::Barrier::new(2 * TASKS));
    let mut tasks = Vec::new();
    for (name, manager) in [("a", &two.a), ("b", &two.b)] {
        for t in 0..TASKS {
            let (manager, start) = (Arc::clone(manager), Arc::clone(&start));
            let (user, device) = (two.user.clone(), two.device.clone());
            let to = recipient(&peer);
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let mut sent = Vec::new();
                for n in 0..MESSAGES {
                    let body = format!("{name}{t}.{n}");
                    let encrypted = manager
                        .encrypt_olm((&user, &device), &to, "m.test", &json!({ "body": body }))
                        .await
                        .unwrap();
                    sent.push((body, encrypted.content));
                }
                sent
            }));
        }
    }
    for task in tasks {
        sent.extend(task.await.unwrap());
    }

    // The peer: the first message it reads starts its session, every
    // other one must decrypt on it (each chain step's key is used once).
    let identity = two.a.identity_keys(&two.user, &two.device).unwrap();
    let mut session = None;
    let mut read = BTreeSet::new();
    for (body, content) in &sent {
        let message = olm_body(&peer, content);
        let plaintext = match (&mut session, &message) {
            (None, OlmMessage::PreKey(prekey)) => {
                let created = peer
                    .create_inbound_session(SessionConfig::version_1(), identity.curve25519, prekey)
                    .unwrap();
                session = Some(created.session);
                created.plaintext
            }
            (Some(session), message) => session
                .decrypt(message)
                .unwrap_or_else(|e| panic!("{body}: a chain step used twice? {e}")),
            (None, _) => panic!("the first message is not a pre-key message"),
        };
        let payload: Value = serde_json::from_slice(&plaintext).unwrap();
        assert_eq!(payload["content"]["body"], json!(body));
        assert!(read.insert(body.clone()));
    }
    assert_eq!(read.len(), 2 + 2 * TASKS * MESSAGES);
}

/// A peer sends two pre-key messages on one new session; B reads the
/// first (starting the session, consuming the one-time key) between A's
/// decryption of the second and A's write. A's write is refused, A
/// reloads, and reads the second message on the session B stored, instead
/// of starting a second copy of it.
async fn a_prekey_message_finds_the_session_the_other_process_started(two: &Two) {
    let (user, device) = (two.user.clone(), two.device.clone());
    let key = two
        .a
        .claim(
            &user,
            &device,
            &ruma::OneTimeKeyAlgorithm::SignedCurve25519,
            1,
        )
        .await
        .unwrap()
        .remove(0);
    let mut peer = Peer::new(&two.a, &user, &device, key.key.key.as_bytes());
    let first = peer.send(&two.a, &user, &device, "first");
    let second = peer.send(&two.a, &user, &device, "second");
    let sender = peer.curve25519();
    let conflicts_before = two.a.stats().session_conflicts;

    let b_read = two.b_acts_before_a_writes(move |b, user, device| async move {
        decrypt(&b, &user, &device, sender, &first, None)
            .await
            .unwrap()
    });
    let a_read = decrypt(&two.a, &user, &device, sender, &second, None)
        .await
        .unwrap();
    let b_read = b_read.lock().unwrap().take().expect("B ran in the race");
    assert_eq!(two.a.stats().session_conflicts - conflicts_before, 1);
    assert_eq!(
        (b_read.plaintext.as_slice(), b_read.new_session),
        (&b"first"[..], true)
    );
    assert_eq!(
        (a_read.plaintext.as_slice(), a_read.new_session),
        (&b"second"[..], false),
        "A read the second message on B's session"
    );
    assert_eq!(a_read.session_id, b_read.session_id);
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    let stored = two.a.store().sessions(&dev, &sender.to_bytes()).unwrap();
    assert_eq!(stored.len(), 1, "one session, not two copies");
    assert_eq!(two.a.store().count_one_time_keys(&dev).unwrap(), 0);
}

async fn on_one_memory_store(config: ManagerConfig) -> Two {
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    Two::on(Arc::clone(&store), store, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_memory_store_never_hand_out_a_megolm_index_or_olm_chain_step_twice() {
    let two = on_one_memory_store(ManagerConfig::default()).await;
    megolm_indexes_are_never_handed_out_twice(&two).await;
    olm_chain_steps_are_never_handed_out_twice(&two).await;
    a_prekey_message_finds_the_session_the_other_process_started(&two).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_database_never_hand_out_a_megolm_index_or_olm_chain_step_twice()
 {
    // Two stores on one database: two processes' views of it.
    let (_server, [first, second]) = postgres_pair("shared_sessions").await;
    let two = Two::on(first, second, ManagerConfig::default()).await;
    megolm_indexes_are_never_handed_out_twice(&two).await;
    olm_chain_steps_are_never_handed_out_twice(&two).await;
    a_prekey_message_finds_the_session_the_other_process_started(&two).await;
}

/// With one attempt allowed, a write that loses the race fails with the
/// typed error, returns no ciphertext, and stores nothing: the session is
/// where the other process left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_write_that_loses_every_race_fails_as_contended_and_stores_nothing() {
    let mut config = ManagerConfig::default();
    config.session_write_attempts = 1;
    let two = on_one_memory_store(config).await;
    let from = (two.user.as_ref(), two.device.as_ref());
    let prepared = two
        .a
        .prepare_group_session(from, room(), RotationSettings::default(), &[])
        .await
        .unwrap();
    let mut inbound = member(&prepared.room_key);
    let b_sent = two.b_acts_before_a_writes(|b, user, device| async move {
        b.encrypt_room_event(
            (&user, &device),
            room(),
            "m.room.message",
            &json!({"body": "B"}),
        )
        .await
        .unwrap()
    });
    let err = two
        .a
        .encrypt_room_event(from, room(), "m.room.message", &json!({"body": "A"}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OlmError::Contended { attempts: 1, .. }),
        "{err}"
    );
    let b_sent = b_sent.lock().unwrap().take().expect("B ran in the race");
    assert_eq!(member_reads(&mut inbound, &b_sent), (0, "B".to_owned()));
    // The next message (no race now) is at the index after B's.
    let next = two
        .a
        .encrypt_room_event(from, room(), "m.room.message", &json!({"body": "A again"}))
        .await
        .unwrap();
    assert_eq!(member_reads(&mut inbound, &next), (1, "A again".to_owned()));
}

/// A session discarded and replaced by the other process is not brought
/// back by a stale write: B discards the room's session and starts the next
/// one right between A's load and A's write of the old one. (Were a discard
/// to remove the record, the next session would be created at the version
/// A had read, A's write would pass the compare-and-swap, and the
/// discarded session, perhaps known to a member who left, would be the
/// room's session again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_discarded_and_replaced_by_the_other_process_is_not_brought_back_by_a_stale_write()
 {
    let two = on_one_memory_store(ManagerConfig::default()).await;
    let from = (two.user.as_ref(), two.device.as_ref());
    let first = two
        .a
        .prepare_group_session(from, room(), RotationSettings::default(), &[])
        .await
        .unwrap();
    let b_prepared = two.b_acts_before_a_writes(|b, user, device| async move {
        b.discard_group_session((&user, &device), room())
            .await
            .unwrap();
        b.prepare_group_session((&user, &device), room(), RotationSettings::default(), &[])
            .await
            .unwrap()
    });
    two.a
        .mark_group_session_shared(from, room(), &first.session_id, &[])
        .await
        .unwrap();
    let second = b_prepared
        .lock()
        .unwrap()
        .take()
        .expect("B ran in the race");
    assert_ne!(second.session_id, first.session_id);
    assert_eq!(two.a.stats().session_conflicts, 1, "A's stale write lost");
    let current = two
        .a
        .prepare_group_session(from, room(), RotationSettings::default(), &[])
        .await
        .unwrap();
    assert_eq!(
        current.session_id, second.session_id,
        "the room's session is B's new one, not the discarded one"
    );
    assert!(!current.rotated);
    // And after a discard, encrypting needs a new session first.
    two.b.discard_group_session(from, room()).await.unwrap();
    assert!(matches!(
        two.a
            .encrypt_room_event(from, room(), "m.room.message", &json!({"body": "x"}))
            .await,
        Err(OlmError::NoGroupSession)
    ));
}
