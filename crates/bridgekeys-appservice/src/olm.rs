//! Olm for puppet devices through the homeserver: device tracking and
//! outbound to-device encryption.
//!
//! The account manager ([`bridgekeys_olm`]) does the cryptography and keeps
//! state; this module adds the homeserver calls, made **as the puppet
//! device** (appservice identity assertion with `user_id` and `device_id`):
//!
//! * [`PuppetOlm::devices`]: the verified devices of some users. Users not
//!   tracked yet, or marked outdated by `device_lists.changed`, are queried
//!   with one batched `keys/query`; concurrent callers needing the same user
//!   wait for the one query in flight instead of issuing another.
//! * [`PuppetOlm::encrypt_to_device`]: encrypt content for a set of user
//!   devices and send it. Each recipient device reuses its most recently
//!   used session, or gets a one-time key claimed (one batched `keys/claim`)
//!   whose signature is verified before a session is made from it. One
//!   `sendToDevice` carries every message, under one transaction id that
//!   its retries reuse, so the homeserver delivers each message once. A
//!   device that cannot be reached (unknown, no key to claim, bad key) is
//!   reported in [`SendReport::failed`]; the others are still sent.
//! * [`PuppetOlm::request_room_key`] and
//!   [`PuppetOlm::cancel_room_key_request`]: ask a user's devices for a
//!   Megolm session's key (`m.room_key_request`, unencrypted, to device id
//!   `*`), and take the request back once the key has come (the listener
//!   does both for held events, see [`crate::room_events`]).
//! * [`PuppetOlm::note_device_lists`]: feed a transaction's
//!   `device_lists` in (the listener does it when a `PuppetOlm` is attached
//!   with [`crate::Appservice::with_olm`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use bridgekeys_olm::{
    AccountManager, GroupRecipient, OlmError, Recipient, RotationSettings, TrackedDevices,
};
use ruma::{DeviceId, OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

use crate::{DeviceLists, HomeserverClient, HomeserverError};

/// Why an Olm operation through the homeserver failed as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PuppetOlmError {
    /// The account manager refused or failed (unknown puppet device, store).
    #[error(transparent)]
    Olm(#[from] OlmError),
    /// The homeserver call failed (after retries for transient failures).
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
}

/// Why one recipient device did not get its message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceFailure {
    /// The device is not among the user's verified devices.
    #[error("unknown or unverified device")]
    UnknownDevice,
    /// The homeserver had no one-time key (and no fallback key) to hand out.
    #[error("no one-time key to claim")]
    NoKeyToClaim,
    /// The claimed key's signature did not verify with the device's key.
    #[error("claimed key has a bad signature")]
    BadKeySignature,
    /// Encryption failed for another reason.
    #[error("could not encrypt: {0}")]
    Encryption(String),
}

/// What [`PuppetOlm::encrypt_to_device`] did, per device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Devices the message was sent to.
    pub sent: Vec<(OwnedUserId, OwnedDeviceId)>,
    /// How many of them reused an existing session.
    pub sessions_reused: usize,
    /// How many needed a claimed key and a new session.
    pub sessions_created: usize,
    /// Devices left out, and why.
    pub failed: Vec<(OwnedUserId, OwnedDeviceId, DeviceFailure)>,
    /// The `sendToDevice` transaction id used (none if nothing was sent).
    pub txn_id: Option<String>,
}

/// An encrypted room event, ready to send as `m.room.encrypted`.
#[derive(Clone, Debug)]
pub struct RoomSend {
    /// The `m.room.encrypted` content (Megolm).
    pub content: Value,
    /// The group session used.
    pub session_id: String,
    /// Whether a new session was started for this message.
    pub rotated: bool,
    /// Devices sent the session key for this message (new session or new
    /// devices).
    pub key_shared_with: usize,
    /// Devices that could not be sent the key (they cannot read this
    /// message; they are tried again with the next one).
    pub key_failed: Vec<(OwnedUserId, OwnedDeviceId, DeviceFailure)>,
}

/// What an `m.room_key_request` asks for: one Megolm session's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomKeyRequest {
    /// The room the session belongs to.
    pub room_id: OwnedRoomId,
    /// The session whose key is wanted.
    pub session_id: String,
    /// The sending device's curve25519 key, as the encrypted event stated
    /// it (deprecated in the spec; left out when unknown).
    pub sender_key: Option<String>,
    /// Names the request; its cancellation repeats it.
    pub request_id: String,
}

/// Which devices of a user to address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    /// Every verified device of the user.
    All,
    /// Just these (each must be a verified device).
    Only(Vec<OwnedDeviceId>),
}

type QueryLocks = parking_lot::Mutex<HashMap<OwnedUserId, Arc<tokio::sync::Mutex<()>>>>;

/// Removes the per-user query locks nobody else waits on, when dropped.
struct TidyLocks<'a> {
    map: &'a QueryLocks,
    users: &'a [OwnedUserId],
    locks: &'a [Arc<tokio::sync::Mutex<()>>],
}

impl Drop for TidyLocks<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        for (user, lock) in self.users.iter().zip(self.locks) {
            // Only the map and our clone hold it: nobody waits on it.
            if Arc::strong_count(lock) <= 2 {
                map.remove(user);
            }
        }
    }
}

/// Olm for puppet devices, through the homeserver. Cheap to share (`Arc`).
pub struct PuppetOlm {
    manager: Arc<AccountManager>,
    homeserver: HomeserverClient,
    /// One async lock per user being queried, so a user is never queried
    /// twice at once.
    querying: QueryLocks,
    /// Attempts per homeserver call on transient failures (this layer
    /// retries; the client's own retries are off).
    attempts: u32,
    queries: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PuppetOlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PuppetOlm").finish_non_exhaustive()
    }
}

impl PuppetOlm {
    /// Olm through `homeserver` for the puppet devices of `manager`. Its
    /// calls are retried here (4 attempts, backoff from 200 ms, at least a
    /// 429's `retry_after`), so `homeserver` is used with its own retries
    /// off ([`RetryPolicy::none`](crate::RetryPolicy::none)).
    pub fn new(manager: Arc<AccountManager>, homeserver: HomeserverClient) -> Self {
        Self {
            manager,
            homeserver: homeserver.with_retry_policy(crate::RetryPolicy::none()),
            querying: parking_lot::Mutex::new(HashMap::new()),
            attempts: 4,
            queries: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The account manager.
    pub fn manager(&self) -> &Arc<AccountManager> {
        &self.manager
    }

    /// `keys/query` calls made so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The verified devices of `users`, querying the homeserver (as the
    /// puppet device `puppet`) for users not tracked yet or outdated. A
    /// user the homeserver gave no answer for keeps what was tracked (or is
    /// absent from the result).
    pub async fn devices(
        &self,
        puppet: (&UserId, &DeviceId),
        users: &[OwnedUserId],
    ) -> Result<BTreeMap<OwnedUserId, TrackedDevices>, PuppetOlmError> {
        let wanted: BTreeSet<OwnedUserId> = users.iter().cloned().collect();
        let mut out = BTreeMap::new();
        let mut stale = Vec::new();
        for user in &wanted {
            match self.manager.tracked_devices(user)? {
                Some(t) if !t.outdated => {
                    out.insert(user.clone(), t);
                }
                _ => stale.push(user.clone()),
            }
        }
        if !stale.is_empty() {
            // Lock the users in order (no deadlock between two batches),
            // then query only those still stale: a query that finished
            // while we waited may have done the work.
            let locks: Vec<_> = {
                let mut map = self.querying.lock();
                stale
                    .iter()
                    .map(|u| Arc::clone(map.entry(u.clone()).or_default()))
                    .collect()
            };
            // Tidies the lock map however this call ends (error, cancel).
            let _tidy = TidyLocks {
                map: &self.querying,
                users: &stale,
                locks: &locks,
            };
            let mut guards = Vec::with_capacity(locks.len());
            for lock in &locks {
                guards.push(lock.lock().await);
            }
            let mut still = Vec::new();
            for user in &stale {
                match self.manager.tracked_devices(user)? {
                    Some(t) if !t.outdated => {
                        out.insert(user.clone(), t);
                    }
                    _ => still.push(user.clone()),
                }
            }
            if !still.is_empty() {
                self.queries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Read before asking: an invalidation that comes in while
                // the query runs keeps the user outdated.
                let mut generations = Vec::with_capacity(still.len());
                for user in &still {
                    generations.push(self.manager.tracked_generation(user)?);
                }
                let answer = self
                    .retry(|| {
                        self.homeserver
                            .query_keys(puppet.0, puppet.1, still.iter().cloned())
                    })
                    .await?;
                for (user, generation) in still.iter().zip(generations) {
                    // A user the homeserver did not answer for (their
                    // server unreachable) is left as it was: an empty list
                    // is not the same as no answer.
                    let Some(listed) = answer.get(user) else {
                        tracing::debug!(%user, "keys/query gave no answer for this user");
                        if let Some(t) = self.manager.tracked_devices(user)? {
                            out.insert(user.clone(), t);
                        }
                        continue;
                    };
                    self.manager
                        .update_tracked_devices_since(user, listed, Some(generation))
                        .await?;
                    if let Some(t) = self.manager.tracked_devices(user)? {
                        out.insert(user.clone(), t);
                    }
                }
            }
            drop(guards);
        }
        Ok(out)
    }

    /// Encrypt `content` (an event of type `event_type`) from the puppet
    /// device for each listed user's devices, and send it as
    /// `m.room.encrypted` to-device messages.
    ///
    /// Sessions are reused where they exist; otherwise one key per device is
    /// claimed (in one request) and verified. Every session step is durable
    /// before anything is sent. Devices that cannot be reached are reported
    /// in [`SendReport::failed`] without failing the others; the call fails
    /// as a whole only if the homeserver or the store does.
    pub async fn encrypt_to_device(
        &self,
        puppet: (&UserId, &DeviceId),
        recipients: &BTreeMap<OwnedUserId, Devices>,
        event_type: &str,
        content: &Value,
    ) -> Result<SendReport, PuppetOlmError> {
        let users: Vec<OwnedUserId> = recipients.keys().cloned().collect();
        let known = self.devices(puppet, &users).await?;
        let mut report = SendReport::default();
        // The verified target devices, and which lack a session.
        let mut targets = Vec::new();
        let mut to_claim: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>> = BTreeMap::new();
        for (user, which) in recipients {
            let Some(tracked) = known.get(user) else {
                continue;
            };
            let ids: Vec<OwnedDeviceId> = match which {
                Devices::All => tracked.devices.keys().cloned().collect(),
                Devices::Only(ids) => ids.clone(),
            };
            for id in ids {
                let Some(device) = tracked.devices.get(&id) else {
                    report
                        .failed
                        .push((user.clone(), id, DeviceFailure::UnknownDevice));
                    continue;
                };
                if self.manager.has_session(puppet, &device.curve25519)? {
                    report.sessions_reused += 1;
                } else {
                    to_claim.entry(user.clone()).or_default().push(id.clone());
                }
                targets.push((user.clone(), device.clone()));
            }
        }
        let mut unreachable = BTreeSet::new();
        if !to_claim.is_empty() {
            let claimed = self
                .retry(|| {
                    self.homeserver
                        .claim_keys(puppet.0, puppet.1, to_claim.clone())
                })
                .await?;
            let mut to_create = Vec::new();
            for (user, ids) in &to_claim {
                for id in ids {
                    let key = claimed
                        .get(user)
                        .and_then(|d| d.get(id))
                        .and_then(|keys| keys.values().next());
                    let Some(key) = key else {
                        report
                            .failed
                            .push((user.clone(), id.clone(), DeviceFailure::NoKeyToClaim));
                        unreachable.insert((user.clone(), id.clone()));
                        continue;
                    };
                    let Some(device) = known.get(user).and_then(|t| t.devices.get(id)) else {
                        continue;
                    };
                    let key: Value = match serde_json::from_str(key.json().get()) {
                        Ok(v) => v,
                        Err(_) => Value::Null,
                    };
                    to_create.push((user, id, device, key));
                }
            }
            // All at once, sharing the store's flushes (see below).
            let created =
                futures_util::future::join_all(to_create.iter().map(|(user, _, device, key)| {
                    let recipient = Recipient::tracked(user, device);
                    async move {
                        self.manager
                            .create_outbound_session(puppet, &recipient, key)
                            .await
                    }
                }))
                .await;
            for ((user, id, _, _), result) in to_create.into_iter().zip(created) {
                match result {
                    Ok(_) => report.sessions_created += 1,
                    Err(OlmError::BadKeySignature) => {
                        tracing::warn!(%user, device_id = %id, "claimed one-time key has a bad signature; device left out");
                        report.failed.push((
                            user.clone(),
                            id.clone(),
                            DeviceFailure::BadKeySignature,
                        ));
                        unreachable.insert((user.clone(), id.clone()));
                    }
                    Err(e @ OlmError::Store(_)) => return Err(e.into()),
                    Err(e) => {
                        report.failed.push((
                            user.clone(),
                            id.clone(),
                            DeviceFailure::Encryption(e.to_string()),
                        ));
                        unreachable.insert((user.clone(), id.clone()));
                    }
                }
            }
        }
        let mut messages: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Value>> = BTreeMap::new();
        let reachable: Vec<_> = targets
            .iter()
            .filter(|(user, device)| {
                !unreachable.contains(&(user.clone(), device.device_id.clone()))
            })
            .collect();
        // All at once: each message's ratchet step must be durable before it
        // leaves, and together they share the store's flushes (one `fsync`
        // for a room key to fifty devices instead of fifty).
        let encrypted = futures_util::future::join_all(reachable.iter().map(|(user, device)| {
            let recipient = Recipient::tracked(user, device);
            async move {
                self.manager
                    .encrypt_olm(puppet, &recipient, event_type, content)
                    .await
            }
        }))
        .await;
        for ((user, device), result) in reachable.into_iter().zip(encrypted) {
            match result {
                Ok(encrypted) => {
                    messages
                        .entry(user.clone())
                        .or_default()
                        .insert(device.device_id.clone(), encrypted.content);
                    report.sent.push((user.clone(), device.device_id.clone()));
                }
                Err(e @ OlmError::Store(_)) => return Err(e.into()),
                Err(e) => report.failed.push((
                    user.clone(),
                    device.device_id.clone(),
                    DeviceFailure::Encryption(e.to_string()),
                )),
            }
        }
        if !messages.is_empty() {
            let txn_id = crate::random_token();
            self.retry(|| {
                self.homeserver.send_to_device(
                    puppet.0,
                    puppet.1,
                    "m.room.encrypted",
                    &txn_id,
                    messages.clone(),
                )
            })
            .await?;
            report.txn_id = Some(txn_id);
        }
        Ok(report)
    }

    /// Encrypt a room event from the puppet device for an encrypted room
    /// whose joined (and, per history visibility, invited) members are
    /// `members`.
    ///
    /// The room's outbound group session is rotated when due (`settings`,
    /// from the room's `m.room.encryption`) or when a device that had its
    /// key is no longer among the members' verified devices; its key is
    /// shared over Olm with every verified device that does not have it
    /// yet, before the message is encrypted. The advanced ratchet is
    /// durable before the content is returned. Any failure is an error:
    /// there is no unencrypted fallback.
    pub async fn encrypt_room_event(
        &self,
        puppet: (&UserId, &DeviceId),
        room_id: &RoomId,
        members: &[OwnedUserId],
        settings: RotationSettings,
        event_type: &str,
        content: &Value,
    ) -> Result<RoomSend, PuppetOlmError> {
        let known = self.devices(puppet, members).await?;
        let mut recipients = Vec::new();
        for (user, tracked) in &known {
            for device in tracked.devices.values() {
                // The puppet device itself holds the session already.
                if user == puppet.0 && device.device_id == puppet.1 {
                    continue;
                }
                recipients.push(GroupRecipient::tracked(user, device));
            }
        }
        let prepared = self
            .manager
            .prepare_group_session(puppet, room_id, settings, &recipients)
            .await?;
        let mut key_shared_with = 0;
        let mut key_failed = Vec::new();
        if !prepared.needs_key.is_empty() {
            let mut targets: BTreeMap<OwnedUserId, Devices> = BTreeMap::new();
            for r in &prepared.needs_key {
                match targets
                    .entry(r.user_id.clone())
                    .or_insert_with(|| Devices::Only(Vec::new()))
                {
                    Devices::Only(ids) => ids.push(r.device_id.clone()),
                    Devices::All => {}
                }
            }
            let room_key: Value = serde_json::from_str(&prepared.room_key)
                .map_err(|e| OlmError::Encryption(e.to_string()))?;
            let report = self
                .encrypt_to_device(puppet, &targets, "m.room_key", &room_key)
                .await?;
            let shared: Vec<GroupRecipient> = prepared
                .needs_key
                .iter()
                .filter(|r| {
                    report
                        .sent
                        .iter()
                        .any(|(u, d)| *u == r.user_id && *d == r.device_id)
                })
                .cloned()
                .collect();
            key_shared_with = shared.len();
            key_failed = report.failed;
            self.manager
                .mark_group_session_shared(puppet, room_id, &prepared.session_id, &shared)
                .await?;
        }
        let content = self
            .manager
            .encrypt_room_event(puppet, room_id, event_type, content)
            .await?;
        Ok(RoomSend {
            content,
            session_id: prepared.session_id,
            rotated: prepared.rotated,
            key_shared_with,
            key_failed,
        })
    }

    /// Ask every device of `sender` (device id `*`) for a Megolm session's
    /// key, as the puppet device `puppet`: an unencrypted `m.room_key_request`
    /// to-device message (`action: "request"`, the session's algorithm,
    /// room, session id and sender key, the request id and the puppet's
    /// device id). A client answers (with an Olm `m.forwarded_room_key`)
    /// only devices it shared the session with. One attempt, under a
    /// `sendToDevice` transaction id derived from the request id: the
    /// caller retries.
    pub async fn request_room_key(
        &self,
        puppet: (&UserId, &DeviceId),
        sender: &UserId,
        request: &RoomKeyRequest,
    ) -> Result<(), PuppetOlmError> {
        let mut body = json!({
            "algorithm": bridgekeys_olm::MEGOLM_ALGORITHM,
            "room_id": request.room_id,
            "session_id": request.session_id,
        });
        if let Some(key) = &request.sender_key {
            body["sender_key"] = json!(key);
        }
        let content = json!({
            "action": "request",
            "body": body,
            "request_id": request.request_id,
            "requesting_device_id": puppet.1,
        });
        self.homeserver
            .send_to_all_devices(
                puppet.0,
                puppet.1,
                "m.room_key_request",
                &format!("keyreq.{}", request.request_id),
                BTreeMap::from([(sender.to_owned(), content)]),
            )
            .await?;
        Ok(())
    }

    /// Take back a [`PuppetOlm::request_room_key`] (`action:
    /// "request_cancellation"`, the same request id), sent to every device
    /// of `sender` as the puppet device that asked. One attempt.
    pub async fn cancel_room_key_request(
        &self,
        puppet: (&UserId, &DeviceId),
        sender: &UserId,
        request_id: &str,
    ) -> Result<(), PuppetOlmError> {
        let content = json!({
            "action": "request_cancellation",
            "request_id": request_id,
            "requesting_device_id": puppet.1,
        });
        self.homeserver
            .send_to_all_devices(
                puppet.0,
                puppet.1,
                "m.room_key_request",
                &format!("keyreq-cancel.{request_id}"),
                BTreeMap::from([(sender.to_owned(), content)]),
            )
            .await?;
        Ok(())
    }

    /// Take a transaction's `device_lists` in: `changed` users are marked
    /// outdated (queried again before their devices are next used), `left`
    /// users are no longer tracked.
    pub async fn note_device_lists(&self, lists: &DeviceLists) -> Result<(), OlmError> {
        let (changed, left) = (&lists.changed, &lists.left);
        if !changed.is_empty() {
            self.manager
                .mark_devices_outdated(changed.iter().map(|u| u.as_ref()))
                .await?;
        }
        if !left.is_empty() {
            self.manager
                .forget_tracked_devices(left.iter().map(|u| u.as_ref()))
                .await?;
        }
        Ok(())
    }

    /// Run a homeserver call, retrying transient failures with backoff.
    async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, HomeserverError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, HomeserverError>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e) if e.is_transient() && attempt < self.attempts => {
                    tracing::debug!(error = %e, attempt, "homeserver call failed; retrying");
                    let asked = e.retry_after().unwrap_or_default();
                    tokio::time::sleep(delay.max(asked.min(Duration::from_secs(30)))).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
