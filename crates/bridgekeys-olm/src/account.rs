//! A device's account as it lives in memory and in the store.
//!
//! The stored form holds the vodozemac account pickle with **no one-time
//! keys** in it, plus the fallback-key schedule. One-time keys never enter
//! the account: a claim generates each key pair directly, signs it with the
//! account's ed25519 key and stores the private half in its own record, under
//! an id from the store-wide sequence. So a claim does not change the account
//! at all, and the record is written only when the device is created, a
//! pre-key message creates a session, or the fallback key changes.
//!
//! Format 4 (current) is one tag byte, the device's ed25519 public key (32
//! bytes), then the [`postcard`] encoding of the fallback schedule and the
//! pickle: about 220 bytes, where the JSON of formats 1 and 2 took about 600
//! (every 32-byte key was an array of decimal numbers). Format 3 is the same
//! without the public key. Records in older formats still load and are
//! rewritten in format 4 by their next write.
//!
//! A cold device signs one-time keys with the stored public key and the
//! secret read from the pickle's first field, without deriving the public
//! key from the secret (a scalar multiplication, half again the crypto of a
//! claim, on every cold claim). Signing with a public key that is not the
//! secret's own is dangerous: two signatures of one message under two
//! public keys give the secret away. So:
//!
//! * **The cold signer signs nothing twice.** It signs only one-time key
//!   objects ([`DeviceAccount::sign_one_time_key`]), each holding a key pair
//!   generated for that one signature. Everything that may be signed again
//!   (device keys, fallback keys, which are re-signed for every upload)
//!   goes through [`DeviceAccount::sign_json`], which unpickles the whole
//!   account first. So even a stored public key that is not the secret's
//!   (a record changed by someone without the store key, on a backend that
//!   does not authenticate what it seals; both of ours do) cannot make one
//!   message carry two signatures.
//! * **Unpickling checks the pair.** When the whole account is unpickled,
//!   the public key of the cold signer's secret, the stored public key and
//!   the account's own must be one key, or the record is refused
//!   ([`OlmError::Corrupt`]): the copy in memory signs nothing more, and
//!   every later load of the record by that manager checks it, so refuses
//!   it too.
//! * **The first load checks the layout.** The pickle is vodozemac's serde
//!   form, and the fast path reads its first field in vodozemac's layout.
//!   The first format 4 record each [`LayoutCheck`] (one per manager) loads
//!   has its public key derived and compared: if a vodozemac upgrade ever
//!   changed that layout, the load would refuse the record instead of
//!   signing keys with a wrong key. Later loads trust the stored key: the
//!   layout is a property of the vodozemac that wrote the record, and every
//!   format 4 record was written by the pinned one.
//!
//! The vodozemac version is pinned exactly, and a fixture store written in
//! this format (`tests/fixtures/`) must keep loading and signing keys that
//! verify.

use std::sync::atomic::{AtomicBool, Ordering};

use bridgekeys_store::{AccountRecord, Version};
use ed25519_dalek::{
    Sha512, VerifyingKey,
    hazmat::{ExpandedSecretKey, raw_sign},
};
use ruma::{OneTimeKeyAlgorithm, OwnedOneTimeKeyId, encryption::SignedKey, serde::Base64};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use vodozemac::{
    Curve25519PublicKey, Curve25519SecretKey, Ed25519Signature, KeyId,
    olm::{Account, AccountPickle},
};
use zeroize::Zeroizing;

use crate::{OlmError, fallback::FallbackState};

/// The tag byte of the current binary format.
const FORMAT: u8 = 4;

/// Format 3: as 4 without the stored ed25519 public key.
const FORMAT_3: u8 = 3;

/// Formats 1 and 2: JSON. 2 added `fallback`.
#[derive(Deserialize)]
struct JsonDevice {
    format: u32,
    account: AccountPickle,
    #[serde(default)]
    fallback: FallbackState,
}

/// Formats 3 and 4, after their header: the fallback schedule first, then
/// the account pickle, so a load can read the schedule and keep the pickle as
/// bytes (decoding a pickle derives its ed25519 public key).
#[derive(Serialize)]
struct StoredDeviceRef<'a> {
    fallback: &'a FallbackState,
    account: &'a AccountPickle,
}

/// The first field of a vodozemac account pickle (its ed25519 key), in
/// vodozemac's own serde shape, so a cold device can sign without
/// unpickling the whole account (see [`DeviceAccount::decode`]).
#[derive(Deserialize)]
struct PickleHead {
    signing_key: SigningKeyHead,
}

/// Mirrors vodozemac's `SecretKeys` (same variants, same order). Only the
/// usual `Normal` key is read; anything else loads the whole account.
#[derive(Deserialize)]
enum SigningKeyHead {
    Normal(Seed),
    Expanded(serde::de::IgnoredAny),
}

/// An ed25519 secret key (its 32-byte seed) as ed25519-dalek serialises
/// it: read as bytes, without deriving its public key. Boxed, so moving it
/// leaves no copy behind.
struct Seed(Box<Zeroizing<[u8; 32]>>);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Seed;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a 32-byte ed25519 secret key")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Seed, E> {
                if bytes.len() != 32 {
                    return Err(E::invalid_length(bytes.len(), &self));
                }
                let mut seed = Box::new(Zeroizing::new([0u8; 32]));
                seed.copy_from_slice(bytes);
                Ok(Seed(seed))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// Whether a manager has checked its reading of vodozemac's pickle layout:
/// the first format 4 record it loads has its public key derived from the
/// pickle's secret and compared with the stored one; later loads trust the
/// stored key (see the module docs for why that is safe), except the keys
/// of records refused when their account was unpickled, which are checked
/// at every load from then on, so a refused record stays refused. Cloned
/// into each cold signer (it is shared), so the refusal reaches it.
#[derive(Clone, Debug, Default)]
pub(crate) struct LayoutCheck(std::sync::Arc<LayoutState>);

#[derive(Debug, Default)]
struct LayoutState {
    confirmed: AtomicBool,
    /// Whether `refused` holds anything (read on every cold load, so
    /// without taking the lock).
    any_refused: AtomicBool,
    /// The stored public keys of records refused by [`DeviceAccount::account`].
    refused: parking_lot::Mutex<std::collections::HashSet<[u8; 32]>>,
}

impl LayoutCheck {
    fn confirmed(&self) -> bool {
        self.0.confirmed.load(Ordering::Acquire)
    }

    fn confirm(&self) {
        self.0.confirmed.store(true, Ordering::Release);
    }

    /// Whether the stored key of a record may be trusted without checking.
    fn trusts(&self, stored: &VerifyingKey) -> bool {
        self.confirmed()
            && !(self.0.any_refused.load(Ordering::Acquire)
                && self.0.refused.lock().contains(stored.as_bytes()))
    }

    fn refuse(&self, stored: &VerifyingKey) {
        self.0.refused.lock().insert(stored.to_bytes());
        self.0.any_refused.store(true, Ordering::Release);
    }
}

/// A cold device's signing key, ready without the account: the expanded
/// secret (the SHA-512 of the seed, as ed25519 signing uses it; boxed, so
/// moving the signer copies no secret) and the device's public key, as
/// stored beside the pickle.
struct ColdSigner {
    expanded: Box<ExpandedSecretKey>,
    public: VerifyingKey,
    /// The manager's check that trusted `public` (format 4), told when the
    /// pair is refused.
    layout: Option<LayoutCheck>,
}

impl ColdSigner {
    /// From the pickle's seed and the device's public key as stored
    /// (format 4), trusted as the seed's (see the module docs); without
    /// one (format 3), the public key is derived from the seed.
    fn new(seed: &Seed, stored: Option<(VerifyingKey, &LayoutCheck)>) -> Self {
        let expanded = Box::new(ExpandedSecretKey::from(&**seed.0));
        let (public, layout) = match stored {
            Some((public, layout)) => (public, Some(layout.clone())),
            None => (VerifyingKey::from(&*expanded), None),
        };
        Self {
            expanded,
            public,
            layout,
        }
    }

    /// The public key of the signer's own secret: a scalar multiplication.
    fn own_public(&self) -> VerifyingKey {
        VerifyingKey::from(&*self.expanded)
    }

    /// An ordinary ed25519 signature (RFC 8032), as vodozemac's would be.
    fn sign(&self, message: &[u8]) -> Result<Ed25519Signature, OlmError> {
        let signature = raw_sign::<Sha512>(&self.expanded, message, &self.public);
        Ed25519Signature::from_slice(&signature.to_bytes())
            .map_err(|e| OlmError::Corrupt(format!("signature: {e}")))
    }
}

/// A loaded device: its account (holding no one-time keys), the store
/// version it was read at, how many one-time keys it has outstanding and
/// the schedule of its fallback keys.
///
/// A device loaded from a format 3 or 4 record keeps its account pickled,
/// with just its ed25519 key ready, until something needs the whole
/// account: unpickling derives the public half of every key in it (identity
/// keys, fallback keys), a scalar multiplication each, while a claim only
/// signs. So a claim on a cold device costs no derivation (format 4, which
/// stores the public key, after the manager's first load) or one (format
/// 3), not three or four.
pub(crate) struct DeviceAccount {
    account: Option<Account>,
    /// The account's postcard pickle and its ready ed25519 key.
    pickled: Option<(Zeroizing<Vec<u8>>, ColdSigner)>,
    pub version: Option<Version>,
    /// Counted from the store when the device is loaded, then kept up to
    /// date in memory (it is not part of the record).
    pub outstanding: u64,
    pub fallback: FallbackState,
    /// Used since the cache last looked (the cache's second-chance bit).
    pub recently_used: bool,
    /// Sessions stored by schema 1 (by id alone), read on first need:
    /// `None` until then, empty once re-stored by peer.
    pub legacy: Option<Vec<bridgekeys_store::SessionRecord>>,
}

impl DeviceAccount {
    pub(crate) fn new() -> Self {
        Self {
            account: Some(Account::new()),
            pickled: None,
            version: None,
            outstanding: 0,
            fallback: FallbackState::default(),
            recently_used: true,
            legacy: None,
        }
    }

    /// The whole account, unpickled on first use. Its key must be the one
    /// the cold device signed with.
    pub(crate) fn account(&mut self) -> Result<&mut Account, OlmError> {
        // Taken: a pickle that does not load, or whose key is not the one
        // the cold device signed with, never signs again.
        if let Some((bytes, signer)) = self.pickled.take() {
            let pickle: AccountPickle = postcard::from_bytes(&bytes)
                .map_err(|e| OlmError::Corrupt(format!("account pickle: {e}")))?;
            let account = Account::from_pickle(pickle);
            let own = account.identity_keys().ed25519;
            let paired = check_pairing(own.as_bytes(), &signer.public)
                .and_then(|()| check_pairing(own.as_bytes(), &signer.own_public()));
            if let Err(e) = paired {
                // Every later load of this record checks it again, and so
                // refuses it: a reload does not bring the signer back.
                if let Some(layout) = &signer.layout {
                    layout.refuse(&signer.public);
                }
                return Err(e);
            }
            self.account = Some(account);
        }
        self.account
            .as_mut()
            .ok_or_else(|| OlmError::Corrupt("device without an account".into()))
    }

    /// Sign `message` with the device's ed25519 key, cold or not. Only for
    /// messages nothing signs twice (see the module docs).
    fn sign_once(&self, message: &str) -> Result<Ed25519Signature, OlmError> {
        match (&self.account, &self.pickled) {
            (Some(account), _) => Ok(account.sign(message)),
            (None, Some((_, signer))) => signer.sign(message.as_bytes()),
            (None, None) => Err(OlmError::Corrupt("device without an account".into())),
        }
    }

    /// The one-time key object of `public_key` (never a fallback key) and
    /// its signature as Matrix signs JSON (canonical, without `signatures`
    /// and `unsigned`; base64), to be inserted by the caller. A cold device
    /// signs it without unpickling its account, so `public_key` must be a
    /// key pair generated for this one signature: nothing may sign the same
    /// object again.
    pub(crate) fn sign_one_time_key(
        &self,
        public_key: &Curve25519PublicKey,
    ) -> Result<(SignedKey, String), OlmError> {
        let key = SignedKey::new(
            Base64::new(public_key.to_vec()),
            ruma::DeviceSignatures::new(),
        );
        let signature = self
            .sign_once(&crate::signing::canonical_json_for_signing(&key)?)?
            .to_base64();
        Ok((key, signature))
    }

    /// Sign `value` as Matrix signs JSON, with the whole account (unpickled
    /// first, and its key checked against the stored one); base64. For
    /// anything that may be signed more than once.
    pub(crate) fn sign_json<T: Serialize>(&mut self, value: &T) -> Result<String, OlmError> {
        crate::signing::sign_json(self.account()?, value)
    }

    /// Serialise for [`bridgekeys_store::DeviceWrite::account`].
    pub(crate) fn encode(&mut self) -> Result<Zeroizing<Vec<u8>>, OlmError> {
        let account = self.account()?;
        let ed25519 = account.identity_keys().ed25519;
        let pickle = account.pickle();
        let record = StoredDeviceRef {
            fallback: &self.fallback,
            account: &pickle,
        };
        let corrupt =
            |e: postcard::Error| OlmError::Corrupt(format!("cannot serialise account: {e}"));
        // Sized exactly first: a buffer that grew would free a copy of the
        // identity secrets on the way.
        let size = postcard::serialize_with_flavor(&record, postcard::ser_flavors::Size::default())
            .map_err(corrupt)?;
        let mut out = Zeroizing::new(Vec::with_capacity(1 + 32 + size));
        out.push(FORMAT);
        out.extend_from_slice(ed25519.as_bytes());
        let out = postcard::to_extend(&record, std::mem::take(&mut *out)).map_err(corrupt)?;
        Ok(Zeroizing::new(out))
    }

    /// Decode a stored record. `outstanding` is the device's count of
    /// stored one-time keys; `layout` is the manager's check of the pickle
    /// layout (see the module docs).
    pub(crate) fn decode(
        record: &AccountRecord,
        outstanding: u64,
        layout: &LayoutCheck,
    ) -> Result<Self, OlmError> {
        let (account, fallback) = match record.data.first() {
            Some(b'{') => {
                let stored: JsonDevice = serde_json::from_slice(&record.data)
                    .map_err(|e| OlmError::Corrupt(format!("account record: {e}")))?;
                if !(1..=2).contains(&stored.format) {
                    return Err(OlmError::Corrupt(format!(
                        "unknown account format {}",
                        stored.format
                    )));
                }
                (stored.account, stored.fallback)
            }
            Some(&FORMAT_3) => {
                return Self::decode_binary(record, &record.data[1..], None, outstanding);
            }
            Some(&FORMAT) => {
                let body = &record.data[1..];
                let stored: [u8; 32] = body
                    .get(..32)
                    .and_then(|k| k.try_into().ok())
                    .ok_or_else(|| OlmError::Corrupt("account record: truncated".into()))?;
                let stored = VerifyingKey::from_bytes(&stored)
                    .map_err(|e| OlmError::Corrupt(format!("account record: {e}")))?;
                return Self::decode_binary(
                    record,
                    &body[32..],
                    Some((stored, layout)),
                    outstanding,
                );
            }
            Some(other) => {
                return Err(OlmError::Corrupt(format!("unknown account format {other}")));
            }
            None => return Err(OlmError::Corrupt("empty account record".into())),
        };
        Ok(Self {
            account: Some(Account::from_pickle(account)),
            pickled: None,
            version: Some(record.version),
            outstanding,
            fallback,
            recently_used: true,
            legacy: None,
        })
    }

    /// Only the fallback schedule of a stored record: what a rotation pass
    /// over idle devices needs, without building a signer or touching the
    /// pickle (a device with something due is then loaded whole, and
    /// checked, by the usual path).
    pub(crate) fn stored_fallback(record: &AccountRecord) -> Result<FallbackState, OlmError> {
        let corrupt = |e: postcard::Error| OlmError::Corrupt(format!("account record: {e}"));
        let body = match record.data.first() {
            Some(b'{') => {
                return Self::decode(record, 0, &LayoutCheck::default())
                    .map(|device| device.fallback);
            }
            Some(&FORMAT_3) => &record.data[1..],
            Some(&FORMAT) => record
                .data
                .get(33..)
                .ok_or_else(|| OlmError::Corrupt("account record: truncated".into()))?,
            Some(other) => {
                return Err(OlmError::Corrupt(format!("unknown account format {other}")));
            }
            None => return Err(OlmError::Corrupt("empty account record".into())),
        };
        let (fallback, _) = postcard::take_from_bytes::<FallbackState>(body).map_err(corrupt)?;
        Ok(fallback)
    }

    /// Formats 3 and 4 after their header: the fallback schedule, then the
    /// pickle. With `stored` (format 4), the pickle's ed25519 key is that
    /// key: checked when the whole account is unpickled, and on the cold
    /// path until `layout` is confirmed.
    fn decode_binary(
        record: &AccountRecord,
        body: &[u8],
        stored: Option<(VerifyingKey, &LayoutCheck)>,
        outstanding: u64,
    ) -> Result<Self, OlmError> {
        let corrupt = |e: postcard::Error| OlmError::Corrupt(format!("account record: {e}"));
        let (fallback, pickle) =
            postcard::take_from_bytes::<FallbackState>(body).map_err(corrupt)?;
        let mut device = Self {
            account: None,
            pickled: None,
            version: Some(record.version),
            outstanding,
            fallback,
            recently_used: true,
            legacy: None,
        };
        // The pickle starts with the ed25519 key: read just that as a ready
        // signer and keep the rest as bytes.
        if let Ok((
            PickleHead {
                signing_key: SigningKeyHead::Normal(seed),
            },
            _,
        )) = postcard::take_from_bytes::<PickleHead>(pickle)
        {
            let signer = ColdSigner::new(&seed, stored);
            if let Some((stored, layout)) = stored
                && !layout.trusts(&stored)
            {
                check_pairing(signer.own_public().as_bytes(), &stored)?;
                layout.confirm();
            }
            device.pickled = Some((Zeroizing::new(pickle.to_vec()), signer));
            return Ok(device);
        }
        let account = Account::from_pickle(postcard::from_bytes(pickle).map_err(corrupt)?);
        if let Some((stored, _)) = stored {
            check_pairing(account.identity_keys().ed25519.as_bytes(), &stored)?;
        }
        device.account = Some(account);
        Ok(device)
    }

    /// A throw-away copy of the account holding exactly one one-time key,
    /// ready to create the inbound session that uses it.
    ///
    /// vodozemac has no API to put a known secret key back into an account,
    /// so this goes through the account's serde pickle (a format vodozemac
    /// keeps stable for stored accounts, and the exact vodozemac version is
    /// pinned): the key is inserted into `one_time_keys.private_keys` under
    /// its id. Every buffer holding the pickle's text is sized exactly
    /// first (so it never reallocates and leaves a copy behind) and zeroed
    /// when dropped; the rest of the pickle is borrowed, never copied.
    pub(crate) fn with_one_time_key(
        &mut self,
        key_id: u64,
        secret: &[u8; 32],
    ) -> Result<Account, OlmError> {
        let corrupt = |e: serde_json::Error| OlmError::Corrupt(format!("account pickle: {e}"));
        let text = crate::wipe::json_zeroizing(&self.account()?.pickle()).map_err(corrupt)?;
        let mut view: PickleView<'_> = serde_json::from_slice(&text).map_err(corrupt)?;
        view.one_time_keys
            .private_keys
            .insert(key_id, Curve25519SecretKey::from_slice(secret));
        let with_key = crate::wipe::json_zeroizing(&view).map_err(corrupt)?;
        let pickle: AccountPickle = serde_json::from_slice(&with_key).map_err(corrupt)?;
        Ok(Account::from_pickle(pickle))
    }
}

/// Refuse a record whose pickle's ed25519 key (`found`) is not the public
/// key stored beside it.
fn check_pairing(found: &[u8; 32], stored: &VerifyingKey) -> Result<(), OlmError> {
    if found == stored.as_bytes() {
        Ok(())
    } else {
        Err(OlmError::Corrupt(
            "the account's signing key is not the stored identity key (was the record \
             written by another vodozemac pickle layout?)"
                .into(),
        ))
    }
}

/// vodozemac's account pickle with everything but the one-time secret keys
/// borrowed as raw JSON (field names as vodozemac's `AccountPickle`). A
/// field it does not know is refused, never dropped.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PickleView<'a> {
    #[serde(borrow)]
    signing_key: &'a RawValue,
    #[serde(borrow)]
    diffie_hellman_key: &'a RawValue,
    #[serde(borrow)]
    one_time_keys: OneTimeKeysView<'a>,
    #[serde(borrow)]
    fallback_keys: &'a RawValue,
}

/// vodozemac's `OneTimeKeysPickle`, its secret keys typed (they zeroize
/// themselves when dropped).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OneTimeKeysView<'a> {
    #[serde(alias = "key_id")]
    next_key_id: u64,
    #[serde(borrow)]
    public_keys: &'a RawValue,
    private_keys: std::collections::BTreeMap<u64, Curve25519SecretKey>,
}

/// `signed_curve25519:<id>` in vodozemac's form (the big-endian number in
/// base64), for one-time keys and fallback keys alike.
pub(crate) fn key_id_string(id: u64) -> Result<OwnedOneTimeKeyId, OlmError> {
    OwnedOneTimeKeyId::try_from(format!(
        "{}:{}",
        OneTimeKeyAlgorithm::SignedCurve25519,
        vodozemac::base64_encode(id.to_be_bytes())
    ))
    .map_err(|e| OlmError::Corrupt(format!("key id: {e}")))
}

/// vodozemac's key id as a number: its base64 form is the big-endian counter.
pub(crate) fn key_id_number(key_id: KeyId) -> Result<u64, OlmError> {
    let bytes = vodozemac::base64_decode(key_id.to_base64())
        .map_err(|e| OlmError::Corrupt(format!("key id: {e}")))?;
    let array = <[u8; 8]>::try_from(bytes.as_slice())
        .map_err(|_| OlmError::Corrupt("key id is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64, data: Vec<u8>) -> AccountRecord {
        AccountRecord {
            version: Version(version),
            data: Zeroizing::new(data),
        }
    }

    #[test]
    fn a_format_1_json_record_without_fallback_state_still_loads_and_is_rewritten_compactly() {
        let account = Account::new();
        let v1 = serde_json::json!({
            "format": 1,
            "outstanding": 3,
            "account": account.pickle(),
        });
        let json = serde_json::to_vec(&v1).expect("json");
        let mut device =
            DeviceAccount::decode(&record(4, json.clone()), 3, &LayoutCheck::default())
                .expect("decode");
        assert_eq!(device.outstanding, 3);
        assert_eq!(device.fallback, FallbackState::default());
        assert_eq!(
            device.account().expect("account").identity_keys().ed25519,
            account.identity_keys().ed25519
        );
        // Written back, it is the current binary format, and much smaller.
        let encoded = device.encode().expect("encode");
        assert_eq!(encoded[0], FORMAT);
        assert!(
            encoded.len() * 3 < json.len(),
            "{} vs {}",
            encoded.len(),
            json.len()
        );
    }

    #[test]
    fn the_compact_format_round_trips_keys_and_fallback_state() {
        let mut device = DeviceAccount::new();
        device.account().expect("account").generate_fallback_key();
        device.fallback.previous_since_ms = Some(42);
        let encoded = device.encode().expect("encode");
        let mut back =
            DeviceAccount::decode(&record(2, encoded.to_vec()), 0, &LayoutCheck::default())
                .expect("decode");
        let restored = back.account().expect("account");
        let (keys, fallback) = (restored.identity_keys(), restored.fallback_key());
        let original = device.account().expect("account");
        assert_eq!(keys, original.identity_keys());
        assert_eq!(fallback, original.fallback_key());
        assert_eq!(back.fallback, device.fallback);
        assert_eq!(back.version, Some(Version(2)));
    }

    #[test]
    fn a_cold_device_signs_exactly_as_its_unpickled_account_would() {
        let mut device = DeviceAccount::new();
        device.account().expect("account").generate_fallback_key();
        let identity = device.account().expect("account").identity_keys();
        let encoded = device.encode().expect("encode");
        let mut cold =
            DeviceAccount::decode(&record(1, encoded.to_vec()), 0, &LayoutCheck::default())
                .expect("decode");
        assert!(
            cold.account.is_none(),
            "a format 4 record loads without unpickling"
        );
        let message = r#"{"key":"abc"}"#;
        let lazy = cold.sign_once(message).expect("sign").to_base64();
        // ed25519 is deterministic: the whole account signs to the same bytes.
        let whole = cold.account().expect("account");
        assert_eq!(whole.identity_keys(), identity);
        assert_eq!(whole.sign(message).to_base64(), lazy);
        assert_eq!(cold.sign_once(message).expect("sign").to_base64(), lazy);
        identity
            .ed25519
            .verify(message.as_bytes(), &cold.sign_once(message).expect("sign"))
            .expect("verifies with the device's identity key");

        // The same once the layout is confirmed and the stored key trusted.
        let layout = LayoutCheck::default();
        layout.confirm();
        let trusted =
            DeviceAccount::decode(&record(1, encoded.to_vec()), 0, &layout).expect("decode");
        assert_eq!(trusted.sign_once(message).expect("sign").to_base64(), lazy);
    }

    #[test]
    fn a_cold_signer_whose_secret_is_not_the_accounts_is_refused_when_unpickled() {
        // What a misread pickle layout would give under a correct stored
        // key: the account's public key, another secret.
        let mut device = DeviceAccount::new();
        let encoded = device.encode().expect("encode");
        let layout = LayoutCheck::default();
        layout.confirm();
        let mut cold =
            DeviceAccount::decode(&record(1, encoded.to_vec()), 0, &layout).expect("decode");
        let stranger = Seed(Box::new(Zeroizing::new([7u8; 32])));
        let public = cold.pickled.as_ref().expect("cold").1.public;
        cold.pickled.as_mut().expect("cold").1 =
            ColdSigner::new(&stranger, Some((public, &layout)));
        assert!(matches!(
            cold.account(),
            Err(OlmError::Corrupt(e)) if e.contains("stored identity key")
        ));
        assert!(cold.sign_once("m").is_err(), "the copy signs nothing more");
    }

    #[test]
    fn a_record_whose_pickle_yields_another_signing_key_than_the_stored_one_is_refused_by_the_layout_check()
     {
        let mut device = DeviceAccount::new();
        let identity = device.account().expect("account").identity_keys();
        let encoded = device.encode().expect("encode");
        assert_eq!(encoded[0], FORMAT);
        assert_eq!(&encoded[1..33], identity.ed25519.as_bytes());
        // The same pickle under another device's key: what a pickle layout
        // read the wrong way would look like.
        let mut swapped = encoded.to_vec();
        swapped[1..33].copy_from_slice(Account::new().identity_keys().ed25519.as_bytes());
        let layout = LayoutCheck::default();
        for _ in 0..2 {
            assert!(matches!(
                DeviceAccount::decode(&record(1, swapped.clone()), 0, &layout),
                Err(OlmError::Corrupt(e)) if e.contains("stored identity key")
            ));
            // A refused load confirms nothing: the next load checks again.
            assert!(!layout.confirmed());
        }
        // Untouched, it loads, confirms the layout and signs as the device.
        let cold = DeviceAccount::decode(&record(1, encoded.to_vec()), 0, &layout).expect("decode");
        assert!(layout.confirmed());
        let message = "m";
        identity
            .ed25519
            .verify(message.as_bytes(), &cold.sign_once(message).expect("sign"))
            .expect("signed by the stored key");
    }

    #[test]
    fn once_the_layout_is_confirmed_a_cold_device_trusts_the_stored_key_and_a_mismatch_is_refused_when_unpickled()
     {
        let layout = LayoutCheck::default();
        let mut device = DeviceAccount::new();
        let identity = device.account().expect("account").identity_keys();
        let encoded = device.encode().expect("encode");
        let good = DeviceAccount::decode(&record(1, encoded.to_vec()), 0, &layout).expect("decode");
        assert!(
            layout.confirmed(),
            "the first format 4 load checks the pairing"
        );
        identity
            .ed25519
            .verify(b"m", &good.sign_once("m").expect("sign"))
            .expect("signed by the stored key");

        // A record whose stored key is not its pickle's (only a changed
        // pickle layout or a bug of ours could write one: records are
        // sealed) loads on the cold path without the derivation...
        let stranger = Account::new().identity_keys().ed25519;
        let mut swapped = encoded.to_vec();
        swapped[1..33].copy_from_slice(stranger.as_bytes());

        // What may be signed twice (device keys, fallback keys) is signed
        // only by the whole account, so a cold copy of such a record never
        // signs it under the stored key.
        let mut bad =
            DeviceAccount::decode(&record(1, swapped.clone()), 0, &layout).expect("trusted");
        assert!(matches!(
            bad.sign_json(&serde_json::json!({"key": "a fallback key"})),
            Err(OlmError::Corrupt(e)) if e.contains("stored identity key")
        ));
        assert!(bad.sign_once("m").is_err(), "the copy signs nothing more");

        // Loading the record again does not bring the signer back: its key
        // is checked at every load from now on, and refused, while other
        // records are still trusted.
        for _ in 0..2 {
            assert!(matches!(
                DeviceAccount::decode(&record(1, swapped.clone()), 0, &layout),
                Err(OlmError::Corrupt(e)) if e.contains("stored identity key")
            ));
        }
        assert!(layout.confirmed());
        DeviceAccount::decode(&record(1, encoded.to_vec()), 0, &layout).expect("a good record");
    }

    #[test]
    fn a_format_3_record_without_the_stored_key_still_loads_and_is_rewritten_as_format_4() {
        let mut device = DeviceAccount::new();
        let identity = device.account().expect("account").identity_keys();
        let encoded = device.encode().expect("encode");
        let mut v3 = vec![FORMAT_3];
        v3.extend_from_slice(&encoded[33..]);
        let mut old =
            DeviceAccount::decode(&record(3, v3), 0, &LayoutCheck::default()).expect("decode");
        // Cold, it signs with the key its secret yields.
        identity
            .ed25519
            .verify(b"m", &old.sign_once("m").expect("sign"))
            .expect("signed by the device's key");
        assert_eq!(old.account().expect("account").identity_keys(), identity);
        let rewritten = old.encode().expect("encode");
        assert_eq!(rewritten[0], FORMAT);
        assert_eq!(&rewritten[1..33], identity.ed25519.as_bytes());
    }

    #[test]
    fn the_schedule_alone_reads_as_decode_reads_it_in_every_format() {
        let mut device = DeviceAccount::new();
        device.account().expect("account").generate_fallback_key();
        device.fallback.previous_since_ms = Some(42);
        device.fallback.current = Some(crate::fallback::CurrentFallback {
            key_id: 7,
            public_key: "key".into(),
            created_ms: 1,
            published: true,
            published_ms: Some(2),
            used: false,
        });
        let v4 = device.encode().expect("encode").to_vec();
        let mut v3 = vec![FORMAT_3];
        v3.extend_from_slice(&v4[33..]);
        let v2 = serde_json::to_vec(&serde_json::json!({
            "format": 2,
            "account": device.account().expect("account").pickle(),
            "fallback": device.fallback,
        }))
        .expect("json");
        for data in [v4.clone(), v3, v2] {
            assert_eq!(
                DeviceAccount::stored_fallback(&record(1, data)).expect("schedule"),
                device.fallback
            );
        }
        // A damaged pickle after an intact schedule: the schedule still
        // reads (a pass judges the device by it), and the device is refused
        // when it is loaded to be used.
        let (_, pickle) = postcard::take_from_bytes::<FallbackState>(&v4[33..]).expect("schedule");
        let mut damaged = v4[..v4.len() - pickle.len()].to_vec();
        damaged.extend_from_slice(&[0xff; 16]);
        assert_eq!(
            DeviceAccount::stored_fallback(&record(1, damaged.clone())).expect("schedule"),
            device.fallback
        );
        let refused = match DeviceAccount::decode(&record(1, damaged), 0, &LayoutCheck::default()) {
            Err(e) => Some(e),
            Ok(mut device) => device.account().err(),
        };
        assert!(matches!(refused, Some(OlmError::Corrupt(_))));
        for bad in [vec![9, 1], Vec::new(), v4[..20].to_vec(), v4[..34].to_vec()] {
            assert!(matches!(
                DeviceAccount::stored_fallback(&record(1, bad)),
                Err(OlmError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn unknown_formats_and_truncated_records_are_refused() {
        let v9 = serde_json::json!({
            "format": 9,
            "outstanding": 0,
            "account": Account::new().pickle(),
        });
        let encoded = DeviceAccount::new().encode().expect("encode");
        for bad in [
            serde_json::to_vec(&v9).expect("json"),
            vec![9, 1, 2, 3],
            encoded[..encoded.len() / 2].to_vec(),
            Vec::new(),
        ] {
            // Refused when loaded, or at the latest when the whole account
            // is needed (a cold device keeps its pickle as bytes until then).
            let refused = match DeviceAccount::decode(&record(1, bad), 0, &LayoutCheck::default()) {
                Err(e) => Some(e),
                Ok(mut device) => device.account().err(),
            };
            assert!(matches!(refused, Some(OlmError::Corrupt(_))));
        }
    }
}
