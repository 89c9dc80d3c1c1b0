//! One-time keys where the homeserver does not ask the bridge for them.
//!
//! MSC3983 (the homeserver proxying `keys/claim` to the appservice) is an
//! experimental flag in Synapse and absent from other homeservers. Without
//! it, a client claiming a puppet's keys gets only what was uploaded: with
//! nothing uploaded, every session with a puppet would start on its one
//! fallback key. So the bridge needs to know which case it is in, and in
//! the second keep a small uploaded pool:
//!
//! * **Detection** ([`KeyPool::detect`]): the appservice asks the
//!   homeserver to ping it (so a silent listener is not mistaken for "not
//!   proxied"), then claims a key of a probe device of its own sender
//!   through the client-server API. The probe device has no uploaded keys,
//!   so a proxying homeserver must ask our listener, which notes the probe
//!   and answers it with a marker instead of a key (`KeyPool::take_probe`,
//!   key id `signed_curve25519:bridgekeys_probe`). The marker in the
//!   homeserver's answer, or the probe seen by our own listener:
//!   [`ClaimMode::Proxied`]; neither: [`ClaimMode::Pool`]. Run at start
//!   and every [`PoolConfig::probe_interval`]; the mode is in `/metrics`,
//!   `/_bridgekeys/ready` and one log line when it changes. The marker is
//!   what makes detection work with several bridge processes behind one
//!   registration: the homeserver may ask another process's listener, which
//!   this one cannot see, but that listener's marker comes back in the
//!   answer (Synapse passes the appservice's key objects through
//!   untouched). That needs every process's listener to answer the probe:
//!   a build that answers with the marker, a [`KeyPool`] attached to its
//!   whole listener (not a bare [`crate::ClaimService`]), and the same
//!   sender and [`PoolConfig::probe_device_id`]. A listener that answers
//!   nothing (an older build, during a rolling upgrade) makes the probe read
//!   "not proxied", and the detecting process would then upload pools while
//!   claims are proxied (valid keys, but rows the homeserver need not
//!   hold): set the mode to `proxied` or `pool` until every process is
//!   upgraded. On a shared store, a detection that reads "not proxied" says
//!   so at `info` with that advice.
//! * **The pool** (only in [`ClaimMode::Pool`]): per puppet device, up to
//!   [`PoolConfig::size`] keys uploaded with `keys/upload` as the device.
//!   They are made by [`AccountManager::claim`], exactly like on-demand
//!   keys: durable before they are uploaded, single use, removed only when
//!   a pre-key message on them decrypts. A device gets a pool once it is
//!   contacted (one-time-key counts for it in a transaction, a to-device
//!   message to it, an invite of its user, or [`KeyPool::touch`]), so idle
//!   puppets cost the homeserver no rows. Counts in transactions (stable and
//!   MSC3202 names) are only a trigger: before uploading, the device's
//!   current count is read again (an empty `keys/upload`), so a stale count
//!   never overfills the pool. Contacted devices are also checked every
//!   [`PoolConfig::check_interval`], for homeservers that send no counts.
//! * **Proxied** (and unknown): nothing is uploaded and counts are ignored:
//!   a proxying homeserver reports 0 for our devices, and reacting to that
//!   would upload keys it then hands out before asking us (MSC3983).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use bridgekeys_olm::{AccountManager, OlmError};
use ruma::{DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, UserId};
use tokio::{sync::watch, task::JoinSet};

use crate::{DEFAULT_PUPPET_DEVICE_ID, HomeserverClient, HomeserverError};

/// How one-time keys of puppet devices reach the users who claim them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClaimMode {
    /// Not found out yet (or the homeserver could not reach the listener).
    /// Nothing is uploaded.
    Unknown,
    /// The homeserver asks the listener (MSC3983): keys are made on demand,
    /// none is uploaded.
    Proxied,
    /// The homeserver hands out uploaded keys only: contacted puppet
    /// devices keep a small uploaded pool.
    Pool,
}

impl ClaimMode {
    /// All modes, for metrics.
    pub const ALL: [ClaimMode; 3] = [ClaimMode::Unknown, ClaimMode::Proxied, ClaimMode::Pool];

    /// `unknown`, `proxied` or `pool`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Proxied => "proxied",
            Self::Pool => "pool",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Proxied => 1,
            Self::Pool => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Proxied,
            2 => Self::Pool,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for ClaimMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the mode is found out or fixed by the operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeSetting {
    /// Detect it at start and every [`PoolConfig::probe_interval`].
    #[default]
    Detect,
    /// The operator knows the homeserver proxies claims: never upload.
    Proxied,
    /// The operator knows it does not: always keep pools.
    Pool,
}

/// How the pool is kept.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Detect the mode or use a fixed one.
    pub mode: ModeSetting,
    /// Keys per contacted device on the homeserver after a top-up (default
    /// 10: a handful of new sessions between two top-ups, against 50 that
    /// bridges traditionally upload). At most the account manager's
    /// `max_keys_per_claim`.
    pub size: usize,
    /// Top up when the homeserver holds fewer than this many (default 5).
    pub refill_below: usize,
    /// How often the mode is detected again (default 10 minutes).
    pub probe_interval: Duration,
    /// How often contacted devices' counts are read (default 5 minutes),
    /// for homeservers that send no counts in transactions.
    pub check_interval: Duration,
    /// The puppet device an invite of a puppet user contacts (the
    /// provisioner's device id).
    pub puppet_device_id: OwnedDeviceId,
    /// The device of the appservice's sender used by the probe. It gets no
    /// keys: a claim for it is answered with the probe's marker only. Every
    /// process behind one registration must use the same one.
    pub probe_device_id: OwnedDeviceId,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: ModeSetting::Detect,
            size: 10,
            refill_below: 5,
            probe_interval: Duration::from_secs(600),
            check_interval: Duration::from_secs(300),
            puppet_device_id: DEFAULT_PUPPET_DEVICE_ID.into(),
            probe_device_id: "BRIDGEKEYS_PROBE".into(),
        }
    }
}

/// Why a pool step failed. Nothing is lost: keys made for an upload that
/// failed are durable and simply never handed out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The account manager failed (store, unknown device).
    #[error(transparent)]
    Olm(#[from] OlmError),
    /// The homeserver call failed.
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
}

/// Running totals, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Mode detections run.
    pub probes: u64,
    /// Probe claims this listener saw and answered with the marker (each
    /// one means "proxied"; the probe may have been sent by another process
    /// behind the same registration).
    pub probes_seen: u64,
    /// Uploads of new pool keys.
    pub uploads: u64,
    /// Pool keys uploaded.
    pub keys_uploaded: u64,
    /// Top-ups that failed (logged; retried at the next trigger).
    pub failures: u64,
    /// Devices contacted so far (those that keep a pool).
    pub contacted_devices: u64,
}

type DeviceRef = (OwnedUserId, OwnedDeviceId);

/// The mode detector and the uploaded pools of puppet devices. Share it
/// (`Arc`) between the listener ([`crate::Appservice::with_key_pool`]) and
/// its background task ([`KeyPool::start`]).
pub struct KeyPool {
    manager: Arc<AccountManager>,
    client: HomeserverClient,
    appservice_id: String,
    sender: OwnedUserId,
    config: PoolConfig,
    mode: AtomicU8,
    detecting: tokio::sync::Mutex<()>,
    contacted: Mutex<HashSet<DeviceRef>>,
    in_flight: Mutex<HashSet<DeviceRef>>,
    spawned: Mutex<JoinSet<()>>,
    provisioner: std::sync::OnceLock<Arc<crate::Provisioner>>,
    probes: AtomicU64,
    probes_seen: AtomicU64,
    uploads: AtomicU64,
    keys_uploaded: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPool")
            .field("mode", &self.mode())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Leaves the in-flight set when dropped.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<DeviceRef>>,
    device: DeviceRef,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.device);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key name of the marker the probe is answered with.
const PROBE_MARKER_NAME: &str = "bridgekeys_probe";

/// The marker's `key`: plainly not a curve25519 key (16 bytes, not 32).
const PROBE_MARKER_KEY: &[u8] = b"bridgekeys probe";

/// `signed_curve25519:bridgekeys_probe`: the id of the marker.
fn probe_marker_id() -> ruma::OwnedOneTimeKeyId {
    ruma::OneTimeKeyId::from_parts(
        ruma::OneTimeKeyAlgorithm::SignedCurve25519,
        PROBE_MARKER_NAME.into(),
    )
}

impl KeyPool {
    /// A pool keeper for the appservice `appservice_id` whose sender is
    /// `sender` (the registration's `id` and `@sender_localpart:server`),
    /// making keys with `manager` and uploading them with `client`.
    pub fn new(
        manager: Arc<AccountManager>,
        client: HomeserverClient,
        appservice_id: impl Into<String>,
        sender: OwnedUserId,
        config: PoolConfig,
    ) -> Self {
        let mode = match config.mode {
            ModeSetting::Detect => ClaimMode::Unknown,
            ModeSetting::Proxied => ClaimMode::Proxied,
            ModeSetting::Pool => ClaimMode::Pool,
        };
        Self {
            manager,
            client,
            appservice_id: appservice_id.into(),
            sender,
            config,
            mode: AtomicU8::new(mode.to_u8()),
            detecting: tokio::sync::Mutex::new(()),
            contacted: Mutex::default(),
            in_flight: Mutex::default(),
            spawned: Mutex::new(JoinSet::new()),
            provisioner: std::sync::OnceLock::new(),
            probes: AtomicU64::new(0),
            probes_seen: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            keys_uploaded: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Provision a puppet device again through `provisioner` when the
    /// homeserver answers a pool upload with "unknown device" (it deleted
    /// the device). Set once.
    pub fn with_provisioner(self, provisioner: Arc<crate::Provisioner>) -> Self {
        let _ = self.provisioner.set(provisioner);
        self
    }

    /// The current mode.
    pub fn mode(&self) -> ClaimMode {
        ClaimMode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Running totals.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            probes: self.probes.load(Ordering::Relaxed),
            probes_seen: self.probes_seen.load(Ordering::Relaxed),
            uploads: self.uploads.load(Ordering::Relaxed),
            keys_uploaded: self.keys_uploaded.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            contacted_devices: lock(&self.contacted).len() as u64,
        }
    }

    fn set_mode(&self, mode: ClaimMode) {
        let old = ClaimMode::from_u8(self.mode.swap(mode.to_u8(), Ordering::SeqCst));
        if old != mode {
            tracing::info!(from = %old, to = %mode, "one-time key claim mode changed");
        }
    }

    /// Find out whether the homeserver proxies claims (see the module
    /// docs); returns the mode now in force. With a fixed
    /// [`PoolConfig::mode`] nothing is sent. When the homeserver cannot
    /// reach the listener, or a call fails, the mode stays as it was.
    pub async fn detect(&self) -> ClaimMode {
        if self.config.mode != ModeSetting::Detect {
            return self.mode();
        }
        let _one_at_a_time = self.detecting.lock().await;
        self.probes.fetch_add(1, Ordering::Relaxed);
        // A claim the listener never sees means "not proxied" only if the
        // homeserver can reach the listener at all.
        match self.client.ping_appservice(&self.appservice_id).await {
            Ok(_) => {}
            // A homeserver without the ping endpoint (MSC2659): probe
            // anyway. Mistaking an unreachable listener for "pool" only
            // uploads a few valid keys; the next detection corrects it.
            Err(HomeserverError::Matrix {
                status, errcode, ..
            }) if status == 404 || status == 405 || errcode == "M_UNRECOGNIZED" => {
                tracing::debug!("the homeserver has no appservice ping; probing without it");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the homeserver could not ping the listener; claim mode unchanged");
                return self.mode();
            }
        }
        let before = self.probes_seen.load(Ordering::SeqCst);
        let probe = BTreeMap::from([(
            self.sender.clone(),
            vec![self.config.probe_device_id.clone()],
        )]);
        let answer = match self.client.claim_keys_as_appservice(probe).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "the probe claim failed; claim mode unchanged");
                return self.mode();
            }
        };
        // The homeserver asks the appservice before it answers the claim:
        // whichever process's listener it asked put the marker in the
        // answer, and if it was ours, the probe has been counted by now.
        let marked = answer
            .get(&self.sender)
            .and_then(|devices| devices.get(&self.config.probe_device_id))
            .is_some_and(|keys| keys.contains_key(&probe_marker_id()));
        let mode = if marked || self.probes_seen.load(Ordering::SeqCst) > before {
            ClaimMode::Proxied
        } else {
            ClaimMode::Pool
        };
        if mode == ClaimMode::Pool && !self.manager.store().sole_writer() {
            tracing::info!(
                "the probe claim came back without the marker: claims are not proxied, or \
                 another bridge process of an older build answered it; during a rolling \
                 upgrade, set the mode to `proxied` or `pool`"
            );
        }
        self.set_mode(mode);
        mode
    }

    /// Whether `(user, device)` is the probe device.
    fn is_probe(&self, user: &str, device: &str) -> bool {
        user == self.sender.as_str() && device == self.config.probe_device_id.as_str()
    }

    /// Remove the probe device from a claim request, noting that the
    /// homeserver proxied it. Called by the claim handler before anything
    /// else: the probe gets no key, only the marker ([`KeyPool::mark_probe`]),
    /// if this returned `true`.
    pub(crate) fn take_probe(&self, request: &mut crate::claim::ClaimRequest) -> bool {
        let Some(devices) = request.get_mut(self.sender.as_str()) else {
            return false;
        };
        let probe = self.config.probe_device_id.as_str();
        if devices.remove(probe).is_none() {
            return false;
        }
        debug_assert!(self.is_probe(self.sender.as_str(), probe));
        self.probes_seen.fetch_add(1, Ordering::SeqCst);
        tracing::debug!("probe claim seen: the homeserver proxies claims");
        if devices.is_empty() {
            request.remove(self.sender.as_str());
        }
        true
    }

    /// Answer the probe taken by [`KeyPool::take_probe`] with the marker,
    /// so that the process that sent it sees the claim was proxied even
    /// when another process's listener answered it. The marker is no key:
    /// its id names it, and its `key` (the base64 of `bridgekeys probe`)
    /// is not a curve25519 key anyone could start a session on.
    pub(crate) fn mark_probe(&self, response: &mut crate::claim::ClaimResponse) {
        let marker = ruma::encryption::SignedKey::new(
            ruma::serde::Base64::new(PROBE_MARKER_KEY.to_vec()),
            Default::default(),
        );
        response
            .entry(self.sender.clone())
            .or_default()
            .entry(self.config.probe_device_id.clone())
            .or_default()
            .insert(probe_marker_id(), marker);
    }

    /// Mark a puppet device contacted (someone may start a session with
    /// it soon) and, in pool mode, top its pool up in the background.
    pub fn touch(self: &Arc<Self>, user_id: &UserId, device_id: &DeviceId) {
        let device = (user_id.to_owned(), device_id.to_owned());
        let new = lock(&self.contacted).insert(device.clone());
        if new && self.mode() == ClaimMode::Pool {
            self.spawn_top_up(device);
        }
    }

    /// Mark a puppet user's device ([`PoolConfig::puppet_device_id`])
    /// contacted (an invite of the user).
    pub fn touch_user(self: &Arc<Self>, user_id: &UserId) {
        let device = self.config.puppet_device_id.clone();
        self.touch(user_id, &device);
    }

    /// Take in a device's one-time key count from a transaction: the
    /// device is contacted, and in pool mode a count below
    /// [`PoolConfig::refill_below`] starts a top-up in the background.
    /// Ignored unless in pool mode (a proxying homeserver reports 0).
    pub fn note_count(self: &Arc<Self>, user_id: &UserId, device_id: &DeviceId, count: u64) {
        let device = (user_id.to_owned(), device_id.to_owned());
        lock(&self.contacted).insert(device.clone());
        if self.mode() == ClaimMode::Pool && count < self.config.refill_below as u64 {
            self.spawn_top_up(device);
        }
    }

    fn spawn_top_up(self: &Arc<Self>, device: DeviceRef) {
        let pool = Arc::clone(self);
        lock(&self.spawned).spawn(async move {
            pool.top_up_logged(&device.0, &device.1).await;
        });
        // Reap finished tasks so the set does not grow.
        let mut spawned = lock(&self.spawned);
        while spawned.try_join_next().is_some() {}
    }

    async fn top_up_logged(&self, user_id: &UserId, device_id: &DeviceId) {
        match self.top_up(user_id, device_id).await {
            Ok(_) => {}
            Err(PoolError::Olm(OlmError::UnknownDevice { .. })) => {
                // Not a device of ours (or not created yet): no pool.
                lock(&self.contacted).remove(&(user_id.to_owned(), device_id.to_owned()));
            }
            Err(PoolError::Homeserver(e)) if e.errcode() == Some("M_UNKNOWN_DEVICE") => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%user_id, %device_id, "the homeserver no longer knows this puppet device");
                if let Some(p) = self.provisioner.get() {
                    p.device_unknown(user_id, device_id);
                }
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%user_id, %device_id, error = %e, "could not top up the one-time key pool; trying again at the next count or check");
            }
        }
    }

    /// Top the device's uploaded pool up to [`PoolConfig::size`] if the
    /// homeserver holds fewer than [`PoolConfig::refill_below`]; returns
    /// how many keys were uploaded. Does nothing outside pool mode, or
    /// while another top-up of the same device runs. The new keys are
    /// durable before the upload.
    pub async fn top_up(&self, user_id: &UserId, device_id: &DeviceId) -> Result<usize, PoolError> {
        if self.mode() != ClaimMode::Pool {
            return Ok(0);
        }
        let device = (user_id.to_owned(), device_id.to_owned());
        if !lock(&self.in_flight).insert(device.clone()) {
            return Ok(0);
        }
        let _in_flight = InFlight {
            set: &self.in_flight,
            device,
        };
        // Refuse devices that are not ours before any homeserver call.
        self.manager.identity_keys(user_id, device_id)?;
        let held = self.read_counts(user_id, device_id).await?;
        if held >= self.config.refill_below as u64 {
            return Ok(0);
        }
        let wanted = (self.config.size as u64).saturating_sub(held) as usize;
        if wanted == 0 {
            return Ok(0);
        }
        let keys = self
            .manager
            .claim(
                user_id,
                device_id,
                &OneTimeKeyAlgorithm::SignedCurve25519,
                wanted,
            )
            .await?;
        let counts = self
            .client
            .upload_one_time_keys(user_id, device_id, &keys)
            .await?;
        self.uploads.fetch_add(1, Ordering::Relaxed);
        self.keys_uploaded
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        tracing::debug!(%user_id, %device_id, uploaded = keys.len(), held_now = signed_curve25519(&counts), "one-time key pool topped up");
        Ok(keys.len())
    }

    /// The device's `signed_curve25519` one-time keys the homeserver holds
    /// now (an empty `keys/upload` as the device, which uploads nothing).
    pub async fn read_counts(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<u64, PoolError> {
        Ok(signed_curve25519(
            &self
                .client
                .upload_one_time_keys(user_id, device_id, &[])
                .await?,
        ))
    }

    /// One pass of the background task: detect the mode if due, then in
    /// pool mode top up every contacted device that runs low.
    async fn check_contacted(&self) {
        if self.mode() != ClaimMode::Pool {
            return;
        }
        let devices: Vec<DeviceRef> = lock(&self.contacted).iter().cloned().collect();
        for (user_id, device_id) in devices {
            self.top_up_logged(&user_id, &device_id).await;
        }
    }

    /// Start the background task: detect the mode now and every
    /// [`PoolConfig::probe_interval`], check contacted devices every
    /// [`PoolConfig::check_interval`]. Start it once the listener serves
    /// (the detection needs the homeserver to reach it).
    pub fn start(self: &Arc<Self>) -> PoolTask {
        let (stop, mut stopped) = watch::channel(false);
        let pool = Arc::clone(self);
        let handle = tokio::spawn(async move {
            let mut probe = tokio::time::interval(pool.config.probe_interval.max(MIN_INTERVAL));
            let mut check = tokio::time::interval(pool.config.check_interval.max(MIN_INTERVAL));
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = probe.tick() => { pool.detect().await; }
                    _ = check.tick() => pool.check_contacted().await,
                }
            }
        });
        PoolTask {
            stop,
            handle,
            pool: Arc::clone(self),
        }
    }
}

/// Shortest timer interval accepted (a zero interval would spin).
const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn signed_curve25519(counts: &BTreeMap<OneTimeKeyAlgorithm, ruma::UInt>) -> u64 {
    counts
        .get(&OneTimeKeyAlgorithm::SignedCurve25519)
        .map_or(0, |c| u64::from(*c))
}

/// The running background task of a [`KeyPool`].
#[derive(Debug)]
pub struct PoolTask {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
    pool: Arc<KeyPool>,
}

impl PoolTask {
    /// Stop the task and wait for it and every top-up it or the listener
    /// started (their keys are durable whether or not the upload ran).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.handle.await;
        let mut spawned = std::mem::take(&mut *lock(&self.pool.spawned));
        while spawned.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_their_stored_form_and_print_their_metric_label() {
        for mode in ClaimMode::ALL {
            assert_eq!(ClaimMode::from_u8(mode.to_u8()), mode);
        }
        assert_eq!(ClaimMode::Pool.to_string(), "pool");
        assert_eq!(ClaimMode::Proxied.as_str(), "proxied");
        assert_eq!(ClaimMode::Unknown.as_str(), "unknown");
    }
}
