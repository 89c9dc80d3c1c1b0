//! `bridgekeys-bench`: benchmarks that print figures (and write JSON), and
//! the crash torture.

use std::path::PathBuf;

use anyhow::Context;
use bridgekeys_bench::{all, charts, crash, http, manager, megolm, olm, scale, storage, upgrade};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks and torture runs of bridgekeys")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// What the claim-throughput scenarios share.
#[derive(clap::Args)]
struct Load {
    /// Provisioned puppet devices.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Claims to measure (1 key each).
    #[arg(long, default_value_t = 40_000)]
    claims: usize,
    /// Seconds per raw crypto measurement.
    #[arg(long, default_value_t = 3.0)]
    raw_seconds: f64,
    /// Directory for the store (on the disk you want measured).
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
    /// Also write the figures as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `postgres`: measure sled, then the same load on a PostgreSQL store,
    /// in the same run, and report them side by side.
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    store: StoreKind,
    /// With `--store postgres`: an existing server (a `postgres://` URL
    /// whose user may create databases; each measurement gets a fresh
    /// one, dropped at the end). Default: a throwaway local server
    /// (fsync on) sharing this machine's cores.
    #[arg(long)]
    postgres_url: Option<String>,
}

/// Which store the claim-throughput scenarios measure (what `postgres`
/// means is said by each scenario's `--store`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// sled.
    Sled,
    /// PostgreSQL.
    Postgres,
}

#[derive(Subcommand)]
enum Scenario {
    /// Every scenario with a goal (raw, manager, http at 1/4/16/64
    /// connections, scale, storage, synapse, crash), one after the other;
    /// one JSON with each report and each goal (met or not), a summary
    /// table, and SVG charts next to the JSON.
    All {
        /// Tiny loads (smoke run: exercises every path, figures mean nothing).
        #[arg(long)]
        quick: bool,
        /// Run only these scenarios, comma-separated.
        #[arg(long, value_delimiter = ',', value_enum)]
        only: Vec<all::Name>,
        /// Leave these scenarios out, comma-separated (e.g. `synapse`, which
        /// installs and starts a real Synapse).
        #[arg(long, value_delimiter = ',', value_enum)]
        skip: Vec<all::Name>,
        /// Override the `scale` device counts, comma-separated.
        #[arg(long, value_delimiter = ',')]
        scale_sizes: Option<Vec<usize>>,
        /// Override the `storage` device count.
        #[arg(long)]
        storage_devices: Option<usize>,
        /// Override the crash torture's cycles.
        #[arg(long)]
        crash_cycles: Option<usize>,
        /// Directory for the stores (on the disk you want measured).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Write the summary JSON here (and the charts next to it).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// vodozemac generate+sign keys/s, on one thread and on all cores.
    Raw {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        raw_seconds: f64,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// p99 claim latency with 1k, 100k and 1M provisioned devices (cold cache).
    Scale {
        /// Provisioned device counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000, 100_000, 1_000_000])]
        sizes: Vec<usize>,
        /// Claims per size (1 key each).
        #[arg(long, default_value_t = 20_000)]
        claims: usize,
        /// Concurrent claimers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Directory for the stores (on the disk you want measured).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// `postgres`: the stores are databases of one PostgreSQL server
        /// (a throwaway local one unless `--postgres-url`), instead of sled
        /// (`--dir` is then unused).
        #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
        store: StoreKind,
        /// With `--store postgres`: a server to create the databases on.
        #[arg(long, value_name = "URL")]
        postgres_url: Option<String>,
    },
    /// Bytes on disk per idle provisioned device, against 50 uploaded keys.
    Storage {
        /// Devices to provision.
        #[arg(long, default_value_t = 100_000)]
        devices: usize,
        /// Keys per contacted device in the uploaded pool measured beside.
        #[arg(long, default_value_t = 10)]
        pool_size: usize,
        /// Directory for the store (on the disk you want measured).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The first open of a large sled store written by a schema-3 build
    /// (the upgrade to schema 4 runs inside it) against a plain open.
    Upgrade {
        /// Puppet devices in the old store.
        #[arg(long, default_value_t = 1_000_000)]
        devices: usize,
        /// Outstanding one-time keys per device in the old store.
        #[arg(long, default_value_t = 1)]
        keys_per_device: u64,
        /// Directory for the store (on the disk you want measured).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Raw vodozemac generate+sign keys/s against durable manager claims/s.
    Manager {
        /// Concurrent claimers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// With `--store postgres`: also run the claims from this many
        /// processes on one database against one process, same total
        /// claims and claimers (0 or 1: not measured).
        #[arg(long, default_value_t = 3)]
        processes: usize,
        #[command(flatten)]
        load: Load,
    },
    /// Durable Olm decrypts/s against raw vodozemac decrypts/s, and one
    /// puppet's to-device fan-out to 100 devices (sessions claimed, reused).
    Olm {
        /// Puppet devices, each with one peer device sending to it.
        #[arg(long, default_value_t = 2_000)]
        devices: usize,
        /// Normal (type 1) messages each peer sends.
        #[arg(long, default_value_t = 20)]
        messages: usize,
        /// Concurrent decrypting tasks.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Recipient devices of one fan-out.
        #[arg(long, default_value_t = 100)]
        recipients: usize,
        /// Fan-outs measured per kind (the median is reported).
        #[arg(long, default_value_t = 5)]
        fanout_rounds: usize,
        /// Alternating raw / durable slices the decrypts are measured in.
        #[arg(long, default_value_t = 5)]
        slices: usize,
        /// Directory for the store (on the disk you want measured).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Megolm room events decrypted through the listener's transactions
    /// (and the store) against raw vodozemac, and a puppet's session
    /// rotation and messages in a room of 50 devices.
    Megolm {
        /// Room events per measured load (each shape, and the store level).
        #[arg(long, default_value_t = 5_000)]
        events: usize,
        /// Transaction loads, EVENTSxIN_FLIGHT (Synapse sends one
        /// transaction at a time), comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [
            megolm::Shape { events_per_txn: 1, in_flight: 1 },
            megolm::Shape { events_per_txn: 50, in_flight: 1 },
            megolm::Shape { events_per_txn: 50, in_flight: 4 },
        ])]
        shapes: Vec<megolm::Shape>,
        /// Messages per Megolm session (the room's rotation_period_msgs).
        #[arg(long, default_value_t = 100)]
        session_messages: usize,
        /// Concurrent tasks of the store-level figure.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Alternating raw / durable slices per load.
        #[arg(long, default_value_t = 5)]
        slices: usize,
        /// Devices in the room the puppet sends to.
        #[arg(long, default_value_t = 50)]
        recipients: usize,
        /// Outbound rounds (fresh room and devices each).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Directory for the store (on the disk you want measured).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Key claims over loopback HTTP to the real listener (durable store).
    Http {
        /// Concurrent keep-alive connections; several, comma-separated,
        /// run the load at each (JSON `{"runs": [...]}` and a chart).
        #[arg(long, value_delimiter = ',', default_values_t = [64])]
        connections: Vec<usize>,
        #[command(flatten)]
        load: Load,
    },
    /// Key claims through a real Synapse: keys local devices uploaded, and
    /// keys Synapse proxies to our listener (MSC3983); time in the listener.
    Synapse {
        /// Local users (one device each) that upload one-time keys.
        #[arg(long, default_value_t = 40)]
        local_devices: usize,
        /// One-time keys each local device uploads (devices x keys must
        /// cover claims + serial claims: every claim consumes a key).
        #[arg(long, default_value_t = 55)]
        keys_per_device: usize,
        /// Puppets provisioned through the Provisioner (one device each).
        #[arg(long, default_value_t = 100)]
        puppets: usize,
        /// Concurrent keep-alive connections to Synapse.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Claims per loaded phase (1 key each).
        #[arg(long, default_value_t = 2_000)]
        claims: usize,
        /// Claims per serial phase (one connection; 0 skips them).
        #[arg(long, default_value_t = 200)]
        serial_claims: usize,
        /// Directory for the store.
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Kill a claiming child with SIGKILL N times; check no key is reused or lost.
    Crash {
        /// Kill/restart cycles.
        #[arg(long, default_value_t = 100)]
        cycles: usize,
        /// Puppet devices the child claims for.
        #[arg(long, default_value_t = 8)]
        devices: usize,
        /// Kill after a random number of keys up to this.
        #[arg(long, default_value_t = 300)]
        max_keys_before_kill: usize,
        /// Seed of the kill schedule (random if absent).
        #[arg(long)]
        seed: Option<u64>,
        /// Make every kill a power cut too, under this model: `strict`
        /// (only synced data and synced directory entries survive) or `torn`
        /// (entries and sizes survive, unsynced blocks are partly lost).
        #[arg(long, value_name = "MODEL")]
        power_loss: Option<bridgekeys_powercut::Model>,
        /// Peer devices with Olm sessions to the puppets (0: claims only);
        /// default 8. Sled only.
        #[arg(long)]
        peers: Option<usize>,
        /// Olm messages each peer sends the child per cycle; default 4.
        /// Sled only.
        #[arg(long)]
        messages_per_peer: Option<usize>,
        /// Directory for the store (sled).
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// The store the children share: `sled` (one child at a time, on a
        /// directory) or `postgres` (`--processes` children at once on one
        /// database, claims only).
        #[arg(long, value_enum, default_value_t = CrashStore::Sled)]
        store: CrashStore,
        /// Child processes claiming at once (more than 1 needs `--store postgres`).
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// With `--store postgres`: an existing, empty database (else a
        /// throwaway server is started and a database created on it).
        #[arg(long, value_name = "URL")]
        postgres_url: Option<String>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// (internal) a claiming process of `manager --store postgres
    /// --processes N` (database URL and key in the environment).
    #[command(hide = true)]
    PgClaimChild {
        #[arg(long)]
        store_id: bridgekeys_store::StoreId,
        #[arg(long)]
        devices: usize,
        #[arg(long)]
        claims: usize,
        #[arg(long)]
        concurrency: usize,
    },
    /// (internal) the claiming child of `crash`.
    #[command(hide = true)]
    CrashChild {
        /// The sled store's directory.
        #[arg(long, required_unless_present = "postgres")]
        dir: Option<PathBuf>,
        /// The shared PostgreSQL database instead (the store must exist).
        #[arg(
            long,
            value_name = "URL",
            conflicts_with = "dir",
            requires = "store_id"
        )]
        postgres: Option<String>,
        #[arg(long)]
        devices: usize,
        /// The store to open; absent: create it (sled only).
        #[arg(long)]
        store_id: Option<bridgekeys_store::StoreId>,
    },
}

/// The store of the crash torture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CrashStore {
    /// A sled store in `--dir`, one child at a time.
    Sled,
    /// One PostgreSQL database shared by `--processes` children.
    Postgres,
}

/// The shared-database crash torture's figures.
fn print_crash_shared(r: &crash::shared::SharedReport) {
    println!(
        "scenario: crash, {} processes on one {} database (seed {})",
        r.processes, r.store, r.seed
    );
    println!("  SIGKILL cycles survived                 {:>10}", r.cycles);
    println!("  SIGKILLs sent (with the final ones)     {:>10}", r.kills);
    println!(
        "  keys reported, all verified after kill  {:>10} / {}",
        r.keys_reported, r.keys_verified
    );
    println!(
        "  signatures verified                     {:>10}",
        r.signatures_verified
    );
    println!(
        "  repeated key ids / repeated keys        {:>10} / {}",
        r.repeated_key_ids, r.repeated_keys
    );
}

/// The two raw crypto lines every scenario that measures them prints.
fn print_raw(per_s_1t: f64, per_s_all: f64) {
    println!("  raw vodozemac generate+sign, 1 thread   {per_s_1t:>10.0} keys/s");
    println!("  raw vodozemac generate+sign, all cores  {per_s_all:>10.0} keys/s");
    println!(
        "  allocator (every figure of this run)    {:>10}",
        bridgekeys_bench::ALLOCATOR
    );
}

/// The `megolm` figures as a table.
fn print_megolm(r: &megolm::MegolmReport) {
    let us = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1}"));
    println!("scenario: megolm ({} cores)", r.threads);
    println!(
        "  set-up: {} room keys over Olm in transactions, {} messages per session  {:.1} s",
        r.room_keys, r.session_messages, r.setup_s
    );
    println!(
        "  transaction path (PUT /transactions over loopback HTTP, durable) vs raw InboundGroupSession::decrypt, all cores:"
    );
    println!(
        "    events/txn x in flight   events/s    raw/s    ratio   txn p50 / p99 ms   fsyncs/txn   CPU us/event (raw)   CPU ratio"
    );
    for t in &r.transactions {
        println!(
            "    {:>22}  {:>9.0}  {:>7.0}  {:>7.3}   {:>6.2} / {:<6.2}    {:>9.2}   {:>7} ({:>5})    {:>9}",
            t.shape,
            t.events_per_s,
            t.raw_decrypts_per_s,
            t.ratio_to_raw,
            t.txn_p50_ms,
            t.txn_p99_ms,
            t.fsyncs_per_txn,
            us(t.cpu_us_per_event),
            us(t.raw_cpu_us_per_decrypt),
            t.cpu_ratio.map_or("?".to_owned(), |c| format!("{c:.3}"))
        );
    }
    let s = &r.store_level;
    println!(
        "  store level: decrypt_room_event + flush ({} tasks)  {:>9.0} decrypts/s (raw {:.0}, ratio {:.3})",
        s.concurrency, s.decrypts_per_s, s.raw_decrypts_per_s, s.ratio_to_raw
    );
    println!(
        "    latency p50 / p99 {:.2} / {:.2} ms, {:.1} decrypts per fsync, CPU {} us/decrypt (raw {})",
        s.p50_ms,
        s.p99_ms,
        s.decrypts_per_flush,
        us(s.cpu_us_per_decrypt),
        us(s.raw_cpu_us_per_decrypt)
    );
    println!(
        "  raw decrypt with the session restored from its pickle each time  {:.1} us",
        r.raw_from_pickle_us_per_decrypt
    );
    println!(
        "  ratio transaction path / raw, {} (goal >= {})  {:.3} ({})",
        r.headline_shape,
        r.goal_ratio,
        r.ratio_to_raw,
        if r.goal_met { "met" } else { "not met" }
    );
    if let Some(load) = r.load_average_1m {
        println!("  load average (1 min) at the end   {load:.2}");
    }
    let o = &r.outbound;
    println!(
        "  rotation in a room of {} devices: claimed Olm sessions / reused  {:.1} / {:.1} ms (raw vodozemac {:.1} / {:.1} ms)",
        o.recipients,
        o.rotation_claimed_ms,
        o.rotation_reused_ms,
        o.raw_rotation_claimed_ms,
        o.raw_rotation_reused_ms
    );
    println!(
        "    reused: new session {:.2} + key to each device {:.2} + recorded {:.2} + first encrypt {:.2} ms",
        o.reused_prepare_ms, o.reused_share_ms, o.reused_mark_ms, o.reused_first_encrypt_ms
    );
    println!(
        "    to-device messages per rotation {:.0}; Olm sessions created per claimed rotation {:.0}; fsyncs claimed / reused {:.0} / {:.0}",
        o.to_device_per_rotation,
        o.olm_sessions_per_claimed_rotation,
        o.fsyncs_per_claimed_rotation,
        o.fsyncs_per_reused_rotation
    );
    println!(
        "  steady state ({} messages per round): encrypt_room_event p50 / p99 {:.3} / {:.3} ms, whole send {:.3} ms (raw encrypt {:.1} us)",
        o.steady_messages, o.encrypt_ms, o.encrypt_p99_ms, o.send_ms, o.raw_encrypt_us
    );
}

/// The `http` figures of one connection count.
fn print_http(r: &http::HttpReport) {
    println!("scenario: http");
    print_raw(r.raw_keys_per_s_1t, r.raw_keys_per_s_all);
    println!(
        "  HTTP claims ({} connections, {} devices) {:>8.0} claims/s",
        r.connections, r.devices, r.http_claims_per_s
    );
    println!(
        "  claim latency p50 / p99                 {:>7.2} / {:.2} ms",
        r.http_p50_ms, r.http_p99_ms
    );
    println!(
        "  ratio HTTP / raw (all cores)            {:>10.2}",
        r.ratio_to_raw
    );
    println!(
        "  claims per flush                        {:>10.1}",
        r.claims_per_flush
    );
    println!(
        "  HTTP floor: /ping, same load            {:>10.0} requests/s",
        r.http_floor_per_s
    );
    println!(
        "  best ratio if the store cost nothing    {:>10.2}",
        r.ratio_bound_without_store
    );
    if let Some(p) = &r.postgres {
        println!("  PostgreSQL: {}", p.server);
        println!(
            "  HTTP claims on PostgreSQL               {:>10.0} claims/s",
            p.http_claims_per_s
        );
        println!(
            "  claim latency p50 / p99                 {:>7.2} / {:.2} ms",
            p.http_p50_ms, p.http_p99_ms
        );
        println!(
            "  postgres_to_sled (goal >= {})          {:>10.2}",
            bridgekeys_bench::pg::GOAL_POSTGRES_TO_SLED,
            p.postgres_to_sled
        );
    }
}

/// The PostgreSQL side of a `manager --store postgres` run, beside sled's.
fn print_manager_postgres(r: &manager::ManagerReport) {
    let Some(p) = &r.postgres else {
        return;
    };
    println!("  PostgreSQL: {}", p.server);
    println!("                                            sled    PostgreSQL");
    println!(
        "  durable claims/s                    {:>10.0}  {:>10.0}",
        r.manager_claims_per_s, p.claims_per_s
    );
    println!(
        "  claim latency p50 ms                {:>10.2}  {:>10.2}",
        r.manager_p50_ms, p.p50_ms
    );
    println!(
        "  claim latency p99 ms                {:>10.2}  {:>10.2}",
        r.manager_p99_ms, p.p99_ms
    );
    println!(
        "  claims per flush                    {:>10.1}  {:>10.1}",
        r.claims_per_flush, p.claims_per_flush
    );
    println!(
        "  postgres_to_sled (goal >= {})      {:>10.2} ({})",
        p.goal_postgres_to_sled,
        p.postgres_to_sled,
        if p.goal_met { "met" } else { "not met" }
    );
    if let Some(x) = &p.processes {
        println!("  processes on one database: {}", x.load);
        for run in [&x.one, &x.many] {
            println!(
                "    {} process(es), {} claimers  {:>8.0} claims/s ({:.0} steady)  p50 / p99 {:.2} / {:.2} ms",
                run.processes,
                run.claimers,
                run.claims_per_s,
                run.steady_claims_per_s,
                run.p50_ms,
                run.p99_ms
            );
            let seconds: Vec<String> = run.process_s.iter().map(|s| format!("{s:.2}")).collect();
            let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "      each process's load [{}] s; claims per commit {:.1}; context switches per claim {}; CPU per claim: claimers {} us, server {} us",
                seconds.join(", "),
                run.claims_per_flush,
                run.switches_per_claim
                    .map_or("-".to_owned(), |v| format!("{v:.2}")),
                us(run.cpu_us_per_claim.0),
                us(run.cpu_us_per_claim.1)
            );
        }
        println!(
            "  processes_to_one (goal >= {})        {:>10.2} ({}); while all claim {:.2}; each round [{}]",
            x.goal,
            x.processes_to_one,
            if x.goal_met { "met" } else { "not met" },
            x.steady_to_one,
            x.round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn write_json(path: Option<PathBuf>, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::All {
            quick,
            only,
            skip,
            scale_sizes,
            storage_devices,
            crash_cycles,
            dir,
            json,
        } => {
            let mut sizes = if quick {
                all::Sizes::quick()
            } else {
                all::Sizes::full()
            };
            if let Some(v) = scale_sizes {
                sizes.scale_sizes = v;
            }
            if let Some(v) = storage_devices {
                sizes.storage.0 = v;
            }
            if let Some(v) = crash_cycles {
                sizes.crash_cycles = v;
            }
            let scenarios = all::Name::ALL
                .into_iter()
                .filter(|n| (only.is_empty() || only.contains(n)) && !skip.contains(n))
                .collect();
            let config = all::AllConfig {
                scenarios,
                sizes,
                quick,
                dir,
                exe: std::env::current_exe()?,
            };
            let mut report = all::run(&config).await;
            if let Some(json) = &json {
                report.write_charts(json);
            }
            report.print();
            write_json(json, &report)?;
            anyhow::ensure!(
                report.errors.is_empty(),
                "failed: {}",
                report.errors.keys().copied().collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Scenario::Raw { raw_seconds, json } => {
            let raw = manager::measure_raw(raw_seconds);
            println!("scenario: raw ({} cores)", raw.threads);
            print_raw(raw.per_s_1t, raw.per_s_all);
            write_json(
                json,
                &serde_json::json!({
                    "threads": raw.threads,
                    "raw_keys_per_s_1t": raw.per_s_1t,
                    "raw_keys_per_s_all": raw.per_s_all,
                }),
            )
        }
        Scenario::Scale {
            sizes,
            claims,
            concurrency,
            dir,
            json,
            store,
            postgres_url,
        } => {
            let config = scale::ScaleBench {
                sizes,
                claims,
                concurrency,
                dir,
            };
            let r = match store {
                StoreKind::Sled => scale::run(&config).await?,
                StoreKind::Postgres => {
                    let server = bridgekeys_bench::pg::Server::start(postgres_url).await?;
                    let r = scale::run_postgres(&config, &server).await;
                    server.clean_up().await;
                    println!("store: PostgreSQL, {}", server.describe());
                    r?
                }
            };
            println!("scenario: scale ({} claimers, cold cache)", concurrency);
            println!("  devices     provision   claims/s    p50 ms    p99 ms   cold loads");
            for p in &r.points {
                println!(
                    "  {:>9}  {:>8.1} s  {:>9.0}  {:>8.2}  {:>8.2}  {:>11}",
                    p.devices, p.provision_s, p.claims_per_s, p.p50_ms, p.p99_ms, p.cold_loads
                );
            }
            println!(
                "  scale_ratio (p99 largest / p99 smallest) {:>9.2}",
                r.scale_ratio
            );
            write_json(json.clone(), &r)?;
            if let Some(json) = json {
                let path = charts::path_beside(&json, charts::P99_VS_DEVICES);
                charts::p99_vs_devices(&path, &charts::device_points(&r), 1.5)?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Scenario::Upgrade {
            devices,
            keys_per_device,
            dir,
            json,
        } => {
            let r = upgrade::run(&upgrade::UpgradeBench {
                devices,
                keys_per_device,
                dir,
            })?;
            println!(
                "scenario: upgrade (sled schema 3 to 4, {} devices, {} one-time keys)",
                r.devices, r.one_time_keys
            );
            println!(
                "  schema-3 store written in           {:>10.1} s",
                r.write_s
            );
            println!(
                "  first open by this build (upgrade)  {:>10.1} s ({:.0} devices/s)",
                r.upgrade_open_s, r.devices_per_s
            );
            println!(
                "  second open (nothing to upgrade)    {:>10.2} s",
                r.plain_open_s
            );
            println!(
                "  store on disk before / after        {:>10} / {} bytes",
                r.bytes_before, r.bytes_after
            );
            write_json(json, &r)
        }
        Scenario::Storage {
            devices,
            pool_size,
            dir,
            json,
        } => {
            let r = storage::run(&storage::StorageBench {
                devices,
                dir,
                pool_size,
            })
            .await?;
            let a = &r.alternative;
            println!("scenario: storage ({} devices)", r.devices);
            println!(
                "  provisioned (account, fallback key published, registry) in {:.1} s",
                r.provision_s
            );
            println!(
                "  store on disk (allocated), empty store   {:>10} / {} bytes",
                r.store_bytes, r.empty_store_bytes
            );
            println!(
                "  bytes per idle provisioned device       {:>10.0}",
                r.bytes_per_device
            );
            println!(
                "  of which the records themselves         {:>10.0} bytes in {:.2} entries",
                r.record_bytes_per_device, r.entries_per_device
            );
            println!(
                "  the same records written once (floor)   {:>10.0}",
                r.written_once_bytes_per_device
            );
            println!(
                "  alternative: {} uploaded keys per device, computed:",
                a.keys_per_device
            );
            println!(
                "    homeserver row + index per key        {:>10} + {} bytes",
                a.homeserver_row_bytes, a.homeserver_index_bytes
            );
            println!(
                "    bridge side (private halves kept)     {:>10} bytes",
                a.bridge_bytes
            );
            println!(
                "    per device, total                      {:>10} bytes",
                a.total_bytes_per_device
            );
            let p = &r.pool;
            println!(
                "  uploaded pool of {} keys (homeservers that do not proxy claims), per contacted device:",
                p.keys_per_device
            );
            println!(
                "    bridge side (measured) + homeserver    {:>10.0} + {} bytes",
                p.bridge_bytes, p.homeserver_bytes
            );
            println!(
                "    per contacted device, total            {:>10.0} bytes (never contacted: {:.0})",
                p.total_bytes_per_device, r.bytes_per_device
            );
            write_json(json.clone(), &r)?;
            if let Some(json) = json {
                let path = charts::path_beside(&json, charts::BYTES_PER_DEVICE);
                charts::bytes_per_device(&path, &charts::bytes_bars(&r), 512.0)?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Scenario::Manager {
            concurrency,
            processes,
            load,
        } => {
            let Load {
                devices,
                claims,
                raw_seconds,
                dir,
                json,
                store,
                postgres_url,
            } = load;
            let config = manager::ManagerBench {
                devices,
                concurrency,
                claims,
                raw_seconds,
                dir,
            };
            let r = match store {
                StoreKind::Sled => manager::run(&config).await?,
                StoreKind::Postgres => {
                    let pg = bridgekeys_bench::pg::PgBench {
                        url: postgres_url,
                        processes,
                        exe: std::env::current_exe()?,
                    };
                    manager::run_compared(&config, &pg).await?
                }
            };
            println!("scenario: manager ({} cores)", r.threads);
            print_raw(r.raw_keys_per_s_1t, r.raw_keys_per_s_all);
            println!(
                "  provisioned devices                     {:>10} in {:.1} s",
                r.devices, r.provision_s
            );
            println!(
                "  durable manager claims ({} claimers)    {:>10.0} claims/s",
                r.concurrency, r.manager_claims_per_s
            );
            println!(
                "  claim latency p50 / p99                 {:>7.2} / {:.2} ms",
                r.manager_p50_ms, r.manager_p99_ms
            );
            println!(
                "  claims per fsync (group commit)         {:>10.1}",
                r.claims_per_flush
            );
            println!(
                "  ratio manager / raw (all cores)         {:>10.2}",
                r.ratio_to_raw
            );
            print_manager_postgres(&r);
            write_json(json, &r)
        }
        Scenario::Olm {
            devices,
            messages,
            concurrency,
            recipients,
            fanout_rounds,
            slices,
            dir,
            json,
        } => {
            let config = olm::OlmBench {
                devices,
                messages,
                concurrency,
                recipients,
                fanout_rounds,
                slices,
                dir,
            };
            let r = olm::run(&config).await?;
            let f = &r.fanout;
            println!("scenario: olm ({} cores)", r.threads);
            println!(
                "  set-up: {} devices, a session each, {} messages per peer  {:.1} s",
                r.devices, r.messages_per_peer, r.setup_s
            );
            println!(
                "  raw vodozemac Session::decrypt, all cores {:>9.0} decrypts/s",
                r.raw_decrypts_per_s
            );
            println!(
                "  durable decrypt_olm ({} tasks)          {:>9.0} decrypts/s",
                r.concurrency, r.decrypts_per_s
            );
            println!(
                "  decrypt latency p50 / p99                {:>7.2} / {:.2} ms",
                r.p50_ms, r.p99_ms
            );
            println!(
                "  decrypts per fsync (group commit)        {:>9.1}",
                r.decrypts_per_flush
            );
            if let (Some(cpu), Some(raw), Some(busy)) =
                (r.cpu_us_per_decrypt, r.raw_cpu_us_per_decrypt, r.cpu_busy)
            {
                println!(
                    "  CPU per decrypt: durable / raw           {cpu:>7.1} / {raw:.1} us (cores {:.0} % busy)",
                    busy * 100.0
                );
            }
            println!(
                "  stored session pickle                    {:>9.0} bytes",
                r.session_record_bytes
            );
            println!(
                "  ratio decrypt_olm / raw (goal >= {})    {:>9.2} ({})",
                r.goal_ratio,
                r.ratio_to_raw,
                if r.goal_met { "met" } else { "not met" }
            );
            println!(
                "  fan-out to {} devices, sequential: claimed / reused  {:.1} / {:.1} ms (x{:.2}; {:.0} / {:.0} fsyncs)",
                f.recipients,
                f.claimed_ms,
                f.reused_ms,
                f.claimed_to_reused,
                f.claimed_flushes,
                f.reused_flushes
            );
            println!(
                "  fan-out to {} devices, concurrent: claimed / reused  {:.1} / {:.1} ms (x{:.2}; {:.0} / {:.0} fsyncs)",
                f.recipients,
                f.claimed_ms_concurrent,
                f.reused_ms_concurrent,
                f.claimed_to_reused_concurrent,
                f.claimed_flushes_concurrent,
                f.reused_flushes_concurrent
            );
            write_json(json, &r)
        }
        Scenario::Megolm {
            events,
            shapes,
            session_messages,
            concurrency,
            slices,
            recipients,
            rounds,
            dir,
            json,
        } => {
            let config = megolm::MegolmBench {
                events,
                shapes,
                session_messages,
                concurrency,
                slices,
                recipients,
                rounds,
                dir,
            };
            let r = megolm::run(&config).await?;
            print_megolm(&r);
            write_json(json, &r)
        }
        Scenario::Http { connections, load } => {
            let Load {
                devices,
                claims,
                raw_seconds,
                dir,
                json,
                store,
                postgres_url,
            } = load;
            let server = match store {
                StoreKind::Sled => None,
                StoreKind::Postgres => {
                    Some(bridgekeys_bench::pg::Server::start(postgres_url).await?)
                }
            };
            let mut runs = Vec::new();
            for connections in connections {
                let config = http::HttpBench {
                    devices,
                    connections,
                    claims,
                    raw_seconds,
                    dir: dir.clone(),
                };
                let r = match &server {
                    None => http::run(&config).await,
                    Some(server) => http::run_compared(&config, server).await,
                };
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        if let Some(server) = &server {
                            server.clean_up().await;
                        }
                        return Err(e);
                    }
                };
                print_http(&r);
                runs.push(r);
            }
            if let Some(server) = &server {
                server.clean_up().await;
            }
            match <[_; 1]>::try_from(runs) {
                Ok([r]) => write_json(json, &r),
                Err(runs) => {
                    let sweep = all::HttpSweep { runs };
                    write_json(json.clone(), &sweep)?;
                    if let Some(json) = json {
                        let path = charts::path_beside(&json, charts::CLAIMS_VS_CONNECTIONS);
                        charts::claims_vs_connections(
                            &path,
                            &charts::connection_points(&sweep.runs),
                        )?;
                        println!("wrote {}", path.display());
                    }
                    Ok(())
                }
            }
        }
        Scenario::Crash {
            cycles,
            devices,
            max_keys_before_kill,
            seed,
            power_loss,
            peers,
            messages_per_peer,
            dir,
            store,
            processes,
            postgres_url,
            json,
        } => {
            let exe = std::env::current_exe()?;
            if store == CrashStore::Postgres {
                anyhow::ensure!(
                    power_loss.is_none() && peers.is_none() && messages_per_peer.is_none(),
                    "--power-loss, --peers and --messages-per-peer are for --store sled only: \
                     the shared-database torture runs claims under SIGKILL"
                );
                let config = crash::shared::SharedConfig {
                    processes,
                    cycles,
                    devices,
                    max_keys_before_kill,
                    exe,
                    seed,
                    postgres_url,
                };
                let r = crash::shared::run(&config).await?;
                print_crash_shared(&r);
                return write_json(json, &r);
            }
            anyhow::ensure!(
                processes == 1,
                "--processes {processes}: more than one process needs --store postgres \
                 (a sled store is held by one process)"
            );
            anyhow::ensure!(
                postgres_url.is_none(),
                "--postgres-url needs --store postgres"
            );
            let config = crash::CrashConfig {
                cycles,
                devices,
                max_keys_before_kill,
                exe,
                dir,
                seed,
                power_loss,
                peers: peers.unwrap_or(8),
                messages_per_peer: messages_per_peer.unwrap_or(4),
            };
            let r = crash::run(&config).await?;
            println!("scenario: crash (seed {})", r.seed);
            println!("  SIGKILL cycles survived                 {:>10}", r.cycles);
            if let Some(model) = &r.power_loss {
                println!(
                    "  power cuts survived ({model:<6})           {:>10}",
                    r.power_cuts
                );
                println!(
                    "  of which during start-up                {:>10}",
                    r.startup_cuts
                );
                println!(
                    "  names / blocks the cuts took away       {:>10} / {}",
                    r.names_lost_to_cuts, r.blocks_lost_to_cuts
                );
            }
            println!(
                "  keys reported, all verified after kill  {:>10} / {}",
                r.keys_reported, r.keys_verified
            );
            let o = &r.sessions;
            println!(
                "  Olm messages acknowledged, all verified {:>10} / {} replays refused",
                o.acknowledged, o.replays_refused
            );
            println!(
                "    of which opened a session / normal    {:>10} / {}",
                o.sessions_opened, o.normal_acknowledged
            );
            println!(
                "  puppet replies / answers read by peers  {:>10} / {}",
                o.replies_read, o.answers_read
            );
            println!(
                "    of which on an older session          {:>10}",
                o.replies_on_older_session
            );
            println!(
                "  next messages decrypted after kills     {:>10} ({} peers)",
                o.next_messages_decrypted, o.peers
            );
            println!(
                "  second open while held refused          {:>10}",
                r.second_open_refused
            );
            write_json(json, &r)
        }
        Scenario::Synapse {
            local_devices,
            keys_per_device,
            puppets,
            connections,
            claims,
            serial_claims,
            dir,
            json,
        } => {
            let config = bridgekeys_bench::synapse::SynapseBench {
                local_devices,
                keys_per_device,
                puppets,
                connections,
                claims,
                serial_claims,
                dir,
            };
            let r = bridgekeys_bench::synapse::run(&config).await?;
            r.print();
            write_json(json, &r)?;
            anyhow::ensure!(r.failures() == 0, "{} claims failed a check", r.failures());
            Ok(())
        }
        Scenario::PgClaimChild {
            store_id,
            devices,
            claims,
            concurrency,
        } => bridgekeys_bench::pg::child(store_id, devices, claims, concurrency).await,
        Scenario::CrashChild {
            dir,
            postgres,
            devices,
            store_id,
        } => match (postgres, dir, store_id) {
            (Some(url), _, Some(id)) => crash::shared::child(url, id, devices).await,
            (None, Some(dir), store_id) => crash::child(dir, devices, store_id).await,
            _ => anyhow::bail!("crash-child needs --dir, or --postgres with --store-id"),
        },
    }
}
