//! Outbound Megolm: one group session per (room, puppet device), whose
//! message index is never used twice.
//!
//! * [`AccountManager::prepare_group_session`] returns the session to use
//!   for the room's next message, creating a new one when there is none or
//!   the current one is due for rotation (by age or message count, per the
//!   room's [`RotationSettings`]), or when it was shared with a device that
//!   is no longer among the recipients (a member left, a device
//!   disappeared). It says which recipient devices still need the key.
//! * The caller shares the key (an `m.room_key` over Olm) with those
//!   devices, then records them with
//!   [`AccountManager::mark_group_session_shared`] (so each device gets it
//!   once).
//! * [`AccountManager::encrypt_room_event`] encrypts with it, and stores the
//!   advanced ratchet **durably before returning the ciphertext**: a crash
//!   after the write skips an index the room never sees; a crash before it
//!   returns nothing, so no index is ever sent twice.
//!
//! A new session is also stored as an inbound session of the puppet's own
//! (so the bridge reads its puppets' messages like anyone else's).

use std::collections::{BTreeMap, BTreeSet};

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vodozemac::megolm::{GroupSession, GroupSessionPickle, InboundGroupSession, SessionConfig};
use zeroize::Zeroizing;

use crate::{AccountManager, MEGOLM_ALGORITHM, OlmError, TrackedDevice, stats::Counters};

/// When a room's outbound session must be replaced: the room's
/// `m.room.encryption` `rotation_period_ms` and `rotation_period_msgs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationSettings {
    /// Maximum age of a session, in milliseconds (default one week).
    pub period_ms: u64,
    /// Maximum messages per session (default 100).
    pub period_msgs: u64,
}

impl Default for RotationSettings {
    fn default() -> Self {
        Self {
            period_ms: 7 * 24 * 3600 * 1000,
            period_msgs: 100,
        }
    }
}

impl RotationSettings {
    /// From an `m.room.encryption` content (absent fields take the
    /// defaults; a zero is treated as one).
    pub fn from_encryption_content(content: &Value) -> Self {
        let default = Self::default();
        let field = |name: &str| content.get(name).and_then(Value::as_u64);
        Self {
            period_ms: field("rotation_period_ms")
                .unwrap_or(default.period_ms)
                .max(1),
            period_msgs: field("rotation_period_msgs")
                .unwrap_or(default.period_msgs)
                .max(1),
        }
    }
}

/// A device that should hold the room's session key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupRecipient {
    /// Its user.
    pub user_id: OwnedUserId,
    /// The device.
    pub device_id: OwnedDeviceId,
    /// Its curve25519 key (a device whose key changes is a new recipient).
    pub curve25519: String,
}

impl GroupRecipient {
    /// A tracked device of `user_id`.
    pub fn tracked(user_id: &UserId, device: &TrackedDevice) -> Self {
        Self {
            user_id: user_id.to_owned(),
            device_id: device.device_id.clone(),
            curve25519: device.curve25519.to_base64(),
        }
    }
}

/// The session for a room's next message, and who still needs its key.
#[derive(Debug)]
pub struct PreparedGroupSession {
    /// The session id.
    pub session_id: String,
    /// The `m.room_key` content to share with [`Self::needs_key`] over Olm.
    /// Holds the session key: never log it.
    pub room_key: Zeroizing<String>,
    /// Recipients that have not been sent the key yet.
    pub needs_key: Vec<GroupRecipient>,
    /// Whether a new session was started (none, due, or a recipient gone).
    pub rotated: bool,
}

#[derive(Serialize, Deserialize)]
struct OutboundRecord {
    session_id: String,
    pickle: GroupSessionPickle,
    created_ms: u64,
    messages: u64,
    shared_with: BTreeSet<GroupRecipient>,
}

impl Serialize for GroupRecipient {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (
            self.user_id.as_str(),
            self.device_id.as_str(),
            &self.curve25519,
        )
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for GroupRecipient {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (user, device, curve25519) = <(String, String, String)>::deserialize(d)?;
        Ok(Self {
            user_id: OwnedUserId::try_from(user).map_err(serde::de::Error::custom)?,
            device_id: device.into(),
            curve25519,
        })
    }
}

fn encode(record: &OutboundRecord) -> Result<Zeroizing<Vec<u8>>, OlmError> {
    rmp_serde::to_vec(record)
        .map(Zeroizing::new)
        .map_err(|e| OlmError::Corrupt(format!("cannot serialise outbound session: {e}")))
}

fn decode(bytes: &[u8]) -> Result<OutboundRecord, OlmError> {
    rmp_serde::from_slice(bytes).map_err(|e| OlmError::Corrupt(format!("outbound session: {e}")))
}

/// What a discarded outbound session leaves behind: an empty record, one
/// version past the session, instead of no record. Versions of a room's
/// outbound record then never restart: if a discard removed the record, the
/// next session would be created at version 1 again, and a process still
/// holding the discarded session at version 1 would pass the
/// compare-and-swap and bring it back (to be used after a member left).
const DISCARDED: &[u8] = &[];

/// The live session of a stored record, `None` for a discarded one.
fn live(data: &[u8]) -> Result<Option<OutboundRecord>, OlmError> {
    if data == DISCARDED {
        Ok(None)
    } else {
        decode(data).map(Some)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl AccountManager {
    /// The outbound session for the puppet device's next message in
    /// `room_id`, to be shared with `recipients` (every verified device of
    /// the room's members). Rotates when due or when a device it was shared
    /// with is no longer a recipient. Durable before it returns.
    pub async fn prepare_group_session(
        &self,
        from: (&UserId, &DeviceId),
        room_id: &RoomId,
        settings: RotationSettings,
        recipients: &[GroupRecipient],
    ) -> Result<PreparedGroupSession, OlmError> {
        let (user_id, _) = from;
        let (key, slot) = self.slot_of_later(from).await?;
        let wanted: BTreeSet<GroupRecipient> = recipients.iter().cloned().collect();
        let (prepared, pending) = {
            let mut device = slot.lock();
            let identity = device.account()?.identity_keys();
            self.retry_conflicts("preparing an outbound group session", |_| {
                let stored = self
                    .store
                    .load_outbound_group_session(&key, room_id.as_str())?;
                // A discarded session's record is replaced at its version.
                let version = stored.as_ref().map(|s| s.version);
                let current = match stored {
                    Some(stored) => live(&stored.data)?,
                    None => None,
                };
                let now = now_ms();
                let keep = current.filter(|c| {
                    now.saturating_sub(c.created_ms) < settings.period_ms
                        && c.messages < settings.period_msgs
                        && c.shared_with.is_subset(&wanted)
                });
                let (record, rotated, pending) = match keep {
                    Some(record) => (record, false, None),
                    None => {
                        let session = GroupSession::new(SessionConfig::version_1());
                        let record = OutboundRecord {
                            session_id: session.session_id(),
                            pickle: session.pickle(),
                            created_ms: now,
                            messages: 0,
                            shared_with: BTreeSet::new(),
                        };
                        // The puppet's own inbound copy, then the outbound one.
                        let inbound = InboundGroupSession::new(
                            &session.session_key(),
                            SessionConfig::version_1(),
                        );
                        let _applied = self.store_group_session(
                            room_id,
                            user_id,
                            &identity.curve25519,
                            &identity.ed25519,
                            &inbound,
                        )?;
                        // Replaces the session read above only if no other
                        // process rotated or advanced it since (then this
                        // attempt is redone on what it stored).
                        let pending = self.store.write_outbound_group_session(
                            &key,
                            room_id.as_str(),
                            version,
                            Some(&encode(&record)?),
                        )?;
                        (record, true, Some(pending))
                    }
                };
                let OutboundRecord {
                    session_id,
                    pickle,
                    shared_with,
                    ..
                } = record;
                let session = GroupSession::from_pickle(pickle);
                let room_key = json!({
                    "algorithm": MEGOLM_ALGORITHM,
                    "room_id": room_id,
                    "session_id": session_id,
                    "session_key": session.session_key().to_base64(),
                });
                let prepared = PreparedGroupSession {
                    session_id,
                    room_key: Zeroizing::new(room_key.to_string()),
                    needs_key: wanted.difference(&shared_with).cloned().collect(),
                    rotated,
                };
                Ok((prepared, pending))
            })?
        };
        if let Some(pending) = pending {
            pending.durable().await?;
            Counters::add(&self.counters.group_sessions_created, 1);
            tracing::debug!(%room_id, session_id = %prepared.session_id, "new outbound group session");
        }
        Ok(prepared)
    }

    /// Record that `shared` devices were sent the key of `session_id`
    /// (ignored if the room's session has rotated since). Durable before it
    /// returns.
    pub async fn mark_group_session_shared(
        &self,
        from: (&UserId, &DeviceId),
        room_id: &RoomId,
        session_id: &str,
        shared: &[GroupRecipient],
    ) -> Result<(), OlmError> {
        let (key, slot) = self.slot_of_later(from).await?;
        let pending = {
            let _device = slot.lock();
            // The record holds the ratchet too: written back only if no
            // other process advanced it since it was read, or this would
            // roll the ratchet back and a message index would be used twice.
            self.retry_conflicts("recording who holds a room key", |_| {
                let Some(stored) = self
                    .store
                    .load_outbound_group_session(&key, room_id.as_str())?
                else {
                    return Ok(None);
                };
                let Some(mut record) = live(&stored.data)? else {
                    return Ok(None);
                };
                if record.session_id != session_id {
                    return Ok(None);
                }
                record.shared_with.extend(shared.iter().cloned());
                Ok(Some(self.store.write_outbound_group_session(
                    &key,
                    room_id.as_str(),
                    Some(stored.version),
                    Some(&encode(&record)?),
                )?))
            })?
        };
        if let Some(pending) = pending {
            pending.durable().await?;
        }
        Ok(())
    }

    /// Encrypt a room event with the puppet device's current session in
    /// `room_id` (prepare and share it first). Returns the
    /// `m.room.encrypted` content. The advanced ratchet is durable before
    /// this returns; on any error nothing is returned, so nothing can be
    /// sent in the clear by mistake.
    pub async fn encrypt_room_event(
        &self,
        from: (&UserId, &DeviceId),
        room_id: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, OlmError> {
        let (_, device_id) = from;
        let (key, slot) = self.slot_of_later(from).await?;
        let (encrypted, pending) = {
            let mut device = slot.lock();
            let identity = device.account()?.identity_keys();
            // Loaded on every attempt: another process sharing the store may
            // have encrypted with this session since, and its message index
            // must not be used again.
            self.retry_conflicts("encrypting a room event", |_| {
                let stored = self
                    .store
                    .load_outbound_group_session(&key, room_id.as_str())?
                    .ok_or(OlmError::NoGroupSession)?;
                let mut record = live(&stored.data)?.ok_or(OlmError::NoGroupSession)?;
                let mut session = GroupSession::from_pickle(record.pickle);
                let plaintext = Zeroizing::new(
                    serde_json::to_string(&json!({
                        "type": event_type,
                        "content": content,
                        "room_id": room_id,
                    }))
                    .map_err(|e| OlmError::Encryption(e.to_string()))?,
                );
                let message = session.encrypt(plaintext.as_bytes());
                record.pickle = session.pickle();
                record.messages += 1;
                // Stored only if the session is still at the version read: else
                // this ciphertext (whose index another process may have used)
                // is dropped and the event encrypted again.
                let pending = self.store.write_outbound_group_session(
                    &key,
                    room_id.as_str(),
                    Some(stored.version),
                    Some(&encode(&record)?),
                )?;
                let encrypted = json!({
                    "algorithm": MEGOLM_ALGORITHM,
                    "ciphertext": message.to_base64(),
                    "session_id": record.session_id,
                    "sender_key": identity.curve25519.to_base64(),
                    "device_id": device_id,
                });
                Ok((encrypted, pending))
            })?
        };
        pending.durable().await?;
        Counters::add(&self.counters.room_events_encrypted, 1);
        Ok(encrypted)
    }

    /// Discard the puppet device's outbound session in `room_id`: the next
    /// message starts a new one.
    pub async fn discard_group_session(
        &self,
        from: (&UserId, &DeviceId),
        room_id: &RoomId,
    ) -> Result<(), OlmError> {
        let (key, slot) = self.slot_of_later(from).await?;
        let pending = {
            let _device = slot.lock();
            self.retry_conflicts("discarding an outbound group session", |_| {
                match self
                    .store
                    .load_outbound_group_session(&key, room_id.as_str())?
                {
                    Some(stored) if stored.data.as_slice() != DISCARDED => {
                        Ok(Some(self.store.write_outbound_group_session(
                            &key,
                            room_id.as_str(),
                            Some(stored.version),
                            Some(DISCARDED),
                        )?))
                    }
                    _ => Ok(None),
                }
            })?
        };
        if let Some(pending) = pending {
            pending.durable().await?;
        }
        Ok(())
    }
}

/// The shared-with set keyed by user, for reports.
pub fn by_user(recipients: &[GroupRecipient]) -> BTreeMap<OwnedUserId, Vec<OwnedDeviceId>> {
    let mut out: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>> = BTreeMap::new();
    for r in recipients {
        out.entry(r.user_id.clone())
            .or_default()
            .push(r.device_id.clone());
    }
    out
}
