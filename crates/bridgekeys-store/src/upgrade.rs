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
//! Each batch is applied atomically by sled (after a crash, all of it or
//! none of it), and every step skips what is already done: a record of the
//! new format is recognised by its key (32 bytes after the device, not 8),
//! an `r/` record already folded is gone. So an upgrade cut short anywhere
//! is finished by the next open, which runs it again; the caller writes the
//! new schema version only after all of it is durable. Key ids are copied,
//! never made, and the key-id mark is not touched: no id can repeat.

use zeroize::Zeroizing;

use crate::{DeviceKey, StoreError, crypto::Sealer, layout};

/// Records rewritten per atomic batch.
const BATCH: usize = 1_000;

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("{what} (while upgrading the store to schema 4)"),
    }
}

/// Run every step; see the module docs.
pub(crate) fn to_schema_4(db: &sled::Db, sealer: &Sealer) -> Result<(), StoreError> {
    let keys = convert_one_time_keys(db, sealer)?;
    let index_entries = remove_prefix(db, layout::LEGACY_OTK_INDEX_PREFIX)?;
    let puppets = fold_puppet_records(db)?;
    tracing::info!(
        one_time_keys = keys,
        index_entries_removed = index_entries,
        puppet_records_folded = puppets,
        "upgraded the store's records to schema 4"
    );
    Ok(())
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

/// Step 1: how many keys were rewritten.
fn convert_one_time_keys(db: &sled::Db, sealer: &Sealer) -> Result<u64, StoreError> {
    let mut converted = 0;
    let mut after: Option<sled::IVec> = None;
    loop {
        let chunk = next_chunk(db, layout::OTK_PREFIX, after.as_deref())?;
        let Some((last, _)) = chunk.last() else {
            return Ok(converted);
        };
        after = Some(last.clone());
        let mut batch = sled::Batch::default();
        let mut any = false;
        for (key, value) in &chunk {
            let (device, suffix) = DeviceKey::split_front(&key[layout::OTK_PREFIX.len()..])
                .ok_or_else(|| corrupt("one-time key record key"))?;
            match suffix.len() {
                // Already in the new format.
                32 => continue,
                8 => {}
                _ => return Err(corrupt("one-time key record key")),
            }
            let key_id = u64::from_be_bytes(
                <[u8; 8]>::try_from(suffix).map_err(|_| corrupt("one-time key id"))?,
            );
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
            let mut slot = layout::otk_seal_slot(&device, &public_key, key_id);
            let mut sealed = Vec::with_capacity(8 + crate::crypto::SEAL_OVERHEAD + 32);
            sealed.extend_from_slice(&key_id.to_be_bytes());
            sealer.seal_into(&mut sealed, &slot, &secret);
            if sealed.len() != 8 + crate::crypto::SEAL_OVERHEAD + 32 {
                return Err(corrupt("one-time key (sealing failed)"));
            }
            slot.truncate(layout::otk_key(&slot).len());
            batch.insert(slot, sealed);
            batch.remove(key.clone());
            batch.remove(layout::legacy_otk_by_public(&device, &public_key));
            any = true;
            converted += 1;
        }
        if any {
            db.apply_batch(batch)?;
        }
    }
}

/// Step 2 (and any prefix whose entries all go): how many were removed.
fn remove_prefix(db: &sled::Db, prefix: &[u8]) -> Result<u64, StoreError> {
    let mut removed = 0;
    loop {
        let chunk = next_chunk(db, prefix, None)?;
        if chunk.is_empty() {
            return Ok(removed);
        }
        let mut batch = sled::Batch::default();
        for (key, _) in chunk {
            batch.remove(key);
            removed += 1;
        }
        db.apply_batch(batch)?;
    }
}

/// Step 3: how many registry records moved into their account's header.
fn fold_puppet_records(db: &sled::Db) -> Result<u64, StoreError> {
    let mut folded = 0;
    let mut after: Option<sled::IVec> = None;
    loop {
        let chunk = next_chunk(db, layout::PUPPET_PREFIX, after.as_deref())?;
        let Some((last, _)) = chunk.last() else {
            return Ok(folded);
        };
        after = Some(last.clone());
        let mut batch = sled::Batch::default();
        let mut any = false;
        for (key, value) in &chunk {
            let device = DeviceKey::from_bytes(&key[layout::PUPPET_PREFIX.len()..])
                .ok_or_else(|| corrupt("puppet registry entry"))?;
            let Some(account) = db.get(layout::account(&device))? else {
                // Recorded without an account: stays in the registry.
                continue;
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
            batch.remove(key.clone());
            any = true;
            folded += 1;
        }
        if any {
            db.apply_batch(batch)?;
        }
    }
}
