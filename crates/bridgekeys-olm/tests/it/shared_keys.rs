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
//! On a shared [`MemoryStore`] and on two [`PgStore`]s over one real
//! PostgreSQL database.

use std::sync::Arc;

use bridgekeys_olm::{AccountManager, ManagerConfig, OlmError};
use bridgekeys_store::{DeviceKey, PgStore, PgStoreConfig, Store, StoreKey, testing::MemoryStore};
use ruma::OneTimeKeyAlgorithm;

use crate::common::{DecryptPrekey, alice, prekey_message};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_a_process_does_not_evict_keys_the_other_handed_out() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = AccountManager::new(Arc::clone(&store), config());
    let b = AccountManager::new(store, config());
    the_bound_counts_what_the_other_process_claimed_and_used(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_a_process_does_not_evict_keys_the_other_handed_out() {
    let server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database("shared_keys").await.unwrap();
    let key = StoreKey::generate();
    // Two stores on one database: two processes' views of it.
    let first = PgStore::create(PgStoreConfig::new(&url, key.clone())).unwrap();
    let second = PgStore::open(PgStoreConfig::new(&url, key)).unwrap();
    assert!(!first.sole_writer(), "a database is shared");
    let a = AccountManager::new(Arc::new(first), config());
    let b = AccountManager::new(Arc::new(second), config());
    the_bound_counts_what_the_other_process_claimed_and_used(&a, &b).await;
}
