//! The schema-4 upgrade at open, on a store written in bulk in the schema-3
//! layout by `testing::legacy` (the helper the `upgrade` benchmark times).

use bridgekeys_store::{
    DeviceKey, FIRST_KEY_ID, PuppetRegistry, SledStore, SledStoreConfig, Store, StoreKey, Version,
    testing::legacy::{Schema3Written, write_schema_3},
};

/// Every puppet, its flags, its schedule and its keys survive the upgrade
/// of a bulk-written schema-3 store, and the key-id sequence goes on above
/// every copied id.
#[tokio::test]
async fn a_bulk_written_schema_3_store_upgrades_with_every_puppet_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let key = StoreKey::generate();
    drop(SledStore::create(SledStoreConfig::new(&path, key.clone())).unwrap());
    let devices: Vec<DeviceKey> = (0..30)
        .map(|i| DeviceKey::new(&format!("@echo_{i}:hs"), "BRIDGEKEYS"))
        .collect();
    let mut told = Vec::new();
    let written = write_schema_3(&path, &key, &devices, 4, &mut |n| told.push(n)).unwrap();
    assert_eq!(told.last(), Some(&30), "the last progress is every device");
    assert_eq!(
        written,
        Schema3Written {
            devices: 30,
            one_time_keys: 120
        }
    );

    let store = SledStore::open(SledStoreConfig::new(&path, key)).unwrap();
    let puppets = store.puppets().unwrap();
    assert_eq!(puppets.len(), 30);
    for device in &devices {
        assert!(puppets.contains(device), "every puppet is still a puppet");
    }
    let due = store.due_rotations(u64::MAX, None, 100).unwrap();
    assert_eq!(due.len(), 30, "every schedule entry is kept");
    let mut ids = Vec::new();
    for device in &devices {
        assert!(store.is_cross_signed(device).unwrap());
        assert!(due.iter().any(|(d, _)| d == device));
        let account = store.load_account(device).unwrap().expect("account kept");
        assert_eq!(account.version, Version(1));
        assert_eq!(store.count_one_time_keys(device).unwrap(), 4);
        let oldest = store.oldest_one_time_keys(device, 4).unwrap();
        for (id, public) in oldest {
            let record = store
                .one_time_key(device, &public)
                .unwrap()
                .expect("a key resolves by its public key");
            assert_eq!(record.key_id, id);
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 120, "no key lost or merged");
    assert_eq!(ids.first(), Some(&FIRST_KEY_ID));
    let next = store.reserve_key_ids(1).unwrap();
    assert!(next > *ids.last().unwrap(), "no key id is issued again");
}
