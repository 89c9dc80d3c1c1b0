//! The `manager` scenario: raw vodozemac generate+sign throughput against
//! durable account-manager claims, measured in the same run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bridgekeys_olm::{AccountManager, ManagerConfig, sign_json};
use bridgekeys_store::StoreKey;
use serde::Serialize;
use vodozemac::olm::Account;

use crate::{
    pg::{GOAL_POSTGRES_TO_SLED, PgBench, Server},
    support::{claim_load, open_manager, percentile_ms, puppet},
};

/// Knobs of the `manager` scenario.
#[derive(Clone, Debug)]
pub struct ManagerBench {
    /// Provisioned puppet devices.
    pub devices: usize,
    /// Concurrent claimers.
    pub concurrency: usize,
    /// Claims to measure (1 key each).
    pub claims: usize,
    /// Seconds per raw measurement.
    pub raw_seconds: f64,
    /// Where the store goes (a temporary directory inside it).
    pub dir: std::path::PathBuf,
}

/// Figures of one `manager` run.
#[derive(Debug, Serialize)]
pub struct ManagerReport {
    /// Cores (threads) used for the all-core raw figure.
    pub threads: usize,
    /// vodozemac generate + sign, keys/s on one thread.
    pub raw_keys_per_s_1t: f64,
    /// vodozemac generate + sign, keys/s on all cores.
    pub raw_keys_per_s_all: f64,
    /// Devices provisioned.
    pub devices: usize,
    /// Seconds to provision them (durably).
    pub provision_s: f64,
    /// Concurrent claimers.
    pub concurrency: usize,
    /// Claims measured.
    pub claims: usize,
    /// Durable claims per second (1 key each).
    pub manager_claims_per_s: f64,
    /// Median claim latency.
    pub manager_p50_ms: f64,
    /// 99th percentile claim latency.
    pub manager_p99_ms: f64,
    /// Claims answered per `fsync` (group commit at work).
    pub claims_per_flush: f64,
    /// manager_claims_per_s / raw_keys_per_s_all.
    pub ratio_to_raw: f64,
    /// The same load on a PostgreSQL store, measured in the same run
    /// (`--store postgres`); the figures above are sled's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PgClaims>,
}

/// The `manager` load on a PostgreSQL store, beside sled's.
#[derive(Debug, Serialize)]
pub struct PgClaims {
    /// Where the server is (a local one shares the machine's cores).
    pub server: String,
    /// Connections per pool of the store (its default).
    pub pool_size: usize,
    /// Seconds to provision the devices (durably).
    pub provision_s: f64,
    /// Claims measured.
    pub claims: usize,
    /// Durable claims per second (1 key each), one process.
    pub claims_per_s: f64,
    /// Median claim latency.
    pub p50_ms: f64,
    /// 99th percentile claim latency.
    pub p99_ms: f64,
    /// Claims answered per group-commit flush (synchronous commit).
    pub claims_per_flush: f64,
    /// claims_per_s / raw_keys_per_s_all.
    pub ratio_to_raw: f64,
    /// claims_per_s / sled's manager_claims_per_s.
    pub postgres_to_sled: f64,
    /// The goal of `postgres_to_sled`.
    pub goal_postgres_to_sled: f64,
    /// Whether it is met.
    pub goal_met: bool,
    /// Several processes on the database against one (`--processes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<crate::pg::ProcessesReport>,
}

/// Keys per second of the bare crypto: generate one OTK, sign its canonical
/// `{"key": ...}` object, mark it published; on `threads` threads.
pub fn raw_keys_per_s(threads: usize, seconds: f64) -> f64 {
    let deadline = Duration::from_secs_f64(seconds);
    let total: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut account = Account::new();
                    let start = Instant::now();
                    let mut n = 0usize;
                    while start.elapsed() < deadline {
                        for _ in 0..64 {
                            account.generate_one_time_keys(1);
                            for (_, key) in account.one_time_keys() {
                                let object = serde_json::json!({ "key": key.to_base64() });
                                if sign_json(&account, &object).is_ok() {
                                    n += 1;
                                }
                            }
                            account.mark_keys_as_published();
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    total as f64 / seconds
}

/// The raw crypto figures every scenario compares against.
#[derive(Clone, Copy, Debug)]
pub struct Raw {
    /// Threads of the all-core figure (the machine's cores).
    pub threads: usize,
    /// Keys/s on one thread.
    pub per_s_1t: f64,
    /// Keys/s on all cores.
    pub per_s_all: f64,
}

/// Measure [`raw_keys_per_s`] on one thread and on all cores.
pub fn measure_raw(seconds: f64) -> Raw {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Raw {
        threads,
        per_s_1t: raw_keys_per_s(1, seconds),
        per_s_all: raw_keys_per_s(threads, seconds),
    }
}

/// Run the scenario (sled).
pub async fn run(config: &ManagerBench) -> anyhow::Result<ManagerReport> {
    let raw = measure_raw(config.raw_seconds);
    run_sled(config, raw).await
}

/// Run the scenario on sled and on PostgreSQL, in the same run (one raw
/// figure, the same load on each), and N processes on PostgreSQL.
pub async fn run_compared(config: &ManagerBench, pg: &PgBench) -> anyhow::Result<ManagerReport> {
    let raw = measure_raw(config.raw_seconds);
    let mut report = run_sled(config, raw).await?;
    let server = Server::start(pg.url.clone()).await?;
    let measured = run_postgres(config, pg, &server, &report).await;
    server.clean_up().await;
    report.postgres = Some(measured?);
    Ok(report)
}

async fn run_sled(config: &ManagerBench, raw: Raw) -> anyhow::Result<ManagerReport> {
    std::fs::create_dir_all(&config.dir)?;
    let dir = tempfile::tempdir_in(&config.dir)?;
    let manager = Arc::new(open_manager(dir.path(), &StoreKey::generate())?);
    let m = measure(&manager, config).await?;
    Ok(ManagerReport {
        threads: raw.threads,
        raw_keys_per_s_1t: raw.per_s_1t,
        raw_keys_per_s_all: raw.per_s_all,
        devices: config.devices,
        provision_s: m.provision_s,
        concurrency: config.concurrency,
        claims: m.latencies.len(),
        manager_claims_per_s: m.claims_per_s,
        manager_p50_ms: percentile_ms(&m.latencies, 50.0),
        manager_p99_ms: percentile_ms(&m.latencies, 99.0),
        claims_per_flush: m.claims_per_flush,
        ratio_to_raw: m.claims_per_s / raw.per_s_all,
        postgres: None,
    })
}

async fn run_postgres(
    config: &ManagerBench,
    pg: &PgBench,
    server: &Server,
    sled: &ManagerReport,
) -> anyhow::Result<PgClaims> {
    let url = server.fresh_database("manager").await?;
    let key = StoreKey::generate();
    let store = crate::pg::create_store(&url, &key).await?;
    let id = store.id();
    let manager = Arc::new(AccountManager::new(store, ManagerConfig::default()));
    let m = measure(&manager, config).await?;
    drop(manager);
    let processes = if pg.processes > 1 {
        Some(
            crate::pg::compare_processes(
                server,
                &pg.exe,
                &url,
                &key,
                id,
                config.devices,
                config.claims,
                config.concurrency,
                pg.processes,
            )
            .await?,
        )
    } else {
        None
    };
    let postgres_to_sled = m.claims_per_s / sled.manager_claims_per_s;
    Ok(PgClaims {
        server: server.describe(),
        pool_size: bridgekeys_store::DEFAULT_PG_POOL_SIZE,
        provision_s: m.provision_s,
        claims: m.latencies.len(),
        claims_per_s: m.claims_per_s,
        p50_ms: percentile_ms(&m.latencies, 50.0),
        p99_ms: percentile_ms(&m.latencies, 99.0),
        claims_per_flush: m.claims_per_flush,
        ratio_to_raw: m.claims_per_s / sled.raw_keys_per_s_all,
        postgres_to_sled,
        goal_postgres_to_sled: GOAL_POSTGRES_TO_SLED,
        goal_met: postgres_to_sled >= GOAL_POSTGRES_TO_SLED,
        processes,
    })
}

/// What [`measure`] saw.
struct Measured {
    provision_s: f64,
    latencies: Vec<Duration>,
    claims_per_s: f64,
    claims_per_flush: f64,
}

/// Provision the devices, then the claim load.
async fn measure(manager: &Arc<AccountManager>, config: &ManagerBench) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency {
        let (manager, next, devices) = (manager.clone(), next.clone(), config.devices);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= devices {
                    return anyhow::Ok(());
                }
                let (user, device) = puppet(i)?;
                manager.create_device(&user, &device).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let provision_s = started.elapsed().as_secs_f64();

    let flushes_before = manager.store().commit_stats().flushes;
    let (latencies, elapsed) =
        claim_load(manager, config.devices, config.claims, config.concurrency).await?;
    let flushes = manager.store().commit_stats().flushes - flushes_before;
    Ok(Measured {
        provision_s,
        claims_per_s: latencies.len() as f64 / elapsed,
        claims_per_flush: latencies.len() as f64 / flushes.max(1) as f64,
        latencies,
    })
}
