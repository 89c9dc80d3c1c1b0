//! Cross-signing identities for puppet users.
//!
//! Clients that follow MSC4153 ("exclude insecure devices"; matrix-rust-sdk
//! with identity-based room-key sharing) only send room keys to devices
//! their owner has cross-signed. A puppet device signed by nothing but
//! itself is left out of every encrypted room such a client writes in. So
//! each puppet user gets its own cross-signing identity:
//!
//! * a **master** key, the user's identity that clients pin;
//! * a **self-signing** key, signed by the master key, that signs the
//!   user's own devices (the puppet device);
//! * a **user-signing** key, signed by the master key (required by the
//!   spec's upload; puppets sign no other users).
//!
//! The three private keys live in one sealed record per user (`c/<user>`),
//! created on first use and **never replaced**: a client that pinned a
//! puppet's master key would flag a new one as an identity change. The
//! record is written with a compare-and-swap, so two concurrent first uses
//! end with one identity. It is durable before any public half is returned
//! (and so before anything is uploaded).

use ruma::{
    DeviceId, UserId,
    encryption::{CrossSigningKey, DeviceKeys},
};
use serde_json::{Value, json};
use vodozemac::{Ed25519PublicKey, Ed25519SecretKey};
use zeroize::Zeroizing;

use crate::{AccountManager, OlmError, signing::canonical_json_for_signing};

/// Format tag of the sealed record: tag byte, then the three 32-byte seeds.
const RECORD_V1: u8 = 1;
const RECORD_LEN: usize = 1 + 3 * 32;

/// The private halves of a user's cross-signing keys.
struct Identity {
    master: Ed25519SecretKey,
    self_signing: Ed25519SecretKey,
    user_signing: Ed25519SecretKey,
}

impl Identity {
    fn generate() -> Self {
        Self {
            master: Ed25519SecretKey::new(),
            self_signing: Ed25519SecretKey::new(),
            user_signing: Ed25519SecretKey::new(),
        }
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(RECORD_LEN));
        out.push(RECORD_V1);
        for key in [&self.master, &self.self_signing, &self.user_signing] {
            out.extend_from_slice(key.to_bytes().as_slice());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, OlmError> {
        let corrupt = || OlmError::Corrupt("cross-signing record".into());
        if bytes.len() != RECORD_LEN || bytes[0] != RECORD_V1 {
            return Err(corrupt());
        }
        let seed = |i: usize| -> Result<Zeroizing<[u8; 32]>, OlmError> {
            let start = 1 + 32 * i;
            let slice = bytes.get(start..start + 32).ok_or_else(corrupt)?;
            let mut seed = Zeroizing::new([0u8; 32]);
            seed.copy_from_slice(slice);
            Ok(seed)
        };
        Ok(Self {
            master: Ed25519SecretKey::from_slice(&*seed(0)?),
            self_signing: Ed25519SecretKey::from_slice(&*seed(1)?),
            user_signing: Ed25519SecretKey::from_slice(&*seed(2)?),
        })
    }
}

/// A user's public cross-signing keys, signed as the spec's
/// `keys/device_signing/upload` wants them.
#[derive(Clone, Debug)]
pub struct CrossSigningKeys {
    /// The master key (unsigned: it is the root).
    pub master_key: CrossSigningKey,
    /// The self-signing key, signed by the master key.
    pub self_signing_key: CrossSigningKey,
    /// The user-signing key, signed by the master key.
    pub user_signing_key: CrossSigningKey,
    /// Whether this call created the identity (upload it now).
    pub created: bool,
}

impl CrossSigningKeys {
    /// The master public key.
    pub fn master_public(&self) -> Option<&str> {
        self.master_key.keys.values().next().map(String::as_str)
    }

    /// The self-signing public key.
    pub fn self_signing_public(&self) -> Option<&str> {
        self.self_signing_key
            .keys
            .values()
            .next()
            .map(String::as_str)
    }
}

/// `{"user_id", "usage", "keys"}` of one cross-signing key.
fn key_object(user_id: &UserId, usage: &str, public: Ed25519PublicKey) -> Value {
    let b64 = public.to_base64();
    json!({
        "user_id": user_id,
        "usage": [usage],
        "keys": { format!("ed25519:{b64}"): b64 },
    })
}

/// Sign `object` (canonical JSON without `signatures`/`unsigned`) with
/// `key`, as `user_id`, adding to its `signatures`.
fn sign_into(object: &mut Value, user_id: &UserId, key: &Ed25519SecretKey) -> Result<(), OlmError> {
    let signature = key.sign(canonical_json_for_signing(object)?.as_bytes());
    let key_id = format!("ed25519:{}", key.public_key().to_base64());
    let signatures = object
        .as_object_mut()
        .ok_or_else(|| OlmError::Corrupt("a signed object must be a JSON object".into()))?
        .entry("signatures")
        .or_insert_with(|| json!({}));
    let per_user = signatures
        .as_object_mut()
        .ok_or_else(|| OlmError::Corrupt("signatures must be an object".into()))?
        .entry(user_id.as_str())
        .or_insert_with(|| json!({}));
    per_user
        .as_object_mut()
        .ok_or_else(|| OlmError::Corrupt("signatures must be an object".into()))?
        .insert(key_id, Value::String(signature.to_base64()));
    Ok(())
}

fn typed(value: Value) -> Result<CrossSigningKey, OlmError> {
    serde_json::from_value(value).map_err(|e| OlmError::Corrupt(format!("cross-signing key: {e}")))
}

impl AccountManager {
    /// Load `user_id`'s identity, creating (durably) and returning a new one
    /// if it has none yet.
    async fn cross_signing_identity(&self, user_id: &UserId) -> Result<(Identity, bool), OlmError> {
        if let Some(record) = self.store().load_cross_signing(user_id.as_str())? {
            return Ok((Identity::decode(&record)?, false));
        }
        let fresh = Identity::generate();
        match self
            .store()
            .create_cross_signing(user_id.as_str(), &fresh.encode())?
        {
            Some(pending) => {
                pending.durable().await?;
                tracing::info!(%user_id, "created a cross-signing identity for a puppet");
                Ok((fresh, true))
            }
            // Somebody created one a moment ago: theirs stands. Make sure it
            // is durable before its public half goes anywhere.
            None => {
                self.store().sync().durable().await?;
                let record = self
                    .store()
                    .load_cross_signing(user_id.as_str())?
                    .ok_or_else(|| OlmError::Corrupt("cross-signing record vanished".into()))?;
                Ok((Identity::decode(&record)?, false))
            }
        }
    }

    /// `user_id`'s public cross-signing keys, signed for upload; created
    /// (durably, once and for good) on first use. Upload them with
    /// `keys/device_signing/upload` when [`CrossSigningKeys::created`], or
    /// whenever the homeserver does not show them.
    pub async fn cross_signing_keys(&self, user_id: &UserId) -> Result<CrossSigningKeys, OlmError> {
        let (identity, created) = self.cross_signing_identity(user_id).await?;
        let master = key_object(user_id, "master", identity.master.public_key());
        let mut self_signing =
            key_object(user_id, "self_signing", identity.self_signing.public_key());
        sign_into(&mut self_signing, user_id, &identity.master)?;
        let mut user_signing =
            key_object(user_id, "user_signing", identity.user_signing.public_key());
        sign_into(&mut user_signing, user_id, &identity.master)?;
        Ok(CrossSigningKeys {
            master_key: typed(master)?,
            self_signing_key: typed(self_signing)?,
            user_signing_key: typed(user_signing)?,
            created,
        })
    }

    /// The device keys as the homeserver should publish them: signed by the
    /// device and, when its user has a cross-signing identity, by the
    /// user's self-signing key too. Never creates an identity (a read-only
    /// path: answering a key query).
    pub fn published_device_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<DeviceKeys, OlmError> {
        let device_keys = self.device_keys(user_id, device_id)?;
        let Some(record) = self.store().load_cross_signing(user_id.as_str())? else {
            return Ok(device_keys);
        };
        let identity = Identity::decode(&record)?;
        let mut object = serde_json::to_value(&device_keys)
            .map_err(|e| OlmError::Corrupt(format!("device keys: {e}")))?;
        // The self-signing signature joins the device's own.
        sign_into(&mut object, user_id, &identity.self_signing)?;
        serde_json::from_value(object).map_err(|e| OlmError::Corrupt(format!("device keys: {e}")))
    }

    /// The puppet device's keys signed by its user's self-signing key (the
    /// identity is created on first use), as `keys/signatures/upload` takes
    /// them: the device keys with that one signature.
    pub async fn self_signed_device_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<DeviceKeys, OlmError> {
        let (identity, _) = self.cross_signing_identity(user_id).await?;
        let device_keys = self.device_keys(user_id, device_id)?;
        let mut object = serde_json::to_value(&device_keys)
            .map_err(|e| OlmError::Corrupt(format!("device keys: {e}")))?;
        if let Some(map) = object.as_object_mut() {
            map.remove("signatures");
            map.remove("unsigned");
        }
        sign_into(&mut object, user_id, &identity.self_signing)?;
        serde_json::from_value(object).map_err(|e| OlmError::Corrupt(format!("device keys: {e}")))
    }
}
