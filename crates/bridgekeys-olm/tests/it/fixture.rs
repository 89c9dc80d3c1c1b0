//! Stored records keep their meaning (issue 14, item 7): a store written by
//! an earlier version of bridgekeys (`tests/fixtures/<format>/`, written
//! once by `examples/write_fixture.rs` and never rewritten) still opens and
//! yields the same device: its identity keys, its published fallback key,
//! its cross-signed device keys, its Olm session and its outstanding
//! one-time key, each proven by decrypting a message only that record can
//! decrypt.
//!
//! A change to a record format, to serde shapes or to the vodozemac version
//! (pinned exactly in the workspace) that breaks reading old records fails
//! here.

use std::{path::Path, sync::Arc};

use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{DeviceKey, PuppetRegistry, SledStore, SledStoreConfig, StoreKey};
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId};
use serde_json::Value;
use vodozemac::{Curve25519PublicKey, olm::OlmMessage};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn message(value: &Value) -> (Curve25519PublicKey, OlmMessage) {
    let sender = Curve25519PublicKey::from_base64(value["sender_key"].as_str().unwrap()).unwrap();
    let body = vodozemac::base64_decode(value["message"]["body"].as_str().unwrap()).unwrap();
    let kind = value["message"]["type"].as_u64().unwrap() as usize;
    (sender, OlmMessage::from_parts(kind, &body).unwrap())
}

async fn reads_fixture(name: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("manifest.json")).unwrap()).unwrap();
    // Opened in a copy: opening writes.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("store"), &dir.path().join("store"));
    std::fs::create_dir_all(dir.path().join("store/blobs")).unwrap();
    let key = vodozemac::base64_decode(manifest["store_key"].as_str().unwrap()).unwrap();
    let config = SledStoreConfig::new(
        dir.path().join("store"),
        StoreKey::new(key.try_into().unwrap()),
    )
    .expect_id(manifest["store_id"].as_str().unwrap().parse().unwrap());
    let store = Arc::new(SledStore::open(config).unwrap());
    let m = AccountManager::new(store.clone(), ManagerConfig::default());
    let user: OwnedUserId = manifest["user_id"].as_str().unwrap().try_into().unwrap();
    let device: OwnedDeviceId = manifest["device_id"].as_str().unwrap().into();

    let identity = m.identity_keys(&user, &device).unwrap();
    assert_eq!(identity.ed25519.to_base64(), manifest["ed25519"]);
    assert_eq!(identity.curve25519.to_base64(), manifest["curve25519"]);
    let fallback = m.published_fallback_key(&user, &device).unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&fallback.key).unwrap(),
        manifest["fallback_key"]["key"]
    );
    // ed25519 signatures are deterministic: the same keys sign the same
    // bytes, so the device keys with both signatures are equal to the byte.
    assert_eq!(
        serde_json::to_value(m.published_device_keys(&user, &device).unwrap()).unwrap(),
        manifest["published_device_keys"]
    );

    let (sender, on_session) = message(&manifest["on_stored_session"]);
    let read = crate::common::decrypt(&m, &user, &device, sender, &on_session, None)
        .await
        .unwrap();
    assert_eq!(
        read.plaintext,
        manifest["on_stored_session"]["body"]
            .as_str()
            .unwrap()
            .as_bytes()
    );
    assert!(!read.new_session, "read with the stored session");

    let dev = DeviceKey::new(user.as_str(), device.as_str());
    // Fixtures that recorded the device in the puppet registry (sled
    // schema 4 on) must still list it with its flag and its schedule.
    if let Some(puppet) = manifest.get("puppet") {
        let due_ms = puppet["due_ms"].as_u64().unwrap();
        assert!(store.contains_puppet(&dev).unwrap());
        assert_eq!(store.puppets().unwrap(), vec![dev.clone()]);
        assert_eq!(
            store.is_cross_signed(&dev).unwrap(),
            puppet["cross_signed"].as_bool().unwrap()
        );
        assert_eq!(
            store.due_rotations(u64::MAX, None, 10).unwrap(),
            vec![(dev.clone(), due_ms)]
        );
    }
    assert_eq!(m.store().count_one_time_keys(&dev).unwrap(), 1);
    let (sender, on_key) = message(&manifest["on_outstanding_key"]);
    let read = crate::common::decrypt(&m, &user, &device, sender, &on_key, None)
        .await
        .unwrap();
    assert_eq!(
        read.plaintext,
        manifest["on_outstanding_key"]["body"]
            .as_str()
            .unwrap()
            .as_bytes()
    );
    assert!(read.new_session && !read.used_fallback_key);
    assert_eq!(
        m.store().count_one_time_keys(&dev).unwrap(),
        0,
        "the key was used"
    );

    // New keys continue the sequence: no id handed out before comes back.
    let fresh = m
        .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 3)
        .await
        .unwrap();
    let old: Vec<&str> = manifest["claimed_key_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for key in &fresh {
        assert!(
            !old.contains(&key.key_id.as_str()),
            "{} repeated",
            key.key_id
        );
        let canonical = bridgekeys_olm::canonical_json_for_signing(&key.key).unwrap();
        let signature = key
            .key
            .signatures
            .get(&user)
            .unwrap()
            .values()
            .next()
            .unwrap();
        identity
            .ed25519
            .verify(
                canonical.as_bytes(),
                &vodozemac::Ed25519Signature::from_base64(signature).unwrap(),
            )
            .unwrap();
    }
}

#[tokio::test]
async fn a_store_written_in_account_format_4_still_reads_whole() {
    reads_fixture("format-4").await;
}

/// sled schema 4: a one-time key is one record found by its public key, and
/// the puppet registry's flags (cross-signed) and schedule live in the
/// account record's header. Written once, before any release could have
/// written this schema otherwise.
#[tokio::test]
async fn a_store_written_in_sled_schema_4_with_one_record_per_key_and_puppet_flags_still_reads_whole()
 {
    reads_fixture("store-schema-4").await;
}

/// sled schema 3: Olm sessions carry a version, bound into their seal
/// (slot, `0xFF`, version). Written once, before any release could have
/// written this schema otherwise.
#[tokio::test]
async fn a_store_written_in_sled_schema_3_with_versioned_sessions_still_reads_whole() {
    reads_fixture("store-schema-3").await;
}
