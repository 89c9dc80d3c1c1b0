//! PgStore against a real PostgreSQL server, as several bridge processes
//! sharing one database: each "process" is its own `PgStore` (own pool,
//! own runtime thread, own key-id block) on the same database.
//!
//! The server and a fresh database per test come from `pg_server`.

use std::{
    collections::HashSet,
    sync::{Arc, Barrier},
};

use bridgekeys_store::{
    DeviceKey, DeviceWrite, FIRST_KEY_ID, KeyAppend, OneTimeKeyRecord, PG_SCHEMA_VERSION, Pending,
    PgStore, PgStoreConfig, PuppetRegistry, SessionRecord, SessionWrite, Store, StoreError,
    StoreId, StoreKey, TransactionClaim, TransactionLog, Version,
};
use zeroize::Zeroizing;

use crate::pg_server::fresh_database;

/// A raw connection to the test database, for what a store never does.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn config(url: &str, key: &StoreKey) -> PgStoreConfig {
    PgStoreConfig::new(url, key.clone())
}

fn account(bytes: &[u8]) -> DeviceWrite {
    DeviceWrite {
        account: Zeroizing::new(bytes.to_vec()),
        ..DeviceWrite::default()
    }
}

fn otk(id: u64, fill: u8) -> OneTimeKeyRecord {
    OneTimeKeyRecord {
        key_id: id,
        public_key: [fill; 32],
        secret_key: Zeroizing::new([fill ^ 0xff; 32]),
    }
}

/// An append that adds these keys.
fn adding(add_keys: Vec<OneTimeKeyRecord>) -> KeyAppend {
    KeyAppend {
        add_keys,
        evict_keys: Vec::new(),
    }
}

/// An append that evicts these keys.
fn evicting(evict_keys: Vec<(u64, [u8; 32])>) -> KeyAppend {
    KeyAppend {
        add_keys: Vec::new(),
        evict_keys,
    }
}

async fn durable(write: Result<Pending, StoreError>) {
    write.unwrap().durable().await.unwrap();
}

#[tokio::test]
async fn two_processes_reserving_at_once_never_get_the_same_key_id_nor_after_a_restart() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let mut small = config(&url, &key);
    small.key_id_block = 8;
    let a = PgStore::create(small.clone()).unwrap();
    let b = PgStore::open(small.clone()).unwrap();
    let start = Barrier::new(2);
    let ranges: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|store| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    (0..300u64)
                        .map(|i| {
                            let count = 1 + i % 3;
                            (store.reserve_key_ids(count).unwrap(), count)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut seen = HashSet::new();
    for (first, count) in &ranges {
        assert!(*first >= FIRST_KEY_ID);
        for id in *first..first + count {
            assert!(seen.insert(id), "key id {id} was handed out twice");
        }
    }
    let highest = seen.iter().max().copied().unwrap();
    drop((a, b));
    let again = PgStore::open(small).unwrap();
    assert!(
        again.reserve_key_ids(1).unwrap() > highest,
        "a restarted process reuses no id"
    );
}

#[tokio::test]
async fn of_two_processes_consuming_the_same_one_time_key_exactly_one_wins() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    let mut first = account(b"v1");
    first.add_keys.push(otk(7, 7));
    durable(a.write_device(&dev, None, first)).await;

    for round in 0..5u8 {
        // Both processes read the device, then race to consume a key.
        let key_id = 100 + u64::from(round);
        let version = a.load_account(&dev).unwrap().unwrap().version;
        let mut add = account(b"add");
        add.add_keys.push(otk(key_id, round));
        durable(a.write_device(&dev, Some(version), add)).await;
        let version = Version(version.0 + 1);
        assert_eq!(b.load_account(&dev).unwrap().unwrap().version, version);
        let start = Barrier::new(2);
        let results: Vec<Result<Pending, StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = [(&a, b"by a"), (&b, b"by b")]
                .into_iter()
                .map(|(store, data)| {
                    let (start, dev) = (&start, &dev);
                    s.spawn(move || {
                        let mut consume = account(data);
                        consume.remove_keys.push((key_id, [round; 32]));
                        start.wait();
                        store.write_device(dev, Some(version), consume)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: exactly one consumer wins");
        let lost = results.into_iter().find_map(Result::err).unwrap();
        assert!(
            matches!(
                lost,
                StoreError::Conflict { expected: Some(e), found: Some(f) }
                    if e == version && f == Version(version.0 + 1)
            ),
            "round {round}: {lost:?}"
        );
        for store in [&a, &b] {
            assert!(store.one_time_key(&dev, &[round; 32]).unwrap().is_none());
        }
    }
    assert!(
        b.one_time_key(&dev, &[7; 32]).unwrap().is_some(),
        "an untouched key stays"
    );
}

#[tokio::test]
async fn a_transaction_lease_is_held_by_one_process_at_a_time_until_recorded_released_or_expired() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    let minute = 60_000;
    assert_eq!(
        a.claim_transaction("as", "t1", "a", minute).unwrap(),
        TransactionClaim::Claimed
    );
    let TransactionClaim::HeldElsewhere { until_ms } =
        b.claim_transaction("as", "t1", "b", minute).unwrap()
    else {
        panic!("b must see a's lease");
    };
    assert!(until_ms > bridgekeys_store::unix_millis());
    assert_eq!(
        a.claim_transaction("as", "t1", "a", minute).unwrap(),
        TransactionClaim::Claimed,
        "the owner renews"
    );
    // Another namespace is another transaction.
    assert_eq!(
        b.claim_transaction("other", "t1", "b", minute).unwrap(),
        TransactionClaim::Claimed
    );
    b.release_transaction("as", "t1", "b").unwrap();
    assert!(
        matches!(
            b.claim_transaction("as", "t1", "b", minute).unwrap(),
            TransactionClaim::HeldElsewhere { .. }
        ),
        "releasing someone else's lease does nothing"
    );
    a.release_transaction("as", "t1", "a").unwrap();
    assert_eq!(
        b.claim_transaction("as", "t1", "b", minute).unwrap(),
        TransactionClaim::Claimed,
        "a released lease is free at once"
    );
    durable(b.record_transaction("as", "t1")).await;
    assert!(a.transaction_completed("as", "t1").unwrap());
    assert_eq!(
        a.claim_transaction("as", "t1", "a", minute).unwrap(),
        TransactionClaim::Completed
    );
    b.release_transaction("as", "t1", "b").unwrap();
    assert!(
        a.transaction_completed("as", "t1").unwrap(),
        "releasing never undoes a completion"
    );
    // A lease of 0 ms has expired by the next claim (the database's clock
    // does not run backwards).
    assert_eq!(
        a.claim_transaction("as", "t2", "a", 0).unwrap(),
        TransactionClaim::Claimed
    );
    assert_eq!(
        b.claim_transaction("as", "t2", "b", minute).unwrap(),
        TransactionClaim::Claimed,
        "an expired lease (its owner died) is taken over"
    );
}

#[tokio::test]
async fn pruning_with_a_clock_far_ahead_removes_old_records_but_never_a_lease_still_held() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    assert_eq!(
        a.claim_transaction("as", "held", "a", 60_000).unwrap(),
        TransactionClaim::Claimed
    );
    durable(a.record_transaction("as", "done")).await;
    // A caller whose clock is a day ahead of the database's.
    let day_ahead = bridgekeys_store::unix_millis() + 86_400_000;
    let (pruned, pending) = b.prune_transactions(day_ahead).unwrap();
    pending.durable().await.unwrap();
    assert_eq!(pruned, 1, "the completion record is older than the cutoff");
    assert!(!a.transaction_completed("as", "done").unwrap());
    assert!(
        matches!(
            b.claim_transaction("as", "held", "b", 60_000).unwrap(),
            TransactionClaim::HeldElsewhere { .. }
        ),
        "a's lease runs for another minute by the database's clock"
    );
}

#[tokio::test]
async fn of_many_concurrent_claims_from_two_processes_exactly_one_gets_the_lease() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    for txn in 0..5 {
        let txn = format!("txn{txn}");
        let start = Barrier::new(8);
        let claims: Vec<TransactionClaim> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = if i % 2 == 0 { &a } else { &b };
                    let (start, txn) = (&start, &txn);
                    s.spawn(move || {
                        start.wait();
                        store
                            .claim_transaction("as", txn, &format!("owner{i}"), 60_000)
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let claimed = claims
            .iter()
            .filter(|c| **c == TransactionClaim::Claimed)
            .count();
        assert_eq!(claimed, 1, "{txn}: {claims:?}");
    }
}

#[tokio::test]
async fn what_one_process_writes_the_other_reads() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    let peer = [3; 32];
    let mut write = account(b"acct");
    write.sessions.push(SessionRecord {
        peer_key: peer,
        session_id: "s1".into(),
        last_used: 42,
        pickle: Zeroizing::new(b"pickle".to_vec()),
        version: None,
    });
    durable(a.write_device(&dev, None, write)).await;
    durable(a.write_tracked_user("@u:x", Some(b"tracked"))).await;
    durable(a.write_group_session("!r:x", "g1", b"group")).await;
    durable(a.write_room_state("!r:x", Some(b"state"))).await;
    durable(a.record_puppet(&dev)).await;
    assert!(a.create_cross_signing("@u:x", b"xs").unwrap().is_some());

    assert_eq!(
        b.load_account(&dev).unwrap().unwrap().data.as_slice(),
        b"acct"
    );
    let session = b.load_session(&dev, &peer, "s1").unwrap().unwrap();
    assert_eq!(
        (session.last_used, session.pickle.as_slice()),
        (42, &b"pickle"[..])
    );
    assert_eq!(
        b.load_tracked_user("@u:x").unwrap().unwrap().as_slice(),
        b"tracked"
    );
    assert_eq!(
        b.load_group_session("!r:x", "g1")
            .unwrap()
            .unwrap()
            .as_slice(),
        b"group"
    );
    assert_eq!(b.room_state_ids().unwrap(), vec!["!r:x".to_owned()]);
    assert!(b.contains_puppet(&dev).unwrap());
    assert!(
        b.create_cross_signing("@u:x", b"other").unwrap().is_none(),
        "the first identity stays"
    );
    assert_eq!(
        a.load_cross_signing("@u:x").unwrap().unwrap().as_slice(),
        b"xs"
    );
}

#[tokio::test]
async fn appended_keys_are_visible_here_at_return_everywhere_once_durable_and_evicted_in_order() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    durable(a.write_device(&dev, None, account(b"v1"))).await;
    let mut ids = Vec::new();
    for round in 0..20u8 {
        let first = a.reserve_key_ids(2).unwrap();
        ids.extend([first, first + 1]);
        let append = adding(vec![
            otk(first, round),
            otk(first + 1, round.wrapping_add(100)),
        ]);
        let pending = a.append_keys(&dev, append).unwrap();
        // Applied for this process when it returns, before it is durable.
        assert_eq!(
            a.one_time_key(&dev, &[round; 32]).unwrap().unwrap().key_id,
            first
        );
        assert_eq!(a.count_one_time_keys(&dev).unwrap(), ids.len());
        assert_eq!(a.oldest_one_time_keys(&dev, 100).unwrap().len(), ids.len());
        // For the other process once durable (a key is only ever used
        // after its claim was answered, which is after that).
        pending.durable().await.unwrap();
        assert_eq!(
            b.one_time_key(&dev, &[round; 32]).unwrap().unwrap().key_id,
            first
        );
        assert_eq!(b.count_one_time_keys(&dev).unwrap(), ids.len());
    }
    let oldest = b.oldest_one_time_keys(&dev, 3).unwrap();
    assert_eq!(
        oldest.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        ids[..3]
    );
    // b evicts the three oldest; b sees it at once, a once it is durable.
    let evict = evicting(oldest);
    let pending = b.append_keys(&dev, evict).unwrap();
    assert_eq!(b.count_one_time_keys(&dev).unwrap(), ids.len() - 3);
    assert_eq!(b.oldest_one_time_keys(&dev, 1).unwrap()[0].0, ids[3]);
    assert!(b.one_time_key(&dev, &[0; 32]).unwrap().is_none());
    pending.durable().await.unwrap();
    assert_eq!(a.count_one_time_keys(&dev).unwrap(), ids.len() - 3);
    assert_eq!(a.oldest_one_time_keys(&dev, 1).unwrap()[0].0, ids[3]);
    let found = a.one_time_key(&dev, &[10; 32]).unwrap().unwrap();
    assert_eq!(*found.secret_key, [10 ^ 0xff; 32]);
    // Nothing appended since the last commit: a sync needs no new one.
    let before = a.commit_stats();
    a.sync().durable().await.unwrap();
    a.sync().durable().await.unwrap();
    let after = a.commit_stats();
    assert_eq!(after.flushes, before.flushes, "{before:?} -> {after:?}");
}

/// A key id as the `key_id` column holds it (order-preserving: top bit
/// flipped).
fn key_id_column(id: u64) -> i64 {
    i64::from_be_bytes((id ^ (1 << 63)).to_be_bytes())
}

/// Insert row `(device, key_id)` in an open transaction of a raw
/// connection: a store's commit that inserts the same row waits for this
/// transaction, until the returned client rolls it back. `device` is the
/// column's bytes, read back from a row the store wrote.
async fn hold_key_row(url: &str, device: &[u8], id: u64) -> tokio_postgres::Client {
    let client = raw(url).await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "INSERT INTO bk_one_time_keys (device, key_id, public_key, sealed) \
             VALUES ($1, $2, $3, $4)",
            &[&device, &key_id_column(id), &vec![0u8; 32], &vec![0u8; 1]],
        )
        .await
        .unwrap();
    client
}

/// The `device` column of the stored keys of the device whose key has
/// public key `[fill; 32]`.
async fn device_column(url: &str, fill: u8) -> Vec<u8> {
    raw(url)
        .await
        .query_one(
            "SELECT device FROM bk_one_time_keys WHERE public_key = $1",
            &[&vec![fill; 32]],
        )
        .await
        .unwrap()
        .get(0)
}

/// Wait until some statement on the database waits for a lock (the
/// store's writer behind [`hold_key_row`]).
async fn until_a_statement_waits_for_a_lock(url: &str) {
    let watcher = raw(url).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
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
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never blocked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `load_account_counted_later` queues its statement and returns: while the
/// server holds the answer back (the accounts table locked by another
/// connection), the call has returned and its statement waits at the
/// server; once the lock goes, the answer is the device and its key count.
/// A load that blocked its caller for the round trip would not return
/// until the lock went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awaited_device_load_returns_before_the_server_answers_and_answers_when_it_does() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = Arc::new(PgStore::create(config(&url, &key)).unwrap());
    let dev = DeviceKey::new("@a:x", "D");
    durable(a.write_device(&dev, None, account(b"v1"))).await;
    let id = a.reserve_key_ids(1).unwrap();
    durable(a.append_keys(&dev, adding(vec![otk(id, 1)]))).await;

    let holder = raw(&url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE bk_accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Called on a thread of its own, so that a call that blocks cannot
    // stop this test from lifting the lock.
    let (returned, call_returned) = std::sync::mpsc::channel();
    let caller = {
        let (a, dev) = (Arc::clone(&a), dev.clone());
        std::thread::spawn(move || {
            let fetch = a.load_account_counted_later(&dev);
            let _ = returned.send(());
            fetch
        })
    };
    until_a_statement_waits_for_a_lock(&url).await;
    // The bound only matters when the call blocks (then it never returns
    // while the lock is held); one that does not returns at once.
    let in_time = call_returned.recv_timeout(std::time::Duration::from_secs(20));
    holder.batch_execute("COMMIT").await.unwrap();
    assert!(in_time.is_ok(), "the call waited for the server's answer");
    let (record, count) = caller
        .join()
        .unwrap()
        .answer()
        .await
        .unwrap()
        .expect("the device exists");
    assert_eq!(
        (record.version, record.data.as_slice(), count),
        (Version(1), b"v1".as_slice(), 1)
    );
}

/// A burst of awaited device loads, all held up at the server (the accounts
/// table locked), holds at most one connection fewer than the pool has: a
/// blocking call on another table still gets a connection and answers, and
/// every load answers once the lock goes. Without the bound the loads would
/// take every connection, and the call would wait behind them in the pool's
/// queue until the pool gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_awaited_loads_leaves_a_connection_for_every_other_call() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let mut small = config(&url, &key);
    small.pool_size = 4;
    // How long the pool lets a call wait for a connection.
    small.connect_timeout = std::time::Duration::from_secs(5);
    let a = Arc::new(PgStore::create(small).unwrap());
    let dev = DeviceKey::new("@a:x", "D");
    durable(a.write_device(&dev, None, account(b"v1"))).await;

    let holder = raw(&url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE bk_accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let loads: Vec<_> = (0..12)
        .map(|_| a.load_account_counted_later(&dev))
        .collect();
    until_a_statement_waits_for_a_lock(&url).await;
    let other = {
        let (a, dev) = (Arc::clone(&a), dev.clone());
        tokio::task::spawn_blocking(move || a.count_one_time_keys(&dev))
            .await
            .unwrap()
    };
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(other.expect("a connection was left for the call"), 0);
    for load in loads {
        let (record, count) = load.answer().await.unwrap().expect("the device exists");
        assert_eq!((record.data.as_slice(), count), (b"v1".as_slice(), 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_consumed_right_after_its_append_is_not_inserted_again_by_the_queued_commit() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = Arc::new(PgStore::create(config(&url, &key)).unwrap());
    let b = PgStore::open(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    durable(a.write_device(&dev, None, account(b"v1"))).await;
    let warm = a.reserve_key_ids(1).unwrap();
    durable(a.append_keys(&dev, adding(vec![otk(warm, 1)]))).await;
    let column = device_column(&url, 1).await;

    // The append's commit is held up by a row lock on its key...
    let id = a.reserve_key_ids(1).unwrap();
    let holder = hold_key_row(&url, &column, id).await;
    let pending = a.append_keys(&dev, adding(vec![otk(id, 7)])).unwrap();
    until_a_statement_waits_for_a_lock(&url).await;
    // ...while the key is consumed. Unordered, the delete would find no
    // row and the held-up insert would bring the key back afterwards.
    let version = a.load_account(&dev).unwrap().unwrap().version;
    let consumer = {
        let a = Arc::clone(&a);
        let dev = dev.clone();
        tokio::task::spawn_blocking(move || {
            let consume = DeviceWrite {
                remove_keys: vec![(id, [7; 32])],
                ..account(b"v2")
            };
            a.write_device(&dev, Some(version), consume)
        })
    };
    // Give an unordered consumer time to finish first (an ordered one
    // waits for the commit whatever happens here).
    for _ in 0..50 {
        if consumer.is_finished() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    consumer.await.unwrap().unwrap().durable().await.unwrap();
    pending.durable().await.unwrap();
    assert!(a.one_time_key(&dev, &[7; 32]).unwrap().is_none());
    assert!(b.one_time_key(&dev, &[7; 32]).unwrap().is_none());
    assert_eq!(
        b.count_one_time_keys(&dev).unwrap(),
        1,
        "only the first key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_and_evicted_in_one_commit_is_never_stored() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    let first = a.reserve_key_ids(1).unwrap();
    durable(a.append_keys(&dev, adding(vec![otk(first, 200)]))).await;
    let column = device_column(&url, 200).await;
    // One commit held up, so everything after it gathers in the next one.
    let held = a.reserve_key_ids(1).unwrap();
    let holder = hold_key_row(&url, &column, held).await;
    let before = a.commit_stats();
    let mut pendings = vec![a.append_keys(&dev, adding(vec![otk(held, 201)])).unwrap()];
    until_a_statement_waits_for_a_lock(&url).await;
    let mut kept = vec![first, held];
    for round in 0..40u8 {
        let id = a.reserve_key_ids(1).unwrap();
        pendings.push(a.append_keys(&dev, adding(vec![otk(id, round)])).unwrap());
        // Every other key is evicted by the next append, in the same
        // commit.
        if round % 2 == 0 {
            pendings.push(
                a.append_keys(
                    &dev,
                    KeyAppend {
                        add_keys: Vec::new(),
                        evict_keys: vec![(id, [round; 32])],
                    },
                )
                .unwrap(),
            );
        } else {
            kept.push(id);
        }
        assert_eq!(a.count_one_time_keys(&dev).unwrap(), kept.len());
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    for p in pendings {
        p.durable().await.unwrap();
    }
    let after = a.commit_stats();
    assert_eq!(
        after.flushes - before.flushes,
        2,
        "the held-up commit, then one for all 60 appends behind it"
    );
    let stored: Vec<u64> = b
        .oldest_one_time_keys(&dev, 100)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(stored, kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_caught_by_a_database_crash_all_fail_leave_nothing_behind_and_appends_go_on_after()
{
    // A server of its own: this test kills it.
    let mut server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database("failed_batch").await.unwrap();
    let key = StoreKey::generate();
    let mut cfg = config(&url, &key);
    cfg.connect_timeout = std::time::Duration::from_secs(2);
    let store = PgStore::create(cfg).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    let first = store.reserve_key_ids(1).unwrap();
    durable(store.append_keys(&dev, adding(vec![otk(first, 100)]))).await;
    let column = device_column(&url, 100).await;
    let held = store.reserve_key_ids(1).unwrap();
    let holder = hold_key_row(&url, &column, held).await;
    let mut pendings = Vec::new();
    for (i, id) in std::iter::once(held)
        .chain((0..5).map(|_| store.reserve_key_ids(1).unwrap()))
        .enumerate()
    {
        pendings.push(
            store
                .append_keys(&dev, adding(vec![otk(id, i as u8)]))
                .unwrap(),
        );
        if i == 0 {
            until_a_statement_waits_for_a_lock(&url).await;
        }
    }
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 7);

    server.kill().await.unwrap();
    drop(holder);
    for p in pendings {
        assert!(
            matches!(p.durable().await, Err(StoreError::Durability { .. })),
            "no append caught by the crash is acknowledged"
        );
    }
    server.restart().await.unwrap();
    assert_eq!(
        store.count_one_time_keys(&dev).unwrap(),
        1,
        "the failed appends left neither the database nor this process's view"
    );
    let next = store.reserve_key_ids(1).unwrap();
    durable(store.append_keys(&dev, adding(vec![otk(next, 50)]))).await;
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_share_their_flushes() {
    let (url, _server) = fresh_database().await;
    let store = PgStore::create(config(&url, &StoreKey::generate())).unwrap();
    let before = store.commit_stats();
    let pendings: Vec<Pending> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u8)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    let dev = DeviceKey::new(&format!("@t{t}:x"), "D");
                    (0..25u8)
                        .map(|i| {
                            let id = store.reserve_key_ids(1).unwrap();
                            let append = adding(vec![otk(id, i)]);
                            store.append_keys(&dev, append).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for p in pendings {
        p.durable().await.unwrap();
    }
    let after = store.commit_stats();
    let (writes, flushes) = (after.writes - before.writes, after.flushes - before.flushes);
    assert_eq!(writes, 200);
    assert!(
        flushes < writes,
        "200 concurrent claims took {flushes} flushes"
    );
    for t in 0..8u8 {
        let dev = DeviceKey::new(&format!("@t{t}:x"), "D");
        assert_eq!(store.count_one_time_keys(&dev).unwrap(), 25);
    }
}

#[tokio::test]
async fn everything_survives_dropping_and_reopening_the_store() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let dev = DeviceKey::new("@a:x", "D");
    let id = {
        let store = PgStore::create(config(&url, &key)).unwrap();
        let mut write = account(b"acct");
        write.add_keys.push(otk(5, 5));
        durable(store.write_device(&dev, None, write)).await;
        let first = store.reserve_key_ids(1).unwrap();
        // Not awaited: dropping the store commits what is queued.
        let _queued = store
            .append_keys(&dev, adding(vec![otk(first, 9)]))
            .unwrap();
        durable(store.write_sessions(
            &dev,
            SessionWrite {
                put: vec![SessionRecord {
                    peer_key: [1; 32],
                    session_id: "s".into(),
                    last_used: u64::MAX,
                    pickle: Zeroizing::new(b"p".to_vec()),
                    version: None,
                }],
                ..SessionWrite::default()
            },
        ))
        .await;
        durable(store.hold_event("!r:x", "g", "$e", Some(b"held"))).await;
        durable(store.record_transaction("as", "t")).await;
        durable(store.record_puppet(&dev)).await;
        durable(store.schedule_rotation(&dev, u64::MAX - 1, None)).await;
        store.id()
    };
    let store = PgStore::open(config(&url, &key).expect_id(id)).unwrap();
    assert_eq!(store.id(), id);
    let rec = store.load_account(&dev).unwrap().unwrap();
    assert_eq!(
        (rec.version, rec.data.as_slice()),
        (Version(1), &b"acct"[..])
    );
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 2);
    assert!(store.one_time_key(&dev, &[9; 32]).unwrap().is_some());
    assert_eq!(store.session_stamps(&dev).unwrap()[0].2, u64::MAX);
    assert_eq!(
        store.held_events(None).unwrap()[0].record.as_slice(),
        b"held"
    );
    assert!(store.transaction_completed("as", "t").unwrap());
    assert_eq!(
        store.due_rotations(u64::MAX, None, 10).unwrap(),
        vec![(dev.clone(), u64::MAX - 1)]
    );
    assert!(
        store
            .due_rotations(u64::MAX - 2, None, 10)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_store_refuses_a_wrong_key_another_id_a_missing_store_and_a_second_creation() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    assert!(matches!(
        PgStore::open(config(&url, &key)),
        Err(StoreError::Missing { .. })
    ));
    let id = PgStore::create(config(&url, &key)).unwrap().id();
    assert!(matches!(
        PgStore::create(config(&url, &key)),
        Err(StoreError::AlreadyExists { .. })
    ));
    let Err(StoreError::WrongKey { path }) = PgStore::open(config(&url, &StoreKey::generate()))
    else {
        panic!("a wrong key must be refused");
    };
    assert!(path.to_string_lossy().starts_with("postgres://"));
    let other = StoreId::generate();
    assert!(matches!(
        PgStore::open(config(&url, &key).expect_id(other)),
        Err(StoreError::Foreign { expected, found: Some(found), .. }) if expected == other && found == id
    ));
    assert_eq!(
        PgStore::open_or_create(config(&url, &key)).unwrap().id(),
        id
    );
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_build_is_refused_with_a_typed_error() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    drop(PgStore::create(config(&url, &key)).unwrap());
    raw(&url)
        .await
        .execute("INSERT INTO bk_schema_version (version) VALUES (99)", &[])
        .await
        .unwrap();
    let err = PgStore::open(config(&url, &key)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::UnsupportedSchema { found: 99, supported, .. } if supported == PG_SCHEMA_VERSION
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn processes_starting_at_once_on_an_empty_database_make_one_store() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let start = Barrier::new(4);
    let ids: Vec<StoreId> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (start, url, key) = (&start, &url, &key);
                s.spawn(move || {
                    start.wait();
                    PgStore::open_or_create(config(url, key)).unwrap().id()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let versions = raw(&url)
        .await
        .query("SELECT version FROM bk_schema_version", &[])
        .await
        .unwrap();
    assert_eq!(
        versions.len(),
        PG_SCHEMA_VERSION as usize,
        "each migration ran once"
    );
}

#[tokio::test]
async fn no_secret_reaches_the_database_in_clear() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let store = Arc::new(PgStore::create(config(&url, &key)).unwrap());
    let dev = DeviceKey::new("@a:x", "D");
    let secret = b"SECRET-PLAINTEXT-MARKER";
    let mut write = account(secret);
    write.add_keys.push(OneTimeKeyRecord {
        key_id: 1,
        public_key: [1; 32],
        secret_key: Zeroizing::new(*b"SECRET-PLAINTEXT-MARKER-32-BYTES"),
    });
    write.sessions.push(SessionRecord {
        peer_key: [2; 32],
        session_id: "s".into(),
        last_used: 1,
        pickle: Zeroizing::new(secret.to_vec()),
        version: None,
    });
    durable(store.write_device(&dev, None, write)).await;
    durable(store.write_tracked_user("@u:x", Some(secret))).await;
    durable(store.write_outbound_group_session(&dev, "!r:x", None, Some(secret))).await;
    durable(store.write_group_session("!r:x", "g", secret)).await;
    durable(store.hold_event("!r:x", "g", "$e", Some(secret))).await;
    durable(store.write_room_state("!r:x", Some(secret))).await;
    store.create_cross_signing("@u:x", secret).unwrap();
    let client = raw(&url).await;
    let tables = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_name LIKE 'bk_%'",
            &[],
        )
        .await
        .unwrap();
    let marker: String = b"SECRET-PLAINTEXT"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut rows_seen = 0;
    for table in tables {
        let table: String = table.get(0);
        let dump = client
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .unwrap();
        for row in dump {
            let text: String = row.get(0);
            rows_seen += 1;
            assert!(
                !text.contains(&marker) && !text.contains("SECRET-PLAINTEXT"),
                "{table} holds a secret in clear"
            );
        }
    }
    assert!(
        rows_seen > 10,
        "the dump saw the records ({rows_seen} rows)"
    );
}

#[tokio::test]
async fn the_rotation_schedule_lists_due_devices_in_order_behind_a_cursor() {
    let (url, _server) = fresh_database().await;
    let store = PgStore::create(config(&url, &StoreKey::generate())).unwrap();
    let devices: Vec<DeviceKey> = (0..5)
        .map(|i| DeviceKey::new(&format!("@echo_{i}:hs"), "DEV"))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        durable(store.record_puppet(d)).await;
        durable(store.schedule_rotation(d, 1_000 * (i as u64 + 1), None)).await;
    }
    durable(store.record_cross_signed(&devices[1])).await;
    let stranger = DeviceKey::new("@stranger:hs", "DEV");
    durable(store.schedule_rotation(&stranger, 0, None)).await;
    assert_eq!(
        store.due_rotations(2_000, None, 100).unwrap(),
        vec![(devices[0].clone(), 1_000), (devices[1].clone(), 2_000)]
    );
    durable(store.schedule_rotation(&devices[1], 9_000, Some(2_000))).await;
    assert!(store.is_cross_signed(&devices[1]).unwrap());
    let all: Vec<u64> = store
        .due_rotations(u64::MAX, None, 100)
        .unwrap()
        .into_iter()
        .map(|(_, due)| due)
        .collect();
    assert_eq!(all, vec![1_000, 3_000, 4_000, 5_000, 9_000]);
    let first = store.due_rotations(u64::MAX, None, 2).unwrap();
    let rest = store.due_rotations(u64::MAX, first.last(), 100).unwrap();
    assert_eq!(first.len() + rest.len(), 5);
    assert!(!rest.contains(&first[1]));
    durable(store.record_puppet(&devices[3])).await;
    assert_eq!(
        store.due_rotations(4_000, None, 100).unwrap().len(),
        3,
        "recording again keeps the schedule"
    );
    assert_eq!(store.puppets().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_populated_pg_store_holds_every_kind_of_record() {
    let (url, _server) = fresh_database().await;
    let store = PgStore::create(config(&url, &StoreKey::generate())).unwrap();
    let populated = crate::migrate::populate(&store).await;
    crate::migrate::assert_holds(&store, &populated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_copied_into_postgres_and_back_keeps_every_record_and_its_key_ids() {
    use bridgekeys_store::{
        SledStore, SledStoreConfig,
        migrate::{Export, copy},
    };
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::create(SledStoreConfig::new(
        dir.path().join("sled"),
        StoreKey::generate(),
    ))
    .unwrap();
    let populated = crate::migrate::populate(&sled).await;
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let pg = PgStore::create(config(&url, &key)).unwrap();
    let report = copy(&sled, &pg).await.unwrap();
    assert_eq!((report.accounts, report.one_time_keys), (2, 4));
    crate::migrate::assert_holds(&pg, &populated);
    let next = pg.reserve_key_ids(1).unwrap();
    assert!(next >= report.key_id_floor, "no id below the sled floor");
    let id = pg.id();
    drop(pg);

    // Reopened as another process would, then exported to a new sled store.
    let pg = PgStore::open(config(&url, &key).expect_id(id)).unwrap();
    crate::migrate::assert_holds(&pg, &populated);
    // A listing abandoned halfway leaves the store usable.
    assert!(pg.records().take(2).count() == 2);
    let back = SledStore::create(SledStoreConfig::new(
        dir.path().join("back"),
        StoreKey::generate(),
    ))
    .unwrap();
    let report = copy(&pg, &back).await.unwrap();
    assert!(
        report.key_id_floor > next,
        "the floor covers ids pg handed out"
    );
    assert_eq!(report.puppets, 2);
    crate::migrate::assert_holds(&back, &populated);
    assert!(back.reserve_key_ids(1).unwrap() > next);
}

#[tokio::test]
async fn an_unreachable_database_fails_within_the_connect_timeout_instead_of_hanging() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = PgStoreConfig::new(
        format!("postgres://nobody@127.0.0.1:{port}/nothing"),
        StoreKey::generate(),
    );
    config.connect_timeout = std::time::Duration::from_secs(2);
    let started = std::time::Instant::now();
    let err = PgStore::open(config).unwrap_err();
    assert!(matches!(err, StoreError::Engine(_)), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_killed_database_server_and_the_store_reconnects() {
    // A server of its own: this test kills it.
    let mut server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database("crash").await.unwrap();
    let key = StoreKey::generate();
    let store = PgStore::create(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    durable(store.write_device(&dev, None, account(b"acct"))).await;
    let mut pendings = Vec::new();
    let mut publics = Vec::new();
    for i in 0..40u8 {
        let id = store.reserve_key_ids(1).unwrap();
        publics.push((id, i));
        let append = adding(vec![otk(id, i)]);
        pendings.push(store.append_keys(&dev, append).unwrap());
    }
    for p in pendings {
        p.durable().await.unwrap();
    }
    durable(store.record_transaction("as", "done")).await;

    server.kill().await.unwrap();
    server.restart().await.unwrap();

    // The same store goes on once the database is back (its broken
    // connections are replaced), and sees every acknowledged write.
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 40);
    let next = store.reserve_key_ids(1).unwrap();
    let reopened = PgStore::open(config(&url, &key)).unwrap();
    for (id, fill) in publics {
        let found = reopened.one_time_key(&dev, &[fill; 32]).unwrap().unwrap();
        assert_eq!(found.key_id, id);
    }
    assert!(reopened.transaction_completed("as", "done").unwrap());
    assert!(reopened.reserve_key_ids(1).unwrap() > next, "no id repeats");
}

#[tokio::test]
async fn across_processes_the_oldest_key_is_the_first_stored_not_the_lowest_id() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let a = PgStore::create(config(&url, &key)).unwrap();
    let b = PgStore::open(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    durable(a.write_device(&dev, None, account(b"v1"))).await;
    // A takes its block first (it started first) and hands out nothing yet.
    let _ = a.reserve_key_ids(1).unwrap();
    // B hands out three keys: ids above A's whole block.
    let mut from_b = Vec::new();
    for i in 0..3u8 {
        let id = b.reserve_key_ids(1).unwrap();
        from_b.push(id);
        let append = KeyAppend {
            add_keys: vec![otk(id, i)],
            evict_keys: vec![],
        };
        durable(b.append_keys(&dev, append)).await;
    }
    // Now A hands out the newest key, with the lowest id of all.
    let newest = a.reserve_key_ids(1).unwrap();
    assert!(newest < from_b[0]);
    let append = KeyAppend {
        add_keys: vec![otk(newest, 9)],
        evict_keys: vec![],
    };
    durable(a.append_keys(&dev, append)).await;
    let oldest: Vec<u64> = b
        .oldest_one_time_keys(&dev, 4)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut expected = from_b.clone();
    expected.push(newest);
    assert_eq!(oldest, expected, "evicted first: B's keys, then A's newest");
}

/// During a rolling upgrade a process of the old schema writes sessions
/// without naming their version; the version still moves, so a process of
/// the new schema that read the session before fails its compare-and-swap
/// instead of overwriting the old process's ratchet step.
#[tokio::test]
async fn a_session_write_by_a_process_of_the_old_schema_still_moves_the_version() {
    let (url, _server) = fresh_database().await;
    let key = StoreKey::generate();
    let store = PgStore::create(config(&url, &key)).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    let session = |version, pickle: &[u8]| SessionRecord {
        peer_key: [3; 32],
        session_id: "s".into(),
        last_used: 1,
        pickle: Zeroizing::new(pickle.to_vec()),
        version,
    };
    let put = |record| SessionWrite {
        put: vec![record],
        ..SessionWrite::default()
    };
    durable(store.write_sessions(&dev, put(session(None, b"p1")))).await;
    let read = store.load_session(&dev, &[3; 32], "s").unwrap().unwrap();
    durable(store.write_outbound_group_session(&dev, "!r:x", None, Some(b"o1"))).await;
    let outbound = store
        .load_outbound_group_session(&dev, "!r:x")
        .unwrap()
        .unwrap();
    // What a schema 1 process's upserts do: the record changes, the version
    // is not named.
    let old = raw(&url).await;
    old.batch_execute(
        "UPDATE bk_olm_sessions SET last_used = last_used + 1, sealed = sealed; \
         UPDATE bk_outbound_group_sessions SET sealed = sealed",
    )
    .await
    .unwrap();
    assert!(matches!(
        store.write_sessions(&dev, put(session(read.version, b"p2"))),
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.write_outbound_group_session(&dev, "!r:x", Some(outbound.version), Some(b"o2")),
        Err(StoreError::Conflict { .. })
    ));
    // A write of this schema moves it by exactly one.
    let now = store.load_session(&dev, &[3; 32], "s").unwrap().unwrap();
    durable(store.write_sessions(&dev, put(session(now.version, b"p3")))).await;
    let after = store.load_session(&dev, &[3; 32], "s").unwrap().unwrap();
    assert_eq!(after.version.map(|v| v.0), now.version.map(|v| v.0 + 1));
}

/// A device scheduled again at the time it has (what a full rotation pass
/// does for every idle device) gets no new row version: PostgreSQL would
/// otherwise write a dead tuple and WAL for every puppet per pass. A real
/// change still lands.
#[tokio::test]
async fn scheduling_a_device_at_its_scheduled_time_again_writes_no_new_row_version() {
    let (url, _server) = fresh_database().await;
    let store = PgStore::create(config(&url, &StoreKey::generate())).unwrap();
    let dev = DeviceKey::new("@idle:x", "D");
    durable(store.record_puppet(&dev)).await;
    durable(store.schedule_rotation(&dev, 5_000, None)).await;
    let client = raw(&url).await;
    let version = || async {
        let row = client
            // The only puppet of this fresh database.
            .query_one("SELECT xmin::text, due_ms FROM bk_puppets", &[])
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, Option<i64>>(1))
    };
    let before = version().await;
    durable(store.schedule_rotation(&dev, 5_000, None)).await;
    durable(store.schedule_rotation(&dev, 5_000, Some(5_000))).await;
    assert_eq!(
        version().await,
        before,
        "the same time again wrote a row version"
    );
    durable(store.schedule_rotation(&dev, 9_000, Some(5_000))).await;
    let after = version().await;
    assert_ne!(after.0, before.0, "a new time is written");
    assert_eq!(
        store.due_rotations(u64::MAX, None, 10).unwrap(),
        vec![(dev, 9_000)]
    );
}

/// `replace_tracked_user` compares and writes in one step: a replace that
/// has to wait for the row (another process holds it) compares with what
/// that process committed, not with what it saw before waiting. Here the
/// other transaction deletes the record: the replace must write nothing. A
/// compare-then-write in two steps would have compared first, then waited
/// in its write and put the record back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_user_replace_that_waits_for_the_row_compares_with_what_was_committed_meanwhile()
{
    let (url, _server) = fresh_database().await;
    let store = Arc::new(PgStore::create(config(&url, &StoreKey::generate())).unwrap());
    durable(store.write_tracked_user("@u:hs", Some(b"one"))).await;

    let locker = raw(&url).await;
    locker
        .batch_execute("BEGIN; SELECT 1 FROM bk_tracked_users WHERE user_id = '@u:hs' FOR UPDATE")
        .await
        .unwrap();
    let replacing = Arc::clone(&store);
    let replace = tokio::task::spawn_blocking(move || {
        replacing
            .replace_tracked_user("@u:hs", Some(b"one"), Some(b"two"))
            .map(|written| written.is_some())
    });
    // Until the replace waits for the row lock: then it has read nothing
    // yet that the other transaction could change under it.
    until_a_statement_waits_for_a_lock(&url).await;
    locker
        .batch_execute("DELETE FROM bk_tracked_users WHERE user_id = '@u:hs'; COMMIT")
        .await
        .unwrap();
    assert!(
        !replace.await.unwrap().unwrap(),
        "a replace wrote over a record deleted while it waited"
    );
    assert!(store.load_tracked_user("@u:hs").unwrap().is_none());
}

/// The same for a received room key's record: what another process
/// committed while this replace waited for the row (here it deletes the
/// record) is what the replace compares with, so it writes nothing. A
/// compare-then-write in two steps would not wait at all in its compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_session_replace_that_waits_for_the_row_compares_with_what_was_committed_meanwhile()
{
    let (url, _server) = fresh_database().await;
    let store = Arc::new(PgStore::create(config(&url, &StoreKey::generate())).unwrap());
    durable(store.write_group_session("!r:x", "g", b"one")).await;

    let locker = raw(&url).await;
    locker
        .batch_execute(
            "BEGIN; SELECT 1 FROM bk_group_sessions \
             WHERE room_id = '!r:x' AND session_id = 'g' FOR UPDATE",
        )
        .await
        .unwrap();
    let replacing = Arc::clone(&store);
    let replace = tokio::task::spawn_blocking(move || {
        replacing
            .replace_group_session("!r:x", "g", Some(b"one"), b"two")
            .map(|written| written.is_some())
    });
    until_a_statement_waits_for_a_lock(&url).await;
    locker
        .batch_execute(
            "DELETE FROM bk_group_sessions WHERE room_id = '!r:x' AND session_id = 'g'; COMMIT",
        )
        .await
        .unwrap();
    assert!(
        !replace.await.unwrap().unwrap(),
        "a replace wrote over a record deleted while it waited"
    );
    assert!(store.load_group_session("!r:x", "g").unwrap().is_none());
}
