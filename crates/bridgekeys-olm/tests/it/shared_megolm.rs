//! Received room keys when several processes share one store (issue 15):
//! two account managers on one shared store stand for two bridge processes.
//!
//! A room key that arrives is compared with the stored copy of its session
//! and written only if it can decrypt more (a lower first known index).
//! When both processes receive copies of one session at once (a client
//! sharing the same session again while the first share is still being
//! handled), the better copy stored by one between the other's
//! read and its write must not be replaced by the worse one: the messages
//! only the better copy reads would stay undecryptable for good. The race
//! is forced, not hoped for: an [`Intercepted`] store runs the other
//! process's write right before this one's.
//!
//! A process also keeps decoded sessions in memory. When the other process
//! stored a better copy since, the cached one cannot read the earlier
//! messages; the first such message must still decrypt.
//!
//! On a shared [`MemoryStore`] and on two [`PgStore`]s over one real
//! PostgreSQL database.

use std::sync::{Arc, Mutex};

use bridgekeys_olm::{AccountManager, DecryptedOlm, ManagerConfig, RoomKeyOutcome};
use bridgekeys_store::{
    Backend, Store,
    testing::{Intercepted, MemoryStore, Write},
};
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, RoomId, room_id};
use serde_json::{Value, json};
use vodozemac::megolm::{GroupSession, SessionConfig, SessionKey};

use crate::common::{Peer, alice, peer_user, postgres_pair};

fn room() -> &'static RoomId {
    room_id!("!shared:example.org")
}

/// A peer with an Olm session to a puppet device and a Megolm session it
/// shares in [`room`]: an event at index 0, and the two copies of the
/// session's key (from index 0, the better one, and from index 1) each in
/// a verified Olm payload, ready for either process to receive.
struct Sharing {
    early: Value,
    later: Value,
    better: DecryptedOlm,
    worse: DecryptedOlm,
}

impl Sharing {
    async fn new(m: &AccountManager) -> Self {
        let (user, device) = alice();
        m.create_device(&user, &device).await.unwrap();
        let key = m
            .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await
            .unwrap()
            .remove(0);
        let mut peer = Peer::new(m, &user, &device, key.key.key.as_bytes());
        let mut group = GroupSession::new(SessionConfig::version_1());
        let from_start = group.session_key();
        let early = encrypt(&mut group, &peer, "early");
        let from_one = group.session_key();
        let later = encrypt(&mut group, &peer, "later");
        let id = group.session_id();
        let worse = share(m, &mut peer, (&user, &device), &from_one, &id).await;
        let better = share(m, &mut peer, (&user, &device), &from_start, &id).await;
        Self {
            early,
            later,
            better,
            worse,
        }
    }
}

/// The peer sends `key` in an Olm message; `m` decrypts and checks it.
async fn share(
    m: &AccountManager,
    peer: &mut Peer,
    puppet: (&OwnedUserId, &OwnedDeviceId),
    key: &SessionKey,
    session_id: &str,
) -> DecryptedOlm {
    let identity = m.identity_keys(puppet.0, puppet.1).unwrap();
    let payload = json!({
        "type": "m.room_key",
        "content": {
            "algorithm": "m.megolm.v1.aes-sha2", "room_id": room(),
            "session_id": session_id, "session_key": key.to_base64(),
        },
        "sender": peer_user(), "sender_device": "PEERDEV",
        "recipient": puppet.0,
        "recipient_keys": {"ed25519": identity.ed25519.to_base64()},
        "keys": {"ed25519": peer.account.ed25519_key().to_base64()},
    });
    let message = peer.session.encrypt(payload.to_string()).unwrap();
    m.decrypt_olm(
        (puppet.0, puppet.1),
        peer_user(),
        peer.curve25519(),
        &message,
        None,
    )
    .await
    .unwrap()
}

fn encrypt(group: &mut GroupSession, peer: &Peer, body: &str) -> Value {
    let plaintext = json!({
        "type": "m.room.message", "room_id": room(),
        "content": {"msgtype": "m.text", "body": body},
    });
    let message = group.encrypt(plaintext.to_string());
    json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "ciphertext": message.to_base64(),
        "session_id": group.session_id(),
        "sender_key": peer.curve25519().to_base64(),
        "device_id": "PEERDEV",
    })
}

fn decrypt(m: &AccountManager, event_id: &str, content: &Value) -> Result<String, String> {
    let raw = serde_json::value::to_raw_value(content).unwrap();
    let event = m
        .decrypt_room_event(room(), peer_user(), event_id, &raw)
        .map_err(|e| e.to_string())?;
    let inner: Value = serde_json::from_str(event.content.get()).unwrap();
    Ok(inner["body"].as_str().unwrap().to_owned())
}

/// `a` stores the worse copy; right before its write, `b` stores the better
/// one. The better one must stay.
async fn a_better_copy_stored_by_the_other_process_meanwhile_is_not_replaced(
    first: Arc<dyn Backend>,
    second: Arc<dyn Backend>,
) {
    let racing = Arc::new(Intercepted::new(first));
    let a = AccountManager::new(
        Arc::clone(&racing) as Arc<dyn Store>,
        ManagerConfig::default(),
    );
    let b = Arc::new(AccountManager::new(
        second as Arc<dyn Store>,
        ManagerConfig::default(),
    ));
    let sharing = Sharing::new(&a).await;

    let better = Mutex::new(Some((Arc::clone(&b), sharing.better)));
    let handle = tokio::runtime::Handle::current();
    racing.intercept(move |write| {
        if !matches!(write, Write::GroupSession(..)) {
            return Ok(());
        }
        let taken = better.lock().unwrap().take();
        if let Some((b, olm)) = taken {
            let handle = handle.clone();
            let outcome = std::thread::spawn(move || handle.block_on(b.receive_room_key(&olm)))
                .join()
                .unwrap()
                .unwrap();
            assert_eq!(outcome, RoomKeyOutcome::Stored);
        }
        Ok(())
    });
    let outcome = a.receive_room_key(&sharing.worse).await.unwrap();
    racing.clear();
    assert_eq!(
        outcome,
        RoomKeyOutcome::Kept,
        "a's worse copy was written over the better one b stored meanwhile"
    );
    // Both processes read the event only the better copy can.
    assert_eq!(decrypt(&b, "$early", &sharing.early).unwrap(), "early");
    assert_eq!(decrypt(&a, "$early", &sharing.early).unwrap(), "early");
    assert_eq!(decrypt(&a, "$later", &sharing.later).unwrap(), "later");
}

/// `b` decrypted with the worse copy (so it holds it decoded in memory);
/// then `a` stores the better copy. `b` reads the earlier event at once.
async fn a_cached_worse_copy_gives_way_to_the_better_one_the_other_process_stored(
    first: Arc<dyn Backend>,
    second: Arc<dyn Backend>,
) {
    let a = AccountManager::new(first as Arc<dyn Store>, ManagerConfig::default());
    let b = AccountManager::new(second as Arc<dyn Store>, ManagerConfig::default());
    let sharing = Sharing::new(&a).await;
    assert_eq!(
        a.receive_room_key(&sharing.worse).await.unwrap(),
        RoomKeyOutcome::Stored
    );
    assert_eq!(decrypt(&b, "$later", &sharing.later).unwrap(), "later");
    assert!(
        decrypt(&b, "$early", &sharing.early).is_err(),
        "the worse copy cannot read index 0"
    );
    // The refusal dropped the cached copy: cache it again.
    assert_eq!(decrypt(&b, "$later", &sharing.later).unwrap(), "later");

    assert_eq!(
        a.receive_room_key(&sharing.better).await.unwrap(),
        RoomKeyOutcome::Improved
    );
    assert_eq!(
        decrypt(&b, "$early", &sharing.early),
        Ok("early".to_owned()),
        "b refused an event the better copy in the store reads"
    );
    // And b goes on from the better copy.
    assert_eq!(decrypt(&b, "$later", &sharing.later).unwrap(), "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_a_better_room_key_copy_stored_meanwhile_is_not_replaced_by_a_worse_one()
 {
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    a_better_copy_stored_by_the_other_process_meanwhile_is_not_replaced(Arc::clone(&store), store)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_a_better_room_key_copy_stored_meanwhile_is_not_replaced_by_a_worse_one()
 {
    let (_server, [first, second]) = postgres_pair("shared_room_keys").await;
    a_better_copy_stored_by_the_other_process_meanwhile_is_not_replaced(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_a_cached_worse_copy_gives_way_to_the_better_one_stored_elsewhere() {
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    a_cached_worse_copy_gives_way_to_the_better_one_the_other_process_stored(
        Arc::clone(&store),
        store,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_a_cached_worse_copy_gives_way_to_the_better_one_stored_elsewhere()
{
    let (_server, [first, second]) = postgres_pair("shared_cached_room_keys").await;
    a_cached_worse_copy_gives_way_to_the_better_one_the_other_process_stored(first, second).await;
}
