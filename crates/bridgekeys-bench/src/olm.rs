//! The `olm` scenario: Olm for puppet devices.
//!
//! * **Inbound**: normal (type 1) Olm messages decrypted per second through
//!   the durable [`AccountManager::decrypt_olm`] (payload verified, ratchet
//!   step on disk before the plaintext is returned), against bare vodozemac
//!   `Session::decrypt` of the same number of messages on plain in-memory
//!   sessions on every core, measured in the same run.
//! * **Outbound fan-out**: one puppet device encrypting to-device content
//!   for 100 devices, first creating the sessions from claimed one-time keys
//!   ("claimed"), then on the sessions it has ("reused"). No homeserver is in
//!   the loop: the key claim's HTTP round trip is not included.

use std::{
    path::PathBuf,
    sync::{
        Arc, Barrier,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bridgekeys_olm::{AccountManager, Recipient};
use bridgekeys_store::StoreKey;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, UserId};
use serde::Serialize;
use serde_json::{Value, json};
use vodozemac::{
    Curve25519PublicKey,
    olm::{Account, OlmMessage, Session, SessionConfig},
};

use crate::support::{
    PEER_USER, Spent, body_of, create_puppets, mean, measured, median, message_for, open_manager,
    peer_device, peer_payload, percentile_ms, process_cpu_s, public_key, puppet,
    signed_one_time_key,
};

/// The goal for [`OlmReport::ratio_to_raw`].
pub const GOAL_RATIO: f64 = 0.5;

/// Knobs of the `olm` scenario.
#[derive(Clone, Debug)]
pub struct OlmBench {
    /// Puppet devices, each with one peer device sending to it.
    pub devices: usize,
    /// Normal messages each peer sends (decrypted in order).
    pub messages: usize,
    /// Concurrent decrypting tasks.
    pub concurrency: usize,
    /// Recipient devices of one fan-out.
    pub recipients: usize,
    /// Fan-outs measured per kind (the median is reported).
    pub fanout_rounds: usize,
    /// Alternating raw / durable slices the decrypts are measured in.
    pub slices: usize,
    /// Where the store goes (a temporary directory inside it).
    pub dir: PathBuf,
}

/// Figures of one `olm` run.
#[derive(Debug, Serialize)]
pub struct OlmReport {
    /// Threads of the raw figure (the machine's cores).
    pub threads: usize,
    /// Puppet devices, each with one peer.
    pub devices: usize,
    /// Normal messages per peer.
    pub messages_per_peer: usize,
    /// Concurrent decrypting tasks.
    pub concurrency: usize,
    /// Seconds to set up the durable side: create the devices, open a
    /// session per peer (pre-key message, reply) and pre-encrypt.
    pub setup_s: f64,
    /// Alternating slices the raw and durable decrypts were measured in.
    pub slices: usize,
    /// Normal messages decrypted through `decrypt_olm`.
    pub decrypts: usize,
    /// Durable, verified decrypts per second.
    pub decrypts_per_s: f64,
    /// Median `decrypt_olm` latency.
    pub p50_ms: f64,
    /// 99th percentile `decrypt_olm` latency.
    pub p99_ms: f64,
    /// Durable writes answered per `fsync` during the decrypts.
    pub decrypts_per_flush: f64,
    /// Process CPU time per durable decrypt (every thread: the tasks,
    /// sled's IO threads, the group-commit flusher), in microseconds.
    pub cpu_us_per_decrypt: Option<f64>,
    /// CPU time of the durable decrypts / (wall time x threads): below 1,
    /// the cores were not saturated (latency-bound).
    pub cpu_busy: Option<f64>,
    /// Mean size of a stored session's pickle after the decrypts (before
    /// sealing), in bytes.
    pub session_record_bytes: f64,
    /// Messages decrypted by bare vodozemac (the same count).
    pub raw_decrypts: usize,
    /// Bare `Session::decrypt` per second on all cores.
    pub raw_decrypts_per_s: f64,
    /// Process CPU time per raw decrypt, in microseconds.
    pub raw_cpu_us_per_decrypt: Option<f64>,
    /// decrypts_per_s / raw_decrypts_per_s.
    pub ratio_to_raw: f64,
    /// The goal for `ratio_to_raw`.
    pub goal_ratio: f64,
    /// Whether `ratio_to_raw >= goal_ratio`.
    pub goal_met: bool,
    /// The outbound fan-out figures.
    pub fanout: FanoutReport,
}

/// One puppet device encrypting for many devices.
#[derive(Debug, Serialize)]
pub struct FanoutReport {
    /// Recipient devices per fan-out.
    pub recipients: usize,
    /// Fan-outs measured per kind.
    pub rounds: usize,
    /// Sequential (one call awaited after the other, as
    /// `PuppetOlm::encrypt_to_device` does): median ms per fan-out that
    /// creates every session from a claimed key, then encrypts.
    pub claimed_ms: f64,
    /// Sequential: median ms per fan-out on existing sessions.
    pub reused_ms: f64,
    /// claimed_ms / reused_ms.
    pub claimed_to_reused: f64,
    /// Sequential: `fsync`s per claimed fan-out (mean).
    pub claimed_flushes: f64,
    /// Sequential: `fsync`s per reused fan-out (mean).
    pub reused_flushes: f64,
    /// Concurrent (every recipient's calls in a task of its own, all in
    /// flight at once): median ms per claimed fan-out.
    pub claimed_ms_concurrent: f64,
    /// Concurrent: median ms per reused fan-out.
    pub reused_ms_concurrent: f64,
    /// claimed_ms_concurrent / reused_ms_concurrent.
    pub claimed_to_reused_concurrent: f64,
    /// Concurrent: `fsync`s per claimed fan-out (mean).
    pub claimed_flushes_concurrent: f64,
    /// Concurrent: `fsync`s per reused fan-out (mean).
    pub reused_flushes_concurrent: f64,
}

/// The body of message `n` of peer `i`.
fn body(i: usize, n: usize) -> String {
    format!("peer {i} message {n}")
}

/// A peer's pre-encrypted normal messages to puppet `index`.
struct Prepared {
    index: usize,
    sender_key: Curve25519PublicKey,
    messages: Vec<OlmMessage>,
}

/// Open a session between puppet `i` and a new peer as a client would
/// (pre-key message decrypted by `decrypt_olm`, the puppet replies with
/// `encrypt_olm`, the peer reads the reply), then pre-encrypt `messages`
/// normal messages from the peer.
async fn open_peer(
    manager: &AccountManager,
    peer_user: &UserId,
    i: usize,
    messages: usize,
) -> anyhow::Result<Prepared> {
    let (user, device) = puppet(i)?;
    let keys = manager
        .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
        .await?;
    let otk = public_key(
        keys.first()
            .ok_or_else(|| anyhow::anyhow!("claim returned no key"))?,
    )?;
    let identity = manager.identity_keys(&user, &device)?;
    let peer = Account::new();
    let mut session =
        peer.create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)?;
    let first = session.encrypt(peer_payload(
        &user,
        identity.ed25519,
        peer.ed25519_key(),
        "open",
    ))?;
    let opened = manager
        .decrypt_olm(
            (&user, &device),
            peer_user,
            peer.curve25519_key(),
            &first,
            None,
        )
        .await?;
    anyhow::ensure!(opened.new_session, "the pre-key message opened no session");
    let peer_device_id = peer_device(i);
    let recipient = Recipient {
        user_id: peer_user,
        device_id: &peer_device_id,
        curve25519: peer.curve25519_key(),
        ed25519: peer.ed25519_key(),
    };
    let reply = manager
        .encrypt_olm(
            (&user, &device),
            &recipient,
            "m.bench",
            &json!({"body": "reply"}),
        )
        .await?;
    session.decrypt(&message_for(&reply.content, peer.curve25519_key())?)?;
    let mut out = Vec::with_capacity(messages);
    for n in 0..messages {
        let payload = peer_payload(&user, identity.ed25519, peer.ed25519_key(), &body(i, n));
        match session.encrypt(payload)? {
            m @ OlmMessage::Normal(_) => out.push(m),
            OlmMessage::PreKey(_) => anyhow::bail!("peer {i} still sends pre-key messages"),
        }
    }
    Ok(Prepared {
        index: i,
        sender_key: peer.curve25519_key(),
        messages: out,
    })
}

/// A plain vodozemac session pair set up exactly like [`open_peer`]'s (the
/// first normal message starts a new receiving chain): the receiving
/// session and the peer's pre-encrypted messages.
fn raw_pair(i: usize, messages: usize) -> anyhow::Result<(Session, Vec<OlmMessage>)> {
    let (user, _) = puppet(i)?;
    let mut puppet_account = Account::new();
    puppet_account.generate_one_time_keys(1);
    let otk = *puppet_account
        .one_time_keys()
        .values()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no one-time key"))?;
    let peer = Account::new();
    let mut outbound = peer.create_outbound_session(
        SessionConfig::version_1(),
        puppet_account.curve25519_key(),
        otk,
    )?;
    let (puppet_ed25519, peer_ed25519) = (puppet_account.ed25519_key(), peer.ed25519_key());
    let payload = |body: &str| peer_payload(&user, puppet_ed25519, peer_ed25519, body);
    let OlmMessage::PreKey(first) = outbound.encrypt(payload("open"))? else {
        anyhow::bail!("first message was not a pre-key message");
    };
    let mut inbound = puppet_account
        .create_inbound_session(SessionConfig::version_1(), peer.curve25519_key(), &first)?
        .session;
    outbound.decrypt(&inbound.encrypt("reply")?)?;
    let messages = (0..messages)
        .map(|n| Ok(outbound.encrypt(payload(&body(i, n)))?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((inbound, messages))
}

/// The plain vodozemac sessions of the raw figure, one set per thread.
type RawSets = Vec<Vec<(Session, Vec<OlmMessage>)>>;

/// `pairs` plain session pairs of `messages` messages each, dealt to
/// `threads` sets (set up on all cores, untimed).
fn raw_sets(threads: usize, pairs: usize, messages: usize) -> anyhow::Result<RawSets> {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..pairs)
                        .step_by(threads)
                        .map(|i| raw_pair(i, messages))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("raw set-up thread panicked"))?
            })
            .collect()
    })
}

/// Bare `Session::decrypt` of messages `rounds` of every pair, one thread
/// per set, all started together; how many decrypted and the time spent.
fn raw_slice(sets: &mut RawSets, rounds: std::ops::Range<usize>) -> (usize, Spent) {
    let start = Barrier::new(sets.len() + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = sets
            .iter_mut()
            .map(|set| {
                let (start, rounds) = (&start, rounds.clone());
                s.spawn(move || {
                    start.wait();
                    let mut ok = 0usize;
                    for n in rounds {
                        for (session, messages) in set.iter_mut() {
                            if session.decrypt(&messages[n]).is_ok() {
                                ok += 1;
                            }
                        }
                    }
                    ok
                })
            })
            .collect();
        start.wait();
        let cpu = process_cpu_s();
        let started = Instant::now();
        let decrypted: usize = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
        let wall_s = started.elapsed().as_secs_f64();
        let cpu_s = cpu.zip(process_cpu_s()).map(|(a, b)| b - a);
        (decrypted, Spent { wall_s, cpu_s })
    })
}

/// One decrypting task's peers: their puppets and pre-encrypted messages.
type Share = Vec<((OwnedUserId, OwnedDeviceId), Prepared)>;

/// Decrypt messages `rounds` of every peer through `decrypt_olm`, one task
/// per share (each peer's messages in order); the shares back and the
/// latencies.
async fn durable_slice(
    manager: &Arc<AccountManager>,
    peer_user: &OwnedUserId,
    shares: Vec<Share>,
    rounds: std::ops::Range<usize>,
) -> anyhow::Result<(Vec<Share>, Vec<Duration>)> {
    let mut set = tokio::task::JoinSet::new();
    for share in shares {
        let (manager, peer_user, rounds) = (manager.clone(), peer_user.clone(), rounds.clone());
        set.spawn(async move {
            let mut latencies = Vec::with_capacity(share.len() * rounds.len());
            for n in rounds {
                for ((user, device), p) in &share {
                    let t = Instant::now();
                    let decrypted = manager
                        .decrypt_olm(
                            (user, device),
                            &peer_user,
                            p.sender_key,
                            &p.messages[n],
                            None,
                        )
                        .await?;
                    latencies.push(t.elapsed());
                    anyhow::ensure!(
                        !decrypted.new_session && body_of(&decrypted)? == body(p.index, n),
                        "message {n} of peer {} decrypted wrongly",
                        p.index
                    );
                }
            }
            anyhow::Ok((share, latencies))
        });
    }
    let (mut shares, mut latencies) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        let (share, l) = r??;
        shares.push(share);
        latencies.extend(l);
    }
    Ok((shares, latencies))
}

/// What the interleaved measurement found.
struct Decrypts {
    latencies: Vec<Duration>,
    durable: Spent,
    raw_decrypted: usize,
    raw: Spent,
}

/// Raw and durable decrypts in `slices` alternating slices of message
/// rounds (raw first), so that a drift of the machine's speed during the
/// run touches both figures alike.
async fn measure_decrypts(
    manager: &Arc<AccountManager>,
    peer_user: &OwnedUserId,
    prepared: Vec<Prepared>,
    raw: &mut RawSets,
    messages: usize,
    concurrency: usize,
    slices: usize,
) -> anyhow::Result<Decrypts> {
    let tasks = concurrency.clamp(1, prepared.len().max(1));
    let mut shares: Vec<Share> = (0..tasks).map(|_| Vec::new()).collect();
    for (k, p) in prepared.into_iter().enumerate() {
        shares[k % tasks].push((puppet(p.index)?, p));
    }
    let slices = slices.clamp(1, messages);
    let mut out = Decrypts {
        latencies: Vec::new(),
        durable: Spent {
            cpu_s: Some(0.0),
            ..Spent::default()
        },
        raw_decrypted: 0,
        raw: Spent {
            cpu_s: Some(0.0),
            ..Spent::default()
        },
    };
    for slice in 0..slices {
        let rounds = slice * messages / slices..(slice + 1) * messages / slices;
        let (decrypted, spent) = raw_slice(raw, rounds.clone());
        out.raw_decrypted += decrypted;
        out.raw.add(spent);
        let (result, spent) = measured(durable_slice(manager, peer_user, shares, rounds)).await;
        let (back, latencies) = result?;
        shares = back;
        out.latencies.extend(latencies);
        out.durable.add(spent);
    }
    out.latencies.sort();
    Ok(out)
}

/// The mean size of the stored session pickles of `probes` (puppet index,
/// peer key).
fn session_record_bytes(
    manager: &AccountManager,
    probes: &[(usize, Curve25519PublicKey)],
) -> anyhow::Result<f64> {
    let mut sizes = Vec::new();
    for (i, peer) in probes {
        let (user, device) = puppet(*i)?;
        let key = crate::support::device_key(&user, &device);
        for record in manager.store().sessions(&key, &peer.to_bytes())? {
            sizes.push(record.pickle.len() as f64);
        }
    }
    anyhow::ensure!(!sizes.is_empty(), "no stored session found");
    Ok(mean(&sizes))
}

/// How a fan-out issues its calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One awaited call after the other (what `encrypt_to_device` does).
    Sequential,
    /// Every recipient's calls in a task of its own.
    Concurrent,
}

/// A recipient device of the fan-out: a plain vodozemac account.
struct FanoutPeer {
    account: Account,
    device_id: OwnedDeviceId,
    /// Its signed one-time key, as a claim would return it.
    key: Value,
}

/// Create (`claimed`) or reuse sessions and encrypt `content` for every
/// peer; the encrypted contents in peer order.
async fn fan_out(
    manager: &Arc<AccountManager>,
    from: &(OwnedUserId, OwnedDeviceId),
    peer_user: &OwnedUserId,
    peers: &[FanoutPeer],
    content: &Value,
    claimed: bool,
    mode: Mode,
) -> anyhow::Result<Vec<Value>> {
    let recipient = |p: &FanoutPeer| (p.account.curve25519_key(), p.account.ed25519_key());
    match mode {
        Mode::Sequential => {
            // As `PuppetOlm::encrypt_to_device`: which devices lack a
            // session, create those, then encrypt for every device.
            let (user, device) = (from.0.as_ref(), from.1.as_ref());
            let mut lacking = Vec::new();
            for p in peers {
                if !manager.has_session((user, device), &p.account.curve25519_key())? {
                    lacking.push(p);
                }
            }
            anyhow::ensure!(
                lacking.len() == if claimed { peers.len() } else { 0 },
                "{} of {} recipients lack a session",
                lacking.len(),
                peers.len()
            );
            for p in lacking {
                let (curve25519, ed25519) = recipient(p);
                let r = Recipient {
                    user_id: peer_user,
                    device_id: &p.device_id,
                    curve25519,
                    ed25519,
                };
                manager
                    .create_outbound_session((user, device), &r, &p.key)
                    .await?;
            }
            let mut out = Vec::with_capacity(peers.len());
            for p in peers {
                let (curve25519, ed25519) = recipient(p);
                let r = Recipient {
                    user_id: peer_user,
                    device_id: &p.device_id,
                    curve25519,
                    ed25519,
                };
                let encrypted = manager
                    .encrypt_olm((user, device), &r, "m.room_key", content)
                    .await?;
                out.push(encrypted.content);
            }
            Ok(out)
        }
        Mode::Concurrent => {
            let mut set = tokio::task::JoinSet::new();
            for (k, p) in peers.iter().enumerate() {
                let (manager, from, peer_user) = (manager.clone(), from.clone(), peer_user.clone());
                let (curve25519, ed25519) = recipient(p);
                let (device_id, key, content) =
                    (p.device_id.clone(), p.key.clone(), content.clone());
                set.spawn(async move {
                    let from = (from.0.as_ref(), from.1.as_ref());
                    let r = Recipient {
                        user_id: &peer_user,
                        device_id: &device_id,
                        curve25519,
                        ed25519,
                    };
                    anyhow::ensure!(
                        manager.has_session(from, &curve25519)? != claimed,
                        "recipient {k}: session present: {}",
                        !claimed
                    );
                    if claimed {
                        manager.create_outbound_session(from, &r, &key).await?;
                    }
                    let encrypted = manager
                        .encrypt_olm(from, &r, "m.room_key", &content)
                        .await?;
                    anyhow::Ok((k, encrypted.content))
                });
            }
            let mut out = vec![Value::Null; peers.len()];
            while let Some(r) = set.join_next().await {
                let (k, content) = r??;
                out[k] = content;
            }
            Ok(out)
        }
    }
}

/// The recipients check what they got: the claimed fan-out's pre-key
/// message starts their session, the reused one decrypts on it; both carry
/// `content` from the puppet.
fn recipients_read(
    peers: &mut [FanoutPeer],
    sender_key: Curve25519PublicKey,
    claimed: &[Value],
    reused: &[Value],
    content: &Value,
) -> anyhow::Result<()> {
    for ((p, first), second) in peers.iter_mut().zip(claimed).zip(reused) {
        let OlmMessage::PreKey(prekey) = message_for(first, p.account.curve25519_key())? else {
            anyhow::bail!("the first message on a new session was not a pre-key message");
        };
        let mut created =
            p.account
                .create_inbound_session(SessionConfig::version_1(), sender_key, &prekey)?;
        let second = created
            .session
            .decrypt(&message_for(second, p.account.curve25519_key())?)?;
        for plaintext in [&created.plaintext, &second] {
            let payload: Value = serde_json::from_slice(plaintext)?;
            anyhow::ensure!(
                payload["content"] == *content && payload["type"] == "m.room_key",
                "a recipient read another content"
            );
        }
    }
    Ok(())
}

/// Measure both fan-out kinds, `rounds` times each, with fresh recipients
/// every round.
async fn measure_fanout(
    manager: &Arc<AccountManager>,
    from: &(OwnedUserId, OwnedDeviceId),
    peer_user: &OwnedUserId,
    recipients: usize,
    rounds: usize,
) -> anyhow::Result<FanoutReport> {
    let sender_key = manager.identity_keys(&from.0, &from.1)?.curve25519;
    // A real room key, as a bridge would share one.
    let room_key =
        vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    let content = json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": "!bench:bench.invalid",
        "session_id": room_key.session_id(),
        "session_key": room_key.session_key().to_base64(),
    });
    // (claimed ms, reused ms, claimed flushes, reused flushes) per mode.
    let mut figures: [[Vec<f64>; 4]; 2] = Default::default();
    let mut next_peer = 0usize;
    for _ in 0..rounds {
        for (m, mode) in [Mode::Sequential, Mode::Concurrent].into_iter().enumerate() {
            let mut peers = (0..recipients)
                .map(|_| {
                    let mut account = Account::new();
                    let device_id = peer_device(next_peer);
                    next_peer += 1;
                    let user = UserId::parse(PEER_USER)?;
                    let key = signed_one_time_key(&mut account, &user, &device_id)?;
                    Ok(FanoutPeer {
                        account,
                        device_id,
                        key,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut sent = Vec::new();
            for (k, claimed) in [true, false].into_iter().enumerate() {
                let flushes = manager.store().commit_stats().flushes;
                let t = Instant::now();
                let out =
                    fan_out(manager, from, peer_user, &peers, &content, claimed, mode).await?;
                figures[m][k].push(t.elapsed().as_secs_f64() * 1000.0);
                let flushes = manager.store().commit_stats().flushes - flushes;
                figures[m][k + 2].push(flushes as f64);
                sent.push(out);
            }
            recipients_read(&mut peers, sender_key, &sent[0], &sent[1], &content)?;
        }
    }
    let [seq, conc] = figures.map(|f| f.map(|v| (median(v.clone()), mean(&v))));
    Ok(FanoutReport {
        recipients,
        rounds,
        claimed_ms: seq[0].0,
        reused_ms: seq[1].0,
        claimed_to_reused: seq[0].0 / seq[1].0,
        claimed_flushes: seq[2].1,
        reused_flushes: seq[3].1,
        claimed_ms_concurrent: conc[0].0,
        reused_ms_concurrent: conc[1].0,
        claimed_to_reused_concurrent: conc[0].0 / conc[1].0,
        claimed_flushes_concurrent: conc[2].1,
        reused_flushes_concurrent: conc[3].1,
    })
}

/// Run the scenario.
pub async fn run(config: &OlmBench) -> anyhow::Result<OlmReport> {
    anyhow::ensure!(
        config.devices > 0 && config.messages > 0 && config.recipients > 0,
        "devices, messages and recipients must be positive"
    );
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    std::fs::create_dir_all(&config.dir)?;
    let dir = tempfile::tempdir_in(&config.dir)?;
    let manager = Arc::new(open_manager(dir.path(), &StoreKey::generate())?);
    let peer_user = UserId::parse(PEER_USER)?;

    // Set-up: devices, one session each with a peer that has heard back.
    let started = Instant::now();
    create_puppets(&manager, config.devices + 1).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (manager, next, peer_user) = (manager.clone(), next.clone(), peer_user.clone());
        let (devices, messages) = (config.devices, config.messages);
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= devices {
                    return anyhow::Ok(out);
                }
                out.push(open_peer(&manager, &peer_user, i, messages).await?);
            }
        });
    }
    let mut prepared = Vec::with_capacity(config.devices);
    while let Some(r) = set.join_next().await {
        prepared.extend(r??);
    }
    prepared.sort_by_key(|p| p.index);
    let setup_s = started.elapsed().as_secs_f64();

    let probes: Vec<_> = prepared
        .iter()
        .take(100)
        .map(|p| (p.index, p.sender_key))
        .collect();
    let mut raw = raw_sets(threads, config.devices, config.messages)?;
    let before = manager.store().commit_stats();
    let d = measure_decrypts(
        &manager,
        &peer_user,
        prepared,
        &mut raw,
        config.messages,
        config.concurrency,
        config.slices,
    )
    .await?;
    drop(raw);
    let after = manager.store().commit_stats();
    anyhow::ensure!(
        d.raw_decrypted == config.devices * config.messages,
        "raw: {} of {} messages decrypted",
        d.raw_decrypted,
        config.devices * config.messages
    );
    let decrypts = d.latencies.len();
    let decrypts_per_s = decrypts as f64 / d.durable.wall_s;
    let raw_per_s = d.raw_decrypted as f64 / d.raw.wall_s;
    let ratio_to_raw = decrypts_per_s / raw_per_s;
    let session_record_bytes = session_record_bytes(&manager, &probes)?;

    let fanout = measure_fanout(
        &manager,
        &puppet(config.devices)?,
        &peer_user,
        config.recipients,
        config.fanout_rounds.max(1),
    )
    .await?;

    Ok(OlmReport {
        threads,
        devices: config.devices,
        messages_per_peer: config.messages,
        concurrency: config.concurrency,
        setup_s,
        slices: config.slices.clamp(1, config.messages),
        decrypts,
        decrypts_per_s,
        p50_ms: percentile_ms(&d.latencies, 50.0),
        p99_ms: percentile_ms(&d.latencies, 99.0),
        decrypts_per_flush: (after.writes - before.writes) as f64
            / (after.flushes - before.flushes).max(1) as f64,
        cpu_us_per_decrypt: d.durable.cpu_s.map(|c| c * 1e6 / decrypts as f64),
        cpu_busy: d
            .durable
            .cpu_s
            .map(|c| c / (d.durable.wall_s * threads as f64)),
        session_record_bytes,
        raw_decrypts: d.raw_decrypted,
        raw_decrypts_per_s: raw_per_s,
        raw_cpu_us_per_decrypt: d.raw.cpu_s.map(|c| c * 1e6 / d.raw_decrypted as f64),
        ratio_to_raw,
        goal_ratio: GOAL_RATIO,
        goal_met: ratio_to_raw >= GOAL_RATIO,
        fanout,
    })
}
