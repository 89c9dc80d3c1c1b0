//! `bridgekeys-bench all`: every scenario that has a goal, one after the
//! other in one process, in one JSON with each goal's figure and whether it
//! is met, and the charts next to it.
//!
//! A scenario that fails is recorded (its error in `errors`) and the others
//! still run; the binary exits non-zero at the end if any failed. An unmet
//! goal is not a failure: it is what the JSON is for.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use serde::Serialize;

use crate::{
    charts,
    crash::{self, CrashReport},
    http::{self, HttpReport},
    manager::{self, ManagerReport},
    scale::{self, ScaleReport},
    storage::{self, StorageReport},
    synapse::{self, SynapseReport},
};

/// The scenarios `all` runs, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Name {
    /// vodozemac generate+sign keys/s.
    Raw,
    /// Durable manager claims against raw.
    Manager,
    /// Claims over loopback HTTP at several connection counts.
    Http,
    /// Manager claims on PostgreSQL beside sled, and 3 processes on one
    /// database against 1 (starts a local PostgreSQL).
    Postgres,
    /// p99 claim latency against provisioned devices.
    Scale,
    /// Bytes on disk per idle device.
    Storage,
    /// Claims through a real Synapse (installs and starts one).
    Synapse,
    /// The SIGKILL crash torture.
    Crash,
}

impl Name {
    /// Every scenario, in running order.
    pub const ALL: [Name; 8] = [
        Name::Raw,
        Name::Manager,
        Name::Http,
        Name::Postgres,
        Name::Scale,
        Name::Storage,
        Name::Synapse,
        Name::Crash,
    ];

    /// The subcommand's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Name::Raw => "raw",
            Name::Manager => "manager",
            Name::Http => "http",
            Name::Postgres => "postgres",
            Name::Scale => "scale",
            Name::Storage => "storage",
            Name::Synapse => "synapse",
            Name::Crash => "crash",
        }
    }
}

/// The load of every scenario of one `all` run.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Seconds per raw crypto measurement (raw, manager, http).
    pub raw_seconds: f64,
    /// `manager`: devices, claims, claimers.
    pub manager: (usize, usize, usize),
    /// `http`: devices and claims per connection count.
    pub http: (usize, usize),
    /// `http`: the connection counts.
    pub http_connections: Vec<usize>,
    /// `postgres`: devices, claims, claimers (as `manager`), processes.
    pub postgres: (usize, usize, usize, usize),
    /// `scale`: the device counts.
    pub scale_sizes: Vec<usize>,
    /// `scale`: claims per size and claimers.
    pub scale_load: (usize, usize),
    /// `storage`: devices and keys per pool.
    pub storage: (usize, usize),
    /// `synapse`'s knobs (its `dir` is replaced by the run's).
    pub synapse: synapse::SynapseBench,
    /// `crash`: cycles.
    pub crash_cycles: usize,
    /// `crash`: devices, max keys before a kill, peers, messages per peer.
    pub crash_load: (usize, usize, usize, usize),
}

impl Sizes {
    /// The loads the goals are stated for (the subcommands' defaults, and
    /// the HTTP load at 1, 4, 16 and 64 connections).
    pub fn full() -> Self {
        Self {
            raw_seconds: 3.0,
            manager: (10_000, 40_000, 64),
            http: (10_000, 40_000),
            http_connections: vec![1, 4, 16, 64],
            postgres: (10_000, 40_000, 64, 3),
            scale_sizes: vec![1_000, 100_000, 1_000_000],
            scale_load: (20_000, 64),
            storage: (100_000, 10),
            synapse: synapse::SynapseBench {
                local_devices: 40,
                keys_per_device: 55,
                puppets: 100,
                connections: 64,
                claims: 2_000,
                serial_claims: 200,
                dir: PathBuf::new(),
            },
            crash_cycles: 100,
            crash_load: (8, 300, 8, 4),
        }
    }

    /// Tiny loads that run every code path in seconds (smoke runs; their
    /// figures say nothing).
    pub fn quick() -> Self {
        Self {
            raw_seconds: 0.05,
            manager: (50, 300, 8),
            http: (50, 200),
            http_connections: vec![1, 4, 16, 64],
            postgres: (50, 300, 8, 3),
            scale_sizes: vec![100, 1_000],
            scale_load: (200, 8),
            storage: (300, 10),
            synapse: synapse::SynapseBench {
                local_devices: 3,
                keys_per_device: 10,
                puppets: 3,
                connections: 4,
                claims: 20,
                serial_claims: 5,
                dir: PathBuf::new(),
            },
            crash_cycles: 3,
            crash_load: (4, 30, 2, 2),
        }
    }
}

/// What to run and where.
#[derive(Clone, Debug)]
pub struct AllConfig {
    /// The scenarios to run (in [`Name::ALL`] order whatever the order here).
    pub scenarios: Vec<Name>,
    /// Their loads.
    pub sizes: Sizes,
    /// Whether `sizes` are the quick ones (recorded in the JSON).
    pub quick: bool,
    /// Directory for the stores.
    pub dir: PathBuf,
    /// The `bridgekeys-bench` executable (the crash torture's child).
    pub exe: PathBuf,
}

/// The raw crypto figures, as the `raw` subcommand writes them.
#[derive(Debug, Serialize)]
pub struct RawReport {
    /// Cores (threads) of the all-core figure.
    pub threads: usize,
    /// Keys/s on one thread.
    pub raw_keys_per_s_1t: f64,
    /// Keys/s on all cores.
    pub raw_keys_per_s_all: f64,
}

/// The HTTP scenario at several connection counts.
#[derive(Debug, Serialize)]
pub struct HttpSweep {
    /// One run per connection count, in the order measured.
    pub runs: Vec<HttpReport>,
}

/// Each scenario's report, as its subcommand writes it (absent: not run,
/// or failed).
#[derive(Debug, Default, Serialize)]
pub struct Scenarios {
    /// `raw`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawReport>,
    /// `manager`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager: Option<ManagerReport>,
    /// `http`, once per connection count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSweep>,
    /// `postgres`: as `manager --store postgres --processes N` writes it
    /// (sled's figures, and PostgreSQL's in `postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<ManagerReport>,
    /// `scale`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleReport>,
    /// `storage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageReport>,
    /// `synapse`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synapse: Option<SynapseReport>,
    /// `crash`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash: Option<CrashReport>,
}

/// The machine the figures come from.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Cores available to the process.
    pub cores: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu: Option<String>,
    /// Memory, from `/proc/meminfo`.
    pub memory_bytes: Option<u64>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// 1-minute load average when the run started (other work on the
    /// machine makes the figures unquotable).
    pub load_average_1m_at_start: Option<f64>,
    /// 1-minute load average when the run ended.
    pub load_average_1m_at_end: Option<f64>,
    /// `release` or `debug` (debug figures are never quoted).
    pub profile: &'static str,
    /// The process's memory allocator ([`crate::ALLOCATOR`]): HTTP
    /// figures move with it.
    pub allocator: &'static str,
}

impl Machine {
    /// What this process can see of the machine now.
    pub fn probe() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        });
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let kib: u64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kib * 1024)
        });
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_bytes,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|k| k.trim().to_owned()),
            load_average_1m_at_start: load_average_1m(),
            load_average_1m_at_end: None,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            allocator: crate::ALLOCATOR,
        }
    }
}

/// The 1-minute load average, from `/proc/loadavg`.
pub fn load_average_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How a figure is compared with its goal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// The figure must be at least this.
    AtLeast(f64),
    /// The figure must be at most this.
    AtMost(f64),
    /// The figure must be there.
    Reported,
}

impl Threshold {
    /// Whether `value` meets it (no value never does).
    pub fn met(self, value: Option<f64>) -> bool {
        match (self, value) {
            (_, None) => false,
            (Threshold::AtLeast(goal), Some(v)) => v >= goal,
            (Threshold::AtMost(goal), Some(v)) => v <= goal,
            (Threshold::Reported, Some(v)) => v.is_finite(),
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::AtLeast(v) => write!(f, ">= {v}"),
            Threshold::AtMost(v) => write!(f, "<= {v}"),
            Threshold::Reported => f.write_str("reported"),
        }
    }
}

/// One goal of issue 16 and where this run stands.
#[derive(Debug, Serialize)]
pub struct Goal {
    /// `scenario.figure`, e.g. `http.ratio_to_raw`.
    pub name: &'static str,
    /// The scenario it comes from.
    pub scenario: Name,
    /// The figure (absent: the scenario did not run or failed, or this
    /// run's sizes do not include the point the goal is about).
    pub value: Option<f64>,
    /// The goal, e.g. `>= 0.5`.
    pub goal: String,
    /// Whether `value` meets `goal`.
    pub met: bool,
    /// The load the goal is stated for.
    pub conditions: &'static str,
    /// Whether this run had that load (a `--quick` run does not: its `met`
    /// says nothing about the goal).
    pub at_goal_conditions: bool,
}

fn goal(
    name: &'static str,
    scenario: Name,
    value: Option<f64>,
    threshold: Threshold,
    conditions: &'static str,
    at_goal_conditions: bool,
) -> Goal {
    Goal {
        name,
        scenario,
        value,
        goal: threshold.to_string(),
        met: threshold.met(value),
        conditions,
        at_goal_conditions: at_goal_conditions && value.is_some(),
    }
}

/// The goals of issue 16, one entry each whatever ran.
pub fn goals(s: &Scenarios) -> Vec<Goal> {
    let http64 = s
        .http
        .as_ref()
        .and_then(|h| h.runs.iter().find(|r| r.connections == 64));
    let manager_full = s
        .manager
        .as_ref()
        .is_some_and(|m| m.devices >= 10_000 && m.claims >= 40_000 && m.concurrency == 64);
    let sizes: Vec<usize> = s
        .scale
        .as_ref()
        .map(|r| r.points.iter().map(|p| p.devices).collect())
        .unwrap_or_default();
    let pg = s.postgres.as_ref().and_then(|r| r.postgres.as_ref());
    let pg_full = s
        .postgres
        .as_ref()
        .is_some_and(|m| m.devices >= 10_000 && m.claims >= 40_000 && m.concurrency == 64);
    let crash_share = s.crash.as_ref().and_then(|c| {
        (c.keys_reported > 0).then(|| c.keys_verified as f64 / c.keys_reported as f64)
    });
    vec![
        goal(
            "http.ratio_to_raw",
            Name::Http,
            http64.map(|r| r.ratio_to_raw),
            Threshold::AtLeast(0.5),
            "HTTP claims at 64 connections, 10 000 devices, 40 000 claims",
            http64.is_some_and(|r| r.devices >= 10_000 && r.claims >= 40_000),
        ),
        goal(
            "manager.ratio_to_raw",
            Name::Manager,
            s.manager.as_ref().map(|m| m.ratio_to_raw),
            Threshold::AtLeast(0.7),
            "64 claimers, 10 000 devices, 40 000 claims",
            manager_full,
        ),
        goal(
            "postgres.manager_ratio_to_sled",
            Name::Postgres,
            pg.map(|p| p.postgres_to_sled),
            Threshold::AtLeast(crate::pg::GOAL_POSTGRES_TO_SLED),
            "manager claims on PostgreSQL (fsync on) over sled, same run: 64 claimers, \
             10 000 devices, 40 000 claims",
            pg_full,
        ),
        goal(
            "postgres.processes_to_one",
            Name::Postgres,
            pg.and_then(|p| p.processes.as_ref())
                .map(|x| x.processes_to_one),
            Threshold::AtLeast(crate::pg::GOAL_PROCESSES_TO_ONE),
            "3 processes on one PostgreSQL database over 1, same total load \
             (40 000 claims, 64 claimers)",
            pg_full
                && pg
                    .and_then(|p| p.processes.as_ref())
                    .is_some_and(|x| x.many.processes >= 3),
        ),
        goal(
            "storage.bytes_per_device",
            Name::Storage,
            s.storage.as_ref().map(|r| r.bytes_per_device),
            Threshold::AtMost(512.0),
            "100 000 idle devices",
            s.storage.as_ref().is_some_and(|r| r.devices == 100_000),
        ),
        goal(
            "scale.scale_ratio",
            Name::Scale,
            s.scale.as_ref().map(|r| r.scale_ratio),
            Threshold::AtMost(1.5),
            "p99 at 1 000 000 devices over p99 at 1 000",
            sizes.first() == Some(&1_000) && sizes.last() == Some(&1_000_000),
        ),
        goal(
            "scale.p99_ms_1m",
            Name::Scale,
            s.scale.as_ref().and_then(|r| r.p99_ms_1m),
            Threshold::Reported,
            "1 000 000 devices",
            sizes.contains(&1_000_000),
        ),
        goal(
            "synapse.serial_appservice_share",
            Name::Synapse,
            s.synapse
                .as_ref()
                .filter(|r| r.serial_claims > 0)
                .map(|r| r.serial_appservice_share),
            Threshold::AtMost(0.08),
            "one connection (the serial phase), 200 claims",
            s.synapse.as_ref().is_some_and(|r| r.serial_claims >= 200),
        ),
        goal(
            "crash.keys_verified_share",
            Name::Crash,
            crash_share,
            Threshold::AtLeast(1.0),
            "100 SIGKILL cycles: every key acknowledged before a kill decrypts after it",
            s.crash.as_ref().is_some_and(|c| c.cycles >= 100),
        ),
    ]
}

/// One `all` run.
#[derive(Debug, Serialize)]
pub struct AllReport {
    /// When the run started (UTC, RFC 3339).
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// Whether the loads were the tiny `--quick` ones.
    pub quick: bool,
    /// Seconds each scenario took, wall clock.
    pub seconds: BTreeMap<&'static str, f64>,
    /// Each scenario's report.
    pub scenarios: Scenarios,
    /// Scenarios that failed, with why.
    pub errors: BTreeMap<&'static str, String>,
    /// Scenarios not asked for.
    pub skipped: Vec<Name>,
    /// Each goal, its figure and whether it is met.
    pub goals: Vec<Goal>,
    /// The charts written next to the JSON (file names).
    pub charts: Vec<String>,
}

impl AllReport {
    /// Write the charts of the scenarios that ran next to `json`, recording
    /// their names (or, for one that fails, the error).
    pub fn write_charts(&mut self, json: &std::path::Path) {
        let mut written = Vec::new();
        let mut failed = Vec::new();
        let mut record = |result: Result<PathBuf, charts::ChartError>| match result {
            Ok(path) => written.push(
                path.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            ),
            Err(e) => failed.push(e.to_string()),
        };
        if let Some(h) = &self.scenarios.http {
            let path = charts::path_beside(json, charts::CLAIMS_VS_CONNECTIONS);
            record(
                charts::claims_vs_connections(&path, &charts::connection_points(&h.runs))
                    .map(|()| path),
            );
        }
        if let Some(s) = &self.scenarios.scale {
            let path = charts::path_beside(json, charts::P99_VS_DEVICES);
            record(charts::p99_vs_devices(&path, &charts::device_points(s), 1.5).map(|()| path));
        }
        if let Some(s) = &self.scenarios.storage {
            let path = charts::path_beside(json, charts::BYTES_PER_DEVICE);
            record(charts::bytes_per_device(&path, &charts::bytes_bars(s), 512.0).map(|()| path));
        }
        self.charts = written;
        if !failed.is_empty() {
            self.errors.insert("charts", failed.join("; "));
        }
    }

    /// The summary table (stdout).
    pub fn print(&self) {
        println!(
            "bridgekeys-bench all ({}{}, {} cores, {} build, {})",
            self.date,
            if self.quick {
                ", quick: smoke sizes"
            } else {
                ""
            },
            self.machine.cores,
            self.machine.profile,
            self.machine.allocator
        );
        for name in Name::ALL {
            let key = name.as_str();
            let status = if self.skipped.contains(&name) {
                "skipped".to_owned()
            } else if let Some(e) = self.errors.get(key) {
                format!("FAILED: {e}")
            } else {
                "ok".to_owned()
            };
            let seconds = self
                .seconds
                .get(key)
                .map_or(String::new(), |s| format!("{s:>8.1} s"));
            println!("  {key:<8} {seconds:>10}  {status}");
        }
        if let Some(h) = &self.scenarios.http {
            println!(
                "  http by connections   claims/s   p50 ms   p99 ms   ratio_to_raw   claims/flush"
            );
            for r in &h.runs {
                println!(
                    "  {:>19}  {:>9.0}  {:>7.2}  {:>7.2}  {:>13.3}  {:>13.1}",
                    r.connections,
                    r.http_claims_per_s,
                    r.http_p50_ms,
                    r.http_p99_ms,
                    r.ratio_to_raw,
                    r.claims_per_flush
                );
            }
        }
        if let Some(r) = &self.scenarios.storage {
            println!(
                "  storage per idle device: {:.0} bytes as provisioned, {:.0} for the same records \
                 written once (sled's floor), {:.0} bytes of records in {:.2} entries",
                r.bytes_per_device,
                r.written_once_bytes_per_device,
                r.record_bytes_per_device,
                r.entries_per_device
            );
        }
        if let Some((p, pg)) = self
            .scenarios
            .postgres
            .as_ref()
            .and_then(|p| p.postgres.as_ref().map(|pg| (p, pg)))
        {
            println!(
                "  postgres vs sled      claims/s   p50 ms   p99 ms   (PostgreSQL: {})",
                pg.server
            );
            println!(
                "  {:>19}  {:>9.0}  {:>7.2}  {:>7.2}",
                "sled", p.manager_claims_per_s, p.manager_p50_ms, p.manager_p99_ms
            );
            println!(
                "  {:>19}  {:>9.0}  {:>7.2}  {:>7.2}",
                "postgres", pg.claims_per_s, pg.p50_ms, pg.p99_ms
            );
            if let Some(x) = &pg.processes {
                for r in [&x.one, &x.many] {
                    println!(
                        "  {:>19}  {:>9.0}  {:>7.2}  {:>7.2}",
                        format!("postgres x{}", r.processes),
                        r.claims_per_s,
                        r.p50_ms,
                        r.p99_ms
                    );
                }
            }
        }
        println!(
            "  {:<32} {:>12}  {:>10}  {:<8} conditions",
            "goal", "value", "goal", "met"
        );
        for g in &self.goals {
            let value = g.value.map_or("-".to_owned(), |v| format!("{v:.3}"));
            let met = if g.met { "met" } else { "NOT met" };
            let at = if g.at_goal_conditions {
                ""
            } else {
                " (not this run's load)"
            };
            println!(
                "  {:<32} {:>12}  {:>10}  {:<8} {}{}",
                g.name, value, g.goal, met, g.conditions, at
            );
        }
        if !self.charts.is_empty() {
            println!("  charts: {}", self.charts.join(", "));
        }
    }
}

/// `seconds` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_rfc3339() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339_utc(seconds)
}

/// Run the scenarios of `config` one after the other. A scenario's failure
/// is in the report's `errors`, and the next one still runs.
pub async fn run(config: &AllConfig) -> AllReport {
    let mut report = AllReport {
        date: now_rfc3339(),
        machine: Machine::probe(),
        quick: config.quick,
        seconds: BTreeMap::new(),
        scenarios: Scenarios::default(),
        errors: BTreeMap::new(),
        skipped: Name::ALL
            .into_iter()
            .filter(|n| !config.scenarios.contains(n))
            .collect(),
        goals: Vec::new(),
        charts: Vec::new(),
    };
    let sizes = &config.sizes;
    for name in Name::ALL {
        if !config.scenarios.contains(&name) {
            continue;
        }
        eprintln!("all: running {}", name.as_str());
        let started = Instant::now();
        let outcome = run_one(name, config, sizes, &mut report.scenarios).await;
        report
            .seconds
            .insert(name.as_str(), started.elapsed().as_secs_f64());
        if let Err(e) = outcome {
            eprintln!("all: {} failed: {e:#}", name.as_str());
            report.errors.insert(name.as_str(), format!("{e:#}"));
        }
    }
    report.machine.load_average_1m_at_end = load_average_1m();
    report.goals = goals(&report.scenarios);
    report
}

async fn run_one(
    name: Name,
    config: &AllConfig,
    sizes: &Sizes,
    out: &mut Scenarios,
) -> anyhow::Result<()> {
    let dir = config.dir.clone();
    match name {
        Name::Raw => {
            let raw = manager::measure_raw(sizes.raw_seconds);
            out.raw = Some(RawReport {
                threads: raw.threads,
                raw_keys_per_s_1t: raw.per_s_1t,
                raw_keys_per_s_all: raw.per_s_all,
            });
        }
        Name::Manager => {
            let (devices, claims, concurrency) = sizes.manager;
            out.manager = Some(
                manager::run(&manager::ManagerBench {
                    devices,
                    concurrency,
                    claims,
                    raw_seconds: sizes.raw_seconds,
                    dir,
                })
                .await?,
            );
        }
        Name::Http => {
            let (devices, claims) = sizes.http;
            let mut runs = Vec::new();
            for &connections in &sizes.http_connections {
                eprintln!("all: http at {connections} connections");
                runs.push(
                    http::run(&http::HttpBench {
                        devices,
                        connections,
                        claims,
                        raw_seconds: sizes.raw_seconds,
                        dir: dir.clone(),
                    })
                    .await?,
                );
            }
            out.http = Some(HttpSweep { runs });
        }
        Name::Postgres => {
            let (devices, claims, concurrency, processes) = sizes.postgres;
            out.postgres = Some(
                manager::run_compared(
                    &manager::ManagerBench {
                        devices,
                        concurrency,
                        claims,
                        raw_seconds: sizes.raw_seconds,
                        dir,
                    },
                    &crate::pg::PgBench {
                        url: None,
                        processes,
                        exe: config.exe.clone(),
                    },
                )
                .await?,
            );
        }
        Name::Scale => {
            let (claims, concurrency) = sizes.scale_load;
            out.scale = Some(
                scale::run(&scale::ScaleBench {
                    sizes: sizes.scale_sizes.clone(),
                    claims,
                    concurrency,
                    dir,
                })
                .await?,
            );
        }
        Name::Storage => {
            let (devices, pool_size) = sizes.storage;
            out.storage = Some(
                storage::run(&storage::StorageBench {
                    devices,
                    dir,
                    pool_size,
                })
                .await?,
            );
        }
        Name::Synapse => {
            let r = synapse::run(&synapse::SynapseBench {
                dir,
                ..sizes.synapse.clone()
            })
            .await?;
            let failures = r.failures();
            out.synapse = Some(r);
            anyhow::ensure!(failures == 0, "{failures} claims failed a check");
        }
        Name::Crash => {
            let (devices, max_keys_before_kill, peers, messages_per_peer) = sizes.crash_load;
            out.crash = Some(
                crash::run(&crash::CrashConfig {
                    cycles: sizes.crash_cycles,
                    devices,
                    max_keys_before_kill,
                    exe: config.exe.clone(),
                    dir,
                    seed: None,
                    power_loss: None,
                    peers,
                    messages_per_peer,
                })
                .await?,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::scale::ScalePoint;

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        // 2026-12-06 17:48:53 UTC.
        assert_eq!(rfc3339_utc(1_796_579_333), "2026-12-06T17:48:53Z");
        // A leap day.
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn thresholds_compare_and_a_missing_figure_is_never_met() {
        assert!(Threshold::AtLeast(0.5).met(Some(0.5)));
        assert!(!Threshold::AtLeast(0.5).met(Some(0.49)));
        assert!(Threshold::AtMost(512.0).met(Some(511.0)));
        assert!(!Threshold::AtMost(512.0).met(Some(848.0)));
        assert!(Threshold::Reported.met(Some(10.1)));
        for t in [
            Threshold::AtLeast(0.0),
            Threshold::AtMost(1e9),
            Threshold::Reported,
        ] {
            assert!(!t.met(None), "{t}");
        }
        assert_eq!(Threshold::AtLeast(0.5).to_string(), ">= 0.5");
        assert_eq!(Threshold::AtMost(512.0).to_string(), "<= 512");
    }

    fn point(devices: usize, p99_ms: f64) -> ScalePoint {
        ScalePoint {
            devices,
            provision_s: 1.0,
            claims: 10,
            claims_per_s: 100.0,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            cold_loads: 10,
        }
    }

    #[test]
    fn every_goal_has_an_entry_even_when_nothing_ran() {
        let goals = goals(&Scenarios::default());
        let names: Vec<_> = goals.iter().map(|g| g.name).collect();
        assert_eq!(
            names,
            [
                "http.ratio_to_raw",
                "manager.ratio_to_raw",
                "postgres.manager_ratio_to_sled",
                "postgres.processes_to_one",
                "storage.bytes_per_device",
                "scale.scale_ratio",
                "scale.p99_ms_1m",
                "synapse.serial_appservice_share",
                "crash.keys_verified_share",
            ]
        );
        assert!(
            goals
                .iter()
                .all(|g| g.value.is_none() && !g.met && !g.at_goal_conditions)
        );
    }

    #[test]
    fn scale_goals_read_the_report_and_know_a_small_run_is_not_the_goal_load() {
        let full = Scenarios {
            scale: Some(ScaleReport {
                points: vec![
                    point(1_000, 7.27),
                    point(100_000, 12.28),
                    point(1_000_000, 10.10),
                ],
                p99_ms_1k: Some(7.27),
                p99_ms_100k: Some(12.28),
                p99_ms_1m: Some(10.10),
                scale_ratio: 10.10 / 7.27,
            }),
            ..Scenarios::default()
        };
        let g = goals(&full);
        let ratio = g.iter().find(|g| g.name == "scale.scale_ratio").unwrap();
        assert_eq!(ratio.value, Some(10.10 / 7.27));
        assert!(ratio.met && ratio.at_goal_conditions);
        assert_eq!(ratio.goal, "<= 1.5");
        let p99 = g.iter().find(|g| g.name == "scale.p99_ms_1m").unwrap();
        assert_eq!((p99.value, p99.met), (Some(10.10), true));

        let small = Scenarios {
            scale: Some(ScaleReport {
                points: vec![point(100, 2.0), point(1_000, 4.0)],
                p99_ms_1k: Some(4.0),
                p99_ms_100k: None,
                p99_ms_1m: None,
                scale_ratio: 2.0,
            }),
            ..Scenarios::default()
        };
        let g = goals(&small);
        let ratio = g.iter().find(|g| g.name == "scale.scale_ratio").unwrap();
        assert!(!ratio.met && !ratio.at_goal_conditions);
        let p99 = g.iter().find(|g| g.name == "scale.p99_ms_1m").unwrap();
        assert_eq!((p99.value, p99.met), (None, false), "no 1M point measured");
    }

    #[test]
    fn postgres_goals_read_the_ratio_and_the_processes() {
        let run = |processes, claims_per_s| crate::pg::ProcessRun {
            processes,
            claims: 40_000,
            claimers: 64,
            wall_s: 40_000.0 / claims_per_s,
            claims_per_s,
            steady_claims_per_s: claims_per_s,
            p50_ms: 2.0,
            p99_ms: 9.0,
            process_s: vec![40_000.0 / claims_per_s; processes],
            processes_cpu_s: None,
            server_cpu_s: None,
            cpu_us_per_claim: (None, None),
            ..crate::pg::ProcessRun::default()
        };
        let report = ManagerReport {
            threads: 2,
            raw_keys_per_s_1t: 14_000.0,
            raw_keys_per_s_all: 20_000.0,
            devices: 10_000,
            provision_s: 1.0,
            concurrency: 64,
            claims: 40_000,
            manager_claims_per_s: 10_000.0,
            manager_p50_ms: 3.0,
            manager_p99_ms: 10.0,
            claims_per_flush: 20.0,
            ratio_to_raw: 0.5,
            postgres: Some(crate::manager::PgClaims {
                server: "local".into(),
                pool_size: 8,
                provision_s: 2.0,
                claims: 40_000,
                claims_per_s: 6_000.0,
                p50_ms: 4.0,
                p99_ms: 12.0,
                claims_per_flush: 10.0,
                ratio_to_raw: 0.3,
                postgres_to_sled: 0.6,
                goal_postgres_to_sled: 0.5,
                goal_met: true,
                processes: Some(crate::pg::ProcessesReport {
                    load: "same".into(),
                    one: run(1, 5_000.0),
                    many: run(3, 4_500.0),
                    processes_to_one: 0.9,
                    steady_to_one: 0.9,
                    round_ratios: vec![0.9, 0.9],
                    goal: 1.0,
                    goal_met: false,
                }),
            }),
        };
        let s = Scenarios {
            postgres: Some(report),
            ..Scenarios::default()
        };
        let g = goals(&s);
        let ratio = g
            .iter()
            .find(|g| g.name == "postgres.manager_ratio_to_sled")
            .unwrap();
        assert_eq!(ratio.value, Some(0.6));
        assert!(ratio.met && ratio.at_goal_conditions);
        let x = g
            .iter()
            .find(|g| g.name == "postgres.processes_to_one")
            .unwrap();
        assert_eq!(
            (x.value, x.met, x.at_goal_conditions),
            (Some(0.9), false, true)
        );
    }

    #[test]
    fn crash_goal_is_the_share_of_keys_verified() {
        let s = Scenarios {
            crash: Some(CrashReport {
                cycles: 100,
                keys_reported: 16_139,
                keys_verified: 16_139,
                ..CrashReport::default()
            }),
            ..Scenarios::default()
        };
        let g = goals(&s);
        let crash = g
            .iter()
            .find(|g| g.name == "crash.keys_verified_share")
            .unwrap();
        assert_eq!(crash.value, Some(1.0));
        assert!(crash.met && crash.at_goal_conditions);
    }
}
