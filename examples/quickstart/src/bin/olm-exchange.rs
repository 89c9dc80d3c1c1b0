//! The second page of the tutorial: a two-way Olm conversation between a
//! puppet device and a user's device, without a homeserver.
//!
//! The user's side is plain vodozemac, standing in for their client; the
//! puppet's side is what a bridge gets from bridgekeys. In a running bridge
//! the homeserver carries each message (the listener hands incoming ones to
//! `decrypt_olm`, and `PuppetOlm::encrypt_to_device` claims keys, encrypts
//! and sends); here we pass them by hand to see every step:
//!
//! 1. the puppet tracks the user's device: its self-signed `device_keys`
//!    are verified and kept;
//! 2. the user claims a one-time key of the puppet and sends a pre-key
//!    message; the puppet decrypts it and checks the payload (addressed to
//!    this puppet device, from this user, signed by the tracked device);
//! 3. the puppet answers on the same session; the user decrypts it;
//! 4. the user's next message is a normal (type 1) message, which the
//!    puppet decrypts with the stored session;
//! 5. a message addressed to someone else is refused, and nothing changes;
//! 6. the puppet starts a session itself with a key it claimed for another
//!    of the user's devices (the key's signature is checked first).
//!
//! Run it with `cargo run -p quickstart --bin olm-exchange`.

use std::{collections::BTreeMap, sync::Arc};

use bridgekeys::{
    olm::{
        AccountManager, ManagerConfig, OlmError, Recipient, canonical_json_for_signing,
        vodozemac::{
            Curve25519PublicKey,
            olm::{Account, OlmMessage, Session, SessionConfig},
        },
    },
    store::{SledStore, SledStoreConfig, StoreKey},
};
use ruma::{DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, UserId, serde::Raw};
use serde_json::{Value, json};

/// The user's client: a device of Alice's with its own Olm account.
struct Client {
    user: ruma::OwnedUserId,
    device: OwnedDeviceId,
    account: Account,
}

impl Client {
    fn new(user: &UserId, device: &str) -> Self {
        Self {
            user: user.to_owned(),
            device: device.into(),
            account: Account::new(),
        }
    }

    /// Its `device_keys`, self-signed, as `keys/query` returns them.
    fn device_keys(&self) -> anyhow::Result<Raw<ruma::encryption::DeviceKeys>> {
        let device = &self.device;
        let mut keys = json!({
            "user_id": self.user, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{device}"): self.account.curve25519_key().to_base64(),
                format!("ed25519:{device}"): self.account.ed25519_key().to_base64(),
            },
        });
        let signature = self.account.sign(canonical_json_for_signing(&keys)?);
        keys["signatures"] =
            json!({ self.user.as_str(): { format!("ed25519:{device}"): signature.to_base64() } });
        Ok(serde_json::from_value(keys)?)
    }

    /// One signed one-time key, as `keys/claim` returns it.
    fn claimable_key(&mut self) -> anyhow::Result<Value> {
        self.account.generate_one_time_keys(1);
        let key = *self
            .account
            .one_time_keys()
            .values()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no one-time key"))?;
        self.account.mark_keys_as_published();
        let mut signed = json!({ "key": key.to_base64() });
        let signature = self.account.sign(canonical_json_for_signing(&signed)?);
        signed["signatures"] = json!({ self.user.as_str(): { format!("ed25519:{}", self.device): signature.to_base64() } });
        Ok(signed)
    }

    /// The spec payload of a message to the puppet.
    fn payload(&self, to: &UserId, to_ed25519: &str, body: &str) -> String {
        json!({
            "type": "m.text.example", "content": { "body": body },
            "sender": self.user, "sender_device": self.device,
            "recipient": to, "recipient_keys": { "ed25519": to_ed25519 },
            "keys": { "ed25519": self.account.ed25519_key().to_base64() },
        })
        .to_string()
    }

    fn recipient(&self) -> Recipient<'_> {
        Recipient {
            user_id: &self.user,
            device_id: &self.device,
            curve25519: self.account.curve25519_key(),
            ed25519: self.account.ed25519_key(),
        }
    }
}

/// The Olm message inside an `m.room.encrypted` content, for `key`.
fn message_for(content: &Value, key: &Curve25519PublicKey) -> anyhow::Result<OlmMessage> {
    let ciphertext = &content["ciphertext"][key.to_base64()];
    let kind = ciphertext["type"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no message type"))?;
    let body = ciphertext["body"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no body"))?;
    Ok(OlmMessage::from_parts(
        kind as usize,
        &bridgekeys::olm::vodozemac::base64_decode(body)?,
    )?)
}

fn body_of(plaintext: &[u8]) -> anyhow::Result<String> {
    let payload: Value = serde_json::from_slice(plaintext)?;
    Ok(payload["content"]["body"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::create(SledStoreConfig::new(
        dir.path().join("store"),
        StoreKey::generate(),
    ))?;
    let manager = AccountManager::new(Arc::new(store), ManagerConfig::default());
    let puppet = UserId::parse("@echo_bob:example.org")?;
    let puppet_device: &DeviceId = "BRIDGEKEYS".into();
    let from_puppet = (puppet.as_ref(), puppet_device);
    manager.create_device(&puppet, puppet_device).await?;
    let identity = manager.identity_keys(&puppet, puppet_device)?;
    let puppet_ed25519 = identity.ed25519.to_base64();

    // 1. Track Alice's phone (a bridge does keys/query as the puppet).
    let alice = UserId::parse("@alice:example.org")?;
    let phone = Client::new(&alice, "PHONE");
    let mut laptop = Client::new(&alice, "LAPTOP");
    let listed = BTreeMap::from([
        (phone.device.clone(), phone.device_keys()?),
        (laptop.device.clone(), laptop.device_keys()?),
    ]);
    let update = manager.update_tracked_devices(&alice, &listed).await?;
    println!(
        "1. tracking {alice}: {} devices verified, {} refused",
        update.added.len(),
        update.refused.len()
    );

    // 2. Alice's phone claims a key of the puppet and opens a session.
    let claimed = manager
        .claim(
            &puppet,
            puppet_device,
            &OneTimeKeyAlgorithm::SignedCurve25519,
            1,
        )
        .await?;
    let otk = Curve25519PublicKey::from_slice(claimed[0].key.key.as_bytes())?;
    let mut phone_session: Session = phone.account.create_outbound_session(
        SessionConfig::version_1(),
        identity.curve25519,
        otk,
    )?;
    let first = phone_session.encrypt(phone.payload(&puppet, &puppet_ed25519, "hi bob"))?;
    let sender_key = phone.account.curve25519_key();
    let got = manager
        .decrypt_olm(from_puppet, &alice, sender_key, &first, None)
        .await?;
    println!(
        "2. puppet decrypted a pre-key message from {} ({}): {:?}, sender device verified: {}",
        got.payload.sender,
        got.payload
            .sender_device
            .as_deref()
            .map_or("?", |d| d.as_str()),
        body_of(&got.plaintext)?,
        got.payload.sender_device_verified
    );

    // 3. The puppet answers on that session.
    let reply = manager
        .encrypt_olm(
            from_puppet,
            &phone.recipient(),
            "m.text.example",
            &json!({ "body": "hello alice" }),
        )
        .await?;
    let plaintext = phone_session.decrypt(&message_for(&reply.content, &sender_key)?)?;
    println!(
        "3. the phone decrypted the puppet's answer (type {}): {:?}",
        reply.message_type,
        body_of(&plaintext)?
    );

    // 4. Now the phone's messages are normal messages.
    let second = phone_session.encrypt(phone.payload(&puppet, &puppet_ed25519, "how are you?"))?;
    anyhow::ensure!(matches!(second, OlmMessage::Normal(_)));
    let got = manager
        .decrypt_olm(from_puppet, &alice, sender_key, &second, None)
        .await?;
    println!(
        "4. puppet decrypted a normal message on the stored session: {:?}",
        body_of(&got.plaintext)?
    );

    // 5. A message addressed to another user is refused; nothing is stored.
    let misaddressed = phone_session.encrypt(phone.payload(
        &UserId::parse("@someone_else:example.org")?,
        &puppet_ed25519,
        "not for you",
    ))?;
    match manager
        .decrypt_olm(from_puppet, &alice, sender_key, &misaddressed, None)
        .await
    {
        Err(e @ OlmError::Payload(_)) => println!("5. misaddressed message refused: {e}"),
        other => anyhow::bail!("expected the payload to be refused, got {other:?}"),
    }

    // 6. The puppet starts a session with Alice's laptop from a key it
    //    claimed for it.
    let key = laptop.claimable_key()?;
    manager
        .create_outbound_session(from_puppet, &laptop.recipient(), &key)
        .await?;
    let hello = manager
        .encrypt_olm(
            from_puppet,
            &laptop.recipient(),
            "m.text.example",
            &json!({ "body": "hello laptop" }),
        )
        .await?;
    let OlmMessage::PreKey(prekey) = message_for(&hello.content, &laptop.account.curve25519_key())?
    else {
        anyhow::bail!("a new session starts with a pre-key message");
    };
    let opened = laptop.account.create_inbound_session(
        SessionConfig::version_1(),
        identity.curve25519,
        &prekey,
    )?;
    println!(
        "6. the laptop opened the puppet's new session: {:?}",
        body_of(&opened.plaintext)?
    );
    println!("stats: {:?}", manager.stats());
    Ok(())
}
