//! Shared helpers of the account manager tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::{collections::BTreeMap, path::Path, sync::Arc};

use bridgekeys_olm::{AccountManager, ClaimedKey, FallbackKey, ManagerConfig, OlmError};
use bridgekeys_store::{SledStore, SledStoreConfig, StoreKey};
use ruma::{
    DeviceId, OwnedDeviceId, OwnedUserId, UserId, device_id, encryption::DeviceKeys, serde::Base64,
    signatures::PublicKeyMap, user_id,
};
use serde_json::json;
use vodozemac::{
    Curve25519PublicKey,
    olm::{Account, OlmMessage, PreKeyMessage, Session, SessionConfig},
};

/// Two stores on one fresh PostgreSQL database (`name`), as two bridge
/// processes open it, and the server, which must outlive them.
pub async fn postgres_pair(
    name: &str,
) -> (
    bridgekeys_testkit::Postgres,
    [Arc<dyn bridgekeys_store::Backend>; 2],
) {
    use bridgekeys_store::{PgStore, PgStoreConfig};
    let server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database(name).await.unwrap();
    let key = StoreKey::generate();
    let first = PgStore::create(PgStoreConfig::new(&url, key.clone())).unwrap();
    let second = PgStore::open(PgStoreConfig::new(&url, key)).unwrap();
    (server, [Arc::new(first), Arc::new(second)])
}

/// The user the test peers send as.
pub fn peer_user() -> &'static UserId {
    user_id!("@peer:example.org")
}

/// A spec-shaped Olm payload from [`peer_user`] to `user`'s device, whose
/// content carries `body`.
pub fn payload_for(
    manager: &AccountManager,
    user: &UserId,
    device: &DeviceId,
    peer: &Account,
    body: &str,
) -> String {
    let identity = manager.identity_keys(user, device).unwrap();
    json!({
        "type": "m.test",
        "content": { "body": body },
        "sender": peer_user(),
        "sender_device": "PEERDEV",
        "recipient": user,
        "recipient_keys": { "ed25519": identity.ed25519.to_base64() },
        "keys": { "ed25519": peer.ed25519_key().to_base64() },
    })
    .to_string()
}

/// What a test reads of a decrypted message.
#[derive(Debug)]
pub struct Inbound {
    /// The payload content's `body`.
    pub plaintext: Vec<u8>,
    pub used_fallback_key: bool,
    pub new_session: bool,
    pub session_id: String,
}

/// The pre-key decryption the tests drive, through the real entry point
/// ([`AccountManager::decrypt_olm`]) with [`peer_user`] as the sender.
pub trait DecryptPrekey {
    async fn decrypt_prekey(
        &self,
        user: &UserId,
        device: &DeviceId,
        sender_key: Curve25519PublicKey,
        message: &PreKeyMessage,
    ) -> Result<Inbound, OlmError>;
    async fn decrypt_prekey_in_delivery(
        &self,
        user: &UserId,
        device: &DeviceId,
        sender_key: Curve25519PublicKey,
        message: &PreKeyMessage,
        delivery: &str,
    ) -> Result<Inbound, OlmError>;
}

impl DecryptPrekey for AccountManager {
    async fn decrypt_prekey(
        &self,
        user: &UserId,
        device: &DeviceId,
        sender_key: Curve25519PublicKey,
        message: &PreKeyMessage,
    ) -> Result<Inbound, OlmError> {
        decrypt(
            self,
            user,
            device,
            sender_key,
            &OlmMessage::PreKey(message.clone()),
            None,
        )
        .await
    }
    async fn decrypt_prekey_in_delivery(
        &self,
        user: &UserId,
        device: &DeviceId,
        sender_key: Curve25519PublicKey,
        message: &PreKeyMessage,
        delivery: &str,
    ) -> Result<Inbound, OlmError> {
        let message = OlmMessage::PreKey(message.clone());
        decrypt(self, user, device, sender_key, &message, Some(delivery)).await
    }
}

/// Decrypt any Olm message from [`peer_user`] and read its `body`.
pub async fn decrypt(
    manager: &AccountManager,
    user: &UserId,
    device: &DeviceId,
    sender_key: Curve25519PublicKey,
    message: &OlmMessage,
    delivery: Option<&str>,
) -> Result<Inbound, OlmError> {
    let d = manager
        .decrypt_olm((user, device), peer_user(), sender_key, message, delivery)
        .await?;
    let content: serde_json::Value = serde_json::from_str(d.payload.content.get()).unwrap();
    Ok(Inbound {
        plaintext: content["body"].as_str().unwrap().as_bytes().to_vec(),
        used_fallback_key: d.used_fallback_key,
        new_session: d.new_session,
        session_id: d.session_id,
    })
}

/// A peer device with its session to a puppet device: sends valid
/// payloads and reads the puppet's answers.
pub struct Peer {
    pub account: Account,
    pub session: Session,
}

impl Peer {
    /// A new peer whose session starts on `one_time_key` of the puppet.
    pub fn new(
        manager: &AccountManager,
        user: &UserId,
        device: &DeviceId,
        one_time_key: &[u8],
    ) -> Self {
        let account = Account::new();
        let identity = manager.identity_keys(user, device).unwrap();
        let otk = Curve25519PublicKey::from_slice(one_time_key).unwrap();
        let session = account
            .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
            .unwrap();
        Self { account, session }
    }

    /// Encrypt a valid payload carrying `body`.
    pub fn send(
        &mut self,
        manager: &AccountManager,
        user: &UserId,
        device: &DeviceId,
        body: &str,
    ) -> OlmMessage {
        let payload = payload_for(manager, user, device, &self.account, body);
        self.session.encrypt(payload).unwrap()
    }

    pub fn curve25519(&self) -> Curve25519PublicKey {
        self.account.curve25519_key()
    }
}

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
    prekey_message_to(manager, user, device, key.key.key.as_bytes(), plaintext)
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
    let mut peer = Peer::new(manager, user, device, public_key);
    match peer.send(manager, user, device, plaintext) {
        OlmMessage::PreKey(m) => (peer.curve25519(), m),
        OlmMessage::Normal(_) => panic!("first message of a session must be a pre-key message"),
    }
}

/// The key map `verify_json` checks a signature of `device` against: its
/// ed25519 key, taken from the device keys it published.
pub fn verifier_keys(user: &UserId, device: &DeviceId, device_keys: &DeviceKeys) -> PublicKeyMap {
    let ed25519 = device_keys
        .keys
        .iter()
        .find(|(id, _)| id.as_str().starts_with("ed25519:"))
        .unwrap()
        .1;
    BTreeMap::from([(
        user.to_string(),
        BTreeMap::from([(format!("ed25519:{device}"), Base64::parse(ed25519).unwrap())]),
    )])
}

/// The key `m` would upload for alice's device, recorded as published at
/// `now` (as after the homeserver's 200).
pub async fn upload_and_publish(m: &AccountManager, now: u64) -> FallbackKey {
    let (user, device) = alice();
    let key = m
        .fallback_key_for_upload(&user, &device, now)
        .await
        .unwrap()
        .unwrap();
    assert!(
        m.mark_fallback_published(&user, &device, &key.key_id, now)
            .await
            .unwrap()
    );
    key
}

/// A peer device's self-signed `device_keys`, as `keys/query` returns it.
pub fn device_keys(
    account: &Account,
    user: &UserId,
    device: &DeviceId,
) -> ruma::serde::Raw<DeviceKeys> {
    let mut keys = json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): account.curve25519_key().to_base64(),
            format!("ed25519:{device}"): account.ed25519_key().to_base64(),
        },
    });
    let signature = account.sign(bridgekeys_olm::canonical_json_for_signing(&keys).unwrap());
    keys["signatures"] =
        json!({ user.as_str(): { format!("ed25519:{device}"): signature.to_base64() } });
    serde_json::from_value(keys).unwrap()
}
