//! Shared helpers of the account manager tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::{path::Path, sync::Arc};

use bridgekeys_olm::{AccountManager, ClaimedKey, ManagerConfig};
use bridgekeys_store::{SledStore, SledStoreConfig, StoreKey};
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId, device_id, user_id};
use vodozemac::{
    Curve25519PublicKey,
    olm::{Account, OlmMessage, PreKeyMessage, SessionConfig},
};

pub fn alice() -> (OwnedUserId, OwnedDeviceId) {
    (
        user_id!("@echo_alice:example.org").to_owned(),
        device_id!("PUPPETDEV").to_owned(),
    )
}

pub fn manager(dir: &Path, key: &StoreKey, config: ManagerConfig) -> AccountManager {
    let store =
        SledStore::open_or_create(SledStoreConfig::new(dir.join("store"), key.clone())).unwrap();
    AccountManager::new(Arc::new(store), config)
}

/// A peer's device: starts an outbound Olm session with a claimed key and
/// encrypts `plaintext`, as a real client would.
pub fn prekey_message(
    manager: &AccountManager,
    user: &UserId,
    device: &DeviceId,
    key: &ClaimedKey,
    plaintext: &str,
) -> (Curve25519PublicKey, PreKeyMessage) {
    let peer = Account::new();
    let identity = manager.identity_keys(user, device).unwrap();
    let otk = Curve25519PublicKey::from_slice(key.key.key.as_bytes()).unwrap();
    let mut session = peer
        .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
        .unwrap();
    match session.encrypt(plaintext).unwrap() {
        OlmMessage::PreKey(m) => (peer.curve25519_key(), m),
        OlmMessage::Normal(_) => panic!("first message of a session must be a pre-key message"),
    }
}

/// A peer's pre-key message to `user`'s device on an arbitrary public key
/// (a fallback key), as a real client would send after a claim returned it.
pub fn prekey_message_to(
    manager: &AccountManager,
    user: &UserId,
    device: &DeviceId,
    public_key: &[u8],
    plaintext: &str,
) -> (Curve25519PublicKey, PreKeyMessage) {
    let peer = Account::new();
    let identity = manager.identity_keys(user, device).unwrap();
    let otk = Curve25519PublicKey::from_slice(public_key).unwrap();
    let mut session = peer
        .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
        .unwrap();
    match session.encrypt(plaintext).unwrap() {
        OlmMessage::PreKey(m) => (peer.curve25519_key(), m),
        OlmMessage::Normal(_) => panic!("first message of a session must be a pre-key message"),
    }
}
