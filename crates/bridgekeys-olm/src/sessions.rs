//! Inbound Olm: decrypting any Olm message to a puppet device, with its
//! payload verified, and the session's ratchet step durable before the
//! plaintext is released.
//!
//! A message names its sender only by curve25519 key, so sessions are
//! stored by (device, peer key) and the candidates are that peer's sessions,
//! most recently used first:
//!
//! * a **normal message** (type 1) is tried on each candidate; the first
//!   that decrypts it is the one;
//! * a **pre-key message** (type 0) whose session id is already stored goes
//!   to that session (the sender sent several messages before hearing
//!   back, or the message is redelivered), never creating a second session;
//!   otherwise it starts a new inbound session from the one-time key (or
//!   fallback key) it names, which is consumed in the same write.
//!
//! Decryption runs on copies; the payload is then checked
//! ([`crate::payload`]) and only if it passes is anything written: the
//! advanced session (and, for a new session, the account, the consumed key
//! and evictions) in one atomic write, plus the delivery record when the
//! message came in a retryable delivery. So a message that fails to decrypt
//! or fails its checks changes nothing.
//!
//! **A misaddressed pre-key message keeps its one-time key.** It decrypted,
//! so it was built with our key, but its payload names another recipient or
//! sender: the session it would start is refused, nothing is written, and
//! the key stays stored. That is safe: the key's secret never left us, and
//! a key is single-use *for sessions* (it is consumed exactly when a
//! verified session is created from it), so keeping it lets no one read
//! anything. The replayed bad message is refused the same way every time,
//! and the outstanding-key bound evicts the key if nothing valid ever uses
//! it. Consuming it instead would let whoever holds a claimed key burn it
//! with a message nobody can accept, and would be a state change on a
//! refused message.

use bridgekeys_store::{Delivery, DeviceKey, DeviceWrite, Pending, SessionRecord, SessionWrite};
use ruma::{DeviceId, UserId};
use vodozemac::{
    Curve25519PublicKey,
    olm::{OlmMessage, PreKeyMessage, Session, SessionConfig, SessionCreationError, SessionPickle},
};
use zeroize::Zeroizing;

use crate::{
    AccountManager, OlmError,
    account::DeviceAccount,
    devices::TrackedDevices,
    payload::{self, Expected, KnownDevice, OlmPayload},
    stats::Counters,
};

/// The tag byte of a MessagePack-encoded session pickle (older records are
/// JSON and start with `{`). Not postcard, as for accounts: vodozemac's
/// session pickle needs a self-describing format.
const SESSION_FORMAT: u8 = 1;

/// An Olm message to a puppet device, decrypted and verified.
pub struct DecryptedOlm {
    /// The session that decrypted it.
    pub session_id: String,
    /// The verified payload: sender, inner event type and content.
    pub payload: OlmPayload,
    /// The whole decrypted payload JSON. Never log it.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Whether this message started a new session.
    pub new_session: bool,
    /// Whether it started that session with the device's fallback key
    /// (rather than a one-time key): the fallback key should be rotated.
    pub used_fallback_key: bool,
}

impl std::fmt::Debug for DecryptedOlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptedOlm")
            .field("session_id", &self.session_id)
            .field("payload", &self.payload)
            .field("new_session", &self.new_session)
            .field("used_fallback_key", &self.used_fallback_key)
            .finish_non_exhaustive()
    }
}

/// What a delivery remembers of a decrypted message (sealed at rest by the
/// store). Plaintext in base64: it is bytes, not necessarily UTF-8.
#[derive(serde::Serialize, serde::Deserialize)]
struct DeliveryRecord {
    session_id: String,
    plaintext: Zeroizing<String>,
    used_fallback_key: bool,
    #[serde(default)]
    new_session: bool,
    /// Who sent it, and on which channel: a copy of the message presented
    /// with another sender or sender key is not this delivery.
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    sender_key: Option<String>,
}

pub(crate) fn encode_session(session: &Session) -> Result<Zeroizing<Vec<u8>>, OlmError> {
    let mut out = Zeroizing::new(Vec::with_capacity(1024));
    out.push(SESSION_FORMAT);
    rmp_serde::encode::write(&mut *out, &session.pickle())
        .map_err(|_| OlmError::Corrupt("cannot serialise a session".into()))?;
    Ok(out)
}

pub(crate) fn decode_session(bytes: &[u8]) -> Result<Session, OlmError> {
    let pickle: SessionPickle = match bytes.first() {
        Some(&SESSION_FORMAT) => rmp_serde::from_slice(&bytes[1..])
            .map_err(|_| OlmError::Corrupt("unreadable session pickle".into()))?,
        Some(b'{') => serde_json::from_slice(bytes)
            .map_err(|_| OlmError::Corrupt("unreadable session pickle".into()))?,
        _ => return Err(OlmError::Corrupt("unknown session format".into())),
    };
    Ok(Session::from_pickle(pickle))
}

/// The bytes that identify a message within a delivery.
fn message_bytes(message: &OlmMessage) -> Vec<u8> {
    let (kind, body) = message.clone().to_parts();
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(kind as u8);
    out.extend(body);
    out
}

/// A decryption before anything is written.
struct Opened {
    session_id: String,
    /// The stored version of the session it was decrypted with (`None`: a
    /// new session), which the write names.
    version: Option<bridgekeys_store::Version>,
    session: Session,
    plaintext: Zeroizing<Vec<u8>>,
    /// Set when the message starts a new session.
    created: Option<Created>,
}

/// A new inbound session's effect on the account.
struct Created {
    /// The consumed one-time key, `None` for the fallback key.
    one_time_key: Option<(u64, [u8; 32])>,
    /// The message used the current published fallback key, not yet marked
    /// used: mark it.
    marks_fallback_used: bool,
}

impl AccountManager {
    /// Decrypt an Olm message (`m.olm.v1.curve25519-aes-sha2`, either type)
    /// sent to a puppet device by `sender` (the to-device event's sender)
    /// from the Olm key `sender_key` (the content's `sender_key`).
    ///
    /// The payload is verified before anything is stored or returned:
    /// [`OlmError::Payload`] refuses it with no state change. On success
    /// the session's new state (and for a new session the consumed one-time
    /// key) is durable before this returns.
    ///
    /// `delivery` names a delivery that may be retried, such as an
    /// appservice transaction: the result is remembered durably, sealed, in
    /// the same write, so the same message in a retry of the same delivery
    /// gets the same plaintext back, even after a crash, although its
    /// ratchet step is spent. Call [`Self::forget_deliveries`] once the
    /// delivery is acknowledged for good.
    pub async fn decrypt_olm(
        &self,
        to: (&UserId, &DeviceId),
        sender: &UserId,
        sender_key: Curve25519PublicKey,
        message: &OlmMessage,
        delivery: Option<&str>,
    ) -> Result<DecryptedOlm, OlmError> {
        let (user_id, device_id) = to;
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot_later(&key, user_id, device_id).await?;
        let tracked = self.tracked_devices(sender)?;
        let (decrypted, pending) = {
            let mut device = slot.lock();
            let recipient_ed25519 = device.account()?.identity_keys().ed25519;
            let expected = Expected {
                recipient: user_id,
                recipient_ed25519,
                sender,
                sender_curve25519: sender_key,
            };
            // A conflict means another process advanced (or created) one
            // of the sessions read here: everything is read again and the
            // message decrypted again with the latest state (a pre-key
            // message that already started its session over there then
            // finds that session).
            let result = self.retry_device_conflicts(
                "decrypting an Olm message",
                &mut device,
                &key,
                |device| match self.redelivered(&key, &expected, &tracked, message, delivery)? {
                    Some(done) => Ok((done, self.store.sync())),
                    None => {
                        self.decrypt_locked(device, &key, &expected, &tracked, message, delivery)
                    }
                },
            );
            match result {
                Ok(done) => done,
                Err(e) => {
                    if matches!(e, OlmError::Payload(_)) {
                        Counters::add(&self.counters.payloads_refused, 1);
                        tracing::warn!(%user_id, %device_id, %sender, error = %e, "Olm payload refused");
                    } else {
                        Counters::add(&self.counters.olm_refused, 1);
                        if matches!(message, OlmMessage::PreKey(_)) {
                            Counters::add(&self.counters.prekeys_refused, 1);
                        }
                        tracing::debug!(%user_id, %device_id, %sender, error = %e, "Olm message refused");
                    }
                    return Err(e);
                }
            }
        };
        pending.durable().await?;
        Counters::add(&self.counters.olm_decrypted, 1);
        if decrypted.new_session {
            Counters::add(&self.counters.prekeys_decrypted, 1);
        }
        Ok(decrypted)
    }

    /// Forget what [`Self::decrypt_olm`] remembered for `delivery`, durably.
    pub async fn forget_deliveries(&self, delivery: &str) -> Result<(), OlmError> {
        self.store.forget_deliveries(delivery)?.durable().await?;
        Ok(())
    }

    /// The remembered result of `message` in `delivery`, if this is a retry.
    fn redelivered(
        &self,
        key: &DeviceKey,
        expected: &Expected<'_>,
        tracked: &Option<TrackedDevices>,
        message: &OlmMessage,
        delivery: Option<&str>,
    ) -> Result<Option<DecryptedOlm>, OlmError> {
        let Some(tag) = delivery else { return Ok(None) };
        let mut raw = self
            .store
            .load_delivery(key, tag, &message_bytes(message))?;
        if raw.is_none() {
            // Records written before the message type was part of the key
            // (pre-key messages only, by the previous release).
            if let OlmMessage::PreKey(prekey) = message {
                raw = self.store.load_delivery(key, tag, &prekey.to_bytes())?;
            }
        }
        let Some(raw) = raw else {
            return Ok(None);
        };
        let corrupt = || OlmError::Corrupt("unreadable delivery record".into());
        let record: DeliveryRecord = serde_json::from_slice(&raw).map_err(|_| corrupt())?;
        let same_sender = record
            .sender
            .as_deref()
            .is_none_or(|s| s == expected.sender.as_str());
        let same_channel = record
            .sender_key
            .as_deref()
            .is_none_or(|k| k == expected.sender_curve25519.to_base64());
        if !(same_sender && same_channel) {
            // Not the message that was delivered: decrypt it as any other
            // (it will be refused as a replay).
            return Ok(None);
        }
        let plaintext = Zeroizing::new(
            vodozemac::base64_decode(record.plaintext.as_str()).map_err(|_| corrupt())?,
        );
        let payload = verify(&plaintext, expected, tracked)?;
        Ok(Some(DecryptedOlm {
            session_id: record.session_id,
            payload,
            plaintext,
            new_session: record.new_session,
            used_fallback_key: record.used_fallback_key,
        }))
    }

    fn decrypt_locked(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        expected: &Expected<'_>,
        tracked: &Option<TrackedDevices>,
        message: &OlmMessage,
        delivery: Option<&str>,
    ) -> Result<(DecryptedOlm, Pending), OlmError> {
        let peer = expected.sender_curve25519.to_bytes();
        let mut sessions = self.peer_sessions(device, key, &peer)?;
        let opened = match message {
            OlmMessage::Normal(_) => {
                let mut found = None;
                for record in &sessions {
                    let mut session = decode_session(&record.pickle)?;
                    if let Ok(plaintext) = session.decrypt(message) {
                        found = Some(Opened {
                            session_id: record.session_id.clone(),
                            version: record.version,
                            session,
                            plaintext: Zeroizing::new(plaintext),
                            created: None,
                        });
                        break;
                    }
                }
                found.ok_or(OlmError::NoMatchingSession)?
            }
            OlmMessage::PreKey(prekey) => {
                let session_id = prekey.session_id();
                match sessions.iter().find(|r| r.session_id == session_id) {
                    Some(record) => {
                        let mut session = decode_session(&record.pickle)?;
                        // Its message key is spent: this exact message was
                        // decrypted before.
                        let plaintext = session.decrypt(message).map_err(|_| OlmError::Replay)?;
                        Opened {
                            session_id,
                            version: record.version,
                            session,
                            plaintext: Zeroizing::new(plaintext),
                            created: None,
                        }
                    }
                    None => {
                        self.open_new_session(device, key, expected.sender_curve25519, prekey)?
                    }
                }
            }
        };
        let payload = verify(&opened.plaintext, expected, tracked)?;

        let now = self.session_clock();
        let new_session = opened.created.is_some();
        let used_fallback_key = opened
            .created
            .as_ref()
            .is_some_and(|c| c.one_time_key.is_none());
        let evict = if new_session {
            self.evictions_for_new_session(key, &mut sessions)?
        } else {
            Vec::new()
        };
        let record = SessionRecord {
            peer_key: peer,
            session_id: opened.session_id.clone(),
            last_used: now,
            pickle: encode_session(&opened.session)?,
            version: opened.version,
        };
        let delivery = match delivery {
            Some(tag) => {
                let remembered = DeliveryRecord {
                    session_id: opened.session_id.clone(),
                    plaintext: Zeroizing::new(vodozemac::base64_encode(&opened.plaintext)),
                    used_fallback_key,
                    new_session,
                    sender: Some(expected.sender.to_string()),
                    sender_key: Some(expected.sender_curve25519.to_base64()),
                };
                let remembered = crate::wipe::json_zeroizing(&remembered)
                    .map_err(|_| OlmError::Corrupt("cannot serialise a delivery record".into()))?;
                Some(Delivery {
                    tag: tag.to_owned(),
                    message: message_bytes(message),
                    record: remembered,
                })
            }
            None => None,
        };
        let pending = match &opened.created {
            None => self.write_ratchet_step(device, key, record, &evict, delivery)?,
            Some(created) => {
                self.write_new_session(device, key, created, record, &evict, delivery)?
            }
        };
        Counters::add(&self.counters.sessions_evicted, evict.len() as u64);
        if let Some(created) = &opened.created {
            if created.one_time_key.is_some() {
                device.outstanding = device.outstanding.saturating_sub(1);
            } else {
                Counters::add(&self.counters.fallback_prekeys, 1);
            }
        }
        let decrypted = DecryptedOlm {
            session_id: opened.session_id,
            payload,
            plaintext: opened.plaintext,
            new_session,
            used_fallback_key,
        };
        Ok((decrypted, pending))
    }

    /// A new inbound session from the one-time key or fallback key a
    /// pre-key message names, decrypted on a copy: nothing is written here.
    fn open_new_session(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        sender_key: Curve25519PublicKey,
        message: &PreKeyMessage,
    ) -> Result<Opened, OlmError> {
        let config = SessionConfig::version_1();
        let stored = self
            .store
            .one_time_key(key, message.one_time_key().as_bytes())?;
        let result = match &stored {
            // Decrypt with a throw-away account holding just that key: the
            // real account is untouched until the write succeeds.
            Some(record) => {
                // The stack below is wiped after the key went into the
                // account (also when that failed) and after the session was
                // made with it: see `wipe::scrub_stack`.
                let account = device.with_one_time_key(record.key_id, &record.secret_key);
                crate::wipe::scrub_stack();
                let created = account?.create_inbound_session(config, sender_key, message);
                crate::wipe::scrub_stack();
                created
            }
            // Not a one-time key: it may be the fallback key, which the
            // account holds itself and which decryption does not consume.
            // vodozemac's inbound session creation takes `&mut Account` but
            // changes nothing when the key is a fallback key. Another
            // process may have rotated it since this copy was loaded.
            None => {
                self.refresh(device, key)?;
                device
                    .account()?
                    .create_inbound_session(config, sender_key, message)
            }
        };
        let created = match result {
            Ok(created) => created,
            Err(SessionCreationError::MissingOneTimeKey(_)) => {
                return Err(OlmError::UnknownOneTimeKey);
            }
            Err(e) => return Err(OlmError::Decryption(e)),
        };
        let used_public = message.one_time_key().to_base64();
        let marks_fallback_used = stored.is_none()
            && device
                .fallback
                .current
                .as_ref()
                .is_some_and(|c| c.published && !c.used && c.public_key == used_public);
        Ok(Opened {
            session_id: created.session.session_id(),
            version: None,
            session: created.session,
            plaintext: Zeroizing::new(created.plaintext),
            created: Some(Created {
                one_time_key: stored.map(|r| (r.key_id, r.public_key)),
                marks_fallback_used,
            }),
        })
    }

    /// The account write of a new inbound session: the account (fallback
    /// marked used if it was), the consumed key, the session, evictions,
    /// the delivery record, atomically.
    fn write_new_session(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        created: &Created,
        record: SessionRecord,
        evict: &[([u8; 32], String)],
        delivery: Option<Delivery>,
    ) -> Result<Pending, OlmError> {
        let set_used = |device: &mut DeviceAccount, used: bool| {
            if let Some(c) = device.fallback.current.as_mut() {
                c.used = used;
            }
        };
        // A message on the current, published fallback key proves it was
        // handed out: record it, so the rotation replaces it even if the
        // homeserver's report never reaches us.
        if created.marks_fallback_used {
            set_used(device, true);
        }
        let written = device.encode().and_then(|account| {
            let write = DeviceWrite {
                account,
                add_keys: Vec::new(),
                remove_keys: created.one_time_key.iter().copied().collect(),
                sessions: vec![record],
                remove_sessions: evict.to_vec(),
                delivery,
                puppet: None,
            };
            Ok(self.store.write_device(key, device.version, write)?)
        });
        match written {
            Ok(pending) => {
                // Schema 1 sessions of this device, if any, are re-stored by
                // the next ratchet step (they are still readable until then).
                device.version = Some(bridgekeys_store::Version::next(device.version));
                // Evicted schema 1 sessions must not be re-stored later.
                if let Some(legacy) = device.legacy.as_mut() {
                    legacy.retain(|l| {
                        !evict
                            .iter()
                            .any(|(p, id)| *p == l.peer_key && *id == l.session_id)
                    });
                }
                Ok(pending)
            }
            Err(e) => {
                if created.marks_fallback_used {
                    set_used(device, false);
                }
                self.reload(device, key);
                Err(e)
            }
        }
    }

    /// Store a session's new state (a ratchet step, or a new outbound
    /// session) with its evictions and delivery record, atomically. The
    /// first such write of a device also re-stores its schema 1 sessions
    /// by peer.
    pub(crate) fn write_ratchet_step(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        record: SessionRecord,
        evict: &[([u8; 32], String)],
        delivery: Option<Delivery>,
    ) -> Result<Pending, OlmError> {
        let legacy = device.legacy.take().unwrap_or_default();
        let mut put: Vec<SessionRecord> = legacy
            .iter()
            .filter(|l| !(l.session_id == record.session_id && l.peer_key == record.peer_key))
            .filter(|l| {
                !evict
                    .iter()
                    .any(|(p, id)| *p == l.peer_key && *id == l.session_id)
            })
            .map(|l| SessionRecord {
                peer_key: l.peer_key,
                session_id: l.session_id.clone(),
                last_used: l.last_used,
                pickle: l.pickle.clone(),
                version: None,
            })
            .collect();
        put.push(record);
        let write = SessionWrite {
            put,
            remove: evict.to_vec(),
            remove_legacy: legacy.iter().map(|l| l.session_id.clone()).collect(),
            delivery,
        };
        match self.store.write_sessions(key, write) {
            Ok(pending) => {
                if !legacy.is_empty() {
                    tracing::info!(
                        migrated = legacy.len(),
                        "re-stored schema 1 sessions by peer"
                    );
                }
                device.legacy = Some(Vec::new());
                Ok(pending)
            }
            Err(e) => {
                device.legacy = Some(legacy);
                Err(e.into())
            }
        }
    }

    /// The sessions of a device with `peer`, most recently used first,
    /// including any schema 1 session of the device that belongs to that
    /// peer (found once per load, re-stored by the next ratchet step).
    pub(crate) fn peer_sessions(
        &self,
        device: &mut DeviceAccount,
        key: &DeviceKey,
        peer: &[u8; 32],
    ) -> Result<Vec<SessionRecord>, OlmError> {
        let mut sessions = self.store.sessions(key, peer)?;
        if device.legacy.is_none() {
            let mut found = Vec::new();
            for (session_id, pickle) in self.store.legacy_sessions(key)? {
                let session = decode_session(&pickle)?;
                found.push(SessionRecord {
                    peer_key: session.session_keys().identity_key.to_bytes(),
                    session_id,
                    last_used: 0,
                    pickle,
                    // Not stored by peer yet: re-storing creates it.
                    version: None,
                });
            }
            device.legacy = Some(found);
        }
        for legacy in device.legacy.iter().flatten() {
            if legacy.peer_key == *peer
                && !sessions.iter().any(|s| s.session_id == legacy.session_id)
            {
                sessions.push(SessionRecord {
                    peer_key: legacy.peer_key,
                    session_id: legacy.session_id.clone(),
                    last_used: legacy.last_used,
                    pickle: legacy.pickle.clone(),
                    version: None,
                });
            }
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.last_used));
        if let Some(newest) = sessions.first() {
            self.saw_session_stamp(newest.last_used);
        }
        Ok(sessions)
    }

    /// The sessions to remove before one more is added: the peer's least
    /// recently used past [`crate::ManagerConfig::max_sessions_per_peer`]
    /// (`sessions`: the peer's, most recently used first), then the
    /// device's least recently used past
    /// [`crate::ManagerConfig::max_sessions_per_device`].
    pub(crate) fn evictions_for_new_session(
        &self,
        key: &DeviceKey,
        sessions: &mut Vec<SessionRecord>,
    ) -> Result<Vec<([u8; 32], String)>, OlmError> {
        let mut evict = self.sessions_to_evict(sessions, 1);
        let bound = self.config().max_sessions_per_device.max(1);
        let mut stamps = self.store.session_stamps(key)?;
        stamps.retain(|(peer, id, _)| !evict.iter().any(|(p, i)| p == peer && i == id));
        let excess = (stamps.len() + 1).saturating_sub(bound);
        if excess > 0 {
            stamps.sort_by_key(|(_, _, used)| *used);
            evict.extend(stamps.into_iter().take(excess).map(|(p, id, _)| (p, id)));
        }
        Ok(evict)
    }

    /// The least recently used sessions to remove so that `adding` more fit
    /// under [`crate::ManagerConfig::max_sessions_per_peer`].
    pub(crate) fn sessions_to_evict(
        &self,
        sessions: &mut Vec<SessionRecord>,
        adding: usize,
    ) -> Vec<([u8; 32], String)> {
        let bound = self.config().max_sessions_per_peer.max(1);
        let keep = bound.saturating_sub(adding);
        if sessions.len() <= keep {
            return Vec::new();
        }
        // Most recently used first: the tail goes.
        sessions
            .split_off(keep)
            .into_iter()
            .map(|s| (s.peer_key, s.session_id))
            .collect()
    }
}

/// Check a decrypted payload against what the recipient expects and the
/// sender's tracked devices.
fn verify(
    plaintext: &[u8],
    expected: &Expected<'_>,
    tracked: &Option<TrackedDevices>,
) -> Result<OlmPayload, OlmError> {
    payload::verify(plaintext, expected, |named| {
        let Some(tracked) = tracked.as_ref() else {
            return Ok(None);
        };
        fn known(d: &crate::TrackedDevice) -> KnownDevice<'_> {
            KnownDevice {
                device_id: &d.device_id,
                curve25519: d.curve25519,
                ed25519: d.ed25519,
            }
        }
        payload::sender_device(
            named,
            |id| tracked.devices.get(id).map(known),
            tracked
                .by_curve25519(&expected.sender_curve25519)
                .map(known),
        )
    })
    .map_err(OlmError::Payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vodozemac::olm::Account;

    #[test]
    fn a_session_survives_the_compact_encoding_and_the_json_one() {
        let alice = Account::new();
        let mut bob = Account::new();
        bob.generate_one_time_keys(1);
        let otk = *bob.one_time_keys().values().next().expect("key");
        let mut outbound = alice
            .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
            .expect("outbound");
        let OlmMessage::PreKey(first) = outbound.encrypt("one").expect("encrypt") else {
            panic!("pre-key first");
        };
        let inbound = bob
            .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &first)
            .expect("inbound")
            .session;
        let compact = encode_session(&inbound).expect("encode");
        let json = serde_json::to_vec(&inbound.pickle()).expect("json");
        assert!(
            compact.len() * 2 < json.len(),
            "{} vs {}",
            compact.len(),
            json.len()
        );
        for bytes in [compact.to_vec(), json] {
            let mut back = decode_session(&bytes).expect("decode");
            assert_eq!(back.session_id(), inbound.session_id());
            let second = outbound.encrypt("two").expect("encrypt");
            assert_eq!(back.decrypt(&second).expect("decrypt"), b"two");
        }
        assert!(matches!(
            decode_session(&[9, 1, 2]),
            Err(OlmError::Corrupt(_))
        ));
    }
}
