//! Stores as an older build left them, written in bulk, so the upgrade a
//! newer build runs at [`SledStore::open`](crate::SledStore::open) can be
//! tested and timed at a bridge's scale.
//!
//! Why: an operator upgrading a bridge with a million puppets needs to know
//! how long the first open of the old store takes (the bridge answers no
//! claim meanwhile), and that can only be measured on a store of that size
//! in the old layout, which no current build writes.

use std::path::Path;

use rand::RngCore;

use crate::{DeviceKey, FIRST_KEY_ID, StoreError, StoreKey, layout};

/// Entries per sled batch while writing.
const BATCH: usize = 10_000;

/// The size of the sealed payload of each account record: about what a
/// real device's account takes (its identity secrets, fallback key and
/// schedule). The upgrade never opens it.
const ACCOUNT_PAYLOAD: usize = 190;

/// What [`write_schema_3`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schema3Written {
    /// Devices with an account record and a registry record.
    pub devices: u64,
    /// One-time key records (each with its public-key index entry).
    pub one_time_keys: u64,
}

/// Rewrite the sled store at `path` (created by [`SledStore::create`](crate::SledStore::create)
/// with `key`, and closed) as sled schema 3 holding `devices`, each a
/// provisioned, cross-signed puppet scheduled for rotation (an account
/// record, an `r/` registry record and an `n/` schedule entry) with
/// `keys_per_device` outstanding one-time keys (a record by key id and a
/// public-key index entry each, random keys). This is the layout the
/// schema-4 upgrade converts. `written` is told how many devices are
/// written so far, after each batch (a million take a while).
pub fn write_schema_3(
    path: &Path,
    key: &StoreKey,
    devices: &[DeviceKey],
    keys_per_device: u64,
    written: &mut dyn FnMut(usize),
) -> Result<Schema3Written, StoreError> {
    let sealer = key.cipher();
    let db = sled::open(path)?;
    let mut rng = rand::thread_rng();
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let flush_batch = |batch: &mut sled::Batch, in_batch: &mut usize| {
        *in_batch = 0;
        db.apply_batch(std::mem::take(batch))
    };
    let mut payload = [0u8; ACCOUNT_PAYLOAD];
    let mut next_id = FIRST_KEY_ID;
    let due: u64 = 1_800_000_000_000;
    for (i, device) in devices.iter().enumerate() {
        // Schema 3's account value: the version (no flags in its top
        // byte), then the account sealed to (device, version).
        rng.fill_bytes(&mut payload);
        let version = 1u64;
        let mut account = version.to_be_bytes().to_vec();
        account.extend(sealer.seal(&layout::account_slot(device, version), &payload));
        batch.insert(layout::account(device), account);
        // Cross-signed (1), due at `due`.
        let mut registry = vec![1u8];
        registry.extend_from_slice(&due.to_be_bytes());
        batch.insert(layout::puppet(device), registry);
        batch.insert(layout::rotation(due, device), &[][..]);
        in_batch += 3;
        for _ in 0..keys_per_device {
            let (mut public, mut secret) = ([0u8; 32], zeroize::Zeroizing::new([0u8; 32]));
            rng.fill_bytes(&mut public);
            rng.fill_bytes(&mut *secret);
            let mut value = public.to_vec();
            value.extend(sealer.seal(&layout::otk_by_id(device, next_id), &*secret));
            batch.insert(layout::otk_by_id(device, next_id), value);
            batch.insert(
                layout::legacy_otk_by_public(device, &public),
                &next_id.to_be_bytes(),
            );
            next_id += 1;
            in_batch += 2;
        }
        if in_batch >= BATCH {
            flush_batch(&mut batch, &mut in_batch)?;
            written(i + 1);
        }
    }
    flush_batch(&mut batch, &mut in_batch)?;
    written(devices.len());
    db.insert(layout::KEY_IDS, &next_id.to_be_bytes())?;
    db.insert(layout::SCHEMA, &3u32.to_be_bytes())?;
    db.flush()?;
    Ok(Schema3Written {
        devices: devices.len() as u64,
        one_time_keys: next_id - FIRST_KEY_ID,
    })
}
