//! The [`Store`](crate::Store) contract as executable checks, for any backend.
//!
//! Each check is an `async fn` taking a fresh, empty backend and panicking
//! (an `assert!`) when the backend breaks the guarantee its name states.
//! Run them as tests with [`conformance_tests!`](crate::conformance_tests),
//! in a module of their own, with an async expression giving a fresh
//! backend per check:
//!
//! ```no_run
//! mod memory {
//!     use std::sync::Arc;
//!     use bridgekeys_store::{Backend, testing::MemoryStore};
//!
//!     bridgekeys_store::conformance_tests!(async {
//!         Arc::new(MemoryStore::new()) as Arc<dyn Backend>
//!     });
//!     bridgekeys_store::lease_conformance_tests!(async {
//!         Arc::new(MemoryStore::new()) as Arc<dyn Backend>
//!     });
//! }
//! ```
//!
//! The expression may also give `(Arc<dyn Backend>, guard)`: the guard (a
//! temporary directory, a database schema to drop) is kept until the check
//! is over and the backend dropped (see [`Fresh`]). The tests run on a
//! two-worker multi-thread Tokio runtime, so a backend may block; the
//! crate using the macros needs `tokio` (features `macros`, `rt-multi-thread`)
//! among its dev-dependencies.
//!
//! [`CHECKS`] lists what every backend must pass. [`LEASE_CHECKS`] are the
//! real transaction leases of
//! [`TransactionLog::claim_transaction`](crate::TransactionLog::claim_transaction),
//! required of a backend that several processes share (a database server);
//! a backend only one process can open (sled) keeps the trait's default,
//! which passes [`CHECKS`] but not these.
//!
//! Everything is read back through the contract itself, so a check holds for
//! every backend; what no trait call can observe (durability across a crash,
//! encryption at rest) is each backend's own tests' job.

use std::{
    collections::BTreeSet,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use zeroize::Zeroizing;

use crate::{
    Backend, Delivery, DeviceKey, DeviceWrite, FIRST_KEY_ID, IndexUse, KeyAppend, OneTimeKeyRecord,
    Pending, PuppetMark, SessionRecord, SessionWrite, StoreError, TransactionClaim, Version,
    unix_millis,
};

/// What a conformance factory gives: a fresh, empty backend, and something
/// to keep alive until the check is over (a temporary directory, a scratch
/// database). Implemented for `Arc<dyn Backend>` (nothing to keep) and for
/// `(Arc<dyn Backend>, G)`.
pub trait Fresh {
    /// What is dropped only after the check and its backend.
    type Guard;
    /// The backend to check, and the guard.
    fn into_parts(self) -> (Arc<dyn Backend>, Self::Guard);
}

impl Fresh for Arc<dyn Backend> {
    type Guard = ();
    fn into_parts(self) -> (Arc<dyn Backend>, ()) {
        (self, ())
    }
}

impl<G> Fresh for (Arc<dyn Backend>, G) {
    type Guard = G;
    fn into_parts(self) -> (Arc<dyn Backend>, G) {
        self
    }
}

/// Every check of the contract every backend must pass, by function name
/// ([`conformance_tests!`](crate::conformance_tests) runs each).
pub const CHECKS: &[&str] = &[
    "a_stale_device_write_is_a_conflict_and_changes_nothing",
    "a_device_write_lands_keys_sessions_and_delivery_together_and_moves_the_version_by_one",
    "a_device_write_removing_a_key_already_gone_still_applies",
    "a_prekey_race_has_exactly_one_winner_and_the_key_goes_once",
    "reserved_key_ids_start_at_first_key_id_increase_and_never_repeat",
    "concurrent_key_id_reservations_are_all_distinct",
    "appended_keys_are_found_counted_and_listed_oldest_first",
    "a_device_loads_with_its_key_count_in_one_call",
    "evicted_keys_are_gone_and_the_others_stay",
    "a_one_time_key_of_another_device_is_not_found",
    "a_key_index_entry_whose_record_is_gone_or_different_is_absent",
    "sessions_are_found_by_peer_stamped_replaced_and_removed",
    "a_fresh_store_has_no_legacy_sessions_and_removing_one_is_harmless",
    "a_stale_session_write_is_a_conflict_and_changes_nothing",
    "creating_a_session_that_exists_is_a_conflict",
    "concurrent_writers_of_one_session_version_have_exactly_one_winner",
    "deliveries_are_found_until_their_tag_is_forgotten",
    "tracked_users_are_replaced_and_forgotten",
    "a_tracked_user_replaced_from_a_stale_read_changes_nothing",
    "a_room_state_replaced_from_a_stale_read_changes_nothing",
    "outbound_group_sessions_are_per_device_and_room_replaced_and_discarded",
    "a_stale_outbound_group_session_write_is_a_conflict_and_changes_nothing",
    "inbound_group_sessions_are_per_room_and_session_and_replaced",
    "an_inbound_group_session_replaced_from_a_stale_read_changes_nothing",
    "a_message_index_is_first_once_then_same_event_or_other_event",
    "concurrent_first_uses_of_a_message_index_yield_exactly_one_first",
    "held_events_are_filtered_by_session_grouped_and_in_event_id_order",
    "a_held_event_replaced_from_a_stale_read_changes_nothing",
    "room_states_are_replaced_forgotten_and_listed_in_byte_order",
    "a_cross_signing_identity_is_created_once_and_never_replaced",
    "concurrent_cross_signing_creators_have_exactly_one_winner",
    "recorded_transactions_are_completed_per_namespace",
    "transactions_recorded_before_the_cutoff_are_pruned_and_newer_ones_stay",
    "a_claim_is_completed_after_record_and_claimed_before",
    "recording_a_puppet_twice_is_harmless_and_lists_it_once",
    "the_cross_signed_flag_survives_recording_again_and_rescheduling",
    "due_rotations_lists_only_due_devices_earliest_first_within_the_limit",
    "a_rotation_cursor_pages_through_every_due_entry_exactly_once",
    "rescheduling_replaces_the_old_entry_and_the_one_found",
    "scheduling_a_device_not_recorded_schedules_nothing",
    "a_device_write_with_a_puppet_mark_records_and_schedules_the_device_with_the_account",
    "a_device_write_without_a_puppet_mark_leaves_the_registry_unchanged",
    "sync_resolves_and_commit_stats_count_writes",
];

/// The checks of real transaction leases, for a backend several processes
/// share ([`lease_conformance_tests!`](crate::lease_conformance_tests) runs
/// each).
pub const LEASE_CHECKS: &[&str] = &[
    "a_lease_is_held_elsewhere_until_released_and_renewed_by_its_owner",
    "an_expired_lease_is_taken_over",
    "a_release_by_another_owner_leaves_the_lease_alone",
    "recording_a_transaction_ends_its_lease_for_everyone",
    "concurrent_claimants_exactly_one_holds_the_lease",
];

/// Expands to one `#[tokio::test]` per check of
/// [`testing::conformance::CHECKS`](crate::testing::conformance::CHECKS),
/// each on a fresh backend from `$fresh` (an async expression giving an
/// `Arc<dyn Backend>` or `(Arc<dyn Backend>, guard)`, evaluated once per
/// check), plus a test that the list it runs is the documented one.
/// Invoke it in a module of its own; see [`crate::testing::conformance`].
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:expr) => {
        $crate::__conformance_checks!(
            $fresh;
            every_conformance_check_is_run = CHECKS;
            a_stale_device_write_is_a_conflict_and_changes_nothing,
            a_device_write_lands_keys_sessions_and_delivery_together_and_moves_the_version_by_one,
            a_device_write_removing_a_key_already_gone_still_applies,
            a_prekey_race_has_exactly_one_winner_and_the_key_goes_once,
            reserved_key_ids_start_at_first_key_id_increase_and_never_repeat,
            concurrent_key_id_reservations_are_all_distinct,
            appended_keys_are_found_counted_and_listed_oldest_first,
            a_device_loads_with_its_key_count_in_one_call,
            evicted_keys_are_gone_and_the_others_stay,
            a_one_time_key_of_another_device_is_not_found,
            a_key_index_entry_whose_record_is_gone_or_different_is_absent,
            sessions_are_found_by_peer_stamped_replaced_and_removed,
            a_fresh_store_has_no_legacy_sessions_and_removing_one_is_harmless,
            a_stale_session_write_is_a_conflict_and_changes_nothing,
            creating_a_session_that_exists_is_a_conflict,
            concurrent_writers_of_one_session_version_have_exactly_one_winner,
            deliveries_are_found_until_their_tag_is_forgotten,
            tracked_users_are_replaced_and_forgotten,
            a_tracked_user_replaced_from_a_stale_read_changes_nothing,
            a_room_state_replaced_from_a_stale_read_changes_nothing,
            outbound_group_sessions_are_per_device_and_room_replaced_and_discarded,
            a_stale_outbound_group_session_write_is_a_conflict_and_changes_nothing,
            inbound_group_sessions_are_per_room_and_session_and_replaced,
            an_inbound_group_session_replaced_from_a_stale_read_changes_nothing,
            a_message_index_is_first_once_then_same_event_or_other_event,
            concurrent_first_uses_of_a_message_index_yield_exactly_one_first,
            held_events_are_filtered_by_session_grouped_and_in_event_id_order,
            a_held_event_replaced_from_a_stale_read_changes_nothing,
            room_states_are_replaced_forgotten_and_listed_in_byte_order,
            a_cross_signing_identity_is_created_once_and_never_replaced,
            concurrent_cross_signing_creators_have_exactly_one_winner,
            recorded_transactions_are_completed_per_namespace,
            transactions_recorded_before_the_cutoff_are_pruned_and_newer_ones_stay,
            a_claim_is_completed_after_record_and_claimed_before,
            recording_a_puppet_twice_is_harmless_and_lists_it_once,
            the_cross_signed_flag_survives_recording_again_and_rescheduling,
            due_rotations_lists_only_due_devices_earliest_first_within_the_limit,
            a_rotation_cursor_pages_through_every_due_entry_exactly_once,
            rescheduling_replaces_the_old_entry_and_the_one_found,
            scheduling_a_device_not_recorded_schedules_nothing,
            a_device_write_with_a_puppet_mark_records_and_schedules_the_device_with_the_account,
            a_device_write_without_a_puppet_mark_leaves_the_registry_unchanged,
            sync_resolves_and_commit_stats_count_writes,
        );
    };
}

/// Expands to one `#[tokio::test]` per check of
/// [`testing::conformance::LEASE_CHECKS`](crate::testing::conformance::LEASE_CHECKS),
/// like [`conformance_tests!`](crate::conformance_tests): for a backend
/// several processes share, whose leases must be real.
#[macro_export]
macro_rules! lease_conformance_tests {
    ($fresh:expr) => {
        $crate::__conformance_checks!(
            $fresh;
            every_lease_check_is_run = LEASE_CHECKS;
            a_lease_is_held_elsewhere_until_released_and_renewed_by_its_owner,
            an_expired_lease_is_taken_over,
            a_release_by_another_owner_leaves_the_lease_alone,
            recording_a_transaction_ends_its_lease_for_everyone,
            concurrent_claimants_exactly_one_holds_the_lease,
        );
    };
}

/// The expansion shared by the conformance macros (not a public interface).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_checks {
    ($fresh:expr; $listed:ident = $list:ident; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (backend, guard) =
                    $crate::testing::conformance::Fresh::into_parts($fresh.await);
                $crate::testing::conformance::$check(backend).await;
                drop(guard);
            }
        )*

        #[test]
        fn $listed() {
            assert_eq!(
                [$(stringify!($check)),*].as_slice(),
                $crate::testing::conformance::$list,
                "the macro and the documented list of checks differ"
            );
        }
    };
}

// ---------------------------------------------------------------------------
// Helpers

fn device(user: &str, id: &str) -> DeviceKey {
    DeviceKey::new(user, id)
}

fn account(bytes: &[u8]) -> DeviceWrite {
    DeviceWrite {
        account: Zeroizing::new(bytes.to_vec()),
        ..DeviceWrite::default()
    }
}

fn otk(key_id: u64, fill: u8) -> OneTimeKeyRecord {
    OneTimeKeyRecord {
        key_id,
        public_key: [fill; 32],
        secret_key: Zeroizing::new([fill ^ 0xff; 32]),
    }
}

/// A new session (not stored yet: its write creates it).
fn session(peer: u8, id: &str, last_used: u64, pickle: &[u8]) -> SessionRecord {
    SessionRecord {
        peer_key: [peer; 32],
        session_id: id.into(),
        last_used,
        pickle: Zeroizing::new(pickle.to_vec()),
        version: None,
    }
}

/// A session as read at `version`: its write replaces that version.
fn session_at(version: u64, peer: u8, id: &str, last_used: u64, pickle: &[u8]) -> SessionRecord {
    SessionRecord {
        version: Some(Version(version)),
        ..session(peer, id, last_used, pickle)
    }
}

/// A stored session's version and pickle, or `None`.
fn stored_session(
    backend: &Arc<dyn Backend>,
    dev: &DeviceKey,
    peer: u8,
    id: &str,
) -> Option<(Option<Version>, Vec<u8>)> {
    backend
        .load_session(dev, &[peer; 32], id)
        .expect("read session")
        .map(|s| (s.version, s.pickle.to_vec()))
}

/// A stored outbound group session's version and record, or `None`.
fn stored_outbound(
    backend: &Arc<dyn Backend>,
    dev: &DeviceKey,
    room: &str,
) -> Option<(Version, Vec<u8>)> {
    backend
        .load_outbound_group_session(dev, room)
        .expect("read outbound session")
        .map(|r| (r.version, r.data.to_vec()))
}

fn is_conflict(result: &Result<Pending, StoreError>, want: (Option<u64>, Option<u64>)) -> bool {
    matches!(
        result,
        Err(StoreError::Conflict { expected, found })
            if *expected == want.0.map(Version) && *found == want.1.map(Version)
    )
}

fn delivery(tag: &str, message: &[u8], record: &[u8]) -> Delivery {
    Delivery {
        tag: tag.into(),
        message: message.to_vec(),
        record: Zeroizing::new(record.to_vec()),
    }
}

/// Wait until an accepted write is durable; panics naming `what` otherwise.
async fn durable(what: &str, write: Result<Pending, StoreError>) {
    match write {
        Ok(pending) => {
            if let Err(e) = pending.durable().await {
                panic!("{what}: not durable: {e}");
            }
        }
        Err(e) => panic!("{what}: refused: {e}"),
    }
}

/// The bytes of an optional record, for comparisons.
fn bytes(record: Option<Zeroizing<Vec<u8>>>) -> Option<Vec<u8>> {
    record.map(|r| r.to_vec())
}

/// The device's version as its record says, checked against
/// [`Store::account_version`](crate::Store::account_version) (every check
/// that reads a version checks that too).
fn version(backend: &Arc<dyn Backend>, dev: &DeviceKey) -> Option<Version> {
    let loaded = backend
        .load_account(dev)
        .expect("load account")
        .map(|a| a.version);
    assert_eq!(
        backend.account_version(dev).expect("account version"),
        loaded,
        "account_version differs from the record's version"
    );
    loaded
}

/// Run `f(i)` for `i` in `0..n` on `n` blocking threads released together,
/// and collect the results in order: the closest a test gets to `n` callers
/// arriving at once.
async fn all_at_once<T, F>(n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    let start = Arc::new(Barrier::new(n));
    let f = Arc::new(f);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (start, f) = (Arc::clone(&start), Arc::clone(&f));
            tokio::task::spawn_blocking(move || {
                start.wait();
                f(i)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.expect("a concurrent caller panicked"));
    }
    out
}

fn is_first(u: &IndexUse) -> bool {
    matches!(u, IndexUse::First)
}

// ---------------------------------------------------------------------------
// Devices and one-time keys

/// [`Store::write_device`](crate::Store::write_device) is compare-and-swap:
/// a write naming a version that is not the stored one (stale, from the
/// future, or `None` for an existing device) fails with
/// [`StoreError::Conflict`] naming both versions, and changes nothing (not
/// the account, not its keys, sessions or delivery).
pub async fn a_stale_device_write_is_a_conflict_and_changes_nothing(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    assert!(
        backend.load_account(&dev).expect("load").is_none(),
        "a fresh store has no account"
    );
    assert_eq!(version(&backend, &dev), None);
    let conflict = backend.write_device(&dev, Some(Version(1)), account(b"ghost"));
    assert!(
        matches!(
            conflict,
            Err(StoreError::Conflict {
                expected: Some(Version(1)),
                found: None
            })
        ),
        "writing a missing device at version 1 must conflict with found None"
    );
    durable("create", backend.write_device(&dev, None, account(b"v1"))).await;
    durable(
        "update",
        backend.write_device(&dev, Some(Version(1)), account(b"v2")),
    )
    .await;

    let mut stale = account(b"stale");
    stale.add_keys.push(otk(FIRST_KEY_ID, 7));
    stale.sessions.push(session(1, "s", 1, b"p"));
    stale.delivery = Some(delivery("txn", b"m", b"r"));
    let err = backend.write_device(&dev, Some(Version(1)), stale).err();
    assert!(
        matches!(
            err,
            Some(StoreError::Conflict {
                expected: Some(Version(1)),
                found: Some(Version(2))
            })
        ),
        "a stale version must conflict naming expected 1 and found 2, got {err:?}"
    );
    let err = backend.write_device(&dev, None, account(b"recreate")).err();
    assert!(
        matches!(
            err,
            Some(StoreError::Conflict {
                expected: None,
                found: Some(Version(2))
            })
        ),
        "creating an existing device must conflict, got {err:?}"
    );

    let rec = backend.load_account(&dev).expect("load").expect("account");
    assert_eq!(rec.version, Version(2));
    assert_eq!(
        rec.data.as_slice(),
        b"v2",
        "a refused write changed the account"
    );
    assert!(
        backend
            .one_time_key(&dev, &[7; 32])
            .expect("read")
            .is_none(),
        "a refused write added a key"
    );
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 0);
    assert!(
        backend
            .load_session(&dev, &[1; 32], "s")
            .expect("read")
            .is_none(),
        "a refused write added a session"
    );
    assert!(
        backend
            .load_delivery(&dev, "txn", b"m")
            .expect("read")
            .is_none(),
        "a refused write left a delivery"
    );
}

/// A device write lands whole: the account, the keys added and removed, the
/// sessions stored and removed and the delivery are all visible once it
/// returns, and the version moves by exactly one per write.
pub async fn a_device_write_lands_keys_sessions_and_delivery_together_and_moves_the_version_by_one(
    backend: Arc<dyn Backend>,
) {
    let dev = device("@a:hs", "DEV");
    let mut first = account(b"one");
    first.add_keys = vec![otk(1, 1), otk(2, 2), otk(3, 3)];
    first.sessions = vec![session(9, "old", 5, b"old pickle")];
    durable("create", backend.write_device(&dev, None, first)).await;
    assert_eq!(version(&backend, &dev), Some(Version(1)));
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 3);

    let mut second = account(b"two");
    second.remove_keys = vec![(1, [1; 32])];
    second.add_keys = vec![otk(4, 4)];
    second.sessions = vec![session(7, "sess", 11, b"pickle")];
    second.remove_sessions = vec![([9; 32], "old".into())];
    second.delivery = Some(delivery("txn1", b"message", b"plaintext"));
    // Visible when the call returns, before durability is awaited.
    let pending = backend
        .write_device(&dev, Some(Version(1)), second)
        .expect("write");
    let rec = backend.load_account(&dev).expect("load").expect("account");
    assert_eq!(
        (rec.version, rec.data.as_slice()),
        (Version(2), &b"two"[..]),
        "the version moves by one and the account is replaced"
    );
    pending.durable().await.expect("durable");

    assert!(
        backend
            .one_time_key(&dev, &[1; 32])
            .expect("read")
            .is_none()
    );
    let k2 = backend
        .one_time_key(&dev, &[2; 32])
        .expect("read")
        .expect("key 2 stays");
    assert_eq!((k2.key_id, *k2.secret_key), (2, [2 ^ 0xff; 32]));
    assert!(
        backend
            .one_time_key(&dev, &[4; 32])
            .expect("read")
            .is_some()
    );
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 3);
    let s = backend
        .load_session(&dev, &[7; 32], "sess")
        .expect("read")
        .expect("the new session");
    assert_eq!((s.last_used, s.pickle.as_slice()), (11, &b"pickle"[..]));
    assert!(
        backend
            .load_session(&dev, &[9; 32], "old")
            .expect("read")
            .is_none(),
        "the removed session stays removed"
    );
    assert_eq!(
        bytes(
            backend
                .load_delivery(&dev, "txn1", b"message")
                .expect("read")
        ),
        Some(b"plaintext".to_vec())
    );
    durable(
        "third",
        backend.write_device(&dev, Some(Version(2)), account(b"three")),
    )
    .await;
    assert_eq!(version(&backend, &dev), Some(Version(3)));
}

/// Removing a one-time key that is already gone (a claim evicted it with
/// [`Store::append_keys`](crate::Store::append_keys), which does not move
/// the version) is no error: the rest of the write applies.
pub async fn a_device_write_removing_a_key_already_gone_still_applies(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    let mut create = account(b"one");
    create.add_keys = vec![otk(1, 1), otk(2, 2)];
    durable("create", backend.write_device(&dev, None, create)).await;
    durable(
        "evict",
        backend.append_keys(
            &dev,
            KeyAppend {
                add_keys: Vec::new(),
                evict_keys: vec![(1, [1; 32])],
            },
        ),
    )
    .await;
    let mut write = account(b"two");
    write.remove_keys = vec![(1, [1; 32]), (2, [2; 32])];
    write.sessions = vec![session(3, "s", 1, b"p")];
    durable(
        "remove a gone key",
        backend.write_device(&dev, Some(Version(1)), write),
    )
    .await;
    assert_eq!(version(&backend, &dev), Some(Version(2)));
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 0);
    assert!(
        backend
            .load_session(&dev, &[3; 32], "s")
            .expect("read")
            .is_some()
    );
}

/// Two decryptions of pre-key messages for the same one-time key, racing:
/// both read version `v` and write with it, removing the key. Exactly one
/// write succeeds, the other gets [`StoreError::Conflict`] (so it re-reads
/// and finds the key gone), and the key is removed once, the other keys
/// untouched. Repeated over several devices so a lost race is likely to
/// show.
pub async fn a_prekey_race_has_exactly_one_winner_and_the_key_goes_once(backend: Arc<dyn Backend>) {
    for round in 0..16u8 {
        let dev = device("@race:hs", &format!("DEV{round}"));
        let mut create = account(b"v1");
        create.add_keys = vec![otk(1, 1), otk(2, 2)];
        durable("create", backend.write_device(&dev, None, create)).await;
        let read = version(&backend, &dev).expect("created");
        let shared = Arc::clone(&backend);
        let writer = dev.clone();
        let outcomes = all_at_once(2, move |i| {
            let mut w = account(format!("consumed by {i}").as_bytes());
            w.remove_keys = vec![(1, [1; 32])];
            w.sessions = vec![session(10 + i as u8, "new", 1, b"p")];
            shared.write_device(&writer, Some(read), w).map(|_| ())
        })
        .await;
        let winners: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_ok())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let winner = winners[0];
        let loser = &outcomes[1 - winner];
        assert!(
            matches!(
                loser,
                Err(StoreError::Conflict { expected, found: Some(_) }) if *expected == Some(read)
            ),
            "round {round}: the loser must conflict, got {loser:?}"
        );
        let rec = backend.load_account(&dev).expect("load").expect("account");
        assert_eq!(rec.version, Version::next(Some(read)), "one write landed");
        assert_eq!(
            rec.data.as_slice(),
            format!("consumed by {winner}").as_bytes()
        );
        assert!(
            backend
                .one_time_key(&dev, &[1; 32])
                .expect("read")
                .is_none()
        );
        assert!(
            backend
                .one_time_key(&dev, &[2; 32])
                .expect("read")
                .is_some()
        );
        assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 1);
        let loser_session = [10 + (1 - winner) as u8; 32];
        assert!(
            backend
                .load_session(&dev, &loser_session, "new")
                .expect("read")
                .is_none(),
            "round {round}: the losing write left its session"
        );
    }
}

/// [`Store::reserve_key_ids`](crate::Store::reserve_key_ids) hands out ids
/// at or above [`FIRST_KEY_ID`] (clear of vodozemac's own counter),
/// increasing, never one twice.
pub async fn reserved_key_ids_start_at_first_key_id_increase_and_never_repeat(
    backend: Arc<dyn Backend>,
) {
    let mut seen = BTreeSet::new();
    let mut last_end = FIRST_KEY_ID;
    for count in [1u64, 3, 1, 50, 2, 1000, 1] {
        let first = backend.reserve_key_ids(count).expect("reserve");
        assert!(
            first >= last_end,
            "id {first} is below an earlier reservation's end {last_end}"
        );
        for id in first..first + count {
            assert!(seen.insert(id), "id {id} reserved twice");
        }
        last_end = first + count;
    }
    assert_eq!(seen.len(), 1058);
}

/// Reservations from many threads at once never overlap, and each
/// thread's own reservations increase.
pub async fn concurrent_key_id_reservations_are_all_distinct(backend: Arc<dyn Backend>) {
    const THREADS: usize = 8;
    const EACH: u64 = 40;
    let shared = Arc::clone(&backend);
    let ranges = all_at_once(THREADS, move |t| {
        let mut mine = Vec::new();
        for n in 0..EACH {
            let count = 1 + (n + t as u64) % 4;
            let first = shared.reserve_key_ids(count).expect("reserve");
            mine.push((first, count));
        }
        mine
    })
    .await;
    let mut seen = BTreeSet::new();
    for (t, mine) in ranges.iter().enumerate() {
        for pair in mine.windows(2) {
            assert!(
                pair[1].0 >= pair[0].0 + pair[0].1,
                "thread {t}: ids went backwards: {pair:?}"
            );
        }
        for &(first, count) in mine {
            assert!(first >= FIRST_KEY_ID);
            for id in first..first + count {
                assert!(seen.insert(id), "id {id} reserved twice");
            }
        }
    }
}

/// Keys added with [`Store::append_keys`](crate::Store::append_keys) are
/// found by public key (with their secret), counted, and listed oldest
/// first (in the order they were stored, which in one process is also
/// increasing id order), up to the limit, once the append is durable; the
/// account is not touched.
pub async fn appended_keys_are_found_counted_and_listed_oldest_first(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    durable("create", backend.write_device(&dev, None, account(b"v1"))).await;
    durable(
        "append",
        backend.append_keys(
            &dev,
            KeyAppend {
                add_keys: vec![otk(7, 1), otk(8, 4), otk(9, 2)],
                evict_keys: Vec::new(),
            },
        ),
    )
    .await;
    durable(
        "append more",
        backend.append_keys(
            &dev,
            KeyAppend {
                add_keys: vec![otk(300, 3)],
                evict_keys: Vec::new(),
            },
        ),
    )
    .await;
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 4);
    let k = backend
        .one_time_key(&dev, &[2; 32])
        .expect("read")
        .expect("found by public key");
    assert_eq!(
        (k.key_id, k.public_key, *k.secret_key),
        (9, [2; 32], [2 ^ 0xff; 32])
    );
    assert_eq!(
        backend.oldest_one_time_keys(&dev, 3).expect("oldest"),
        vec![(7, [1; 32]), (8, [4; 32]), (9, [2; 32])]
    );
    assert_eq!(
        backend
            .oldest_one_time_keys(&dev, 100)
            .expect("oldest")
            .len(),
        4
    );
    assert!(
        backend
            .oldest_one_time_keys(&dev, 0)
            .expect("oldest")
            .is_empty()
    );
    assert!(
        backend
            .one_time_key(&dev, &[5; 32])
            .expect("read")
            .is_none()
    );
    assert_eq!(
        version(&backend, &dev),
        Some(Version(1)),
        "an append does not touch the account"
    );
}

/// [`Store::load_account_counted`](crate::Store::load_account_counted)
/// answers what `load_account` and `count_one_time_keys` answer: nothing for
/// a device never created, the
/// record and its key count otherwise, keys appended and not yet durable
/// included (they are visible when the append returns), evicted ones and
/// other devices' keys not. Its awaitable form,
/// [`Store::load_account_counted_later`](crate::Store::load_account_counted_later),
/// answers the same at every step, and so does
/// [`Store::load_account_later`](crate::Store::load_account_later) for the
/// record alone. (PostgreSQL answers the step with an
/// append in flight through its blocking load, so there the awaited
/// statement is compared on the steps without one.)
pub async fn a_device_loads_with_its_key_count_in_one_call(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    let other = device("@a:hs", "OTHER");
    assert!(backend.load_account_counted(&dev).expect("load").is_none());
    assert!(
        backend
            .load_account_counted_later(&dev)
            .answer()
            .await
            .expect("load later")
            .is_none()
    );
    assert!(
        backend
            .load_account_later(&dev)
            .answer()
            .await
            .expect("load record later")
            .is_none()
    );
    durable("create", backend.write_device(&dev, None, account(b"v1"))).await;
    durable(
        "create other",
        backend.write_device(&other, None, account(b"o1")),
    )
    .await;
    async fn both(backend: &Arc<dyn Backend>, dev: &DeviceKey) -> usize {
        let (record, count) = backend
            .load_account_counted(dev)
            .expect("load")
            .expect("created");
        let alone = backend.load_account(dev).expect("load").expect("created");
        assert_eq!(
            (record.version, record.data.as_slice()),
            (alone.version, alone.data.as_slice())
        );
        assert_eq!(count, backend.count_one_time_keys(dev).expect("count"));
        let (later, later_count) = backend
            .load_account_counted_later(dev)
            .answer()
            .await
            .expect("load later")
            .expect("created");
        assert_eq!(
            (later.version, later.data.as_slice(), later_count),
            (alone.version, alone.data.as_slice(), count),
            "the awaited load answers as the blocking one"
        );
        let record_later = backend
            .load_account_later(dev)
            .answer()
            .await
            .expect("load record later")
            .expect("created");
        assert_eq!(
            (record_later.version, record_later.data.as_slice()),
            (alone.version, alone.data.as_slice()),
            "the awaited record answers as the blocking one"
        );
        count
    }
    assert_eq!(both(&backend, &dev).await, 0);
    durable(
        "append other",
        backend.append_keys(
            &other,
            KeyAppend {
                add_keys: vec![otk(5, 9)],
                evict_keys: Vec::new(),
            },
        ),
    )
    .await;
    durable(
        "append",
        backend.append_keys(
            &dev,
            KeyAppend {
                add_keys: vec![otk(7, 1), otk(8, 2)],
                evict_keys: Vec::new(),
            },
        ),
    )
    .await;
    assert_eq!(
        both(&backend, &dev).await,
        2,
        "another device's key is not counted"
    );
    // Not awaited: visible at return.
    let pending = backend
        .append_keys(
            &dev,
            KeyAppend {
                add_keys: vec![otk(9, 3), otk(10, 4)],
                evict_keys: vec![(7, [1; 32])],
            },
        )
        .expect("append");
    assert_eq!(
        both(&backend, &dev).await,
        3,
        "two added, one evicted, not yet durable"
    );
    durable("the append lands", Ok(pending)).await;
    assert_eq!(both(&backend, &dev).await, 3);
    // A rewritten account: every form answers the new version and bytes.
    let version = backend
        .load_account(&dev)
        .expect("load")
        .expect("created")
        .version;
    durable(
        "rewrite",
        backend.write_device(&dev, Some(version), account(b"v2")),
    )
    .await;
    assert_eq!(both(&backend, &dev).await, 3);
    let rewritten = backend
        .load_account_later(&dev)
        .answer()
        .await
        .expect("load record later")
        .expect("created");
    assert_ne!(rewritten.version, version, "the new version");
    assert_eq!(rewritten.data.as_slice(), b"v2");
}

/// Keys evicted by an append are gone (not found, not counted, not
/// listed); the keys it added and the others stay.
pub async fn evicted_keys_are_gone_and_the_others_stay(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    durable(
        "append",
        backend.append_keys(
            &dev,
            KeyAppend {
                add_keys: vec![otk(1, 1), otk(2, 2), otk(3, 3)],
                evict_keys: Vec::new(),
            },
        ),
    )
    .await;
    durable(
        "evict",
        backend.append_keys(
            &dev,
            KeyAppend {
                add_keys: vec![otk(4, 4)],
                evict_keys: vec![(1, [1; 32]), (2, [2; 32])],
            },
        ),
    )
    .await;
    assert!(
        backend
            .one_time_key(&dev, &[1; 32])
            .expect("read")
            .is_none()
    );
    assert!(
        backend
            .one_time_key(&dev, &[2; 32])
            .expect("read")
            .is_none()
    );
    assert!(
        backend
            .one_time_key(&dev, &[3; 32])
            .expect("read")
            .is_some()
    );
    assert!(
        backend
            .one_time_key(&dev, &[4; 32])
            .expect("read")
            .is_some()
    );
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 2);
    assert_eq!(
        backend.oldest_one_time_keys(&dev, 10).expect("oldest"),
        vec![(3, [3; 32]), (4, [4; 32])]
    );
}

/// Keys belong to one device: another device (also one whose ids are a
/// prefix of, or extend, the first's) neither finds, counts nor lists them.
pub async fn a_one_time_key_of_another_device_is_not_found(backend: Arc<dyn Backend>) {
    let a = device("@a:x", "D");
    let others = [
        device("@a:x", "DD"),
        device("@a:xD", ""),
        device("@a:", "xD"),
    ];
    let mut w = account(b"a");
    w.add_keys = vec![otk(1, 1)];
    durable("create", backend.write_device(&a, None, w)).await;
    for other in &others {
        durable(
            "append to the other",
            backend.append_keys(
                other,
                KeyAppend {
                    add_keys: vec![otk(2, 2)],
                    evict_keys: Vec::new(),
                },
            ),
        )
        .await;
    }
    for other in &others {
        assert!(
            backend
                .one_time_key(other, &[1; 32])
                .expect("read")
                .is_none(),
            "{other:?} found a key of {a:?}"
        );
        assert_eq!(backend.count_one_time_keys(other).expect("count"), 1);
        assert_eq!(
            backend.oldest_one_time_keys(other, 10).expect("oldest"),
            vec![(2, [2; 32])]
        );
    }
    assert!(backend.one_time_key(&a, &[2; 32]).expect("read").is_none());
    assert_eq!(backend.count_one_time_keys(&a).expect("count"), 1);
}

/// A public key is found only while the record of its key id holds that
/// key: removing the id under another public key, or storing another key
/// under the id, leaves the old public key absent (the contract of
/// [`Store::append_keys`](crate::Store::append_keys): an index entry whose
/// record is missing or different is not a key; after a crash such entries
/// exist).
pub async fn a_key_index_entry_whose_record_is_gone_or_different_is_absent(
    backend: Arc<dyn Backend>,
) {
    let dev = device("@a:hs", "DEV");
    let append = |add_keys, evict_keys| KeyAppend {
        add_keys,
        evict_keys,
    };
    durable(
        "append",
        backend.append_keys(&dev, append(vec![otk(1, 1), otk(2, 2)], Vec::new())),
    )
    .await;
    // Key 1's record goes under another public key: its own stays indexed.
    durable(
        "evict",
        backend.append_keys(&dev, append(Vec::new(), vec![(1, [9; 32])])),
    )
    .await;
    assert!(
        backend
            .one_time_key(&dev, &[1; 32])
            .expect("read")
            .is_none(),
        "found a key whose record is gone"
    );
    // Id 2 now holds another key: the old public key is not that key.
    durable(
        "overwrite",
        backend.append_keys(&dev, append(vec![otk(2, 3)], Vec::new())),
    )
    .await;
    assert!(
        backend
            .one_time_key(&dev, &[2; 32])
            .expect("read")
            .is_none(),
        "found a key by a public key its id no longer holds"
    );
    let k = backend
        .one_time_key(&dev, &[3; 32])
        .expect("read")
        .expect("the key now under id 2");
    assert_eq!((k.key_id, *k.secret_key), (2, [3 ^ 0xff; 32]));
    assert_eq!(
        backend.oldest_one_time_keys(&dev, 10).expect("oldest"),
        vec![(2, [3; 32])]
    );
    assert_eq!(backend.count_one_time_keys(&dev).expect("count"), 1);
}

// ---------------------------------------------------------------------------
// Olm sessions and deliveries

/// Sessions are found by device and peer (and by id), stamped with their
/// last use, replaced by a write of the same id, removed, and kept apart
/// per device.
pub async fn sessions_are_found_by_peer_stamped_replaced_and_removed(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    let other = device("@a:hs", "DEV2");
    durable(
        "put",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![
                    session(1, "s1", 10, b"p1"),
                    session(1, "s2", 20, b"p2"),
                    session(2, "s3", 30, b"p3"),
                ],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    durable(
        "other device",
        backend.write_sessions(
            &other,
            SessionWrite {
                put: vec![session(1, "x", 1, b"px")],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    let ids = |peer: u8| -> BTreeSet<String> {
        backend
            .sessions(&dev, &[peer; 32])
            .expect("sessions")
            .into_iter()
            .map(|s| {
                assert_eq!(s.peer_key, [peer; 32]);
                s.session_id
            })
            .collect()
    };
    assert_eq!(ids(1), BTreeSet::from(["s1".to_owned(), "s2".to_owned()]));
    assert_eq!(ids(2), BTreeSet::from(["s3".to_owned()]));
    assert!(ids(3).is_empty());
    let stamps: BTreeSet<_> = backend
        .session_stamps(&dev)
        .expect("stamps")
        .into_iter()
        .collect();
    assert_eq!(
        stamps,
        BTreeSet::from([
            ([1; 32], "s1".to_owned(), 10),
            ([1; 32], "s2".to_owned(), 20),
            ([2; 32], "s3".to_owned(), 30),
        ])
    );
    let s = backend
        .load_session(&dev, &[1; 32], "s2")
        .expect("read")
        .expect("s2");
    assert_eq!(
        (s.last_used, s.pickle.as_slice(), s.version),
        (20, &b"p2"[..], Some(Version(1))),
        "a created session is at version 1"
    );
    assert!(
        backend
            .load_session(&dev, &[2; 32], "s2")
            .expect("read")
            .is_none(),
        "a session is found only under its own peer"
    );

    durable(
        "replace and remove",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session_at(1, 1, "s2", 25, b"p2 ratcheted")],
                remove: vec![([1; 32], "s1".into()), ([2; 32], "missing".into())],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    assert!(
        backend
            .load_session(&dev, &[1; 32], "s1")
            .expect("read")
            .is_none()
    );
    let s = backend
        .load_session(&dev, &[1; 32], "s2")
        .expect("read")
        .expect("s2");
    assert_eq!(
        (s.last_used, s.pickle.as_slice(), s.version),
        (25, &b"p2 ratcheted"[..], Some(Version(2))),
        "replaced, one version further"
    );
    assert_eq!(backend.session_stamps(&dev).expect("stamps").len(), 2);
    assert_eq!(
        backend.session_stamps(&other).expect("stamps"),
        vec![([1; 32], "x".to_owned(), 1)]
    );
}

/// A store that never held schema 1 sessions lists none, and a session
/// write naming one to remove (the manager's migration) still applies.
pub async fn a_fresh_store_has_no_legacy_sessions_and_removing_one_is_harmless(
    backend: Arc<dyn Backend>,
) {
    let dev = device("@a:hs", "DEV");
    assert!(backend.legacy_sessions(&dev).expect("legacy").is_empty());
    durable(
        "migrate",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session(1, "s", 1, b"p")],
                remove_legacy: vec!["s".into()],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    assert!(
        backend
            .load_session(&dev, &[1; 32], "s")
            .expect("read")
            .is_some()
    );
    assert!(backend.legacy_sessions(&dev).expect("legacy").is_empty());
}

/// A session write is compare-and-swap on each session's version: one
/// stale session (or one from the future) and the whole write fails with
/// [`StoreError::Conflict`] naming that session's versions, and nothing of
/// it is applied: not the other sessions it creates, replaces or removes,
/// not its delivery record. A device write carrying a stale session is
/// refused the same way, its account and keys untouched.
pub async fn a_stale_session_write_is_a_conflict_and_changes_nothing(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    durable(
        "create",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session(1, "s", 1, b"v1"), session(2, "other", 1, b"o1")],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    durable(
        "advance",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session_at(1, 1, "s", 2, b"v2")],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    for stale in [1, 3, 0] {
        let result = backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![
                    session_at(1, 2, "other", 5, b"o2"),
                    session(3, "new", 5, b"n1"),
                    session_at(stale, 1, "s", 5, b"lost race"),
                ],
                remove: vec![([2; 32], "gone?".into())],
                delivery: Some(delivery("txn", b"m", b"result")),
                ..SessionWrite::default()
            },
        );
        assert!(
            is_conflict(&result, (Some(stale), Some(2))),
            "version {stale}: {:?}",
            result.err()
        );
        assert_eq!(
            stored_session(&backend, &dev, 1, "s"),
            Some((Some(Version(2)), b"v2".to_vec()))
        );
        assert_eq!(
            stored_session(&backend, &dev, 2, "other"),
            Some((Some(Version(1)), b"o1".to_vec())),
            "another session of the refused write was replaced"
        );
        assert_eq!(
            stored_session(&backend, &dev, 3, "new"),
            None,
            "a session of the refused write was created"
        );
        assert!(
            backend
                .load_delivery(&dev, "txn", b"m")
                .expect("read")
                .is_none(),
            "the refused write's delivery record was kept"
        );
    }
    // Removing the session in the same write does not make a stale
    // replace of it current: the replace then finds nothing.
    let result = backend.write_sessions(
        &dev,
        SessionWrite {
            put: vec![session_at(1, 2, "other", 5, b"o2")],
            remove: vec![([2; 32], "other".into())],
            ..SessionWrite::default()
        },
    );
    assert!(is_conflict(&result, (Some(1), None)), "{:?}", result.err());
    assert_eq!(
        stored_session(&backend, &dev, 2, "other"),
        Some((Some(Version(1)), b"o1".to_vec())),
        "the removal of a refused write was applied"
    );

    durable(
        "account",
        backend.write_device(&dev, None, account(b"acct")),
    )
    .await;
    let mut with_key = account(b"acct");
    with_key.add_keys = vec![otk(FIRST_KEY_ID, 7)];
    durable(
        "key",
        backend.write_device(&dev, Some(Version(1)), with_key),
    )
    .await;
    let mut w = account(b"acct 3");
    w.remove_keys = vec![(FIRST_KEY_ID, [7; 32])];
    w.sessions = vec![session_at(1, 1, "s", 9, b"lost race")];
    w.delivery = Some(delivery("txn", b"m", b"result"));
    let result = backend.write_device(&dev, Some(Version(2)), w);
    assert!(
        is_conflict(&result, (Some(1), Some(2))),
        "{:?}",
        result.err()
    );
    assert_eq!(version(&backend, &dev), Some(Version(2)), "account moved");
    assert_eq!(
        bytes(backend.load_account(&dev).expect("read").map(|a| a.data)),
        Some(b"acct".to_vec())
    );
    assert!(
        backend
            .one_time_key(&dev, &[7; 32])
            .expect("read")
            .is_some(),
        "the key of a refused device write was removed"
    );
    assert_eq!(
        stored_session(&backend, &dev, 1, "s"),
        Some((Some(Version(2)), b"v2".to_vec()))
    );
    assert!(
        backend
            .load_delivery(&dev, "txn", b"m")
            .expect("read")
            .is_none()
    );
}

/// Creating a session (version `None`) that already exists is a
/// [`StoreError::Conflict`] naming the stored version, in a session write
/// and in a device write alike, and changes nothing: two processes that
/// both start the same session (the same pre-key message) do not both
/// store it.
pub async fn creating_a_session_that_exists_is_a_conflict(backend: Arc<dyn Backend>) {
    let dev = device("@a:hs", "DEV");
    durable(
        "create",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session(1, "s", 1, b"first")],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    let result = backend.write_sessions(
        &dev,
        SessionWrite {
            put: vec![session(1, "s", 2, b"second")],
            delivery: Some(delivery("txn", b"m", b"result")),
            ..SessionWrite::default()
        },
    );
    assert!(is_conflict(&result, (None, Some(1))), "{:?}", result.err());
    durable(
        "account",
        backend.write_device(&dev, None, account(b"acct")),
    )
    .await;
    let mut w = account(b"acct 2");
    w.sessions = vec![session(1, "s", 2, b"second")];
    let result = backend.write_device(&dev, Some(Version(1)), w);
    assert!(is_conflict(&result, (None, Some(1))), "{:?}", result.err());
    assert_eq!(version(&backend, &dev), Some(Version(1)), "account moved");
    assert_eq!(
        stored_session(&backend, &dev, 1, "s"),
        Some((Some(Version(1)), b"first".to_vec()))
    );
    assert!(
        backend
            .load_delivery(&dev, "txn", b"m")
            .expect("read")
            .is_none()
    );
    // The same session id under another peer is another session.
    durable(
        "other peer",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session(2, "s", 1, b"theirs")],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
}

/// Of many concurrent writers advancing one session from the same version
/// (in one process: a backend's own locking must hold too), exactly one
/// succeeds and the others get [`StoreError::Conflict`]; likewise for an
/// outbound Megolm session.
pub async fn concurrent_writers_of_one_session_version_have_exactly_one_winner(
    backend: Arc<dyn Backend>,
) {
    let dev = device("@a:hs", "DEV");
    durable(
        "create",
        backend.write_sessions(
            &dev,
            SessionWrite {
                put: vec![session(1, "s", 1, b"v1")],
                ..SessionWrite::default()
            },
        ),
    )
    .await;
    durable(
        "create outbound",
        backend.write_outbound_group_session(&dev, "!r:hs", None, Some(b"v1")),
    )
    .await;
    let n = 8;
    let (b, d) = (Arc::clone(&backend), dev.clone());
    let olm = all_at_once(n, move |i| {
        let pickle = format!("writer {i}");
        b.write_sessions(
            &d,
            SessionWrite {
                put: vec![session_at(1, 1, "s", 2, pickle.as_bytes())],
                delivery: Some(delivery("txn", pickle.as_bytes(), b"r")),
                ..SessionWrite::default()
            },
        )
        .map(drop)
    })
    .await;
    let (b, d) = (Arc::clone(&backend), dev.clone());
    let megolm = all_at_once(n, move |i| {
        let record = format!("writer {i}");
        b.write_outbound_group_session(&d, "!r:hs", Some(Version(1)), Some(record.as_bytes()))
            .map(drop)
    })
    .await;
    for (what, results) in [("Olm", olm), ("Megolm", megolm)] {
        let winners: Vec<usize> = (0..n).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "{what}: winners {winners:?}");
        for r in results.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(
                    r,
                    Err(StoreError::Conflict {
                        expected: Some(Version(1)),
                        found: Some(Version(2))
                    })
                ),
                "{what}: {r:?}"
            );
        }
        let winner = format!("writer {}", winners[0]).into_bytes();
        if what == "Olm" {
            assert_eq!(
                stored_session(&backend, &dev, 1, "s"),
                Some((Some(Version(2)), winner.clone()))
            );
            for i in 0..n {
                let kept = backend
                    .load_delivery(&dev, "txn", format!("writer {i}").as_bytes())
                    .expect("read")
                    .is_some();
                assert_eq!(kept, i == winners[0], "delivery record of writer {i}");
            }
        } else {
            assert_eq!(
                stored_outbound(&backend, &dev, "!r:hs"),
                Some((Version(2), winner))
            );
        }
    }
}

/// A delivery record (left by a device or session write) is found by
/// device, tag and message until its tag is forgotten; forgetting a tag
/// forgets it for every device, and no other tag's (not even a tag that
/// extends it).
pub async fn deliveries_are_found_until_their_tag_is_forgotten(backend: Arc<dyn Backend>) {
    let (a, b) = (device("@a:hs", "A"), device("@b:hs", "B"));
    let mut w = account(b"a");
    w.delivery = Some(delivery("t", b"m1", b"r1"));
    durable("device write", backend.write_device(&a, None, w)).await;
    for (dev, tag, message, record) in [
        (&b, "t", &b"m1"[..], &b"r2"[..]),
        (&a, "t1", b"m1", b"r3"),
        (&a, "t", b"m2", b"r4"),
    ] {
        durable(
            "session write",
            backend.write_sessions(
                dev,
                SessionWrite {
                    delivery: Some(delivery(tag, message, record)),
                    ..SessionWrite::default()
                },
            ),
        )
        .await;
    }
    let load = |dev: &DeviceKey, tag: &str, message: &[u8]| {
        bytes(backend.load_delivery(dev, tag, message).expect("read"))
    };
    assert_eq!(load(&a, "t", b"m1"), Some(b"r1".to_vec()));
    assert_eq!(load(&b, "t", b"m1"), Some(b"r2".to_vec()));
    assert_eq!(load(&a, "t1", b"m1"), Some(b"r3".to_vec()));
    assert_eq!(load(&a, "t", b"m2"), Some(b"r4".to_vec()));
    assert_eq!(load(&a, "t", b"m3"), None);
    assert_eq!(load(&b, "t1", b"m1"), None);
    durable("forget", backend.forget_deliveries("t")).await;
    assert_eq!(load(&a, "t", b"m1"), None);
    assert_eq!(load(&b, "t", b"m1"), None);
    assert_eq!(load(&a, "t", b"m2"), None);
    assert_eq!(
        load(&a, "t1", b"m1"),
        Some(b"r3".to_vec()),
        "another tag was forgotten"
    );
    durable("forget nothing", backend.forget_deliveries("never")).await;
}

// ---------------------------------------------------------------------------
// Sealed records by id

/// A tracked user's record is replaced by a write and forgotten by `None`,
/// per user.
pub async fn tracked_users_are_replaced_and_forgotten(backend: Arc<dyn Backend>) {
    assert!(backend.load_tracked_user("@u:hs").expect("read").is_none());
    durable("write", backend.write_tracked_user("@u:hs", Some(b"one"))).await;
    durable("other", backend.write_tracked_user("@v:hs", Some(b"other"))).await;
    durable("replace", backend.write_tracked_user("@u:hs", Some(b"two"))).await;
    assert_eq!(
        bytes(backend.load_tracked_user("@u:hs").expect("read")),
        Some(b"two".to_vec())
    );
    durable("forget", backend.write_tracked_user("@u:hs", None)).await;
    assert!(backend.load_tracked_user("@u:hs").expect("read").is_none());
    assert_eq!(
        bytes(backend.load_tracked_user("@v:hs").expect("read")),
        Some(b"other".to_vec())
    );
    durable("forget again", backend.write_tracked_user("@u:hs", None)).await;
}

/// [`Store::replace_tracked_user`](crate::Store::replace_tracked_user)
/// writes only over the record its caller read: a first record over none,
/// a replacement or forgetting over the current one; from a read that is
/// no longer what is stored (another writer came between) it answers
/// `None` and changes nothing.
pub async fn a_tracked_user_replaced_from_a_stale_read_changes_nothing(backend: Arc<dyn Backend>) {
    replaced_only_over_what_was_read(
        |b| b.load_tracked_user("@u:hs"),
        |b, expected, record| b.replace_tracked_user("@u:hs", expected, record),
        &backend,
    )
    .await;
}

/// [`Store::replace_room_state`](crate::Store::replace_room_state), as
/// [`a_tracked_user_replaced_from_a_stale_read_changes_nothing`].
pub async fn a_room_state_replaced_from_a_stale_read_changes_nothing(backend: Arc<dyn Backend>) {
    replaced_only_over_what_was_read(
        |b| b.load_room_state("!r:hs"),
        |b, expected, record| b.replace_room_state("!r:hs", expected, record),
        &backend,
    )
    .await;
}

/// [`Store::replace_held_event`](crate::Store::replace_held_event), as
/// [`a_tracked_user_replaced_from_a_stale_read_changes_nothing`]; other
/// held events of the session are not touched.
pub async fn a_held_event_replaced_from_a_stale_read_changes_nothing(backend: Arc<dyn Backend>) {
    durable(
        "other event",
        backend.hold_event("!r:hs", "s", "$other", Some(b"other")),
    )
    .await;
    replaced_only_over_what_was_read(
        |b| {
            Ok(b.held_events(Some(("!r:hs", "s")))?
                .into_iter()
                .find(|h| h.event_id == "$e")
                .map(|h| h.record))
        },
        |b, expected, record| b.replace_held_event("!r:hs", "s", "$e", expected, record),
        &backend,
    )
    .await;
    let left = backend.held_events(Some(("!r:hs", "s"))).expect("read");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event_id, "$other");
    assert_eq!(left[0].record.as_slice(), b"other");
}

/// [`Store::replace_group_session`](crate::Store::replace_group_session)
/// writes only over the record its caller read (a first record over none, a
/// better copy over the current one); from a stale read it answers `None`
/// and changes nothing, and other sessions and rooms are not touched.
pub async fn an_inbound_group_session_replaced_from_a_stale_read_changes_nothing(
    backend: Arc<dyn Backend>,
) {
    let stored =
        |room: &str, session: &str| bytes(backend.load_group_session(room, session).expect("read"));
    let replace = |expected: Option<&[u8]>, record: &[u8]| {
        backend
            .replace_group_session("!r:hs", "g", expected, record)
            .expect("replace")
    };
    durable(
        "other room",
        backend.write_group_session("!o:hs", "g", b"elsewhere"),
    )
    .await;
    durable(
        "other session",
        backend.write_group_session("!r:hs", "h", b"another"),
    )
    .await;
    durable(
        "first",
        Ok(replace(None, b"one").expect("a first record over none was refused")),
    )
    .await;
    assert!(
        replace(None, b"other").is_none(),
        "a second first record from the same empty read"
    );
    assert_eq!(stored("!r:hs", "g"), Some(b"one".to_vec()));
    durable(
        "replace",
        Ok(replace(Some(b"one"), b"two")
            .expect("a replacement over the current record was refused")),
    )
    .await;
    assert!(
        replace(Some(b"one"), b"three").is_none(),
        "over a stale read"
    );
    assert!(
        replace(None, b"three").is_none(),
        "over a read that found none"
    );
    assert_eq!(stored("!r:hs", "g"), Some(b"two".to_vec()));
    assert_eq!(stored("!o:hs", "g"), Some(b"elsewhere".to_vec()));
    assert_eq!(stored("!r:hs", "h"), Some(b"another".to_vec()));
}

/// The compare-and-write checks of one kind of record.
async fn replaced_only_over_what_was_read(
    load: impl Fn(&Arc<dyn Backend>) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError>,
    replace: impl Fn(
        &Arc<dyn Backend>,
        Option<&[u8]>,
        Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError>,
    backend: &Arc<dyn Backend>,
) {
    let stored = || bytes(load(backend).expect("read"));
    let replace = |expected: Option<&[u8]>, record: Option<&[u8]>| {
        replace(backend, expected, record).expect("replace")
    };
    durable(
        "first",
        Ok(replace(None, Some(b"one")).expect("a first record over none was refused")),
    )
    .await;
    assert!(
        replace(None, Some(b"other")).is_none(),
        "a second first record from the same empty read"
    );
    assert_eq!(stored(), Some(b"one".to_vec()));
    durable(
        "replace",
        Ok(replace(Some(b"one"), Some(b"two"))
            .expect("a replacement over the current record was refused")),
    )
    .await;
    assert!(
        replace(Some(b"one"), Some(b"three")).is_none(),
        "over a stale read"
    );
    assert!(
        replace(Some(b"one"), None).is_none(),
        "forgetting over a stale read"
    );
    assert_eq!(stored(), Some(b"two".to_vec()));
    durable(
        "forget",
        Ok(replace(Some(b"two"), None).expect("forgetting the current record was refused")),
    )
    .await;
    assert_eq!(stored(), None);
}

/// An outbound Megolm session record belongs to one device in one room: it
/// is created at version 1, replaced one version further, discarded, and
/// other devices and rooms keep theirs.
pub async fn outbound_group_sessions_are_per_device_and_room_replaced_and_discarded(
    backend: Arc<dyn Backend>,
) {
    let (a, b) = (device("@a:hs", "A"), device("@b:hs", "B"));
    durable(
        "a/r1",
        backend.write_outbound_group_session(&a, "!r1:hs", None, Some(b"a1")),
    )
    .await;
    durable(
        "a/r2",
        backend.write_outbound_group_session(&a, "!r2:hs", None, Some(b"a2")),
    )
    .await;
    durable(
        "b/r1",
        backend.write_outbound_group_session(&b, "!r1:hs", None, Some(b"b1")),
    )
    .await;
    durable(
        "replace",
        backend.write_outbound_group_session(&a, "!r1:hs", Some(Version(1)), Some(b"a1'")),
    )
    .await;
    let load = |d: &DeviceKey, room: &str| stored_outbound(&backend, d, room);
    assert_eq!(load(&a, "!r1:hs"), Some((Version(2), b"a1'".to_vec())));
    assert_eq!(load(&a, "!r2:hs"), Some((Version(1), b"a2".to_vec())));
    assert_eq!(load(&b, "!r1:hs"), Some((Version(1), b"b1".to_vec())));
    assert_eq!(load(&b, "!r2:hs"), None);
    durable(
        "discard",
        backend.write_outbound_group_session(&a, "!r1:hs", Some(Version(2)), None),
    )
    .await;
    assert_eq!(load(&a, "!r1:hs"), None);
    assert_eq!(load(&a, "!r2:hs"), Some((Version(1), b"a2".to_vec())));
    assert_eq!(load(&b, "!r1:hs"), Some((Version(1), b"b1".to_vec())));
    durable(
        "discard what is not there",
        backend.write_outbound_group_session(&a, "!r1:hs", None, None),
    )
    .await;
    durable(
        "create again after a discard",
        backend.write_outbound_group_session(&a, "!r1:hs", None, Some(b"a1''")),
    )
    .await;
    assert_eq!(load(&a, "!r1:hs"), Some((Version(1), b"a1''".to_vec())));
}

/// An outbound Megolm session write is compare-and-swap on the version its
/// writer read: a stale version, one from the future, a create (`None`)
/// where a session exists, a replace or discard where none exists, all
/// fail with [`StoreError::Conflict`] naming both versions and change
/// nothing. (Two processes encrypting from the same stored ratchet would
/// otherwise hand out the same message index.)
pub async fn a_stale_outbound_group_session_write_is_a_conflict_and_changes_nothing(
    backend: Arc<dyn Backend>,
) {
    let dev = device("@a:hs", "A");
    let room = "!r:hs";
    assert!(
        is_conflict(
            &backend.write_outbound_group_session(&dev, room, Some(Version(1)), Some(b"ghost")),
            (Some(1), None)
        ),
        "a replace of a session that does not exist"
    );
    assert!(
        is_conflict(
            &backend.write_outbound_group_session(&dev, room, Some(Version(1)), None),
            (Some(1), None)
        ),
        "a discard naming a version of a session that does not exist"
    );
    assert_eq!(stored_outbound(&backend, &dev, room), None);
    durable(
        "create",
        backend.write_outbound_group_session(&dev, room, None, Some(b"v1")),
    )
    .await;
    durable(
        "advance",
        backend.write_outbound_group_session(&dev, room, Some(Version(1)), Some(b"v2")),
    )
    .await;
    let refused = [
        (None, Some(&b"again"[..]), (None, Some(2))),
        (Some(1), Some(b"stale"), (Some(1), Some(2))),
        (Some(3), Some(b"future"), (Some(3), Some(2))),
        (Some(1), None, (Some(1), Some(2))),
        (None, None, (None, Some(2))),
    ];
    for (expected, record, want) in refused {
        let result =
            backend.write_outbound_group_session(&dev, room, expected.map(Version), record);
        assert!(
            is_conflict(&result, want),
            "expected {expected:?} with {:?}: {:?}",
            record.map(<[u8]>::len),
            result.err()
        );
        assert_eq!(
            stored_outbound(&backend, &dev, room),
            Some((Version(2), b"v2".to_vec())),
            "a refused write changed the session"
        );
    }
}

/// An inbound Megolm session record is found by room and session id (a
/// room id and session id that concatenate alike are still different
/// records) and replaced by a second write.
pub async fn inbound_group_sessions_are_per_room_and_session_and_replaced(
    backend: Arc<dyn Backend>,
) {
    assert!(
        backend
            .load_group_session("!a", "bc")
            .expect("read")
            .is_none()
    );
    durable("a/bc", backend.write_group_session("!a", "bc", b"one")).await;
    durable("ab/c", backend.write_group_session("!ab", "c", b"two")).await;
    assert_eq!(
        bytes(backend.load_group_session("!a", "bc").expect("read")),
        Some(b"one".to_vec())
    );
    assert_eq!(
        bytes(backend.load_group_session("!ab", "c").expect("read")),
        Some(b"two".to_vec())
    );
    durable("replace", backend.write_group_session("!a", "bc", b"three")).await;
    assert_eq!(
        bytes(backend.load_group_session("!a", "bc").expect("read")),
        Some(b"three".to_vec())
    );
    assert_eq!(
        bytes(backend.load_group_session("!ab", "c").expect("read")),
        Some(b"two".to_vec())
    );
}

/// The first event to use a message index of a group session gets
/// [`IndexUse::First`]; the same event again gets [`IndexUse::SameEvent`]
/// and any other [`IndexUse::OtherEvent`] (a replay). Indexes, sessions and
/// rooms are separate.
pub async fn a_message_index_is_first_once_then_same_event_or_other_event(
    backend: Arc<dyn Backend>,
) {
    let record = |room: &str, session: &str, index: u32, event: &str| {
        backend
            .record_message_index(room, session, index, event)
            .expect("record index")
    };
    assert!(matches!(record("!r", "s", 0, "$e1"), IndexUse::First));
    assert!(matches!(record("!r", "s", 0, "$e1"), IndexUse::SameEvent));
    assert!(matches!(record("!r", "s", 0, "$e2"), IndexUse::OtherEvent));
    assert!(matches!(record("!r", "s", 0, "$e1"), IndexUse::SameEvent));
    assert!(matches!(record("!r", "s", 1, "$e2"), IndexUse::First));
    assert!(matches!(record("!r", "t", 0, "$e2"), IndexUse::First));
    assert!(matches!(record("!q", "s", 0, "$e2"), IndexUse::First));
    assert!(matches!(
        record("!r", "s", u32::MAX, "$e3"),
        IndexUse::First
    ));
}

/// Many events racing for one message index: exactly one is
/// [`IndexUse::First`], the rest [`IndexUse::OtherEvent`], and the index
/// then belongs to the winner.
pub async fn concurrent_first_uses_of_a_message_index_yield_exactly_one_first(
    backend: Arc<dyn Backend>,
) {
    const CALLERS: usize = 8;
    for round in 0..8u32 {
        let shared = Arc::clone(&backend);
        let uses = all_at_once(CALLERS, move |i| {
            shared
                .record_message_index("!r", "s", round, &format!("$event{i}"))
                .expect("record index")
        })
        .await;
        let firsts: Vec<usize> = (0..CALLERS).filter(|&i| is_first(&uses[i])).collect();
        assert_eq!(firsts.len(), 1, "round {round}: {} firsts", firsts.len());
        assert!(
            uses.iter()
                .enumerate()
                .all(|(i, u)| i == firsts[0] || matches!(u, IndexUse::OtherEvent)),
            "round {round}: a loser was not OtherEvent"
        );
        assert!(matches!(
            backend
                .record_message_index("!r", "s", round, &format!("$event{}", firsts[0]))
                .expect("record index"),
            IndexUse::SameEvent
        ));
    }
}

/// Held events: filtered by (room, session) exactly (not by prefix), all
/// of them with `None`; each session's events together and in event-id
/// byte order; released by `None`.
pub async fn held_events_are_filtered_by_session_grouped_and_in_event_id_order(
    backend: Arc<dyn Backend>,
) {
    let held = [
        ("!room:hs", "sess", "$b"),
        ("!room:hs", "sess", "$B"),
        ("!room:hs", "sess", "$a"),
        ("!room:hs", "sess2", "$a"),
        ("!room:hs", "se", "$ss"),
        ("!r:hs", "sess", "$c"),
    ];
    for (room, session, event) in held {
        let record = format!("{room} {session} {event}");
        durable(
            "hold",
            backend.hold_event(room, session, event, Some(record.as_bytes())),
        )
        .await;
    }
    let listed = |filter: Option<(&str, &str)>| -> Vec<(String, String, String)> {
        backend
            .held_events(filter)
            .expect("held events")
            .into_iter()
            .map(|h| {
                let expected = format!("{} {} {}", h.room_id, h.session_id, h.event_id);
                assert_eq!(
                    h.record.as_slice(),
                    expected.as_bytes(),
                    "a record was mixed up"
                );
                (h.room_id, h.session_id, h.event_id)
            })
            .collect()
    };
    let triple = |r: &str, s: &str, e: &str| (r.to_owned(), s.to_owned(), e.to_owned());
    assert_eq!(
        listed(Some(("!room:hs", "sess"))),
        vec![
            triple("!room:hs", "sess", "$B"),
            triple("!room:hs", "sess", "$a"),
            triple("!room:hs", "sess", "$b"),
        ],
        "one session's events, in event id byte order"
    );
    assert_eq!(
        listed(Some(("!room:hs", "se"))),
        vec![triple("!room:hs", "se", "$ss")]
    );
    assert!(listed(Some(("!room:hs", "nothing"))).is_empty());
    let all = listed(None);
    assert_eq!(all.len(), held.len());
    let mut groups: Vec<(String, String)> = Vec::new();
    for (room, session, _) in &all {
        let group = (room.clone(), session.clone());
        if groups.last() != Some(&group) {
            assert!(
                !groups.contains(&group),
                "{group:?} is listed in two places"
            );
            groups.push(group);
        }
    }
    for (room, session) in &groups {
        let of_group: Vec<_> = all
            .iter()
            .filter(|(r, s, _)| r == room && s == session)
            .cloned()
            .collect();
        assert_eq!(of_group, listed(Some((room, session))));
    }
    durable(
        "release",
        backend.hold_event("!room:hs", "sess", "$a", None),
    )
    .await;
    assert_eq!(listed(Some(("!room:hs", "sess"))).len(), 2);
    assert_eq!(listed(None).len(), held.len() - 1);
}

/// Room state records are replaced, forgotten, and their room ids listed
/// in byte order (not a locale's collation: `"!B"` before `"!a"`).
pub async fn room_states_are_replaced_forgotten_and_listed_in_byte_order(
    backend: Arc<dyn Backend>,
) {
    assert!(backend.room_state_ids().expect("ids").is_empty());
    for room in ["!b:hs", "!a:hs", "!B:hs", "!aa:hs", "!a:h"] {
        durable(
            "write",
            backend.write_room_state(room, Some(room.as_bytes())),
        )
        .await;
    }
    durable("replace", backend.write_room_state("!a:hs", Some(b"new"))).await;
    assert_eq!(
        backend.room_state_ids().expect("ids"),
        ["!B:hs", "!a:h", "!a:hs", "!aa:hs", "!b:hs"]
    );
    assert_eq!(
        bytes(backend.load_room_state("!a:hs").expect("read")),
        Some(b"new".to_vec())
    );
    durable("forget", backend.write_room_state("!b:hs", None)).await;
    assert!(backend.load_room_state("!b:hs").expect("read").is_none());
    assert_eq!(
        backend.room_state_ids().expect("ids"),
        ["!B:hs", "!a:h", "!a:hs", "!aa:hs"]
    );
}

/// A cross-signing identity is stored once: a second creation gets `None`,
/// writes nothing, and the first identity stays (clients pin it).
pub async fn a_cross_signing_identity_is_created_once_and_never_replaced(
    backend: Arc<dyn Backend>,
) {
    assert!(backend.load_cross_signing("@u:hs").expect("read").is_none());
    match backend.create_cross_signing("@u:hs", b"first") {
        Ok(Some(pending)) => pending.durable().await.expect("durable"),
        other => panic!(
            "the first creation must store it, got {:?}",
            other.map(|p| p.is_some())
        ),
    }
    let second = backend
        .create_cross_signing("@u:hs", b"second")
        .expect("second creation");
    assert!(second.is_none(), "a second creation was accepted");
    assert_eq!(
        bytes(backend.load_cross_signing("@u:hs").expect("read")),
        Some(b"first".to_vec())
    );
    assert!(
        backend
            .create_cross_signing("@v:hs", b"v")
            .expect("other user")
            .is_some(),
        "another user's identity is separate"
    );
}

/// Creators racing for one user's identity: exactly one wins, and the
/// stored identity is the winner's.
pub async fn concurrent_cross_signing_creators_have_exactly_one_winner(backend: Arc<dyn Backend>) {
    const CALLERS: usize = 8;
    for round in 0..8 {
        let user = format!("@user{round}:hs");
        let (shared, u) = (Arc::clone(&backend), user.clone());
        let created = all_at_once(CALLERS, move |i| {
            shared
                .create_cross_signing(&u, format!("identity {i}").as_bytes())
                .expect("create")
        })
        .await;
        let mut winners = Vec::new();
        for (i, outcome) in created.into_iter().enumerate() {
            if let Some(pending) = outcome {
                pending.durable().await.expect("durable");
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(
            bytes(backend.load_cross_signing(&user).expect("read")),
            Some(format!("identity {}", winners[0]).into_bytes())
        );
    }
}

// ---------------------------------------------------------------------------
// Transaction log

/// A recorded transaction is completed in its namespace only; recording it
/// twice is harmless.
pub async fn recorded_transactions_are_completed_per_namespace(backend: Arc<dyn Backend>) {
    assert!(!backend.transaction_completed("as", "t1").expect("read"));
    durable("record", backend.record_transaction("as", "t1")).await;
    durable("again", backend.record_transaction("as", "t1")).await;
    assert!(backend.transaction_completed("as", "t1").expect("read"));
    assert!(!backend.transaction_completed("other", "t1").expect("read"));
    assert!(!backend.transaction_completed("as", "t2").expect("read"));
    // Length-separated: ("a", "st1") is not ("as", "t1").
    assert!(!backend.transaction_completed("a", "st1").expect("read"));
}

/// Pruning removes exactly the records (of every namespace) recorded
/// before the cutoff and says how many. Record times are Unix
/// milliseconds of [`unix_millis`]'s clock.
pub async fn transactions_recorded_before_the_cutoff_are_pruned_and_newer_ones_stay(
    backend: Arc<dyn Backend>,
) {
    durable("old", backend.record_transaction("as", "old")).await;
    durable("old elsewhere", backend.record_transaction("other", "old")).await;
    let cutoff = unix_millis() + 1;
    // The next record is strictly newer than the cutoff; bounded wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while unix_millis() <= cutoff {
        assert!(Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    durable("new", backend.record_transaction("as", "new")).await;
    let (none, pending) = backend.prune_transactions(0).expect("prune");
    pending.durable().await.expect("durable");
    assert_eq!(none, 0, "nothing is older than the epoch");
    let (pruned, pending) = backend.prune_transactions(cutoff).expect("prune");
    pending.durable().await.expect("durable");
    assert_eq!(pruned, 2);
    assert!(!backend.transaction_completed("as", "old").expect("read"));
    assert!(!backend.transaction_completed("other", "old").expect("read"));
    assert!(backend.transaction_completed("as", "new").expect("read"));
    let (again, _) = backend.prune_transactions(cutoff).expect("prune");
    assert_eq!(again, 0);
}

/// [`TransactionLog::claim_transaction`](crate::TransactionLog::claim_transaction)
/// says [`TransactionClaim::Completed`] once the transaction is recorded
/// (whoever asks) and [`TransactionClaim::Claimed`] to its first claimant
/// before. What the trait's default gives too, so every backend passes it.
pub async fn a_claim_is_completed_after_record_and_claimed_before(backend: Arc<dyn Backend>) {
    assert_eq!(
        backend
            .claim_transaction("as", "t", "one", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed
    );
    durable("record", backend.record_transaction("as", "t")).await;
    for owner in ["one", "two"] {
        assert_eq!(
            backend
                .claim_transaction("as", "t", owner, 60_000)
                .expect("claim"),
            TransactionClaim::Completed
        );
    }
    assert_eq!(
        backend
            .claim_transaction("other", "t", "two", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed,
        "another namespace's transaction is not completed"
    );
    backend
        .release_transaction("other", "t", "two")
        .expect("release");
}

/// An unexpired lease is [`TransactionClaim::HeldElsewhere`] for another
/// owner, until when it says; its owner claiming again renews it (later
/// expiry); once released, another owner claims it.
pub async fn a_lease_is_held_elsewhere_until_released_and_renewed_by_its_owner(
    backend: Arc<dyn Backend>,
) {
    let before = unix_millis();
    assert_eq!(
        backend
            .claim_transaction("as", "t", "a", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed
    );
    let first_until = match backend
        .claim_transaction("as", "t", "b", 60_000)
        .expect("claim")
    {
        TransactionClaim::HeldElsewhere { until_ms } => until_ms,
        other => panic!("another owner must find the lease held, got {other:?}"),
    };
    // Allowing 5 s between this clock and a database server's.
    assert!(
        first_until + 5_000 >= before + 60_000,
        "a 60 s lease taken at {before} ends at {first_until}"
    );
    assert_eq!(
        backend
            .claim_transaction("as", "t", "a", 120_000)
            .expect("renew"),
        TransactionClaim::Claimed,
        "the owner renews its own lease"
    );
    match backend
        .claim_transaction("as", "t", "b", 60_000)
        .expect("claim")
    {
        TransactionClaim::HeldElsewhere { until_ms } => assert!(
            until_ms > first_until,
            "the renewal did not extend the lease ({until_ms} <= {first_until})"
        ),
        other => panic!("still held, got {other:?}"),
    }
    assert_eq!(
        backend
            .claim_transaction("as", "other", "b", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed,
        "a lease covers one transaction"
    );
    assert_eq!(
        backend
            .claim_transaction("ns2", "t", "b", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed,
        "a lease covers one namespace"
    );
    backend
        .release_transaction("as", "t", "a")
        .expect("release");
    assert_eq!(
        backend
            .claim_transaction("as", "t", "b", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed,
        "a released lease is free at once"
    );
    assert!(matches!(
        backend
            .claim_transaction("as", "t", "a", 60_000)
            .expect("claim"),
        TransactionClaim::HeldElsewhere { .. }
    ));
    assert!(!backend.transaction_completed("as", "t").expect("read"));
}

/// A lease whose owner died expires: another owner then claims it (the
/// store's own answer is polled, boundedly, not slept on), and the old
/// owner finds it held elsewhere.
pub async fn an_expired_lease_is_taken_over(backend: Arc<dyn Backend>) {
    const LEASE: Duration = Duration::from_millis(200);
    let asked = Instant::now();
    assert_eq!(
        backend
            .claim_transaction("as", "t", "dead", 200)
            .expect("claim"),
        TransactionClaim::Claimed
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match backend
            .claim_transaction("as", "t", "heir", 60_000)
            .expect("claim")
        {
            TransactionClaim::Claimed => {
                // Answered less than a lease after the lease was even asked
                // for: certainly before it expired. (Later is inconclusive
                // on a slow machine, never a failure.)
                assert!(
                    asked.elapsed() >= LEASE,
                    "a 200 ms lease was taken over after {:?}",
                    asked.elapsed()
                );
                break;
            }
            TransactionClaim::HeldElsewhere { until_ms } => {
                assert!(
                    Instant::now() < deadline,
                    "a 200 ms lease was still held after 20 s (until {until_ms})"
                );
                let left = until_ms.saturating_sub(unix_millis()).clamp(1, 50);
                tokio::time::sleep(Duration::from_millis(left)).await;
            }
            other => panic!("unexpected claim answer {other:?}"),
        }
    }
    assert!(
        matches!(
            backend
                .claim_transaction("as", "t", "dead", 200)
                .expect("claim"),
            TransactionClaim::HeldElsewhere { .. }
        ),
        "the old owner must find its lease taken over"
    );
}

/// Releasing frees only the caller's own lease: another owner's release
/// leaves it held.
pub async fn a_release_by_another_owner_leaves_the_lease_alone(backend: Arc<dyn Backend>) {
    assert_eq!(
        backend
            .claim_transaction("as", "t", "a", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed
    );
    backend
        .release_transaction("as", "t", "b")
        .expect("release");
    assert!(
        matches!(
            backend
                .claim_transaction("as", "t", "c", 60_000)
                .expect("claim"),
            TransactionClaim::HeldElsewhere { .. }
        ),
        "another owner's release freed the lease"
    );
    backend
        .release_transaction("as", "nothing", "b")
        .expect("release of no lease");
}

/// Recording a transaction ends its lease: every owner, the lease holder
/// included, then gets [`TransactionClaim::Completed`], and a release
/// after that changes nothing.
pub async fn recording_a_transaction_ends_its_lease_for_everyone(backend: Arc<dyn Backend>) {
    assert_eq!(
        backend
            .claim_transaction("as", "t", "a", 60_000)
            .expect("claim"),
        TransactionClaim::Claimed
    );
    durable("record", backend.record_transaction("as", "t")).await;
    backend
        .release_transaction("as", "t", "a")
        .expect("release");
    for owner in ["a", "b"] {
        assert_eq!(
            backend
                .claim_transaction("as", "t", owner, 60_000)
                .expect("claim"),
            TransactionClaim::Completed
        );
    }
}

/// Many owners claiming one transaction at once: exactly one gets the
/// lease, every other finds it held elsewhere.
pub async fn concurrent_claimants_exactly_one_holds_the_lease(backend: Arc<dyn Backend>) {
    const CALLERS: usize = 8;
    for round in 0..8 {
        let shared = Arc::clone(&backend);
        let txn = format!("t{round}");
        let claims = all_at_once(CALLERS, move |i| {
            shared
                .claim_transaction("as", &txn, &format!("owner{i}"), 60_000)
                .expect("claim")
        })
        .await;
        let claimed = claims
            .iter()
            .filter(|c| **c == TransactionClaim::Claimed)
            .count();
        assert_eq!(claimed, 1, "round {round}: {claims:?}");
        assert!(
            claims.iter().all(|c| matches!(
                c,
                TransactionClaim::Claimed | TransactionClaim::HeldElsewhere { .. }
            )),
            "round {round}: {claims:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Puppet registry

/// Recording a puppet twice is harmless: it is contained, and listed once;
/// the list is stable from call to call.
pub async fn recording_a_puppet_twice_is_harmless_and_lists_it_once(backend: Arc<dyn Backend>) {
    let devices = [
        device("@echo_b:hs", "DEV"),
        device("@echo_a:hs", "DEV"),
        device("@echo_a:hs", "DEV2"),
    ];
    assert!(backend.puppets().expect("list").is_empty());
    assert!(!backend.contains_puppet(&devices[0]).expect("read"));
    for d in devices.iter().chain([&devices[0], &devices[1]]) {
        durable("record", backend.record_puppet(d)).await;
    }
    let listed = backend.puppets().expect("list");
    assert_eq!(listed.len(), devices.len(), "{listed:?}");
    for d in &devices {
        assert!(backend.contains_puppet(d).expect("read"));
        assert!(listed.contains(d), "{d:?} is not listed");
    }
    assert_eq!(
        backend.puppets().expect("list"),
        listed,
        "the order is not stable"
    );
    assert!(
        !backend
            .contains_puppet(&device("@echo_a:hs", "DEV3"))
            .expect("read")
    );
}

/// The cross-signed flag is per device, and stays through recording the
/// device again and (re)scheduling it; the schedule stays through flagging.
pub async fn the_cross_signed_flag_survives_recording_again_and_rescheduling(
    backend: Arc<dyn Backend>,
) {
    let (a, b) = (device("@a:hs", "DEV"), device("@b:hs", "DEV"));
    for d in [&a, &b] {
        durable("record", backend.record_puppet(d)).await;
    }
    assert!(!backend.is_cross_signed(&a).expect("read"));
    durable("schedule", backend.schedule_rotation(&b, 1_000, None)).await;
    durable("flag a", backend.record_cross_signed(&a)).await;
    durable("flag b", backend.record_cross_signed(&b)).await;
    assert!(backend.is_cross_signed(&a).expect("read"));
    assert_eq!(
        backend.due_rotations(u64::MAX, None, 10).expect("due"),
        vec![(b.clone(), 1_000)],
        "flagging dropped the schedule"
    );
    durable("record again", backend.record_puppet(&a)).await;
    durable("schedule", backend.schedule_rotation(&a, 2_000, None)).await;
    durable(
        "reschedule",
        backend.schedule_rotation(&a, 3_000, Some(2_000)),
    )
    .await;
    assert!(
        backend.is_cross_signed(&a).expect("read"),
        "the flag was lost"
    );
    assert!(backend.is_cross_signed(&b).expect("read"));
    assert!(
        !backend
            .is_cross_signed(&device("@c:hs", "DEV"))
            .expect("read")
    );
}

/// Only devices scheduled at or before `now` are due, earliest first, at
/// most `limit`; never-scheduled devices are not listed.
pub async fn due_rotations_lists_only_due_devices_earliest_first_within_the_limit(
    backend: Arc<dyn Backend>,
) {
    let devices: Vec<DeviceKey> = (0..5)
        .map(|i| device(&format!("@echo_{i}:hs"), "DEV"))
        .collect();
    for d in &devices {
        durable("record", backend.record_puppet(d)).await;
    }
    // Scheduled out of order; device 4 never.
    for (i, due) in [(2, 3_000), (0, 1_000), (3, 4_000), (1, 2_000)] {
        durable(
            "schedule",
            backend.schedule_rotation(&devices[i], due, None),
        )
        .await;
    }
    assert!(
        backend
            .due_rotations(999, None, 100)
            .expect("due")
            .is_empty()
    );
    assert_eq!(
        backend.due_rotations(2_000, None, 100).expect("due"),
        vec![(devices[0].clone(), 1_000), (devices[1].clone(), 2_000)],
        "due at or before now, earliest first"
    );
    assert_eq!(
        backend.due_rotations(u64::MAX, None, 2).expect("due"),
        vec![(devices[0].clone(), 1_000), (devices[1].clone(), 2_000)]
    );
    assert!(
        backend
            .due_rotations(u64::MAX, None, 0)
            .expect("due")
            .is_empty()
    );
    let all: Vec<u64> = backend
        .due_rotations(u64::MAX, None, 100)
        .expect("due")
        .into_iter()
        .map(|(_, due)| due)
        .collect();
    assert_eq!(all, vec![1_000, 2_000, 3_000, 4_000]);
}

/// A cursor (the last entry of the previous batch) continues strictly
/// after it: paging one entry at a time visits every due entry exactly
/// once, devices due at the same time included, in a non-decreasing due
/// order.
pub async fn a_rotation_cursor_pages_through_every_due_entry_exactly_once(
    backend: Arc<dyn Backend>,
) {
    let devices: Vec<DeviceKey> = (0..7)
        .map(|i| device(&format!("@echo_{i}:hs"), "D"))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        durable("record", backend.record_puppet(d)).await;
        // Three share 500, two share 700, then 900 and one not yet due.
        let due = [500, 700, 500, 900, 700, 500, 5_000][i];
        durable("schedule", backend.schedule_rotation(d, due, None)).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<(DeviceKey, u64)> = None;
    for _ in 0..100 {
        let batch = backend
            .due_rotations(1_000, cursor.as_ref(), 1)
            .expect("due");
        let Some(entry) = batch.into_iter().next() else {
            break;
        };
        seen.push(entry.clone());
        cursor = Some(entry);
    }
    let dues: Vec<u64> = seen.iter().map(|(_, due)| *due).collect();
    assert_eq!(dues, vec![500, 500, 500, 700, 700, 900]);
    let distinct: std::collections::HashSet<_> = seen.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(distinct.len(), 6, "an entry was visited twice: {seen:?}");
    let batches = {
        let first = backend.due_rotations(1_000, None, 4).expect("due");
        let rest = backend
            .due_rotations(1_000, first.last(), 100)
            .expect("due");
        [first, rest].concat()
    };
    assert_eq!(batches, seen, "pages of four and of one disagree");
}

/// Rescheduling a device leaves one entry: the new one. Its earlier
/// schedule goes, and so does the entry it was found under (`found_at`),
/// while scheduling at the same time again keeps the one entry.
pub async fn rescheduling_replaces_the_old_entry_and_the_one_found(backend: Arc<dyn Backend>) {
    let (a, b) = (device("@a:hs", "DEV"), device("@b:hs", "DEV"));
    for d in [&a, &b] {
        durable("record", backend.record_puppet(d)).await;
    }
    durable("b", backend.schedule_rotation(&b, 1_500, None)).await;
    durable("a", backend.schedule_rotation(&a, 1_000, None)).await;
    durable("found", backend.schedule_rotation(&a, 2_000, Some(1_000))).await;
    durable("not found", backend.schedule_rotation(&a, 3_000, None)).await;
    durable(
        "same time",
        backend.schedule_rotation(&a, 3_000, Some(3_000)),
    )
    .await;
    durable(
        "stale found_at",
        backend.schedule_rotation(&a, 4_000, Some(500)),
    )
    .await;
    assert_eq!(
        backend.due_rotations(u64::MAX, None, 100).expect("due"),
        vec![(b.clone(), 1_500), (a.clone(), 4_000)]
    );
    durable("record again", backend.record_puppet(&a)).await;
    assert_eq!(
        backend
            .due_rotations(u64::MAX, None, 100)
            .expect("due")
            .len(),
        2,
        "recording again dropped the schedule"
    );
}

/// Scheduling a device that was never recorded schedules nothing (and
/// records nothing), with or without an entry it was found under.
pub async fn scheduling_a_device_not_recorded_schedules_nothing(backend: Arc<dyn Backend>) {
    let stranger = device("@stranger:hs", "DEV");
    durable("schedule", backend.schedule_rotation(&stranger, 0, None)).await;
    durable("found", backend.schedule_rotation(&stranger, 10, Some(0))).await;
    assert!(
        backend
            .due_rotations(u64::MAX, None, 100)
            .expect("due")
            .is_empty()
    );
    assert!(!backend.contains_puppet(&stranger).expect("read"));
    assert!(backend.puppets().expect("list").is_empty());
}

/// A device write carrying a [`PuppetMark`] does what `record_puppet` then
/// `schedule_rotation` would, with the account or not at all: the device is
/// recorded, listed and due at the mark's time (not before); a device
/// recorded earlier (before its account exists, or with one) keeps its
/// cross-signed flag, and its schedule is replaced by the mark's time, or
/// kept when the mark gives none; a write refused as stale records nothing.
pub async fn a_device_write_with_a_puppet_mark_records_and_schedules_the_device_with_the_account(
    backend: Arc<dyn Backend>,
) {
    let marked = |bytes: &[u8], due_ms: Option<u64>| DeviceWrite {
        puppet: Some(PuppetMark { due_ms }),
        ..account(bytes)
    };
    let (fresh, early, old, stale) = (
        device("@fresh:hs", "DEV"),
        device("@early:hs", "DEV"),
        device("@old:hs", "DEV"),
        device("@stale:hs", "DEV"),
    );
    // A new device, created with the mark.
    durable(
        "create marked",
        backend.write_device(&fresh, None, marked(b"fresh", Some(1_000))),
    )
    .await;
    // Recorded, flagged and scheduled before its account exists.
    durable("record", backend.record_puppet(&early)).await;
    durable("flag", backend.record_cross_signed(&early)).await;
    durable("schedule", backend.schedule_rotation(&early, 500, None)).await;
    durable(
        "create marked",
        backend.write_device(&early, None, marked(b"early", Some(2_000))),
    )
    .await;
    // An account recorded, flagged and scheduled, then written with a mark
    // without a due time.
    durable("create", backend.write_device(&old, None, account(b"old"))).await;
    durable("record", backend.record_puppet(&old)).await;
    durable("flag", backend.record_cross_signed(&old)).await;
    durable("schedule", backend.schedule_rotation(&old, 700, None)).await;
    durable(
        "update marked",
        backend.write_device(&old, Some(Version(1)), marked(b"old v2", None)),
    )
    .await;
    // A stale write with a mark: refused, and nothing is recorded.
    durable("create", backend.write_device(&stale, None, account(b"s"))).await;
    let refused = backend.write_device(&stale, None, marked(b"s2", Some(10)));
    assert!(
        is_conflict(&refused, (None, Some(1))),
        "a stale write applied"
    );

    for (d, data, flagged) in [
        (&fresh, &b"fresh"[..], false),
        (&early, &b"early"[..], true),
        (&old, &b"old v2"[..], true),
    ] {
        assert!(backend.contains_puppet(d).expect("read"), "{d:?}");
        assert_eq!(
            backend.is_cross_signed(d).expect("read"),
            flagged,
            "{d:?}: the cross-signed flag"
        );
        let stored = backend.load_account(d).expect("load").expect("account");
        assert_eq!(stored.data.as_slice(), data, "{d:?}: the account");
    }
    assert!(!backend.contains_puppet(&stale).expect("read"));
    let listed = backend.puppets().expect("list");
    assert_eq!(
        listed.len(),
        3,
        "each marked device listed once: {listed:?}"
    );
    for d in [&early, &fresh, &old] {
        assert!(listed.contains(d), "{d:?} is not listed");
    }
    assert_eq!(
        backend.due_rotations(999, None, 10).expect("due"),
        vec![(old.clone(), 700)],
        "only the schedule kept by a mark without a due time is due before 1000"
    );
    assert_eq!(
        backend.due_rotations(u64::MAX, None, 10).expect("due"),
        vec![(old, 700), (fresh, 1_000), (early, 2_000)],
        "one entry per device, at the mark's time"
    );
}

/// A device write without a [`PuppetMark`] leaves the registry as it is:
/// a device not recorded stays unrecorded, and a recorded one keeps its
/// flag and schedule through the rewrite of its account.
pub async fn a_device_write_without_a_puppet_mark_leaves_the_registry_unchanged(
    backend: Arc<dyn Backend>,
) {
    let (plain, puppet) = (device("@plain:hs", "DEV"), device("@puppet:hs", "DEV"));
    durable("create", backend.write_device(&plain, None, account(b"p"))).await;
    durable("create", backend.write_device(&puppet, None, account(b"q"))).await;
    durable("record", backend.record_puppet(&puppet)).await;
    durable("flag", backend.record_cross_signed(&puppet)).await;
    durable("schedule", backend.schedule_rotation(&puppet, 1_000, None)).await;
    durable(
        "update",
        backend.write_device(&plain, Some(Version(1)), account(b"p2")),
    )
    .await;
    durable(
        "update",
        backend.write_device(&puppet, Some(Version(1)), account(b"q2")),
    )
    .await;
    assert!(!backend.contains_puppet(&plain).expect("read"));
    assert_eq!(backend.puppets().expect("list"), vec![puppet.clone()]);
    assert!(backend.is_cross_signed(&puppet).expect("read"));
    assert_eq!(
        backend.due_rotations(u64::MAX, None, 10).expect("due"),
        vec![(puppet.clone(), 1_000)]
    );
    let stored = backend
        .load_account(&puppet)
        .expect("load")
        .expect("account");
    assert_eq!(stored.data.as_slice(), b"q2");
}

// ---------------------------------------------------------------------------
// Durability signalling

/// [`Store::sync`](crate::Store::sync) resolves; the commit counters count
/// each write that asked for durability, and a flush answers at least one
/// write (never more flushes than writes).
pub async fn sync_resolves_and_commit_stats_count_writes(backend: Arc<dyn Backend>) {
    let before = backend.commit_stats();
    assert!(before.flushes <= before.writes);
    durable("write", backend.write_tracked_user("@u:hs", Some(b"r"))).await;
    durable("write", backend.write_room_state("!r", Some(b"r"))).await;
    backend.sync().durable().await.expect("sync");
    let after = backend.commit_stats();
    assert!(
        after.writes >= before.writes + 2,
        "two durable writes counted as {}",
        after.writes - before.writes
    );
    assert!(after.flushes <= after.writes);
    assert!(after.flushes >= before.flushes);
}
