//! The outstanding-key bound when several processes share one store (issue
//! 15): two account managers on one shared store stand for two bridge
//! processes, each keeping its own count of a device's outstanding keys.
//!
//! A process's count misses what the other process claims and uses. When
//! the other one uses keys this one claimed, the count only goes up, and
//! once it says "over the bound" every claim would evict the oldest keys
//! left in the store: keys the other process handed out a moment ago, whose
//! pre-key messages would then fail. The manager counts again from the
//! store before it evicts on a store that is not its sole writer.
//!
//! The same holds for a device's fallback key: a process that loaded the
//! device keeps a copy of its account, and another process may rotate and
//! publish the key meanwhile. A pre-key message on the new key, a read of
//! the published key and the key to upload must all go by what is stored.
//!
//! On a shared [`MemoryStore`] and on two [`PgStore`]s over one real
//! PostgreSQL database.

use std::sync::Arc;

use bridgekeys_olm::{AccountManager, ManagerConfig, OlmError};
use bridgekeys_store::{DeviceKey, Store, testing::MemoryStore};
use ruma::OneTimeKeyAlgorithm;

use crate::common::{
    DecryptPrekey, alice, postgres_pair, prekey_message, prekey_message_to, upload_and_publish,
};

const SC: OneTimeKeyAlgorithm = OneTimeKeyAlgorithm::SignedCurve25519;
const BOUND: usize = 8;

fn config() -> ManagerConfig {
    let mut c = ManagerConfig::default();
    c.max_keys_per_claim = BOUND;
    c.max_outstanding_keys = BOUND;
    c
}

/// `a` and `b` manage the same puppet device on one store.
async fn the_bound_counts_what_the_other_process_claimed_and_used(
    a: &AccountManager,
    b: &AccountManager,
) {
    let (user, device) = alice();
    a.create_device(&user, &device).await.unwrap();
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    let count = |m: &AccountManager| m.store().count_one_time_keys(&dev).unwrap();

    // `a` hands out the bound's worth of keys; peers use every one of them
    // through `b` (the transactions landed there). The store holds none
    // now, but `a`'s own count still says 8.
    let claimed_by_a = a.claim(&user, &device, &SC, BOUND).await.unwrap();
    for (i, key) in claimed_by_a.iter().enumerate() {
        let (sender, message) = prekey_message(b, &user, &device, key, &format!("via b {i}"));
        b.decrypt_prekey(&user, &device, sender, &message)
            .await
            .unwrap();
    }
    assert_eq!(count(a), 0);

    // `b` hands out three fresh keys to peers who have not written yet.
    let fresh = b.claim(&user, &device, &SC, 3).await.unwrap();

    // One more claim through `a`: its own count would say 9 of 8 and evict
    // the oldest key in the store, the first of `b`'s fresh ones.
    a.claim(&user, &device, &SC, 1).await.unwrap();
    assert_eq!(
        a.stats().evicted_keys,
        0,
        "a evicted keys for a count that only it held"
    );
    assert_eq!(count(a), 4);
    for (i, key) in fresh.iter().enumerate() {
        let (sender, message) = prekey_message(a, &user, &device, key, &format!("fresh {i}"));
        let inbound = a.decrypt_prekey(&user, &device, sender, &message).await;
        assert!(
            inbound.is_ok(),
            "a key b handed out was evicted: {:?}",
            inbound.err()
        );
    }
    assert_eq!(count(a), 1);

    // The other way: the store holds more than a process's count. `b`'s
    // count says 10 for 1 stored + 7 new keys (it missed `a`'s uses): it
    // must not evict. Then `a`, whose count says 1, claims 8 more onto the
    // 8 stored: the store must come back to the bound, the oldest going
    // first, not keep 15 because `a` thought it held 9.
    let filled = b.claim(&user, &device, &SC, BOUND - 1).await.unwrap();
    assert_eq!(count(b), BOUND);
    a.claim(&user, &device, &SC, BOUND).await.unwrap();
    assert_eq!(count(a), BOUND, "the store holds more than the bound");
    let (sender, message) = prekey_message(a, &user, &device, &filled[0], "evicted");
    let err = a
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownOneTimeKey), "{err}");
}

/// `a` rotates and publishes the fallback key of a device `b` has loaded
/// already; `b` must upload, hand out and decrypt on the new key.
async fn a_fallback_key_the_other_process_rotated_is_the_one_used_here(
    a: &AccountManager,
    b: &AccountManager,
) {
    const T0: u64 = 1_000_000;
    const T1: u64 = 2_000_000;
    let (user, device) = alice();
    a.create_device(&user, &device).await.unwrap();
    let first = upload_and_publish(a, T0).await;
    // `b` loads the device now, with the first key published.
    let seen = b.published_fallback_key(&user, &device).unwrap().unwrap();
    assert_eq!(seen.key_id, first.key_id);

    a.rotate_fallback_key(&user, &device, T1).await.unwrap();
    // Whichever process runs the upload sends the same new key.
    let from_b = b
        .fallback_key_for_upload(&user, &device, T1)
        .await
        .unwrap()
        .expect("b has nothing to upload: it still sees the first key as published");
    let from_a = a
        .fallback_key_for_upload(&user, &device, T1)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(from_a.key_id, first.key_id);
    assert_eq!(from_b.key_id, from_a.key_id);
    assert_eq!(
        serde_json::to_value(&from_b.key).unwrap(),
        serde_json::to_value(&from_a.key).unwrap()
    );
    assert!(
        a.mark_fallback_published(&user, &device, &from_a.key_id, T1)
            .await
            .unwrap()
    );
    let handed_out = b
        .published_fallback_key(&user, &device)
        .unwrap()
        .expect("b hands out no fallback key: it missed the publication");
    assert_eq!(handed_out.key_id, from_a.key_id);

    // A peer's pre-key message on the new key lands on `b`.
    let (sender, message) = prekey_message_to(
        b,
        &user,
        &device,
        from_a.key.key.as_bytes(),
        "on the new key",
    );
    let inbound = b
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .expect("b refused a pre-key message on the fallback key a published");
    assert!(inbound.used_fallback_key);
    assert_eq!(inbound.plaintext.as_slice(), b"on the new key");
    // `b` recorded the use, and `a` reads it.
    let state = a.fallback_state(&user, &device).unwrap();
    assert!(state.current.unwrap().used, "a does not see b's use");

    // Once more, with nothing in between: `a` rotates and publishes again,
    // and the first thing `b` gets is a pre-key message on the newest key.
    const T2: u64 = 3_000_000;
    a.rotate_fallback_key(&user, &device, T2).await.unwrap();
    let newest = upload_and_publish(a, T2).await;
    let (sender, message) =
        prekey_message_to(b, &user, &device, newest.key.key.as_bytes(), "newest");
    let inbound = b
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .expect("b refused a pre-key message on the newest fallback key");
    assert!(inbound.used_fallback_key);
}

fn on_one_memory_store() -> (AccountManager, AccountManager) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = AccountManager::new(Arc::clone(&store), config());
    let b = AccountManager::new(store, config());
    (a, b)
}

/// Two stores on one database: two processes' views of it (and the server,
/// which must outlive them).
async fn on_one_postgres_database(
    name: &str,
) -> (bridgekeys_testkit::Postgres, AccountManager, AccountManager) {
    let (server, [first, second]) = postgres_pair(name).await;
    assert!(!first.sole_writer(), "a database is shared");
    let a = AccountManager::new(first, config());
    let b = AccountManager::new(second, config());
    (server, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_a_process_does_not_evict_keys_the_other_handed_out() {
    let (a, b) = on_one_memory_store();
    the_bound_counts_what_the_other_process_claimed_and_used(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_a_process_does_not_evict_keys_the_other_handed_out() {
    let (_server, a, b) = on_one_postgres_database("shared_keys").await;
    the_bound_counts_what_the_other_process_claimed_and_used(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_a_fallback_key_rotated_elsewhere_is_uploaded_handed_out_and_decrypted_here()
 {
    let (a, b) = on_one_memory_store();
    a_fallback_key_the_other_process_rotated_is_the_one_used_here(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_a_fallback_key_rotated_elsewhere_is_uploaded_handed_out_and_decrypted_here()
 {
    let (_server, a, b) = on_one_postgres_database("shared_fallback").await;
    a_fallback_key_the_other_process_rotated_is_the_one_used_here(&a, &b).await;
}
