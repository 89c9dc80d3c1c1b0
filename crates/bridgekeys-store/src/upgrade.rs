//! The upgrade of a sled store from schema 1, 2 or 3 to schema 4, run by
//! [`crate::SledStore::open`] before anything else uses the store.
//!
//! 1. Every one-time key record `k/<device><key id>` (public key, then the
//!    private key sealed to that slot) becomes `k/<device><public key>`
//!    (key id, then the private key sealed to device, public key and key
//!    id), with the same id and secret; its old record and its `p/` index
//!    entry go in the same atomic batch.
//! 2. Every `p/` index entry left (stale ones, whose record was gone) goes.
//! 3. The puppet-registry record `r/<device>` of every device that has an
//!    account record moves into the account's header (same flags, same due
//!    time), removed in the same batch. A device recorded without an
//!    account keeps its `r/` record.
//!
//! Before anything is written, [`check`] reads every record the steps will
//! convert: a record they cannot read refuses the store while it is still
//! of its old schema. Then the caller durably writes the new schema version
//! together with `m/upgrading` ([`begin`]): a build of an older schema then
//! refuses the store instead of misreading records already converted, and
//! this build, finding the mark, runs the upgrade again. Each batch is
//! applied atomically by sled (after a crash, all of it or none of it), and
//! every step skips what is already done: a record of the new format is
//! recognised by its key (32 bytes after the device, not 8), an `r/` record
//! already folded is gone. So an upgrade cut short anywhere is finished by
//! the next open; the caller removes the mark only after all of it is
//! durable. Key ids are copied, never made, and the key-id mark is not
//! touched: no id can repeat.

use zeroize::Zeroizing;

use crate::{DeviceKey, StoreError, crypto::Sealer, layout};

/// Records rewritten per atomic batch.
const BATCH: usize = 1_000;

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("{what} (while upgrading the store to schema 4)"),
    }
}

/// Mark an upgrade from `from` under way: the new schema version and
/// `m/upgrading`, in one atomic batch (the caller makes it durable before
/// any record is converted).
pub(crate) fn begin(db: &sled::Db, from: u32) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    batch.insert(layout::UPGRADING, &from.to_be_bytes());
    batch.insert(layout::SCHEMA, &crate::SCHEMA_VERSION.to_be_bytes());
    db.apply_batch(batch)?;
    Ok(())
}

/// Run every step; see the module docs.
pub(crate) fn to_schema_4(db: &sled::Db, sealer: &Sealer) -> Result<(), StoreError> {
    let mut unlimited = usize::MAX;
    run(db, sealer, &mut unlimited).map(|_| ())
}

/// Apply `batch` unless `budget` (of batches) is spent: a test stops the
/// upgrade there, as a crash would. Whether it was applied.
fn apply(db: &sled::Db, batch: sled::Batch, budget: &mut usize) -> Result<bool, StoreError> {
    if *budget == 0 {
        return Ok(false);
    }
    *budget -= 1;
    db.apply_batch(batch)?;
    Ok(true)
}

/// Every step, at most `budget` batches; whether it finished.
fn run(db: &sled::Db, sealer: &Sealer, budget: &mut usize) -> Result<bool, StoreError> {
    let Some(keys) = convert_one_time_keys(db, sealer, budget)? else {
        return Ok(false);
    };
    let Some(index_entries) = remove_prefix(db, layout::LEGACY_OTK_INDEX_PREFIX, budget)? else {
        return Ok(false);
    };
    let Some(puppets) = fold_puppet_records(db, budget)? else {
        return Ok(false);
    };
    tracing::info!(
        one_time_keys = keys,
        index_entries_removed = index_entries,
        puppet_records_folded = puppets,
        "upgraded the store's records to schema 4"
    );
    Ok(true)
}

/// Up to [`BATCH`] entries under `prefix` after `after` (exclusive), in key
/// order.
fn next_chunk(
    db: &sled::Db,
    prefix: &[u8],
    after: Option<&[u8]>,
) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
    use std::ops::Bound;
    let start = match after {
        Some(key) => Bound::Excluded(key.to_vec()),
        None => Bound::Included(prefix.to_vec()),
    };
    let mut out = Vec::new();
    for item in db.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
        let (key, value) = item?;
        if !key.starts_with(prefix) || out.len() == BATCH {
            break;
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Step 1: how many keys were rewritten (`None`: out of budget).
fn convert_one_time_keys(
    db: &sled::Db,
    sealer: &Sealer,
    budget: &mut usize,
) -> Result<Option<u64>, StoreError> {
    in_chunks(db, layout::OTK_PREFIX, budget, |key, value, batch| {
        let Some(OldKey {
            device,
            key_id,
            public_key,
            secret,
        }) = old_key(sealer, key, value)?
        else {
            // Already in the new format.
            return Ok(false);
        };
        let sealed = crate::sled_store::seal_key(sealer, &device, &public_key, key_id, &secret)?;
        batch.insert(sealed.key, sealed.value);
        batch.remove(key);
        batch.remove(layout::legacy_otk_by_public(&device, &public_key));
        Ok(true)
    })
}

/// Walk the entries under `prefix` in chunks of [`BATCH`], letting `each`
/// add an entry's rewrite to the chunk's batch (`true`) or skip it
/// (`false`), and apply each chunk's batch atomically: how many entries
/// were rewritten (`None`: out of budget).
fn in_chunks(
    db: &sled::Db,
    prefix: &[u8],
    budget: &mut usize,
    mut each: impl FnMut(&sled::IVec, &sled::IVec, &mut sled::Batch) -> Result<bool, StoreError>,
) -> Result<Option<u64>, StoreError> {
    let mut rewritten = 0;
    let mut after: Option<sled::IVec> = None;
    loop {
        let chunk = next_chunk(db, prefix, after.as_deref())?;
        let Some((last, _)) = chunk.last() else {
            return Ok(Some(rewritten));
        };
        after = Some(last.clone());
        let mut batch = sled::Batch::default();
        let mut any = false;
        for (key, value) in &chunk {
            if each(key, value, &mut batch)? {
                any = true;
                rewritten += 1;
            }
        }
        if any && !apply(db, batch, budget)? {
            return Ok(None);
        }
    }
}

/// A one-time key record of the old format, opened.
struct OldKey {
    device: DeviceKey,
    key_id: u64,
    public_key: [u8; 32],
    secret: Zeroizing<Vec<u8>>,
}

/// Read a `k/` record: `None` if it is of the new format already; an error
/// if it is of neither or does not open.
fn old_key(sealer: &Sealer, key: &[u8], value: &[u8]) -> Result<Option<OldKey>, StoreError> {
    let (device, suffix) = key
        .get(layout::OTK_PREFIX.len()..)
        .and_then(DeviceKey::split_front)
        .ok_or_else(|| corrupt("one-time key record key"))?;
    match suffix.len() {
        32 => return Ok(None),
        8 => {}
        _ => return Err(corrupt("one-time key record key")),
    }
    let key_id =
        u64::from_be_bytes(<[u8; 8]>::try_from(suffix).map_err(|_| corrupt("one-time key id"))?);
    let public_key = value
        .get(..32)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| corrupt("one-time key record"))?;
    // Sealed to its old slot, which is its old key.
    let secret: Zeroizing<Vec<u8>> = sealer
        .open(&layout::otk_by_id(&device, key_id), &value[32..])
        .ok_or_else(|| corrupt("one-time key secret"))?;
    if secret.len() != 32 {
        return Err(corrupt("one-time key length"));
    }
    Ok(Some(OldKey {
        device,
        key_id,
        public_key,
        secret,
    }))
}

/// Read every record the upgrade will convert, changing nothing: run
/// before [`begin`], so a store holding a record the upgrade cannot read
/// is refused while it is still of its old schema, which the build that
/// wrote it still opens (a damaged key would otherwise stop every build
/// from opening the store once the new schema is written).
pub(crate) fn check(db: &sled::Db, sealer: &Sealer) -> Result<(), StoreError> {
    for item in db.scan_prefix(layout::OTK_PREFIX) {
        let (key, value) = item?;
        old_key(sealer, &key, &value)?;
    }
    for item in db.scan_prefix(layout::PUPPET_PREFIX) {
        let (key, _) = item?;
        let device = key
            .get(layout::PUPPET_PREFIX.len()..)
            .and_then(DeviceKey::from_bytes)
            .ok_or_else(|| corrupt("puppet registry entry"))?;
        if let Some(raw) = db.get(layout::account(&device))? {
            layout::parse_account(&raw).ok_or_else(|| corrupt("account record header"))?;
        }
    }
    Ok(())
}

/// Step 2 (and any prefix whose entries all go): how many were removed
/// (`None`: out of budget).
fn remove_prefix(
    db: &sled::Db,
    prefix: &[u8],
    budget: &mut usize,
) -> Result<Option<u64>, StoreError> {
    let mut removed = 0;
    loop {
        let chunk = next_chunk(db, prefix, None)?;
        if chunk.is_empty() {
            return Ok(Some(removed));
        }
        let mut batch = sled::Batch::default();
        for (key, _) in chunk {
            batch.remove(key);
            removed += 1;
        }
        if !apply(db, batch, budget)? {
            return Ok(None);
        }
    }
}

/// Step 3: how many registry records moved into their account's header
/// (`None`: out of budget).
fn fold_puppet_records(db: &sled::Db, budget: &mut usize) -> Result<Option<u64>, StoreError> {
    in_chunks(db, layout::PUPPET_PREFIX, budget, |key, value, batch| {
        let device = DeviceKey::from_bytes(&key[layout::PUPPET_PREFIX.len()..])
            .ok_or_else(|| corrupt("puppet registry entry"))?;
        let Some(account) = db.get(layout::account(&device))? else {
            // Recorded without an account: stays in the registry.
            return Ok(false);
        };
        let registry = layout::PuppetHeader::from_registry_value(value);
        let (header, _, _) =
            layout::parse_account(&account).ok_or_else(|| corrupt("account record"))?;
        let merged = layout::PuppetHeader {
            flags: header.flags | registry.flags,
            due: registry.due.or(header.due),
        };
        let updated =
            layout::with_header(&account, merged).ok_or_else(|| corrupt("account record"))?;
        batch.insert(layout::account(&device), updated);
        batch.remove(key);
        Ok(true)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        FIRST_KEY_ID, PuppetRegistry, SledStore, SledStoreConfig, Store, StoreKey, Version,
    };

    const KEYS: u64 = 2_500;

    fn public(i: u64) -> [u8; 32] {
        let mut p = [0xA5; 32];
        p[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        p
    }

    fn secret(i: u64) -> [u8; 32] {
        let mut s = [0x3C; 32];
        s[24..].copy_from_slice(&i.to_be_bytes());
        s
    }

    /// Write, with raw sled, what a schema 3 build left: accounts, one-time
    /// keys as a record by id plus a public-key index entry (and one stale
    /// index entry), registry records with flags and schedules (one for a
    /// device without an account), the schema record saying 3.
    fn write_schema_3(path: &std::path::Path, key: &StoreKey, devices: &[DeviceKey]) {
        let sealer = key.cipher();
        let db = sled::open(path).unwrap();
        for dev in &devices[..3] {
            let mut account = 1u64.to_be_bytes().to_vec();
            account.extend(sealer.seal(&layout::account_slot(dev, 1), b"account"));
            db.insert(layout::account(dev), account).unwrap();
        }
        // Keys spread over two devices, out of id order in the tree's
        // public-key order.
        for i in 0..KEYS {
            let dev = &devices[(i % 2) as usize];
            let id = FIRST_KEY_ID + i;
            let mut value = public(i).to_vec();
            value.extend(sealer.seal(&layout::otk_by_id(dev, id), &secret(i)));
            db.insert(layout::otk_by_id(dev, id), value).unwrap();
            db.insert(
                layout::legacy_otk_by_public(dev, &public(i)),
                &id.to_be_bytes(),
            )
            .unwrap();
        }
        db.insert(
            layout::legacy_otk_by_public(&devices[0], &[0xEE; 32]),
            &(FIRST_KEY_ID + 999_999).to_be_bytes(),
        )
        .unwrap();
        // r/: plain, cross-signed, cross-signed and scheduled, and one
        // scheduled without an account.
        let registry: [&[u8]; 4] = [
            &[],
            &[1],
            &[1, 0, 0, 0, 0, 0, 0, 0x13, 0x88],
            &[0, 0, 0, 0, 0, 0, 0, 0x1B, 0x58],
        ];
        for (dev, value) in devices.iter().zip(registry) {
            db.insert(layout::puppet(dev), value).unwrap();
        }
        db.insert(layout::rotation(5_000, &devices[2]), &[][..])
            .unwrap();
        db.insert(layout::rotation(7_000, &devices[3]), &[][..])
            .unwrap();
        db.insert(layout::KEY_IDS, &(FIRST_KEY_ID + KEYS + 10).to_be_bytes())
            .unwrap();
        db.insert(layout::SCHEMA, &3u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }

    /// A store created by this build, then rewritten as schema 3 left it
    /// ([`write_schema_3`]) for four devices: its directory (the store is
    /// `store` in it), key, id and devices.
    fn schema_3_store() -> (tempfile::TempDir, StoreKey, crate::StoreId, Vec<DeviceKey>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::generate();
        let id = SledStore::create(SledStoreConfig::new(&path, key.clone()))
            .unwrap()
            .id();
        let devices: Vec<DeviceKey> = ["A", "B", "C", "D"]
            .iter()
            .map(|d| DeviceKey::new("@puppet:hs", d))
            .collect();
        write_schema_3(&path, &key, &devices);
        (dir, key, id, devices)
    }

    fn old_records_left(db: &sled::Db) -> (usize, usize, usize) {
        let old_keys = db
            .scan_prefix(layout::OTK_PREFIX)
            .keys()
            .filter(|k| {
                let k = k.as_ref().unwrap();
                let (_, suffix) = DeviceKey::split_front(&k[2..]).unwrap();
                suffix.len() == 8
            })
            .count();
        let index = db.scan_prefix(layout::LEGACY_OTK_INDEX_PREFIX).count();
        let registry = db.scan_prefix(layout::PUPPET_PREFIX).count();
        (old_keys, index, registry)
    }

    fn check_upgraded(store: &SledStore, devices: &[DeviceKey]) {
        let schema = store.db.get(layout::SCHEMA).unwrap().unwrap();
        assert_eq!(schema.as_ref(), &4u32.to_be_bytes());
        assert!(
            store.db.get(layout::UPGRADING).unwrap().is_none(),
            "the upgrade is still marked under way"
        );
        // Every key resolves by public key, with its id and secret, once.
        for i in 0..KEYS {
            let dev = &devices[(i % 2) as usize];
            let k = store
                .one_time_key(dev, &public(i))
                .unwrap()
                .unwrap_or_else(|| panic!("key {i} lost"));
            assert_eq!(
                (k.key_id, *k.secret_key),
                (FIRST_KEY_ID + i, secret(i)),
                "key {i}"
            );
            let other = &devices[1 - (i % 2) as usize];
            assert!(store.one_time_key(other, &public(i)).unwrap().is_none());
        }
        for (d, dev) in devices[..2].iter().enumerate() {
            assert_eq!(store.count_one_time_keys(dev).unwrap(), (KEYS / 2) as usize);
            let oldest: Vec<u64> = store
                .oldest_one_time_keys(dev, 3)
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let d = d as u64;
            assert_eq!(
                oldest,
                vec![FIRST_KEY_ID + d, FIRST_KEY_ID + d + 2, FIRST_KEY_ID + d + 4]
            );
        }
        assert_eq!(
            old_records_left(&store.db),
            (0, 0, 1),
            "only r/ of the device without an account stays"
        );
        // The registry: every device, its flag, its schedule; accounts intact.
        assert_eq!(store.puppets().unwrap(), {
            let mut all = devices.to_vec();
            all.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            all
        });
        let flags: Vec<bool> = devices
            .iter()
            .map(|d| store.is_cross_signed(d).unwrap())
            .collect();
        assert_eq!(flags, vec![false, true, true, false]);
        assert!(devices.iter().all(|d| store.contains_puppet(d).unwrap()));
        assert_eq!(
            store.due_rotations(u64::MAX, None, 10).unwrap(),
            vec![(devices[2].clone(), 5_000), (devices[3].clone(), 7_000)]
        );
        for dev in &devices[..3] {
            let account = store.load_account(dev).unwrap().unwrap();
            assert_eq!(
                (account.version, account.data.as_slice()),
                (Version(1), &b"account"[..])
            );
        }
        // New ids continue above every id the old store handed out.
        assert!(store.reserve_key_ids(1).unwrap() >= FIRST_KEY_ID + KEYS + 10);
    }

    /// A schema 3 store holding outstanding keys (more than one batch) and
    /// puppet records, whose upgrade is cut short after two batches, as by
    /// a crash: the store then says schema 4 with the upgrade marked under
    /// way (a schema 3 build refuses it), and the next open finishes it. Every key then resolves by its
    /// public key with its original id and secret, exactly once, no old
    /// record or index entry is left, every puppet keeps its flag and its
    /// schedule, and a later open changes nothing.
    #[test]
    fn an_interrupted_upgrade_from_schema_3_is_finished_at_the_next_open_and_keeps_every_key_and_puppet()
     {
        let (dir, key, id, devices) = schema_3_store();
        let path = dir.path().join("store");
        {
            // What open does first, then two batches of the upgrade.
            let db = sled::open(&path).unwrap();
            begin(&db, 3).unwrap();
            let finished = run(&db, &key.cipher(), &mut 2).unwrap();
            assert!(!finished, "the upgrade should have been cut short");
            let (old_keys, index, registry) = old_records_left(&db);
            assert!(
                old_keys > 0 && old_keys < KEYS as usize,
                "cut mid-way: {old_keys} old key records left"
            );
            assert_eq!((index, registry), (old_keys + 1, 4));
            // A build of schema 3 refuses the half-converted store.
            let schema = db.get(layout::SCHEMA).unwrap().unwrap();
            assert_eq!(schema.as_ref(), &4u32.to_be_bytes());
            let mark = db.get(layout::UPGRADING).unwrap().unwrap();
            assert_eq!(mark.as_ref(), &3u32.to_be_bytes());
            db.flush().unwrap();
        }
        let config = SledStoreConfig::new(&path, key.clone()).expect_id(id);
        let store = SledStore::open(config.clone()).unwrap();
        check_upgraded(&store, &devices);
        drop(store);
        let store = SledStore::open(config).unwrap();
        check_upgraded(&store, &devices);
    }

    /// A schema 3 store with one damaged one-time key record (its sealed
    /// secret no longer opens): the upgrade refuses it before writing
    /// anything, so the store still says schema 3 (the build that wrote it
    /// still opens it), has no upgrade mark, and every record is as it was.
    #[test]
    fn a_schema_3_store_with_an_unreadable_key_is_refused_before_the_upgrade_changes_anything() {
        let (dir, key, id, devices) = schema_3_store();
        let path = dir.path().join("store");
        let before: Vec<(sled::IVec, sled::IVec)> = {
            let db = sled::open(&path).unwrap();
            // Flip a byte of the last key's sealed secret.
            let damaged = layout::otk_by_id(&devices[1], FIRST_KEY_ID + KEYS - 1);
            let mut value = db.get(&damaged).unwrap().unwrap().to_vec();
            *value.last_mut().unwrap() ^= 1;
            db.insert(&damaged, value).unwrap();
            db.flush().unwrap();
            db.iter().map(|r| r.unwrap()).collect()
        };
        let config = SledStoreConfig::new(&path, key.clone()).expect_id(id);
        let Err(err) = SledStore::open(config) else {
            panic!("a damaged key must refuse the upgrade");
        };
        assert!(
            matches!(&err, StoreError::Corrupt { what } if what.contains("one-time key secret")),
            "{err:?}"
        );
        let db = sled::open(&path).unwrap();
        let after: Vec<(sled::IVec, sled::IVec)> = db.iter().map(|r| r.unwrap()).collect();
        assert_eq!(after.len(), before.len());
        assert!(after == before, "the refused upgrade changed records");
        assert_eq!(
            db.get(layout::SCHEMA).unwrap().unwrap().as_ref(),
            &3u32.to_be_bytes()
        );
    }
}
