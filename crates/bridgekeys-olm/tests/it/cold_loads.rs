//! Claims and decryption for devices that are not cached yet, on
//! PostgreSQL: loading the device waits for the server without holding the
//! runtime's thread, and concurrent claims of one device read it once.

use std::{sync::Arc, time::Duration};

use bridgekeys_olm::{AccountManager, FallbackAction, FallbackPolicy, ManagerConfig, OlmError};
use bridgekeys_store::{PgStore, PgStoreConfig, StoreKey};
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId};

use crate::common::{DecryptPrekey as _, alice, prekey_message, upload_and_publish};

/// A raw connection to the test database, for what a store never does.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// A connection holding the accounts table locked, in a transaction the
/// test commits to lift the lock.
async fn lock_accounts(url: &str) -> tokio_postgres::Client {
    let holder = raw(url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE bk_accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    holder
}

/// Poll the server until a statement in this database waits for a lock
/// (`true`), or `done` says the work under test ended first (`false`).
/// Fails the test after a minute of neither, instead of hanging.
async fn a_read_waits(url: &str, done: impl Fn() -> bool) -> bool {
    let watcher = raw(url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return true;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no read waited for the lock within a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A throwaway PostgreSQL server and a store in its database `name`, whose
/// calls fail after `timeout` if given (how long a call that blocks the
/// thread takes to fail), else the default. The server stops when its
/// handle is dropped.
async fn store_in(
    name: &str,
    timeout: Option<Duration>,
) -> (bridgekeys_testkit::Postgres, String, Arc<PgStore>) {
    let server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database(name).await.unwrap();
    let mut config = PgStoreConfig::new(&url, StoreKey::generate());
    if let Some(timeout) = timeout {
        config.operation_timeout = timeout;
    }
    let store = Arc::new(PgStore::create(config).unwrap());
    (server, url, store)
}

/// Run `work` on this (current-thread) runtime while another connection
/// holds the accounts table locked, and lift the lock once a read waits
/// for it, or once `work` ended first. Whether a read was seen waiting,
/// and `work`'s answer. A `work` that blocked the thread on the locked
/// table would keep the lock in place until the store's timeout failed it.
async fn while_accounts_locked<T: Send + 'static>(
    url: &str,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> (bool, T) {
    let holder = lock_accounts(url).await;
    let work = tokio::spawn(work);
    let seen_waiting = a_read_waits(url, || work.is_finished()).await;
    holder.batch_execute("COMMIT").await.unwrap();
    (seen_waiting, work.await.unwrap())
}

/// A spawned claim of one key.
type Claim = tokio::task::JoinHandle<Result<Vec<bridgekeys_olm::ClaimedKey>, OlmError>>;

/// The claims of a burst test: the accounts table locked by another
/// connection (returned, to commit), then `n` claims of one key each for
/// `user`'s `device` spawned on this thread, which runs them whenever the
/// test waits.
async fn claims_while_locked(
    url: &str,
    manager: &Arc<AccountManager>,
    (user, device): (OwnedUserId, OwnedDeviceId),
    n: usize,
) -> (tokio_postgres::Client, Vec<Claim>) {
    let holder = lock_accounts(url).await;
    let claims = (0..n)
        .map(|_| {
            let (manager, user, device) = (manager.clone(), user.clone(), device.clone());
            tokio::spawn(async move {
                manager
                    .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
                    .await
            })
        })
        .collect();
    (holder, claims)
}

/// On a current-thread runtime (one thread runs every task), a claim whose
/// device must be loaded from PostgreSQL starts while another connection
/// holds the accounts table locked. The claim's load waits at the server;
/// meanwhile this test, on the same thread, sees the statement waiting,
/// lifts the lock, and the claim is answered. A load that blocked the
/// thread for its round trip would keep this test from lifting the lock
/// until the store's operation timeout failed the claim.
#[tokio::test(flavor = "current_thread")]
async fn a_claim_loading_its_device_from_postgresql_leaves_the_runtime_thread_free() {
    let (_server, url, store) = store_in("cold_claim", Some(Duration::from_secs(10))).await;
    let (user, device) = alice();
    AccountManager::new(store.clone(), ManagerConfig::default())
        .create_device(&user, &device)
        .await
        .unwrap();
    // A new manager: the device is stored, not cached.
    let manager = AccountManager::new(store, ManagerConfig::default());

    let (seen_waiting, claimed) = while_accounts_locked(&url, async move {
        manager
            .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await
    })
    .await;
    assert!(
        seen_waiting,
        "the claim ended before this thread saw its load wait: {claimed:?}"
    );
    let keys = claimed.expect("the claim is answered once the lock goes");
    assert_eq!(keys.len(), 1);
}

/// Eight claims of one device that is not cached, started together while
/// another connection holds the accounts table locked: the device's record
/// is read from PostgreSQL once, by the first claim, and the other seven
/// find it cached when their turn comes. Each claim is answered, with its
/// own key id. (Without the device's load gate, each claim sends its own
/// read, and eight reads are counted.)
#[tokio::test(flavor = "current_thread")]
async fn concurrent_claims_of_one_uncached_device_read_it_from_postgresql_once() {
    let (_server, url, store) = store_in("cold_burst", None).await;
    let (user, device) = alice();
    AccountManager::new(store.clone(), ManagerConfig::default())
        .create_device(&user, &device)
        .await
        .unwrap();
    let manager = Arc::new(AccountManager::new(store, ManagerConfig::default()));

    let (holder, claims) = claims_while_locked(&url, &manager, (user, device), 8).await;
    // This thread runs the claims whenever the test waits, so by the time
    // it sees a read waiting for the lock, every claim has started.
    let waited = a_read_waits(&url, || claims.iter().any(|c| c.is_finished())).await;
    assert!(waited, "a claim ended while the table was locked");
    let reads_while_locked = manager.stats().device_loads;
    holder.batch_execute("COMMIT").await.unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for claim in claims {
        let keys = claim.await.unwrap().expect("every claim is answered");
        assert_eq!(keys.len(), 1);
        assert!(ids.insert(keys[0].key_id.clone()), "a key id given twice");
    }
    assert_eq!(reads_while_locked, 1, "reads sent while the first waited");
    assert_eq!(
        manager.stats().device_loads,
        1,
        "the device was read once for eight claims"
    );
}

/// The same for a pre-key message to a device that is not cached: on a
/// current-thread runtime, `decrypt_olm` loads the device from PostgreSQL
/// while another connection holds the accounts table locked; this test,
/// on the same thread, sees the load wait, lifts the lock, and the message
/// is decrypted. A load that blocked the thread would keep the lock in
/// place until the store's operation timeout failed the decryption.
#[tokio::test(flavor = "current_thread")]
async fn a_prekey_message_to_an_uncached_device_on_postgresql_leaves_the_runtime_thread_free() {
    let (_server, url, store) = store_in("cold_decrypt", Some(Duration::from_secs(10))).await;
    let (user, device) = alice();
    let first = AccountManager::new(store.clone(), ManagerConfig::default());
    first.create_device(&user, &device).await.unwrap();
    let claimed = first
        .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
        .await
        .unwrap();
    let (sender_key, message) =
        prekey_message(&first, &user, &device, &claimed[0], "hello, cold puppet");
    // A new manager: the device is stored, not cached.
    let manager = Arc::new(AccountManager::new(store, ManagerConfig::default()));

    let decrypting = manager.clone();
    let (seen_waiting, decrypted) = while_accounts_locked(&url, async move {
        decrypting
            .decrypt_prekey(&user, &device, sender_key, &message)
            .await
    })
    .await;
    assert!(
        seen_waiting,
        "the decryption ended before this thread saw its load wait: {decrypted:?}"
    );
    let inbound = decrypted.expect("the message is decrypted once the lock goes");
    assert_eq!(inbound.plaintext, b"hello, cold puppet");
    assert!(inbound.new_session);
    assert_eq!(manager.stats().device_loads, 1);
}

/// Eight claims of a device the store does not have, started together
/// while the accounts table is locked: the first claim's read finds no
/// device, and the seven queued behind it get the same answer without a
/// read of their own (queued callers that each read again, one after
/// another, would wait a whole operation timeout each on a stalled
/// database). Every claim is refused as an unknown device.
#[tokio::test(flavor = "current_thread")]
async fn queued_claims_of_an_unknown_device_share_the_first_ones_answer() {
    let (_server, url, store) = store_in("cold_unknown", None).await;
    let manager = Arc::new(AccountManager::new(store, ManagerConfig::default()));
    let (user, device) = alice();

    let (holder, claims) = claims_while_locked(&url, &manager, (user, device), 8).await;
    let waited = a_read_waits(&url, || claims.iter().any(|c| c.is_finished())).await;
    assert!(waited, "a claim ended while the table was locked");
    holder.batch_execute("COMMIT").await.unwrap();
    for claim in claims {
        let refused = claim.await.unwrap().expect_err("the device does not exist");
        assert!(
            matches!(refused, OlmError::UnknownDevice { .. }),
            "{refused:?}"
        );
    }
    assert_eq!(
        manager.stats().device_loads,
        1,
        "one read answered all eight claims"
    );
}

/// A rotation pass's look at an idle puppet that is not cached, on
/// PostgreSQL, on a current-thread runtime: `apply_fallback_policy` reads
/// the device's record while another connection holds the accounts table
/// locked; this test, on the same thread, sees the read wait, lifts the
/// lock, and the policy answers that nothing is due yet, without caching
/// the device. A read that blocked the thread would keep the lock in place
/// until the store's operation timeout failed the call.
#[tokio::test(flavor = "current_thread")]
async fn a_rotation_look_at_an_idle_device_on_postgresql_leaves_the_runtime_thread_free() {
    let (_server, url, store) = store_in("cold_rotation", Some(Duration::from_secs(10))).await;
    let (user, device) = alice();
    let first = AccountManager::new(store.clone(), ManagerConfig::default());
    first.create_device(&user, &device).await.unwrap();
    let now = 1_700_000_000_000;
    upload_and_publish(&first, now).await;
    let manager = Arc::new(AccountManager::new(store, ManagerConfig::default()));

    let looking = manager.clone();
    let (seen_waiting, action) = while_accounts_locked(&url, async move {
        looking
            .apply_fallback_policy(&user, &device, &FallbackPolicy::default(), now + 1)
            .await
    })
    .await;
    assert!(
        seen_waiting,
        "the call ended before this thread saw its read wait: {action:?}"
    );
    assert!(
        matches!(action, Ok(FallbackAction::Wait { .. })),
        "{action:?}"
    );
    assert_eq!(manager.loaded_devices(), 0, "an idle device is not cached");
}

/// Eight claims of a cold device queued while the accounts table stays
/// locked past the store's operation timeout: the first claim's read times
/// out, and the seven queued behind it get that failure at once instead of
/// each reading again and waiting a timeout of its own. Every claim fails,
/// after one read.
#[tokio::test(flavor = "current_thread")]
async fn claims_queued_behind_a_read_that_times_out_fail_with_it() {
    let (_server, url, store) = store_in("cold_stalled", Some(Duration::from_secs(2))).await;
    let (user, device) = alice();
    AccountManager::new(store.clone(), ManagerConfig::default())
        .create_device(&user, &device)
        .await
        .unwrap();
    let manager = Arc::new(AccountManager::new(store, ManagerConfig::default()));

    let (holder, claims) = claims_while_locked(&url, &manager, (user, device), 8).await;
    let waited = a_read_waits(&url, || claims.iter().any(|c| c.is_finished())).await;
    assert!(waited, "a claim ended while the table was locked");
    // The lock stays until every claim has answered.
    for claim in claims {
        let failed = claim.await.unwrap().expect_err("the read timed out");
        assert!(matches!(failed, OlmError::Store(_)), "{failed:?}");
    }
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        manager.stats().device_loads,
        1,
        "one read, whose failure answered all eight claims"
    );
}
