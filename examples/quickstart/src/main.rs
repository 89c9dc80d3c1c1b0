//! The smallest useful bridgekeys program, and the first page of the
//! tutorial: what a bridge does for one puppet device, end to end, without a
//! homeserver.
//!
//! 1. open an encrypted, durable store;
//! 2. create the puppet device's Olm account and print the signed
//!    `device_keys` a bridge uploads with `/keys/upload`;
//! 3. answer a key claim, as the homeserver would ask for it over MSC3983;
//! 4. play a real user's client: start an Olm session with a claimed key and
//!    send a pre-key message, which the bridge decrypts (consuming the key)
//!    after checking its payload is addressed to this puppet device;
//! 5. show that the same key cannot be used twice.
//!
//! Run it with `cargo run -p quickstart` (add `-- --dir DIR` to keep the store).
//! The second page, `cargo run -p quickstart --bin olm-exchange`, shows a
//! two-way Olm conversation between the puppet and a user's device.

use std::sync::Arc;

use bridgekeys::{
    olm::{
        AccountManager, ManagerConfig, OlmError,
        vodozemac::{
            Curve25519PublicKey,
            olm::{Account, OlmMessage, SessionConfig},
        },
    },
    store::{SledStore, SledStoreConfig, StoreKey},
};
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, UserId};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // 1. The store. A real bridge reads its 32-byte key from configuration;
    //    losing the key means losing every puppet's keys.
    let args: Vec<String> = std::env::args().collect();
    let temp = tempfile::tempdir()?;
    let dir = match args.iter().position(|a| a == "--dir") {
        Some(i) => args
            .get(i + 1)
            .map(Into::into)
            .ok_or_else(|| anyhow::anyhow!("--dir needs a path"))?,
        None => temp.path().to_owned(),
    };
    //    Creating a store is explicit: a bridge creates it once (at `init`),
    //    keeps its id, and from then on only opens it with that id
    //    (`SledStore::open(config.expect_id(id))`), so a lost store is an
    //    error, never a silent new one.
    let store = SledStore::create(SledStoreConfig::new(
        dir.join("store"),
        StoreKey::generate(),
    ))?;
    println!(
        "1. store opened at {} (new, id {})",
        dir.join("store").display(),
        store.id()
    );
    let manager = AccountManager::new(Arc::new(store), ManagerConfig::default());

    // 2. The puppet's device.
    let user = UserId::parse("@echo_bob:example.org")?;
    let device = OwnedDeviceId::from("BRIDGEKEYS");
    let device_keys = manager.create_device(&user, &device).await?;
    println!(
        "2. device_keys for /keys/upload:\n{}",
        serde_json::to_string_pretty(&device_keys)?
    );

    // 3. The homeserver asks for two keys: {user: {device: ["signed_curve25519", x2]}}.
    let claimed = manager
        .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 2)
        .await?;
    let answer: serde_json::Map<String, serde_json::Value> = claimed
        .iter()
        .map(|k| Ok((k.key_id.to_string(), serde_json::to_value(&k.key)?)))
        .collect::<anyhow::Result<_>>()?;
    let answer = serde_json::json!({ user.as_str(): { device.as_str(): answer } });
    println!(
        "3. keys/claim answer (durable before it was returned):\n{}",
        serde_json::to_string_pretty(&answer)?
    );

    // 4. A real user's client uses the first key to open an Olm session.
    let identity = manager.identity_keys(&user, &device)?;
    let one_time_key = Curve25519PublicKey::from_slice(claimed[0].key.key.as_bytes())?;
    let peer = Account::new();
    let mut session = peer.create_outbound_session(
        SessionConfig::version_1(),
        identity.curve25519,
        one_time_key,
    )?;
    //    The plaintext of every Olm message names its sender and recipient
    //    (the spec's payload); the bridge refuses one addressed elsewhere.
    let alice = UserId::parse("@alice:example.org")?;
    let payload = serde_json::json!({
        "type": "m.dummy",
        "content": {},
        "sender": alice,
        "recipient": user,
        "recipient_keys": { "ed25519": identity.ed25519.to_base64() },
        "keys": { "ed25519": peer.ed25519_key().to_base64() },
    });
    let message = session.encrypt(payload.to_string())?;
    let OlmMessage::PreKey(_) = &message else {
        anyhow::bail!("a new session starts with a pre-key message");
    };
    let inbound = manager
        .decrypt_olm(
            (&user, &device),
            &alice,
            peer.curve25519_key(),
            &message,
            None,
        )
        .await?;
    println!(
        "4. pre-key message decrypted ({} from {}), session {} stored, key {} consumed",
        inbound.payload.event_type, inbound.payload.sender, inbound.session_id, claimed[0].key_id
    );

    // 5. The same key again: refused, because a one-time key is one-time.
    let other = Account::new();
    let mut replay = other.create_outbound_session(
        SessionConfig::version_1(),
        identity.curve25519,
        one_time_key,
    )?;
    let second = replay.encrypt(payload.to_string())?;
    match manager
        .decrypt_olm(
            (&user, &device),
            &alice,
            other.curve25519_key(),
            &second,
            None,
        )
        .await
    {
        Err(OlmError::UnknownOneTimeKey) => println!(
            "5. second use of {} refused: {}",
            claimed[0].key_id,
            OlmError::UnknownOneTimeKey
        ),
        other => anyhow::bail!("expected the second use to be refused, got {other:?}"),
    }
    println!("stats: {:?}", manager.stats());
    Ok(())
}
