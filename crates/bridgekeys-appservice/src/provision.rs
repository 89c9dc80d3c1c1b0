//! Puppet provisioning and fallback key rotation: the homeserver must know
//! each puppet's device, its device keys and a fallback key, so that key
//! claims are proxied to the bridge and still answered (with the fallback
//! key) while the bridge is down.
//!
//! [`Provisioner::ensure_device`] (and [`Provisioner::ensure_puppet`] with
//! the configured device id) does everything, idempotently and crash-safely:
//!
//! 1. The device's Olm account is created **durably** (identity keys).
//! 2. If the puppet registry does not list the device yet: register the user
//!    (`M_USER_IN_USE` is success), create the device (MSC4190
//!    `PUT /devices/{id}`; without MSC4190 the registration or an appservice
//!    login creates it).
//! 3. The fallback key is generated and written **durably before it is
//!    uploaded**; the upload (device keys and fallback key together) is
//!    retried on transient failures with the same bytes; a 200 (or "already
//!    exists") marks the key published. For a device new to the registry,
//!    the write that persists the key also records the device in the puppet
//!    registry, its first rotation step due at once
//!    ([`AccountManager::fallback_key_for_upload_and_record_puppet`]): on
//!    sled the registry entry is the account record's header, so recording
//!    and scheduling apart would rewrite the account record twice more. The
//!    device is recorded before the upload, so an upload that fails (retries
//!    used up, a refusal) is taken up again by the rotation pass, as for any
//!    unpublished key. The write that marks the key published then sets
//!    the device's real next step (the policy's time,
//!    [`AccountManager::mark_fallback_published_and_schedule`]), so the
//!    first rotation pass does not rewrite the account record for it. A
//!    crash between step 2 and the write that persists the key leaves the
//!    device unrecorded, so the next `ensure_device` takes step 2 again: it
//!    is idempotent (the registration treats `M_USER_IN_USE` as success,
//!    the device creation names the same device; without MSC4190 it is a
//!    second appservice login for the same device). A crash after that
//!    write leaves the device recorded with its key unpublished: the next
//!    `ensure_device` (or the rotation pass) sends the same key again.
//!    A device new to the registry whose fallback key was published before
//!    (the registry lost it, or is another store than the accounts') has no
//!    key to write: its device keys go up with that published key first,
//!    and it is recorded only after that upload succeeded, so a failed
//!    upload is retried by the next `ensure_device`.
//! 4. With [`ProvisionConfig::cross_signing`] (the default): the user's
//!    cross-signing identity (created durably once, never replaced) and the
//!    device's signature by its self-signing key are uploaded, then the
//!    device is marked cross-signed in the registry. Puppets provisioned
//!    before this step existed are signed at their next `ensure_device`.
//!
//! A retry after a crash or a network error at any point re-sends the same
//! keys, never new ones: nothing is generated twice because every generated
//! key is on disk before it leaves.
//!
//! Rotation: [`Provisioner::rotate_once`] applies the [`FallbackPolicy`] to
//! each device that is due (rotate when used or too old, upload, forget the
//! previous key after the grace period), with times from an injectable
//! [`Clock`]. Each step schedules the device's next one in the registry's
//! index, so a pass reads only the devices due, not every device; the first
//! pass after start and then one every
//! [`ProvisionConfig::full_rotation_pass_interval`] walk every device (a
//! device scheduled by nothing, a changed policy, or a fallback key
//! rotated by hand through the account manager is caught there). [`Provisioner::start_rotation`] runs it in a
//! background task that the bridge stops with [`RotationTask::stop`]; the
//! listener's transaction path feeds MSC3202 `device_unused_fallback_key_types`
//! in ([`Provisioner::note_unused_fallback_key_types`]) and wakes the task.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bridgekeys_appservice::*;
//! # struct Bridge;
//! # impl BridgeHandler for Bridge {
//! #     async fn transaction(&self, _t: &Transaction) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! # async fn run(manager: Arc<bridgekeys_olm::AccountManager>, store: Arc<bridgekeys_store::SledStore>,
//! #     registration: Registration, config: AppserviceConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let client = HomeserverClient::new("http://127.0.0.1:8008", AsToken::new(registration.as_token.clone()))?;
//! let provisioner = Arc::new(Provisioner::new(
//!     client,
//!     Arc::clone(&manager),
//!     store.clone(),
//!     ProvisionConfig::from_registration(&registration),
//! ));
//! let rotation = provisioner.start_rotation();
//! let appservice = Appservice::new(config, manager, store, Arc::new(Bridge))?
//!     .with_provisioner(Arc::clone(&provisioner));
//! let puppet = ruma::OwnedUserId::try_from("@echo_alice:localhost")?;
//! provisioner.ensure_puppet(&puppet).await?;
//! appservice.serve("127.0.0.1:29300".parse()?, shutdown_signal()).await?;
//! rotation.stop().await;
//! # Ok(())
//! # }
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bridgekeys_olm::{
    AccountManager, FallbackAction, FallbackPolicy, OlmError, UnixMillis, fallback::now_millis,
};
use bridgekeys_store::{DeviceKey, PuppetRegistry, StoreError};
use ruma::{
    DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, UserId, encryption::DeviceKeys,
};
use tokio::sync::{Notify, oneshot, watch};

use crate::{
    DEFAULT_PUPPET_DEVICE_ID, Registration,
    homeserver::{HomeserverClient, HomeserverError, Registered},
};

/// Where the fallback schedule gets the time from. Injected so tests (and
/// simulations) can move time; the times are stored, so they must be wall
/// clock, not monotonic.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now(&self) -> UnixMillis;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        now_millis()
    }
}

/// A clock that moves only when told to: for tests of the rotation schedule.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: UnixMillis) -> Self {
        Self(AtomicU64::new(now))
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Set the clock to `now`.
    pub fn set(&self, now: UnixMillis) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        self.0.load(Ordering::SeqCst)
    }
}

/// How puppets are provisioned and fallback keys rotated.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProvisionConfig {
    /// The device id of [`Provisioner::ensure_puppet`]: one fixed id per
    /// puppet keeps provisioning idempotent across retries and restarts.
    pub device_id: OwnedDeviceId,
    /// The registration has `io.element.msc4190`: register with
    /// `inhibit_login` and create devices with `PUT /devices/{id}`.
    /// Without it the device is created by the registration itself, or for
    /// a user that existed already by an `m.login.application_service`
    /// login naming the device.
    pub msc4190: bool,
    /// Fallback key ages.
    pub policy: FallbackPolicy,
    /// Attempts per homeserver call before giving up on transient failures
    /// (network errors, 5xx, 429). The provisioner is the one layer that
    /// retries its calls: it switches the retries of its client off.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles with each retry, at most 60 s.
    /// A homeserver's `retry_after` (429) makes the wait longer, up to 60 s.
    pub retry_delay: Duration,
    /// How often the background task runs a pass over the puppets that are
    /// due (it is also woken early when the homeserver reports a fallback
    /// key used).
    pub rotation_interval: Duration,
    /// How often a pass walks every puppet instead of only those its
    /// schedule says are due (the first pass after start always does).
    /// Default one day.
    pub full_rotation_pass_interval: Duration,
    /// Give each puppet user a cross-signing identity and sign its device
    /// with it (default on). Clients that only share room keys with
    /// cross-signed devices (MSC4153, identity-based sharing) otherwise
    /// leave puppets out of encrypted rooms. Turn off only for a homeserver
    /// that refuses the upload.
    pub cross_signing: bool,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        Self {
            device_id: DEFAULT_PUPPET_DEVICE_ID.into(),
            msc4190: true,
            policy: FallbackPolicy::default(),
            max_attempts: 5,
            retry_delay: Duration::from_millis(500),
            rotation_interval: Duration::from_secs(300),
            full_rotation_pass_interval: Duration::from_secs(24 * 3600),
            cross_signing: true,
        }
    }
}

impl ProvisionConfig {
    /// Defaults, with MSC4190 as the registration says.
    pub fn from_registration(registration: &Registration) -> Self {
        Self {
            msc4190: registration.msc4190,
            ..Self::default()
        }
    }
}

/// Why provisioning or a rotation step failed. Nothing acknowledged by the
/// homeserver is lost: a retry continues with the same persisted keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// A homeserver call failed (after retries, if transient).
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
    /// The account manager failed.
    #[error(transparent)]
    Olm(#[from] OlmError),
    /// The puppet registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A registry entry is not a valid user id.
    #[error("puppet registry holds an invalid user id {0:?}")]
    BadRegistryEntry(String),
}

/// Counters of the provisioner since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProvisionStats {
    /// Devices newly provisioned on the homeserver (registered, created).
    pub devices_provisioned: u64,
    /// Key uploads acknowledged.
    pub uploads: u64,
    /// Uploads retried after a transient failure (same keys re-sent).
    pub upload_retries: u64,
    /// Completed passes of [`Provisioner::rotate_once`].
    pub rotation_passes: u64,
    /// Devices whose rotation step failed in a pass (retried next pass).
    pub rotation_failures: u64,
    /// Devices rotated at once because a pre-key message used their
    /// fallback key ([`Provisioner::fallback_key_used`]).
    pub urgent_rotations: u64,
    /// Devices signed by their user's cross-signing identity (keys and
    /// signature uploaded).
    pub devices_cross_signed: u64,
    /// Devices the homeserver had lost, provisioned again with the same
    /// keys ([`Provisioner::reprovision`]).
    pub devices_reprovisioned: u64,
}

#[derive(Default)]
struct Counters {
    devices_provisioned: AtomicU64,
    uploads: AtomicU64,
    upload_retries: AtomicU64,
    rotation_passes: AtomicU64,
    rotation_failures: AtomicU64,
    urgent_rotations: AtomicU64,
    devices_cross_signed: AtomicU64,
    devices_reprovisioned: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What one rotation pass did.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Devices visited.
    pub devices: usize,
    /// Whether the pass walked every puppet (otherwise only those due).
    pub full: bool,
    /// Devices whose step failed (logged; retried next pass).
    pub failures: usize,
}

/// Devices read from the rotation schedule at a time.
const DUE_BATCH: usize = 1024;

/// Provisions puppet devices on the homeserver and keeps their fallback keys
/// fresh. See the module docs for the steps and their guarantees.
pub struct Provisioner {
    client: HomeserverClient,
    manager: Arc<AccountManager>,
    registry: Arc<dyn PuppetRegistry>,
    config: ProvisionConfig,
    clock: Arc<dyn Clock>,
    counters: Counters,
    wake: Notify,
    passes: watch::Sender<u64>,
    /// Urgent rotations in flight ([`Provisioner::fallback_key_used`]):
    /// stopping the rotation task waits for them, so that a stopped bridge
    /// holds no task that still uses the store.
    urgent: parking_lot::Mutex<tokio::task::JoinSet<()>>,
    /// When the last pass over every puppet started (`None`: none yet).
    last_full_pass: parking_lot::Mutex<Option<UnixMillis>>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("client", &self.client)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Provisioner {
    /// A provisioner over the homeserver client, the account manager and the
    /// puppet registry (usually the same `SledStore` the manager writes to),
    /// with the system clock. The provisioner retries its calls itself
    /// ([`ProvisionConfig::max_attempts`]), so it uses `client` with the
    /// client's own retries off ([`RetryPolicy::none`](crate::RetryPolicy::none)):
    /// retries are not multiplied.
    pub fn new(
        client: HomeserverClient,
        manager: Arc<AccountManager>,
        registry: Arc<dyn PuppetRegistry>,
        config: ProvisionConfig,
    ) -> Self {
        Self {
            client: client.with_retry_policy(crate::RetryPolicy::none()),
            manager,
            registry,
            config,
            clock: Arc::new(SystemClock),
            counters: Counters::default(),
            wake: Notify::new(),
            passes: watch::channel(0).0,
            urgent: parking_lot::Mutex::new(tokio::task::JoinSet::new()),
            last_full_pass: parking_lot::Mutex::new(None),
        }
    }

    /// Use `clock` for the fallback schedule instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The account manager.
    pub fn manager(&self) -> &Arc<AccountManager> {
        &self.manager
    }

    /// Counters since start.
    pub fn stats(&self) -> ProvisionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProvisionStats {
            devices_provisioned: get(&self.counters.devices_provisioned),
            uploads: get(&self.counters.uploads),
            upload_retries: get(&self.counters.upload_retries),
            rotation_passes: get(&self.counters.rotation_passes),
            rotation_failures: get(&self.counters.rotation_failures),
            urgent_rotations: get(&self.counters.urgent_rotations),
            devices_cross_signed: get(&self.counters.devices_cross_signed),
            devices_reprovisioned: get(&self.counters.devices_reprovisioned),
        }
    }

    /// Provision `user_id` with the configured device id; returns it.
    pub async fn ensure_puppet(&self, user_id: &UserId) -> Result<OwnedDeviceId, ProvisionError> {
        let device_id = self.config.device_id.clone();
        self.ensure_device(user_id, &device_id).await?;
        Ok(device_id)
    }

    /// Make sure the homeserver knows `device_id` of `user_id` with its
    /// device keys and a published fallback key. Idempotent and cheap once
    /// done (no homeserver call); safe to retry after any failure.
    pub async fn ensure_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), ProvisionError> {
        // 1. Identity keys, durably (the same keys on every call).
        let device_keys = self.manager.create_device(user_id, device_id).await?;
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        if !self.registry.contains_puppet(&key)? {
            // 2. The homeserver's side of the device.
            self.create_on_homeserver(user_id, device_id).await?;
            if let Some(published) = self.manager.published_fallback_key(user_id, device_id)? {
                // 3. A fallback key published before (the registry had lost
                //    the device, or is another store than the account's):
                //    the device keys and that key go up again, as
                //    `reprovision` does, or the homeserver would hold a
                //    device without keys. Recorded only after the upload: a
                //    failed upload leaves it unrecorded, so the next
                //    `ensure_device` uploads again (the rotation pass would
                //    not: its key is published).
                self.upload_published(user_id, device_id, &device_keys, Some(&published))
                    .await?;
                self.registry.record_puppet(&key)?.durable().await?;
                self.schedule(&key, self.clock.now(), None);
                bump(&self.counters.uploads);
            } else {
                // 3. Device keys and the fallback key, persisted before
                //    upload; the device is recorded in the registry, due at
                //    once, in the same write that persists the key, before
                //    the upload, so a failed upload is retried by the
                //    rotation pass; the write that marks the key published
                //    sets its real schedule.
                self.upload_fallback(user_id, device_id, &device_keys, true)
                    .await?;
            }
            bump(&self.counters.devices_provisioned);
            tracing::info!(%user_id, %device_id, "puppet device provisioned on the homeserver");
        } else {
            // 3. Device keys and the fallback key, persisted before upload.
            self.upload_fallback(user_id, device_id, &device_keys, false)
                .await?;
        }
        // 4. The user's cross-signing identity and the device's signature
        //    by it (puppets provisioned before are signed at their next use).
        if self.config.cross_signing && !self.registry.is_cross_signed(&key)? {
            self.cross_sign(user_id, device_id).await?;
            self.registry.record_cross_signed(&key)?.durable().await?;
            bump(&self.counters.devices_cross_signed);
        }
        Ok(())
    }

    /// Register the user (an existing one is fine) and create the device on
    /// the homeserver: with MSC4190 by `PUT /devices`, without it by the
    /// registration itself (a new user) or a login naming the device.
    async fn create_on_homeserver(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), HomeserverError> {
        let msc4190 = self.config.msc4190;
        let registered = self
            .retry("register", None, || {
                self.client.register(user_id, device_id, msc4190)
            })
            .await?;
        if msc4190 {
            self.retry("create device", None, || {
                self.client.create_device(user_id, device_id)
            })
            .await?;
        } else if registered == Registered::AlreadyExisted {
            // Without MSC4190 only a new user got its device with the
            // registration; an existing one gets it by logging in.
            self.retry("login device", None, || {
                self.client.login_device(user_id, device_id)
            })
            .await?;
        }
        Ok(())
    }

    /// Upload `user_id`'s cross-signing keys (the same ones on every call:
    /// they are durable before anything is sent) and `device_id`'s
    /// signature by its self-signing key.
    async fn cross_sign(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), ProvisionError> {
        let keys = self.manager.cross_signing_keys(user_id).await?;
        self.retry("upload cross-signing keys", None, || {
            self.client.upload_cross_signing_keys(
                user_id,
                &keys.master_key,
                &keys.self_signing_key,
                &keys.user_signing_key,
            )
        })
        .await?;
        let signed = self
            .manager
            .self_signed_device_keys(user_id, device_id)
            .await?;
        self.retry("upload the device signature", None, || {
            self.client.upload_device_signature(user_id, &signed)
        })
        .await?;
        tracing::info!(%user_id, %device_id, "puppet device cross-signed");
        Ok(())
    }

    /// Upload the device's unpublished fallback key (if any) with its device
    /// keys, retrying transient failures with the same bytes, and mark it
    /// published on success. With `record_puppet`, the write that persists
    /// the key (generated or not) also records the device in the puppet
    /// registry, due at once, before anything is sent (one account write
    /// instead of three on sled: see
    /// [`AccountManager::fallback_key_for_upload_and_record_puppet`]), and
    /// the publish write sets its real schedule; a registry that is not the
    /// manager's store gets its own record, due at once.
    /// Returns whether anything was uploaded.
    async fn upload_fallback(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: &DeviceKeys,
        record_puppet: bool,
    ) -> Result<bool, ProvisionError> {
        let now = self.clock.now();
        // Whether the device's registry entry is in its account record (the
        // registry is the manager's store), so the publish write sets its
        // real schedule.
        let mut scheduled_with_account = false;
        let fallback = if record_puppet {
            let fallback = self
                .manager
                .fallback_key_for_upload_and_record_puppet(user_id, device_id, now, now)
                .await?;
            let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
            if self.registry.contains_puppet(&key)? {
                scheduled_with_account = true;
            } else {
                // The registry is another store than the manager's.
                self.registry.record_puppet(&key)?.durable().await?;
                self.schedule(&key, now, None);
            }
            fallback
        } else {
            self.manager
                .fallback_key_for_upload(user_id, device_id, now)
                .await?
        };
        let Some(fallback) = fallback else {
            if record_puppet {
                // Published between `ensure_device`'s check and this write
                // (another task): recorded already, so upload what is
                // published.
                let published = self.manager.published_fallback_key(user_id, device_id)?;
                self.upload_published(user_id, device_id, device_keys, published.as_ref())
                    .await?;
                bump(&self.counters.uploads);
                return Ok(true);
            }
            return Ok(false);
        };
        self.retry("upload keys", Some(&self.counters.upload_retries), || {
            self.client
                .upload_keys(user_id, device_id, Some(device_keys), Some(&fallback))
        })
        .await?;
        let now = self.clock.now();
        let marked = if scheduled_with_account {
            // Its next step at the policy's time in the same write (the
            // rotation pass would rewrite the account record to set it).
            self.manager
                .mark_fallback_published_and_schedule(
                    user_id,
                    device_id,
                    &fallback.key_id,
                    now,
                    &self.config.policy,
                )
                .await?
                .is_some()
        } else {
            self.manager
                .mark_fallback_published(user_id, device_id, &fallback.key_id, now)
                .await?
        };
        if !marked {
            // Published by someone else already, or no longer the current
            // key: see `upload_current_after`.
            self.upload_current_after(user_id, device_id, device_keys, &fallback.key_id)
                .await?;
        }
        bump(&self.counters.uploads);
        tracing::info!(%user_id, %device_id, key_id = %fallback.key_id, "fallback key uploaded");
        Ok(true)
    }

    /// Upload the device keys with the device's `published` fallback key, if
    /// it has one (identical re-uploads are accepted): for a device the
    /// homeserver does not know, or forgot, with its keys.
    async fn upload_published(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: &DeviceKeys,
        published: Option<&bridgekeys_olm::FallbackKey>,
    ) -> Result<(), ProvisionError> {
        self.retry("upload keys", Some(&self.counters.upload_retries), || {
            self.client
                .upload_keys(user_id, device_id, Some(device_keys), published)
        })
        .await?;
        if let Some(published) = published {
            self.upload_current_after(user_id, device_id, device_keys, &published.key_id)
                .await?;
        }
        Ok(())
    }

    /// After an upload of fallback key `uploaded` was answered: if the
    /// device's current fallback key is another one by now, upload that one
    /// too (and mark it published), until the last key we uploaded is the
    /// current one.
    ///
    /// Why: the homeserver keeps the last fallback key it was sent. Another
    /// task or process may have rotated the key while our upload was on its
    /// way (slow, or retried), uploaded the new key and marked it published;
    /// if ours landed after theirs, the homeserver would hand out the old
    /// key, which the store forgets after the grace period, while nothing
    /// is left to upload. Costs one read of the device when nothing
    /// changed (the usual case). Not covered: an attempt this process gave
    /// up on that the homeserver applies even later (nothing answers it),
    /// and a follow-up upload that fails every retry (logged and returned;
    /// the rotation pass does not upload a published key again). Either way
    /// the next used report, or the key's maximum age, rotates past it.
    async fn upload_current_after(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: &DeviceKeys,
        uploaded: &ruma::OwnedOneTimeKeyId,
    ) -> Result<(), ProvisionError> {
        let mut uploaded = uploaded.clone();
        // Each round means another rotation landed during our upload: a
        // few are plenty; the rotation pass takes over after that.
        for _ in 0..3 {
            let now = self.clock.now();
            let (current, unpublished) = match self
                .manager
                .fallback_key_for_upload(user_id, device_id, now)
                .await?
            {
                Some(key) => (key, true),
                None => match self.manager.published_fallback_key(user_id, device_id)? {
                    Some(key) => (key, false),
                    None => return Ok(()),
                },
            };
            if current.key_id == uploaded {
                return Ok(());
            }
            tracing::info!(%user_id, %device_id, uploaded = %uploaded, current = %current.key_id,
                "the fallback key changed while ours was uploaded: uploading the current one");
            let sent = self
                .retry("upload keys", Some(&self.counters.upload_retries), || {
                    self.client
                        .upload_keys(user_id, device_id, Some(device_keys), Some(&current))
                })
                .await;
            if let Err(e) = sent {
                // A published key is not uploaded again by the rotation
                // pass: say what the homeserver may be left with.
                tracing::warn!(%user_id, %device_id, current = %current.key_id, error = %e,
                    "could not upload the current fallback key after ours landed late: the \
                     homeserver may hand out an older key until the next used report or the \
                     key's maximum age rotates it");
                return Err(e.into());
            }
            if unpublished {
                self.manager
                    .mark_fallback_published(user_id, device_id, &current.key_id, self.clock.now())
                    .await?;
            }
            uploaded = current.key_id;
        }
        Ok(())
    }

    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        retries: Option<&AtomicU64>,
        mut op: F,
    ) -> Result<T, HomeserverError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, HomeserverError>>,
    {
        let mut delay = self.config.retry_delay;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.config.max_attempts.max(1) => {
                    tracing::warn!(what, attempt, error = %e, "homeserver call failed; retrying with the same content");
                    if let Some(c) = retries {
                        bump(c);
                    }
                    let asked = e.retry_after().unwrap_or_default();
                    tokio::time::sleep(delay.max(asked.min(Duration::from_secs(60)))).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Take every step of one device's fallback life cycle that is due now
    /// (generate, rotate, upload, forget), until it waits.
    pub async fn rotate_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), ProvisionError> {
        self.rotate_and_schedule(user_id, device_id, None).await
    }

    /// [`Provisioner::rotate_device`], then schedule the device's next step:
    /// when its policy says, or at once (the next pass) if the step failed
    /// or did not settle. `found_at` is the schedule entry it was found
    /// under, replaced.
    async fn rotate_and_schedule(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        found_at: Option<UnixMillis>,
    ) -> Result<(), ProvisionError> {
        let result = self.step_device(user_id, device_id).await;
        // A failed or unsettled device is due at once: the next pass (the
        // current pass skips the devices that failed in it).
        let now = self.clock.now();
        let next = result.as_ref().map_or(now, |last| last.next_due(now));
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        // A schedule that cannot be written fails the step: the device
        // stays where it was found (due), and the failure is counted.
        let scheduled = self.registry.schedule_rotation(&key, next, found_at);
        result?;
        // Not waited for: a schedule lost in a crash is rebuilt by the full
        // pass after start.
        let _applied = scheduled?;
        if next > now {
            // A used report (a transaction's, here or in another process)
            // may have marked the key between the step's read and this
            // write, and this write then put its "due now" back to the
            // policy's time: the used key would be handed out until the
            // next full pass. So read the device again (its state is
            // written before the report schedules it) and bring the step
            // forward if it is due sooner now.
            match self.manager.fallback_state(user_id, device_id) {
                Ok(state) => {
                    let fresh = bridgekeys_olm::fallback::due(&state, &self.config.policy, now)
                        .next_due(now);
                    if fresh < next {
                        tracing::debug!(%user_id, %device_id, "the fallback state changed while the device was stepped: scheduled sooner");
                        self.schedule(&key, fresh, None);
                        self.wake.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(%user_id, %device_id, error = %e, "could not read the device again after scheduling it; the next full pass will");
                }
            }
        }
        Ok(())
    }

    /// Record when `device`'s next rotation step is due. Not waited for: a
    /// schedule lost in a crash is rebuilt by the full pass after start.
    fn schedule(&self, device: &DeviceKey, due: UnixMillis, found_at: Option<UnixMillis>) {
        if let Err(e) = self.registry.schedule_rotation(device, due, found_at) {
            tracing::warn!(user_id = device.user_id(), device_id = device.device_id(), error = %e,
                "could not schedule the next fallback rotation step; the next full pass will");
        }
    }

    /// Take the device's fallback steps that are due now; the last action
    /// seen: a [`FallbackAction::Wait`] for the next one, or, if none was
    /// reached after a few steps, the last step taken (the device is then
    /// due again at once).
    async fn step_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<FallbackAction, ProvisionError> {
        // At most: forget, rotate, upload, then wait.
        let mut last = FallbackAction::Generate;
        for _ in 0..6 {
            last = self
                .manager
                .apply_fallback_policy(user_id, device_id, &self.config.policy, self.clock.now())
                .await?;
            match last {
                FallbackAction::Wait { .. } => return Ok(last),
                FallbackAction::Upload => {
                    // Device keys ride along: identical re-uploads are
                    // accepted, and they heal a device recorded before its
                    // first upload (by a build that recorded the device
                    // first, or by hand).
                    let device_keys = self.manager.device_keys(user_id, device_id)?;
                    self.upload_fallback(user_id, device_id, &device_keys, false)
                        .await?;
                }
                FallbackAction::Generate
                | FallbackAction::Rotate(_)
                | FallbackAction::ForgetPrevious => {}
            }
        }
        Ok(last)
    }

    /// One rotation pass: over the devices whose next step is due, or over
    /// every provisioned device when this is the first pass since start or
    /// [`ProvisionConfig::full_rotation_pass_interval`] has passed since the
    /// last full one. A failing device is logged and counted and the pass
    /// goes on; the next pass retries it.
    pub async fn rotate_once(&self) -> Result<RotationReport, ProvisionError> {
        let now = self.clock.now();
        let full = {
            let last = self.last_full_pass.lock();
            let interval = self.config.full_rotation_pass_interval.as_millis();
            last.is_none_or(|at| u128::from(now) >= u128::from(at) + interval)
        };
        let mut report = RotationReport {
            full,
            ..RotationReport::default()
        };
        if full {
            for key in self.registry.puppets()? {
                self.rotate_entry(&key, None, &mut report).await;
            }
            // Only a walk that got through counts: one cut short by an
            // error or a stop is walked again by the next pass.
            *self.last_full_pass.lock() = Some(now);
        } else {
            // In batches, behind a cursor, so the scan moves strictly
            // forward. A device handled here is rescheduled (after `now`,
            // or at once if it failed, or at a time the clock says is
            // still due if the clock went back); its new entry may lie
            // ahead of the cursor, so each device is handled once a pass.
            let mut handled = std::collections::HashSet::new();
            let mut cursor: Option<(DeviceKey, UnixMillis)> = None;
            loop {
                let batch = self
                    .registry
                    .due_rotations(now, cursor.as_ref(), DUE_BATCH)?;
                let Some(last) = batch.last().cloned() else {
                    break;
                };
                for (key, found_at) in batch {
                    if handled.insert(key.clone()) {
                        self.rotate_entry(&key, Some(found_at), &mut report).await;
                    }
                }
                cursor = Some(last);
                // A pass over many devices gives the runtime a turn.
                tokio::task::yield_now().await;
            }
        }
        bump(&self.counters.rotation_passes);
        self.passes.send_modify(|n| *n += 1);
        Ok(report)
    }

    /// One device of a pass (a failure is counted and logged).
    async fn rotate_entry(
        &self,
        key: &DeviceKey,
        found_at: Option<UnixMillis>,
        report: &mut RotationReport,
    ) {
        report.devices += 1;
        let result = match OwnedUserId::try_from(key.user_id()) {
            Ok(user_id) => {
                let device_id: OwnedDeviceId = key.device_id().into();
                self.rotate_and_schedule(&user_id, &device_id, found_at)
                    .await
            }
            Err(_) => {
                // Never due again: only a full pass meets it.
                self.schedule(key, UnixMillis::MAX, found_at);
                Err(ProvisionError::BadRegistryEntry(key.user_id().to_owned()))
            }
        };
        if let Err(e) = result {
            report.failures += 1;
            bump(&self.counters.rotation_failures);
            tracing::warn!(user_id = key.user_id(), device_id = key.device_id(), error = %e,
                "fallback rotation step failed; retried next pass");
        }
    }

    /// Feed one MSC3202 `device_unused_fallback_key_types` entry in: if it
    /// lacks `signed_curve25519`, the device's published fallback key was
    /// used; it is marked (durably) and the rotation task woken. Returns
    /// whether the key was newly marked used.
    pub async fn note_unused_fallback_key_types(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        unused_types: &[OneTimeKeyAlgorithm],
    ) -> Result<bool, ProvisionError> {
        if unused_types.contains(&OneTimeKeyAlgorithm::SignedCurve25519) {
            return Ok(false);
        }
        let marked = match self.manager.mark_fallback_used(user_id, device_id).await {
            Ok(marked) => marked,
            // Not a device of ours: nothing to rotate.
            Err(OlmError::UnknownDevice { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if marked {
            tracing::info!(%user_id, %device_id, "homeserver reports the fallback key used");
            let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
            self.schedule(&key, self.clock.now(), None);
            self.wake.notify_one();
        }
        Ok(marked)
    }

    /// A pre-key message was found to have started a session on this
    /// device's fallback key (the account manager marked it used in the same
    /// write): rotate that device now, in the background, instead of at the
    /// next pass. Until the new key is uploaded, a homeserver that does not
    /// proxy claims hands every claimer the same used key.
    ///
    /// The rotation runs on its own task so the transaction that carried
    /// the message is not held up by an upload; a failure is logged and the
    /// periodic pass retries.
    pub fn fallback_key_used(self: &Arc<Self>, user_id: &UserId, device_id: &DeviceId) {
        let this = Arc::clone(self);
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        bump(&self.counters.urgent_rotations);
        let mut urgent = self.urgent.lock();
        // Reap the finished ones so the set stays as small as what runs.
        while urgent.try_join_next().is_some() {}
        urgent.spawn(async move {
            match this.rotate_device(&user_id, &device_id).await {
                Ok(()) => {
                    tracing::info!(%user_id, %device_id, "rotated a fallback key used by a pre-key message");
                }
                Err(e) => {
                    tracing::warn!(%user_id, %device_id, error = %e, "could not rotate a used fallback key now; the next pass retries");
                    this.wake.notify_one();
                }
            }
        });
    }

    /// Provision a puppet device again after the homeserver lost it (a
    /// stale-device pruning such as Synapse's `delete_stale_devices_after`
    /// deleted it, or an admin did): the device is created again with the
    /// **same** identity keys, its device keys and current fallback key are
    /// uploaded again, and it is signed again by its user's self-signing
    /// key. Nothing is generated: sessions, outstanding one-time keys and
    /// the user's cross-signing identity stay valid. Safe to repeat.
    pub async fn reprovision(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), ProvisionError> {
        // Ours, or refused: no homeserver call for a device we never made.
        self.manager.identity_keys(user_id, device_id)?;
        let device_keys = self.manager.create_device(user_id, device_id).await?;
        // The user exists: register says so, and the device is made by
        // MSC4190's `PUT /devices` or a login.
        self.create_on_homeserver(user_id, device_id).await?;
        // The published fallback key (the homeserver forgot it with the
        // device) goes up again with the device keys; an unpublished one is
        // uploaded and marked published as at first provisioning.
        let published = self.manager.published_fallback_key(user_id, device_id)?;
        self.upload_published(user_id, device_id, &device_keys, published.as_ref())
            .await?;
        self.upload_fallback(user_id, device_id, &device_keys, false)
            .await?;
        if self.config.cross_signing {
            self.cross_sign(user_id, device_id).await?;
        }
        bump(&self.counters.devices_reprovisioned);
        tracing::info!(%user_id, %device_id, "puppet device was gone from the homeserver: provisioned again with the same keys");
        Ok(())
    }

    /// Whether the homeserver still knows `device_id` of `user_id` (a
    /// `keys/query` as the appservice); if it lost it, provision it again
    /// ([`Provisioner::reprovision`]). Returns whether it did. Devices
    /// this bridge never provisioned are left alone.
    pub async fn check_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<bool, ProvisionError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        if !self.registry.contains_puppet(&key)? {
            return Ok(false);
        }
        let devices = self
            .retry("query the puppet's devices", None, || {
                self.client
                    .query_keys_as_appservice(std::iter::once(user_id.to_owned()))
            })
            .await?;
        let present = devices
            .get(user_id)
            .is_some_and(|d| d.contains_key(device_id));
        if present {
            return Ok(false);
        }
        self.reprovision(user_id, device_id).await?;
        Ok(true)
    }

    /// The homeserver reports the device list of puppet `user_id` changed
    /// (`device_lists.changed` in a transaction): check in the background
    /// that its device ([`ProvisionConfig::device_id`]) is still there, and
    /// provision it again if not. Stopping the rotation task waits for it.
    pub fn puppet_devices_changed(self: &Arc<Self>, user_id: &UserId) {
        let this = Arc::clone(self);
        let user_id = user_id.to_owned();
        let device_id = self.config.device_id.clone();
        let mut running = self.urgent.lock();
        while running.try_join_next().is_some() {}
        running.spawn(async move {
            if let Err(e) = this.check_device(&user_id, &device_id).await {
                tracing::warn!(%user_id, %device_id, error = %e, "could not check that the puppet device still exists");
            }
        });
    }

    /// A homeserver call as the device answered that the device is
    /// unknown: provision it again in the background (tracked like
    /// [`Provisioner::puppet_devices_changed`]).
    pub fn device_unknown(self: &Arc<Self>, user_id: &UserId, device_id: &DeviceId) {
        let this = Arc::clone(self);
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        let mut running = self.urgent.lock();
        while running.try_join_next().is_some() {}
        running.spawn(async move {
            if let Err(e) = this.reprovision(&user_id, &device_id).await {
                tracing::warn!(%user_id, %device_id, error = %e, "could not provision a lost puppet device again");
            }
        });
    }

    /// Wait for every urgent rotation started so far to end.
    async fn finish_urgent_rotations(&self) {
        let mut running = std::mem::take(&mut *self.urgent.lock());
        while let Some(done) = running.join_next().await {
            if let Err(e) = done {
                tracing::warn!(error = %e, "an urgent fallback rotation ended abnormally");
            }
        }
    }

    /// Start the background rotation task: a pass now, then every
    /// [`ProvisionConfig::rotation_interval`] or sooner when a used fallback
    /// key is reported. Stop it with [`RotationTask::stop`]; stopping
    /// mid-pass is safe (every step is durable before the next, and an
    /// interrupted upload re-sends the same key next time).
    pub fn start_rotation(self: &Arc<Self>) -> RotationTask {
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let this = Arc::clone(self);
        let passes = self.passes.subscribe();
        let handle = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    result = this.rotate_once() => {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "fallback rotation pass failed");
                        }
                    }
                }
                tokio::select! {
                    _ = &mut stop_rx => break,
                    () = this.wake.notified() => {}
                    () = tokio::time::sleep(this.config.rotation_interval) => {}
                }
            }
            this.finish_urgent_rotations().await;
            tracing::debug!("fallback rotation task stopped");
        });
        RotationTask {
            stop: stop_tx,
            handle,
            passes,
        }
    }
}

/// The running background rotation task. [`RotationTask::stop`] stops it
/// and waits; dropping the handle also stops it (without waiting).
#[derive(Debug)]
pub struct RotationTask {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
    passes: watch::Receiver<u64>,
}

impl RotationTask {
    /// Completed passes so far, as a watch: `changed().await` resolves when
    /// the next pass completes (for tests and health checks).
    pub fn passes(&self) -> watch::Receiver<u64> {
        self.passes.clone()
    }

    /// Stop the task and wait until it has stopped, together with every
    /// urgent rotation ([`Provisioner::fallback_key_used`]) still running.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.handle.await {
            tracing::warn!(error = %e, "fallback rotation task ended abnormally");
        }
    }
}
