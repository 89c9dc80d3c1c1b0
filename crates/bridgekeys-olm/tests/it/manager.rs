//! The account manager's promises, each proved by name.

use std::{collections::HashSet, sync::Arc};

use crate::common::{DecryptPrekey, alice, manager, prekey_message, verifier_keys};
use bridgekeys_olm::{ManagerConfig, OlmError};
use bridgekeys_store::{DeviceKey, StoreKey};
use ruma::{CanonicalJsonObject, OneTimeKeyAlgorithm, device_id, signatures::verify_json};

const SC: OneTimeKeyAlgorithm = OneTimeKeyAlgorithm::SignedCurve25519;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_on_one_device_return_distinct_key_ids_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(manager(
        dir.path(),
        &StoreKey::generate(),
        ManagerConfig::default(),
    ));
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (m, user, device, barrier) =
                (m.clone(), user.clone(), device.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                m.claim(&user, &device, &SC, 1).await.unwrap()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    for t in tasks {
        for k in t.await.unwrap() {
            assert!(
                ids.insert(k.key_id.to_string()),
                "key id {} issued twice",
                k.key_id
            );
            assert!(keys.insert(k.key.key.encode()), "key issued twice");
        }
    }
    assert_eq!((ids.len(), keys.len()), (64, 64));
    assert_eq!(m.stats().keys_issued, 64);
}

#[tokio::test]
async fn reopened_store_never_reuses_an_earlier_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let (user, device) = alice();
    let mut seen = HashSet::new();
    for round in 0..3 {
        let m = manager(dir.path(), &key, ManagerConfig::default());
        if round == 0 {
            m.create_device(&user, &device).await.unwrap();
        }
        for _ in 0..5 {
            for k in m.claim(&user, &device, &SC, 3).await.unwrap() {
                assert!(
                    seen.insert(k.key_id.to_string()),
                    "round {round}: {} reused",
                    k.key_id
                );
            }
        }
        // Dropping the manager drops the store: the next round reopens it.
    }
    assert_eq!(seen.len(), 45);
}

#[tokio::test]
async fn every_signature_verifies_with_an_independent_verifier() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let m = manager(dir.path(), &store_key, ManagerConfig::default());
    let (user, device) = alice();
    let device_keys = m.create_device(&user, &device).await.unwrap();

    // The verifier's key comes from the published device_keys object.
    let key_map = verifier_keys(&user, &device, &device_keys);
    let to_object =
        |v: serde_json::Value| -> CanonicalJsonObject { serde_json::from_value(v).unwrap() };

    // ruma-signatures canonicalises and verifies on its own (ed25519-dalek).
    verify_json(
        &key_map,
        &to_object(serde_json::to_value(&device_keys).unwrap()),
    )
    .unwrap();
    let claimed = m.claim(&user, &device, &SC, 10).await.unwrap();
    for k in &claimed {
        let json = serde_json::to_value(&k.key).unwrap();
        assert_eq!(
            json.as_object().unwrap().len(),
            2,
            "only key and signatures: {json}"
        );
        verify_json(&key_map, &to_object(json.clone())).unwrap();
        // A changed key must not verify: the check is real.
        let mut forged = json;
        forged["key"] =
            serde_json::Value::String(claimed[0].key.key.encode().chars().rev().collect());
        assert!(verify_json(&key_map, &to_object(forged)).is_err());
    }
    assert!(
        claimed
            .iter()
            .all(|k| k.key_id.as_str().starts_with("signed_curve25519:"))
    );
    // Cold devices (reopened store) sign without unpickling their
    // accounts: the first the new manager loads checks the stored key, the
    // others are signed with their stored key as it is. Every signature
    // verifies just the same.
    let others: Vec<ruma::OwnedDeviceId> = (0..3).map(|i| format!("OTHER{i}").into()).collect();
    let mut other_maps = Vec::new();
    for other in &others {
        let keys = m.create_device(&user, other).await.unwrap();
        other_maps.push(verifier_keys(&user, other, &keys));
    }
    drop(m);
    let m = manager(dir.path(), &store_key, ManagerConfig::default());
    for k in m.claim(&user, &device, &SC, 3).await.unwrap() {
        verify_json(&key_map, &to_object(serde_json::to_value(&k.key).unwrap())).unwrap();
    }
    for (other, map) in others.iter().zip(&other_maps) {
        for k in m.claim(&user, other, &SC, 2).await.unwrap() {
            verify_json(map, &to_object(serde_json::to_value(&k.key).unwrap())).unwrap();
        }
    }
    assert_eq!(
        m.device_keys(&user, &device).unwrap().keys,
        device_keys.keys
    );
}

#[tokio::test]
async fn a_claimed_key_starts_a_session_once_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    let key = m.claim(&user, &device, &SC, 1).await.unwrap().remove(0);

    let (sender, message) = prekey_message(&m, &user, &device, &key, "hello puppet");
    let inbound = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap();
    assert_eq!(inbound.plaintext.as_slice(), b"hello puppet");
    assert!(!inbound.used_fallback_key);

    // A second peer using the same (now consumed) key is refused.
    let (sender2, message2) = prekey_message(&m, &user, &device, &key, "again");
    let err = m
        .decrypt_prekey(&user, &device, sender2, &message2)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownOneTimeKey), "{err}");
    // And so is the very same message again: it goes to the session it
    // started, whose key for it is spent.
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    let stats = m.stats();
    assert_eq!((stats.prekeys_decrypted, stats.prekeys_refused), (1, 2));
}

#[tokio::test]
async fn a_tampered_prekey_message_fails_and_leaves_the_key_usable() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    let key = m.claim(&user, &device, &SC, 1).await.unwrap().remove(0);
    let (sender, message) = prekey_message(&m, &user, &device, &key, "secret");

    let mut bytes = message.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // the MAC
    let tampered = vodozemac::olm::PreKeyMessage::from_bytes(&bytes).unwrap();
    let err = m
        .decrypt_prekey(&user, &device, sender, &tampered)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Decryption(_)), "{err}");
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    assert_eq!(
        m.store().count_one_time_keys(&dev).unwrap(),
        1,
        "tampering consumed the key"
    );

    let inbound = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap();
    assert_eq!(inbound.plaintext.as_slice(), b"secret");
    assert_eq!(m.store().count_one_time_keys(&dev).unwrap(), 0);
}

#[tokio::test]
async fn consumed_key_stays_consumed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let (key, sender, message) = {
        let m = manager(dir.path(), &store_key, ManagerConfig::default());
        m.create_device(&user, &device).await.unwrap();
        let key = m.claim(&user, &device, &SC, 1).await.unwrap().remove(0);
        let (sender, message) = prekey_message(&m, &user, &device, &key, "once");
        m.decrypt_prekey(&user, &device, sender, &message)
            .await
            .unwrap();
        (key, sender, message)
    };
    let m = manager(dir.path(), &store_key, ManagerConfig::default());
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    // A new peer on the same key finds it gone.
    let (other, message) = prekey_message(&m, &user, &device, &key, "twice");
    let err = m
        .decrypt_prekey(&user, &device, other, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownOneTimeKey), "{err}");
}

#[tokio::test]
async fn outstanding_keys_are_bounded_and_eviction_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = ManagerConfig::default();
        c.max_keys_per_claim = 5;
        c.max_outstanding_keys = 8;
        c
    };
    let m = manager(dir.path(), &StoreKey::generate(), config);
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    let first = m.claim(&user, &device, &SC, 5).await.unwrap();
    m.claim(&user, &device, &SC, 5).await.unwrap();
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    assert_eq!(m.store().count_one_time_keys(&dev).unwrap(), 8);
    assert_eq!(m.stats().evicted_keys, 2);
    // The two oldest went: a pre-key message using one is refused cleanly.
    let (sender, message) = prekey_message(&m, &user, &device, &first[0], "late");
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownOneTimeKey), "{err}");
    // The third oldest is still there.
    let (sender, message) = prekey_message(&m, &user, &device, &first[2], "in time");
    m.decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_claims_are_refused_without_state_change() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    let version = m.store().load_account(&dev).unwrap().unwrap().version;

    let err = m
        .claim(
            &user,
            &device,
            &OneTimeKeyAlgorithm::from("signed_curve448"),
            1,
        )
        .await;
    assert!(matches!(err, Err(OlmError::UnsupportedAlgorithm(ref a)) if a == "signed_curve448"));
    assert!(matches!(
        m.claim(&user, &device, &SC, 0).await,
        Err(OlmError::BadKeyCount { .. })
    ));
    assert!(matches!(
        m.claim(&user, &device, &SC, 1_000_000).await,
        Err(OlmError::BadKeyCount { .. })
    ));
    let err = m
        .claim(&user, device_id!("NOTOURS"), &SC, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownDevice { .. }), "{err}");
    let unknown = DeviceKey::new(user.as_str(), "NOTOURS");
    assert!(
        m.store().load_account(&unknown).unwrap().is_none(),
        "unknown device created on the fly"
    );
    assert_eq!(
        m.store().load_account(&dev).unwrap().unwrap().version,
        version
    );
    assert_eq!(m.store().count_one_time_keys(&dev).unwrap(), 0);
}

#[tokio::test]
async fn create_device_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let (user, device) = alice();
    let first = manager(dir.path(), &key, ManagerConfig::default())
        .create_device(&user, &device)
        .await
        .unwrap();
    let again = manager(dir.path(), &key, ManagerConfig::default())
        .create_device(&user, &device)
        .await
        .unwrap();
    assert_eq!(first.keys, again.keys);
}

#[tokio::test]
async fn store_files_hold_no_private_key_material_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let (user, device) = alice();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    {
        let m = manager(dir.path(), &key, ManagerConfig::default());
        m.create_device(&user, &device).await.unwrap();
        let claimed = m.claim(&user, &device, &SC, 20).await.unwrap();
        let dev = DeviceKey::new(user.as_str(), device.as_str());
        for k in &claimed {
            let record = m
                .store()
                .one_time_key(&dev, k.key.key.as_bytes().try_into().unwrap())
                .unwrap()
                .unwrap();
            secrets.push(record.secret_key.to_vec());
        }
        // The identity keys' private halves, read from the stored account.
        let account = m.store().load_account(&dev).unwrap().unwrap();
        // Format 4: a tag byte, the ed25519 public key (32 bytes), then
        // the postcard form: the fallback schedule, then the account pickle.
        assert_eq!(account.data[0], 4, "account record format");
        let (_, rest) =
            postcard::take_from_bytes::<bridgekeys_olm::FallbackState>(&account.data[33..])
                .unwrap();
        let (pickle, _) = postcard::take_from_bytes::<vodozemac::olm::AccountPickle>(rest).unwrap();
        let json = serde_json::to_value(&pickle).unwrap();
        let mut found = Vec::new();
        collect_byte_arrays(&json, &mut found);
        assert!(
            found.len() >= 2,
            "expected the identity secrets in the pickle: {}",
            found.len()
        );
        secrets.extend(found);
        secrets.push(b"signing_key".to_vec()); // the pickle's own field names
    }
    let on_disk = file_bytes(&dir.path().join("store"));
    for s in &secrets {
        assert!(
            !on_disk.windows(s.len()).any(|w| w == s.as_slice()),
            "plaintext secret on disk"
        );
        let b64 = vodozemac::base64_encode(s);
        assert!(
            !on_disk.windows(b64.len()).any(|w| w == b64.as_bytes()),
            "base64 secret on disk"
        );
    }
}

/// Every 32-byte array of numbers in a JSON value (how vodozemac pickles secrets).
fn collect_byte_arrays(v: &serde_json::Value, out: &mut Vec<Vec<u8>>) {
    match v {
        serde_json::Value::Array(a) if a.len() == 32 && a.iter().all(|x| x.is_u64()) => {
            out.push(a.iter().map(|x| x.as_u64().unwrap() as u8).collect());
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_byte_arrays(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_byte_arrays(x, out)),
        serde_json::Value::String(s) => {
            if let Ok(bytes) = vodozemac::base64_decode(s)
                && (bytes.len() == 32 || bytes.len() == 64)
            {
                out.push(bytes);
            }
        }
        _ => {}
    }
}

fn file_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(file_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn a_retried_delivery_gets_the_same_plaintext_even_after_a_restart_and_no_other_delivery_does()
 {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let (sender, message) = {
        let m = manager(dir.path(), &store_key, ManagerConfig::default());
        m.create_device(&user, &device).await.unwrap();
        let key = m.claim(&user, &device, &SC, 1).await.unwrap().remove(0);
        let (sender, message) = prekey_message(&m, &user, &device, &key, "only once");
        let first = m
            .decrypt_prekey_in_delivery(&user, &device, sender, &message, "txn-1")
            .await
            .unwrap();
        assert_eq!(first.plaintext.as_slice(), b"only once");
        (sender, message)
        // The manager (and store) go: a crash before the delivery was acknowledged.
    };
    let m = manager(dir.path(), &store_key, ManagerConfig::default());
    let again = m
        .decrypt_prekey_in_delivery(&user, &device, sender, &message, "txn-1")
        .await
        .unwrap();
    assert_eq!(
        again.plaintext.as_slice(),
        b"only once",
        "the retry lost the message"
    );
    // Another delivery of the same message is a replay: its session
    // exists and its message key is spent.
    let err = m
        .decrypt_prekey_in_delivery(&user, &device, sender, &message, "txn-2")
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    // Once acknowledged and forgotten, the plaintext is no longer kept.
    m.forget_deliveries("txn-1").await.unwrap();
    let err = m
        .decrypt_prekey_in_delivery(&user, &device, sender, &message, "txn-1")
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
}

#[tokio::test]
async fn the_account_cache_stays_bounded_and_evicted_devices_keep_their_keys_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = ManagerConfig::default();
        c.max_cached_devices = 16;
        c.max_outstanding_keys = 3;
        c
    };
    let m = manager(dir.path(), &StoreKey::generate(), config);
    let devices: Vec<_> = (0..64)
        .map(|i| {
            (
                ruma::UserId::parse(format!("@echo_{i}:example.org")).unwrap(),
                ruma::OwnedDeviceId::from(format!("DEV{i}").as_str()),
            )
        })
        .collect();
    let mut first_keys = Vec::new();
    for (user, device) in &devices {
        m.create_device(user, device).await.unwrap();
        first_keys.push(m.claim(user, device, &SC, 2).await.unwrap());
        assert!(
            m.loaded_devices() <= 16,
            "cache grew to {}",
            m.loaded_devices()
        );
    }
    assert!(m.stats().cache_evictions >= 64 - 16);
    let mut ids = HashSet::new();
    for (i, (user, device)) in devices.iter().enumerate() {
        // Reloaded from the store with its outstanding keys counted: one more
        // key than the bound allows evicts exactly the oldest one.
        let more = m.claim(user, device, &SC, 2).await.unwrap();
        let dev = DeviceKey::new(user.as_str(), device.as_str());
        assert_eq!(m.store().count_one_time_keys(&dev).unwrap(), 3);
        // A key claimed before the device left the cache still decrypts.
        let kept = &first_keys[i][1];
        let (sender, message) = prekey_message(&m, user, device, kept, "after eviction");
        let inbound = m
            .decrypt_prekey(user, device, sender, &message)
            .await
            .unwrap();
        assert_eq!(inbound.plaintext.as_slice(), b"after eviction");
        for k in first_keys[i].iter().chain(&more) {
            assert!(ids.insert(k.key_id.clone()), "key id issued twice");
        }
    }
    assert_eq!(m.stats().evicted_keys, 64);
}

#[tokio::test]
async fn bulk_creation_makes_real_durable_accounts_and_leaves_existing_ones_alone() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let (alice_user, alice_device) = alice();
    let users: Vec<_> = (0..20)
        .map(|i| ruma::UserId::parse(format!("@echo_{i}:example.org")).unwrap())
        .collect();
    let existing_keys = {
        let m = manager(dir.path(), &key, ManagerConfig::default());
        let existing = m.create_device(&alice_user, &alice_device).await.unwrap();
        let list = users
            .iter()
            .map(|u| (u.as_ref(), device_id!("BULK")))
            .chain([(alice_user.as_ref(), alice_device.as_ref())]);
        assert_eq!(m.create_devices(list).await.unwrap(), 20);
        assert_eq!(
            m.loaded_devices(),
            1,
            "bulk creation does not fill the cache"
        );
        existing
    };
    // After a restart every device is there, with working, signed keys.
    let m = manager(dir.path(), &key, ManagerConfig::default());
    assert_eq!(
        m.device_keys(&alice_user, &alice_device).unwrap().keys,
        existing_keys.keys
    );
    let mut identities = HashSet::new();
    for user in &users {
        let keys = m.device_keys(user, device_id!("BULK")).unwrap();
        assert!(identities.insert(format!("{:?}", keys.keys)));
        let claimed = m.claim(user, device_id!("BULK"), &SC, 1).await.unwrap();
        let (sender, message) = prekey_message(&m, user, device_id!("BULK"), &claimed[0], "hi");
        let inbound = m
            .decrypt_prekey(user, device_id!("BULK"), sender, &message)
            .await
            .unwrap();
        assert_eq!(inbound.plaintext.as_slice(), b"hi");
    }
}
