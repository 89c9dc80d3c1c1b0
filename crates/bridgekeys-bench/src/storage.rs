//! The `storage` scenario: bytes on disk per idle provisioned device, against
//! the usual alternative of 50 one-time keys uploaded per device.
//!
//! Each device goes through the state the provisioner leaves it in, minus
//! the homeserver calls: account created, fallback key generated and marked
//! published, device recorded in the puppet registry. Then the store is
//! closed, opened once more and closed again (sled settles its log on
//! open), and the files are measured: allocated blocks, not apparent sizes.
//! An empty store, measured the same way, is subtracted.
//!
//! Beside it, the engine's floor for the same records: every entry of the
//! provisioned store copied once into a fresh sled database and measured
//! the same way. The difference is what rewriting a device's account
//! during provisioning leaves behind (sled keeps a dead version until it
//! cleans its segment).
//!
//! The alternative is computed, not run, and is generous to it: the
//! homeserver side is the bytes PostgreSQL itself needs for Synapse's rows
//! (`e2e_one_time_keys_json` and its unique index) with no page fill
//! factor, bloat or WAL; the bridge side is the growth of the vodozemac
//! account pickle that must keep the 50 private keys (postcard, sealed).
//! Both use real keys signed as a client signs them.
//!
//! The uploaded pool (homeservers that do not proxy claims) is measured
//! beside both: a second store whose devices each also hold a pool of
//! one-time keys made by the account manager (as `KeyPool` makes them),
//! its bridge side measured like the idle store, its homeserver side
//! computed like the alternative's (the same rows, fewer of them). A
//! device that was never contacted has no pool: it costs what an on-demand
//! device costs.

use std::{path::Path, sync::Arc, time::Instant};

use bridgekeys_olm::{AccountManager, sign_json};
use bridgekeys_store::StoreKey;
use serde::Serialize;
use vodozemac::olm::Account;

use crate::{
    progress::Progress,
    support::{in_chunks_reporting, open_store, puppet},
};

/// Knobs of the `storage` scenario.
#[derive(Clone, Debug)]
pub struct StorageBench {
    /// Devices to provision.
    pub devices: usize,
    /// Where the store goes (a temporary directory inside it).
    pub dir: std::path::PathBuf,
    /// Keys per contacted device in the uploaded pool (`KeyPool`'s default
    /// is 10).
    pub pool_size: usize,
}

/// What an uploaded pool costs per contacted device (idle devices that were
/// never contacted have none).
#[derive(Debug, Serialize)]
pub struct PoolCost {
    /// Keys in the pool.
    pub keys_per_device: usize,
    /// Bridge side, measured: the pool keys' records (private halves,
    /// sealed) per device, over an idle device.
    pub bridge_bytes: f64,
    /// Homeserver side, computed: keys x (row + index), as for the
    /// alternative.
    pub homeserver_bytes: usize,
    /// An idle device plus both sides.
    pub total_bytes_per_device: f64,
}

/// What the alternative (50 uploaded one-time keys per device) costs.
#[derive(Debug, Serialize)]
pub struct UploadedKeysAlternative {
    /// Keys uploaded per device.
    pub keys_per_device: usize,
    /// One signed key as the client uploads it (JSON bytes).
    pub key_json_bytes: usize,
    /// One `e2e_one_time_keys_json` row in PostgreSQL: tuple header, item
    /// pointer and the column values (user, device, algorithm, key id,
    /// timestamp, key JSON).
    pub homeserver_row_bytes: usize,
    /// Its entry in the unique index on (user, device, algorithm, key id).
    pub homeserver_index_bytes: usize,
    /// Bridge side: growth of the sealed account record holding the keys'
    /// private halves until they are used.
    pub bridge_bytes: usize,
    /// Per device on top of an idle device's own state:
    /// keys x (row + index) + bridge bytes.
    pub extra_bytes_per_device: usize,
    /// Our measured idle device plus that extra.
    pub total_bytes_per_device: usize,
}

/// Figures of one `storage` run.
#[derive(Debug, Serialize)]
pub struct StorageReport {
    /// Devices provisioned.
    pub devices: usize,
    /// Seconds to provision them.
    pub provision_s: f64,
    /// Allocated bytes of the settled store's files.
    pub store_bytes: u64,
    /// Allocated bytes of an empty store, settled the same way.
    pub empty_store_bytes: u64,
    /// (store_bytes - empty_store_bytes) / devices.
    pub bytes_per_device: f64,
    /// The records themselves (keys and values as handed to sled, without
    /// its per-entry and page costs) per idle device, over an empty store.
    pub record_bytes_per_device: f64,
    /// Entries in the tree per idle device, over an empty store.
    pub entries_per_device: f64,
    /// The same records, each written once: the provisioned store's
    /// entries copied into a fresh sled database in random order, flushed
    /// every [`COPY_FLUSH_EVERY`] writes, settled and measured like the
    /// store (over an empty store copied the same way). What sled itself
    /// needs for these records: provisioning writes a device's account
    /// several times, and sled 0.34 keeps dead versions until it cleans a
    /// segment, so `bytes_per_device` minus this is the cost of the
    /// rewrites. One write pattern (shuffled, plain inserts), not a proven
    /// lower bound: the engine's floor for these records as far as this
    /// measures it.
    pub written_once_bytes_per_device: f64,
    /// The 50-uploaded-keys alternative, computed.
    pub alternative: UploadedKeysAlternative,
    /// The uploaded pool of a contacted device.
    pub pool: PoolCost,
}

/// Run the scenario.
pub async fn run(config: &StorageBench) -> anyhow::Result<StorageReport> {
    std::fs::create_dir_all(&config.dir)?;
    let empty = tempfile::tempdir_in(&config.dir)?;
    let key = StoreKey::generate();
    drop(open_store(empty.path(), &key)?);
    let empty_store_bytes = settle_and_measure(empty.path(), &key)?;

    let dir = tempfile::tempdir_in(&config.dir)?;
    let provision_s = provision(dir.path(), &key, config.devices, 0).await?;
    let store_bytes = settle_and_measure(dir.path(), &key)?;
    let per_device_over =
        |bytes: u64, empty: u64| bytes.saturating_sub(empty) as f64 / config.devices.max(1) as f64;
    let per_device = |bytes: u64| per_device_over(bytes, empty_store_bytes);
    let (empty_entries, empty_records) = records(empty.path(), &key)?;
    let (entries, record_bytes) = records(dir.path(), &key)?;
    let devices = config.devices.max(1) as f64;
    let record_bytes_per_device = record_bytes.saturating_sub(empty_records) as f64 / devices;
    let entries_per_device = entries.saturating_sub(empty_entries) as f64 / devices;
    let bytes_per_device = per_device(store_bytes);
    let written_once_bytes_per_device = {
        let empty_copy = tempfile::tempdir_in(&config.dir)?;
        let copy = tempfile::tempdir_in(&config.dir)?;
        let empty_bytes = copy_once(&empty.path().join("store"), empty_copy.path())?;
        per_device_over(
            copy_once(&dir.path().join("store"), copy.path())?,
            empty_bytes,
        )
    };
    let alternative = uploaded_keys_alternative(50, bytes_per_device.round() as usize)?;
    drop(dir);

    let pooled = tempfile::tempdir_in(&config.dir)?;
    provision(pooled.path(), &key, config.devices, config.pool_size).await?;
    let pooled_bytes = per_device(settle_and_measure(pooled.path(), &key)?);
    let bridge_bytes = (pooled_bytes - bytes_per_device).max(0.0);
    let homeserver_bytes =
        config.pool_size * (alternative.homeserver_row_bytes + alternative.homeserver_index_bytes);
    let pool = PoolCost {
        keys_per_device: config.pool_size,
        bridge_bytes,
        homeserver_bytes,
        total_bytes_per_device: bytes_per_device + bridge_bytes + homeserver_bytes as f64,
    };
    Ok(StorageReport {
        pool,
        devices: config.devices,
        provision_s,
        store_bytes,
        empty_store_bytes,
        bytes_per_device,
        record_bytes_per_device,
        entries_per_device,
        written_once_bytes_per_device,
        alternative,
    })
}

/// Writes between flushes when records are copied once: about what the
/// provisioning's sixteen tasks, each waiting for its durable write, give
/// one flush.
pub const COPY_FLUSH_EVERY: usize = 16;

/// Copy every entry of every tree of the (closed) sled database at `from`
/// into a fresh one at `to`, each written once, in an order shuffled with
/// a fixed seed; settle it as the store is settled (close, open, close)
/// and return its allocated bytes.
fn copy_once(from: &Path, to: &Path) -> anyhow::Result<u64> {
    use rand::{SeedableRng, seq::SliceRandom};
    let open = |path: &Path| sled::Config::new().path(path).flush_every_ms(None).open();
    let mut entries = Vec::new();
    {
        let source = open(from)?;
        for name in source.tree_names() {
            for entry in source.open_tree(&name)?.iter() {
                let (k, v) = entry?;
                entries.push((name.clone(), k, v));
            }
        }
    }
    entries.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let target_path = to.join("store");
    {
        let target = open(&target_path)?;
        for (i, (tree, k, v)) in entries.into_iter().enumerate() {
            target.open_tree(&tree)?.insert(k, v)?;
            if (i + 1) % COPY_FLUSH_EVERY == 0 {
                target.flush()?;
            }
        }
        target.flush()?;
    }
    drop(open(&target_path)?);
    allocated_bytes(&target_path)
}

/// Entries and bytes of keys and values in the store at `dir`.
fn records(dir: &Path, key: &StoreKey) -> anyhow::Result<(u64, u64)> {
    let store = open_store(dir, key)?;
    let sizes = store.record_sizes()?;
    Ok(sizes
        .values()
        .fold((0, 0), |(n, b), (entries, bytes)| (n + entries, b + bytes)))
}

/// Provision `devices` as the provisioner would (without the homeserver),
/// each with `pool_keys` one-time keys made for an uploaded pool.
async fn provision(
    dir: &Path,
    key: &StoreKey,
    devices: usize,
    pool_keys: usize,
) -> anyhow::Result<f64> {
    let store = open_store(dir, key)?;
    let manager = Arc::new(AccountManager::new(store.clone(), Default::default()));
    let started = Instant::now();
    let work_manager = manager.clone();
    let what = if pool_keys > 0 {
        format!("storage: provisioned (pool of {pool_keys} keys)")
    } else {
        "storage: provisioned (idle)".to_owned()
    };
    let progress = Progress::new(what, "devices", devices);
    // Many tasks: after its batch's creation, each device waits for two
    // durable writes in turn.
    in_chunks_reporting(devices, 16, Some(progress), move |ids| {
        let manager = work_manager.clone();
        async move {
            manager
                .create_devices(ids.iter().map(|(u, d)| (u.as_ref(), d.as_ref())))
                .await?;
            for (user, device) in &ids {
                let now = bridgekeys_olm::fallback::now_millis();
                // As the provisioner: the key persisted with the device
                // recorded in the puppet registry, due at once (one write of
                // the account), then published with its next step
                // scheduled at the policy's time (one more).
                let fallback = manager
                    .fallback_key_for_upload_and_record_puppet(user, device, now, now)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no fallback key to upload"))?;
                manager
                    .mark_fallback_published_and_schedule(
                        user,
                        device,
                        &fallback.key_id,
                        now,
                        &Default::default(),
                    )
                    .await?;
                if pool_keys > 0 {
                    manager
                        .claim(
                            user,
                            device,
                            &ruma::OneTimeKeyAlgorithm::SignedCurve25519,
                            pool_keys,
                        )
                        .await?;
                }
            }
            Ok(())
        }
    })
    .await?;
    manager.store().sync().durable().await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Close, reopen once, close; then the allocated bytes of every file.
fn settle_and_measure(dir: &Path, key: &StoreKey) -> anyhow::Result<u64> {
    drop(open_store(dir, key)?);
    allocated_bytes(&dir.join("store"))
}

pub(crate) fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            allocated_bytes(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(total)
}

/// PostgreSQL's heap tuple header (23 bytes, aligned to 8) and item pointer.
const PG_TUPLE_OVERHEAD: usize = 24 + 4;
/// An index tuple's header and its item pointer in the index page.
const PG_INDEX_OVERHEAD: usize = 8 + 4;

/// A text value as PostgreSQL stores it: 1-byte length header up to 126
/// bytes, 4-byte header beyond.
fn pg_text(len: usize) -> usize {
    len + if len < 127 { 1 } else { 4 }
}

fn uploaded_keys_alternative(
    keys: usize,
    idle_device_bytes: usize,
) -> anyhow::Result<UploadedKeysAlternative> {
    let (user, device) = puppet(123_456)?;
    let mut account = Account::new();
    let before = postcard_size(&account)?;
    account.generate_one_time_keys(keys);
    let after = postcard_size(&account)?;
    // One key as the client uploads it and Synapse stores it (`key_json`).
    let (key_id, public) = account
        .one_time_keys()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no key generated"))?;
    let unsigned = serde_json::json!({ "key": public.to_base64() });
    let signature = sign_json(&account, &unsigned)?;
    let signed = serde_json::json!({
        "key": public.to_base64(),
        "signatures": { user.as_str(): { format!("ed25519:{device}"): signature } },
    });
    let key_json_bytes = serde_json::to_string(&signed)?.len();
    let key_id = key_id.to_base64();
    let algorithm = "signed_curve25519";
    let index_key = pg_text(user.as_str().len())
        + pg_text(device.as_str().len())
        + pg_text(algorithm.len())
        + pg_text(key_id.len());
    let homeserver_row_bytes = PG_TUPLE_OVERHEAD + index_key + 8 + pg_text(key_json_bytes);
    let homeserver_index_bytes = PG_INDEX_OVERHEAD + index_key;
    let bridge_bytes = after.saturating_sub(before);
    let extra = keys * (homeserver_row_bytes + homeserver_index_bytes) + bridge_bytes;
    Ok(UploadedKeysAlternative {
        keys_per_device: keys,
        key_json_bytes,
        homeserver_row_bytes,
        homeserver_index_bytes,
        bridge_bytes,
        extra_bytes_per_device: extra,
        total_bytes_per_device: idle_device_bytes + extra,
    })
}

fn postcard_size(account: &Account) -> anyhow::Result<usize> {
    Ok(postcard::to_allocvec(&account.pickle())?.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn copying_once_keeps_every_entry_of_every_tree_and_takes_less_than_a_store_of_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        {
            let db = sled::open(&from).unwrap();
            let other = db.open_tree("other").unwrap();
            for i in 0u32..2_000 {
                // Each key rewritten ten times: only the last value counts.
                for round in 0u8..10 {
                    db.insert(i.to_be_bytes(), vec![round; 200]).unwrap();
                }
                other.insert(i.to_le_bytes(), &b"x"[..]).unwrap();
            }
            db.flush().unwrap();
        }
        let to = dir.path().join("to");
        let copied = copy_once(&from, &to).unwrap();
        let rewritten = allocated_bytes(&from).unwrap();
        assert!(
            copied < rewritten,
            "a copy of live entries ({copied} bytes) is smaller than a store of rewrites ({rewritten})"
        );
        let db = sled::open(to.join("store")).unwrap();
        assert_eq!(db.len(), 2_000);
        assert_eq!(db.open_tree("other").unwrap().len(), 2_000);
        for i in 0u32..2_000 {
            assert_eq!(db.get(i.to_be_bytes()).unwrap().unwrap(), vec![9u8; 200]);
        }
    }
}
