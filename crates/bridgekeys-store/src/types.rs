use std::fmt;

use zeroize::Zeroizing;

/// Identifies one device of one (puppet) user: the unit the store versions.
///
/// The encoding is length-prefixed, so no pair of ids can collide with
/// another pair, whatever characters they contain.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    encoded: Vec<u8>,
    split: usize,
}

impl DeviceKey {
    /// Build the key of `device_id` of `user_id`.
    ///
    /// Matrix ids are at most 255 bytes; longer inputs are still encoded
    /// unambiguously (the lengths are 32-bit).
    pub fn new(user_id: &str, device_id: &str) -> Self {
        let mut encoded = Vec::with_capacity(8 + user_id.len() + device_id.len());
        encoded.extend_from_slice(&(user_id.len() as u32).to_be_bytes());
        encoded.extend_from_slice(user_id.as_bytes());
        let split = encoded.len();
        encoded.extend_from_slice(&(device_id.len() as u32).to_be_bytes());
        encoded.extend_from_slice(device_id.as_bytes());
        Self { encoded, split }
    }

    /// The user id part.
    pub fn user_id(&self) -> &str {
        std::str::from_utf8(&self.encoded[4..self.split]).unwrap_or_default()
    }

    /// The device id part.
    pub fn device_id(&self) -> &str {
        std::str::from_utf8(&self.encoded[self.split + 4..]).unwrap_or_default()
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.encoded
    }

    /// Split a device key off the front of `bytes` (a record key after its
    /// tag): the device and what follows it; `None` if malformed.
    pub(crate) fn split_front(bytes: &[u8]) -> Option<(Self, &[u8])> {
        let len = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at + 4)?;
            Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let split = 4 + len(0)?;
        let end = split + 4 + len(split)?;
        let device = Self::from_bytes(bytes.get(..end)?)?;
        Some((device, &bytes[end..]))
    }

    /// Decode [`DeviceKey::as_bytes`]; `None` if malformed.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let len = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at + 4)?;
            Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let user_len = len(0)?;
        let split = 4 + user_len;
        let device_len = len(split)?;
        if bytes.len() != split + 4 + device_len {
            return None;
        }
        let user = std::str::from_utf8(&bytes[4..split]).ok()?;
        let device = std::str::from_utf8(&bytes[split + 4..]).ok()?;
        Some(Self::new(user, device))
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey({} {})", self.user_id(), self.device_id())
    }
}

/// The version of a versioned record: a device's account record, an Olm
/// session ([`SessionRecord::version`]) or an outbound Megolm session
/// ([`OutboundSessionRecord::version`]). Starts at 1 and grows by one with
/// every write, so a writer can prove it saw the latest state. (A session
/// stored by a build from before sessions carried versions reads as
/// version 0: its first versioned write makes it 1.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

impl Version {
    /// The version a successful write with `expected` produces.
    pub fn next(expected: Option<Version>) -> Version {
        Version(expected.map_or(1, |v| v.0 + 1))
    }
}

/// A device's account state as stored: opaque bytes (decrypted) and their version.
pub struct AccountRecord {
    /// The version to name in the next [`crate::Store::write_device`].
    pub version: Version,
    /// The serialised account, as the account manager wrote it.
    pub data: Zeroizing<Vec<u8>>,
}

/// One stored one-time key: its id, public half and (decrypted) private half.
pub struct OneTimeKeyRecord {
    /// The key id the key was published under (vodozemac's counter).
    pub key_id: u64,
    /// The public Curve25519 key.
    pub public_key: [u8; 32],
    /// The private Curve25519 key.
    pub secret_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for OneTimeKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneTimeKeyRecord")
            .field("key_id", &self.key_id)
            .field("secret_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Everything one atomic write of a device changes.
#[derive(Default)]
pub struct DeviceWrite {
    /// The new serialised account state (always written: the version moves
    /// with every device write).
    pub account: Zeroizing<Vec<u8>>,
    /// One-time keys to add.
    pub add_keys: Vec<OneTimeKeyRecord>,
    /// One-time keys to remove, as `(key_id, public_key)`.
    pub remove_keys: Vec<(u64, [u8; 32])>,
    /// Olm sessions to store (new or updated), each compare-and-swap on
    /// its [`SessionRecord::version`] like [`SessionWrite::put`].
    pub sessions: Vec<SessionRecord>,
    /// Olm sessions to remove (evicted), as `(peer_key, session_id)`.
    pub remove_sessions: Vec<([u8; 32], String)>,
    /// The result of a delivery to remember, so that the same delivery
    /// retried (after a crash) gets the same answer: see [`Delivery`].
    pub delivery: Option<Delivery>,
    /// Also record the device in the puppet registry, in the same atomic
    /// write as the account: see [`PuppetMark`]. `None` leaves the
    /// registry as it is.
    pub puppet: Option<PuppetMark>,
}

/// What a [`DeviceWrite`] records in the puppet registry
/// ([`crate::PuppetRegistry`]) along with the account.
///
/// Why: provisioning a puppet device writes its account (the fallback key
/// published) and then records the device and schedules its rotation. On
/// sled the registry entry of a device with an account is the account
/// record's header, so each of those steps rewrote the whole (~300-byte)
/// account record, and sled keeps every dead version until it cleans its
/// segment: folding them into one write saves bytes per provisioned device
/// and a durable wait. On every backend the effect is exactly that of
/// [`crate::PuppetRegistry::record_puppet`] followed (when `due_ms` is
/// given) by [`crate::PuppetRegistry::schedule_rotation`] with no
/// `found_at`, applied with the account or not at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PuppetMark {
    /// When given, the device's next rotation step is due then (replacing
    /// an earlier schedule); `None` keeps the schedule it has, if any.
    pub due_ms: Option<u64>,
}

/// What a decrypted message delivery left behind: kept (sealed) until the
/// delivery is acknowledged, because its one-time key is gone and the
/// message could not be decrypted a second time.
pub struct Delivery {
    /// Who delivered it, e.g. the appservice transaction id. Forgotten as a
    /// whole with [`crate::Store::forget_deliveries`].
    pub tag: String,
    /// The message as delivered (its bytes identify it within the tag).
    pub message: Vec<u8>,
    /// What to hand out again (the decryption result), sealed at rest.
    pub record: Zeroizing<Vec<u8>>,
}

/// The write of a key claim: the new one-time keys and the keys evicted to
/// respect the bound.
///
/// Unlike a [`DeviceWrite`] it is not applied atomically but in order (see
/// [`crate::Store::append_keys`]), which makes it several times cheaper.
#[derive(Default)]
pub struct KeyAppend {
    /// One-time keys to add.
    pub add_keys: Vec<OneTimeKeyRecord>,
    /// One-time keys to evict, as `(key_id, public_key)`.
    pub evict_keys: Vec<(u64, [u8; 32])>,
}

/// One Olm session of a device, as stored: found by the device and the
/// other party's curve25519 identity key, because that is all an incoming
/// message names.
pub struct SessionRecord {
    /// The other party's curve25519 identity key.
    pub peer_key: [u8; 32],
    /// The session id (vodozemac's, base64).
    pub session_id: String,
    /// When the session last decrypted or encrypted a message, in the
    /// manager's clock (microseconds): the most recently used session of a
    /// peer is tried first, and the least recently used is evicted first.
    pub last_used: u64,
    /// The session pickle, sealed at rest.
    pub pickle: Zeroizing<Vec<u8>>,
    /// The stored version this record was read at, `None` for a session
    /// that is not stored yet.
    ///
    /// Several processes may advance the same session: a write of this
    /// record applies only if the stored session is still at this version
    /// (`None`: only if there is no such session), and then stores it at
    /// [`Version::next`] of it. Otherwise the whole write fails with
    /// [`crate::StoreError::Conflict`] and changes nothing, so a ratchet
    /// step is never taken twice from the same state nor lost: the writer
    /// reloads and starts over.
    pub version: Option<Version>,
}

impl fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionRecord")
            .field("session_id", &self.session_id)
            .field("last_used", &self.last_used)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// One atomic change to a device's Olm sessions: a ratchet step (the
/// updated session), new sessions, evictions, and what the delivery that
/// caused it must find on a retry. The account record is not touched.
#[derive(Default)]
pub struct SessionWrite {
    /// Sessions to insert or replace, each compare-and-swap on its
    /// [`SessionRecord::version`]: one stale record and nothing of the
    /// write is applied ([`crate::StoreError::Conflict`]).
    pub put: Vec<SessionRecord>,
    /// Sessions to remove, as `(peer_key, session_id)`.
    pub remove: Vec<([u8; 32], String)>,
    /// Sessions stored by schema 1 (under the session id alone) to remove,
    /// once they are re-stored in `put`.
    pub remove_legacy: Vec<String>,
    /// The decryption result to remember for a retried delivery.
    pub delivery: Option<Delivery>,
}

/// A puppet device's outbound Megolm session in a room, as stored: the
/// record (decrypted) and its version.
pub struct OutboundSessionRecord {
    /// The version to name in the next
    /// [`crate::Store::write_outbound_group_session`]: every message
    /// encrypted advances the session, and two processes encrypting with
    /// the same stored state would hand out the same message index.
    pub version: Version,
    /// The record, as the account manager wrote it.
    pub data: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for OutboundSessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSessionRecord")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What [`crate::Store::record_message_index`] found.
pub enum IndexUse {
    /// The index was unused: it is now recorded for this event (applied,
    /// and durable with the next flush anybody asks for, e.g. the
    /// transaction's record: asking for one per event would cost an
    /// `fsync` per room event for nothing a crash could lose, since an
    /// event whose transaction was not recorded is delivered again).
    First,
    /// The same event decrypted at this index before (a redelivery).
    SameEvent,
    /// Another event decrypted at this index before: a replay.
    OtherEvent,
}

/// A room event held until its room key arrives.
pub struct HeldEvent {
    /// Its room.
    pub room_id: String,
    /// The Megolm session it needs.
    pub session_id: String,
    /// Its event id.
    pub event_id: String,
    /// What the caller stored with it (sealed at rest).
    pub record: Zeroizing<Vec<u8>>,
}
