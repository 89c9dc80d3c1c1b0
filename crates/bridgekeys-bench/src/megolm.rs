//! The `megolm` scenario: Megolm room events for puppet devices.
//!
//! * **Inbound, transaction path**: `m.room.encrypted` Megolm room events
//!   sent to the real listener (`Appservice::serve_on` over a durable
//!   `SledStore`) as the homeserver sends them: `PUT
//!   /_matrix/app/v1/transactions/{txnId}` over loopback HTTP/1.1
//!   keep-alive connections with the homeserver's token, 1 or 50 events per
//!   transaction ([`Shape`]). A 200 comes only after every event of the
//!   transaction was decrypted (room, sender and replay checks, the first
//!   use of each message index recorded) and the transaction id was
//!   recorded and flushed. The room keys came before, as they do from a
//!   homeserver: Olm pre-key messages carrying `m.room_key` to the puppet
//!   device, in set-up transactions through the same listener. Against
//!   bare vodozemac `InboundGroupSession::decrypt` of as many messages, on
//!   in-memory sessions on every core, measured in alternating slices of
//!   the same run.
//! * **Inbound, store level**: [`AccountManager::decrypt_room_event`], each
//!   followed by waiting for its index record to be on disk (group commit),
//!   from concurrent tasks; against raw the same way.
//! * **Outbound**: one puppet device sending in a room of 50 devices (plain
//!   vodozemac accounts of a member). A rotation is what
//!   `PuppetOlm::encrypt_room_event` does when the session is due: a new
//!   outbound group session ([`AccountManager::prepare_group_session`]),
//!   the `m.room_key` encrypted over Olm for each device (sessions created
//!   from claimed one-time keys first when there are none, as
//!   `PuppetOlm::encrypt_to_device` does), the devices recorded
//!   ([`AccountManager::mark_group_session_shared`]), and the first message
//!   encrypted ([`AccountManager::encrypt_room_event`]); every step durable.
//!   Then the steady state: one message after the other on that session.
//!   No homeserver is in the loop: `keys/query`, `keys/claim` and
//!   `sendToDevice` round trips are not included.

use std::{
    fmt,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc, Barrier,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bridgekeys_appservice::{
    Appservice, AppserviceConfig, BridgeHandler, HandlerError, Registration, ToDevice, Transaction,
};
use bridgekeys_olm::{
    AccountManager, GroupRecipient, MEGOLM_ALGORITHM, Recipient, RotationSettings,
};
use bridgekeys_store::StoreKey;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedUserId, ServerName, UserId};
use serde::Serialize;
use serde_json::{Value, json, value::RawValue};
use vodozemac::{
    Curve25519PublicKey,
    megolm::{
        GroupSession, InboundGroupSession, MegolmMessage, SessionConfig as MegolmConfig, SessionKey,
    },
    olm::{Account, OlmMessage, Session, SessionConfig},
};

use crate::support::{
    PEER_USER, Spent, create_puppets, mean, measured, median, message_for, open_store,
    percentile_ms, process_cpu_s, public_key, puppet, signed_one_time_key,
};

/// The goal for [`MegolmReport::ratio_to_raw`].
pub const GOAL_RATIO: f64 = 0.5;

/// What the transaction-path figures measure, as written in the report.
pub const MEASURED: &str = "Room events decrypted per second through the listener: \
PUT /_matrix/app/v1/transactions/{txnId} over loopback HTTP/1.1 (keep-alive, hs token) \
to Appservice::serve_on over a durable SledStore, each 200 received only after every \
m.room.encrypted Megolm event was decrypted (room, sender, replay checks; first use of \
each message index recorded) and the transaction id recorded and fsynced. Room keys were \
delivered before as Olm pre-key m.room_key to-device messages in set-up transactions. \
Raw: vodozemac InboundGroupSession::decrypt of as many messages on in-memory sessions, \
one thread per core, in alternating slices of the same run.";

/// One transaction-path load: events per transaction, and transactions in
/// flight at once (Synapse sends one transaction at a time to an
/// appservice). Written `EVENTSxIN_FLIGHT`, e.g. `50x1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// Megolm room events per transaction.
    pub events_per_txn: usize,
    /// Transactions in flight at once.
    pub in_flight: usize,
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (events, in_flight) = s
            .split_once('x')
            .ok_or_else(|| format!("{s:?}: expected EVENTSxIN_FLIGHT, e.g. 50x1"))?;
        let parse = |v: &str| match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{s:?}: {v:?} is not a positive number")),
        };
        Ok(Self {
            events_per_txn: parse(events)?,
            in_flight: parse(in_flight)?,
        })
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.events_per_txn, self.in_flight)
    }
}

/// Knobs of the `megolm` scenario.
#[derive(Clone, Debug)]
pub struct MegolmBench {
    /// Room events decrypted per measured load (each transaction shape, and
    /// the store level); rounded up to whole sessions.
    pub events: usize,
    /// The transaction-path loads.
    pub shapes: Vec<Shape>,
    /// Messages per Megolm session, inbound and outbound (the room's
    /// `rotation_period_msgs`; clients rotate after 100).
    pub session_messages: usize,
    /// Concurrent tasks of the store-level figure.
    pub concurrency: usize,
    /// Alternating raw / durable slices each load is measured in.
    pub slices: usize,
    /// Devices in the room of the outbound figures.
    pub recipients: usize,
    /// Outbound rounds (fresh room and devices each: one rotation creating
    /// the Olm sessions, the steady messages, one rotation reusing them).
    pub rounds: usize,
    /// Where the store goes (a temporary directory inside it).
    pub dir: PathBuf,
}

/// Figures of one `megolm` run.
#[derive(Debug, Serialize)]
pub struct MegolmReport {
    /// Threads of the raw figures (the machine's cores).
    pub threads: usize,
    /// What the transaction-path figures measure.
    pub measured: &'static str,
    /// Messages per Megolm session.
    pub session_messages: usize,
    /// Room keys delivered to the puppet over Olm in set-up transactions.
    pub room_keys: usize,
    /// Seconds of the set-up (keys delivered, events encrypted, raw
    /// sessions prepared).
    pub setup_s: f64,
    /// Alternating raw / durable slices per load.
    pub slices: usize,
    /// The transaction-path loads.
    pub transactions: Vec<TxnLoadReport>,
    /// The store-level load.
    pub store_level: StoreLevelReport,
    /// Bare vodozemac, one thread: a session restored from its pickle at
    /// index 0 for each message (what the durable path does, instead of
    /// keeping the ratchet in memory), then `decrypt`, in microseconds per
    /// message over indices 0..session_messages.
    pub raw_from_pickle_us_per_decrypt: f64,
    /// The load `ratio_to_raw` is taken from (most events per transaction
    /// among those with the fewest in flight).
    pub headline_shape: String,
    /// Room events per second through the transaction path / raw, for
    /// [`Self::headline_shape`].
    pub ratio_to_raw: f64,
    /// The goal for `ratio_to_raw`.
    pub goal_ratio: f64,
    /// Whether `ratio_to_raw >= goal_ratio`.
    pub goal_met: bool,
    /// The 1-minute load average when the run ended (other processes on
    /// the machine slow the CPU-bound raw side more than the durable one).
    pub load_average_1m: Option<f64>,
    /// The outbound figures.
    pub outbound: OutboundReport,
}

/// One transaction-path load against raw.
#[derive(Debug, Serialize)]
pub struct TxnLoadReport {
    /// Events per transaction and transactions in flight.
    pub shape: String,
    /// Megolm events per transaction.
    pub events_per_txn: usize,
    /// Transactions in flight at once.
    pub in_flight: usize,
    /// Transactions sent.
    pub transactions: usize,
    /// Events decrypted (every one checked by the bridge handler).
    pub events: usize,
    /// Durable room events decrypted per second through the listener.
    pub events_per_s: f64,
    /// Transactions answered per second.
    pub transactions_per_s: f64,
    /// Median transaction latency (client side).
    pub txn_p50_ms: f64,
    /// 99th percentile transaction latency (client side).
    pub txn_p99_ms: f64,
    /// `fsync`s per transaction (mean).
    pub fsyncs_per_txn: f64,
    /// Process CPU time per event (every thread: client, listener, sled).
    pub cpu_us_per_event: Option<f64>,
    /// CPU time / (wall time x threads): below 1, the cores were not
    /// saturated (latency-bound).
    pub cpu_busy: Option<f64>,
    /// Bare `InboundGroupSession::decrypt` per second on all cores, same
    /// number of messages, alternating with this load.
    pub raw_decrypts_per_s: f64,
    /// Process CPU time per raw decrypt, in microseconds.
    pub raw_cpu_us_per_decrypt: Option<f64>,
    /// events_per_s / raw_decrypts_per_s.
    pub ratio_to_raw: f64,
    /// raw_cpu_us_per_decrypt / cpu_us_per_event: the CPU cost of a raw
    /// decrypt over that of an event through the listener, what
    /// `ratio_to_raw` would be if both were CPU-bound on the same idle
    /// cores (less sensitive to other processes' load than the wall-time
    /// ratio, whose raw side is CPU-bound and durable side latency-bound).
    pub cpu_ratio: Option<f64>,
}

/// `decrypt_room_event` directly, durable, against raw.
#[derive(Debug, Serialize)]
pub struct StoreLevelReport {
    /// Concurrent tasks.
    pub concurrency: usize,
    /// Events decrypted.
    pub events: usize,
    /// `decrypt_room_event` + wait for the index record's flush, per second.
    pub decrypts_per_s: f64,
    /// Median latency of one decrypt made durable.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Decrypts answered per `fsync`.
    pub decrypts_per_flush: f64,
    /// Process CPU time per decrypt, in microseconds.
    pub cpu_us_per_decrypt: Option<f64>,
    /// Bare `InboundGroupSession::decrypt` per second on all cores.
    pub raw_decrypts_per_s: f64,
    /// Process CPU time per raw decrypt, in microseconds.
    pub raw_cpu_us_per_decrypt: Option<f64>,
    /// decrypts_per_s / raw_decrypts_per_s.
    pub ratio_to_raw: f64,
}

/// A puppet device's outbound Megolm in a room of `recipients` devices.
#[derive(Debug, Serialize)]
pub struct OutboundReport {
    /// Devices in the room (besides the puppet's own).
    pub recipients: usize,
    /// Rounds (fresh room and devices each).
    pub rounds: usize,
    /// Median ms of a rotation that first creates an Olm session per
    /// device from a claimed one-time key (a new room, new devices).
    pub rotation_claimed_ms: f64,
    /// Median ms of a rotation on existing Olm sessions (the session was
    /// due after `session_messages` messages).
    pub rotation_reused_ms: f64,
    /// Of a reused rotation (medians, ms): the new session made durable.
    pub reused_prepare_ms: f64,
    /// Of a reused rotation: the `m.room_key` encrypted for every device
    /// (each step durable).
    pub reused_share_ms: f64,
    /// Of a reused rotation: the devices recorded as having the key.
    pub reused_mark_ms: f64,
    /// Of a reused rotation: the first message encrypted.
    pub reused_first_encrypt_ms: f64,
    /// To-device messages produced per rotation (mean; counted).
    pub to_device_per_rotation: f64,
    /// Olm sessions created per claimed rotation (mean).
    pub olm_sessions_per_claimed_rotation: f64,
    /// `fsync`s per claimed rotation (mean).
    pub fsyncs_per_claimed_rotation: f64,
    /// `fsync`s per reused rotation (mean).
    pub fsyncs_per_reused_rotation: f64,
    /// Messages in steady state per round (on a session already shared).
    pub steady_messages: usize,
    /// Median ms of `encrypt_room_event` (durable) in steady state.
    pub encrypt_ms: f64,
    /// 99th percentile of it.
    pub encrypt_p99_ms: f64,
    /// Median ms of a whole steady send: `prepare_group_session` (nothing
    /// to share) then `encrypt_room_event`.
    pub send_ms: f64,
    /// Bare vodozemac, median ms: new group session, its inbound copy,
    /// an Olm session from each device's one-time key, the room key
    /// encrypted for each, the first message encrypted.
    pub raw_rotation_claimed_ms: f64,
    /// Bare vodozemac, median ms: the same on existing Olm sessions.
    pub raw_rotation_reused_ms: f64,
    /// Bare vodozemac `GroupSession::encrypt`, median microseconds.
    pub raw_encrypt_us: f64,
}

/// The bridge of the scenario: counts what the listener hands over.
#[derive(Default)]
struct Counting {
    room_keys: AtomicUsize,
    decrypted: AtomicUsize,
    failed: AtomicUsize,
}

impl BridgeHandler for Counting {
    async fn transaction(&self, transaction: &Transaction) -> Result<(), HandlerError> {
        for message in &transaction.to_device {
            if let ToDevice::Decrypted(d) = message
                && d.olm.payload.event_type == "m.room_key"
            {
                self.room_keys.fetch_add(1, Ordering::Relaxed);
            }
        }
        for event in &transaction.decrypted_events {
            match &event.decrypted {
                Ok(d) if d.event_type == "m.room.message" => {
                    self.decrypted.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// The plaintext of message `n` of a room, as a client encrypts it.
fn plaintext(room_id: &str, n: usize) -> String {
    json!({
        "type": "m.room.message",
        "room_id": room_id,
        "content": {"msgtype": "m.text", "body": format!("message {n} of a bridged conversation")},
    })
    .to_string()
}

/// One pre-encrypted room event.
struct RoomEvent {
    room: usize,
    event_id: String,
    /// The whole event, as the homeserver puts it in a transaction.
    json: String,
    /// Its content alone.
    content: Box<RawValue>,
}

/// One measured inbound load: its rooms (a Megolm session each, shared
/// with the puppet) and their events, round by round (message `n` of every
/// room, then `n + 1`).
struct Load {
    room_ids: Vec<OwnedRoomId>,
    events: Vec<RoomEvent>,
}

impl Load {
    fn rooms(&self) -> usize {
        self.room_ids.len()
    }

    /// The events of rounds `rounds`.
    fn round_events(&self, rounds: &std::ops::Range<usize>) -> &[RoomEvent] {
        let r = self.rooms();
        &self.events[rounds.start * r..rounds.end * r]
    }
}

/// The puppet that receives, and where the listener is.
struct Listener {
    addr: SocketAddr,
    token: String,
    handler: Arc<Counting>,
    puppet: (OwnedUserId, OwnedDeviceId),
}

/// `rooms` new rooms for load `load`, their keys delivered to the puppet
/// in set-up transactions (Olm pre-key messages carrying `m.room_key`,
/// from one peer device per room), then `messages` events per room
/// encrypted.
async fn new_load(
    manager: &AccountManager,
    listener: &Listener,
    load: usize,
    rooms: usize,
    messages: usize,
) -> anyhow::Result<Load> {
    let (user, device) = &listener.puppet;
    let identity = manager.identity_keys(user, device)?;
    let peer_user = UserId::parse(PEER_USER)?;
    let mut sessions = Vec::with_capacity(rooms);
    let mut to_device = Vec::with_capacity(rooms);
    for r in 0..rooms {
        let room_id = OwnedRoomId::try_from(format!("!l{load}r{r}:bench.invalid"))?;
        let group = GroupSession::new(MegolmConfig::version_1());
        let keys = manager
            .claim(user, device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await?;
        let otk = public_key(
            keys.first()
                .ok_or_else(|| anyhow::anyhow!("claim returned no key"))?,
        )?;
        let peer = Account::new();
        let mut olm =
            peer.create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)?;
        let payload = json!({
            "type": "m.room_key",
            "content": {
                "algorithm": MEGOLM_ALGORITHM,
                "room_id": room_id,
                "session_id": group.session_id(),
                "session_key": group.session_key().to_base64(),
            },
            "sender": peer_user,
            "sender_device": format!("L{load}PEER{r}"),
            "recipient": user,
            "recipient_keys": { "ed25519": identity.ed25519.to_base64() },
            "keys": { "ed25519": peer.ed25519_key().to_base64() },
        });
        let OlmMessage::PreKey(message) = olm.encrypt(payload.to_string())? else {
            anyhow::bail!("the first Olm message was not a pre-key message");
        };
        to_device.push(json!({
            "to_user_id": user, "to_device_id": device,
            "type": "m.room.encrypted", "sender": peer_user,
            "content": {
                "algorithm": bridgekeys_olm::OLM_ALGORITHM,
                "sender_key": peer.curve25519_key().to_base64(),
                "ciphertext": {
                    identity.curve25519.to_base64(): {"type": 0, "body": message.to_base64()}
                },
            },
        }));
        sessions.push((room_id, group));
    }
    let before = listener.handler.room_keys.load(Ordering::Relaxed);
    let bodies = to_device
        .chunks(50)
        .enumerate()
        .map(|(k, chunk)| {
            (
                format!("keys-{load}-{k}"),
                json!({"events": [], "to_device": chunk}).to_string(),
            )
        })
        .collect();
    put_transactions(listener, bodies, 1).await?;
    let delivered = listener.handler.room_keys.load(Ordering::Relaxed) - before;
    anyhow::ensure!(
        delivered == rooms,
        "{delivered} of {rooms} room keys reached the bridge"
    );

    let mut events = Vec::with_capacity(rooms * messages);
    for n in 0..messages {
        for (r, (room_id, group)) in sessions.iter_mut().enumerate() {
            let event_id = format!("$l{load}r{r}n{n}");
            let content = json!({
                "algorithm": MEGOLM_ALGORITHM,
                "ciphertext": group.encrypt(plaintext(room_id.as_str(), n)).to_base64(),
                "session_id": group.session_id(),
                "device_id": format!("L{load}PEER{r}"),
            });
            let json = json!({
                "type": "m.room.encrypted", "event_id": event_id, "room_id": room_id,
                "sender": peer_user, "origin_server_ts": 1_700_000_000_000u64 + n as u64,
                "content": content,
                "unsigned": {"age": 12},
            })
            .to_string();
            events.push(RoomEvent {
                room: r,
                event_id,
                json,
                content: RawValue::from_string(content.to_string())?,
            });
        }
    }
    Ok(Load {
        room_ids: sessions.into_iter().map(|(id, _)| id).collect(),
        events,
    })
}

/// PUT every `(txn id, body)` to the listener over `in_flight` keep-alive
/// connections (each takes the next transaction when its previous one is
/// answered); every answer must be 200. Client-side latencies, sorted.
///
/// Raw hyper on purpose (not reqwest): a load generator measuring the
/// listener, with exactly `in_flight` connections and no pool in between.
async fn put_transactions(
    listener: &Listener,
    bodies: Vec<(String, String)>,
    in_flight: usize,
) -> anyhow::Result<Vec<Duration>> {
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let authorization = Arc::new(format!("Bearer {}", listener.token));
    let addr = listener.addr;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..in_flight.clamp(1, bodies.len().max(1)) {
        let (bodies, next, authorization) = (bodies.clone(), next.clone(), authorization.clone());
        clients.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((txn_id, body)) = bodies.get(k) else {
                    return anyhow::Ok(latencies);
                };
                let request = Request::put(format!("/_matrix/app/v1/transactions/{txn_id}"))
                    .header("host", addr.to_string())
                    .header("authorization", authorization.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.clone())))?;
                let t = Instant::now();
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let answer = response.into_body().collect().await?.to_bytes();
                latencies.push(t.elapsed());
                anyhow::ensure!(
                    status == 200,
                    "transaction {txn_id} answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
        });
    }
    let mut latencies = Vec::with_capacity(bodies.len());
    while let Some(r) = clients.join_next().await {
        latencies.extend(r??);
    }
    latencies.sort();
    Ok(latencies)
}

/// Plain vodozemac inbound sessions and their messages, one set per thread.
type RawSets = Vec<Vec<(InboundGroupSession, Vec<MegolmMessage>)>>;

/// `rooms` plain session pairs of `messages` messages each (the same
/// plaintexts as the durable loads), dealt to `threads` sets, set up on
/// all cores (untimed).
fn raw_sets(threads: usize, rooms: usize, messages: usize) -> anyhow::Result<RawSets> {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..rooms)
                        .step_by(threads)
                        .map(|r| {
                            let mut group = GroupSession::new(MegolmConfig::version_1());
                            let inbound = InboundGroupSession::new(
                                &group.session_key(),
                                MegolmConfig::version_1(),
                            );
                            let room_id = format!("!raw{r}:bench.invalid");
                            let messages = (0..messages)
                                .map(|n| group.encrypt(plaintext(&room_id, n)))
                                .collect();
                            (inbound, messages)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("raw set-up thread panicked"))
            })
            .collect()
    })
}

/// Bare `InboundGroupSession::decrypt` of messages `rounds` of every
/// session, one thread per set, all started together; how many decrypted
/// and the time spent.
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

/// The slices' round ranges of `messages` rounds.
fn slice_rounds(messages: usize, slices: usize) -> Vec<std::ops::Range<usize>> {
    (0..slices)
        .map(|s| s * messages / slices..(s + 1) * messages / slices)
        .filter(|r| !r.is_empty())
        .collect()
}

/// What one alternating measurement found.
struct Alternated {
    latencies: Vec<Duration>,
    durable: Spent,
    durable_events: usize,
    raw: Spent,
    raw_decrypted: usize,
    flushes: u64,
    writes: u64,
}

/// Measure a transaction-path load against raw, slice by slice (raw
/// first).
async fn measure_txn_load(
    manager: &AccountManager,
    listener: &Listener,
    load: &Load,
    shape: Shape,
    tag: usize,
    raw: &mut RawSets,
    rounds: &[std::ops::Range<usize>],
) -> anyhow::Result<Alternated> {
    let mut out = Alternated::new();
    let mut txn = 0usize;
    for range in rounds {
        let (decrypted, spent) = raw_slice(raw, range.clone());
        out.raw_decrypted += decrypted;
        out.raw.add(spent);
        let events = load.round_events(range);
        let bodies: Vec<(String, String)> = events
            .chunks(shape.events_per_txn)
            .map(|chunk| {
                txn += 1;
                let joined: Vec<&str> = chunk.iter().map(|e| e.json.as_str()).collect();
                (
                    format!("ev-{tag}-{txn}"),
                    format!("{{\"events\":[{}]}}", joined.join(",")),
                )
            })
            .collect();
        let (ok, failed) = (
            listener.handler.decrypted.load(Ordering::Relaxed),
            listener.handler.failed.load(Ordering::Relaxed),
        );
        let stats = manager.store().commit_stats();
        let (latencies, spent) =
            measured(put_transactions(listener, bodies, shape.in_flight)).await;
        let after = manager.store().commit_stats();
        out.flushes += after.flushes - stats.flushes;
        out.writes += after.writes - stats.writes;
        out.latencies.extend(latencies?);
        out.durable.add(spent);
        let ok = listener.handler.decrypted.load(Ordering::Relaxed) - ok;
        let failed = listener.handler.failed.load(Ordering::Relaxed) - failed;
        anyhow::ensure!(
            ok == events.len() && failed == 0,
            "{ok} of {} events decrypted, {failed} refused",
            events.len()
        );
        out.durable_events += ok;
    }
    out.latencies.sort();
    Ok(out)
}

impl Alternated {
    fn new() -> Self {
        Self {
            latencies: Vec::new(),
            durable: Spent::zero(),
            durable_events: 0,
            raw: Spent::zero(),
            raw_decrypted: 0,
            flushes: 0,
            writes: 0,
        }
    }
}

/// `decrypt_room_event` of `events`, each made durable, from `tasks`
/// tasks (each room's events in order in one task); latencies.
async fn store_slice(
    manager: &Arc<AccountManager>,
    load: &Arc<Load>,
    range: std::ops::Range<usize>,
    tasks: usize,
) -> anyhow::Result<Vec<Duration>> {
    let sender = UserId::parse(PEER_USER)?;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (manager, load, sender, range) =
            (manager.clone(), load.clone(), sender.clone(), range.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            for event in load
                .round_events(&range)
                .iter()
                .filter(|e| e.room % tasks == t)
            {
                let started = Instant::now();
                let decrypted = manager.decrypt_room_event(
                    &load.room_ids[event.room],
                    &sender,
                    &event.event_id,
                    &event.content,
                )?;
                manager.store().sync().durable().await?;
                latencies.push(started.elapsed());
                anyhow::ensure!(
                    decrypted.event_type == "m.room.message",
                    "{} decrypted to {}",
                    event.event_id,
                    decrypted.event_type
                );
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = set.join_next().await {
        latencies.extend(r??);
    }
    Ok(latencies)
}

/// Measure the store-level load against raw, slice by slice (raw first).
async fn measure_store_load(
    manager: &Arc<AccountManager>,
    load: &Arc<Load>,
    tasks: usize,
    raw: &mut RawSets,
    rounds: &[std::ops::Range<usize>],
) -> anyhow::Result<Alternated> {
    let mut out = Alternated::new();
    for range in rounds {
        let (decrypted, spent) = raw_slice(raw, range.clone());
        out.raw_decrypted += decrypted;
        out.raw.add(spent);
        let stats = manager.store().commit_stats();
        let (latencies, spent) = measured(store_slice(manager, load, range.clone(), tasks)).await;
        let after = manager.store().commit_stats();
        out.flushes += after.flushes - stats.flushes;
        out.writes += after.writes - stats.writes;
        let latencies = latencies?;
        out.durable_events += latencies.len();
        out.latencies.extend(latencies);
        out.durable.add(spent);
    }
    out.latencies.sort();
    Ok(out)
}

/// Microseconds per message of bare vodozemac restoring a session from its
/// pickle (at index 0) before each decrypt, over `messages` messages.
fn raw_from_pickle_us(messages: usize) -> anyhow::Result<f64> {
    let mut group = GroupSession::new(MegolmConfig::version_1());
    let pristine = InboundGroupSession::new(&group.session_key(), MegolmConfig::version_1());
    let encrypted: Vec<MegolmMessage> = (0..messages)
        .map(|n| group.encrypt(plaintext("!pickle:bench.invalid", n)))
        .collect();
    let started = Instant::now();
    for message in &encrypted {
        let mut session = InboundGroupSession::from_pickle(pristine.pickle());
        session.decrypt(message)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / messages.max(1) as f64)
}

/// A device in the room of the outbound figures: a plain vodozemac
/// account, and the session its first `m.room_key` started.
struct Member {
    account: Account,
    device_id: OwnedDeviceId,
    /// Its signed one-time key, as a claim would return it.
    key: Value,
    session: Option<Session>,
}

/// A member device as an Olm recipient.
fn recipient<'a>(user: &'a UserId, member: &'a Member) -> Recipient<'a> {
    Recipient {
        user_id: user,
        device_id: &member.device_id,
        curve25519: member.account.curve25519_key(),
        ed25519: member.account.ed25519_key(),
    }
}

/// What one send in the room did, and how long each step took.
struct Sent {
    rotated: bool,
    session_id: String,
    /// (member index, `m.room.encrypted` to-device content).
    to_device: Vec<(usize, Value)>,
    sessions_created: usize,
    content: Value,
    prepare: Duration,
    share: Duration,
    mark: Duration,
    encrypt: Duration,
}

impl Sent {
    fn total_ms(&self) -> f64 {
        (self.prepare + self.share + self.mark + self.encrypt).as_secs_f64() * 1000.0
    }
}

/// One message from the puppet device `from` in `room`, as
/// `PuppetOlm::encrypt_room_event` sends it (minus the homeserver calls):
/// prepare the session, share its key over Olm with the devices that lack
/// it (creating Olm sessions from claimed keys where there are none, all
/// devices at once as `encrypt_to_device` does), record them, then
/// encrypt.
async fn send(
    manager: &AccountManager,
    from: (&UserId, &ruma::DeviceId),
    room: &ruma::RoomId,
    settings: RotationSettings,
    members: &[Member],
    n: usize,
) -> anyhow::Result<Sent> {
    let member_user = UserId::parse(PEER_USER)?;
    let recipients: Vec<GroupRecipient> = members
        .iter()
        .map(|m| GroupRecipient {
            user_id: member_user.clone(),
            device_id: m.device_id.clone(),
            curve25519: m.account.curve25519_key().to_base64(),
        })
        .collect();
    let t = Instant::now();
    let prepared = manager
        .prepare_group_session(from, room, settings, &recipients)
        .await?;
    let prepare = t.elapsed();
    let t = Instant::now();
    let mut to_device = Vec::new();
    let mut sessions_created = 0;
    if !prepared.needs_key.is_empty() {
        let room_key: Value = serde_json::from_str(&prepared.room_key)?;
        let targets: Vec<(usize, &Member)> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                prepared
                    .needs_key
                    .iter()
                    .any(|r| r.device_id == m.device_id)
            })
            .collect();
        let mut lacking = Vec::new();
        for (_, m) in &targets {
            if !manager.has_session(from, &m.account.curve25519_key())? {
                lacking.push(*m);
            }
        }
        // All at once, as `encrypt_to_device` does: the durable writes
        // share the store's flushes.
        let created = futures_util::future::join_all(lacking.iter().map(|m| {
            let member_user = &member_user;
            async move {
                manager
                    .create_outbound_session(from, &recipient(member_user, m), &m.key)
                    .await
            }
        }))
        .await;
        for result in created {
            result?;
            sessions_created += 1;
        }
        let encrypted = futures_util::future::join_all(targets.iter().map(|(_, m)| {
            let (member_user, room_key) = (&member_user, &room_key);
            async move {
                manager
                    .encrypt_olm(from, &recipient(member_user, m), "m.room_key", room_key)
                    .await
            }
        }))
        .await;
        for ((k, _), result) in targets.iter().zip(encrypted) {
            to_device.push((*k, result?.content));
        }
    }
    let share = t.elapsed();
    let t = Instant::now();
    if !to_device.is_empty() {
        manager
            .mark_group_session_shared(from, room, &prepared.session_id, &prepared.needs_key)
            .await?;
    }
    let mark = t.elapsed();
    let t = Instant::now();
    let content = manager
        .encrypt_room_event(
            from,
            room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": format!("puppet message {n}")}),
        )
        .await?;
    let encrypt = t.elapsed();
    Ok(Sent {
        rotated: prepared.rotated,
        session_id: prepared.session_id,
        to_device,
        sessions_created,
        content,
        prepare,
        share,
        mark,
        encrypt,
    })
}

/// Every member reads its `m.room_key` (starting its Olm session on the
/// first) and decrypts the rotation's first message with it.
fn members_read(
    members: &mut [Member],
    sender_key: Curve25519PublicKey,
    sent: &Sent,
    n: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        sent.to_device.len() == members.len(),
        "{} of {} members were sent the key",
        sent.to_device.len(),
        members.len()
    );
    let ciphertext = sent.content["ciphertext"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no Megolm ciphertext"))?;
    let message = MegolmMessage::from_base64(ciphertext)?;
    for (k, content) in &sent.to_device {
        let member = members
            .get_mut(*k)
            .ok_or_else(|| anyhow::anyhow!("no member {k}"))?;
        let olm = message_for(content, member.account.curve25519_key())?;
        let plaintext = match (&mut member.session, olm) {
            (Some(session), olm) => session.decrypt(&olm)?,
            (None, OlmMessage::PreKey(prekey)) => {
                let created = member.account.create_inbound_session(
                    SessionConfig::version_1(),
                    sender_key,
                    &prekey,
                )?;
                member.session = Some(created.session);
                created.plaintext
            }
            (None, OlmMessage::Normal(_)) => {
                anyhow::bail!("the first message on a new session was not a pre-key message")
            }
        };
        let payload: Value = serde_json::from_slice(&plaintext)?;
        anyhow::ensure!(
            payload["type"] == "m.room_key"
                && payload["content"]["session_id"] == sent.session_id.as_str(),
            "member {k} got another key"
        );
        let key = payload["content"]["session_key"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no session key"))?;
        let mut inbound =
            InboundGroupSession::new(&SessionKey::from_base64(key)?, MegolmConfig::version_1());
        let event: Value = serde_json::from_slice(&inbound.decrypt(&message)?.plaintext)?;
        anyhow::ensure!(
            event["content"]["body"] == format!("puppet message {n}").as_str(),
            "member {k} read another message"
        );
    }
    Ok(())
}

/// Members `0..count` of round `round`.
fn new_members(round: usize, count: usize) -> anyhow::Result<Vec<Member>> {
    let user = UserId::parse(PEER_USER)?;
    (0..count)
        .map(|k| {
            let mut account = Account::new();
            let device_id = OwnedDeviceId::from(format!("MEMBER{round}X{k}").as_str());
            let key = signed_one_time_key(&mut account, &user, &device_id)?;
            Ok(Member {
                account,
                device_id,
                key,
                session: None,
            })
        })
        .collect()
}

/// Bare vodozemac doing a rotation's crypto for `targets` (identity key,
/// one-time key): new group session and its inbound copy, Olm sessions
/// (created when `sessions` is empty), the room key encrypted for each,
/// one message encrypted. Milliseconds.
fn raw_rotation(
    sender: &Account,
    targets: &[(Curve25519PublicKey, Curve25519PublicKey)],
    sessions: &mut Vec<Session>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut group = GroupSession::new(MegolmConfig::version_1());
    let _own = InboundGroupSession::new(&group.session_key(), MegolmConfig::version_1());
    if sessions.is_empty() {
        for (identity, otk) in targets {
            sessions.push(sender.create_outbound_session(
                SessionConfig::version_1(),
                *identity,
                *otk,
            )?);
        }
    }
    let room_key = json!({
        "algorithm": MEGOLM_ALGORITHM,
        "room_id": "!raw:bench.invalid",
        "session_id": group.session_id(),
        "session_key": group.session_key().to_base64(),
    });
    for session in sessions.iter_mut() {
        let payload = json!({"type": "m.room_key", "content": room_key}).to_string();
        session.encrypt(payload)?;
    }
    group.encrypt(plaintext("!raw:bench.invalid", 0));
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// The outbound figures: `rounds` rounds in fresh rooms with fresh
/// devices.
async fn measure_outbound(
    manager: &AccountManager,
    from: &(OwnedUserId, OwnedDeviceId),
    recipients: usize,
    rounds: usize,
    period: usize,
) -> anyhow::Result<OutboundReport> {
    let from_ref = (from.0.as_ref(), from.1.as_ref());
    let sender_key = manager.identity_keys(&from.0, &from.1)?.curve25519;
    let settings = RotationSettings {
        period_msgs: period as u64,
        ..RotationSettings::default()
    };
    let (mut claimed, mut reused) = (Vec::new(), Vec::new());
    let mut parts: [Vec<f64>; 4] = Default::default();
    let (mut claimed_flushes, mut reused_flushes) = (Vec::new(), Vec::new());
    let (mut to_device, mut created) = (Vec::new(), Vec::new());
    let (mut encrypts, mut sends) = (Vec::new(), Vec::new());
    let (mut raw_claimed, mut raw_reused, mut raw_encrypt) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let room = OwnedRoomId::try_from(format!("!out{round}:bench.invalid"))?;
        let mut members = new_members(round, recipients)?;
        let mut n = 0usize;

        let flushes = manager.store().commit_stats().flushes;
        let sent = send(manager, from_ref, &room, settings, &members, n).await?;
        claimed_flushes.push((manager.store().commit_stats().flushes - flushes) as f64);
        anyhow::ensure!(
            sent.rotated,
            "the first message in a room started no session"
        );
        claimed.push(sent.total_ms());
        to_device.push(sent.to_device.len() as f64);
        created.push(sent.sessions_created as f64);
        members_read(&mut members, sender_key, &sent, n)?;

        for _ in 1..period {
            n += 1;
            let sent = send(manager, from_ref, &room, settings, &members, n).await?;
            anyhow::ensure!(
                !sent.rotated && sent.to_device.is_empty(),
                "message {n} rotated or shared a key"
            );
            encrypts.push(sent.encrypt);
            sends.push(sent.total_ms());
        }

        n += 1;
        let flushes = manager.store().commit_stats().flushes;
        let sent = send(manager, from_ref, &room, settings, &members, n).await?;
        reused_flushes.push((manager.store().commit_stats().flushes - flushes) as f64);
        anyhow::ensure!(
            sent.rotated && sent.sessions_created == 0,
            "message {n}: the due session was not rotated on existing Olm sessions"
        );
        reused.push(sent.total_ms());
        for (part, d) in parts
            .iter_mut()
            .zip([sent.prepare, sent.share, sent.mark, sent.encrypt])
        {
            part.push(d.as_secs_f64() * 1000.0);
        }
        to_device.push(sent.to_device.len() as f64);
        members_read(&mut members, sender_key, &sent, n)?;

        // The same crypto in bare vodozemac, on fresh devices.
        let sender = Account::new();
        let targets = (0..recipients)
            .map(|_| {
                let mut device = Account::new();
                device.generate_one_time_keys(1);
                let otk = *device
                    .one_time_keys()
                    .values()
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("no one-time key"))?;
                Ok((device.curve25519_key(), otk))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut sessions = Vec::new();
        raw_claimed.push(raw_rotation(&sender, &targets, &mut sessions)?);
        raw_reused.push(raw_rotation(&sender, &targets, &mut sessions)?);
        let mut group = GroupSession::new(MegolmConfig::version_1());
        for m in 0..period {
            let text = plaintext("!raw:bench.invalid", m);
            let t = Instant::now();
            group.encrypt(text);
            raw_encrypt.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    encrypts.sort();
    let [prepare, share, mark, first] = parts;
    Ok(OutboundReport {
        recipients,
        rounds,
        rotation_claimed_ms: median(claimed),
        rotation_reused_ms: median(reused),
        reused_prepare_ms: median(prepare),
        reused_share_ms: median(share),
        reused_mark_ms: median(mark),
        reused_first_encrypt_ms: median(first),
        to_device_per_rotation: mean(&to_device),
        olm_sessions_per_claimed_rotation: mean(&created),
        fsyncs_per_claimed_rotation: mean(&claimed_flushes),
        fsyncs_per_reused_rotation: mean(&reused_flushes),
        steady_messages: period.saturating_sub(1),
        encrypt_ms: percentile_ms(&encrypts, 50.0),
        encrypt_p99_ms: percentile_ms(&encrypts, 99.0),
        send_ms: median(sends),
        raw_rotation_claimed_ms: median(raw_claimed),
        raw_rotation_reused_ms: median(raw_reused),
        raw_encrypt_us: median(raw_encrypt),
    })
}

/// Start the listener over `manager` and `store` on a loopback port.
async fn start_listener(
    manager: &Arc<AccountManager>,
    store: Arc<bridgekeys_store::SledStore>,
) -> anyhow::Result<(Listener, tokio::sync::oneshot::Sender<()>, ServerTask)> {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let registration = Registration::generate(
        "bench",
        format!("http://{addr}"),
        "bench_bot",
        "@echo_.*:bench\\.invalid",
    );
    let server_name = <&ServerName>::try_from("bench.invalid")?;
    let handler = Arc::new(Counting::default());
    let appservice = Appservice::new(
        AppserviceConfig::from_registration(&registration, server_name)?,
        manager.clone(),
        store,
        handler.clone(),
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        appservice
            .serve_on(tcp, async {
                let _ = stopped.await;
            })
            .await
    });
    let listener = Listener {
        addr,
        token: registration.hs_token.clone(),
        handler,
        puppet: puppet(0)?,
    };
    Ok((listener, stop, server))
}

/// The listener's task.
type ServerTask = tokio::task::JoinHandle<Result<(), bridgekeys_appservice::AppserviceError>>;

/// Per-second rate, CPU per item and CPU busy of a measured stretch.
fn rates(spent: Spent, items: usize, threads: usize) -> (f64, Option<f64>, Option<f64>) {
    (
        items as f64 / spent.wall_s,
        spent.cpu_s.map(|c| c * 1e6 / items.max(1) as f64),
        spent.cpu_s.map(|c| c / (spent.wall_s * threads as f64)),
    )
}

/// Run the scenario.
pub async fn run(config: &MegolmBench) -> anyhow::Result<MegolmReport> {
    anyhow::ensure!(
        config.events > 0
            && config.session_messages > 1
            && config.recipients > 0
            && config.rounds > 0
            && !config.shapes.is_empty(),
        "events, recipients, rounds and shapes must be positive, session_messages above 1"
    );
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    std::fs::create_dir_all(&config.dir)?;
    let dir = tempfile::tempdir_in(&config.dir)?;
    let store = open_store(dir.path(), &StoreKey::generate())?;
    let manager = Arc::new(AccountManager::new(store.clone(), Default::default()));
    // Puppet 0 receives; puppet 1 sends in the outbound figures.
    create_puppets(&manager, 2).await?;
    let (listener, stop, server) = start_listener(&manager, store).await?;

    // Set-up: every load's rooms, keys delivered, events encrypted; raw
    // sessions with as many messages.
    let started = Instant::now();
    let messages = config.session_messages;
    let rooms = config.events.div_ceil(messages);
    let mut loads = Vec::new();
    for load in 0..=config.shapes.len() {
        let l = new_load(&manager, &listener, load, rooms, messages).await?;
        let raw = raw_sets(threads, rooms, messages)?;
        loads.push((l, raw));
    }
    let setup_s = started.elapsed().as_secs_f64();
    let slices = config.slices.clamp(1, messages);
    let rounds = slice_rounds(messages, slices);

    let mut transactions = Vec::new();
    let mut loads = loads.into_iter();
    for (tag, shape) in config.shapes.iter().enumerate() {
        let (load, mut raw) = loads
            .next()
            .ok_or_else(|| anyhow::anyhow!("no load for shape {shape}"))?;
        let a =
            measure_txn_load(&manager, &listener, &load, *shape, tag, &mut raw, &rounds).await?;
        anyhow::ensure!(
            a.raw_decrypted == load.events.len(),
            "raw: {} of {} messages decrypted",
            a.raw_decrypted,
            load.events.len()
        );
        let (events_per_s, cpu_us_per_event, cpu_busy) =
            rates(a.durable, a.durable_events, threads);
        let (raw_per_s, raw_cpu_us, _) = rates(a.raw, a.raw_decrypted, threads);
        let txns = a.latencies.len();
        transactions.push(TxnLoadReport {
            shape: shape.to_string(),
            events_per_txn: shape.events_per_txn,
            in_flight: shape.in_flight,
            transactions: txns,
            events: a.durable_events,
            events_per_s,
            transactions_per_s: txns as f64 / a.durable.wall_s,
            txn_p50_ms: percentile_ms(&a.latencies, 50.0),
            txn_p99_ms: percentile_ms(&a.latencies, 99.0),
            fsyncs_per_txn: a.flushes as f64 / txns.max(1) as f64,
            cpu_us_per_event,
            cpu_busy,
            raw_decrypts_per_s: raw_per_s,
            raw_cpu_us_per_decrypt: raw_cpu_us,
            ratio_to_raw: events_per_s / raw_per_s,
            cpu_ratio: raw_cpu_us.zip(cpu_us_per_event).map(|(raw, d)| raw / d),
        });
    }

    let (load, mut raw) = loads
        .next()
        .ok_or_else(|| anyhow::anyhow!("no load for the store level"))?;
    let load = Arc::new(load);
    let tasks = config.concurrency.clamp(1, rooms);
    let a = measure_store_load(&manager, &load, tasks, &mut raw, &rounds).await?;
    drop(raw);
    let (decrypts_per_s, cpu_us, _) = rates(a.durable, a.durable_events, threads);
    let (raw_per_s, raw_cpu_us, _) = rates(a.raw, a.raw_decrypted, threads);
    let store_level = StoreLevelReport {
        concurrency: tasks,
        events: a.durable_events,
        decrypts_per_s,
        p50_ms: percentile_ms(&a.latencies, 50.0),
        p99_ms: percentile_ms(&a.latencies, 99.0),
        decrypts_per_flush: a.writes as f64 / a.flushes.max(1) as f64,
        cpu_us_per_decrypt: cpu_us,
        raw_decrypts_per_s: raw_per_s,
        raw_cpu_us_per_decrypt: raw_cpu_us,
        ratio_to_raw: decrypts_per_s / raw_per_s,
    };
    let raw_from_pickle_us_per_decrypt = raw_from_pickle_us(messages)?;

    let outbound = measure_outbound(
        &manager,
        &puppet(1)?,
        config.recipients,
        config.rounds,
        messages,
    )
    .await?;
    let _ = stop.send(());
    server.await??;

    let fewest_in_flight = transactions.iter().map(|t| t.in_flight).min().unwrap_or(1);
    let headline = transactions
        .iter()
        .filter(|t| t.in_flight == fewest_in_flight)
        .max_by_key(|t| t.events_per_txn)
        .ok_or_else(|| anyhow::anyhow!("no transaction load measured"))?;
    let (headline_shape, ratio_to_raw) = (headline.shape.clone(), headline.ratio_to_raw);
    Ok(MegolmReport {
        threads,
        measured: MEASURED,
        session_messages: messages,
        room_keys: rooms * (config.shapes.len() + 1),
        setup_s,
        slices: rounds.len(),
        transactions,
        store_level,
        raw_from_pickle_us_per_decrypt,
        headline_shape,
        ratio_to_raw,
        goal_ratio: GOAL_RATIO,
        goal_met: ratio_to_raw >= GOAL_RATIO,
        load_average_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse().ok()),
        outbound,
    })
}
