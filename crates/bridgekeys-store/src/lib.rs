//! Durable, encrypted, versioned records that a Matrix bridge must never lose.
//!
//! A bridge that hands out one-time keys on demand makes a promise with every
//! answer: the private half of each key it returned is on disk and will still
//! be there when the pre-key message arrives. This crate is where that promise
//! is kept. It knows nothing about Olm; it stores opaque, already-serialised
//! device state and the one-time keys that belong to it.
//!
//! # The contract
//!
//! The account manager and the appservice depend on the [`Store`],
//! [`TransactionLog`] and [`PuppetRegistry`] traits (together, a
//! [`Backend`]), not on an engine. Any crate may implement a backend; every
//! backend must guarantee:
//!
//! * **Versioned updates.** Every write of a device names the version it read
//!   ([`Version`]: 1 for the first write, one more for each write after); a
//!   lost race is reported as [`StoreError::Conflict`] naming the version
//!   expected and the one found, never silently overwritten, and changes
//!   nothing.
//! * **Versioned sessions.** So are the records a message advances, because
//!   several processes may encrypt and decrypt for the same puppet: each Olm
//!   session (per device, peer key and session id: [`SessionRecord::version`],
//!   `None` to create one that must not exist yet) in
//!   [`Store::write_sessions`] and [`Store::write_device`], and each outbound
//!   Megolm session (per device and room:
//!   [`Store::write_outbound_group_session`]'s `expected`). One stale record
//!   and the whole write is a [`StoreError::Conflict`] that changes nothing
//!   (delivery record included): the writer reloads and redoes its step, so
//!   no Olm chain step or Megolm message index is handed out twice and no
//!   ratchet step is lost, whichever processes race.
//! * **Atomicity where it matters.** [`Store::write_device`] writes a
//!   device's account record, new and removed one-time keys, new and removed
//!   sessions, its delivery record and its puppet-registry mark
//!   ([`DeviceWrite::puppet`]: a store is its own [`PuppetRegistry`], and a
//!   backend that ignored the mark would leave a provisioned device out of
//!   the registry) in one transaction: all of it or none of it, after a
//!   crash too; so does [`Store::write_sessions`]. Removing a
//!   key that is already gone is no error. The hot claim path uses
//!   [`Store::append_keys`] instead: plain inserts of the new keys, in order,
//!   which needs no transaction because nothing of it is acknowledged before
//!   it is all durable (readers treat a public-key index entry whose key
//!   record is missing or different as absent).
//! * **Key ids never repeat.** Key ids come from a store-wide sequence
//!   ([`Store::reserve_key_ids`]), at or above [`FIRST_KEY_ID`] and
//!   increasing, that never hands out an id twice: not to concurrent callers,
//!   not after a crash or a restart, not to another process sharing the
//!   store. So a claim does not rewrite the account at all.
//! * **Visible on return.** A write is applied when its call returns: every
//!   later read, from any thread (or any process sharing the store), sees it.
//!   One exception: keys from [`Store::append_keys`] must be visible through
//!   the same store handle at return, but other processes need only see
//!   them once they are durable. No one can use a key before its claim is
//!   answered, and a claim is answered only after that, so a backend may
//!   queue appends and commit many at once.
//! * **Durability before acknowledgement.** A write returns a [`Pending`]
//!   handle; only when [`Pending::durable`] resolves `Ok` is the write on
//!   disk, power cut included, together with any key-id reservation applied
//!   before it. Nothing is acknowledged before that.
//! * **Once only.** A user's cross-signing identity is created once
//!   ([`Store::create_cross_signing`]: concurrent creators get one winner,
//!   and it is never replaced), a message index is first used once
//!   ([`Store::record_message_index`]), and a transaction is processed by one
//!   lease holder at a time ([`TransactionLog::claim_transaction`]: a
//!   backend several processes share must keep real leases).
//! * **Stable orders.** The oldest one-time keys come first stored first; room
//!   state ids in byte order; held events grouped by session, each session's
//!   in event-id byte order; due rotations earliest first behind a cursor.
//! * **Secrets sealed at rest.** Every record value except public data (ids,
//!   public keys, times) is encrypted wherever the backend keeps it at rest.
//! * **A failed call changes nothing** ([`StoreError`]).
//!
//! What a trait call can observe of this contract is checked by the
//! conformance suite:
#![cfg_attr(
    feature = "testing",
    doc = "[`testing::conformance`], with [`testing::MemoryStore`] as a second reference backend"
)]
#![cfg_attr(
    not(feature = "testing"),
    doc = "`testing::conformance`, with `testing::MemoryStore` as a second reference backend"
)]
//! (feature `testing`). A new backend runs it in its tests with one line,
//! `bridgekeys_store::conformance_tests!(fresh())`. `MemoryStore` keeps
//! nothing at rest (it holds its records in memory only, in wiped-on-drop
//! buffers), so it needs no sealing.
//!
//! # The sled backend
//!
//! [`SledStore`] is the default backend. On top of the contract:
//!
//! * **Group commit.** Concurrent writers share one flush, so durability
//!   does not cost one `fsync` per claim.
//! * **Encryption at rest.** Secret values are sealed with XChaCha20-Poly1305
//!   under a 32-byte [`StoreKey`] from configuration, bound to the record's
//!   slot. A wrong key is detected at open time ([`StoreError::WrongKey`]).
//! * **Single owner.** A second process opening the same store gets
//!   [`StoreError::Locked`] naming the path. (So its transaction claims are
//!   the trait's default, without stored leases: the listener's own lock
//!   serialises duplicates.)
//! * **A schema version record**: a sled store of schema 1-3 is upgraded
//!   when opened, one of a newer schema is refused
//!   ([`StoreError::UnsupportedSchema`]).
//! * **Created on purpose, never silently.** [`SledStore::create`] makes a
//!   new store, durable as a whole (files, directories and their entries
//!   synced) before it returns; [`SledStore::open`] refuses a missing or
//!   empty store ([`StoreError::Missing`]) instead of minting new identities,
//!   a store with another [`StoreId`] than the configured one
//!   ([`StoreError::Foreign`]), and a store restored from an older backup
//!   ([`StoreError::RolledBack`], detected by a key-id watermark file kept
//!   beside the store), whose key ids would otherwise repeat.
//! * **Power-cut safe, not only kill-safe.** Every group commit syncs the log
//!   file and, when its entries changed, the store directory
//!   ([`durable`] has the helpers).
//!
//! # The PostgreSQL backend
//!
//! With the feature `postgres`, `PgStore` (module `pg_store`) keeps the same
//! records, sealed the same way, in one PostgreSQL database that several
//! bridge processes share: compare-and-swap transactions instead of the
//! single-owner lock, key ids from a counter row in blocks, real transaction
//! leases, versioned migrations, and `COMMIT` as the durability point (the
//! claim path's appends are queued and committed many to one statement). It
//! passes the conformance suite, lease checks included.
#![deny(missing_docs)]

mod commit;
mod crypto;
mod dir_watch;
pub mod durable;
mod error;
mod fetch;
mod identity;
mod layout;
pub mod migrate;
#[cfg(feature = "postgres")]
pub mod pg_store;
mod puppets;
mod sled_export;
mod sled_store;
mod transactions;
mod types;
mod upgrade;
mod watermark;

#[cfg(feature = "testing")]
pub mod testing;

pub use commit::{CommitStats, Pending};
pub use crypto::StoreKey;
pub use error::StoreError;
pub use fetch::Fetch;
pub use identity::{InvalidStoreId, StoreId};
#[cfg(feature = "postgres")]
pub use pg_store::{
    DEFAULT_KEY_ID_BLOCK, DEFAULT_MAX_APPEND_BATCH, DEFAULT_PG_CONNECT_TIMEOUT,
    DEFAULT_PG_OPERATION_TIMEOUT, DEFAULT_PG_POOL_SIZE, PG_SCHEMA_VERSION, PgStore, PgStoreConfig,
    PgTlsError,
};
pub use puppets::PuppetRegistry;
pub use sled_store::{
    DEFAULT_COMMIT_GATHER_US, DEFAULT_LOCK_WAIT, FIRST_KEY_ID, SCHEMA_VERSION, SledStore,
    SledStoreConfig,
};
pub use transactions::{TransactionClaim, TransactionLog, unix_millis};
pub use types::{
    AccountRecord, Delivery, DeviceKey, DeviceWrite, HeldEvent, IndexUse, KeyAppend,
    OneTimeKeyRecord, OutboundSessionRecord, PuppetMark, SessionRecord, SessionWrite, Version,
};

/// Everything a bridge keeps durably, behind one object: the account
/// store, the transaction log and the puppet registry.
///
/// Implemented for every type that implements the three; a bridge holds an
/// `Arc<dyn Backend>` and hands it on as `Arc<dyn Store>`,
/// `Arc<dyn TransactionLog>` or `Arc<dyn PuppetRegistry>` (trait upcasting),
/// so the same code runs on sled, in memory or on another backend.
pub trait Backend: Store + TransactionLog + PuppetRegistry {}

impl<T: Store + TransactionLog + PuppetRegistry> Backend for T {}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Backends hold secrets and need not be Debug: name it only.
        f.write_str("dyn Backend")
    }
}

/// Where and when a session was last used: `(peer_key, session_id,
/// last_used)`.
pub type SessionStamp = ([u8; 32], String, u64);

/// A session stored by schema 1: `(session_id, pickle)`.
pub type LegacySession = (String, zeroize::Zeroizing<Vec<u8>>);

/// What the account manager needs from durable storage.
///
/// Implementations must honour the contract in the [crate docs](crate#the-contract):
/// compare-and-swap versions ([`StoreError::Conflict`], nothing changed),
/// atomic device and session writes, key ids that never repeat, writes
/// visible when their call returns and durable when [`Pending::durable`]
/// resolves, create-once cross-signing identities and message indexes, the
/// listing orders each method states, and secrets encrypted at rest.
/// Every method may be called from many threads at once (hence `Send +
/// Sync`).
///
/// The executable form of this contract is the conformance suite
#[cfg_attr(
    feature = "testing",
    doc = "([`testing::conformance`], feature `testing`)."
)]
#[cfg_attr(
    not(feature = "testing"),
    doc = "(`testing::conformance`, feature `testing`)."
)]
pub trait Store: Send + Sync + 'static {
    /// Load the account record of a device, or `None` if it was never created.
    fn load_account(&self, device: &DeviceKey) -> Result<Option<AccountRecord>, StoreError>;

    /// The version of a device's account record (what the next
    /// [`Store::write_device`] must name), or `None` if it was never
    /// created: for a caller that holds a copy and only needs to know
    /// whether another process wrote the device since. The default loads
    /// the whole record; a backend that keeps the version apart from the
    /// sealed record should answer without opening it.
    fn account_version(&self, device: &DeviceKey) -> Result<Option<Version>, StoreError> {
        Ok(self.load_account(device)?.map(|record| record.version))
    }

    /// Atomically apply `write` to a device if its current version is
    /// `expected` (`None`: the device must not exist yet).
    ///
    /// Returns once the write is applied (visible to readers); await
    /// [`Pending::durable`] before acknowledging anything that depends on it.
    fn write_device(
        &self,
        device: &DeviceKey,
        expected: Option<Version>,
        write: DeviceWrite,
    ) -> Result<Pending, StoreError>;

    /// Record a key claim: add the new one-time keys of a device and remove
    /// the evicted ones. The account record is not touched: a claim changes
    /// nothing in it (key ids come from [`Store::reserve_key_ids`]).
    ///
    /// Ordered, not atomic: until [`Pending::durable`] resolves a crash may
    /// keep any part of it. That is safe for a claim because its keys are
    /// returned only after the whole append is durable: a key that survives
    /// a crash of an unanswered claim is an unused outstanding key, and its
    /// id is never issued again. Readers must treat an index entry whose key
    /// record is missing or different as absent.
    fn append_keys(&self, device: &DeviceKey, append: KeyAppend) -> Result<Pending, StoreError>;

    /// Reserve `count` one-time key ids, returning the first: the ids
    /// `first..first + count` were never returned before by this store and
    /// never will be again, across crashes and restarts.
    ///
    /// Ids are store-wide (unique across devices too) and increase within
    /// one process (several processes sharing a store take blocks, so
    /// across processes the lowest id need not be the oldest key: see
    /// [`Store::oldest_one_time_keys`]). The reservation is applied
    /// before this returns: a write applied after it cannot become durable
    /// without it, so waiting for the keys' own [`Pending`] is enough.
    fn reserve_key_ids(&self, count: u64) -> Result<u64, StoreError>;

    /// Find a stored one-time key of a device by its public key.
    fn one_time_key(
        &self,
        device: &DeviceKey,
        public_key: &[u8; 32],
    ) -> Result<Option<OneTimeKeyRecord>, StoreError>;

    /// The `limit` oldest stored one-time keys of a device (in the order
    /// they were stored, whichever process stored them: the ones to evict
    /// first), as `(key_id, public_key)` pairs, oldest first.
    fn oldest_one_time_keys(
        &self,
        device: &DeviceKey,
        limit: usize,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError>;

    /// Number of one-time keys stored for a device. Costs a scan of that
    /// device's keys (about the outstanding-key bound; on a shared store up
    /// to one bound per process that claims for it): the manager counts
    /// when it loads a device, and, on a store that is not its [sole
    /// writer](Store::sole_writer), again for a claim that would go over
    /// the bound and when it finds a cached device written by another
    /// process.
    fn count_one_time_keys(&self, device: &DeviceKey) -> Result<usize, StoreError>;

    /// [`Store::load_account`] and, when the device exists,
    /// [`Store::count_one_time_keys`]: what loading a device needs. The
    /// default makes the two calls; a backend behind a network should
    /// answer both in one round trip (PostgreSQL does), since the manager
    /// does this for every device it loads (its asynchronous calls load
    /// through [`Store::load_account_counted_later`]).
    fn load_account_counted(
        &self,
        device: &DeviceKey,
    ) -> Result<Option<(AccountRecord, usize)>, StoreError> {
        let Some(record) = self.load_account(device)? else {
            return Ok(None);
        };
        Ok(Some((record, self.count_one_time_keys(device)?)))
    }

    /// [`Store::load_account_counted`] as a [`Fetch`]: the same answer, but
    /// a backend behind a network starts the request and lets the caller
    /// await the answer instead of blocking its thread for the round trip.
    /// The account manager loads a device this way in its asynchronous
    /// calls (claims, decryption, encryption), where many loads of devices
    /// not yet cached wait at once in a bridge that has just started or has
    /// more puppets than its cache holds. The
    /// default answers at once with `load_account_counted` (right for a
    /// backend that reads local pages, as sled does); PostgreSQL overrides
    /// it.
    fn load_account_counted_later(
        &self,
        device: &DeviceKey,
    ) -> Fetch<Option<(AccountRecord, usize)>> {
        Fetch::ready(self.load_account_counted(device))
    }

    /// [`Store::load_account`] as a [`Fetch`], for a caller that can wait,
    /// as [`Store::load_account_counted_later`] is. The account manager's
    /// fallback-key rotation reads an idle device's record this way without
    /// caching it, once per uncached device, over every such puppet in a
    /// full pass: on a backend behind a network the pass would otherwise
    /// hold a runtime worker for a round trip per puppet. The default answers at once with
    /// `load_account`; PostgreSQL overrides it.
    fn load_account_later(&self, device: &DeviceKey) -> Fetch<Option<AccountRecord>> {
        Fetch::ready(self.load_account(device))
    }

    /// One Olm session of a device with a peer (curve25519 key), by id.
    fn load_session(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
        session_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Every Olm session of a device with a peer, in no particular order.
    /// The manager bounds how many there are, so this is a short scan.
    fn sessions(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
    ) -> Result<Vec<SessionRecord>, StoreError>;

    /// Every Olm session of a device (all peers), as `(peer_key,
    /// session_id, last_used)`, without opening the sealed pickles: for
    /// bounding a device's sessions.
    fn session_stamps(&self, device: &DeviceKey) -> Result<Vec<SessionStamp>, StoreError>;

    /// Sessions of a device written by schema 1, which stored them under
    /// their id alone, as `(session_id, pickle)`. The manager re-stores
    /// them by peer ([`SessionWrite::remove_legacy`]) the first time it
    /// needs the device's sessions.
    fn legacy_sessions(&self, device: &DeviceKey) -> Result<Vec<LegacySession>, StoreError>;

    /// Atomically apply `write` to a device's sessions (and its delivery
    /// record): all of it or none of it, after a crash too.
    ///
    /// Each session put is compare-and-swap on its
    /// [`SessionRecord::version`] (removals are not: removing a session
    /// already gone is no error). If any stored session is not at the
    /// version its record names ([`None`]: if one exists), nothing is
    /// applied and the call fails with [`StoreError::Conflict`] naming that
    /// session's versions. This holds for concurrent callers, in one
    /// process or several.
    fn write_sessions(
        &self,
        device: &DeviceKey,
        write: SessionWrite,
    ) -> Result<Pending, StoreError>;

    /// The sealed record of a user's tracked devices, as the account
    /// manager wrote it, or `None`.
    fn load_tracked_user(
        &self,
        user_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError>;

    /// Replace (`Some`) or forget (`None`) the record of a user's tracked
    /// devices.
    fn write_tracked_user(
        &self,
        user_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError>;

    /// [`Store::write_tracked_user`] only if the stored record is still
    /// `expected` (what [`Store::load_tracked_user`] returned; `None`: no
    /// record): `Ok(None)` and nothing written if another writer changed it
    /// since. The account manager reads, changes and writes these records
    /// back; where several processes share the store, a write landing
    /// between one process's read and its write would otherwise be lost
    /// (an invalidation from `device_lists.changed`, or a query's answer).
    ///
    /// The default compares and writes in two steps, which is atomic only
    /// where the caller's own lock covers every writer: a [sole
    /// writer](Store::sole_writer). A backend that other processes share
    /// must override it with one atomic step.
    fn replace_tracked_user(
        &self,
        user_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        let stored = self.load_tracked_user(user_id)?;
        if stored.as_deref().map(Vec::as_slice) != expected {
            return Ok(None);
        }
        self.write_tracked_user(user_id, record).map(Some)
    }

    /// The record a [`Delivery`] of `message` under `tag` left for `device`,
    /// if it was not forgotten yet.
    fn load_delivery(
        &self,
        device: &DeviceKey,
        tag: &str,
        message: &[u8],
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError>;

    /// Forget every delivery record under `tag` (all devices), once the
    /// delivery is acknowledged for good.
    fn forget_deliveries(&self, tag: &str) -> Result<Pending, StoreError>;

    /// The sealed record of a puppet device's outbound Megolm session in a
    /// room, as the account manager wrote it, with its version.
    fn load_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
    ) -> Result<Option<OutboundSessionRecord>, StoreError>;

    /// Replace (`Some`) or discard (`None`) a puppet device's outbound
    /// Megolm session record in a room, if the stored one is at `expected`
    /// (`None`: if there is none).
    ///
    /// Compare-and-swap, because every encrypted message advances the
    /// session: of two writers that loaded the same version, one gets
    /// [`StoreError::Conflict`] (nothing changed) instead of storing a
    /// ratchet whose message index the other already used. The record
    /// written is stored at [`Version::next`] of `expected`. A record
    /// removed and created again starts over at version 1, so a caller that
    /// replaces one session by another must not remove it in between (a
    /// writer still holding the old session at version 1 would pass): the
    /// account manager writes an empty record over a discarded session.
    fn write_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
        expected: Option<Version>,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError>;

    /// The sealed record of a Megolm inbound group session, by room and
    /// session id, as the account manager wrote it.
    fn load_group_session(
        &self,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError>;

    /// Store (or replace) a Megolm inbound group session record.
    fn write_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        record: &[u8],
    ) -> Result<Pending, StoreError>;

    /// [`Store::write_group_session`] only if the stored record is still
    /// `expected` (what [`Store::load_group_session`] returned; `None`: no
    /// record): `Ok(None)` and nothing written if another writer changed it
    /// since. A room key that arrives is compared with the stored copy and
    /// written only if it can decrypt more; where several processes share
    /// the store, a better copy stored by one between the other's read and
    /// write would otherwise be replaced by a worse one, and the messages
    /// only the better copy reads would stay undecryptable.
    ///
    /// Like [`Store::replace_tracked_user`], the default compares and
    /// writes in two steps: a backend that other processes share must
    /// override it with one atomic step.
    fn replace_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        expected: Option<&[u8]>,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        let stored = self.load_group_session(room_id, session_id)?;
        if stored.as_deref().map(Vec::as_slice) != expected {
            return Ok(None);
        }
        self.write_group_session(room_id, session_id, record)
            .map(Some)
    }

    /// Record that `event_id` decrypted at `index` of a group session,
    /// unless an event did before (atomically: two concurrent callers
    /// cannot both see [`IndexUse::First`]).
    fn record_message_index(
        &self,
        room_id: &str,
        session_id: &str,
        index: u32,
        event_id: &str,
    ) -> Result<IndexUse, StoreError>;

    /// Hold (`Some`) or release (`None`) a room event that waits for the
    /// room key of `session_id`.
    fn hold_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError>;

    /// [`Store::hold_event`] only if the stored record of the event is
    /// still `expected` (as [`Store::held_events`] listed it; `None`: not
    /// held): `Ok(None)` and nothing written if another writer changed or
    /// forgot it since. A held event's record is read, changed (a key
    /// request noted in it) and written back; where several processes
    /// share the store, another process may hand the event over and forget
    /// it in between, and an unconditional write would bring it back, to be
    /// handed over a second time.
    ///
    /// Like [`Store::replace_tracked_user`], the default compares and
    /// writes in two steps: a backend that other processes share must
    /// override it with one atomic step.
    fn replace_held_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        let stored = self
            .held_events(Some((room_id, session_id)))?
            .into_iter()
            .find(|h| h.event_id == event_id);
        if stored.as_ref().map(|h| h.record.as_slice()) != expected {
            return Ok(None);
        }
        self.hold_event(room_id, session_id, event_id, record)
            .map(Some)
    }

    /// Held events: those waiting for one session's key (that room and
    /// session exactly), or (with `None`) all of them. Each session's
    /// events are listed together, in event-id byte order. (sled lists
    /// sessions by room id length, room id, session id length, session id:
    /// its key order; callers must not depend on the order of sessions.)
    fn held_events(&self, session: Option<(&str, &str)>) -> Result<Vec<HeldEvent>, StoreError>;

    /// The sealed record of what the bridge knows about a room (whether it
    /// is encrypted, its members), as the appservice wrote it, or `None`.
    fn load_room_state(
        &self,
        room_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError>;

    /// Replace (`Some`) or forget (`None`) a room's state record.
    fn write_room_state(&self, room_id: &str, record: Option<&[u8]>)
    -> Result<Pending, StoreError>;

    /// [`Store::write_room_state`] only if the stored record is still
    /// `expected` (what [`Store::load_room_state`] returned; `None`: no
    /// record): `Ok(None)` and nothing written if another writer changed it
    /// since. A room's state is read, changed by a transaction's state
    /// events and written back; where several processes share the store, a
    /// write landing in between (a member who joined, the room turning
    /// encrypted) would otherwise be lost.
    ///
    /// Like [`Store::replace_tracked_user`], the default compares and
    /// writes in two steps: a backend that other processes share must
    /// override it with one atomic step.
    fn replace_room_state(
        &self,
        room_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        let stored = self.load_room_state(room_id)?;
        if stored.as_deref().map(Vec::as_slice) != expected {
            return Ok(None);
        }
        self.write_room_state(room_id, record).map(Some)
    }

    /// The rooms that have a state record, in byte order of their ids (not
    /// a locale's collation: `"!B"` comes before `"!a"`).
    fn room_state_ids(&self) -> Result<Vec<String>, StoreError>;

    /// The sealed cross-signing identity of a puppet user (its master,
    /// self-signing and user-signing private keys), or `None`.
    fn load_cross_signing(
        &self,
        user_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError>;

    /// Store a user's cross-signing identity, only if it has none yet:
    /// `None` (and nothing written) if one is already stored, so two
    /// concurrent creators end up with the same identity. An identity is
    /// never replaced: clients pin it.
    fn create_cross_signing(
        &self,
        user_id: &str,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError>;

    /// Wait until everything written so far is on disk. A write that
    /// could not be made durable reports that through its own [`Pending`];
    /// this one need not repeat it.
    fn sync(&self) -> Pending;

    /// Counters of the group commit (writes, flushes), for benchmarks and metrics.
    fn commit_stats(&self) -> CommitStats;

    /// Whether this handle is the only writer of its records: while it is
    /// open, one-time keys and account records change only by calls through
    /// it, so a count taken once and kept up to date by its caller stays
    /// exact, and a cached account stays what is stored.
    ///
    /// The account manager counts a device's outstanding keys when it loads
    /// the device and then keeps the count itself. Where other writers share
    /// the records (bridge processes on one database), that count misses
    /// their claims and their uses: it drifts up as they use keys this
    /// process claimed, and at the bound the manager would evict keys
    /// another process handed out a moment ago. So when this is `false` the
    /// manager counts again from the store before it evicts (one count per
    /// claim over the bound, none below it), and reads a cached device's
    /// account record again before it uses or changes the device's fallback
    /// key (another process may have rotated it).
    ///
    /// Defaults to `false`, which is always safe. A backend that one
    /// process holds exclusively says `true` (sled, which locks its
    /// directory); such a handle should then back one account manager.
    fn sole_writer(&self) -> bool {
        false
    }
}
