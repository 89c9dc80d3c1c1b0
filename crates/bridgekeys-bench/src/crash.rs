//! Crash torture: a child process claims keys in a loop and is killed with
//! SIGKILL at random moments; after every kill the parent reopens the store
//! and checks the two promises of the claim path:
//!
//! * no key id was ever issued twice for a device, across all restarts;
//! * every key the child reported as returned (it reports only after the
//!   claim returned, i.e. after the durable write) still starts an Olm
//!   session: its private half survived the kill.
//!
//! Alongside the claims the child opens, answers and advances Olm sessions
//! with peers the parent keeps ([`sessions`]): the parent feeds it the
//! peers' messages on stdin and, after every kill, checks that every
//! plaintext the child acknowledged came from a durable ratchet step (the
//! peer's next message decrypts) that was not rolled back (the acknowledged
//! message is refused in a new delivery).
//!
//! With [`CrashConfig::power_loss`] every kill is also a power cut: the child
//! runs under the `bridgekeys-powercut` shim, and after the kill the store's
//! directory tree is replaced by what a disk would show under the chosen
//! model (only what was synced, file and directory alike; or torn writes).
//! The same two promises must hold, and the store must open every time.
//!
//! [`shared`] is the same torture for several processes on one PostgreSQL
//! database (`crash --store postgres --processes N`).

pub mod sessions;
pub mod shared;

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_powercut::{Disk, Model};
use bridgekeys_store::{SledStore, SledStoreConfig, StoreError, StoreId, StoreKey};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ruma::OneTimeKeyAlgorithm;
use vodozemac::Curve25519PublicKey;

use crate::{
    progress::Progress,
    support::{PEER_USER, body_of, open_existing_manager, prekey_message, public_key, puppet},
};

/// Environment variable that carries the store key to the child (hex).
pub const KEY_ENV: &str = "BRIDGEKEYS_CRASH_STORE_KEY";

/// Knobs of a crash run.
#[derive(Clone, Debug)]
pub struct CrashConfig {
    /// How many kill/restart cycles.
    pub cycles: usize,
    /// Puppet devices the child claims for.
    pub devices: usize,
    /// Kill after a random number of reported keys in `1..=max_keys_before_kill`.
    pub max_keys_before_kill: usize,
    /// The `bridgekeys-bench` executable (the child runs `crash-child`).
    pub exe: PathBuf,
    /// Where the store goes (a temporary directory inside it).
    pub dir: PathBuf,
    /// Seed of the kill schedule (random if `None`); printed for replays.
    pub seed: Option<u64>,
    /// Cut the power at every kill, under this model (`None`: SIGKILL only).
    pub power_loss: Option<Model>,
    /// Peer devices with Olm sessions to the puppets (0: no sessions).
    pub peers: usize,
    /// Messages each peer sends the child per cycle.
    pub messages_per_peer: usize,
}

/// What a crash run saw.
#[derive(Debug, Default, serde::Serialize)]
pub struct CrashReport {
    /// Cycles completed.
    pub cycles: usize,
    /// Keys the children reported as returned.
    pub keys_reported: usize,
    /// Of those, keys that started an Olm session after the kill (all of them, or the run fails).
    pub keys_verified: usize,
    /// Whether a second open of the store while the child held it failed with `Locked`.
    pub second_open_refused: bool,
    /// The seed of the kill schedule.
    pub seed: u64,
    /// The power-loss model, if every kill was also a power cut.
    pub power_loss: Option<String>,
    /// Power cuts survived (the store opened afterwards and kept every key).
    pub power_cuts: usize,
    /// Of those, cuts during the child's start-up (creating or opening the
    /// store, creating devices) rather than under claim load.
    pub startup_cuts: usize,
    /// Over all cuts: file and directory names the cut took away.
    pub names_lost_to_cuts: usize,
    /// Over all cuts: 4 KiB blocks whose content the cut changed.
    pub blocks_lost_to_cuts: usize,
    /// The Olm-session checks.
    pub sessions: sessions::SessionChecks,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> anyhow::Result<[u8; 32]> {
    anyhow::ensure!(s.len() == 64, "store key must be 64 hex digits");
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// One line the child printed, complete (newline-terminated).
enum Report {
    /// The child created the store, with this id.
    Created(StoreId),
    Ready,
    Key {
        device: usize,
        key_id: String,
        public_key: Curve25519PublicKey,
    },
}

fn parse(line: &str) -> anyhow::Result<Report> {
    let mut parts = line.split_whitespace();
    match parts.next() {
        Some("READY") => Ok(Report::Ready),
        Some("CREATED") => Ok(Report::Created(
            parts
                .next()
                .ok_or_else(|| anyhow::anyhow!("no store id"))?
                .parse()?,
        )),
        Some("KEY") => {
            let device = parts
                .next()
                .ok_or_else(|| anyhow::anyhow!("no device"))?
                .parse()?;
            let key_id = parts
                .next()
                .ok_or_else(|| anyhow::anyhow!("no key id"))?
                .to_owned();
            let public_key = Curve25519PublicKey::from_base64(
                parts.next().ok_or_else(|| anyhow::anyhow!("no key"))?,
            )?;
            Ok(Report::Key {
                device,
                key_id,
                public_key,
            })
        }
        _ => anyhow::bail!("unexpected child output {line:?}"),
    }
}

/// A key the child reported: device index, key id, public key.
type Reported = (usize, String, Curve25519PublicKey);

/// What the child printed in one cycle.
#[derive(Default)]
struct Seen {
    keys: Vec<Reported>,
    ready: bool,
    sessions: sessions::ChildOutput,
}

/// Take one line the child printed.
fn take(line: &[u8], seen: &mut Seen, store_id: &mut Option<StoreId>) -> anyhow::Result<()> {
    let line = std::str::from_utf8(line)?;
    if seen.sessions.take(line)? {
        return Ok(());
    }
    match parse(line)? {
        Report::Ready => seen.ready = true,
        Report::Created(id) => *store_id = Some(id),
        Report::Key {
            device,
            key_id,
            public_key,
        } => seen.keys.push((device, key_id, public_key)),
    }
    Ok(())
}

/// Note key ids issued for `device`, failing on one issued before.
fn issue(
    issued: &mut HashMap<usize, HashSet<String>>,
    cycle: usize,
    device: usize,
    key_id: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        issued.entry(device).or_default().insert(key_id.to_owned()),
        "cycle {cycle}: key id {key_id} of device {device} was issued twice"
    );
    Ok(())
}

/// Run the torture. Fails (with the reason) on the first broken promise.
pub async fn run(config: &CrashConfig) -> anyhow::Result<CrashReport> {
    let seed = config.seed.unwrap_or_else(rand::random);
    std::fs::create_dir_all(&config.dir)?;
    let base = tempfile::tempdir_in(&config.dir)?;
    match cycles(config, seed, base.path()).await {
        Ok(report) => Ok(report),
        Err(e) => {
            // Keep the evidence: the tree as the failing open saw it, and
            // the shim's image.
            let kept = base.keep();
            Err(e.context(format!(
                "crash torture failed (seed {seed}; the store and the image are kept in {})",
                kept.display()
            )))
        }
    }
}

async fn cycles(config: &CrashConfig, seed: u64, base: &Path) -> anyhow::Result<CrashReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    // The store lives in `data/store`; under power loss `data` is the
    // simulated disk and `work` holds the shim's image of it.
    let mut disk = Disk::new(base.join("data"), base.join("work"))?;
    let data = disk.root().to_owned();
    let key = StoreKey::generate();
    // The first child creates the store, explicitly, as `init` does (under
    // power loss: on the simulated disk, so the first cut tests creation);
    // every later open names its id.
    let mut store_id: Option<StoreId> = None;
    let mut issued: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut peers = sessions::Peers::new(config.peers, config.messages_per_peer);
    // Whether a child said READY: its devices are durable from then on.
    let mut devices_created = false;
    let mut report = CrashReport {
        seed,
        power_loss: config.power_loss.map(|m| format!("{m:?}").to_lowercase()),
        ..CrashReport::default()
    };

    let progress = Progress::new("crash: survived", "cycles", config.cycles);
    for cycle in 0..config.cycles {
        let mut command = match config.power_loss {
            Some(_) => disk.command(&config.exe)?,
            None => Command::new(&config.exe),
        };
        let mut child = command
            .arg("crash-child")
            .arg("--dir")
            .arg(&data)
            .arg("--devices")
            .arg(config.devices.to_string())
            .args(match store_id {
                Some(id) => vec!["--store-id".to_owned(), id.to_string()],
                None => Vec::new(),
            })
            .env(KEY_ENV, hex(key.as_bytes()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no child stdout"))?;
        // The peers' messages of this cycle, on the child's stdin (a write
        // to a killed child fails, which ends the writer).
        let script = peers.script(cycle)?;
        let olm_lines = script.len();
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no child stdin"))?;
        let writer = std::thread::spawn(move || {
            for line in script {
                if stdin.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match stdout.read_until(b'\n', &mut line) {
                    // A line cut by the kill has no newline: it was never
                    // fully reported, so it does not count.
                    Ok(n) if n > 0 && line.ends_with(b"\n") => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });

        // Under power loss, one cycle in four (the first among them) cuts
        // at a random moment of start-up instead: store creation (first
        // cycle), recovery, the checks at open, device creation.
        let startup_cut = config.power_loss.is_some() && cycle % 4 == 0;
        let mut seen = Seen::default();
        if startup_cut {
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..20_000)));
        } else {
            // Kill after a random number of keys and of acknowledged Olm
            // messages (when there are any this cycle).
            let kill_after = rng.gen_range(1..=config.max_keys_before_kill);
            let acks_before_kill = match olm_lines {
                0 => 0,
                n => rng.gen_range(1..=n),
            };
            let deadline = Instant::now() + Duration::from_secs(120);
            while seen.keys.len() < kill_after || seen.sessions.acks.len() < acks_before_kill {
                let wait = deadline.saturating_duration_since(Instant::now());
                let line = match rx.recv_timeout(wait) {
                    Ok(line) => line,
                    Err(e) => {
                        let _ = child.kill();
                        anyhow::bail!(
                            "cycle {cycle}: child stopped reporting ({e}) after {} keys and {} \
                             Olm messages",
                            seen.keys.len(),
                            seen.sessions.acks.len()
                        );
                    }
                };
                if let Err(e) = take(&line, &mut seen, &mut store_id) {
                    let _ = child.kill();
                    return Err(e.context(format!("cycle {cycle}")));
                }
            }
            anyhow::ensure!(
                seen.ready,
                "cycle {cycle}: child reported keys before READY"
            );
            if !report.second_open_refused {
                // The child holds the store: a second process must be refused clearly.
                let id = store_id.ok_or_else(|| anyhow::anyhow!("cycle {cycle}: no store id"))?;
                let mut config =
                    SledStoreConfig::new(data.join("store"), key.clone()).expect_id(id);
                config.lock_wait = Duration::ZERO;
                match SledStore::open(config) {
                    Err(StoreError::Locked { path }) => {
                        anyhow::ensure!(path.starts_with(&data), "Locked names {path:?}");
                        report.second_open_refused = true;
                    }
                    Err(e) => anyhow::bail!("second open failed with the wrong error: {e}"),
                    Ok(_) => anyhow::bail!("second open of a held store succeeded"),
                }
            }
            // A random moment inside the claim loop.
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
        }
        child.kill()?; // SIGKILL on Unix
        child.wait()?;
        let _ = reader.join();
        let _ = writer.join();
        for line in rx.try_iter() {
            take(&line, &mut seen, &mut store_id)
                .map_err(|e| e.context(format!("cycle {cycle}")))?;
        }
        let Seen {
            keys,
            ready,
            sessions: olm_output,
        } = seen;
        devices_created |= ready;

        if let Some(model) = config.power_loss {
            let cut = disk.cut(model, &mut rng)?;
            anyhow::ensure!(
                cut.shim_started || (!ready && keys.is_empty()),
                "cycle {cycle}: the child ran but the power-cut shim did not start in it"
            );
            report.names_lost_to_cuts += cut.names_lost;
            report.blocks_lost_to_cuts += cut.blocks_lost;
            if startup_cut {
                report.startup_cuts += 1;
            }
        }
        let store_id = match store_id {
            Some(id) => id,
            // Cut before the child said which store it created: if the
            // store is there, learn its id as an operator would; if it is
            // not, creation was cut short and the next child creates it.
            None if data.join("store").exists() => {
                let id = SledStore::open(SledStoreConfig::new(data.join("store"), key.clone()))
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cycle {cycle}: the new store did not open after the cut: {e}"
                        )
                    })?
                    .id();
                store_id = Some(id);
                id
            }
            None => {
                anyhow::ensure!(
                    keys.is_empty() && olm_output.acks.is_empty(),
                    "cycle {cycle}: keys or Olm messages without a store"
                );
                report.cycles += 1;
                report.power_cuts += 1;
                progress.add(1);
                continue;
            }
        };
        let manager = Arc::new(open_existing_manager(&data, &key, store_id).map_err(|e| {
            anyhow::anyhow!("cycle {cycle}: the store did not open after the kill: {e}")
        })?);
        let mut checks = tokio::task::JoinSet::new();
        for (device, key_id, otk) in keys {
            issue(&mut issued, cycle, device, &key_id)?;
            let manager = manager.clone();
            checks.spawn(async move {
                let (user, device_id) = puppet(device)?;
                let identity = manager.identity_keys(&user, &device_id)?;
                let (sender, message) = prekey_message(&user, identity, otk, "after the kill")?;
                let peer_user = ruma::UserId::parse(PEER_USER)?;
                let decrypted = manager
                    .decrypt_olm((&user, &device_id), &peer_user, sender, &message, None)
                    .await
                    .map_err(|e| anyhow::anyhow!("key {key_id} of device {device} lost: {e}"))?;
                anyhow::ensure!(body_of(&decrypted)? == "after the kill");
                anyhow::Ok(())
            });
            report.keys_reported += 1;
        }
        while let Some(result) = checks.join_next().await {
            result??;
            report.keys_verified += 1;
        }
        peers
            .verify(&manager, cycle, olm_output, &mut report.sessions)
            .await?;
        // Peers not created yet (the first time the devices are there) get
        // a session started on a key claimed here, for the next child; or
        // one peer starts a new session.
        if devices_created {
            let mut claimed = peers.add_missing(&manager, config.devices).await?;
            if claimed.is_empty() {
                claimed.extend(peers.renew(&manager, cycle).await?);
            }
            for (device, key_id) in claimed {
                issue(&mut issued, cycle, device, &key_id)?;
            }
        }
        drop(manager);
        if config.power_loss.is_some() {
            // The next child's shim takes the tree as durable: make it so
            // (the checks above opened, recovered and wrote the store).
            bridgekeys_store::durable::sync_tree(&data)?;
            report.power_cuts += 1;
        }
        report.cycles += 1;
        progress.add(1);
    }
    progress.finish();
    Ok(report)
}

/// The child: claim keys for random devices until killed (or a bounded
/// number of claims), reporting each key after its claim returned; decrypt
/// the Olm messages read from stdin, reporting each plaintext after
/// `decrypt_olm` returned ([`sessions::handle`]).
pub async fn child(dir: PathBuf, devices: usize, store_id: Option<StoreId>) -> anyhow::Result<()> {
    let key = StoreKey::new(unhex(&std::env::var(KEY_ENV)?)?);
    let manager = match store_id {
        Some(id) => open_existing_manager(&dir, &key, id)?,
        None => {
            let store = SledStore::create(SledStoreConfig::new(dir.join("store"), key.clone()))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "CREATED {}", store.id())?;
            out.flush()?;
            AccountManager::new(Arc::new(store), ManagerConfig::default())
        }
    };
    let manager = Arc::new(manager);
    for i in 0..devices {
        let (user, device) = puppet(i)?;
        manager.create_device(&user, &device).await?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    drop(out);

    // Several claimers at once, so the kill lands amid concurrent writes.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for worker in 0..4u64 {
        let (manager, tx) = (manager.clone(), tx.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(rand::random::<u64>() ^ worker);
            for _ in 0..250_000 {
                let device = rng.gen_range(0..devices);
                let (user, device_id) = puppet(device)?;
                let count = rng.gen_range(1..=3);
                let keys = manager
                    .claim(
                        &user,
                        &device_id,
                        &OneTimeKeyAlgorithm::SignedCurve25519,
                        count,
                    )
                    .await?;
                for k in keys {
                    let line = format!(
                        "KEY {device} {} {}\n",
                        k.key_id,
                        public_key(&k)?.to_base64()
                    );
                    if tx.send(line).is_err() {
                        return anyhow::Ok(());
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    // Two Olm workers, each peer's messages in order on one of them.
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        workers.push(line_tx);
        let (manager, tx) = (manager.clone(), tx.clone());
        tokio::spawn(async move {
            while let Some(line) = lines.recv().await {
                if let Err(e) = sessions::handle(&manager, &line, &tx).await {
                    let error = format!("{e:#}").replace('\n', " ");
                    let _ = tx.send(format!("ERROR {error}\n"));
                    return;
                }
            }
        });
    }
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            let peer: usize = line
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if workers[peer % workers.len()].send(line).is_err() {
                return;
            }
        }
    });
    drop(tx);
    let mut out = std::io::stdout().lock();
    while let Some(line) = rx.recv().await {
        out.write_all(line.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}
