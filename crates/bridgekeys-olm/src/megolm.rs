//! Inbound Megolm: room keys that arrive in verified Olm payloads, and the
//! room events they decrypt.
//!
//! * [`AccountManager::receive_room_key`] takes an `m.room_key` whose Olm
//!   payload passed its checks ([`crate::DecryptedOlm`]) and stores an
//!   inbound group session, sealed, keyed by (room id, session id), with
//!   the Olm channel's curve25519 key, the sender's claimed ed25519 key and
//!   the sending user. A copy that can decrypt more (a lower first known
//!   index) replaces a stored one; a worse copy never does, also when
//!   another process sharing the store wrote the better one a moment ago
//!   (the write is a compare-and-write over the copy compared with), and a
//!   key whose session id does not match its own key is refused.
//! * [`AccountManager::decrypt_room_event`] decrypts an `m.room.encrypted`
//!   room event (`m.megolm.v1.aes-sha2`) and refuses it, with nothing
//!   recorded, when
//!   - the event's room is not the session's room,
//!   - the event's sender is not the user who shared the session, or (when
//!     the sender's devices are tracked) owns no device with the session's
//!     curve25519 key,
//!   - the content's `sender_key`, if present, is not the session's,
//!   - or another event already decrypted at the same message index of the
//!     session (a replay). The same event again (a redelivered
//!     transaction) decrypts again.
//!
//! The first use of an index is recorded in the store before the plaintext
//! is returned (applied, and durable with the next flush: the listener
//! records the transaction, and flushes, before it answers).

use ruma::{RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use vodozemac::{
    Curve25519PublicKey, Ed25519PublicKey,
    megolm::{
        InboundGroupSession, InboundGroupSessionPickle, MegolmMessage, SessionConfig, SessionKey,
        SessionOrdering,
    },
};
use zeroize::Zeroizing;

use crate::{AccountManager, DecryptedOlm, OlmError, stats::Counters};

/// The Megolm algorithm name.
pub const MEGOLM_ALGORITHM: &str = "m.megolm.v1.aes-sha2";

/// Why a room key or a room event was refused. Nothing was stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MegolmError {
    /// The `m.room_key` content is malformed or not Megolm.
    #[error("malformed m.room_key: {0}")]
    BadRoomKey(&'static str),
    /// The room key's `session_id` is not the id of the key it carries.
    #[error("the room key's session id does not match its key")]
    SessionIdMismatch,
    /// The event's content is not a Megolm `m.room.encrypted` content.
    #[error("malformed Megolm event content: {0}")]
    BadEvent(&'static str),
    /// No room key for this session has arrived (yet).
    #[error("unknown Megolm session")]
    UnknownSession,
    /// The event was sent in another room than the session's.
    #[error("the event's room is not the session's room")]
    RoomMismatch,
    /// The event's sender did not share this session (or owns no device
    /// with its key).
    #[error("the event's sender does not own the session")]
    SenderMismatch,
    /// The message failed to decrypt (bad signature or MAC, or an index
    /// before the session's first known one).
    #[error("could not decrypt the room event: {0}")]
    Decryption(String),
    /// Another event already decrypted at this message index.
    #[error("replayed message index {0}")]
    Replay(u32),
}

/// What [`AccountManager::receive_room_key`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomKeyOutcome {
    /// A new session was stored.
    Stored,
    /// It replaced a stored copy that could decrypt less.
    Improved,
    /// A stored copy was as good or better: kept, this one dropped.
    Kept,
}

/// A decrypted room event.
pub struct DecryptedRoomEvent {
    /// The session that decrypted it.
    pub session_id: String,
    /// Its message index in that session.
    pub message_index: u32,
    /// The inner event type (`m.room.message`, ...).
    pub event_type: String,
    /// The inner content. Never log it.
    pub content: Box<RawValue>,
    /// The curve25519 key of the device that shared the session.
    pub sender_key: Curve25519PublicKey,
    /// Whether the sender's device keys were tracked and matched.
    pub sender_device_verified: bool,
}

impl std::fmt::Debug for DecryptedRoomEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptedRoomEvent")
            .field("session_id", &self.session_id)
            .field("message_index", &self.message_index)
            .field("event_type", &self.event_type)
            .finish_non_exhaustive()
    }
}

/// A stored inbound group session.
#[derive(Serialize, Deserialize)]
struct GroupRecord {
    room_id: String,
    /// The user whose verified Olm message carried the key.
    sender: String,
    /// The Olm channel's curve25519 key (base64).
    sender_key: String,
    /// The sender device's claimed ed25519 key (base64).
    sender_ed25519: String,
    pickle: InboundGroupSessionPickle,
}

#[derive(Deserialize)]
struct RoomKeyContent {
    algorithm: Option<String>,
    room_id: Option<String>,
    session_id: Option<String>,
    session_key: Option<String>,
}

#[derive(Deserialize)]
struct EncryptedContent {
    algorithm: Option<String>,
    ciphertext: Option<String>,
    session_id: Option<String>,
    sender_key: Option<String>,
}

#[derive(Deserialize)]
struct Inner<'a> {
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    room_id: Option<String>,
}

/// How many decoded inbound group sessions stay in memory.
const GROUP_CACHE_SESSIONS: usize = 1024;

/// What the checks before a decryption found about its sender.
struct Checked {
    sender_key: Curve25519PublicKey,
    sender_device_verified: bool,
}

/// A decoded inbound group session and what its record says about it.
struct CachedGroup {
    room_id: String,
    sender: String,
    sender_key: Curve25519PublicKey,
    sender_ed25519: Ed25519PublicKey,
    session: InboundGroupSession,
}

/// Decoded inbound group sessions, advanced to the last message they
/// decrypted. A session restored from its record starts at its first known
/// index and must ratchet forward to each message's index (about 80 us at
/// index 50); a cached one only steps from where it stopped. Any write of
/// a group session record by this process moves `writes` on, and an entry
/// taken out before a write is not put back after it, so the cache never
/// holds a copy older than this process stored. Another process sharing
/// the store may store a better copy without this cache knowing: an event
/// before the cached copy's first known index reads the store again
/// (`decrypt_room_event_inner`).
pub(crate) struct GroupCache {
    sessions: parking_lot::Mutex<lru::LruCache<(String, String), CachedGroup>>,
    writes: std::sync::atomic::AtomicU64,
}

impl Default for GroupCache {
    fn default() -> Self {
        Self {
            sessions: parking_lot::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::MIN.saturating_add(GROUP_CACHE_SESSIONS - 1),
            )),
            writes: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl GroupCache {
    /// Forget `(room, session)`: its record is being replaced.
    fn invalidate(&self, room_id: &str, session_id: &str) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.sessions
            .lock()
            .pop(&(room_id.to_owned(), session_id.to_owned()));
    }

    fn take(&self, room_id: &str, session_id: &str) -> (Option<CachedGroup>, u64) {
        let generation = self.writes.load(std::sync::atomic::Ordering::SeqCst);
        let entry = self
            .sessions
            .lock()
            .pop(&(room_id.to_owned(), session_id.to_owned()));
        (entry, generation)
    }

    fn put_back(&self, session_id: String, entry: CachedGroup, generation: u64) {
        let mut sessions = self.sessions.lock();
        // Checked under the lock: a write that began after `take` has
        // moved `writes` on already (it bumps before it writes).
        if self.writes.load(std::sync::atomic::Ordering::SeqCst) == generation {
            sessions.put((entry.room_id.clone(), session_id), entry);
        }
    }
}

fn encode(record: &GroupRecord) -> Result<Zeroizing<Vec<u8>>, OlmError> {
    rmp_serde::to_vec(record)
        .map(Zeroizing::new)
        .map_err(|e| OlmError::Corrupt(format!("cannot serialise group session: {e}")))
}

fn decode(bytes: &[u8]) -> Result<GroupRecord, OlmError> {
    rmp_serde::from_slice(bytes).map_err(|e| OlmError::Corrupt(format!("group session: {e}")))
}

impl AccountManager {
    /// Store an inbound group session as shared by `sender` from the
    /// device with these keys (applied; durable with the next flush).
    pub(crate) fn store_group_session(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        sender_key: &Curve25519PublicKey,
        sender_ed25519: &Ed25519PublicKey,
        session: &InboundGroupSession,
    ) -> Result<bridgekeys_store::Pending, OlmError> {
        let record = GroupRecord {
            room_id: room_id.to_string(),
            sender: sender.to_string(),
            sender_key: sender_key.to_base64(),
            sender_ed25519: sender_ed25519.to_base64(),
            pickle: session.pickle(),
        };
        self.group_cache
            .invalidate(room_id.as_str(), &session.session_id());
        Ok(self.store.write_group_session(
            room_id.as_str(),
            &session.session_id(),
            &encode(&record)?,
        )?)
    }

    /// Store the room key an `m.room_key` Olm payload carries (its payload
    /// already verified by [`AccountManager::decrypt_olm`]). Durable before
    /// it returns.
    pub async fn receive_room_key(&self, olm: &DecryptedOlm) -> Result<RoomKeyOutcome, OlmError> {
        let payload = &olm.payload;
        if payload.event_type != "m.room_key" {
            return Err(MegolmError::BadRoomKey("not an m.room_key").into());
        }
        let content: RoomKeyContent = serde_json::from_str(payload.content.get())
            .map_err(|_| MegolmError::BadRoomKey("not a JSON object"))?;
        if content.algorithm.as_deref() != Some(MEGOLM_ALGORITHM) {
            return Err(MegolmError::BadRoomKey("algorithm").into());
        }
        let room_id = content
            .room_id
            .and_then(|r| ruma::OwnedRoomId::try_from(r).ok())
            .ok_or(MegolmError::BadRoomKey("room_id"))?;
        let session_id = content
            .session_id
            .ok_or(MegolmError::BadRoomKey("session_id"))?;
        let key = content
            .session_key
            .as_deref()
            .and_then(|k| SessionKey::from_base64(k).ok())
            .ok_or(MegolmError::BadRoomKey("session_key"))?;
        let mut session = InboundGroupSession::new(&key, SessionConfig::version_1());
        if session.session_id() != session_id {
            return Err(MegolmError::SessionIdMismatch.into());
        }
        let record = GroupRecord {
            room_id: room_id.to_string(),
            sender: payload.sender.to_string(),
            sender_key: payload.sender_curve25519.to_base64(),
            sender_ed25519: payload.sender_ed25519.to_base64(),
            pickle: session.pickle(),
        };
        let encoded = encode(&record)?;
        // Written only over the copy compared with: where other processes
        // share the store, one of them may store a better copy between this
        // read and this write, and that copy must not be replaced by ours.
        // Then read and compare again.
        let attempts = self.config().session_write_attempts.max(1);
        let mut written = None;
        for attempt in 1..=attempts {
            // Keeps this process's own receivers of one session from losing
            // races to each other; other processes are kept out by the
            // compare-and-write below.
            let _one_writer = self.group_sessions.lock();
            let stored = self
                .store
                .load_group_session(room_id.as_str(), &session_id)?;
            let outcome = match &stored {
                None => RoomKeyOutcome::Stored,
                Some(bytes) => {
                    let stored = decode(bytes)?;
                    let mut existing = InboundGroupSession::from_pickle(stored.pickle);
                    // A copy from another sender or room under the same id
                    // is not connected to the stored one: never replaces it.
                    match session.compare(&mut existing) {
                        SessionOrdering::Better
                            if stored.room_id == room_id.as_str()
                                && stored.sender_key == record.sender_key =>
                        {
                            RoomKeyOutcome::Improved
                        }
                        _ => return Ok(RoomKeyOutcome::Kept),
                    }
                }
            };
            self.group_cache.invalidate(room_id.as_str(), &session_id);
            if let Some(pending) = self.store.replace_group_session(
                room_id.as_str(),
                &session_id,
                stored.as_deref().map(Vec::as_slice),
                &encoded,
            )? {
                written = Some((outcome, pending));
                break;
            }
            tracing::debug!(%room_id, attempt, "a room key's stored copy changed under us: comparing again");
        }
        let Some((outcome, pending)) = written else {
            tracing::warn!(%room_id, attempts, "storing a room key lost every race to other processes");
            return Err(OlmError::Contended {
                what: "room key",
                attempts,
            });
        };
        pending.durable().await?;
        Counters::add(&self.counters.room_keys_stored, 1);
        tracing::debug!(%room_id, sender = %payload.sender, ?outcome, "room key received");
        Ok(outcome)
    }

    /// Decrypt an `m.room.encrypted` room event (`content`) sent by
    /// `sender` in `room_id` with event id `event_id`; see the module docs
    /// for the checks. A refusal records nothing.
    pub fn decrypt_room_event(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event_id: &str,
        content: &RawValue,
    ) -> Result<DecryptedRoomEvent, OlmError> {
        let result = self.decrypt_room_event_inner(room_id, sender, event_id, content);
        match &result {
            Ok(_) => Counters::add(&self.counters.room_events_decrypted, 1),
            Err(e) => {
                Counters::add(&self.counters.room_events_refused, 1);
                tracing::debug!(%room_id, %sender, %event_id, error = %e, "room event not decrypted");
            }
        }
        result
    }

    /// A group session as its record stores it (its first known index).
    fn load_group(&self, room_id: &RoomId, session_id: &str) -> Result<CachedGroup, OlmError> {
        let Some(bytes) = self
            .store
            .load_group_session(room_id.as_str(), session_id)?
        else {
            return Err(MegolmError::UnknownSession.into());
        };
        let record = decode(&bytes)?;
        Ok(CachedGroup {
            sender_key: Curve25519PublicKey::from_base64(&record.sender_key)
                .map_err(|_| OlmError::Corrupt("group session sender key".into()))?,
            sender_ed25519: Ed25519PublicKey::from_base64(&record.sender_ed25519)
                .map_err(|_| OlmError::Corrupt("group session signing key".into()))?,
            session: InboundGroupSession::from_pickle(record.pickle),
            room_id: record.room_id,
            sender: record.sender,
        })
    }

    /// The room, sender and sender-key checks of the module docs, then the
    /// decryption itself.
    fn check_and_decrypt(
        &self,
        mut group: CachedGroup,
        room_id: &RoomId,
        sender: &UserId,
        claimed_sender_key: &Option<String>,
        message: &MegolmMessage,
    ) -> Result<(CachedGroup, Checked, vodozemac::megolm::DecryptedMessage), OlmError> {
        if group.room_id != room_id.as_str() {
            return Err(MegolmError::RoomMismatch.into());
        }
        if group.sender != sender.as_str() {
            return Err(MegolmError::SenderMismatch.into());
        }
        let (sender_key, sender_ed25519) = (group.sender_key, group.sender_ed25519);
        if claimed_sender_key
            .as_deref()
            .is_some_and(|claimed| claimed != sender_key.to_base64())
        {
            return Err(MegolmError::SenderMismatch.into());
        }
        // Where the sender's devices are tracked, the session's key must be
        // one of them, with the ed25519 key the sharer claimed.
        let sender_device_verified = match self.tracked_devices(sender)? {
            Some(tracked) => match tracked.by_curve25519(&sender_key) {
                Some(device) if device.ed25519 == sender_ed25519 => true,
                _ => return Err(MegolmError::SenderMismatch.into()),
            },
            None => false,
        };
        let decrypted = group
            .session
            .decrypt(message)
            .map_err(|e| MegolmError::Decryption(e.to_string()))?;
        Ok((
            group,
            Checked {
                sender_key,
                sender_device_verified,
            },
            decrypted,
        ))
    }

    fn decrypt_room_event_inner(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event_id: &str,
        content: &RawValue,
    ) -> Result<DecryptedRoomEvent, OlmError> {
        let content: EncryptedContent = serde_json::from_str(content.get())
            .map_err(|_| MegolmError::BadEvent("not a JSON object"))?;
        if content.algorithm.as_deref() != Some(MEGOLM_ALGORITHM) {
            return Err(MegolmError::BadEvent("algorithm").into());
        }
        let session_id = content
            .session_id
            .ok_or(MegolmError::BadEvent("session_id"))?;
        let message = content
            .ciphertext
            .as_deref()
            .and_then(|c| MegolmMessage::from_base64(c).ok())
            .ok_or(MegolmError::BadEvent("ciphertext"))?;
        // Sessions are stored per room: a session shared for another room
        // is not found here, which is the room check.
        let (cached, generation) = self.group_cache.take(room_id.as_str(), &session_id);
        let from_cache = cached.is_some();
        let group = match cached {
            Some(group) => group,
            None => self.load_group(room_id, &session_id)?,
        };
        // Another process sharing the store may have stored a better copy
        // (a lower first known index) since this one was cached: an event
        // before the cached copy's first index reads the store again before
        // it is refused.
        let before_cached = from_cache
            && !self.store.sole_writer()
            && message.message_index() < group.session.first_known_index();
        let (group, checked, decrypted) = match self.check_and_decrypt(
            group,
            room_id,
            sender,
            &content.sender_key,
            &message,
        ) {
            Err(OlmError::Megolm(MegolmError::Decryption(_))) if before_cached => {
                tracing::debug!(%room_id, %session_id, "an event before the cached copy's first index: reading the stored copy");
                let fresh = self.load_group(room_id, &session_id)?;
                self.check_and_decrypt(fresh, room_id, sender, &content.sender_key, &message)?
            }
            result => result?,
        };
        let Checked {
            sender_key,
            sender_device_verified,
        } = checked;
        let plaintext = Zeroizing::new(decrypted.plaintext);
        let inner: Inner<'_> = serde_json::from_slice(&plaintext)
            .map_err(|_| MegolmError::BadEvent("plaintext is not an event"))?;
        // The room inside the ciphertext must match the room too (clients
        // put it there so a ciphertext cannot be replayed elsewhere).
        if inner
            .room_id
            .as_deref()
            .is_some_and(|r| r != room_id.as_str())
        {
            return Err(MegolmError::RoomMismatch.into());
        }
        let event_type = inner.event_type.ok_or(MegolmError::BadEvent("type"))?;
        let inner_content = inner.content.ok_or(MegolmError::BadEvent("content"))?;
        match self.store.record_message_index(
            room_id.as_str(),
            &session_id,
            decrypted.message_index,
            event_id,
        )? {
            bridgekeys_store::IndexUse::First | bridgekeys_store::IndexUse::SameEvent => {}
            bridgekeys_store::IndexUse::OtherEvent => {
                return Err(MegolmError::Replay(decrypted.message_index).into());
            }
        }
        let inner_content = inner_content.to_owned();
        self.group_cache
            .put_back(session_id.clone(), group, generation);
        Ok(DecryptedRoomEvent {
            session_id,
            message_index: decrypted.message_index,
            event_type,
            content: inner_content,
            sender_key,
            sender_device_verified,
        })
    }
}
