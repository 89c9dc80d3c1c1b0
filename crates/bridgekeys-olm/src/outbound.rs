//! Outbound Olm: a puppet device encrypts to-device content for another
//! device.
//!
//! 1. [`AccountManager::has_session`]: is there a session with the
//!    recipient's curve25519 key already? The most recently used one is
//!    reused.
//! 2. If not, the caller claims one of the recipient's one-time keys (the
//!    appservice crate does it through the homeserver) and hands it to
//!    [`AccountManager::create_outbound_session`], which verifies the key's
//!    signature by the recipient device's ed25519 key before using it, and
//!    stores the new session durably.
//! 3. [`AccountManager::encrypt_olm`] builds the payload with every field the
//!    spec requires (`sender`, `sender_device`, `recipient`,
//!    `recipient_keys`, `keys`, `type`, `content`), encrypts it, and stores
//!    the advanced session **before** returning the ciphertext: a crash
//!    after that loses at most a message index the recipient never sees,
//!    never reuses one.

use ruma::{DeviceId, UserId};
use serde_json::{Value, json};
use vodozemac::{
    Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature,
    olm::{OlmMessage, SessionConfig},
};

use crate::{
    AccountManager, OlmError, TrackedDevice,
    sessions::{decode_session, encode_session},
    signing::canonical_json_for_signing,
    stats::Counters,
};

/// The Olm algorithm name in `m.room.encrypted` content.
pub const OLM_ALGORITHM: &str = "m.olm.v1.curve25519-aes-sha2";

/// A device to encrypt for: who it belongs to and its verified keys.
#[derive(Clone, Copy, Debug)]
pub struct Recipient<'a> {
    /// The recipient user.
    pub user_id: &'a UserId,
    /// The recipient device.
    pub device_id: &'a DeviceId,
    /// Its curve25519 identity key.
    pub curve25519: Curve25519PublicKey,
    /// Its ed25519 signing key.
    pub ed25519: Ed25519PublicKey,
}

impl<'a> Recipient<'a> {
    /// A tracked device of `user_id` as a recipient.
    pub fn tracked(user_id: &'a UserId, device: &'a TrackedDevice) -> Self {
        Self {
            user_id,
            device_id: &device.device_id,
            curve25519: device.curve25519,
            ed25519: device.ed25519,
        }
    }
}

/// An encrypted to-device message, ready for `sendToDevice`.
#[derive(Clone, Debug)]
pub struct EncryptedOlm {
    /// The `m.room.encrypted` content (`algorithm`, `sender_key`,
    /// `ciphertext`).
    pub content: Value,
    /// The session used.
    pub session_id: String,
    /// 0 for a pre-key message (the recipient has not answered on this
    /// session yet), 1 for a normal message.
    pub message_type: usize,
}

impl AccountManager {
    /// Whether the puppet device has an Olm session with the device whose
    /// curve25519 key is `peer`.
    pub fn has_session(
        &self,
        from: (&UserId, &DeviceId),
        peer: &Curve25519PublicKey,
    ) -> Result<bool, OlmError> {
        let (key, slot) = self.slot_of(from)?;
        let mut device = slot.lock();
        Ok(!self
            .peer_sessions(&mut device, &key, &peer.to_bytes())?
            .is_empty())
    }

    /// Create an outbound Olm session to `recipient` from one of its
    /// one-time keys, claimed for it: `key` is the signed key object as the
    /// claim returned it (`{"key": ..., "signatures": ...}`).
    ///
    /// The signature must verify with the recipient's ed25519 key
    /// ([`OlmError::BadKeySignature`] otherwise, nothing stored). The new
    /// session is stored durably and becomes the one
    /// [`Self::encrypt_olm`] uses. Returns its id.
    pub async fn create_outbound_session(
        &self,
        from: (&UserId, &DeviceId),
        recipient: &Recipient<'_>,
        key: &Value,
    ) -> Result<String, OlmError> {
        let one_time_key = verify_signed_key(recipient, key)?;
        let (dkey, slot) = self.slot_of_later(from).await?;
        let (session_id, pending) = {
            let mut device = slot.lock();
            self.retry_device_conflicts(
                "creating an outbound Olm session",
                &mut device,
                &dkey,
                |device| {
                    let session = device.account()?.create_outbound_session(
                        SessionConfig::version_1(),
                        recipient.curve25519,
                        one_time_key,
                    );
                    let session = session.map_err(|e| OlmError::Encryption(e.to_string()))?;
                    let peer = recipient.curve25519.to_bytes();
                    let mut sessions = self.peer_sessions(device, &dkey, &peer)?;
                    let evict = self.evictions_for_new_session(&dkey, &mut sessions)?;
                    let record = bridgekeys_store::SessionRecord {
                        peer_key: peer,
                        session_id: session.session_id(),
                        last_used: self.session_clock(),
                        pickle: encode_session(&session)?,
                        // A new session: the store refuses it if one with
                        // its id exists.
                        version: None,
                    };
                    let pending = self.write_ratchet_step(device, &dkey, record, &evict, None)?;
                    Counters::add(&self.counters.sessions_evicted, evict.len() as u64);
                    Ok((session.session_id(), pending))
                },
            )?
        };
        pending.durable().await?;
        Counters::add(&self.counters.sessions_created_outbound, 1);
        Ok(session_id)
    }

    /// Encrypt `content` of type `event_type` for `recipient` on the most
    /// recently used session with it; [`OlmError::NoMatchingSession`] if
    /// there is none (claim a key and call
    /// [`Self::create_outbound_session`] first).
    ///
    /// The advanced session is durable before this returns.
    pub async fn encrypt_olm(
        &self,
        from: (&UserId, &DeviceId),
        recipient: &Recipient<'_>,
        event_type: &str,
        content: &Value,
    ) -> Result<EncryptedOlm, OlmError> {
        let (user_id, device_id) = from;
        let (key, slot) = self.slot_of_later(from).await?;
        let (encrypted, pending) = {
            let mut device = slot.lock();
            self.retry_device_conflicts("encrypting an Olm message", &mut device, &key, |device| {
                let identity = device.account()?.identity_keys();
                let peer = recipient.curve25519.to_bytes();
                // Read from the store on every attempt: another process may
                // have advanced the session since.
                let sessions = self.peer_sessions(device, &key, &peer)?;
                let newest = sessions.first().ok_or(OlmError::NoMatchingSession)?;
                let mut session = decode_session(&newest.pickle)?;
                let payload = json!({
                    "sender": user_id,
                    "sender_device": device_id,
                    "recipient": recipient.user_id,
                    "recipient_keys": { "ed25519": recipient.ed25519.to_base64() },
                    "keys": { "ed25519": identity.ed25519.to_base64() },
                    "type": event_type,
                    "content": content,
                });
                let plaintext = zeroize::Zeroizing::new(
                    serde_json::to_vec(&payload)
                        .map_err(|e| OlmError::Encryption(e.to_string()))?,
                );
                let message = session
                    .encrypt(plaintext.as_slice())
                    .map_err(|e| OlmError::Encryption(e.to_string()))?;
                let (message_type, body) = match &message {
                    OlmMessage::PreKey(m) => (0, m.to_base64()),
                    OlmMessage::Normal(m) => (1, m.to_base64()),
                };
                let record = bridgekeys_store::SessionRecord {
                    peer_key: peer,
                    session_id: newest.session_id.clone(),
                    last_used: self.session_clock(),
                    pickle: encode_session(&session)?,
                    // Stored only if nobody advanced the session since it was
                    // read: otherwise this chain step may be another
                    // process's, and the message is encrypted again.
                    version: newest.version,
                };
                let pending = self.write_ratchet_step(device, &key, record, &[], None)?;
                let content = json!({
                    "algorithm": OLM_ALGORITHM,
                    "sender_key": identity.curve25519.to_base64(),
                    "ciphertext": {
                        recipient.curve25519.to_base64(): { "type": message_type, "body": body }
                    },
                });
                let encrypted = EncryptedOlm {
                    content,
                    session_id: newest.session_id.clone(),
                    message_type,
                };
                Ok((encrypted, pending))
            })?
        };
        pending.durable().await?;
        Counters::add(&self.counters.olm_encrypted, 1);
        Ok(encrypted)
    }
}

/// Check a claimed `{"key", "signatures"}` object against the recipient's
/// ed25519 key; return the one-time key.
fn verify_signed_key(
    recipient: &Recipient<'_>,
    key: &Value,
) -> Result<Curve25519PublicKey, OlmError> {
    let public = key
        .get("key")
        .and_then(Value::as_str)
        .and_then(|k| Curve25519PublicKey::from_base64(k).ok())
        .ok_or(OlmError::BadKeySignature)?;
    let signature = key
        .get("signatures")
        .and_then(|s| s.get(recipient.user_id.as_str()))
        .and_then(|s| s.get(format!("ed25519:{}", recipient.device_id)))
        .and_then(Value::as_str)
        .and_then(|s| Ed25519Signature::from_base64(s).ok())
        .ok_or(OlmError::BadKeySignature)?;
    let signed = canonical_json_for_signing(key)?;
    recipient
        .ed25519
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| OlmError::BadKeySignature)?;
    Ok(public)
}
