//! Small pieces the scenarios share.

use std::{
    future::Future,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::progress::Progress;
use bridgekeys_olm::{AccountManager, ClaimedKey, ManagerConfig, sign_json};
use bridgekeys_store::{SledStore, SledStoreConfig, StoreError, StoreId, StoreKey};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ruma::{DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, UserId};
use vodozemac::{
    Curve25519PublicKey, Ed25519PublicKey,
    olm::{Account, OlmMessage, SessionConfig},
};

/// Open a sled store at `dir/store` (with the group-commit gather time from
/// `BRIDGEKEYS_COMMIT_GATHER_US` and sled's cache size from
/// `BRIDGEKEYS_CACHE_MB`, if set, for experiments).
pub fn open_store(dir: &Path, key: &StoreKey) -> Result<Arc<SledStore>, StoreError> {
    let mut config = SledStoreConfig::new(dir.join("store"), key.clone());
    if let Some(mb) = std::env::var("BRIDGEKEYS_CACHE_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        config.cache_capacity = mb * 1024 * 1024;
    }
    if let Some(us) = std::env::var("BRIDGEKEYS_COMMIT_GATHER_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.commit_gather = Duration::from_micros(us);
    }
    Ok(Arc::new(SledStore::open_or_create(config)?))
}

/// Open the existing store at `dir/store`, which must have id `id`, as a
/// bridge does after `init` (never creating one), and a manager over it.
pub fn open_existing_manager(
    dir: &Path,
    key: &StoreKey,
    id: StoreId,
) -> Result<AccountManager, StoreError> {
    let config = SledStoreConfig::new(dir.join("store"), key.clone()).expect_id(id);
    Ok(AccountManager::new(
        Arc::new(SledStore::open(config)?),
        ManagerConfig::default(),
    ))
}

/// Open a manager over a sled store at `dir/store`.
pub fn open_manager(dir: &Path, key: &StoreKey) -> Result<AccountManager, StoreError> {
    Ok(AccountManager::new(
        open_store(dir, key)?,
        ManagerConfig::default(),
    ))
}

/// The puppet user and device of index `i`.
pub fn puppet(i: usize) -> anyhow::Result<(OwnedUserId, OwnedDeviceId)> {
    let user = UserId::parse(format!("@echo_{i}:bench.invalid"))?;
    Ok((user, OwnedDeviceId::from(format!("PUPPET{i}").as_str())))
}

/// The user the benchmark's peer devices send as.
pub const PEER_USER: &str = "@bench-peer:localhost";

/// A spec Olm payload (`content.body` = `body`) from [`PEER_USER`]'s device
/// signing with `peer_ed25519` to `recipient`'s device with `recipient_ed25519`,
/// as a real client would encrypt it.
pub fn peer_payload(
    recipient: &UserId,
    recipient_ed25519: Ed25519PublicKey,
    peer_ed25519: Ed25519PublicKey,
    body: &str,
) -> String {
    serde_json::json!({
        "type": "m.bench",
        "content": { "body": body },
        "sender": PEER_USER,
        "recipient": recipient,
        "recipient_keys": { "ed25519": recipient_ed25519.to_base64() },
        "keys": { "ed25519": peer_ed25519.to_base64() },
    })
    .to_string()
}

/// A peer device's first Olm message to a puppet device on one of its
/// one-time keys, with a spec payload (`content.body` = `body`) from
/// [`PEER_USER`], as a real client would send it.
pub fn prekey_message(
    recipient: &ruma::UserId,
    identity: vodozemac::olm::IdentityKeys,
    one_time_key: Curve25519PublicKey,
    body: &str,
) -> anyhow::Result<(Curve25519PublicKey, OlmMessage)> {
    let peer = Account::new();
    let mut session = peer.create_outbound_session(
        SessionConfig::version_1(),
        identity.curve25519,
        one_time_key,
    )?;
    let payload = peer_payload(recipient, identity.ed25519, peer.ed25519_key(), body);
    match session.encrypt(payload)? {
        m @ OlmMessage::PreKey(_) => Ok((peer.curve25519_key(), m)),
        OlmMessage::Normal(_) => anyhow::bail!("first message was not a pre-key message"),
    }
}

/// The device id of benchmark peer `i` (a device of [`PEER_USER`]).
pub fn peer_device(i: usize) -> OwnedDeviceId {
    OwnedDeviceId::from(format!("PEER{i}").as_str())
}

/// The Olm message for the device with curve25519 key `to` in the
/// `m.room.encrypted` content a puppet device produced
/// ([`bridgekeys_olm::EncryptedOlm::content`]).
pub fn message_for(
    content: &serde_json::Value,
    to: Curve25519PublicKey,
) -> anyhow::Result<OlmMessage> {
    let ciphertext = &content["ciphertext"][to.to_base64()];
    let message_type = ciphertext["type"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no ciphertext type for the recipient"))?;
    let body = ciphertext["body"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no ciphertext body for the recipient"))?;
    Ok(OlmMessage::from_parts(
        message_type as usize,
        &vodozemac::base64_decode(body)?,
    )?)
}

/// A fresh one-time key of a peer device, signed by it, as a claim through
/// the homeserver returns it (`{"key": ..., "signatures": ...}`).
pub fn signed_one_time_key(
    peer: &mut Account,
    user: &UserId,
    device: &DeviceId,
) -> anyhow::Result<serde_json::Value> {
    peer.generate_one_time_keys(1);
    let otk = *peer
        .one_time_keys()
        .values()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no one-time key generated"))?;
    peer.mark_keys_as_published();
    let mut key = serde_json::json!({ "key": otk.to_base64() });
    let signature = sign_json(peer, &key)?;
    key["signatures"] =
        serde_json::json!({ user.as_str(): { format!("ed25519:{device}"): signature } });
    Ok(key)
}

/// The `content.body` of a decrypted benchmark payload.
pub fn body_of(decrypted: &bridgekeys_olm::DecryptedOlm) -> anyhow::Result<String> {
    let content: serde_json::Value = serde_json::from_str(decrypted.payload.content.get())?;
    content["body"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("payload without a body"))
}

/// The public key inside a claimed key object.
pub fn public_key(key: &ClaimedKey) -> anyhow::Result<Curve25519PublicKey> {
    Ok(Curve25519PublicKey::from_slice(key.key.key.as_bytes())?)
}

/// Percentile (0..=100) of sorted durations, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Device key of a puppet, for direct store look-ups.
pub fn device_key(user: &UserId, device: &DeviceId) -> bridgekeys_store::DeviceKey {
    bridgekeys_store::DeviceKey::new(user.as_str(), device.as_str())
}

/// The puppets `0..devices`, in chunks of 1 000 handed to `tasks` concurrent
/// tasks running `work` (for bulk provisioning).
pub async fn in_chunks<F, Fut>(devices: usize, tasks: usize, work: F) -> anyhow::Result<()>
where
    F: Fn(Vec<(OwnedUserId, OwnedDeviceId)>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    in_chunks_reporting(devices, tasks, None, work).await
}

/// [`in_chunks`], counting each finished chunk's devices on `progress`
/// (and printing its final line at the end).
pub async fn in_chunks_reporting<F, Fut>(
    devices: usize,
    tasks: usize,
    progress: Option<Progress>,
    work: F,
) -> anyhow::Result<()>
where
    F: Fn(Vec<(OwnedUserId, OwnedDeviceId)>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    const CHUNK: usize = 1_000;
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (next, work, progress) = (next.clone(), work.clone(), progress.clone());
        set.spawn(async move {
            loop {
                let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                if start >= devices {
                    return anyhow::Ok(());
                }
                let ids = (start..(start + CHUNK).min(devices))
                    .map(puppet)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let n = ids.len();
                work(ids).await?;
                if let Some(progress) = &progress {
                    progress.add(n);
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    if let Some(progress) = &progress {
        progress.finish();
    }
    Ok(())
}

/// Create the accounts of puppets `0..devices` in bulk, on every core.
pub async fn create_puppets(manager: &Arc<AccountManager>, devices: usize) -> anyhow::Result<()> {
    create_puppets_reporting(manager, devices, None).await
}

/// [`create_puppets`], counting the devices created on `progress`.
pub async fn create_puppets_reporting(
    manager: &Arc<AccountManager>,
    devices: usize,
    progress: Option<Progress>,
) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let manager = manager.clone();
    in_chunks_reporting(devices, workers, progress, move |ids| {
        let manager = manager.clone();
        async move {
            manager
                .create_devices(ids.iter().map(|(u, d)| (u.as_ref(), d.as_ref())))
                .await?;
            Ok(())
        }
    })
    .await
}

/// `claims` claims of 1 key from `concurrency` claimers, each on a puppet
/// picked uniformly among `0..devices`. Latencies sorted, and the seconds
/// the whole load took.
pub async fn claim_load(
    manager: &Arc<AccountManager>,
    devices: usize,
    claims: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let (claims, elapsed) = timed_claim_load(manager, devices, claims, concurrency).await?;
    let mut latencies: Vec<Duration> = claims.iter().map(|c| c.latency).collect();
    latencies.sort();
    Ok((latencies, elapsed))
}

/// One claim of [`timed_claim_load`].
#[derive(Clone, Copy, Debug)]
pub struct TimedClaim {
    /// How long it took.
    pub latency: Duration,
    /// When it was answered, from the start of the load.
    pub done_at: Duration,
}

/// [`claim_load`], keeping when each claim was answered (in no particular
/// order): for a throughput over part of the load.
pub async fn timed_claim_load(
    manager: &Arc<AccountManager>,
    devices: usize,
    claims: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<TimedClaim>, f64)> {
    let remaining = Arc::new(AtomicUsize::new(claims));
    let started = Instant::now();
    let mut claimers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (manager, remaining) = (manager.clone(), remaining.clone());
        claimers.spawn(async move {
            let mut rng = StdRng::from_entropy();
            let mut timed = Vec::new();
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let (user, device) = puppet(rng.gen_range(0..devices))?;
                let t = Instant::now();
                let keys = manager
                    .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
                    .await?;
                timed.push(TimedClaim {
                    latency: t.elapsed(),
                    done_at: started.elapsed(),
                });
                anyhow::ensure!(keys.len() == 1, "claim returned {} keys", keys.len());
            }
            anyhow::Ok(timed)
        });
    }
    let mut timed = Vec::with_capacity(claims);
    while let Some(r) = claimers.join_next().await {
        timed.extend(r??);
    }
    Ok((timed, started.elapsed().as_secs_f64()))
}

/// Process CPU time (user + system, every thread, exited ones included)
/// in seconds, from `/proc/self/stat`; `None` where that is not available.
pub fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in USER_HZ (100 on Linux) ticks.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Times this process's threads were switched out so far (voluntary and
/// involuntary, summed over its live threads), from
/// `/proc/self/task/*/status`; `None` where that is not available. A
/// thread that exits takes its count with it, so measure a stretch in
/// which the threads that do the work stay alive.
pub fn context_switches() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        // A thread may end between the listing and the read: skip it.
        let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

/// Time and CPU time of a measured stretch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spent {
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// Process CPU seconds (every thread), where known.
    pub cpu_s: Option<f64>,
}

impl Spent {
    /// Nothing spent yet, with the CPU time known (zero) so that
    /// [`Spent::add`] sums it.
    pub fn zero() -> Self {
        Self {
            wall_s: 0.0,
            cpu_s: Some(0.0),
        }
    }

    /// Add another stretch.
    pub fn add(&mut self, other: Spent) {
        self.wall_s += other.wall_s;
        self.cpu_s = self.cpu_s.zip(other.cpu_s).map(|(a, b)| a + b);
    }
}

/// Measure `work`'s wall and CPU time.
pub async fn measured<T, F: std::future::Future<Output = T>>(work: F) -> (T, Spent) {
    let cpu = process_cpu_s();
    let started = Instant::now();
    let out = work.await;
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = cpu.zip(process_cpu_s()).map(|(a, b)| b - a);
    (out, Spent { wall_s, cpu_s })
}

/// The median (upper middle) of `values`; 0 if there are none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n => values[n / 2],
    }
}

/// The mean of `values`; 0 if there are none.
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}
