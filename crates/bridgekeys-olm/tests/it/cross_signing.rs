//! Cross-signing identities for puppets: created once and for good,
//! durable across a reopen, shared by concurrent first uses, and every
//! signature verifies with an independent verifier (ruma-signatures).

use std::{collections::BTreeMap, sync::Arc};

use crate::common::{alice, manager};
use bridgekeys_olm::ManagerConfig;
use bridgekeys_store::StoreKey;
use ruma::{CanonicalJsonObject, serde::Base64, signatures::verify_json};

fn object<T: serde::Serialize>(value: &T) -> CanonicalJsonObject {
    serde_json::from_value(serde_json::to_value(value).unwrap()).unwrap()
}

fn key_map(user: &str, public: &str) -> BTreeMap<String, BTreeMap<String, Base64>> {
    BTreeMap::from([(
        user.to_owned(),
        BTreeMap::from([(format!("ed25519:{public}"), Base64::parse(public).unwrap())]),
    )])
}

#[tokio::test]
async fn a_puppets_identity_signs_its_keys_and_device_and_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let first = {
        let m = manager(dir.path(), &store_key, ManagerConfig::default());
        let device_keys = m.create_device(&user, &device).await.unwrap();
        let keys = m.cross_signing_keys(&user).await.unwrap();
        assert!(keys.created);
        let master = keys.master_public().unwrap().to_owned();
        let ssk = keys.self_signing_public().unwrap().to_owned();
        assert_ne!(master, ssk);

        // The self-signing and user-signing keys carry the master's
        // signature; a forged key does not verify (the check is real).
        let by_master = key_map(user.as_str(), &master);
        verify_json(&by_master, &object(&keys.self_signing_key)).unwrap();
        verify_json(&by_master, &object(&keys.user_signing_key)).unwrap();
        let mut forged = serde_json::to_value(&keys.self_signing_key).unwrap();
        forged["usage"] = serde_json::json!(["user_signing"]);
        assert!(verify_json(&by_master, &serde_json::from_value(forged).unwrap()).is_err());

        // The device, signed by the self-signing key, is the same device.
        let signed = m.self_signed_device_keys(&user, &device).await.unwrap();
        assert_eq!(signed.keys, device_keys.keys);
        verify_json(&key_map(user.as_str(), &ssk), &object(&signed)).unwrap();
        // Asking again is not a new identity.
        let again = m.cross_signing_keys(&user).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.master_public(), Some(master.as_str()));
        master
    };
    // A reopened store has the same identity.
    let m = manager(dir.path(), &store_key, ManagerConfig::default());
    let keys = m.cross_signing_keys(&user).await.unwrap();
    assert!(!keys.created);
    assert_eq!(keys.master_public(), Some(first.as_str()));
}

#[tokio::test]
async fn concurrent_first_uses_end_with_one_identity() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(manager(
        dir.path(),
        &StoreKey::generate(),
        ManagerConfig::default(),
    ));
    let (user, _) = alice();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let m = Arc::clone(&m);
            let user = user.clone();
            tokio::spawn(async move { m.cross_signing_keys(&user).await.unwrap() })
        })
        .collect();
    let mut masters = std::collections::BTreeSet::new();
    let mut created = 0;
    for t in tasks {
        let keys = t.await.unwrap();
        masters.insert(keys.master_public().unwrap().to_owned());
        created += usize::from(keys.created);
    }
    assert_eq!(masters.len(), 1, "one identity");
    assert_eq!(created, 1, "created exactly once");
}
