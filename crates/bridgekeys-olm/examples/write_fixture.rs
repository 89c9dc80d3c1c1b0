//! Writes the fixture store that `tests/it/fixture.rs` reads: a store in the
//! current record formats holding a puppet device with a published fallback
//! key, a cross-signing identity, an Olm session and an outstanding one-time
//! key, recorded in the puppet registry (cross-signed, its next rotation
//! scheduled), plus a manifest of what a reader must find in it and
//! messages only those records can decrypt.
//!
//! Run it only when a record format changes on purpose, into a new
//! directory: `cargo run -p bridgekeys-olm --example write_fixture --
//! crates/bridgekeys-olm/tests/fixtures/<new name>`. The fixtures already
//! committed stay: every later version must still read them.
#![allow(clippy::unwrap_used)]

#[path = "../tests/it/common.rs"]
mod common;

use std::sync::Arc;

use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{DeviceKey, PuppetRegistry, SledStore, SledStoreConfig, StoreKey};
use common::{Peer, alice, payload_for};
use ruma::OneTimeKeyAlgorithm;
use serde_json::json;
use vodozemac::olm::OlmMessage;

fn message_json(message: &OlmMessage) -> serde_json::Value {
    let (kind, body) = message.to_parts();
    json!({"type": kind, "body": vodozemac::base64_encode(body)})
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: write_fixture <new directory>"),
    );
    assert!(
        !dir.exists(),
        "{} exists: fixtures are never rewritten",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap();
    let key = StoreKey::generate();
    let store =
        Arc::new(SledStore::create(SledStoreConfig::new(dir.join("store"), key.clone())).unwrap());
    let store_id = store.id();
    let m = AccountManager::new(store.clone(), ManagerConfig::default());
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    let fallback = m
        .fallback_key_for_upload(&user, &device, 1_700_000_000_000)
        .await
        .unwrap()
        .unwrap();
    m.mark_fallback_published(&user, &device, &fallback.key_id, 1_700_000_000_000)
        .await
        .unwrap();
    m.cross_signing_keys(&user).await.unwrap();
    let mut claimed = m
        .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 2)
        .await
        .unwrap();
    let (on_session, outstanding) = (claimed.remove(0), claimed.remove(0));

    // Peer A starts a session (decrypted now: the session is stored) and
    // sends a second message on it, left for the reader.
    let mut a = Peer::new(&m, &user, &device, on_session.key.key.as_bytes());
    let first = a.send(&m, &user, &device, "the session starts");
    common::decrypt(&m, &user, &device, a.curve25519(), &first, None)
        .await
        .unwrap();
    let on_stored_session = a.send(&m, &user, &device, "read with a stored session");
    // Peer B writes to the key that stays outstanding.
    let mut b = Peer::new(&m, &user, &device, outstanding.key.key.as_bytes());
    let on_outstanding = b.send(&m, &user, &device, "read with a stored one-time key");
    // Encrypted with payload_for: keep the helper used.
    let _ = payload_for;

    // The puppet registry: recorded, cross-signed, scheduled.
    let puppet = DeviceKey::new(user.as_str(), device.as_str());
    let due_ms = 1_700_000_600_000u64;
    store
        .record_puppet(&puppet)
        .unwrap()
        .durable()
        .await
        .unwrap();
    store
        .record_cross_signed(&puppet)
        .unwrap()
        .durable()
        .await
        .unwrap();
    store
        .schedule_rotation(&puppet, due_ms, None)
        .unwrap()
        .durable()
        .await
        .unwrap();

    let identity = m.identity_keys(&user, &device).unwrap();
    let manifest = json!({
        "written_by": format!(
            "bridgekeys 0.1.0, vodozemac 0.11.1, account format 4, sled schema {}",
            bridgekeys_store::SCHEMA_VERSION
        ),
        "puppet": {"cross_signed": true, "due_ms": due_ms},
        "store_key": vodozemac::base64_encode(key.as_bytes()),
        "store_id": store_id.to_string(),
        "user_id": user,
        "device_id": device,
        "ed25519": identity.ed25519.to_base64(),
        "curve25519": identity.curve25519.to_base64(),
        "fallback_key": {"key_id": fallback.key_id, "key": fallback.key},
        "published_device_keys": m.published_device_keys(&user, &device).unwrap(),
        "claimed_key_ids": [on_session.key_id, outstanding.key_id],
        "on_stored_session": {
            "sender_key": a.curve25519().to_base64(),
            "message": message_json(&on_stored_session),
            "body": "read with a stored session",
        },
        "on_outstanding_key": {
            "sender_key": b.curve25519().to_base64(),
            "message": message_json(&on_outstanding),
            "body": "read with a stored one-time key",
        },
    });
    drop(m);
    drop(store);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest).unwrap() + "\n",
    )
    .unwrap();
    println!("fixture written to {}", dir.display());
}
