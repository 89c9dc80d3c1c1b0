//! The default backend: one sled tree, group-committed flushes, sealed values.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use zeroize::Zeroizing;

use crate::{
    AccountRecord, CommitStats, DeviceKey, DeviceWrite, HeldEvent, IndexUse, KeyAppend,
    OneTimeKeyRecord, OutboundSessionRecord, Pending, SessionRecord, SessionWrite, Store,
    StoreError, StoreId, StoreKey, Version, commit::GroupCommit, crypto::Sealer,
    dir_watch::DirWatch, durable, layout, watermark,
};

/// Default of [`SledStoreConfig::commit_gather`], in microseconds.
pub const DEFAULT_COMMIT_GATHER_US: u64 = 1_000;

/// The first one-time key id [`Store::reserve_key_ids`] hands out. Ids below
/// it belong to vodozemac's per-account counter (fallback keys, and the
/// one-time keys of accounts created before store-wide ids), so the two
/// never meet.
pub const FIRST_KEY_ID: u64 = 1 << 32;

/// Key ids reserved per durable write of the mark: one small write per this
/// many keys; a restart skips at most this many ids.
const KEY_ID_BLOCK: u64 = 1 << 16;

/// The schema this build writes. Schema 2 added Olm sessions stored by
/// peer (`o/`), tracked devices, Megolm sessions and held events; a schema 1
/// store is upgraded at open (its sessions are re-stored by peer on first
/// use), and a build that only knows schema 1 refuses a schema 2 store
/// instead of missing its sessions. Schema 3 gave Olm sessions and outbound
/// Megolm sessions a version (compare-and-swap writes): their records from
/// schema 2 still read (as version 0) and take the new format with their
/// next write, and a build that only knows schema 2 refuses a schema 3
/// store instead of failing on records it cannot open. Schema 4 made each
/// one-time key one record found by its public key (`k/<device><public
/// key>`, instead of a record by id and a public-key index) and moved the
/// puppet registry's flags into the account record's header (one entry per
/// idle provisioned device): opening an older store rewrites those records
/// first (see [`SledStore::open`]), and a build that only knows schema 3
/// refuses a schema 4 store.
pub const SCHEMA_VERSION: u32 = 4;

/// Older schemas this build opens and upgrades.
const UPGRADABLE_SCHEMAS: &[u32] = &[1, 2, 3];

/// How to open a [`SledStore`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SledStoreConfig {
    /// The store directory. [`SledStore::create`] makes it (and any missing
    /// parents); [`SledStore::open`] requires it.
    pub path: PathBuf,
    /// The id the store must have ([`SledStore::id`]); `None` accepts any.
    /// A bridge records the id at creation and sets it on every open, so a
    /// swapped or re-created store is refused ([`StoreError::Foreign`]).
    pub expected_id: Option<StoreId>,
    /// The key that encrypts the store at rest.
    pub key: StoreKey,
    /// Open a store whose key-id sequence is behind its watermark (restored
    /// from a backup, see [`StoreError::RolledBack`]): the sequence jumps
    /// past the watermark so no key id is issued twice. Default `false`: a
    /// restore must be a decision, because every key handed out after the
    /// backup was taken is lost with it.
    pub accept_restored: bool,
    /// sled's page cache size in bytes, an upper bound on its memory.
    /// Default 1 GiB (sled's own default): enough for the whole store of a
    /// million idle puppets (about 0.85 to 1 GB on disk, most of it sled's
    /// own overhead), so a cold device costs a memory read, not a disk
    /// read. A smaller cache works, with claims on cold devices slower once
    /// the store outgrows it.
    pub cache_capacity: u64,
    /// The longest a flush waits for more writers to join it after the
    /// first one asks (group commit), when the previous flush answered more
    /// than one writer. Under concurrent load a little waiting turns many
    /// `fsync`s into one and saves CPU (about a third more claims per second
    /// over HTTP at 1 ms on the 2-core reference machine, see
    /// `docs/BENCHMARKS.md`). The flush goes sooner once as many writers
    /// wait as the previous flush answered, or once a window of a quarter
    /// of this time passes with none joining, so a few concurrent callers
    /// are not held for all of it; it adds at most this much latency (values
    /// over an hour count as an hour). A writer after a flush that answered
    /// one writer, or after no writer came for longer than this time, is
    /// flushed at once; one arriving alone right after a shared flush waits
    /// one quiet window (a quarter of this time).
    /// Default [`DEFAULT_COMMIT_GATHER_US`].
    pub commit_gather: Duration,
    /// How long [`SledStore::open`] waits for the store's lock when another
    /// holder is letting go of it, before failing with
    /// [`StoreError::Locked`]. A bridge restarted in place (a supervisor
    /// starting the new process while the old one exits, or a restart
    /// within one process whose last store handle is dropped on another
    /// thread) then opens as soon as the lock is free instead of failing.
    /// Default [`DEFAULT_LOCK_WAIT`]; zero fails at once.
    pub lock_wait: Duration,
}

/// Default of [`SledStoreConfig::lock_wait`].
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(5);

impl SledStoreConfig {
    /// A configuration with sled's default cache size.
    pub fn new(path: impl Into<PathBuf>, key: StoreKey) -> Self {
        Self {
            path: path.into(),
            expected_id: None,
            accept_restored: false,
            key,
            cache_capacity: 1024 * 1024 * 1024,
            commit_gather: Duration::from_micros(DEFAULT_COMMIT_GATHER_US),
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// Require the store to have this id (see [`SledStoreConfig::expected_id`]).
    pub fn expect_id(mut self, id: StoreId) -> Self {
        self.expected_id = Some(id);
        self
    }
}

/// The sled-backed [`Store`].
///
/// sled's own timer flush is switched off: durability comes from the group
/// commit thread, which flushes exactly when somebody waits for it.
pub struct SledStore {
    path: PathBuf,
    id: StoreId,
    pub(crate) db: sled::Db,
    pub(crate) sealer: Sealer,
    pub(crate) commit: GroupCommit,
    key_ids: parking_lot::Mutex<KeyIds>,
    /// The key-id mark last applied (not yet necessarily durable), for the
    /// watermark the group commit writes once it is durable.
    applied_mark: Arc<AtomicU64>,
    /// Declared last, so it drops last: waits for sled to let go of the lock.
    _release: LockRelease,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Create a new, empty store at `config.path` and open it.
    ///
    /// Creation is all or nothing across a power cut: the store is built in
    /// a staging directory next to `path`, every file and directory in it is
    /// synced, then it is renamed into place and the parent directory is
    /// synced. A cut before the rename leaves no store (a later `create`
    /// clears the leftover staging directory); after it, the whole store.
    ///
    /// Fails with [`StoreError::AlreadyExists`] if `path` exists and is not
    /// an empty directory. The new store's id is [`SledStore::id`]: record it
    /// and set it with [`SledStoreConfig::expect_id`] on every later open.
    pub fn create(config: SledStoreConfig) -> Result<Self, StoreError> {
        let path = config.path.clone();
        match std::fs::read_dir(&path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(StoreError::AlreadyExists { path });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io("looking at", &path)(source)),
        }
        let name = path.file_name().ok_or_else(|| StoreError::Io {
            what: "a store path must name a directory",
            path: path.clone(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        durable::create_dir_all(&parent).map_err(io("creating", &parent))?;
        let mut staging_name = std::ffi::OsString::from(".");
        staging_name.push(name);
        staging_name.push(".creating");
        let staging = parent.join(staging_name);
        if staging.exists() {
            // Left by a creation cut short: never opened, never acknowledged.
            std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
        }
        let id = StoreId::generate();
        {
            let db = open_engine(&staging, &config)?;
            let sealer = config.key.cipher();
            let mut batch = sled::Batch::default();
            batch.insert(layout::SCHEMA, &SCHEMA_VERSION.to_be_bytes());
            batch.insert(
                layout::KEY_CHECK,
                sealer.seal(layout::KEY_CHECK, layout::KEY_CHECK_PLAINTEXT),
            );
            batch.insert(layout::STORE_ID, id.as_bytes());
            db.apply_batch(batch)?;
            db.flush()?;
            drop(db);
            // sled's pool may hold the files a moment longer: wait until it
            // let go, so nothing writes after the sync below.
            if !wait_for_unlock(&staging.join("db")) {
                return Err(StoreError::Locked { path: staging });
            }
        }
        durable::sync_tree(&staging).map_err(io("syncing", &staging))?;
        std::fs::rename(&staging, &path).map_err(io(
            "moving the new store into place (an empty directory is replaced; a mount point \
             cannot be: configure a directory inside it) at",
            &path,
        ))?;
        durable::sync_dir(&parent).map_err(io("syncing", &parent))?;
        tracing::info!(path = %path.display(), store_id = %id, "created a new store");
        Self::open(config.expect_id(id))
    }

    /// Open the existing store at `config.path`.
    ///
    /// Never creates one: a missing or empty store is
    /// [`StoreError::Missing`]. Fails with [`StoreError::Foreign`] if
    /// [`SledStoreConfig::expected_id`] names another store,
    /// [`StoreError::Locked`] if another process (or another handle in
    /// this one) still holds it after [`SledStoreConfig::lock_wait`],
    /// [`StoreError::WrongKey`] if it was created with another key,
    /// [`StoreError::UnsupportedSchema`] if a newer build wrote it and
    /// [`StoreError::Unreadable`] if its files cannot be read. None of these
    /// failures changes a record. (Opening may still tidy files no record
    /// depends on: sled's recovery, and the removal of a snapshot file sled
    /// never finished writing.)
    ///
    /// A store created before store ids existed gets one at its first open.
    ///
    /// A store of an older schema is upgraded once it passed those checks:
    /// before schema 4, every one-time key is rewritten as one record found
    /// by its public key (same key id, same secret, sealed to its new slot),
    /// the public-key index goes, and the puppet-registry record of every
    /// device that has an account moves into the account's header. Each
    /// batch of that is atomic. The new schema is written first, durably,
    /// with a mark of the upgrade under way (`m/upgrading`), so a build of
    /// an older schema refuses a store it would misread; the mark goes once
    /// everything is durable. An upgrade cut short by a crash or a power
    /// cut is simply run again (what it converted stays converted) at the
    /// next open, and no key is lost, duplicated or given another id.
    pub fn open(config: SledStoreConfig) -> Result<Self, StoreError> {
        let path = config.path.clone();
        // sled would create a missing database: check that one is there.
        if !path.join("db").is_file() || !path.join("conf").is_file() {
            return Err(StoreError::Missing { path });
        }
        remove_incomplete_snapshots(&path)?;
        let db = open_engine(&path, &config)?;
        let sealer = config.key.cipher();
        let schema = Self::check(&db, &sealer, &path)?;
        let id = Self::identity(&db, &path, config.expected_id)?;
        let mut key_ids = Self::load_key_ids(&db)?;
        let watermark =
            Self::check_watermark(&db, &path, id, &mut key_ids, config.accept_restored)?;
        // After the checks that refuse a store, so a refused store is left
        // as it was.
        if schema != SCHEMA_VERSION || db.get(layout::UPGRADING)?.is_some() {
            if schema != SCHEMA_VERSION {
                // Every record the upgrade converts is read first, changing
                // nothing: a record it cannot read refuses the store while
                // the build that wrote it can still open it.
                crate::upgrade::check(&db, &sealer)?;
                // Then, durably, the new schema and the mark of an upgrade
                // under way: from here on a build of an older schema
                // refuses the store (it would misread records already
                // converted), and this one finishes the upgrade.
                crate::upgrade::begin(&db, schema)?;
                sync_log(&db, &path)?;
            }
            crate::upgrade::to_schema_4(&db, &sealer)?;
            // Everything the upgrade wrote is durable before the mark goes.
            sync_log(&db, &path)?;
            db.remove(layout::UPGRADING)?;
            sync_log(&db, &path)?;
            tracing::info!(path = %path.display(), from = schema, to = SCHEMA_VERSION, "store schema upgraded");
        }
        // sled's `flush` writes its log with `sync_file_range`, which neither
        // flushes the drive's cache nor the file's size: survives a killed
        // process, not a power cut. An `fdatasync` of the log file after it
        // makes the flush a real durability barrier.
        let log = std::fs::File::open(path.join("db")).map_err(io("opening", &path.join("db")))?;
        // sled creates, renames and removes snapshot files in the store
        // directory and writes large values to files in `blobs/`, and syncs
        // neither directory: the commit syncs them (and their new files)
        // whenever their entries changed since the last sync.
        let dir_watch = DirWatch::new(&path).map_err(io("syncing", &path))?;
        let flush_db = db.clone();
        let applied_mark = Arc::new(AtomicU64::new(key_ids.reserved));
        let flush_mark = applied_mark.clone();
        let commit = GroupCommit::start(
            move || {
                // Every mark applied before the flush is durable after it.
                let mark = flush_mark.load(Ordering::Acquire);
                flush_db.flush().map_err(|e| e.to_string())?;
                dir_watch.sync_if_changed().map_err(|e| e.to_string())?;
                log.sync_data().map_err(|e| e.to_string())?;
                watermark
                    .advance(mark)
                    .map_err(|e| format!("writing the key-id watermark: {e}"))
            },
            config.commit_gather,
        )
        .map_err(|e| StoreError::from(sled::Error::Io(e)))?;
        let release = LockRelease {
            lock_file: path.join("db"),
        };
        Ok(Self {
            path,
            id,
            db,
            sealer,
            commit,
            key_ids: parking_lot::Mutex::new(key_ids),
            applied_mark,
            _release: release,
        })
    }

    /// Open the store at `config.path`, creating it if there is none.
    ///
    /// For tests, examples and tools whose store can be thrown away. A
    /// bridge should create its store once, explicitly, and then only
    /// [`SledStore::open`] it: this function cannot tell a store that was
    /// never created from one that was lost, and would replace a lost one
    /// with an empty one.
    pub fn open_or_create(config: SledStoreConfig) -> Result<Self, StoreError> {
        match Self::open(config.clone()) {
            Err(StoreError::Missing { .. }) => Self::create(config),
            other => other,
        }
    }

    /// The store's identity, minted at creation.
    pub fn id(&self) -> StoreId {
        self.id
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the records themselves take, per kind (their two-byte key
    /// prefix, such as `"a/"`): `(entries, bytes of keys and values)`, as
    /// handed to sled, before the engine's own per-entry and page costs.
    /// Reads the whole tree: for benchmarks and tools, not the hot path.
    pub fn record_sizes(
        &self,
    ) -> Result<std::collections::BTreeMap<String, (u64, u64)>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        for item in self.db.iter() {
            let (key, value) = item?;
            let kind = String::from_utf8_lossy(key.get(..2).unwrap_or(&key)).into_owned();
            let entry: &mut (u64, u64) = out.entry(kind).or_default();
            entry.0 += 1;
            entry.1 += (key.len() + value.len()) as u64;
        }
        Ok(out)
    }

    /// Seal an account and its key changes for `write_device`. The
    /// account's header is the stored record's, so it is put in front of
    /// the sealed account inside the transaction.
    fn seal(
        &self,
        device: &DeviceKey,
        expected: Option<Version>,
        account: &[u8],
        add: &[OneTimeKeyRecord],
        remove: &[(u64, [u8; 32])],
    ) -> Result<SealedWrite, StoreError> {
        let new_version = Version::next(expected);
        if new_version.0 > layout::MAX_ACCOUNT_VERSION {
            return Err(StoreError::Corrupt {
                what: format!("account version of {device:?} beyond 2^56"),
            });
        }
        let account_sealed = self
            .sealer
            .seal(&layout::account_slot(device, new_version.0), account);
        let added = self.seal_keys(device, add)?;
        let mut replaced = self.foreign_id_holders(device, add)?;
        replaced.extend(self.holders_of(device, remove)?);
        Ok(SealedWrite {
            account_key: layout::account(device),
            new_version: new_version.0,
            account_sealed,
            added,
            replaced,
        })
    }

    /// Seal new one-time keys: each is one record, `k/<device><public
    /// key>` -> `key id || private key sealed to (device, public key, key
    /// id)`, built in two allocations (its key, its value).
    fn seal_keys(
        &self,
        device: &DeviceKey,
        add: &[OneTimeKeyRecord],
    ) -> Result<Vec<SealedKey>, StoreError> {
        add.iter()
            .map(|k| {
                seal_key(
                    &self.sealer,
                    device,
                    &k.public_key,
                    k.key_id,
                    &k.secret_key[..],
                )
            })
            .collect()
    }

    /// Whether `key_id` was handed out by this handle's
    /// [`Store::reserve_key_ids`]: the sequence never repeats, so no other
    /// stored key can hold such an id (unless a caller used one id for two
    /// keys, which the contract forbids).
    fn issued_here(&self, key_id: u64) -> bool {
        let ids = self.key_ids.lock();
        (ids.issued_from..ids.next).contains(&key_id)
    }

    /// The records of `device` whose key id is `key_id`, found by reading
    /// all of the device's keys (at most the outstanding-key bound).
    fn scan_for_id(&self, device: &DeviceKey, key_id: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(layout::otk_prefix(device)) {
            let (key, value) = item?;
            if otk_id(&value)? == key_id {
                out.push(key.to_vec());
            }
        }
        Ok(out)
    }

    /// For added keys whose id this handle did not hand out (a copy from
    /// another store, a caller's own ids): the other records of the device
    /// that hold the same id, which the write replaces, so that an id names
    /// one key of a device, as it did when keys were stored by id. Keys
    /// from [`Store::reserve_key_ids`] (every claim) skip this scan.
    fn foreign_id_holders(
        &self,
        device: &DeviceKey,
        add: &[OneTimeKeyRecord],
    ) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        let mut out = Vec::new();
        for k in add.iter().filter(|k| !self.issued_here(k.key_id)) {
            let own = layout::otk(device, &k.public_key);
            for key in self.scan_for_id(device, k.key_id)? {
                if key != own {
                    out.push((key, k.key_id));
                }
            }
        }
        Ok(out)
    }

    /// The records that removing keys `(key id, public key)` removes: a
    /// key goes by its id, as it did when keys were stored by id. Normally
    /// the record under that public key holds that id (the pair came from
    /// [`Store::oldest_one_time_keys`] or [`Store::one_time_key`]); if not,
    /// the device's keys are read to find the id.
    fn holders_of(
        &self,
        device: &DeviceKey,
        remove: &[(u64, [u8; 32])],
    ) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        let mut out = Vec::with_capacity(remove.len());
        for (id, public) in remove {
            let key = layout::otk(device, public);
            match self.db.get(&key)? {
                Some(value) if otk_id(&value)? == *id => out.push((key, *id)),
                _ => out.extend(self.scan_for_id(device, *id)?.into_iter().map(|k| (k, *id))),
            }
        }
        Ok(out)
    }

    /// Remove the one-time key record at `key` if it still holds `key_id`
    /// (atomically: a record put there meanwhile with another id stays).
    /// Whether it was removed.
    fn remove_if_id(&self, key: &[u8], key_id: u64) -> Result<bool, StoreError> {
        let Some(old) = self.db.get(key)? else {
            return Ok(false);
        };
        if otk_id(&old)? != key_id {
            return Ok(false);
        }
        Ok(self
            .db
            .compare_and_swap(key, Some(old), None as Option<&[u8]>)?
            .is_ok())
    }

    /// Seal session records for a write: each slot, its new value
    /// (`last_used || version || pickle sealed to slot and version`, the
    /// version one past the expected one) and the version the stored
    /// session must be at.
    fn seal_sessions(&self, device: &DeviceKey, sessions: &[SessionRecord]) -> Vec<SealedSession> {
        sessions
            .iter()
            .map(|r| {
                let slot = layout::olm_session(device, &r.peer_key, &r.session_id);
                let mut value = r.last_used.to_be_bytes().to_vec();
                value.extend(self.seal_versioned(&slot, Version::next(r.version), &r.pickle));
                SealedSession {
                    slot,
                    value,
                    expected: r.version,
                }
            })
            .collect()
    }

    /// `version || data sealed to the slot and version`.
    fn seal_versioned(&self, slot: &[u8], version: Version, data: &[u8]) -> Vec<u8> {
        let mut value = version.0.to_be_bytes().to_vec();
        value.extend(self.sealer.seal(&layout::versioned(slot, version.0), data));
        value
    }

    /// Open a versioned value (`version || sealed`), or one written before
    /// records carried versions (sealed to the slot alone: version 0). The
    /// AEAD tells the two apart; `None` if neither opens.
    pub(crate) fn open_versioned(
        &self,
        slot: &[u8],
        body: &[u8],
    ) -> Option<(Version, Zeroizing<Vec<u8>>)> {
        if let Some((version, sealed)) = body.split_at_checked(8) {
            let version = u64::from_be_bytes(<[u8; 8]>::try_from(version).ok()?);
            if let Some(data) = self.sealer.open(&layout::versioned(slot, version), sealed) {
                return Some((Version(version), data));
            }
        }
        self.sealer.open(slot, body).map(|data| (Version(0), data))
    }

    /// In a transaction: fail with [`StoreError::Conflict`] unless the
    /// session at `slot` is at `expected` (`None`: absent).
    fn check_session(
        &self,
        tx: &sled::transaction::TransactionalTree,
        slot: &[u8],
        expected: Option<Version>,
    ) -> Result<(), ConflictableTransactionError<StoreError>> {
        let found = match tx.get(slot)? {
            None => None,
            Some(raw) => Some(
                raw.split_at_checked(8)
                    .and_then(|(_, body)| self.open_versioned(slot, body))
                    .map(|(version, _)| version)
                    .ok_or_else(|| {
                        ConflictableTransactionError::Abort(StoreError::Corrupt {
                            what: "session record".into(),
                        })
                    })?,
            ),
        };
        if found != expected {
            return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                expected,
                found,
            }));
        }
        Ok(())
    }

    fn seal_delivery(
        &self,
        device: &DeviceKey,
        delivery: Option<&crate::Delivery>,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        delivery.map(|d| {
            let slot = layout::delivery(&d.tag, device, &d.message);
            let sealed = self.sealer.seal(&slot, &d.record);
            (slot, sealed)
        })
    }

    /// The sealed value at `slot`, opened (`what` names it in errors).
    fn get_sealed(
        &self,
        slot: &[u8],
        what: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let Some(raw) = self.db.get(slot)? else {
            return Ok(None);
        };
        self.sealer
            .open(slot, &raw)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt { what: what.into() })
    }

    /// Seal and store `record` at `slot`, or remove the slot (`None`).
    fn put_sealed(&self, slot: Vec<u8>, record: Option<&[u8]>) -> Result<Pending, StoreError> {
        match record {
            Some(record) => {
                let sealed = self.sealer.seal(&slot, record);
                self.db.insert(slot, sealed)?;
            }
            None => {
                self.db.remove(slot)?;
            }
        }
        Ok(self.commit.pending())
    }

    /// Open a stored session value found at `slot`.
    fn open_session(
        &self,
        slot: &[u8],
        peer_key: &[u8; 32],
        session_id: String,
        raw: &[u8],
    ) -> Result<SessionRecord, StoreError> {
        let corrupt = || StoreError::Corrupt {
            what: "session record".into(),
        };
        let (used, body) = raw.split_at_checked(8).ok_or_else(corrupt)?;
        let last_used = <[u8; 8]>::try_from(used)
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt())?;
        let (version, pickle) = self.open_versioned(slot, body).ok_or_else(corrupt)?;
        Ok(SessionRecord {
            peer_key: *peer_key,
            session_id,
            last_used,
            pickle,
            version: Some(version),
        })
    }

    /// Where key-id allocation resumes: at the durable mark, skipping what
    /// the last run reserved but may not have used.
    fn load_key_ids(db: &sled::Db) -> Result<KeyIds, StoreError> {
        let mark = match db.get(layout::KEY_IDS)? {
            None => FIRST_KEY_ID,
            Some(raw) => <[u8; 8]>::try_from(raw.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    what: "key id mark".into(),
                })?,
        };
        Ok(KeyIds {
            next: mark,
            reserved: mark,
            issued_from: mark,
        })
    }

    /// Compare the store's key-id mark with its watermark: a store behind
    /// it was restored from an old backup (refused, or moved past the
    /// watermark if `accept_restored`). Returns the watermark writer.
    fn check_watermark(
        db: &sled::Db,
        path: &Path,
        id: StoreId,
        key_ids: &mut KeyIds,
        accept_restored: bool,
    ) -> Result<WatermarkWriter, StoreError> {
        let file = watermark::path_for(path);
        let recorded = match watermark::read(&file) {
            Ok(Some((owner, mark))) if owner == id => Some(mark),
            // Another store's (this path held another store before): ours
            // replaces it below.
            Ok(_) => None,
            Err(source) => return Err(io("reading the key-id watermark", &file)(source)),
        };
        if let Some(recorded) = recorded.filter(|r| *r > key_ids.reserved) {
            if !accept_restored {
                return Err(StoreError::RolledBack {
                    path: path.to_owned(),
                    store_mark: key_ids.reserved,
                    watermark: recorded,
                });
            }
            // Jump past every id the newer store may have handed out, durably,
            // before any is issued.
            put_durably(db, path, layout::KEY_IDS, &recorded.to_be_bytes())?;
            tracing::warn!(
                path = %path.display(),
                from = key_ids.reserved,
                to = recorded,
                "opened a restored store: key ids jump past the watermark; keys handed out after the backup are gone"
            );
            key_ids.next = recorded;
            key_ids.reserved = recorded;
            key_ids.issued_from = recorded;
        }
        let writer = WatermarkWriter {
            file,
            id,
            written: AtomicU64::new(recorded.unwrap_or(0)),
        };
        // Record the store's mark, once it is surely on disk: after a kill
        // the mark sled recovered may still be only in the page cache, and a
        // watermark above the durable mark would refuse the store after a
        // power cut.
        if recorded != Some(key_ids.reserved) {
            sync_log(db, path)?;
            watermark::write(&writer.file, id, key_ids.reserved)
                .map_err(io("writing the key-id watermark", &writer.file))?;
            writer.written.store(key_ids.reserved, Ordering::Release);
        }
        Ok(writer)
    }

    /// Schema and key check of an existing store; its schema version.
    fn check(db: &sled::Db, sealer: &Sealer, path: &Path) -> Result<u32, StoreError> {
        let Some(raw) = db.get(layout::SCHEMA)? else {
            // The engine's files exist but hold no store: a creation that
            // never finished (only possible before creation was staged).
            return Err(StoreError::Missing {
                path: path.to_owned(),
            });
        };
        let found = <[u8; 4]>::try_from(raw.as_ref())
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::Corrupt {
                what: "schema record".into(),
            })?;
        if found != SCHEMA_VERSION && !UPGRADABLE_SCHEMAS.contains(&found) {
            return Err(StoreError::UnsupportedSchema {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let check = db
            .get(layout::KEY_CHECK)?
            .ok_or_else(|| StoreError::Corrupt {
                what: "key check record missing".into(),
            })?;
        match sealer.open(layout::KEY_CHECK, &check) {
            Some(p) if p.as_slice() == layout::KEY_CHECK_PLAINTEXT => Ok(found),
            _ => Err(StoreError::WrongKey {
                path: path.to_owned(),
            }),
        }
    }

    /// The store's id, checked against the expected one. A store from before
    /// ids gets one now, durably (unless an id was expected: then it is not
    /// the configured store).
    fn identity(
        db: &sled::Db,
        path: &Path,
        expected: Option<StoreId>,
    ) -> Result<StoreId, StoreError> {
        let found = match db.get(layout::STORE_ID)? {
            Some(raw) => StoreId::from_bytes(<[u8; 16]>::try_from(raw.as_ref()).map_err(|_| {
                StoreError::Corrupt {
                    what: "store id record".into(),
                }
            })?),
            None => {
                if let Some(expected) = expected {
                    // Every store made by `create` has an id: this one was
                    // not made for this configuration.
                    return Err(StoreError::Foreign {
                        path: path.to_owned(),
                        expected,
                        found: None,
                    });
                }
                let id = StoreId::generate();
                put_durably(db, path, layout::STORE_ID, id.as_bytes())?;
                tracing::info!(path = %path.display(), store_id = %id, "gave a store from before store ids its id");
                id
            }
        };
        match expected {
            Some(expected) if expected != found => Err(StoreError::Foreign {
                path: path.to_owned(),
                expected,
                found: Some(found),
            }),
            _ => Ok(found),
        }
    }
}

/// Write one record at open time and make it durable before going on (sled's
/// flush, then an `fdatasync` of its log: see the group commit).
fn put_durably(db: &sled::Db, path: &Path, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    db.insert(key, value)?;
    sync_log(db, path)
}

/// Make everything applied so far durable, outside the group commit (at
/// open, before the commit thread exists).
fn sync_log(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
    db.flush()?;
    std::fs::File::open(path.join("db"))
        .and_then(|f| f.sync_data())
        .map_err(io("syncing", &path.join("db")))
}

/// A file-system error of the store, naming what it was doing and where.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// Remove the snapshot files sled was still writing when it stopped.
///
/// sled writes a snapshot to `snap.<lsn>.generating`, syncs it and renames
/// it to `snap.<lsn>`; but when it opens it reads the newest `snap.*` file
/// *including* an unfinished `.generating` one, and a cut or kill while that
/// file was being written (empty, short, or zeros where the size reached the
/// disk before the data) makes the whole store unreadable ("Read corrupted
/// data"). Such a file holds nothing the log does not: the previous snapshot
/// is only removed after the rename, and sled rebuilds from the log without
/// one. So it is removed (durably) before sled opens.
fn remove_incomplete_snapshots(path: &Path) -> Result<(), StoreError> {
    let mut removed = false;
    for entry in std::fs::read_dir(path).map_err(io("listing", path))? {
        let entry = entry.map_err(io("listing", path))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path()).map_err(io("removing", &entry.path()))?;
            tracing::info!(file = %entry.path().display(), "removed an unfinished snapshot left by a crash");
            removed = true;
        }
    }
    if removed {
        durable::sync_dir(path).map_err(io("syncing", path))?;
    }
    Ok(())
}

/// Open sled at `path` with the store's settings, naming the path in errors;
/// while the lock is held, retry until [`SledStoreConfig::lock_wait`] passed.
fn open_engine(path: &Path, config: &SledStoreConfig) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + config.lock_wait;
    loop {
        match open_engine_once(path, config) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn open_engine_once(path: &Path, config: &SledStoreConfig) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_capacity)
        .flush_every_ms(None)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked {
                    path: path.to_owned(),
                }
            }
            sled::Error::Io(io) => StoreError::Io {
                what: "opening",
                path: path.to_owned(),
                source: io,
            },
            other => StoreError::Unreadable {
                path: path.to_owned(),
                reason: other.to_string(),
            },
        })
}

/// Writes the watermark file when a higher key-id mark became durable.
struct WatermarkWriter {
    file: PathBuf,
    id: StoreId,
    written: AtomicU64,
}

impl WatermarkWriter {
    /// Called by the flusher after a successful flush with the mark that was
    /// applied before it (so durable now). Rare: once per key-id block.
    ///
    /// A failure fails the flush: no key with an id above the watermark is
    /// acknowledged, so a restore that later jumps to the watermark can never
    /// re-issue an acknowledged id.
    fn advance(&self, durable_mark: u64) -> std::io::Result<()> {
        if durable_mark <= self.written.load(Ordering::Acquire) {
            return Ok(());
        }
        watermark::write(&self.file, self.id, durable_mark)?;
        self.written.store(durable_mark, Ordering::Release);
        Ok(())
    }
}

/// Makes "drop the store, then open it again" deterministic.
///
/// sled 0.34 writes log buffers from its own thread pool, and a pool job can
/// hold the database (and with it the file lock) a moment after the last
/// handle is dropped; an immediate reopen would then fail with
/// [`StoreError::Locked`]. This guard, dropped after every sled handle of the
/// store, waits (boundedly) until the lock can be taken, so that when a
/// `SledStore` is gone its lock is free too.
struct LockRelease {
    lock_file: PathBuf,
}

impl Drop for LockRelease {
    fn drop(&mut self) {
        wait_for_unlock(&self.lock_file);
    }
}

/// Wait (up to 5 s) until nobody holds sled's lock on `lock_file`. False if
/// it is still held then.
fn wait_for_unlock(lock_file: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let Ok(file) = std::fs::File::open(lock_file) else {
            return true;
        };
        match file.try_lock() {
            Ok(()) => return true, // released again when `file` closes
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::fs::TryLockError::WouldBlock) => return false,
            Err(_) => return true,
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Answer every waiter with a final flush before the handle goes.
        self.commit.close();
    }
}

/// A device write, sealed and laid out, ready to apply.
/// Key-id allocation: ids below `next` were handed out; ids below `reserved`
/// are covered by the durable mark (`m/keyids`).
struct KeyIds {
    next: u64,
    reserved: u64,
    /// The first id this handle hands out: ids from here to `next` were
    /// reserved by it.
    issued_from: u64,
}

struct SealedWrite {
    account_key: Vec<u8>,
    new_version: u64,
    account_sealed: Vec<u8>,
    added: Vec<SealedKey>,
    /// Records to remove if they still hold that key id.
    replaced: Vec<(Vec<u8>, u64)>,
}

/// A session ready to write: its slot, its new value, and the version the
/// stored one must be at (`None`: absent).
struct SealedSession {
    slot: Vec<u8>,
    value: Vec<u8>,
    expected: Option<Version>,
}

/// A one-time key ready to insert: its record's key and value.
pub(crate) struct SealedKey {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

/// One one-time key as its schema 4 record: `k/<device><public key>` ->
/// `key id || private key sealed to (device, public key, key id)`, in two
/// allocations (its key, its value). Used by every write of a key and by
/// the upgrade that converts older records.
pub(crate) fn seal_key(
    sealer: &Sealer,
    device: &DeviceKey,
    public_key: &[u8; 32],
    key_id: u64,
    secret: &[u8],
) -> Result<SealedKey, StoreError> {
    let mut slot = layout::otk_seal_slot(device, public_key, key_id);
    let mut value = Vec::with_capacity(8 + crate::crypto::SEAL_OVERHEAD + secret.len());
    value.extend_from_slice(&key_id.to_be_bytes());
    sealer.seal_into(&mut value, &slot, secret);
    // `seal_into` leaves the value as given if the AEAD refuses (it cannot
    // with a valid key): store nothing rather than a key without its secret.
    if value.len() != 8 + crate::crypto::SEAL_OVERHEAD + secret.len() {
        return Err(StoreError::Corrupt {
            what: "one-time key (sealing failed)".into(),
        });
    }
    slot.truncate(layout::otk_key(&slot).len());
    Ok(SealedKey { key: slot, value })
}

/// An account value's header, version and sealed account.
fn parse_account(raw: &[u8]) -> Result<(layout::PuppetHeader, u64, &[u8]), StoreError> {
    layout::parse_account(raw).ok_or_else(|| StoreError::Corrupt {
        what: "account record header".into(),
    })
}

/// The key id at the front of a one-time key record's value.
pub(crate) fn otk_id(value: &[u8]) -> Result<u64, StoreError> {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            what: "one-time key record".into(),
        })
}

impl Store for SledStore {
    fn load_account(&self, device: &DeviceKey) -> Result<Option<AccountRecord>, StoreError> {
        let Some(raw) = self.db.get(layout::account(device))? else {
            return Ok(None);
        };
        let (_, version, sealed) = parse_account(&raw)?;
        let data = self
            .sealer
            .open(&layout::account_slot(device, version), sealed)
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("account of {device:?}"),
            })?;
        Ok(Some(AccountRecord {
            version: Version(version),
            data,
        }))
    }

    fn write_device(
        &self,
        device: &DeviceKey,
        expected: Option<Version>,
        write: DeviceWrite,
    ) -> Result<Pending, StoreError> {
        // Seal outside the transaction: its closure may run more than once.
        let sealed = self.seal(
            device,
            expected,
            &write.account,
            &write.add_keys,
            &write.remove_keys,
        )?;
        let registry = layout::puppet(device);
        let sessions = self.seal_sessions(device, &write.sessions);
        let delivery = self.seal_delivery(device, write.delivery.as_ref());
        let scheduled = write.puppet.and_then(|mark| mark.due_ms);

        let outcome = self.db.transaction(|tx| {
            let (found, mut header) = match tx.get(&sealed.account_key)? {
                Some(raw) => {
                    let (header, version, _) =
                        parse_account(&raw).map_err(ConflictableTransactionError::Abort)?;
                    (Some(Version(version)), header)
                }
                // A new account takes over the registry record of its
                // device, if it was recorded first: one entry per device.
                None => match tx.get(&registry)? {
                    Some(value) => {
                        tx.remove(registry.as_slice())?;
                        (None, layout::PuppetHeader::from_registry_value(&value))
                    }
                    None => (None, layout::PuppetHeader::default()),
                },
            };
            if found != expected {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                    expected,
                    found,
                }));
            }
            if write.puppet.is_some() {
                // What `record_puppet` then `schedule_rotation` do, in the
                // header this write stores anyway (see `puppets.rs`).
                if header.flags & layout::PUPPET == 0 {
                    // An account takes over its device's `r/` record (never
                    // there beside an account in practice: checked here
                    // only, as one read of a rare write).
                    if found.is_some()
                        && let Some(value) = tx.get(&registry)?
                    {
                        tx.remove(registry.as_slice())?;
                        header = layout::PuppetHeader::from_registry_value(&value);
                    }
                    header.flags |= layout::PUPPET;
                }
                if let Some(due) = scheduled {
                    crate::puppets::reschedule(tx, device, &mut header, due, None)?;
                }
            }
            let mut account = Vec::with_capacity(16 + sealed.account_sealed.len());
            layout::account_header_into(&mut account, header, sealed.new_version);
            account.extend_from_slice(&sealed.account_sealed);
            tx.insert(sealed.account_key.as_slice(), account)?;
            for (key, id) in &sealed.replaced {
                if let Some(value) = tx.get(key)?
                    && otk_id(&value).ok() == Some(*id)
                {
                    tx.remove(key.as_slice())?;
                }
            }
            for k in &sealed.added {
                tx.insert(k.key.as_slice(), k.value.as_slice())?;
            }
            for (peer, id) in &write.remove_sessions {
                tx.remove(layout::olm_session(device, peer, id))?;
            }
            for session in &sessions {
                self.check_session(tx, &session.slot, session.expected)?;
                tx.insert(session.slot.as_slice(), session.value.as_slice())?;
            }
            if let Some((slot, sealed)) = &delivery {
                tx.insert(slot.as_slice(), sealed.as_slice())?;
            }
            Ok(())
        });
        match outcome {
            Ok(()) => Ok(self.commit.pending()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn append_keys(&self, device: &DeviceKey, append: KeyAppend) -> Result<Pending, StoreError> {
        let added = self.seal_keys(device, &append.add_keys)?;
        for (key, id) in self.foreign_id_holders(device, &append.add_keys)? {
            self.remove_if_id(&key, id)?;
        }
        // One insert per key: the record is the whole key, so no order
        // between entries matters (before schema 4, a key record had to
        // precede its public-key index entry).
        for k in added {
            self.db.insert(k.key, k.value)?;
        }
        for (id, public) in &append.evict_keys {
            let key = layout::otk(device, public);
            if !self.remove_if_id(&key, *id)? {
                // Not under that public key: the key with that id goes.
                for key in self.scan_for_id(device, *id)? {
                    self.remove_if_id(&key, *id)?;
                }
            }
        }
        Ok(self.commit.pending())
    }

    fn reserve_key_ids(&self, count: u64) -> Result<u64, StoreError> {
        let mut ids = self.key_ids.lock();
        let first = ids.next;
        let end = first
            .checked_add(count)
            .ok_or(StoreError::KeyIdsExhausted)?;
        if end > ids.reserved {
            // Move the durable mark first, while holding the lock: any key
            // written with an id from the new range is applied after this
            // record, so no flush can make such a key durable without it.
            let reserved = end
                .checked_add(KEY_ID_BLOCK)
                .ok_or(StoreError::KeyIdsExhausted)?;
            self.db.insert(layout::KEY_IDS, &reserved.to_be_bytes())?;
            ids.reserved = reserved;
            self.applied_mark.store(reserved, Ordering::Release);
        }
        ids.next = end;
        Ok(first)
    }

    fn one_time_key(
        &self,
        device: &DeviceKey,
        public_key: &[u8; 32],
    ) -> Result<Option<OneTimeKeyRecord>, StoreError> {
        // One read: the record is keyed by the public key.
        let Some(raw) = self.db.get(layout::otk(device, public_key))? else {
            return Ok(None);
        };
        let key_id = otk_id(&raw)?;
        let secret = self
            .sealer
            .open(
                &layout::otk_seal_slot(device, public_key, key_id),
                &raw[8..],
            )
            .ok_or_else(|| StoreError::Corrupt {
                what: "one-time key secret".into(),
            })?;
        let secret_key = Zeroizing::new(<[u8; 32]>::try_from(secret.as_slice()).map_err(|_| {
            StoreError::Corrupt {
                what: "one-time key length".into(),
            }
        })?);
        Ok(Some(OneTimeKeyRecord {
            key_id,
            public_key: *public_key,
            secret_key,
        }))
    }

    /// A device's keys are stored by public key, so this reads all of them
    /// (at most the manager's outstanding-key bound, and only when a claim
    /// goes over it) and sorts them by id: ids increase in the order keys
    /// were stored (one process, one sequence).
    fn oldest_one_time_keys(
        &self,
        device: &DeviceKey,
        limit: usize,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = layout::otk_prefix(device);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (k, v) = item?;
            let public =
                <[u8; 32]>::try_from(&k[prefix.len()..]).map_err(|_| StoreError::Corrupt {
                    what: "one-time key record key".into(),
                })?;
            out.push((otk_id(&v)?, public));
        }
        if out.len() > limit {
            out.select_nth_unstable(limit);
            out.truncate(limit);
        }
        out.sort_unstable();
        Ok(out)
    }

    fn count_one_time_keys(&self, device: &DeviceKey) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.db.scan_prefix(layout::otk_prefix(device)).keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    fn load_session(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
        session_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let slot = layout::olm_session(device, peer_key, session_id);
        let Some(raw) = self.db.get(&slot)? else {
            return Ok(None);
        };
        self.open_session(&slot, peer_key, session_id.to_owned(), &raw)
            .map(Some)
    }

    fn sessions(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let prefix = layout::peer_sessions(device, peer_key);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (slot, raw) = item?;
            let id = String::from_utf8(slot[prefix.len()..].to_vec()).map_err(|_| {
                StoreError::Corrupt {
                    what: "session id".into(),
                }
            })?;
            out.push(self.open_session(&slot, peer_key, id, &raw)?);
        }
        Ok(out)
    }

    fn session_stamps(&self, device: &DeviceKey) -> Result<Vec<crate::SessionStamp>, StoreError> {
        let prefix = layout::device_sessions(device);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (slot, raw) = item?;
            let corrupt = || StoreError::Corrupt {
                what: "session record".into(),
            };
            let rest = &slot[prefix.len()..];
            let peer =
                <[u8; 32]>::try_from(rest.get(..32).ok_or_else(corrupt)?).map_err(|_| corrupt())?;
            let id = String::from_utf8(rest[32..].to_vec()).map_err(|_| corrupt())?;
            let used = <[u8; 8]>::try_from(raw.get(..8).ok_or_else(corrupt)?)
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt())?;
            out.push((peer, id, used));
        }
        Ok(out)
    }

    fn legacy_sessions(&self, device: &DeviceKey) -> Result<Vec<crate::LegacySession>, StoreError> {
        let prefix = layout::legacy_session_prefix(device);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (slot, raw) = item?;
            let corrupt = || StoreError::Corrupt {
                what: "schema 1 session".into(),
            };
            let id = String::from_utf8(slot[prefix.len()..].to_vec()).map_err(|_| corrupt())?;
            let pickle = self.sealer.open(&slot, &raw).ok_or_else(corrupt)?;
            out.push((id, pickle));
        }
        Ok(out)
    }

    fn write_sessions(
        &self,
        device: &DeviceKey,
        write: SessionWrite,
    ) -> Result<Pending, StoreError> {
        // Sealed outside the transaction: its closure may run more than once.
        let put = self.seal_sessions(device, &write.put);
        let delivery = self.seal_delivery(device, write.delivery.as_ref());
        // A transaction, not a batch, for the version checks: sled runs
        // concurrent transactions on a key one after the other, and applies
        // each atomically, after a crash too.
        let outcome = self.db.transaction(|tx| {
            for (peer, id) in &write.remove {
                tx.remove(layout::olm_session(device, peer, id))?;
            }
            for id in &write.remove_legacy {
                tx.remove(layout::session(device, id))?;
            }
            for session in &put {
                self.check_session(tx, &session.slot, session.expected)?;
                tx.insert(session.slot.as_slice(), session.value.as_slice())?;
            }
            if let Some((slot, sealed)) = &delivery {
                tx.insert(slot.as_slice(), sealed.as_slice())?;
            }
            Ok(())
        });
        match outcome {
            Ok(()) => Ok(self.commit.pending()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn load_tracked_user(&self, user_id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(&layout::tracked_user(user_id), "tracked devices record")
    }

    fn write_tracked_user(
        &self,
        user_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.put_sealed(layout::tracked_user(user_id), record)
    }

    fn load_delivery(
        &self,
        device: &DeviceKey,
        tag: &str,
        message: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(&layout::delivery(tag, device, message), "delivery record")
    }

    fn forget_deliveries(&self, tag: &str) -> Result<Pending, StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.db.scan_prefix(layout::delivery_prefix(tag)).keys() {
            batch.remove(key?);
        }
        self.db.apply_batch(batch)?;
        Ok(self.commit.pending())
    }

    fn load_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
    ) -> Result<Option<OutboundSessionRecord>, StoreError> {
        let slot = layout::outbound_group_session(device, room_id);
        let Some(raw) = self.db.get(&slot)? else {
            return Ok(None);
        };
        let (version, data) =
            self.open_versioned(&slot, &raw)
                .ok_or_else(|| StoreError::Corrupt {
                    what: "outbound group session record".into(),
                })?;
        Ok(Some(OutboundSessionRecord { version, data }))
    }

    fn write_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
        expected: Option<Version>,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        let slot = layout::outbound_group_session(device, room_id);
        let value = record.map(|r| self.seal_versioned(&slot, Version::next(expected), r));
        let outcome = self.db.transaction(|tx| {
            let found = match tx.get(&slot)? {
                None => None,
                Some(raw) => Some(
                    self.open_versioned(&slot, &raw)
                        .map(|(version, _)| version)
                        .ok_or_else(|| {
                            ConflictableTransactionError::Abort(StoreError::Corrupt {
                                what: "outbound group session record".into(),
                            })
                        })?,
                ),
            };
            if found != expected {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                    expected,
                    found,
                }));
            }
            match &value {
                Some(value) => tx.insert(slot.as_slice(), value.as_slice())?,
                None => tx.remove(slot.as_slice())?,
            };
            Ok(())
        });
        match outcome {
            Ok(()) => Ok(self.commit.pending()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn load_group_session(
        &self,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(
            &layout::group_session(room_id, session_id),
            "group session record",
        )
    }

    fn write_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        record: &[u8],
    ) -> Result<Pending, StoreError> {
        self.put_sealed(layout::group_session(room_id, session_id), Some(record))
    }

    fn record_message_index(
        &self,
        room_id: &str,
        session_id: &str,
        index: u32,
        event_id: &str,
    ) -> Result<IndexUse, StoreError> {
        let slot = layout::message_index(room_id, session_id, index);
        match self
            .db
            .compare_and_swap(&slot, None as Option<&[u8]>, Some(event_id.as_bytes()))?
        {
            Ok(()) => Ok(IndexUse::First),
            Err(found) if found.current.as_deref() == Some(event_id.as_bytes()) => {
                Ok(IndexUse::SameEvent)
            }
            Err(_) => Ok(IndexUse::OtherEvent),
        }
    }

    fn hold_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.put_sealed(layout::held_event(room_id, session_id, event_id), record)
    }

    /// Compared on the one record (the trait default would list the whole
    /// session's held events for each), then written; one process only
    /// opens a sled store, and its caller's lock covers its other writers.
    fn replace_held_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        let slot = layout::held_event(room_id, session_id, event_id);
        let stored = self.get_sealed(&slot, "held event")?;
        if stored.as_deref().map(Vec::as_slice) != expected {
            return Ok(None);
        }
        self.put_sealed(slot, record).map(Some)
    }

    fn held_events(&self, session: Option<(&str, &str)>) -> Result<Vec<HeldEvent>, StoreError> {
        let prefix = match session {
            Some((room, session)) => layout::held_session_prefix(room, session),
            None => layout::HELD_PREFIX.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (slot, raw) = item?;
            let corrupt = || StoreError::Corrupt {
                what: "held event".into(),
            };
            let (room_id, session_id, event_id) =
                layout::parse_held_event(&slot).ok_or_else(corrupt)?;
            let record = self.sealer.open(&slot, &raw).ok_or_else(corrupt)?;
            out.push(HeldEvent {
                room_id,
                session_id,
                event_id,
                record,
            });
        }
        Ok(out)
    }

    fn load_room_state(&self, room_id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(&layout::room_state(room_id), "room state record")
    }

    fn write_room_state(
        &self,
        room_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.put_sealed(layout::room_state(room_id), record)
    }

    fn room_state_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(layout::ROOM_STATE_PREFIX) {
            let (slot, _) = item?;
            let id = slot
                .strip_prefix(layout::ROOM_STATE_PREFIX)
                .and_then(|id| std::str::from_utf8(id).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    what: "room state key".into(),
                })?;
            out.push(id.to_owned());
        }
        Ok(out)
    }

    fn load_cross_signing(&self, user_id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(&layout::cross_signing(user_id), "cross-signing record")
    }

    fn create_cross_signing(
        &self,
        user_id: &str,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        let slot = layout::cross_signing(user_id);
        let sealed = self.sealer.seal(&slot, record);
        match self
            .db
            .compare_and_swap(&slot, None as Option<&[u8]>, Some(sealed))?
        {
            Ok(()) => Ok(Some(self.commit.pending())),
            Err(_) => Ok(None),
        }
    }

    fn sync(&self) -> Pending {
        self.commit.pending()
    }

    fn commit_stats(&self) -> CommitStats {
        self.commit.stats()
    }

    /// One process holds a sled store (its directory is locked), so the
    /// handle is the only writer.
    fn sole_writer(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fresh(dir: &Path) -> SledStore {
        SledStore::create(SledStoreConfig::new(
            dir.join("store"),
            StoreKey::generate(),
        ))
        .unwrap()
    }

    /// Session and outbound Megolm records written before they carried
    /// versions (schema 2: sealed to the slot alone) still read, as version
    /// 0; a write naming version 0 replaces them (in the new format), and
    /// one naming another version, or creating, is a conflict.
    #[test]
    fn records_from_before_session_versions_read_as_version_0_and_take_the_new_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh(dir.path());
        let dev = DeviceKey::new("@a:hs", "D");
        let peer = [4u8; 32];
        let slot = layout::olm_session(&dev, &peer, "s");
        let mut old_session = 7u64.to_be_bytes().to_vec();
        old_session.extend(store.sealer.seal(&slot, b"old pickle"));
        store.db.insert(&slot, old_session).unwrap();
        let room_slot = layout::outbound_group_session(&dev, "!r:hs");
        store
            .db
            .insert(&room_slot, store.sealer.seal(&room_slot, b"old outbound"))
            .unwrap();

        let read = store.load_session(&dev, &peer, "s").unwrap().unwrap();
        assert_eq!(
            (read.last_used, read.pickle.as_slice(), read.version),
            (7, &b"old pickle"[..], Some(Version(0)))
        );
        assert_eq!(
            store.session_stamps(&dev).unwrap(),
            vec![(peer, "s".to_owned(), 7)]
        );
        let out = store
            .load_outbound_group_session(&dev, "!r:hs")
            .unwrap()
            .unwrap();
        assert_eq!(
            (out.version, out.data.as_slice()),
            (Version(0), &b"old outbound"[..])
        );

        let put = |version: Option<Version>, pickle: &[u8]| SessionWrite {
            put: vec![SessionRecord {
                peer_key: peer,
                session_id: "s".into(),
                last_used: 8,
                pickle: Zeroizing::new(pickle.to_vec()),
                version,
            }],
            ..SessionWrite::default()
        };
        assert!(matches!(
            store.write_sessions(&dev, put(None, b"x")),
            Err(StoreError::Conflict {
                expected: None,
                found: Some(Version(0))
            })
        ));
        assert!(matches!(
            store.write_sessions(&dev, put(Some(Version(1)), b"x")),
            Err(StoreError::Conflict {
                found: Some(Version(0)),
                ..
            })
        ));
        drop(
            store
                .write_sessions(&dev, put(Some(Version(0)), b"new pickle"))
                .unwrap(),
        );
        let read = store.load_session(&dev, &peer, "s").unwrap().unwrap();
        assert_eq!(
            (read.pickle.as_slice(), read.version),
            (&b"new pickle"[..], Some(Version(1)))
        );
        let raw = store.db.get(&slot).unwrap().unwrap();
        assert_eq!(
            &raw[8..16],
            &1u64.to_be_bytes(),
            "the new format: a version field"
        );

        assert!(matches!(
            store.write_outbound_group_session(&dev, "!r:hs", None, Some(b"x")),
            Err(StoreError::Conflict {
                expected: None,
                found: Some(Version(0))
            })
        ));
        drop(
            store
                .write_outbound_group_session(
                    &dev,
                    "!r:hs",
                    Some(Version(0)),
                    Some(b"new outbound"),
                )
                .unwrap(),
        );
        let out = store
            .load_outbound_group_session(&dev, "!r:hs")
            .unwrap()
            .unwrap();
        assert_eq!(
            (out.version, out.data.as_slice()),
            (Version(1), &b"new outbound"[..])
        );
    }

    /// A versioned record is sealed to its version: one whose version field
    /// was changed on disk does not open (it is not read as another version,
    /// nor as a record from before versions).
    #[test]
    fn a_versioned_record_whose_version_was_changed_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh(dir.path());
        let dev = DeviceKey::new("@a:hs", "D");
        drop(
            store
                .write_outbound_group_session(&dev, "!r:hs", None, Some(b"v1"))
                .unwrap(),
        );
        let slot = layout::outbound_group_session(&dev, "!r:hs");
        let mut raw = store.db.get(&slot).unwrap().unwrap().to_vec();
        raw[7] = 5;
        store.db.insert(&slot, raw).unwrap();
        assert!(matches!(
            store.load_outbound_group_session(&dev, "!r:hs"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// A one-time key record is sealed to its device, public key and key
    /// id: the same value under another public key or another device, or
    /// with its id field changed, does not open (so a record cannot be
    /// moved to stand for another key or renumbered).
    #[test]
    fn a_one_time_key_record_moved_or_renumbered_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh(dir.path());
        let dev = DeviceKey::new("@a:hs", "D");
        let other = DeviceKey::new("@a:hs", "E");
        let first = store.reserve_key_ids(1).unwrap();
        drop(
            store
                .append_keys(
                    &dev,
                    KeyAppend {
                        add_keys: vec![OneTimeKeyRecord {
                            key_id: first,
                            public_key: [1; 32],
                            secret_key: Zeroizing::new([2; 32]),
                        }],
                        evict_keys: Vec::new(),
                    },
                )
                .unwrap(),
        );
        let raw = store.db.get(layout::otk(&dev, &[1; 32])).unwrap().unwrap();
        assert_eq!(
            raw.len(),
            8 + crate::crypto::SEAL_OVERHEAD + 32,
            "one value: id and sealed key"
        );
        store
            .db
            .insert(layout::otk(&dev, &[3; 32]), raw.clone())
            .unwrap();
        store
            .db
            .insert(layout::otk(&other, &[1; 32]), raw.clone())
            .unwrap();
        let mut renumbered = raw.to_vec();
        renumbered[7] ^= 1;
        store
            .db
            .insert(layout::otk(&dev, &[4; 32]), renumbered)
            .unwrap();
        for (d, public) in [(&dev, [3; 32]), (&other, [1; 32]), (&dev, [4; 32])] {
            assert!(
                matches!(
                    store.one_time_key(d, &public),
                    Err(StoreError::Corrupt { .. })
                ),
                "{d:?} {public:?} opened"
            );
        }
        let k = store.one_time_key(&dev, &[1; 32]).unwrap().unwrap();
        assert_eq!((k.key_id, *k.secret_key), (first, [2; 32]));
    }
}
