//! [`AccountManager`]: the claim path and the inbound pre-key path.

use std::{collections::BTreeMap, sync::Arc};

use bridgekeys_store::{
    DeviceKey, DeviceWrite, KeyAppend, OneTimeKeyRecord, Pending, Store, Version,
};
use dashmap::DashMap;
use parking_lot::Mutex;
use ruma::{
    CrossSigningOrDeviceSignatures, DeviceId, DeviceKeyAlgorithm, DeviceKeyId, DeviceSigningKeyId,
    EventEncryptionAlgorithm, OneTimeKeyAlgorithm, OwnedOneTimeKeyId, SigningKeyAlgorithm, UserId,
    encryption::{DeviceKeys, SignedKey},
};
use vodozemac::{Curve25519PublicKey, Curve25519SecretKey};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    ManagerConfig, ManagerStats, OlmError,
    account::{DeviceAccount, key_id_string},
    stats::Counters,
};

/// A one-time key handed out by a claim: its id (`signed_curve25519:<id>`)
/// and the signed key object, ready for a `keys/claim` response.
#[derive(Clone, Debug)]
pub struct ClaimedKey {
    /// `signed_curve25519:<base64 key id>`.
    pub key_id: OwnedOneTimeKeyId,
    /// `{"key": ..., "signatures": {user: {"ed25519:<device>": ...}}}`.
    pub key: SignedKey,
}

pub(crate) type Slot = Arc<Mutex<DeviceAccount>>;

/// The load gates of devices being loaded, by device (each holds what the
/// last load through it found when it cached nothing, [`Missed`]), and the
/// clock that orders arrivals at the gates and the answers recorded there.
#[derive(Default)]
struct LoadGates {
    gates: DashMap<DeviceKey, Arc<tokio::sync::Mutex<Option<Missed>>>>,
    clock: std::sync::atomic::AtomicU64,
}

impl LoadGates {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Why a load through a gate cached no device, and when ([`LoadGates`]'
/// clock). The callers that were already queued behind it get the same
/// answer instead of each reading again, one after another (a stalled
/// database would otherwise hold the last of N queued callers for N
/// operation timeouts). A caller that arrives after the answer reads for
/// itself: the device may have been created, or the database recovered,
/// since.
#[derive(Debug)]
struct Missed {
    at: u64,
    why: MissedWhy,
}

#[derive(Debug)]
enum MissedWhy {
    /// The store has no such device.
    Unknown,
    /// The read failed, with this error's message. Queued callers get it
    /// as [`bridgekeys_store::StoreError::Engine`]: the variant of the
    /// first caller's error is not kept.
    Failed(String),
}

impl Missed {
    fn to_error(&self, user_id: &UserId, device_id: &DeviceId) -> OlmError {
        match &self.why {
            MissedWhy::Unknown => OlmError::UnknownDevice {
                user_id: user_id.to_string(),
                device_id: device_id.to_string(),
            },
            MissedWhy::Failed(reason) => OlmError::Store(bridgekeys_store::StoreError::Engine(
                format!("a concurrent load of this device failed: {reason}").into(),
            )),
        }
    }
}

/// A caller's place at a device's load gate. It takes the gate from the map
/// (or puts one there), and when dropped, also when the caller's future is
/// dropped mid-load, the last caller holding the gate removes it, so
/// the map only holds devices being loaded right now.
struct LoadTicket<'a> {
    gates: &'a LoadGates,
    key: &'a DeviceKey,
    gate: Option<Arc<tokio::sync::Mutex<Option<Missed>>>>,
    /// When this caller arrived ([`LoadGates`]' clock).
    arrived: u64,
}

impl<'a> LoadTicket<'a> {
    fn new(gates: &'a LoadGates, key: &'a DeviceKey) -> Self {
        let gate = Arc::clone(gates.gates.entry(key.clone()).or_default().value());
        Self {
            gates,
            key,
            gate: Some(gate),
            arrived: gates.tick(),
        }
    }

    /// What the load before this caller's turn found, if it cached nothing
    /// and this caller was already waiting then.
    fn missed_while_queued<'g>(&self, held: Option<&'g Option<Missed>>) -> Option<&'g Missed> {
        held.and_then(Option::as_ref)
            .filter(|missed| self.arrived < missed.at)
    }

    /// Record in the held gate that this caller's load cached nothing.
    fn record(&self, held: Option<&mut Option<Missed>>, why: MissedWhy) {
        if let Some(held) = held {
            *held = Some(Missed {
                at: self.gates.tick(),
                why,
            });
        }
    }

    /// Wait for this caller's turn to load the device.
    async fn turn(&self) -> Option<tokio::sync::MutexGuard<'_, Option<Missed>>> {
        match &self.gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }
}

impl Drop for LoadTicket<'_> {
    fn drop(&mut self) {
        let Some(gate) = self.gate.take() else { return };
        let ours = Arc::as_ptr(&gate);
        // Let go of our share first: whichever caller lets go last then
        // sees the map's share alone and removes the entry (the check runs
        // under the map's shard lock, where new callers take their share).
        drop(gate);
        self.gates.gates.remove_if(self.key, |_, g| {
            Arc::as_ptr(g) == ours && Arc::strong_count(g) == 1
        });
    }
}

/// Owns the Olm accounts of a bridge's puppet devices.
///
/// Each device's state sits behind its own lock (a sharded map of slots), so
/// claims for one device are serialised while claims for different devices
/// run in parallel. A lock is held only for the synchronous part of a claim
/// (generate, sign, apply the write); the wait for durability happens after
/// it is released, so concurrent claims share one flush.
pub struct AccountManager {
    pub(crate) store: Arc<dyn Store>,
    config: ManagerConfig,
    slots: DashMap<DeviceKey, Slot>,
    /// One gate per device being loaded by [`Self::existing_slot_later`]:
    /// concurrent claims of one uncached device take turns, so the first
    /// reads it and the others find it cached (see [`LoadTicket`]).
    loading: LoadGates,
    /// Held while the cache shrinks, so one caller does it at a time.
    shrinking: Mutex<()>,
    pub(crate) counters: Counters,
    /// Serialises writes of tracked-device records.
    pub(crate) tracking: Mutex<()>,
    /// Serialises compare-and-replace of group session records.
    pub(crate) group_sessions: Mutex<()>,
    /// Decoded inbound group sessions, advanced to the last index they
    /// decrypted (see [`crate::megolm`]).
    pub(crate) group_cache: crate::megolm::GroupCache,
    /// The last `last_used` stamp given to a session (see [`Self::session_clock`]).
    session_stamp: std::sync::atomic::AtomicU64,
    /// Eviction warnings, at most one a minute.
    eviction_warnings: crate::throttle::Throttle,
    /// Whether a loaded record confirmed how cold devices read the pickle
    /// (see [`crate::account`]).
    pub(crate) layout: crate::account::LayoutCheck,
}

impl std::fmt::Debug for AccountManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountManager")
            .field("config", &self.config)
            .field("loaded_devices", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl AccountManager {
    /// A manager over `store`.
    ///
    /// On a store that is its own [sole
    /// writer](bridgekeys_store::Store::sole_writer) (sled), give the handle
    /// one manager: the manager then trusts its own count of each device's
    /// outstanding keys and its cached accounts, and a second manager on the
    /// same handle would change keys behind them. Stores that other writers
    /// share (PostgreSQL, the in-memory test store) may back several
    /// managers, one per process; docs/STORAGE.md ("Sessions across
    /// processes") says what each then reads again from the store and what
    /// may lag.
    pub fn new(store: Arc<dyn Store>, config: ManagerConfig) -> Self {
        Self {
            store,
            config,
            slots: DashMap::new(),
            loading: LoadGates::default(),
            shrinking: Mutex::new(()),
            counters: Counters::default(),
            tracking: Mutex::new(()),
            group_sessions: Mutex::new(()),
            group_cache: crate::megolm::GroupCache::default(),
            session_stamp: std::sync::atomic::AtomicU64::new(0),
            eviction_warnings: crate::throttle::Throttle::new(std::time::Duration::from_secs(60)),
            layout: Default::default(),
        }
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// A `last_used` stamp for a session: wall-clock microseconds, but
    /// always above the previous stamp (and above every stamp read from the
    /// store, see [`Self::saw_session_stamp`]), so "most recently used" is
    /// exact within a run and stays right across restarts. (Milliseconds
    /// ran ahead of the clock under bursts, and a restarted process then
    /// stamped below the sessions used just before it.)
    pub(crate) fn session_clock(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut last = self.session_stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.session_stamp.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Keep the session clock above a stamp read from the store.
    pub(crate) fn saw_session_stamp(&self, stamp: u64) {
        self.session_stamp
            .fetch_max(stamp, std::sync::atomic::Ordering::Relaxed);
    }

    /// Run `attempt` until its session write does not lose a race to
    /// another process: a [`StoreError::Conflict`](bridgekeys_store::StoreError::Conflict)
    /// means the store refused the write and changed nothing, because the
    /// session was advanced since it was loaded; the attempt is then redone
    /// (it must reload what it read: `attempt` gets the attempt number, and
    /// every attempt after the first follows a conflict). At most
    /// [`ManagerConfig::session_write_attempts`] attempts, then
    /// [`OlmError::Contended`]. Nothing an attempt that conflicted computed
    /// (a ciphertext, a plaintext) is ever returned, so no message index or
    /// chain step is handed out twice.
    pub(crate) fn retry_conflicts<T>(
        &self,
        what: &'static str,
        mut attempt: impl FnMut(usize) -> Result<T, OlmError>,
    ) -> Result<T, OlmError> {
        let attempts = self.config.session_write_attempts.max(1);
        for n in 0..attempts {
            match attempt(n) {
                Err(OlmError::Store(bridgekeys_store::StoreError::Conflict {
                    expected,
                    found,
                })) => {
                    Counters::add(&self.counters.session_conflicts, 1);
                    tracing::debug!(
                        what,
                        attempt = n + 1,
                        ?expected,
                        ?found,
                        "a session write lost a race to another process: reloading and redoing it"
                    );
                }
                other => return other,
            }
        }
        tracing::warn!(
            what,
            attempts,
            "a session write lost every race to other processes"
        );
        Err(OlmError::Contended { what, attempts })
    }

    /// [`Self::retry_conflicts`] for an operation on a device's Olm
    /// sessions: after a conflict the device is reloaded from the store
    /// before the next attempt, so neither its account nor its cached
    /// schema 1 sessions are older than what the other process wrote.
    pub(crate) fn retry_device_conflicts<T>(
        &self,
        what: &'static str,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        mut attempt: impl FnMut(&mut DeviceAccount) -> Result<T, OlmError>,
    ) -> Result<T, OlmError> {
        self.retry_conflicts(what, |n| {
            if n > 0 {
                self.reload(device, key);
                // Even if the reload failed, the cached schema 1 sessions
                // must be read again.
                device.legacy = None;
            }
            attempt(device)
        })
    }

    /// The store this manager writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Counters since the manager started.
    pub fn stats(&self) -> ManagerStats {
        self.counters.snapshot()
    }

    /// Devices whose decoded account is held in memory (loaded by a claim,
    /// a pre-key message or a fallback change), at most about
    /// [`ManagerConfig::max_cached_devices`]; a rotation pass over idle
    /// devices does not load them.
    pub fn loaded_devices(&self) -> usize {
        self.slots.len()
    }

    /// Whether the device's account is in the cache.
    pub(crate) fn is_loaded(&self, key: &DeviceKey) -> bool {
        self.slots.contains_key(key)
    }

    /// Create the Olm account of a puppet device, durably, and return its
    /// signed `device_keys` object for `/keys/upload`.
    ///
    /// Idempotent: for a device that already exists the same keys come back,
    /// so a provisioning retry never replaces identity keys.
    pub async fn create_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<DeviceKeys, OlmError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        if let Some(slot) = self.slot(&key)? {
            let keys = device_keys(&mut slot.lock(), user_id, device_id)?;
            // It may have been created a moment ago by a call still waiting
            // for its flush: answer only once that flush is done too.
            self.store.sync().durable().await?;
            return Ok(keys);
        }
        let mut device = DeviceAccount::new();
        let write = DeviceWrite {
            account: device.encode()?,
            ..DeviceWrite::default()
        };
        let pending = match self.store.write_device(&key, None, write) {
            Ok(p) => p,
            // Lost a race with a concurrent create: the winner's keys stand.
            Err(bridgekeys_store::StoreError::Conflict { .. }) => {
                return Box::pin(self.create_device(user_id, device_id)).await;
            }
            Err(e) => return Err(e.into()),
        };
        device.version = Some(Version::next(None));
        let keys = device_keys(&mut device, user_id, device_id)?;
        self.cache(key, device);
        pending.durable().await?;
        Counters::add(&self.counters.devices_created, 1);
        tracing::info!(%user_id, %device_id, "created device account");
        Ok(keys)
    }

    /// Create the Olm accounts of many puppet devices, durably, without
    /// keeping them in memory: for provisioning a bridge's puppets in bulk
    /// (a migration, a benchmark). Devices that exist already are left as
    /// they are. Returns how many were created.
    ///
    /// CPU-bound (about 50 µs of key generation per device) and
    /// synchronous until the final flush: split large lists over a few
    /// tasks. Fetch each device's keys for upload with
    /// [`Self::device_keys`] when its turn comes.
    pub async fn create_devices<'a>(
        &self,
        devices: impl IntoIterator<Item = (&'a UserId, &'a DeviceId)>,
    ) -> Result<usize, OlmError> {
        let mut created = 0;
        for (user_id, device_id) in devices {
            let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
            let write = DeviceWrite {
                account: DeviceAccount::new().encode()?,
                ..DeviceWrite::default()
            };
            match self.store.write_device(&key, None, write) {
                Ok(_) => created += 1,
                Err(bridgekeys_store::StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // One flush covers every write above.
        self.store.sync().durable().await?;
        Counters::add(&self.counters.devices_created, created as u64);
        tracing::info!(created, "created device accounts in bulk");
        Ok(created)
    }

    /// The signed `device_keys` of an existing device.
    pub fn device_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<DeviceKeys, OlmError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot(&key, user_id, device_id)?;
        let mut device = slot.lock();
        device_keys(&mut device, user_id, device_id)
    }

    /// The device's identity keys (ed25519, curve25519).
    pub fn identity_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<vodozemac::olm::IdentityKeys, OlmError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot(&key, user_id, device_id)?;
        let keys = slot.lock().account()?.identity_keys();
        Ok(keys)
    }

    /// Hand out `count` fresh signed one-time keys of a device.
    ///
    /// The keys' private halves are on disk before this returns, so a key
    /// that was returned can always start a session later; their ids come
    /// from the store's sequence, so no key id is ever issued twice,
    /// whatever crashes. The account itself is not written.
    /// Unknown devices are refused, never created on the fly.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use bridgekeys_olm::{AccountManager, ManagerConfig, canonical_json_for_signing};
    /// use bridgekeys_store::{SledStore, SledStoreConfig, StoreKey};
    /// use ruma::{OneTimeKeyAlgorithm, device_id, user_id};
    /// use vodozemac::Ed25519Signature;
    ///
    /// # let dir = tempfile::tempdir()?;
    /// let store = SledStore::create(SledStoreConfig::new(dir.path().join("keys"), StoreKey::generate()))?;
    /// let manager = AccountManager::new(Arc::new(store), ManagerConfig::default());
    /// let (puppet, device) = (user_id!("@echo_alice:example.org"), device_id!("PUPPETDEV"));
    /// manager.create_device(puppet, device).await?;
    ///
    /// let keys = manager.claim(puppet, device, &OneTimeKeyAlgorithm::SignedCurve25519, 2).await?;
    /// assert_eq!(keys.len(), 2);
    /// assert_ne!(keys[0].key_id, keys[1].key_id, "no key id is handed out twice");
    /// // Each key is signed by the puppet device's ed25519 key.
    /// let ed25519 = manager.identity_keys(puppet, device)?.ed25519;
    /// for claimed in &keys {
    ///     let signature = claimed.key.signatures[puppet].values().next().ok_or("unsigned")?;
    ///     ed25519.verify(
    ///         canonical_json_for_signing(&claimed.key)?.as_bytes(),
    ///         &Ed25519Signature::from_base64(signature)?,
    ///     )?;
    /// }
    /// // A device the bridge never created gets nothing.
    /// assert!(manager.claim(puppet, device_id!("OTHER"), &OneTimeKeyAlgorithm::SignedCurve25519, 1).await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn claim(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        algorithm: &OneTimeKeyAlgorithm,
        count: usize,
    ) -> Result<Vec<ClaimedKey>, OlmError> {
        if *algorithm != OneTimeKeyAlgorithm::SignedCurve25519 {
            return Err(OlmError::UnsupportedAlgorithm(algorithm.to_string()));
        }
        let max = self
            .config
            .max_keys_per_claim
            .min(self.config.max_outstanding_keys);
        if count == 0 || count > max {
            return Err(OlmError::BadKeyCount {
                requested: count,
                max,
            });
        }
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot_later(&key, user_id, device_id).await?;
        let (claimed, pending) = {
            let mut device = slot.lock();
            match self.claim_locked(&mut device, &key, user_id, device_id, count) {
                Ok(done) => done,
                Err(e) => {
                    // Part of the append may have been applied: reload, so
                    // the outstanding-key count is recounted from the store.
                    self.reload(&mut device, &key);
                    return Err(e);
                }
            }
        };
        if let Err(e) = pending.durable().await {
            // The keys may never have been stored (a backend that commits
            // claims in batches stores none of a failed batch): an inflated
            // count would later evict keys already handed out. So take them
            // off the count (counting low only lets the bound be passed
            // until the next load), then recount if the store answers.
            let mut device = slot.lock();
            device.outstanding = device.outstanding.saturating_sub(claimed.len() as u64);
            self.reload(&mut device, &key);
            return Err(e.into());
        }
        Counters::add(&self.counters.claims, 1);
        Counters::add(&self.counters.keys_issued, claimed.len() as u64);
        Ok(claimed)
    }

    fn claim_locked(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        user_id: &UserId,
        device_id: &DeviceId,
        count: usize,
    ) -> Result<(Vec<ClaimedKey>, Pending), OlmError> {
        // Fresh key pairs straight from vodozemac, never entering the
        // account: the account does not change, so it is not rewritten. Ids
        // come from the store-wide sequence, which never repeats.
        let first_id = self.store.reserve_key_ids(count as u64)?;
        let mut records = Vec::with_capacity(count);
        let mut claimed = Vec::with_capacity(count);
        for key_id in first_id..first_id + count as u64 {
            let secret = Curve25519SecretKey::new();
            let public_key = Curve25519PublicKey::from(&secret);
            let mut bytes = secret.to_bytes();
            let secret_key = Zeroizing::new(*bytes);
            bytes.zeroize();
            records.push(OneTimeKeyRecord {
                key_id,
                public_key: public_key.to_bytes(),
                secret_key,
            });
            claimed.push(sign_one_time_key(
                device,
                user_id,
                device_id,
                key_id,
                &public_key,
            )?);
        }

        let bound = self.config.max_outstanding_keys as u64;
        let mut total = device.outstanding + count as u64;
        if total > bound && !self.store.sole_writer() {
            // Other processes claim and use this device's keys too, and our
            // count saw none of that: count again before evicting, so that a
            // key another process handed out a moment ago is not evicted
            // for a count that is only ours (see `Store::sole_writer`).
            total = self.store.count_one_time_keys(key)? as u64 + count as u64;
        }
        let excess = total.saturating_sub(bound) as usize;
        let evicted = if excess > 0 {
            self.store.oldest_one_time_keys(key, excess)?
        } else {
            Vec::new()
        };
        let outstanding = total - evicted.len() as u64;
        let append = KeyAppend {
            add_keys: records,
            evict_keys: evicted.clone(),
        };
        let pending = self.store.append_keys(key, append)?;
        device.outstanding = outstanding;
        if !evicted.is_empty() {
            Counters::add(&self.counters.evicted_keys, evicted.len() as u64);
            // One line a minute at most: at the bound, every claim evicts.
            if let Some(held) = self
                .eviction_warnings
                .note(std::time::Instant::now(), evicted.len() as u64)
            {
                tracing::warn!(
                    %user_id,
                    %device_id,
                    evicted = evicted.len(),
                    oldest_key_id = evicted[0].0,
                    bound = self.config.max_outstanding_keys,
                    evictions_not_logged = held.events,
                    keys_evicted_not_logged = held.amount,
                    "outstanding one-time keys over the bound: evicted the oldest \
                     (at most one such line a minute; the totals are in the metrics)"
                );
            }
        }
        Ok((claimed, pending))
    }

    /// The store key and slot of an existing device.
    pub(crate) fn slot_of(
        &self,
        from: (&UserId, &DeviceId),
    ) -> Result<(DeviceKey, Slot), OlmError> {
        let key = DeviceKey::new(from.0.as_str(), from.1.as_str());
        let slot = self.existing_slot(&key, from.0, from.1)?;
        Ok((key, slot))
    }

    /// [`Self::slot_of`] for a caller that can wait: an uncached device is
    /// loaded as [`Self::existing_slot_later`] does (awaited, one caller at
    /// a time per device). Claims, decryption, encryption, outbound
    /// sessions, Megolm and the fallback-key changes load their device this
    /// way. The synchronous calls ([`Self::device_keys`],
    /// [`Self::identity_keys`], [`Self::has_session`], the fallback-key
    /// reads) and [`Self::create_device`] block for it, and a device
    /// shared with other processes is brought up to date with blocking
    /// reads ([`Self::refresh`]).
    pub(crate) async fn slot_of_later(
        &self,
        from: (&UserId, &DeviceId),
    ) -> Result<(DeviceKey, Slot), OlmError> {
        let key = DeviceKey::new(from.0.as_str(), from.1.as_str());
        let slot = self.existing_slot_later(&key, from.0, from.1).await?;
        Ok((key, slot))
    }

    /// The slot of an existing device (loading it from the store on first
    /// use); `UnknownDevice` if it was never created.
    pub(crate) fn existing_slot(
        &self,
        key: &DeviceKey,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Slot, OlmError> {
        self.slot(key)?.ok_or_else(|| OlmError::UnknownDevice {
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
        })
    }

    /// [`Self::existing_slot`] for a caller that can wait: a device that is
    /// not cached is loaded with [`Store::load_account_counted_later`], so
    /// on a backend behind a network (PostgreSQL) the runtime's worker
    /// serves other tasks while the server answers, instead of blocking for
    /// the round trip. Claims, decryption, encryption and the fallback-key
    /// changes load their device this way: in a bridge that has just
    /// started, or has more puppets than its cache holds, most claims and
    /// many messages are a device's first use, and on two workers only two
    /// blocking loads could wait at once.
    ///
    /// Callers loading the same device take turns at its gate
    /// ([`LoadTicket`]): the first reads it, and the others find it cached
    /// when their turn comes (or, if they were already waiting when it
    /// came, get the same "unknown device" or store failure the first got,
    /// without reading again; a record that fails to decode is not shared). So a burst of claims for one
    /// puppet right after a start reads its record once, not once per
    /// claim, and among these loads no stale copy, read before another
    /// caller's copy was cached, used and evicted, can be cached after it
    /// with fewer keys counted than are stored (which would let the
    /// outstanding-key bound be passed until the device's next load).
    /// Loads of different devices do not wait for each other. A blocking
    /// load ([`Self::existing_slot`], for the synchronous calls and
    /// [`Self::create_device`]) does not take the gate, so that window
    /// stays open between it and a gated load: should it cache the device
    /// during the wait, the awaited copy is dropped undecoded and the first
    /// cached copy stands ([`Self::cache`]).
    pub(crate) async fn existing_slot_later(
        &self,
        key: &DeviceKey,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Slot, OlmError> {
        if let Some(slot) = self.cached_slot(key) {
            return Ok(slot);
        }
        let ticket = LoadTicket::new(&self.loading, key);
        let mut turn = ticket.turn().await;
        // A caller before us at the gate may have loaded it, or found
        // nothing, or failed: then so do we, without a read of our own.
        if let Some(slot) = self.cached_slot(key) {
            return Ok(slot);
        }
        if let Some(missed) = ticket.missed_while_queued(turn.as_deref()) {
            return Err(missed.to_error(user_id, device_id));
        }
        Counters::add(&self.counters.device_loads, 1);
        let loaded = match self.store.load_account_counted_later(key).answer().await {
            Ok(loaded) => loaded,
            Err(e) => {
                ticket.record(turn.as_deref_mut(), MissedWhy::Failed(e.to_string()));
                return Err(e.into());
            }
        };
        if let Some(slot) = self.cached_slot(key) {
            return Ok(slot);
        }
        let Some((record, outstanding)) = loaded else {
            ticket.record(turn.as_deref_mut(), MissedWhy::Unknown);
            return Err(OlmError::UnknownDevice {
                user_id: user_id.to_string(),
                device_id: device_id.to_string(),
            });
        };
        let device = DeviceAccount::decode(&record, outstanding as u64, &self.layout)?;
        Ok(self.cache(key.clone(), device))
    }

    /// Replace a cached account with the stored one after a failed write.
    /// If even that read fails, the cached copy stays as it was.
    pub(crate) fn reload(&self, device: &mut DeviceAccount, key: &DeviceKey) {
        match self.load(key) {
            Ok(Some(fresh)) => *device = fresh,
            // The slot stays (removing a locked slot would let a second,
            // independent copy of the device appear while this one is in
            // use): its account writes are still guarded by the version,
            // and sessions are read from the store on every use.
            _ => tracing::warn!(?key, "could not reload a device after a failed write"),
        }
    }

    /// On a store other processes share (not its [sole
    /// writer](Store::sole_writer)), bring a cached device up to what is
    /// stored before acting on its account or fallback keys. Another
    /// process may have rotated, published or forgotten a fallback key since
    /// this copy was loaded (its write moved the version), and a cached copy
    /// is otherwise reloaded only after one of our own writes or claims
    /// failed: a pre-key message on the new fallback key would be refused,
    /// and a read of the published key would hand out the old one.
    ///
    /// Costs one read of the record's version
    /// ([`Store::account_version`]: on PostgreSQL the column alone, nothing
    /// opened) and, when another process wrote the device since (any
    /// rotation, publication or new inbound session there moves the
    /// version), a read of the record, a decode and a count of its keys.
    /// Nothing on a sole writer.
    ///
    /// The schema 1 sessions read into the copy (`legacy`) are kept: a
    /// caller may be between reading them and writing the sessions, and the
    /// session writes are compare-and-swap on their own versions anyway.
    pub(crate) fn refresh(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
    ) -> Result<(), OlmError> {
        if self.store.sole_writer() {
            return Ok(());
        }
        let stored = self.store.account_version(key)?;
        if stored.is_none() || stored == device.version {
            return Ok(());
        }
        Counters::add(&self.counters.device_loads, 1);
        let Some((record, outstanding)) = self.store.load_account_counted(key)? else {
            return Ok(());
        };
        let outstanding = outstanding as u64;
        let legacy = device.legacy.take();
        *device = DeviceAccount::decode(&record, outstanding, &self.layout)?;
        device.legacy = legacy;
        Ok(())
    }

    /// A device as stored, with its outstanding keys counted, or `None`.
    fn load(&self, key: &DeviceKey) -> Result<Option<DeviceAccount>, OlmError> {
        Counters::add(&self.counters.device_loads, 1);
        let Some((record, outstanding)) = self.store.load_account_counted(key)? else {
            return Ok(None);
        };
        DeviceAccount::decode(&record, outstanding as u64, &self.layout).map(Some)
    }

    /// The cached slot, or the device loaded from the store, or `None`.
    /// Unknown devices never get a slot, so bad input cannot grow the map.
    fn slot(&self, key: &DeviceKey) -> Result<Option<Slot>, OlmError> {
        if let Some(slot) = self.cached_slot(key) {
            return Ok(Some(slot));
        }
        let Some(device) = self.load(key)? else {
            return Ok(None);
        };
        Ok(Some(self.cache(key.clone(), device)))
    }

    /// The cached slot, marked as used, or `None`.
    fn cached_slot(&self, key: &DeviceKey) -> Option<Slot> {
        let slot = self.slots.get(key)?;
        // A slot that is locked is in use: it will not be evicted anyway.
        if let Some(mut device) = slot.try_lock() {
            device.recently_used = true;
        }
        Some(Arc::clone(&slot))
    }

    /// Put a loaded or new device in the cache (unless another caller just
    /// did: theirs stands), shrinking the cache if it is over its bound.
    fn cache(&self, key: DeviceKey, device: DeviceAccount) -> Slot {
        let slot = Arc::clone(
            &self
                .slots
                .entry(key)
                .or_insert_with(|| Arc::new(Mutex::new(device))),
        );
        if self.slots.len() > self.config.max_cached_devices {
            self.shrink_cache();
        }
        slot
    }

    /// Evict idle devices until the cache is an eighth below its bound
    /// (second chance: a device used since the last pass stays once more).
    ///
    /// Only slots nobody else holds are evicted, checked under the map's
    /// shard lock, so a device never has two live copies. A copy would be
    /// harmless for key ids (they are store-wide) but could lose a fallback
    /// change to a compare-and-swap conflict.
    fn shrink_cache(&self) {
        let Some(_one_at_a_time) = self.shrinking.try_lock() else {
            return;
        };
        let bound = self.config.max_cached_devices;
        let excess = self.slots.len().saturating_sub(bound - bound / 8);
        let mut evicted = 0;
        for _pass in 0..2 {
            self.slots.retain(|_, slot| {
                if evicted >= excess || Arc::strong_count(slot) > 1 {
                    return true;
                }
                let Some(mut device) = slot.try_lock() else {
                    return true;
                };
                if std::mem::take(&mut device.recently_used) {
                    return true;
                }
                evicted += 1;
                false
            });
            if evicted >= excess {
                break;
            }
        }
        Counters::add(&self.counters.cache_evictions, evicted as u64);
        tracing::debug!(evicted, bound, "account cache shrunk");
    }
}

fn sign_one_time_key(
    device: &DeviceAccount,
    user_id: &UserId,
    device_id: &DeviceId,
    key_id: u64,
    public_key: &Curve25519PublicKey,
) -> Result<ClaimedKey, OlmError> {
    // A key pair generated for this one signature: the cold path may sign.
    let (mut signed, signature) = device.sign_one_time_key(public_key)?;
    signed.signatures.insert_signature(
        user_id.to_owned(),
        DeviceSigningKeyId::from_parts(SigningKeyAlgorithm::Ed25519, device_id),
        signature,
    );
    let key_id = key_id_string(key_id)?;
    Ok(ClaimedKey {
        key_id,
        key: signed,
    })
}

fn device_keys(
    device: &mut DeviceAccount,
    user_id: &UserId,
    device_id: &DeviceId,
) -> Result<DeviceKeys, OlmError> {
    let identity = device.account()?.identity_keys();
    let keys = BTreeMap::from([
        (
            DeviceKeyId::from_parts(DeviceKeyAlgorithm::Curve25519, device_id),
            identity.curve25519.to_base64(),
        ),
        (
            DeviceKeyId::from_parts(DeviceKeyAlgorithm::Ed25519, device_id),
            identity.ed25519.to_base64(),
        ),
    ]);
    let mut device_keys = DeviceKeys::new(
        user_id.to_owned(),
        device_id.to_owned(),
        vec![
            EventEncryptionAlgorithm::OlmV1Curve25519AesSha2,
            EventEncryptionAlgorithm::MegolmV1AesSha2,
        ],
        keys,
        CrossSigningOrDeviceSignatures::new(),
    );
    let signature = device.sign_json(&device_keys)?;
    device_keys.signatures.insert_signature(
        user_id.to_owned(),
        ruma::CrossSigningOrDeviceSigningKeyId::from_parts(
            SigningKeyAlgorithm::Ed25519,
            device_id.as_str().into(),
        ),
        signature,
    );
    Ok(device_keys)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A device's load gate lets one caller load at a time, and it leaves
    /// the map with the last caller holding it, whatever order they let go
    /// in (a claim's future may be dropped while it waits): the map holds
    /// only devices being loaded now, and bad input cannot grow it.
    #[tokio::test]
    async fn a_load_gate_admits_one_caller_and_leaves_with_the_last() {
        let gates = LoadGates::default();
        let key = DeviceKey::new("@alice:example.org", "PUPPET");

        let first = LoadTicket::new(&gates, &key);
        let turn = first.turn().await;
        let second = LoadTicket::new(&gates, &key);
        assert!(
            tokio::time::timeout(Duration::ZERO, second.turn())
                .await
                .is_err(),
            "the second caller waits while the first loads"
        );
        drop(turn);
        drop(first);
        assert_eq!(
            gates.gates.len(),
            1,
            "the second caller still holds the gate"
        );
        assert!(
            tokio::time::timeout(Duration::ZERO, second.turn())
                .await
                .is_ok(),
            "the second caller's turn comes when the first is done"
        );
        drop(second);
        assert!(
            gates.gates.is_empty(),
            "the last caller out removed the gate"
        );

        let first = LoadTicket::new(&gates, &key);
        let second = LoadTicket::new(&gates, &key);
        drop(second);
        assert_eq!(
            gates.gates.len(),
            1,
            "the first caller still holds the gate"
        );
        drop(first);
        assert!(gates.gates.is_empty(), "dropped in the other order, too");
    }

    /// A load that cached nothing answers the callers that were already
    /// waiting at the gate, and not one that arrived after it answered (the
    /// device may have been created since): that one reads for itself.
    #[tokio::test]
    async fn only_callers_queued_during_a_load_share_what_it_missed() {
        let gates = LoadGates::default();
        let key = DeviceKey::new("@alice:example.org", "PUPPET");
        let first = LoadTicket::new(&gates, &key);
        let queued = LoadTicket::new(&gates, &key);
        {
            let mut turn = first.turn().await;
            first.record(turn.as_deref_mut(), MissedWhy::Unknown);
        }
        drop(first);
        let late = LoadTicket::new(&gates, &key);
        let turn = queued.turn().await;
        assert!(
            queued.missed_while_queued(turn.as_deref()).is_some(),
            "a caller queued during the load gets its answer"
        );
        drop(turn);
        let turn = late.turn().await;
        assert!(
            late.missed_while_queued(turn.as_deref()).is_none(),
            "a caller that came after the answer reads for itself"
        );
    }
}
