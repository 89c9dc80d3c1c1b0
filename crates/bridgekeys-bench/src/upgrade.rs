//! The `upgrade` scenario: how long the first open of a large sled store
//! written by a schema-3 build takes with this build (the schema-4 upgrade
//! runs inside [`SledStore::open`], and the bridge answers nothing until it
//! returns), against a plain open of the same store afterwards.
//!
//! The old store is written in bulk by
//! [`bridgekeys_store::testing::legacy::write_schema_3`]: every device a
//! provisioned, cross-signed puppet with its schedule entry (an account
//! record, an `r/` registry record that the upgrade folds into the account
//! header) and `keys_per_device` outstanding one-time keys (a record by key
//! id and a public-key index entry, which the upgrade re-keys by public key
//! and re-seals). The store is closed and its files measured before and
//! after.

use std::{path::PathBuf, time::Instant};

use bridgekeys_store::{
    DeviceKey, SledStore, SledStoreConfig, StoreKey, testing::legacy::write_schema_3,
};
use serde::Serialize;

use crate::{progress::Progress, storage::allocated_bytes, support::puppet};

/// Knobs of the `upgrade` scenario.
#[derive(Clone, Debug)]
pub struct UpgradeBench {
    /// Puppet devices in the old store.
    pub devices: usize,
    /// Outstanding one-time keys per device in the old store.
    pub keys_per_device: u64,
    /// Where the store goes (a temporary directory inside it).
    pub dir: PathBuf,
}

/// Figures of one `upgrade` run.
#[derive(Debug, Serialize)]
pub struct UpgradeReport {
    /// Devices in the store.
    pub devices: usize,
    /// One-time keys in the store.
    pub one_time_keys: u64,
    /// Seconds to write the schema-3 store (not part of the upgrade).
    pub write_s: f64,
    /// Allocated bytes of the store before the upgrade.
    pub bytes_before: u64,
    /// Seconds of the first open by this build: checks, upgrade, syncs.
    pub upgrade_open_s: f64,
    /// Devices upgraded per second of that open.
    pub devices_per_s: f64,
    /// Seconds of a second open of the upgraded store (nothing to upgrade).
    pub plain_open_s: f64,
    /// Allocated bytes of the store after the upgrade and the second open.
    pub bytes_after: u64,
}

/// Run the scenario.
pub fn run(config: &UpgradeBench) -> anyhow::Result<UpgradeReport> {
    std::fs::create_dir_all(&config.dir)?;
    let dir = tempfile::tempdir_in(&config.dir)?;
    let path = dir.path().join("store");
    let key = StoreKey::generate();
    let store_config = SledStoreConfig::new(&path, key.clone());
    drop(SledStore::create(store_config.clone())?);

    let devices = (0..config.devices)
        .map(|i| {
            let (user, device) = puppet(i)?;
            Ok(DeviceKey::new(user.as_str(), device.as_str()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let progress = Progress::new("upgrade: wrote schema 3", "devices", config.devices);
    let mut told = 0;
    let started = Instant::now();
    let written = write_schema_3(&path, &key, &devices, config.keys_per_device, &mut |n| {
        progress.add(n - told);
        told = n;
    })?;
    progress.finish();
    let write_s = started.elapsed().as_secs_f64();
    let bytes_before = allocated_bytes(&path)?;

    eprintln!("upgrade: opening with this build (the upgrade runs inside the open)");
    let started = Instant::now();
    let store = SledStore::open(store_config.clone())?;
    let upgrade_open_s = started.elapsed().as_secs_f64();
    drop(store);
    let started = Instant::now();
    let store = SledStore::open(store_config)?;
    let plain_open_s = started.elapsed().as_secs_f64();
    drop(store);
    let bytes_after = allocated_bytes(&path)?;
    Ok(UpgradeReport {
        devices: config.devices,
        one_time_keys: written.one_time_keys,
        write_s,
        bytes_before,
        upgrade_open_s,
        devices_per_s: config.devices as f64 / upgrade_open_s,
        plain_open_s,
        bytes_after,
    })
}
