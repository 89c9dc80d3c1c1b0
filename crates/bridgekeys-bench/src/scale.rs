//! The `scale` scenario: claim latency with 1 000, 100 000 and 1 000 000
//! provisioned devices.
//!
//! For each size a fresh store gets that many real accounts (vodozemac
//! identity keys, written through [`AccountManager::create_devices`](bridgekeys_olm::AccountManager::create_devices), no
//! homeserver). Once all are provisioned, each store in turn is reopened, as
//! after a restart, so the account cache starts cold, and claims go to
//! devices picked uniformly at random: with a million devices almost every
//! claim is the first touch of its device and must load it from the store.
//!
//! With [`run_postgres`] the stores are databases of one PostgreSQL server,
//! each reopened as a new [`PgStore`] before its
//! claims: a cold load there is a trip to the server, not a file read.

use std::{path::Path, sync::Arc, time::Instant};

use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{PgStore, PgStoreConfig, StoreKey};
use serde::Serialize;

use crate::{
    pg::Server,
    progress::Progress,
    support::{claim_load, create_puppets_reporting, open_manager, percentile_ms},
};

/// Knobs of the `scale` scenario.
#[derive(Clone, Debug)]
pub struct ScaleBench {
    /// Numbers of provisioned devices to measure, in order.
    pub sizes: Vec<usize>,
    /// Claims measured per size (1 key each).
    pub claims: usize,
    /// Concurrent claimers.
    pub concurrency: usize,
    /// Where the stores go (a temporary directory per size inside it).
    pub dir: std::path::PathBuf,
}

/// Figures of one size.
#[derive(Debug, Serialize)]
pub struct ScalePoint {
    /// Provisioned devices.
    pub devices: usize,
    /// Seconds to create them (durably).
    pub provision_s: f64,
    /// Claims measured.
    pub claims: usize,
    /// Durable claims per second.
    pub claims_per_s: f64,
    /// Median claim latency.
    pub p50_ms: f64,
    /// 99th percentile claim latency.
    pub p99_ms: f64,
    /// Devices read from the store during the load because they were not
    /// cached (`ManagerStats::device_loads`; claims arriving together for
    /// one device read it once).
    pub cold_loads: usize,
}

/// Figures of one `scale` run.
#[derive(Debug, Serialize)]
pub struct ScaleReport {
    /// Every size measured.
    pub points: Vec<ScalePoint>,
    /// p99 with 1 000 devices, if measured.
    pub p99_ms_1k: Option<f64>,
    /// p99 with 100 000 devices, if measured.
    pub p99_ms_100k: Option<f64>,
    /// p99 with 1 000 000 devices, if measured.
    pub p99_ms_1m: Option<f64>,
    /// p99 of the largest size over p99 of the smallest
    /// (`p99_ms_1m / p99_ms_1k` with the default sizes).
    pub scale_ratio: f64,
}

/// Run the scenario.
pub async fn run(config: &ScaleBench) -> anyhow::Result<ScaleReport> {
    std::fs::create_dir_all(&config.dir)?;
    // Provision every size first, then measure the claim loads back to back:
    // the loads take seconds and the provisioning minutes, and this
    // machine's speed drifts over minutes, so the p99s are compared under
    // the same conditions.
    let mut stores = Vec::new();
    for &devices in &config.sizes {
        let dir = tempfile::tempdir_in(&config.dir)?;
        let key = StoreKey::generate();
        let provision_s = provision(dir.path(), &key, devices).await?;
        stores.push((devices, dir, key, provision_s));
    }
    // Let the kernel finish writing the new stores back first, so that
    // writeback does not compete with the first load measured.
    std::process::Command::new("sync").status()?;
    let mut points = Vec::new();
    for (devices, dir, key, provision_s) in &stores {
        // Reopen, as after a restart: nothing cached.
        let manager = Arc::new(open_manager(dir.path(), key)?);
        points.push(measure(manager, *devices, *provision_s, config).await?);
    }
    drop(stores);
    Ok(report(points))
}

/// Run the scenario on PostgreSQL: one fresh database of `server` per
/// size, provisioned, then each reopened in turn and measured.
pub async fn run_postgres(config: &ScaleBench, server: &Server) -> anyhow::Result<ScaleReport> {
    let mut stores = Vec::new();
    for &devices in &config.sizes {
        let url = server.fresh_database(&format!("scale{devices}")).await?;
        let key = StoreKey::generate();
        let manager = Arc::new(AccountManager::new(
            crate::pg::create_store(&url, &key).await?,
            ManagerConfig::default(),
        ));
        let started = Instant::now();
        let progress = Progress::new("scale: provisioned", "devices", devices);
        create_puppets_reporting(&manager, devices, Some(progress)).await?;
        stores.push((devices, url, key, started.elapsed().as_secs_f64()));
    }
    let mut points = Vec::new();
    for (devices, url, key, provision_s) in stores {
        // A new store and manager, as after a restart: nothing cached.
        let config_pg = PgStoreConfig::new(&url, key);
        let store = tokio::task::spawn_blocking(move || PgStore::open(config_pg)).await??;
        let manager = Arc::new(AccountManager::new(
            Arc::new(store),
            ManagerConfig::default(),
        ));
        points.push(measure(manager, devices, provision_s, config).await?);
    }
    Ok(report(points))
}

/// The claim load on a freshly opened manager.
async fn measure(
    manager: Arc<AccountManager>,
    devices: usize,
    provision_s: f64,
    config: &ScaleBench,
) -> anyhow::Result<ScalePoint> {
    let (latencies, elapsed) =
        claim_load(&manager, devices, config.claims, config.concurrency).await?;
    // The manager's own count of account records read from the store
    // (concurrent claims of one device read it once).
    let cold_loads = manager.stats().device_loads as usize;
    Ok(ScalePoint {
        devices,
        provision_s,
        claims: latencies.len(),
        claims_per_s: latencies.len() as f64 / elapsed,
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        cold_loads,
    })
}

fn report(points: Vec<ScalePoint>) -> ScaleReport {
    let p99_at = |n: usize| points.iter().find(|p| p.devices == n).map(|p| p.p99_ms);
    let scale_ratio = match (points.first(), points.last()) {
        (Some(small), Some(large)) if small.p99_ms > 0.0 => large.p99_ms / small.p99_ms,
        _ => 0.0,
    };
    ScaleReport {
        p99_ms_1k: p99_at(1_000),
        p99_ms_100k: p99_at(100_000),
        p99_ms_1m: p99_at(1_000_000),
        scale_ratio,
        points,
    }
}

/// Create `devices` accounts in a new store at `dir`. Returns the seconds
/// it took.
async fn provision(dir: &Path, key: &StoreKey, devices: usize) -> anyhow::Result<f64> {
    let manager = Arc::new(open_manager(dir, key)?);
    let started = Instant::now();
    let progress = Progress::new("scale: provisioned", "devices", devices);
    create_puppets_reporting(&manager, devices, Some(progress)).await?;
    Ok(started.elapsed().as_secs_f64())
}
