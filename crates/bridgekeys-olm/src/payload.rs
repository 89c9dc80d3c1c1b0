//! The checks every decrypted Olm payload must pass before anyone sees it.
//!
//! Olm authenticates the *channel* (the peer's curve25519 key), not who the
//! message claims to be for or from. The Matrix spec therefore puts the
//! addressing inside the ciphertext and requires the recipient to check it:
//!
//! ```jsonc
//! {
//!   "type": "m.room_key", "content": { /* ... */ },
//!   "sender": "@alice:hs", "sender_device": "ALICEDEV",   // sender_device optional
//!   "recipient": "@puppet:hs",
//!   "recipient_keys": { "ed25519": "<puppet device's ed25519>" },
//!   "keys": { "ed25519": "<sender device's ed25519>" }
//! }
//! ```
//!
//! Without the checks, a message encrypted for one device could be replayed
//! to another (`recipient`, `recipient_keys`), or a device could speak in
//! another user's name (`sender`). `keys.ed25519` is the sender device's
//! *claimed* signing key: recorded, and compared with the device's keys when
//! they are known from a `keys/query` ([`crate::TrackedDevices`]).
//!
//! Errors never quote the plaintext (serde's messages can contain fragments
//! of the input, so they are not passed on).

use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey};

/// Why a decrypted Olm payload was refused. Nothing was stored, and the
/// plaintext reached no one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The plaintext is not a JSON object of the expected shape.
    #[error("the decrypted payload is not a JSON object with the Olm payload fields")]
    NotJson,
    /// A required field is missing or has the wrong type.
    #[error("the decrypted payload lacks `{0}`")]
    Missing(&'static str),
    /// `recipient` is another user: the message was meant for someone else.
    #[error("the payload is addressed to another user")]
    WrongRecipient,
    /// `recipient_keys.ed25519` is not this device's key.
    #[error("the payload is addressed to another device")]
    WrongRecipientKey,
    /// `sender` is not the user the homeserver says sent the message.
    #[error("the payload's sender is not the to-device event's sender")]
    WrongSender,
    /// `keys.ed25519` is not an ed25519 key.
    #[error("the payload's sender signing key is malformed")]
    BadSenderKey,
    /// The sender's device is known and its keys differ from what the
    /// message shows (its curve25519 key, or the claimed ed25519 key).
    #[error("the sender device's known keys do not match the message")]
    SenderKeysMismatch,
}

/// What the recipient expects of a payload: its own identity and the
/// sender the homeserver named.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The puppet user the message was delivered to.
    pub recipient: &'a UserId,
    /// The puppet device's ed25519 key.
    pub recipient_ed25519: Ed25519PublicKey,
    /// The to-device event's `sender`, as the homeserver stated it.
    pub sender: &'a UserId,
    /// The Olm channel's peer key (the content's `sender_key`).
    pub sender_curve25519: Curve25519PublicKey,
}

/// The sender device's keys as tracked (from a verified `keys/query`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownDevice<'a> {
    /// Its device id.
    pub device_id: &'a ruma::DeviceId,
    /// Its curve25519 identity key.
    pub curve25519: Curve25519PublicKey,
    /// Its ed25519 signing key.
    pub ed25519: Ed25519PublicKey,
}

/// A payload that passed every check.
pub struct OlmPayload {
    /// The sender (equal to the to-device event's sender).
    pub sender: OwnedUserId,
    /// The sender's device, if the payload names it.
    pub sender_device: Option<OwnedDeviceId>,
    /// The sender device's ed25519 key as the payload claims it
    /// (`keys.ed25519`); `sender_device_verified` says whether it was
    /// matched against the device's tracked keys.
    pub sender_ed25519: Ed25519PublicKey,
    /// The Olm channel's peer key.
    pub sender_curve25519: Curve25519PublicKey,
    /// Whether the sender's device keys were known and matched.
    pub sender_device_verified: bool,
    /// The inner event type (`m.room_key`, `m.dummy`, ...).
    pub event_type: String,
    /// The inner event content. Never log it. It is the bridge's copy and
    /// is not wiped when dropped (the library's own copies, the plaintext
    /// buffer and the delivery record, are): a bridge that keeps secrets
    /// from it (an `m.room_key`'s `session_key`) wipes them itself.
    pub content: Box<RawValue>,
}

impl std::fmt::Debug for OlmPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OlmPayload")
            .field("sender", &self.sender)
            .field("sender_device", &self.sender_device)
            .field("sender_device_verified", &self.sender_device_verified)
            .field("event_type", &self.event_type)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    sender: Option<String>,
    sender_device: Option<String>,
    recipient: Option<String>,
    recipient_keys: Option<KeyMap>,
    keys: Option<KeyMap>,
}

#[derive(Deserialize)]
struct KeyMap {
    ed25519: Option<String>,
}

/// Check a decrypted payload. `known` finds the tracked keys of the sender
/// device given the payload's `sender_device` (see [`sender_device`] for
/// the usual rule): `Ok(None)` when it is not known (the claimed key is
/// then recorded, unverified), an error when the payload names a device
/// that contradicts what is tracked.
pub fn verify<'k>(
    plaintext: &[u8],
    expected: &Expected<'_>,
    known: impl Fn(Option<&ruma::DeviceId>) -> Result<Option<KnownDevice<'k>>, PayloadError>,
) -> Result<OlmPayload, PayloadError> {
    let wire: Wire<'_> = serde_json::from_slice(plaintext).map_err(|_| PayloadError::NotJson)?;
    let event_type = wire.event_type.ok_or(PayloadError::Missing("type"))?;
    let content = wire.content.ok_or(PayloadError::Missing("content"))?;
    if !content.get().starts_with('{') {
        return Err(PayloadError::Missing("content"));
    }
    let recipient = wire.recipient.ok_or(PayloadError::Missing("recipient"))?;
    if recipient != expected.recipient.as_str() {
        return Err(PayloadError::WrongRecipient);
    }
    let recipient_key = wire
        .recipient_keys
        .and_then(|k| k.ed25519)
        .ok_or(PayloadError::Missing("recipient_keys.ed25519"))?;
    if recipient_key != expected.recipient_ed25519.to_base64() {
        return Err(PayloadError::WrongRecipientKey);
    }
    let sender = wire.sender.ok_or(PayloadError::Missing("sender"))?;
    if sender != expected.sender.as_str() {
        return Err(PayloadError::WrongSender);
    }
    let claimed = wire
        .keys
        .and_then(|k| k.ed25519)
        .ok_or(PayloadError::Missing("keys.ed25519"))?;
    let sender_ed25519 =
        Ed25519PublicKey::from_base64(&claimed).map_err(|_| PayloadError::BadSenderKey)?;
    let sender_device: Option<OwnedDeviceId> = wire.sender_device.map(Into::into);
    let device = known(sender_device.as_deref())?;
    let sender_device_verified = match device {
        Some(device) => {
            if device.curve25519 != expected.sender_curve25519 || device.ed25519 != sender_ed25519 {
                return Err(PayloadError::SenderKeysMismatch);
            }
            true
        }
        None => false,
    };
    Ok(OlmPayload {
        sender: expected.sender.to_owned(),
        // The device the keys matched, when they did; otherwise what the
        // payload says (unverified).
        sender_device: device.map(|d| d.device_id.to_owned()).or(sender_device),
        sender_ed25519,
        sender_curve25519: expected.sender_curve25519,
        sender_device_verified,
        event_type,
        content: content.to_owned(),
    })
}

/// The usual lookup of a sender device among a user's tracked devices
/// (`by_id`, `by_curve25519`, both over the same list):
///
/// * the payload names a tracked device: that device (its keys must then
///   match the channel);
/// * it names a device that is not tracked, while the channel's key belongs
///   to a tracked device: a contradiction, refused
///   ([`PayloadError::SenderKeysMismatch`]);
/// * otherwise the device with the channel's key, if tracked.
pub fn sender_device<'k>(
    named: Option<&ruma::DeviceId>,
    by_id: impl Fn(&ruma::DeviceId) -> Option<KnownDevice<'k>>,
    by_channel: Option<KnownDevice<'k>>,
) -> Result<Option<KnownDevice<'k>>, PayloadError> {
    match named {
        Some(id) => match by_id(id) {
            Some(device) => Ok(Some(device)),
            None if by_channel.is_some() => Err(PayloadError::SenderKeysMismatch),
            None => Ok(None),
        },
        None => Ok(by_channel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{device_id, user_id};
    use serde_json::{Value, json};
    use vodozemac::olm::Account;

    struct Fixture {
        puppet: Account,
        alice: Account,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                puppet: Account::new(),
                alice: Account::new(),
            }
        }
        fn expected(&self) -> Expected<'static> {
            Expected {
                recipient: user_id!("@puppet:hs"),
                recipient_ed25519: self.puppet.ed25519_key(),
                sender: user_id!("@alice:hs"),
                sender_curve25519: self.alice.curve25519_key(),
            }
        }
        fn payload(&self) -> Value {
            json!({
                "type": "m.dummy",
                "content": {"n": 1},
                "sender": "@alice:hs",
                "sender_device": "ALICEDEV",
                "recipient": "@puppet:hs",
                "recipient_keys": {"ed25519": self.puppet.ed25519_key().to_base64()},
                "keys": {"ed25519": self.alice.ed25519_key().to_base64()},
            })
        }
        fn check(&self, payload: &Value) -> Result<OlmPayload, PayloadError> {
            verify(payload.to_string().as_bytes(), &self.expected(), |_| {
                Ok(None)
            })
        }
    }

    #[test]
    fn a_correct_payload_passes_and_records_the_claimed_signing_key() {
        let f = Fixture::new();
        let ok = f.check(&f.payload()).expect("valid payload");
        assert_eq!(ok.sender, "@alice:hs");
        assert_eq!(ok.sender_device.as_deref(), Some(device_id!("ALICEDEV")));
        assert_eq!(ok.sender_ed25519, f.alice.ed25519_key());
        assert!(!ok.sender_device_verified);
        assert_eq!(ok.event_type, "m.dummy");
        assert_eq!(ok.content.get(), r#"{"n":1}"#);
    }

    #[test]
    fn every_field_violation_is_refused_with_its_own_reason() {
        let f = Fixture::new();
        let other = Account::new();
        let cases: Vec<(&str, Value, PayloadError)> = vec![
            (
                "recipient",
                json!("@other:hs"),
                PayloadError::WrongRecipient,
            ),
            (
                "recipient_keys",
                json!({"ed25519": other.ed25519_key().to_base64()}),
                PayloadError::WrongRecipientKey,
            ),
            ("sender", json!("@mallory:hs"), PayloadError::WrongSender),
            (
                "keys",
                json!({"ed25519": "not a key"}),
                PayloadError::BadSenderKey,
            ),
            ("content", json!("text"), PayloadError::Missing("content")),
        ];
        for (field, value, error) in cases {
            let mut payload = f.payload();
            payload[field] = value;
            assert_eq!(f.check(&payload).err(), Some(error), "{field}");
        }
        for (field, missing) in [
            ("type", "type"),
            ("content", "content"),
            ("recipient", "recipient"),
            ("recipient_keys", "recipient_keys.ed25519"),
            ("sender", "sender"),
            ("keys", "keys.ed25519"),
        ] {
            let mut payload = f.payload();
            payload.as_object_mut().expect("object").remove(field);
            assert_eq!(
                f.check(&payload).err(),
                Some(PayloadError::Missing(missing)),
                "{field}"
            );
        }
        let not_json = verify(b"\x00secret words", &f.expected(), |_| Ok(None));
        assert_eq!(not_json.err(), Some(PayloadError::NotJson));
    }

    #[test]
    fn a_known_sender_device_must_match_both_keys() {
        let f = Fixture::new();
        let payload = f.payload().to_string();
        let matching = KnownDevice {
            device_id: device_id!("ALICEDEV"),
            curve25519: f.alice.curve25519_key(),
            ed25519: f.alice.ed25519_key(),
        };
        let ok =
            verify(payload.as_bytes(), &f.expected(), |_| Ok(Some(matching))).expect("matches");
        assert!(ok.sender_device_verified);
        let imposter = Account::new();
        for known in [
            KnownDevice {
                ed25519: imposter.ed25519_key(),
                ..matching
            },
            KnownDevice {
                curve25519: imposter.curve25519_key(),
                ..matching
            },
        ] {
            assert_eq!(
                verify(payload.as_bytes(), &f.expected(), |_| Ok(Some(known))).err(),
                Some(PayloadError::SenderKeysMismatch)
            );
        }
    }
}

#[cfg(test)]
mod sender_device_rule {
    use super::*;
    use ruma::device_id;
    use vodozemac::olm::Account;

    #[test]
    fn a_named_device_that_is_not_the_channels_tracked_device_is_a_contradiction() {
        let a = Account::new();
        let tracked = KnownDevice {
            device_id: device_id!("REAL"),
            curve25519: a.curve25519_key(),
            ed25519: a.ed25519_key(),
        };
        let by_id = |id: &ruma::DeviceId| (id == "REAL").then_some(tracked);
        // Named and tracked: that device.
        assert_eq!(
            sender_device(Some(device_id!("REAL")), by_id, Some(tracked)),
            Ok(Some(tracked))
        );
        // Named, not tracked, but the channel's key is a tracked device's.
        assert_eq!(
            sender_device(Some(device_id!("GHOST")), by_id, Some(tracked)),
            Err(PayloadError::SenderKeysMismatch)
        );
        // Named, not tracked, channel unknown: a new device, unverified.
        assert_eq!(
            sender_device(Some(device_id!("NEW")), by_id, None),
            Ok(None)
        );
        // Not named: by the channel.
        assert_eq!(sender_device(None, by_id, Some(tracked)), Ok(Some(tracked)));
    }
}
