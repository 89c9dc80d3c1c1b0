//! PostgreSQL-backed claims beside sled-backed ones (issue 15): the server
//! (a throwaway local one from the testkit, or `--postgres-url`), a fresh
//! database per measurement, and the multi-process claim load.
//!
//! The multi-process load: the parent provisions the devices in one
//! database, then starts bridgekeys-bench children (the hidden
//! `pg-claim-child` subcommand) on it. Each child opens the store, loads
//! every device into its cache (a running bridge's steady state), prints
//! `ready`, waits for `go` on stdin, runs its share of the claims and prints
//! one JSON line with its latencies. The parent says `go` to all of them at
//! once and times the window from `go` to the last child's answer. The one-
//! and the N-process runs share the same total load: the same claims and
//! the same claimers in all, split evenly over the processes.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{PgStore, PgStoreConfig, Store, StoreId, StoreKey};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::support::{percentile_ms, puppet, timed_claim_load};

/// The environment variable a child reads the database URL from (not its
/// command line, where `ps` shows the password).
pub const URL_ENV: &str = "BRIDGEKEYS_BENCH_PG_URL";

/// The environment variable a child reads the store key from (hex).
pub const KEY_ENV: &str = "BRIDGEKEYS_BENCH_PG_KEY";

/// The goal of `postgres_to_sled` (issue 15).
pub const GOAL_POSTGRES_TO_SLED: f64 = 0.5;

/// The goal of `processes_to_one` (issue 15).
pub const GOAL_PROCESSES_TO_ONE: f64 = 1.0;

/// What the PostgreSQL side of a run needs.
#[derive(Clone, Debug)]
pub struct PgBench {
    /// An existing server (a URL whose user may `CREATE DATABASE`); `None`:
    /// start a throwaway one on this machine (fsync on).
    pub url: Option<String>,
    /// Processes of the multi-process load (0 or 1: not measured).
    pub processes: usize,
    /// The `bridgekeys-bench` executable (the children).
    pub exe: PathBuf,
}

/// The server the databases are created on.
pub enum Server {
    /// A throwaway server from the testkit, on this machine.
    Local(Box<bridgekeys_testkit::Postgres>),
    /// `--postgres-url`; the databases created are dropped at the end.
    External {
        /// The URL given.
        url: String,
        /// Databases this run created.
        created: std::sync::Mutex<Vec<String>>,
    },
}

impl Server {
    /// Start a local server (fsync on), or use `url`.
    pub async fn start(url: Option<String>) -> anyhow::Result<Self> {
        Ok(match url {
            Some(url) => {
                with_database(&url, "x")?;
                Server::External {
                    url,
                    created: Default::default(),
                }
            }
            None => Server::Local(Box::new(
                bridgekeys_testkit::Postgres::start()
                    .await
                    .context("starting a local PostgreSQL (initdb and postgres from PATH or /usr/lib/postgresql)")?,
            )),
        })
    }

    /// CPU seconds the server has used so far: known for a local server
    /// only.
    pub fn cpu_s(&self) -> Option<f64> {
        match self {
            Server::Local(pg) => pg.server_cpu_s(),
            Server::External { .. } => None,
        }
    }

    /// Where the server is, for the report.
    pub fn describe(&self) -> String {
        match self {
            Server::Local(_) => "local throwaway server (bridgekeys-testkit), same machine, \
                                 sharing its cores with the benchmark; fsync on"
                .to_owned(),
            Server::External { url, .. } => {
                let location = url
                    .parse::<tokio_postgres::Config>()
                    .ok()
                    .and_then(|c| {
                        let host = match c.get_hosts().first()? {
                            tokio_postgres::config::Host::Tcp(h) => h.clone(),
                            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                        };
                        Some(format!("{host}:{}", c.get_ports().first().unwrap_or(&5432)))
                    })
                    .unwrap_or_else(|| "?".to_owned());
                format!("external server at {location} (--postgres-url)")
            }
        }
    }

    /// A new empty database; its URL.
    pub async fn fresh_database(&self, what: &str) -> anyhow::Result<String> {
        let name = format!("bkbench_{what}_{:08x}", rand::random::<u32>());
        match self {
            Server::Local(pg) => Ok(pg.create_database(&name).await?),
            Server::External { url, created } => {
                execute(url, &format!("CREATE DATABASE \"{name}\"")).await?;
                if let Ok(mut created) = created.lock() {
                    created.push(name.clone());
                }
                with_database(url, &name)
            }
        }
    }

    /// Drop the databases this run created on an external server (a local
    /// one goes away whole when dropped). Best effort.
    pub async fn clean_up(&self) {
        if let Server::External { url, created } = self {
            let names = created.lock().map(|c| c.clone()).unwrap_or_default();
            for name in names {
                if let Err(e) = execute(url, &format!("DROP DATABASE IF EXISTS \"{name}\"")).await {
                    eprintln!("postgres: could not drop database {name}: {e:#}");
                }
            }
        }
    }
}

/// Run one statement on `url`.
async fn execute(url: &str, sql: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to --postgres-url")?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .with_context(|| format!("running {sql}"))?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// `url` (a `postgres://` URL) with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = url
        .find("://")
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
        .ok_or_else(|| anyhow::anyhow!("--postgres-url must be a postgres:// URL"))?
        + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let after = &rest[authority_end..];
    let query = after.find('?').map_or("", |q| &after[q..]);
    Ok(format!(
        "{}{}/{name}{query}",
        &url[..scheme_end],
        &rest[..authority_end]
    ))
}

/// Create a PostgreSQL store in the (empty) database at `url`.
pub async fn create_store(url: &str, key: &StoreKey) -> anyhow::Result<Arc<PgStore>> {
    let config = PgStoreConfig::new(url, key.clone());
    let store = tokio::task::spawn_blocking(move || PgStore::create(config)).await??;
    Ok(Arc::new(store))
}

/// One claim load, over one or several processes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessRun {
    /// Processes claiming at once.
    pub processes: usize,
    /// Claims in all (in a [`ProcessesReport`], summed over its
    /// [`ROUNDS`] runs).
    pub claims: usize,
    /// Claimers in all (split over the processes).
    pub claimers: usize,
    /// Seconds from `go` to the last process's answer (in a
    /// [`ProcessesReport`], summed over its [`ROUNDS`] runs).
    pub wall_s: f64,
    /// claims / wall_s.
    pub claims_per_s: f64,
    /// Claims per second while every process was still claiming: the
    /// claims answered before the first process finished its share, over
    /// that time. A bridge's claims are a stream that does not run out, so
    /// this is what the processes sustain together; `claims_per_s` also
    /// counts the end of a fixed load, where the last process to finish
    /// claims alone with only its share of the claimers. The same as
    /// `claims_per_s` for one process.
    pub steady_claims_per_s: f64,
    /// Median claim latency, every process's claims merged.
    pub p50_ms: f64,
    /// 99th percentile claim latency, merged.
    pub p99_ms: f64,
    /// Each process's own load time, seconds, in the order started: how
    /// evenly the processes finished (the window ends with the last). In a
    /// [`ProcessesReport`], summed per process over its runs.
    pub process_s: Vec<f64>,
    /// CPU seconds the claiming processes used during their loads, in all.
    pub processes_cpu_s: Option<f64>,
    /// Commits of claimed keys, every process's added up (in a
    /// [`ProcessesReport`], over its [`ROUNDS`] runs).
    pub flushes: u64,
    /// claims / flushes: how many claims one commit answered on average.
    /// Each process commits its own batches, so N processes split the same
    /// claims into more, smaller commits.
    pub claims_per_flush: f64,
    /// Times the claiming processes' threads were switched out during
    /// their loads (voluntarily: waiting; or not: preempted), per claim.
    /// Every switch is a trip through the kernel's scheduler.
    pub switches_per_claim: Option<f64>,
    /// The switches, in all (see `switches_per_claim`).
    pub context_switches: Option<u64>,
    /// CPU seconds the database server used in the window (a local
    /// server only: `None` for `--postgres-url`).
    pub server_cpu_s: Option<f64>,
    /// Microseconds of CPU per claim: the claiming processes, then the
    /// server (where known).
    pub cpu_us_per_claim: (Option<f64>, Option<f64>),
}

/// N processes claiming on one database against one process.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessesReport {
    /// How the two loads compare.
    pub load: String,
    /// One process.
    pub one: ProcessRun,
    /// N processes.
    pub many: ProcessRun,
    /// many.claims_per_s / one.claims_per_s, over the whole load (the
    /// goal's figure).
    pub processes_to_one: f64,
    /// many.steady_claims_per_s / one.steady_claims_per_s: the same while
    /// every process is claiming, without the uneven end of a fixed load.
    pub steady_to_one: f64,
    /// many / one claims/s of each round alone, in order: how far one
    /// pair of runs can stray from the merged figure.
    pub round_ratios: Vec<f64>,
    /// The goal of `processes_to_one`.
    pub goal: f64,
    /// Whether it is met.
    pub goal_met: bool,
}

/// What one child prints when it is done.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildOutput {
    /// Claims made.
    pub claims: usize,
    /// Seconds its load took.
    pub elapsed_s: f64,
    /// Each claim's latency, microseconds.
    pub latencies_us: Vec<u64>,
    /// When each claim was answered, microseconds from the process's
    /// start (`go`), in the order of `latencies_us`.
    pub done_us: Vec<u64>,
    /// CPU seconds this process used during its load (every thread).
    pub cpu_s: Option<f64>,
    /// Commits of claimed keys this process's store made during its load.
    pub flushes: u64,
    /// Times this process's threads were switched out during its load.
    pub context_switches: Option<u64>,
}

/// The children's share of `total` for child `i` of `n` (at least 1).
fn share(total: usize, i: usize, n: usize) -> usize {
    (total / n + usize::from(i < total % n)).max(1)
}

/// `claims` claims by `claimers` claimers in all, over `processes`
/// children on the store at `url` (id `id`, key `key`), devices
/// `0..devices` provisioned there already.
#[allow(clippy::too_many_arguments)]
pub async fn run_processes(
    server: &Server,
    exe: &Path,
    url: &str,
    key: &StoreKey,
    id: StoreId,
    devices: usize,
    claims: usize,
    claimers: usize,
    processes: usize,
) -> anyhow::Result<(ProcessRun, Vec<Duration>)> {
    let processes = processes.max(1);
    let key_hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let mut children = Vec::new();
    for i in 0..processes {
        let mut child = tokio::process::Command::new(exe)
            .arg("pg-claim-child")
            .arg("--store-id")
            .arg(id.to_string())
            .arg("--devices")
            .arg(devices.to_string())
            .arg("--claims")
            .arg(share(claims, i, processes).to_string())
            .arg("--concurrency")
            .arg(share(claimers, i, processes).to_string())
            .env(URL_ENV, url)
            .env(KEY_ENV, &key_hex)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        children.push((child, stdin, BufReader::new(stdout).lines()));
    }
    for (_, _, lines) in &mut children {
        match lines.next_line().await? {
            Some(l) if l == "ready" => {}
            other => anyhow::bail!("a claim child did not get ready: {other:?}"),
        }
    }
    let server_cpu_before = server.cpu_s();
    let started = Instant::now();
    for (_, stdin, _) in &mut children {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let mut waits = tokio::task::JoinSet::new();
    for (i, (mut child, stdin, mut lines)) in children.into_iter().enumerate() {
        waits.spawn(async move {
            let line = lines
                .next_line()
                .await?
                .ok_or_else(|| anyhow::anyhow!("a claim child ended without its figures"))?;
            let done = started.elapsed();
            let output: ChildOutput = serde_json::from_str(&line)?;
            drop(stdin);
            let status = child.wait().await?;
            anyhow::ensure!(status.success(), "a claim child exited with {status}");
            anyhow::Ok((i, output, done))
        });
    }
    let mut latencies = Vec::with_capacity(claims);
    let mut window = Duration::ZERO;
    let mut total = 0;
    let mut process_s = vec![0.0; processes];
    let mut processes_cpu_s = Some(0.0);
    let mut done_us = Vec::with_capacity(claims);
    let mut flushes = 0;
    let mut context_switches = Some(0);
    while let Some(r) = waits.join_next().await {
        let (i, output, done) = r??;
        total += output.claims;
        window = window.max(done);
        process_s[i] = output.elapsed_s;
        processes_cpu_s = processes_cpu_s.zip(output.cpu_s).map(|(a, b)| a + b);
        flushes += output.flushes;
        context_switches = context_switches
            .zip(output.context_switches)
            .map(|(a, b)| a + b);
        latencies.extend(output.latencies_us.into_iter().map(Duration::from_micros));
        done_us.extend(output.done_us);
    }
    let steady_claims_per_s = steady_rate(&process_s, &done_us);
    // Every child has exited: its backends are reaped or about to be, and
    // either way counted (see `Postgres::server_cpu_s`).
    let server_cpu_s = server_cpu_before
        .zip(server.cpu_s())
        .map(|(before, after)| after - before);
    latencies.sort();
    let wall_s = window.as_secs_f64();
    let per_claim = |cpu: Option<f64>| cpu.map(|c| c * 1e6 / total.max(1) as f64);
    let run = ProcessRun {
        processes,
        claims: total,
        claimers: (0..processes).map(|i| share(claimers, i, processes)).sum(),
        wall_s,
        claims_per_s: total as f64 / wall_s,
        steady_claims_per_s,
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        process_s,
        processes_cpu_s,
        flushes,
        claims_per_flush: total as f64 / flushes.max(1) as f64,
        switches_per_claim: context_switches.map(|s| s as f64 / total.max(1) as f64),
        context_switches,
        server_cpu_s,
        cpu_us_per_claim: (per_claim(processes_cpu_s), per_claim(server_cpu_s)),
    };
    Ok((run, latencies))
}

/// Claims per second while every process was still claiming: the claims
/// answered (`done_us`, from each process's start) by the time the first
/// process finished its share (the least of `process_s`), over that time.
fn steady_rate(process_s: &[f64], done_us: &[u64]) -> f64 {
    let first = process_s.iter().copied().fold(f64::INFINITY, f64::min);
    if !first.is_finite() || first <= 0.0 {
        return 0.0;
    }
    let bound = (first * 1e6) as u64;
    done_us.iter().filter(|&&t| t <= bound).count() as f64 / first
}

/// How many times each of the two loads runs in [`compare_processes`]:
/// one, N, N, one. A virtual machine's speed drifts over minutes (the same
/// one-process load measured 16 800 and 21 600 claims/s a few minutes
/// apart); run once each, one load always first, the drift lands on one
/// side of the ratio. In this order a drift that is steady over the four
/// loads weighs on both sides alike.
pub const ROUNDS: usize = 2;

/// The runs of one load merged: claims and times add up, the percentiles
/// are over every claim, each process's load time is summed per process.
fn merge(runs: Vec<(ProcessRun, Vec<Duration>)>) -> ProcessRun {
    let mut latencies: Vec<Duration> = Vec::new();
    let mut merged: Option<ProcessRun> = None;
    // Steady rates weigh by the time they were measured over (the first
    // process's end), so the merged rate is claims over time too.
    let (mut steady_claims, mut steady_s) = (0.0, 0.0);
    for (run, l) in runs {
        latencies.extend(l);
        let first = run.process_s.iter().copied().fold(f64::INFINITY, f64::min);
        if first.is_finite() {
            steady_claims += run.steady_claims_per_s * first;
            steady_s += first;
        }
        merged = Some(match merged {
            None => run,
            Some(mut m) => {
                m.claims += run.claims;
                m.wall_s += run.wall_s;
                for (a, b) in m.process_s.iter_mut().zip(&run.process_s) {
                    *a += b;
                }
                m.processes_cpu_s = m
                    .processes_cpu_s
                    .zip(run.processes_cpu_s)
                    .map(|(a, b)| a + b);
                m.server_cpu_s = m.server_cpu_s.zip(run.server_cpu_s).map(|(a, b)| a + b);
                m.flushes += run.flushes;
                m.context_switches = m
                    .context_switches
                    .zip(run.context_switches)
                    .map(|(a, b)| a + b);
                m
            }
        });
    }
    let Some(mut m) = merged else {
        return ProcessRun::default();
    };
    latencies.sort();
    m.claims_per_s = m.claims as f64 / m.wall_s;
    m.steady_claims_per_s = if steady_s > 0.0 {
        steady_claims / steady_s
    } else {
        0.0
    };
    m.p50_ms = percentile_ms(&latencies, 50.0);
    m.p99_ms = percentile_ms(&latencies, 99.0);
    m.claims_per_flush = m.claims as f64 / m.flushes.max(1) as f64;
    m.switches_per_claim = m
        .context_switches
        .map(|s| s as f64 / m.claims.max(1) as f64);
    let per_claim = |cpu: Option<f64>| cpu.map(|c| c * 1e6 / m.claims.max(1) as f64);
    m.cpu_us_per_claim = (per_claim(m.processes_cpu_s), per_claim(m.server_cpu_s));
    m
}

/// One process against `processes` on the store at `url`, same total load,
/// each run [`ROUNDS`] times in the order one, N, N, one.
#[allow(clippy::too_many_arguments)]
pub async fn compare_processes(
    server: &Server,
    exe: &Path,
    url: &str,
    key: &StoreKey,
    id: StoreId,
    devices: usize,
    claims: usize,
    claimers: usize,
    processes: usize,
) -> anyhow::Result<ProcessesReport> {
    let (mut ones, mut manys) = (Vec::new(), Vec::new());
    let mut round_ratios = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [1, processes]
        } else {
            [processes, 1]
        };
        let mut rates = [0.0; 2];
        for n in order {
            let (run, latencies) =
                run_processes(server, exe, url, key, id, devices, claims, claimers, n).await?;
            let side = usize::from(n != 1);
            rates[side] = run.claims_per_s;
            if side == 0 {
                ones.push((run, latencies));
            } else {
                manys.push((run, latencies));
            }
        }
        round_ratios.push(rates[1] / rates[0]);
    }
    let one = merge(ones);
    let many = merge(manys);
    let processes_to_one = many.claims_per_s / one.claims_per_s;
    let steady_to_one = many.steady_claims_per_s / one.steady_claims_per_s;
    Ok(ProcessesReport {
        load: format!(
            "the same total load: {claims} claims by {claimers} claimers in all, split evenly \
             over the processes; each process loads every device first; each load run {ROUNDS} \
             times in the order 1, {processes}, {processes}, 1 and merged (claims over summed \
             time); claims/s from the common start to the last process's answer; steady \
             claims/s from the common start to the first process's end"
        ),
        one,
        many,
        processes_to_one,
        steady_to_one,
        round_ratios,
        goal: GOAL_PROCESSES_TO_ONE,
        goal_met: processes_to_one >= GOAL_PROCESSES_TO_ONE,
    })
}

/// The hidden `pg-claim-child` subcommand: see the module docs.
pub async fn child(
    store_id: StoreId,
    devices: usize,
    claims: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let url = std::env::var(URL_ENV).with_context(|| format!("{URL_ENV} not set"))?;
    let hex = std::env::var(KEY_ENV).with_context(|| format!("{KEY_ENV} not set"))?;
    let mut bytes = [0u8; 32];
    anyhow::ensure!(hex.len() == 64, "{KEY_ENV} is not 32 bytes of hex");
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    let config = PgStoreConfig::new(url, StoreKey::new(bytes)).expect_id(store_id);
    let store: Arc<dyn Store> =
        Arc::new(tokio::task::spawn_blocking(move || PgStore::open(config)).await??);
    let manager = Arc::new(AccountManager::new(
        Arc::clone(&store),
        ManagerConfig::default(),
    ));
    for i in 0..devices {
        let (user, device) = puppet(i)?;
        manager.device_keys(&user, &device)?;
    }
    println!("ready");
    let go = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    anyhow::ensure!(go.trim_end() == "go", "expected go, got {go:?}");
    let cpu_before = crate::support::process_cpu_s();
    let switches_before = crate::support::context_switches();
    let flushes_before = store.commit_stats().flushes;
    let (timed, elapsed_s) = timed_claim_load(&manager, devices, claims, concurrency).await?;
    let cpu_s = cpu_before
        .zip(crate::support::process_cpu_s())
        .map(|(before, after)| after - before);
    let output = ChildOutput {
        claims: timed.len(),
        elapsed_s,
        latencies_us: timed.iter().map(|c| c.latency.as_micros() as u64).collect(),
        done_us: timed.iter().map(|c| c.done_at.as_micros() as u64).collect(),
        cpu_s,
        flushes: store.commit_stats().flushes - flushes_before,
        context_switches: switches_before
            .zip(crate::support::context_switches())
            .map(|(before, after)| after.saturating_sub(before)),
    };
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_steady_rate_counts_only_claims_answered_before_the_first_process_finished() {
        // Process A finished at 1 s, B at 2 s: of B's claims only those
        // answered by 1 s count, and the time is 1 s.
        let done_us = [200_000, 900_000, 1_000_000, 500_000, 1_000_001, 1_900_000];
        assert_eq!(steady_rate(&[1.0, 2.0], &done_us), 4.0);
        // One process: every claim, over its own time.
        assert_eq!(steady_rate(&[2.0], &done_us), 3.0);
        assert_eq!(steady_rate(&[], &done_us), 0.0);
    }

    #[test]
    fn merged_runs_count_claims_over_summed_time_and_weigh_steady_rates_by_their_time() {
        let run = |claims: usize, wall_s: f64, steady: f64, process_s: Vec<f64>| ProcessRun {
            processes: process_s.len(),
            claims,
            claimers: 64,
            wall_s,
            claims_per_s: claims as f64 / wall_s,
            steady_claims_per_s: steady,
            process_s,
            processes_cpu_s: Some(1.0),
            server_cpu_s: None,
            flushes: claims as u64 / 10,
            context_switches: Some(claims as u64 / 4),
            ..ProcessRun::default()
        };
        let ms = Duration::from_millis;
        let merged = merge(vec![
            (run(1_000, 1.0, 1_000.0, vec![1.0, 0.5]), vec![ms(1), ms(2)]),
            (run(1_000, 3.0, 400.0, vec![3.0, 1.5]), vec![ms(3), ms(4)]),
        ]);
        // 2 000 claims in 4 s, not the mean of 1 000/s and 333/s.
        assert_eq!(merged.claims, 2_000);
        assert_eq!(merged.claims_per_s, 500.0);
        // 1 000/s over 0.5 s and 400/s over 1.5 s: 1 100 claims in 2 s.
        assert_eq!(merged.steady_claims_per_s, 550.0);
        assert_eq!(merged.process_s, vec![4.0, 2.0]);
        assert_eq!(merged.p99_ms, 4.0);
        assert_eq!(merged.cpu_us_per_claim, (Some(1_000.0), None));
        // Commits and switches add up, and are read per claim over both.
        assert_eq!(merged.flushes, 200);
        assert_eq!(merged.claims_per_flush, 10.0);
        assert_eq!(merged.context_switches, Some(500));
        assert_eq!(merged.switches_per_claim, Some(0.25));
    }

    #[test]
    fn database_is_replaced_in_the_url() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "b").unwrap(),
            "postgres://u:p@h:5432/b"
        );
        assert_eq!(
            with_database("postgresql://h/db?sslmode=disable", "b").unwrap(),
            "postgresql://h/b?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "b").unwrap(),
            "postgres://h/b"
        );
        assert!(with_database("host=h dbname=x", "b").is_err());
    }

    #[test]
    fn shares_add_up() {
        assert_eq!((0..3).map(|i| share(40_000, i, 3)).sum::<usize>(), 40_000);
        assert_eq!(
            (0..3).map(|i| share(64, i, 3)).collect::<Vec<_>>(),
            [22, 21, 21]
        );
        assert_eq!(share(2, 2, 3), 1, "never no claimer");
    }
}
