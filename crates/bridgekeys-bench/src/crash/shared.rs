//! Crash torture on one shared PostgreSQL database (issue 15): several
//! bridge processes claim keys for the same puppet devices at once, and
//! each is killed with SIGKILL at random moments and restarted while the
//! others keep claiming.
//!
//! The parent creates the [`PgStore`] and the puppet devices (once, so the
//! children never race creating them), then runs `processes` children
//! (`crash-child --postgres URL --store-id ID`) that each claim, in several
//! tasks, for random devices of the same set, and print a key only after
//! its claim returned. Every cycle picks one child, waits for it to report
//! a random number of new keys, kills it at a random moment and restarts
//! it. The parent then checks, on its own [`AccountManager`] over the same
//! database, every key the killed child reported: the signature is the
//! device's, and a pre-key message on the key decrypts (which consumes it).
//! At the end every child is killed and the remaining keys are checked the
//! same way. Across the whole run no key id and no public key may be
//! reported twice.
//!
//! Claims only: no Olm sessions with peers here (the sled torture has them).

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use bridgekeys_olm::{AccountManager, ManagerConfig, canonical_json_for_signing};
use bridgekeys_store::{PgStore, PgStoreConfig, StoreId, StoreKey};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ruma::OneTimeKeyAlgorithm;
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use super::{KEY_ENV, hex, unhex};
use crate::{
    progress::Progress,
    support::{PEER_USER, body_of, prekey_message, public_key, puppet},
};

/// Claiming tasks in each child.
const CLAIMERS: u64 = 4;

/// Connections per pool of each child: one per claiming task (three
/// processes and the parent stay well under the server's 100).
const CHILD_POOL_SIZE: usize = 4;

/// How long the parent waits for the chosen child's keys before it
/// declares the run stuck.
const STUCK_AFTER: Duration = Duration::from_secs(120);

/// Events the parent buffers from all children before their readers wait.
const EVENT_BUFFER: usize = 64;

/// Lines a child buffers before its claimers wait for its stdout.
const CHILD_LINE_BUFFER: usize = 8;

/// Keys a child may claim ahead of the parent: the parent hands back one
/// key's credit (a byte on the child's stdin) for every key line it took.
/// Without it the children, whose claims are much cheaper than the
/// parent's checks (each consumes a key with a synchronous commit), would
/// fill their pipes while the parent checks a killed child's keys, and the
/// run's work would be set by pipe sizes rather than by the kill schedule.
const CREDIT: usize = 32;

/// The database the testkit's throwaway server gets for the run.
const DATABASE: &str = "bridgekeys_crash_shared";

/// Knobs of a shared-database crash run.
#[derive(Clone, Debug)]
pub struct SharedConfig {
    /// Child processes claiming at once.
    pub processes: usize,
    /// How many kill/restart cycles (one child killed in each).
    pub cycles: usize,
    /// Puppet devices every child claims for.
    pub devices: usize,
    /// Kill after a random number of new keys in `1..=max_keys_before_kill`.
    pub max_keys_before_kill: usize,
    /// The `bridgekeys-bench` executable (the children run `crash-child`).
    pub exe: PathBuf,
    /// Seed of the kill schedule (random if `None`); printed for replays.
    pub seed: Option<u64>,
    /// An existing, empty database to use; `None`: the testkit starts a
    /// throwaway server and creates one.
    pub postgres_url: Option<String>,
}

/// What a shared-database crash run saw.
#[derive(Debug, Default, serde::Serialize)]
pub struct SharedReport {
    /// The backend: `postgres`.
    pub store: String,
    /// Child processes claiming at once.
    pub processes: usize,
    /// Cycles completed (one child killed and restarted in each).
    pub cycles: usize,
    /// SIGKILLs sent: one per cycle, and one per child at the end.
    pub kills: usize,
    /// Keys the children reported as returned.
    pub keys_reported: usize,
    /// Of those, keys that started an Olm session after their reporter was
    /// killed (all of them, or the run fails).
    pub keys_verified: usize,
    /// Of those, keys whose signature by the device's ed25519 key verified.
    pub signatures_verified: usize,
    /// Key ids reported more than once (ids are store-wide; must be 0).
    pub repeated_key_ids: usize,
    /// Public keys reported more than once (must be 0).
    pub repeated_keys: usize,
    /// The seed of the kill schedule.
    pub seed: u64,
}

/// A key a child reported: device index, key id, public key, signature.
struct Reported {
    device: usize,
    key_id: String,
    public_key: Curve25519PublicKey,
    signature: Ed25519Signature,
}

fn parse_key<'a>(mut parts: impl Iterator<Item = &'a str>) -> anyhow::Result<Reported> {
    let mut next = |what: &str| parts.next().ok_or_else(|| anyhow::anyhow!("no {what}"));
    let device = next("device")?.parse()?;
    let key_id = next("key id")?.to_owned();
    let public_key = Curve25519PublicKey::from_base64(next("key")?)?;
    let signature = Ed25519Signature::from_base64(next("signature")?)?;
    Ok(Reported {
        device,
        key_id,
        public_key,
        signature,
    })
}

/// What a child's reader thread hands the parent.
enum Event {
    /// A complete (newline-terminated) line of child `child`'s run number
    /// `generation`.
    Line {
        child: usize,
        generation: usize,
        line: Vec<u8>,
    },
    /// That run's stdout closed (it exited or was killed).
    Closed { child: usize, generation: usize },
}

/// One running child.
struct Running {
    process: Child,
    /// Where the parent hands back credit (`None` once a write failed).
    credit: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
    generation: usize,
    /// Whether the parent is killing it (its stdout closing is expected).
    killing: bool,
    ready: bool,
    /// Keys it reported in this run, so far.
    reported: usize,
    /// Its reported keys, not checked yet.
    pending: Vec<Reported>,
}

/// Start child `index`'s run number `generation`, its output read into `tx`.
fn spawn(
    config: &SharedConfig,
    url: &str,
    store_id: StoreId,
    key: &StoreKey,
    index: usize,
    generation: usize,
    tx: &mpsc::SyncSender<Event>,
) -> anyhow::Result<Running> {
    let mut process = Command::new(&config.exe)
        .arg("crash-child")
        .arg("--postgres")
        .arg(url)
        .arg("--store-id")
        .arg(store_id.to_string())
        .arg("--devices")
        .arg(config.devices.to_string())
        .env(KEY_ENV, hex(key.as_bytes()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a crash child")?;
    let stdout = process
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no child stdout"))?;
    let credit = process.stdin.take();
    let tx = tx.clone();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match stdout.read_until(b'\n', &mut line) {
                // A line cut by the kill has no newline: it was never fully
                // reported, so it does not count.
                Ok(n) if n > 0 && line.ends_with(b"\n") => {
                    let event = Event::Line {
                        child: index,
                        generation,
                        line,
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(Event::Closed {
                        child: index,
                        generation,
                    });
                    return;
                }
            }
        }
    });
    Ok(Running {
        process,
        credit,
        reader: Some(reader),
        generation,
        killing: false,
        ready: false,
        reported: 0,
        pending: Vec::new(),
    })
}

/// The parent's view of the run.
struct State {
    children: Vec<Running>,
    /// Every key id reported, with the child and device that reported it.
    key_ids: HashMap<String, (usize, usize)>,
    public_keys: HashSet<[u8; 32]>,
    /// The first few repeats, for the failure message.
    repeats: Vec<String>,
    report: SharedReport,
}

impl State {
    /// Take one event of a child's reader.
    fn take(&mut self, event: Event) -> anyhow::Result<()> {
        let (index, generation) = match &event {
            Event::Line {
                child, generation, ..
            }
            | Event::Closed { child, generation } => (*child, *generation),
        };
        let child = self
            .children
            .get_mut(index)
            .ok_or_else(|| anyhow::anyhow!("output of unknown child {index}"))?;
        anyhow::ensure!(
            child.generation == generation,
            "child {index}: output of its run {generation} after it was restarted"
        );
        let line = match event {
            Event::Closed { .. } => {
                anyhow::ensure!(
                    child.killing,
                    "child {index} (run {generation}) exited by itself"
                );
                return Ok(());
            }
            Event::Line { line, .. } => line,
        };
        let line = std::str::from_utf8(&line)?;
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("READY") => child.ready = true,
            Some("ERROR") => anyhow::bail!("child {index} failed: {}", line.trim_end()),
            Some("KEY") => {
                let key = parse_key(parts).with_context(|| format!("child {index}: {line:?}"))?;
                anyhow::ensure!(child.ready, "child {index} reported a key before READY");
                child.reported += 1;
                // A killed child's stdin refuses the write: no more credit.
                if let Some(stdin) = &mut child.credit
                    && stdin.write_all(b"+").is_err()
                {
                    child.credit = None;
                }
                self.report.keys_reported += 1;
                let mut repeated = false;
                if let Some((other, device)) =
                    self.key_ids.insert(key.key_id.clone(), (index, key.device))
                {
                    repeated = true;
                    self.report.repeated_key_ids += 1;
                    self.repeats.push(format!(
                        "key id {} reported by child {other} (device {device}) and again by \
                         child {index} (device {})",
                        key.key_id, key.device
                    ));
                }
                if !self.public_keys.insert(key.public_key.to_bytes()) {
                    repeated = true;
                    self.report.repeated_keys += 1;
                    self.repeats.push(format!(
                        "public key {} reported twice (again by child {index}, key id {})",
                        key.public_key.to_base64(),
                        key.key_id
                    ));
                }
                // The first report of a key is checked; a repeat only counted.
                if !repeated {
                    child.pending.push(key);
                }
            }
            _ => anyhow::bail!("child {index}: unexpected output {line:?}"),
        }
        Ok(())
    }

    /// SIGKILL child `index`, wait for it and take all it printed; its
    /// unchecked keys are returned.
    fn kill(&mut self, index: usize, rx: &mpsc::Receiver<Event>) -> anyhow::Result<Vec<Reported>> {
        let child = &mut self.children[index];
        child.killing = true;
        child.process.kill()?; // SIGKILL on Unix
        child.process.wait()?;
        let reader = child.reader.take();
        self.report.kills += 1;
        // Take events until the killed run's reader has handed over all it
        // read (it may be waiting for room in the channel).
        if let Some(reader) = reader {
            while !reader.is_finished() {
                match rx.recv_timeout(Duration::from_millis(10)) {
                    Ok(event) => self.take(event)?,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            let _ = reader.join();
        }
        // Everything the killed run printed is in the channel now (with
        // whatever the others printed meanwhile).
        for event in rx.try_iter().collect::<Vec<_>>() {
            self.take(event)?;
        }
        Ok(std::mem::take(&mut self.children[index].pending))
    }
}

/// Run the torture. Fails (with the reason and the seed) on the first
/// broken promise, and on any repeated key id or key at the end.
pub async fn run(config: &SharedConfig) -> anyhow::Result<SharedReport> {
    anyhow::ensure!(config.processes >= 1, "--processes must be at least 1");
    anyhow::ensure!(config.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(
        config.max_keys_before_kill >= 1,
        "--max-keys-before-kill must be at least 1"
    );
    let seed = config.seed.unwrap_or_else(rand::random);
    let (server, url) = match &config.postgres_url {
        Some(url) => (None, url.clone()),
        None => {
            // The torture kills the bridge processes, never the database:
            // what a commit made visible stays whatever the server's
            // flushes, so the throwaway server need not flush.
            let options = bridgekeys_testkit::PostgresOptions {
                fsync: false,
                ..bridgekeys_testkit::PostgresOptions::default()
            };
            let server = bridgekeys_testkit::Postgres::start_with(options)
                .await
                .context("starting a throwaway PostgreSQL server")?;
            let url = server.create_database(DATABASE).await?;
            (Some(server), url)
        }
    };
    let result = cycles(config, seed, &url).await;
    let stopped = match server {
        Some(server) => server.stop().await.map_err(anyhow::Error::from),
        None => Ok(()),
    };
    let report = result.map_err(|e| {
        e.context(format!(
            "shared-database crash torture failed (seed {seed})"
        ))
    })?;
    stopped.context("stopping the throwaway PostgreSQL server")?;
    Ok(report)
}

/// A manager that keeps every key until it is used: the torture keeps the
/// keys a child reported unchecked until that child is killed, and the
/// bound's eviction of the oldest (deliberate, and counted) would show as
/// lost keys.
fn manager_config() -> ManagerConfig {
    let mut config = ManagerConfig::default();
    config.max_outstanding_keys = usize::MAX / 2;
    config
}

async fn cycles(config: &SharedConfig, seed: u64, url: &str) -> anyhow::Result<SharedReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let key = StoreKey::generate();
    let store = PgStore::create(PgStoreConfig::new(url, key.clone()))
        .context("creating the store (the database must be empty)")?;
    let store_id = store.id();
    let manager = Arc::new(AccountManager::new(Arc::new(store), manager_config()));
    let mut ed25519 = Vec::with_capacity(config.devices);
    for i in 0..config.devices {
        let (user, device) = puppet(i)?;
        manager.create_device(&user, &device).await?;
        ed25519.push(manager.identity_keys(&user, &device)?.ed25519);
    }
    let ed25519 = Arc::new(ed25519);

    let (tx, rx) = mpsc::sync_channel::<Event>(EVENT_BUFFER);
    let mut state = State {
        children: Vec::with_capacity(config.processes),
        key_ids: HashMap::new(),
        public_keys: HashSet::new(),
        repeats: Vec::new(),
        report: SharedReport {
            store: "postgres".to_owned(),
            processes: config.processes,
            seed,
            ..SharedReport::default()
        },
    };
    for index in 0..config.processes {
        let child = spawn(config, url, store_id, &key, index, 0, &tx)?;
        state.children.push(child);
    }
    let outcome = hammer(
        config,
        &mut rng,
        &mut state,
        &rx,
        &manager,
        &ed25519,
        |i, g| spawn(config, url, store_id, &key, i, g, &tx),
    )
    .await;
    if outcome.is_err() {
        // Leave no child behind.
        for child in &mut state.children {
            let _ = child.process.kill();
            let _ = child.process.wait();
        }
    }
    outcome?;
    if !state.repeats.is_empty() {
        anyhow::bail!(
            "{} key ids and {} keys reported twice: {}; report: {}",
            state.report.repeated_key_ids,
            state.report.repeated_keys,
            state
                .repeats
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
            serde_json::to_string(&state.report)?
        );
    }
    Ok(state.report)
}

/// The cycles, then the final kills and checks.
async fn hammer(
    config: &SharedConfig,
    rng: &mut StdRng,
    state: &mut State,
    rx: &mpsc::Receiver<Event>,
    manager: &Arc<AccountManager>,
    ed25519: &Arc<Vec<Ed25519PublicKey>>,
    respawn: impl Fn(usize, usize) -> anyhow::Result<Running>,
) -> anyhow::Result<()> {
    let progress = Progress::new("crash (shared database): survived", "cycles", config.cycles);
    for cycle in 0..config.cycles {
        let victim = rng.gen_range(0..config.processes);
        let target =
            state.children[victim].reported + rng.gen_range(1..=config.max_keys_before_kill);
        let deadline = Instant::now() + STUCK_AFTER;
        while state.children[victim].reported < target {
            let wait = deadline.saturating_duration_since(Instant::now());
            let event = rx.recv_timeout(wait).map_err(|e| {
                anyhow::anyhow!(
                    "cycle {cycle}: child {victim} stopped reporting ({e}) after {} keys",
                    state.children[victim].reported
                )
            })?;
            state
                .take(event)
                .with_context(|| format!("cycle {cycle}"))?;
        }
        // A random moment inside the claim loop.
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
        let keys = state
            .kill(victim, rx)
            .with_context(|| format!("cycle {cycle}"))?;
        verify(manager, ed25519, keys, &mut state.report)
            .await
            .with_context(|| format!("cycle {cycle}, after killing child {victim}"))?;
        let generation = state.children[victim].generation + 1;
        state.children[victim] = respawn(victim, generation)?;
        state.report.cycles += 1;
        progress.add(1);
    }
    progress.finish();
    for index in 0..state.children.len() {
        let keys = state.kill(index, rx).context("final kills")?;
        verify(manager, ed25519, keys, &mut state.report)
            .await
            .with_context(|| format!("after the final kill of child {index}"))?;
    }
    Ok(())
}

/// Check reported keys on the parent's manager: the signature is the
/// device's, then a pre-key message on the key decrypts.
async fn verify(
    manager: &Arc<AccountManager>,
    ed25519: &Arc<Vec<Ed25519PublicKey>>,
    keys: Vec<Reported>,
    report: &mut SharedReport,
) -> anyhow::Result<()> {
    let mut checks = tokio::task::JoinSet::new();
    for key in keys {
        let signer = ed25519.get(key.device).ok_or_else(|| {
            anyhow::anyhow!("key {} of unknown device {}", key.key_id, key.device)
        })?;
        // What the device signed: the key object without its signatures.
        let signed =
            canonical_json_for_signing(&serde_json::json!({ "key": key.public_key.to_base64() }))?;
        signer
            .verify(signed.as_bytes(), &key.signature)
            .map_err(|e| {
                anyhow::anyhow!(
                    "key {} of device {}: bad signature: {e}",
                    key.key_id,
                    key.device
                )
            })?;
        report.signatures_verified += 1;
        let manager = manager.clone();
        checks.spawn(async move {
            let (user, device_id) = puppet(key.device)?;
            let identity = manager.identity_keys(&user, &device_id)?;
            let (sender, message) =
                prekey_message(&user, identity, key.public_key, "after the kill")?;
            let peer_user = ruma::UserId::parse(PEER_USER)?;
            let decrypted = manager
                .decrypt_olm((&user, &device_id), &peer_user, sender, &message, None)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("key {} of device {} lost: {e}", key.key_id, key.device)
                })?;
            anyhow::ensure!(body_of(&decrypted)? == "after the kill");
            anyhow::Ok(())
        });
    }
    while let Some(result) = checks.join_next().await {
        result??;
        report.keys_verified += 1;
    }
    Ok(())
}

/// The child of the shared-database torture: open the store (never create
/// it; the parent created it and the devices), then claim for random
/// devices in several tasks until killed, printing each key, with its
/// signature, after its claim returned.
pub async fn child(url: String, store_id: StoreId, devices: usize) -> anyhow::Result<()> {
    anyhow::ensure!(devices >= 1, "--devices must be at least 1");
    let key = StoreKey::new(unhex(&std::env::var(KEY_ENV)?)?);
    let mut store_config = PgStoreConfig::new(url, key).expect_id(store_id);
    store_config.pool_size = CHILD_POOL_SIZE;
    let store = PgStore::open(store_config)?;
    let manager = Arc::new(AccountManager::new(Arc::new(store), manager_config()));
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    drop(out);

    // Claim only on credit from the parent ([`CREDIT`]): a byte on stdin
    // is one more key.
    let credit = Arc::new(tokio::sync::Semaphore::new(CREDIT));
    let refill = credit.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stdin, &mut buf) {
            refill.add_permits(n);
        }
    });
    // Bounded: when the parent stops reading, the claimers wait.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(CHILD_LINE_BUFFER);
    for worker in 0..CLAIMERS {
        let (manager, tx, credit) = (manager.clone(), tx.clone(), credit.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(rand::random::<u64>() ^ worker);
            loop {
                let device = rng.gen_range(0..devices);
                let count = rng.gen_range(1..=3u32);
                match credit.acquire_many(count).await {
                    Ok(permits) => permits.forget(),
                    Err(_) => return,
                }
                match claim(&manager, device, count as usize).await {
                    Ok(lines) => {
                        for line in lines {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let error = format!("{e:#}").replace('\n', " ");
                        let _ = tx.send(format!("ERROR {error}\n")).await;
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    while let Some(line) = rx.recv().await {
        out.write_all(line.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// One claim of `count` keys for puppet `device`: the `KEY` lines to print.
async fn claim(
    manager: &AccountManager,
    device: usize,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let (user, device_id) = puppet(device)?;
    let keys = manager
        .claim(
            &user,
            &device_id,
            &OneTimeKeyAlgorithm::SignedCurve25519,
            count,
        )
        .await?;
    let signer = format!("ed25519:{device_id}");
    keys.iter()
        .map(|k| {
            let signed = serde_json::to_value(&k.key)?;
            let signature = signed["signatures"][user.as_str()][signer.as_str()]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("claimed key {} is not signed", k.key_id))?
                .to_owned();
            Ok(format!(
                "KEY {device} {} {} {signature}\n",
                k.key_id,
                public_key(k)?.to_base64()
            ))
        })
        .collect()
}
