//! [`MemoryStore`]: the whole store contract in a few maps behind one lock.

use std::{
    collections::BTreeMap,
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
};

use parking_lot::Mutex;
use zeroize::Zeroizing;

use crate::{
    AccountRecord, CommitStats, DeviceKey, DeviceWrite, FIRST_KEY_ID, HeldEvent, IndexUse,
    KeyAppend, LegacySession, OneTimeKeyRecord, OutboundSessionRecord, Pending, PuppetMark,
    PuppetRegistry, SessionRecord, SessionStamp, SessionWrite, Store, StoreError, TransactionClaim,
    TransactionLog, Version, unix_millis,
};

/// A [`Backend`](crate::Backend) held entirely in memory, for tests.
///
/// It has the semantics of [`SledStore`](crate::SledStore), call for call:
/// compare-and-swap device versions with the same
/// [`StoreError::Conflict`], all-or-nothing device and session writes, a
/// key-id sequence from [`FIRST_KEY_ID`] that never repeats (for the life of
/// the object), the same orders for listings, create-once cross-signing
/// identities, the puppet registry's rotation schedule with its cursor. It
/// passes the whole [`conformance`](crate::testing::conformance) suite.
///
/// What it does not have is a disk: nothing survives the object, so
/// "durable" means "applied" and every write returns [`Pending::ready`]
/// (unless [`MemoryStore::fail_durability`] is set). Nothing is at rest
/// either: the secrets it holds (accounts, one-time keys, sessions, every
/// record) live only in [`Zeroizing`] buffers, wiped when replaced or
/// dropped; there is nothing to seal.
///
/// Unlike sled's single-process store, its transaction leases
/// ([`TransactionLog::claim_transaction`]) are real: share one
/// `MemoryStore` (in an `Arc`) between two listeners and they behave like
/// two processes on one shared database.
///
/// All state sits behind one mutex, so every call is atomic with respect to
/// every other: simple and obviously right, not fast.
pub struct MemoryStore {
    state: Mutex<State>,
    fail_writes: AtomicBool,
    fail_durability: AtomicBool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the records: they are secrets.
        f.debug_struct("MemoryStore")
            .field("fail_writes", &self.fail_writes.load(Ordering::Relaxed))
            .field(
                "fail_durability",
                &self.fail_durability.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// A device, as the maps key it: [`DeviceKey`]'s length-prefixed encoding,
/// whose byte order is sled's key order.
type Dev = Vec<u8>;

/// A sealed-at-rest record in sled; here a wiped-on-drop buffer.
type Secret = Zeroizing<Vec<u8>>;

/// A stored one-time key: its public half and its secret half.
type StoredKey = ([u8; 32], Zeroizing<[u8; 32]>);

/// A stored Olm session: `(last used, pickle, version)`.
type StoredSession = (u64, Secret, Version);

/// A held event's key in sled's order: `(room length, room id, session
/// length, session id, event id)`, which sorts exactly as sled's
/// `h/<len><room><len><session><event>` keys do.
type HeldKey = (usize, String, usize, String, String);

#[derive(Default)]
struct State {
    accounts: BTreeMap<Dev, (Version, Secret)>,
    /// `(device, key id)` → `(public key, secret key)`.
    keys: BTreeMap<(Dev, u64), StoredKey>,
    /// `(device, public key)` → key id: an index that, as in sled, may point
    /// at a record that is gone or holds another key (treated as absent).
    key_index: BTreeMap<(Dev, [u8; 32]), u64>,
    /// Every key id below it was handed out (0: none yet, start at
    /// [`FIRST_KEY_ID`]).
    next_key_id: u64,
    /// `(device, peer key, session id)` → `(last used, pickle, version)`.
    sessions: BTreeMap<(Dev, [u8; 32], String), StoredSession>,
    /// `(device, session id)` → pickle: schema 1's sessions, only ever
    /// there when a test seeds them ([`MemoryStore::seed_legacy_session`]).
    legacy_sessions: BTreeMap<(Dev, String), Secret>,
    tracked_users: BTreeMap<String, Secret>,
    /// `(tag, device, message)` → record.
    deliveries: BTreeMap<(String, Dev, Vec<u8>), Secret>,
    /// `(device, room id)` → `(version, record)`.
    outbound_group_sessions: BTreeMap<(Dev, String), (Version, Secret)>,
    /// `(room id, session id)` → record.
    group_sessions: BTreeMap<(String, String), Secret>,
    /// `(room id, session id, index)` → the event that used it first.
    message_indexes: BTreeMap<(String, String, u32), String>,
    held_events: BTreeMap<HeldKey, Secret>,
    room_states: BTreeMap<String, Secret>,
    cross_signing: BTreeMap<String, Secret>,
    /// `(namespace, transaction id)` → when it was recorded (Unix ms).
    transactions: BTreeMap<(String, String), u64>,
    /// `(namespace, transaction id)` → its current lease.
    leases: BTreeMap<(String, String), Lease>,
    /// Device → its registry entry.
    puppets: BTreeMap<Dev, Puppet>,
    /// `(due, device)`: the rotation schedule, in sled's order.
    rotations: BTreeSet<(u64, Dev)>,
    /// Writes that returned a [`Pending`] (sled's group-commit counter).
    writes: u64,
}

struct Lease {
    owner: String,
    until_ms: u64,
}

struct Puppet {
    device: DeviceKey,
    cross_signed: bool,
    scheduled: Option<u64>,
}

impl MemoryStore {
    /// A new, empty store.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            fail_writes: AtomicBool::new(false),
            fail_durability: AtomicBool::new(false),
        }
    }

    /// While `fail` is set, every write (every call that changes something,
    /// [`Store::reserve_key_ids`], [`Store::record_message_index`] and
    /// [`TransactionLog::claim_transaction`] included, and
    /// [`Store::sync`]) fails with [`StoreError::Engine`] and changes
    /// nothing, as a backend whose database refuses writes would. Reads
    /// still answer. For testing how callers handle a store that fails.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// While `fail` is set, every write is applied (readers see it) but its
    /// [`Pending::durable`] fails with [`StoreError::Durability`], as a
    /// sled store whose flush failed: for testing that callers acknowledge
    /// nothing that is not durable.
    pub fn fail_durability(&self, fail: bool) {
        self.fail_durability.store(fail, Ordering::SeqCst);
    }

    /// Store a session as schema 1 stored it (under its id alone), so a
    /// test can exercise the migration through [`Store::legacy_sessions`]
    /// and [`SessionWrite::remove_legacy`]. Not a write of the contract:
    /// it ignores [`MemoryStore::fail_writes`].
    pub fn seed_legacy_session(&self, device: &DeviceKey, session_id: &str, pickle: &[u8]) {
        self.state.lock().legacy_sessions.insert(
            (dev(device), session_id.to_owned()),
            Zeroizing::new(pickle.to_vec()),
        );
    }

    /// The error of a write refused by [`MemoryStore::fail_writes`].
    fn writable(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            Err(StoreError::engine(
                "MemoryStore refuses writes (MemoryStore::fail_writes)",
            ))
        } else {
            Ok(())
        }
    }

    /// Lock the state for a write, or refuse it (nothing changed).
    fn write(&self) -> Result<parking_lot::MutexGuard<'_, State>, StoreError> {
        self.writable()?;
        Ok(self.state.lock())
    }

    /// The answer to a write that was applied under `state`.
    fn applied(&self, state: &mut State) -> Pending {
        state.writes += 1;
        if self.fail_durability.load(Ordering::SeqCst) {
            Pending::failed(StoreError::Durability {
                reason: "MemoryStore fails durability (MemoryStore::fail_durability)".into(),
            })
        } else {
            Pending::ready()
        }
    }

    /// [`MemoryStore::put`] only if the record under `key` is still
    /// `expected`, compared and written under the one lock: two managers
    /// may share this store, as two processes share a database.
    fn replace<K: Ord>(
        &self,
        map: impl FnOnce(&mut State) -> &mut BTreeMap<K, Secret>,
        key: K,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        let mut state = self.write()?;
        let records = map(&mut state);
        if records.get(&key).map(|r| r.as_slice()) != expected {
            return Ok(None);
        }
        match record {
            Some(record) => {
                records.insert(key, Zeroizing::new(record.to_vec()));
            }
            None => {
                records.remove(&key);
            }
        }
        Ok(Some(self.applied(&mut state)))
    }

    /// Replace (`Some`) or remove (`None`) a record in one of the maps.
    fn put<K: Ord>(
        &self,
        map: impl FnOnce(&mut State) -> &mut BTreeMap<K, Secret>,
        key: K,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        let map = map(&mut state);
        match record {
            Some(record) => {
                map.insert(key, Zeroizing::new(record.to_vec()));
            }
            None => {
                map.remove(&key);
            }
        }
        Ok(self.applied(&mut state))
    }
}

fn dev(device: &DeviceKey) -> Dev {
    device.as_bytes().to_vec()
}

fn copy(secret: &Secret) -> Secret {
    Zeroizing::new(secret.as_slice().to_vec())
}

fn held_key(room_id: &str, session_id: &str, event_id: &str) -> HeldKey {
    (
        room_id.len(),
        room_id.to_owned(),
        session_id.len(),
        session_id.to_owned(),
        event_id.to_owned(),
    )
}

impl State {
    /// A [`DeviceWrite::puppet`] mark: `record_puppet` then, when a due
    /// time is given, `schedule_rotation` (no `found_at`), as sled does in
    /// the account header.
    fn mark_puppet(&mut self, device: &DeviceKey, mark: PuppetMark) {
        let key = dev(device);
        let puppet = self.puppets.entry(key.clone()).or_insert_with(|| Puppet {
            device: device.clone(),
            cross_signed: false,
            scheduled: None,
        });
        let Some(due) = mark.due_ms else {
            return;
        };
        let old = puppet.scheduled.replace(due);
        if let Some(old) = old
            && old != due
        {
            self.rotations.remove(&(old, key.clone()));
        }
        self.rotations.insert((due, key));
    }

    /// Add one-time keys, then remove others, as sled does: a key removed
    /// goes by its id and its public-key index entry separately, and a key
    /// already gone is no error (a claim may have evicted it meanwhile).
    fn apply_keys(&mut self, device: &Dev, add: &[OneTimeKeyRecord], remove: &[(u64, [u8; 32])]) {
        for k in add {
            self.keys.insert(
                (device.clone(), k.key_id),
                (k.public_key, k.secret_key.clone()),
            );
            self.key_index
                .insert((device.clone(), k.public_key), k.key_id);
        }
        for (id, public) in remove {
            self.keys.remove(&(device.clone(), *id));
            self.key_index.remove(&(device.clone(), *public));
        }
    }

    /// Fail with [`StoreError::Conflict`] unless every session of `put` is
    /// stored at the version its record names (`None`: absent) once
    /// `remove` is applied: checked before anything changes, as sled and
    /// PostgreSQL check inside their transaction.
    fn check_sessions(
        &self,
        device: &Dev,
        remove: &[([u8; 32], String)],
        put: &[SessionRecord],
    ) -> Result<(), StoreError> {
        for s in put {
            let removed = remove
                .iter()
                .any(|(p, id)| *p == s.peer_key && *id == s.session_id);
            let found = if removed {
                None
            } else {
                self.sessions
                    .get(&(device.clone(), s.peer_key, s.session_id.clone()))
                    .map(|(_, _, v)| *v)
            };
            if found != s.version {
                return Err(StoreError::Conflict {
                    expected: s.version,
                    found,
                });
            }
        }
        Ok(())
    }

    fn put_sessions(&mut self, device: &Dev, sessions: &[SessionRecord]) {
        for s in sessions {
            self.sessions.insert(
                (device.clone(), s.peer_key, s.session_id.clone()),
                (s.last_used, copy(&s.pickle), Version::next(s.version)),
            );
        }
    }

    fn remove_sessions(&mut self, device: &Dev, remove: &[([u8; 32], String)]) {
        for (peer, id) in remove {
            self.sessions.remove(&(device.clone(), *peer, id.clone()));
        }
    }

    fn put_delivery(&mut self, device: &Dev, delivery: Option<&crate::Delivery>) {
        if let Some(d) = delivery {
            self.deliveries.insert(
                (d.tag.clone(), device.clone(), d.message.clone()),
                copy(&d.record),
            );
        }
    }

    /// The sessions of `device` (with `peer` only, if given), in sled's key
    /// order (peer, then session id).
    fn device_sessions<'a>(
        &'a self,
        device: &'a Dev,
        peer: Option<&'a [u8; 32]>,
    ) -> impl Iterator<Item = (&'a [u8; 32], &'a String, &'a StoredSession)> + 'a {
        let start = (device.clone(), *peer.unwrap_or(&[0; 32]), String::new());
        self.sessions
            .range(start..)
            .take_while(move |((d, p, _), _)| d == device && peer.is_none_or(|peer| p == peer))
            .map(|((_, p, id), v)| (p, id, v))
    }
}

impl Store for MemoryStore {
    fn load_account(&self, device: &DeviceKey) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self
            .state
            .lock()
            .accounts
            .get(&dev(device))
            .map(|(version, data)| AccountRecord {
                version: *version,
                data: copy(data),
            }))
    }

    fn write_device(
        &self,
        device: &DeviceKey,
        expected: Option<Version>,
        write: DeviceWrite,
    ) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        let key = device;
        let device = dev(device);
        // Checked before anything changes, and nothing below can fail: the
        // write is all or nothing.
        let found = state.accounts.get(&device).map(|(v, _)| *v);
        if found != expected {
            return Err(StoreError::Conflict { expected, found });
        }
        state.check_sessions(&device, &write.remove_sessions, &write.sessions)?;
        state
            .accounts
            .insert(device.clone(), (Version::next(expected), write.account));
        state.apply_keys(&device, &write.add_keys, &write.remove_keys);
        state.remove_sessions(&device, &write.remove_sessions);
        state.put_sessions(&device, &write.sessions);
        state.put_delivery(&device, write.delivery.as_ref());
        if let Some(mark) = write.puppet {
            state.mark_puppet(key, mark);
        }
        Ok(self.applied(&mut state))
    }

    fn append_keys(&self, device: &DeviceKey, append: KeyAppend) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        state.apply_keys(&dev(device), &append.add_keys, &append.evict_keys);
        Ok(self.applied(&mut state))
    }

    fn reserve_key_ids(&self, count: u64) -> Result<u64, StoreError> {
        let mut state = self.write()?;
        let first = state.next_key_id.max(FIRST_KEY_ID);
        state.next_key_id = first
            .checked_add(count)
            .ok_or(StoreError::KeyIdsExhausted)?;
        Ok(first)
    }

    fn one_time_key(
        &self,
        device: &DeviceKey,
        public_key: &[u8; 32],
    ) -> Result<Option<OneTimeKeyRecord>, StoreError> {
        let state = self.state.lock();
        let device = dev(device);
        let Some(&key_id) = state.key_index.get(&(device.clone(), *public_key)) else {
            return Ok(None);
        };
        // As in sled: an index entry whose record is gone or holds another
        // key is not a key of ours.
        Ok(state
            .keys
            .get(&(device, key_id))
            .filter(|(public, _)| public == public_key)
            .map(|(public, secret)| OneTimeKeyRecord {
                key_id,
                public_key: *public,
                secret_key: secret.clone(),
            }))
    }

    fn oldest_one_time_keys(
        &self,
        device: &DeviceKey,
        limit: usize,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        let state = self.state.lock();
        let device = dev(device);
        Ok(state
            .keys
            .range((device.clone(), 0)..=(device, u64::MAX))
            .take(limit)
            .map(|((_, id), (public, _))| (*id, *public))
            .collect())
    }

    fn count_one_time_keys(&self, device: &DeviceKey) -> Result<usize, StoreError> {
        let state = self.state.lock();
        let device = dev(device);
        Ok(state
            .keys
            .range((device.clone(), 0)..=(device, u64::MAX))
            .count())
    }

    fn load_session(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
        session_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .sessions
            .get(&(dev(device), *peer_key, session_id.to_owned()))
            .map(|(last_used, pickle, version)| SessionRecord {
                peer_key: *peer_key,
                session_id: session_id.to_owned(),
                last_used: *last_used,
                pickle: copy(pickle),
                version: Some(*version),
            }))
    }

    fn sessions(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let state = self.state.lock();
        let device = dev(device);
        Ok(state
            .device_sessions(&device, Some(peer_key))
            .map(|(peer, id, (last_used, pickle, version))| SessionRecord {
                peer_key: *peer,
                session_id: id.clone(),
                last_used: *last_used,
                pickle: copy(pickle),
                version: Some(*version),
            })
            .collect())
    }

    fn session_stamps(&self, device: &DeviceKey) -> Result<Vec<SessionStamp>, StoreError> {
        let state = self.state.lock();
        let device = dev(device);
        Ok(state
            .device_sessions(&device, None)
            .map(|(peer, id, (last_used, _, _))| (*peer, id.clone(), *last_used))
            .collect())
    }

    fn legacy_sessions(&self, device: &DeviceKey) -> Result<Vec<LegacySession>, StoreError> {
        let state = self.state.lock();
        let device = dev(device);
        Ok(state
            .legacy_sessions
            .range((device.clone(), String::new())..)
            .take_while(|((d, _), _)| *d == device)
            .map(|((_, id), pickle)| (id.clone(), copy(pickle)))
            .collect())
    }

    fn write_sessions(
        &self,
        device: &DeviceKey,
        write: SessionWrite,
    ) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        let device = dev(device);
        // sled's order: removals, then puts (a put wins), the versions
        // checked first so that a conflict changes nothing.
        state.check_sessions(&device, &write.remove, &write.put)?;
        state.remove_sessions(&device, &write.remove);
        for id in &write.remove_legacy {
            state.legacy_sessions.remove(&(device.clone(), id.clone()));
        }
        state.put_sessions(&device, &write.put);
        state.put_delivery(&device, write.delivery.as_ref());
        Ok(self.applied(&mut state))
    }

    fn load_tracked_user(&self, user_id: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self.state.lock().tracked_users.get(user_id).map(copy))
    }

    fn write_tracked_user(
        &self,
        user_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.put(|s| &mut s.tracked_users, user_id.to_owned(), record)
    }

    /// Compared and written under the one lock: two managers may share
    /// this store, as two processes share a database.
    fn replace_tracked_user(
        &self,
        user_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.replace(
            |s| &mut s.tracked_users,
            user_id.to_owned(),
            expected,
            record,
        )
    }

    fn load_delivery(
        &self,
        device: &DeviceKey,
        tag: &str,
        message: &[u8],
    ) -> Result<Option<Secret>, StoreError> {
        Ok(self
            .state
            .lock()
            .deliveries
            .get(&(tag.to_owned(), dev(device), message.to_vec()))
            .map(copy))
    }

    fn forget_deliveries(&self, tag: &str) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        state.deliveries.retain(|(t, _, _), _| t != tag);
        Ok(self.applied(&mut state))
    }

    fn load_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
    ) -> Result<Option<OutboundSessionRecord>, StoreError> {
        Ok(self
            .state
            .lock()
            .outbound_group_sessions
            .get(&(dev(device), room_id.to_owned()))
            .map(|(version, data)| OutboundSessionRecord {
                version: *version,
                data: copy(data),
            }))
    }

    fn write_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
        expected: Option<Version>,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        let key = (dev(device), room_id.to_owned());
        let found = state.outbound_group_sessions.get(&key).map(|(v, _)| *v);
        if found != expected {
            return Err(StoreError::Conflict { expected, found });
        }
        match record {
            Some(record) => {
                state.outbound_group_sessions.insert(
                    key,
                    (Version::next(expected), Zeroizing::new(record.to_vec())),
                );
            }
            None => {
                state.outbound_group_sessions.remove(&key);
            }
        }
        Ok(self.applied(&mut state))
    }

    fn load_group_session(
        &self,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<Secret>, StoreError> {
        Ok(self
            .state
            .lock()
            .group_sessions
            .get(&(room_id.to_owned(), session_id.to_owned()))
            .map(copy))
    }

    fn write_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        record: &[u8],
    ) -> Result<Pending, StoreError> {
        self.put(
            |s| &mut s.group_sessions,
            (room_id.to_owned(), session_id.to_owned()),
            Some(record),
        )
    }

    /// Compared and written under the one lock, as tracked users are.
    fn replace_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        expected: Option<&[u8]>,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        self.replace(
            |s| &mut s.group_sessions,
            (room_id.to_owned(), session_id.to_owned()),
            expected,
            Some(record),
        )
    }

    fn record_message_index(
        &self,
        room_id: &str,
        session_id: &str,
        index: u32,
        event_id: &str,
    ) -> Result<IndexUse, StoreError> {
        let mut state = self.write()?;
        let slot = (room_id.to_owned(), session_id.to_owned(), index);
        Ok(match state.message_indexes.get(&slot) {
            None => {
                state.message_indexes.insert(slot, event_id.to_owned());
                IndexUse::First
            }
            Some(first) if first == event_id => IndexUse::SameEvent,
            Some(_) => IndexUse::OtherEvent,
        })
    }

    fn hold_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.put(
            |s| &mut s.held_events,
            held_key(room_id, session_id, event_id),
            record,
        )
    }

    /// Compared and written under the one lock, as tracked users are.
    fn replace_held_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.replace(
            |s| &mut s.held_events,
            held_key(room_id, session_id, event_id),
            expected,
            record,
        )
    }

    fn held_events(&self, session: Option<(&str, &str)>) -> Result<Vec<HeldEvent>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .held_events
            .iter()
            .filter(|((_, room, _, sess, _), _)| {
                session.is_none_or(|(r, s)| room == r && sess == s)
            })
            .map(
                |((_, room_id, _, session_id, event_id), record)| HeldEvent {
                    room_id: room_id.clone(),
                    session_id: session_id.clone(),
                    event_id: event_id.clone(),
                    record: copy(record),
                },
            )
            .collect())
    }

    fn load_room_state(&self, room_id: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self.state.lock().room_states.get(room_id).map(copy))
    }

    fn write_room_state(
        &self,
        room_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.put(|s| &mut s.room_states, room_id.to_owned(), record)
    }

    /// Compared and written under the one lock, as tracked users are.
    fn replace_room_state(
        &self,
        room_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.replace(|s| &mut s.room_states, room_id.to_owned(), expected, record)
    }

    fn room_state_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.state.lock().room_states.keys().cloned().collect())
    }

    fn load_cross_signing(&self, user_id: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self.state.lock().cross_signing.get(user_id).map(copy))
    }

    fn create_cross_signing(
        &self,
        user_id: &str,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        let mut state = self.write()?;
        if state.cross_signing.contains_key(user_id) {
            return Ok(None);
        }
        state
            .cross_signing
            .insert(user_id.to_owned(), Zeroizing::new(record.to_vec()));
        Ok(Some(self.applied(&mut state)))
    }

    fn sync(&self) -> Pending {
        match self.write() {
            Ok(mut state) => self.applied(&mut state),
            Err(e) => Pending::failed(e),
        }
    }

    /// `writes` counts every call that returned a [`Pending`] ([`Store::sync`]
    /// too, as sled counts it); `flushes` stays 0: nothing is ever flushed.
    fn commit_stats(&self) -> CommitStats {
        CommitStats {
            writes: self.state.lock().writes,
            flushes: 0,
        }
    }
}

impl TransactionLog for MemoryStore {
    fn transaction_completed(&self, namespace: &str, txn_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .state
            .lock()
            .transactions
            .contains_key(&(namespace.to_owned(), txn_id.to_owned())))
    }

    fn record_transaction(&self, namespace: &str, txn_id: &str) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        let id = (namespace.to_owned(), txn_id.to_owned());
        // Completed: the lease has done its work, for every owner.
        state.leases.remove(&id);
        state.transactions.insert(id, unix_millis());
        Ok(self.applied(&mut state))
    }

    fn prune_transactions(&self, before: u64) -> Result<(usize, Pending), StoreError> {
        let mut state = self.write()?;
        let count = state.transactions.len();
        state.transactions.retain(|_, recorded| *recorded >= before);
        let pruned = count - state.transactions.len();
        // Expired leases mean nothing any more: drop them with the records.
        let now = unix_millis();
        state.leases.retain(|_, lease| lease.until_ms > now);
        Ok((pruned, self.applied(&mut state)))
    }

    fn claim_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<TransactionClaim, StoreError> {
        let mut state = self.write()?;
        let id = (namespace.to_owned(), txn_id.to_owned());
        if state.transactions.contains_key(&id) {
            return Ok(TransactionClaim::Completed);
        }
        let now = unix_millis();
        if let Some(lease) = state.leases.get(&id)
            && lease.owner != owner
            && lease.until_ms > now
        {
            return Ok(TransactionClaim::HeldElsewhere {
                until_ms: lease.until_ms,
            });
        }
        // Free, expired, or ours: (re)start the lease from now.
        state.leases.insert(
            id,
            Lease {
                owner: owner.to_owned(),
                until_ms: now.saturating_add(lease_ms),
            },
        );
        Ok(TransactionClaim::Claimed)
    }

    fn release_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.write()?;
        let id = (namespace.to_owned(), txn_id.to_owned());
        if state.leases.get(&id).is_some_and(|l| l.owner == owner) {
            state.leases.remove(&id);
        }
        Ok(())
    }
}

impl PuppetRegistry for MemoryStore {
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        // Only if absent: recording again keeps the flag and the schedule.
        state.puppets.entry(dev(device)).or_insert_with(|| Puppet {
            device: device.clone(),
            cross_signed: false,
            scheduled: None,
        });
        Ok(self.applied(&mut state))
    }

    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self.state.lock().puppets.contains_key(&dev(device)))
    }

    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError> {
        Ok(self
            .state
            .lock()
            .puppets
            .values()
            .map(|p| p.device.clone())
            .collect())
    }

    fn record_cross_signed(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        // As sled's update of the flag byte: a device not recorded yet is
        // recorded by it (flagged, unscheduled).
        state
            .puppets
            .entry(dev(device))
            .or_insert_with(|| Puppet {
                device: device.clone(),
                cross_signed: false,
                scheduled: None,
            })
            .cross_signed = true;
        Ok(self.applied(&mut state))
    }

    fn is_cross_signed(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self
            .state
            .lock()
            .puppets
            .get(&dev(device))
            .is_some_and(|p| p.cross_signed))
    }

    fn schedule_rotation(
        &self,
        device: &DeviceKey,
        due_ms: u64,
        found_at: Option<u64>,
    ) -> Result<Pending, StoreError> {
        let mut state = self.write()?;
        let device = dev(device);
        let Some(scheduled) = state.puppets.get(&device).map(|p| p.scheduled) else {
            // Not (or no longer) recorded: the entry it was found under
            // goes rather than being found again and again.
            if let Some(old) = found_at {
                state.rotations.remove(&(old, device));
            }
            return Ok(self.applied(&mut state));
        };
        for old in [scheduled, found_at].into_iter().flatten() {
            if old != due_ms {
                state.rotations.remove(&(old, device.clone()));
            }
        }
        state.rotations.insert((due_ms, device.clone()));
        if let Some(puppet) = state.puppets.get_mut(&device) {
            puppet.scheduled = Some(due_ms);
        }
        Ok(self.applied(&mut state))
    }

    fn due_rotations(
        &self,
        now_ms: u64,
        after: Option<&(DeviceKey, u64)>,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        use std::ops::Bound;
        let state = self.state.lock();
        let start = match after {
            Some((device, due)) => Bound::Excluded((*due, dev(device))),
            None => Bound::Unbounded,
        };
        state
            .rotations
            .range((start, Bound::Unbounded))
            .take_while(|(due, _)| *due <= now_ms)
            .take(limit)
            .map(|(due, device)| {
                DeviceKey::from_bytes(device)
                    .map(|d| (d, *due))
                    .ok_or_else(|| StoreError::Corrupt {
                        what: "rotation schedule entry".into(),
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceKey {
        DeviceKey::new(&format!("@puppet_{n}:hs"), "DEV")
    }

    #[tokio::test]
    async fn refused_writes_change_nothing_and_reads_still_answer() {
        let store = MemoryStore::new();
        let dev = device(1);
        store
            .write_device(
                &dev,
                None,
                DeviceWrite {
                    account: Zeroizing::new(b"v1".to_vec()),
                    ..DeviceWrite::default()
                },
            )
            .expect("write")
            .durable()
            .await
            .expect("durable");
        let writes = store.commit_stats().writes;
        store.fail_writes(true);
        let refused = store.write_device(
            &dev,
            Some(Version(1)),
            DeviceWrite {
                account: Zeroizing::new(b"v2".to_vec()),
                add_keys: vec![OneTimeKeyRecord {
                    key_id: 5,
                    public_key: [5; 32],
                    secret_key: Zeroizing::new([6; 32]),
                }],
                ..DeviceWrite::default()
            },
        );
        assert!(matches!(refused, Err(StoreError::Engine(_))));
        assert!(matches!(
            store.reserve_key_ids(1),
            Err(StoreError::Engine(_))
        ));
        assert!(matches!(
            store.record_message_index("!r", "s", 0, "$e"),
            Err(StoreError::Engine(_))
        ));
        assert!(matches!(
            store.claim_transaction("as", "t", "me", 1_000),
            Err(StoreError::Engine(_))
        ));
        assert!(matches!(
            store.record_puppet(&dev),
            Err(StoreError::Engine(_))
        ));
        assert!(matches!(
            store.sync().durable().await,
            Err(StoreError::Engine(_))
        ));
        let account = store.load_account(&dev).expect("read").expect("account");
        assert_eq!(
            (account.version, account.data.as_slice()),
            (Version(1), &b"v1"[..])
        );
        assert_eq!(store.count_one_time_keys(&dev).expect("count"), 0);
        assert!(!store.contains_puppet(&dev).expect("read"));
        assert_eq!(store.commit_stats().writes, writes);
        store.fail_writes(false);
        assert_eq!(store.reserve_key_ids(1).expect("reserve"), FIRST_KEY_ID);
        assert!(matches!(
            store.record_message_index("!r", "s", 0, "$e"),
            Ok(IndexUse::First)
        ));
    }

    #[tokio::test]
    async fn a_write_whose_durability_fails_is_applied_but_never_reported_durable() {
        let store = MemoryStore::new();
        store.fail_durability(true);
        let pending = store
            .write_tracked_user("@u:hs", Some(b"devices"))
            .expect("applied");
        assert!(matches!(
            pending.durable().await,
            Err(StoreError::Durability { .. })
        ));
        assert_eq!(
            store
                .load_tracked_user("@u:hs")
                .expect("read")
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"devices"[..])
        );
        store.fail_durability(false);
        store.sync().durable().await.expect("durable again");
    }

    #[tokio::test]
    async fn seeded_legacy_sessions_are_listed_per_device_and_removed_by_a_session_write() {
        let store = MemoryStore::new();
        let (a, b) = (device(1), device(2));
        store.seed_legacy_session(&a, "s1", b"p1");
        store.seed_legacy_session(&a, "s2", b"p2");
        store.seed_legacy_session(&b, "s9", b"p9");
        let ids = |d: &DeviceKey| -> Vec<String> {
            store
                .legacy_sessions(d)
                .expect("read")
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(ids(&a), ["s1", "s2"]);
        store
            .write_sessions(
                &a,
                SessionWrite {
                    remove_legacy: vec!["s1".into()],
                    ..SessionWrite::default()
                },
            )
            .expect("write")
            .durable()
            .await
            .expect("durable");
        assert_eq!(ids(&a), ["s2"]);
        assert_eq!(ids(&b), ["s9"]);
    }

    /// sled's orphan handling (`puppets.rs`): an entry found for a device
    /// that is no longer recorded is removed by the schedule write that
    /// names it. The contract offers no way to orphan an entry, so this
    /// plants one.
    #[tokio::test]
    async fn a_schedule_entry_found_for_a_device_no_longer_recorded_is_removed() {
        let store = MemoryStore::new();
        let ghost = device(9);
        store.state.lock().rotations.insert((500, dev(&ghost)));
        assert_eq!(
            store.due_rotations(500, None, 10).expect("due"),
            vec![(ghost.clone(), 500)]
        );
        store
            .schedule_rotation(&ghost, 9_999, Some(500))
            .expect("schedule")
            .durable()
            .await
            .expect("durable");
        assert!(
            store
                .due_rotations(u64::MAX, None, 10)
                .expect("due")
                .is_empty()
        );
        assert!(!store.contains_puppet(&ghost).expect("read"));
    }
}
