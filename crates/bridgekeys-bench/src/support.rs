//! Small pieces the scenarios share.

use std::{path::Path, sync::Arc, time::Duration};

use bridgekeys_olm::{AccountManager, ClaimedKey, ManagerConfig};
use bridgekeys_store::{SledStore, SledStoreConfig, StoreError, StoreKey};
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId};
use vodozemac::{
    Curve25519PublicKey,
    olm::{Account, OlmMessage, PreKeyMessage, SessionConfig},
};

/// Open a sled store at `dir/store` (with the group-commit gather time from
/// `BRIDGEKEYS_COMMIT_GATHER_US`, if set, for experiments).
pub fn open_store(dir: &Path, key: &StoreKey) -> Result<Arc<SledStore>, StoreError> {
    let mut config = SledStoreConfig::new(dir.join("store"), key.clone());
    if let Some(us) = std::env::var("BRIDGEKEYS_COMMIT_GATHER_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.commit_gather = Duration::from_micros(us);
    }
    Ok(Arc::new(SledStore::open(config)?))
}

/// Open a manager over a sled store at `dir/store`.
pub fn open_manager(dir: &Path, key: &StoreKey) -> Result<AccountManager, StoreError> {
    Ok(AccountManager::new(
        open_store(dir, key)?,
        ManagerConfig::default(),
    ))
}

/// The puppet user and device of index `i`.
pub fn puppet(i: usize) -> anyhow::Result<(OwnedUserId, OwnedDeviceId)> {
    let user = UserId::parse(format!("@echo_{i}:bench.invalid"))?;
    Ok((user, OwnedDeviceId::from(format!("PUPPET{i}").as_str())))
}

/// A peer's first message to a puppet over a claimed key, as a real client
/// would send it.
pub fn prekey_message(
    identity: Curve25519PublicKey,
    one_time_key: Curve25519PublicKey,
    plaintext: &str,
) -> anyhow::Result<(Curve25519PublicKey, PreKeyMessage)> {
    let peer = Account::new();
    let mut session =
        peer.create_outbound_session(SessionConfig::version_1(), identity, one_time_key)?;
    match session.encrypt(plaintext)? {
        OlmMessage::PreKey(m) => Ok((peer.curve25519_key(), m)),
        OlmMessage::Normal(_) => anyhow::bail!("first message was not a pre-key message"),
    }
}

/// The public key inside a claimed key object.
pub fn public_key(key: &ClaimedKey) -> anyhow::Result<Curve25519PublicKey> {
    Ok(Curve25519PublicKey::from_slice(key.key.key.as_bytes())?)
}

/// Percentile (0..=100) of sorted durations, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Device key of a puppet, for direct store look-ups.
pub fn device_key(user: &UserId, device: &DeviceId) -> bridgekeys_store::DeviceKey {
    bridgekeys_store::DeviceKey::new(user.as_str(), device.as_str())
}
