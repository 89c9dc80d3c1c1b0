//! The `synapse` scenario: key claims through a real Synapse (started by
//! `bridgekeys-testkit`, SQLite), once for keys that local devices uploaded
//! to the homeserver ("local") and once for puppet devices whose keys
//! Synapse asks our listener for (MSC3983, "proxied").
//!
//! The listener is [`Appservice::router`] over a durable `SledStore`, served
//! on loopback and wrapped in a middleware that times every request to the
//! claim paths, so the run can say which share of a proxied claim's latency
//! is spent inside the bridge (`appservice_share`).
//!
//! Each phase runs twice: loaded (`connections` keep-alive connections) and
//! serial (one connection), because under load a claim's latency is mostly
//! queueing inside Synapse, while the serial figures show the cost of each
//! hop.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    middleware::{self, Next},
    response::Response,
};
use bridgekeys_appservice::{
    Appservice, AppserviceConfig, AsToken, BridgeHandler, HandlerError, HomeserverClient,
    ProvisionConfig, Provisioner, Registration, Transaction, paths,
};
use bridgekeys_olm::{AccountManager, ManagerConfig, sign_json};
use bridgekeys_store::{Store, StoreKey};
use bridgekeys_testkit::{Method, StatusCode, Synapse, SynapseOptions, TestUser};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request as HttpRequest;
use hyper_util::rt::TokioIo;
use ruma::{OneTimeKeyAlgorithm, ServerName, UserId};
use serde::Serialize;
use serde_json::{Value, json};
use vodozemac::olm::Account;

use crate::support::{open_store, percentile_ms};

/// Knobs of the `synapse` scenario.
#[derive(Clone, Debug)]
pub struct SynapseBench {
    /// Local users (one device each) that upload one-time keys to Synapse.
    pub local_devices: usize,
    /// One-time keys each local device uploads.
    pub keys_per_device: usize,
    /// Puppets provisioned through the `Provisioner` (one device each).
    pub puppets: usize,
    /// Concurrent keep-alive connections of the loaded phases.
    pub connections: usize,
    /// Claims per loaded phase (1 key each).
    pub claims: usize,
    /// Claims per serial phase (one connection; 0 skips them).
    pub serial_claims: usize,
    /// Where the store and the registration go (a temporary directory inside).
    pub dir: PathBuf,
}

impl Default for SynapseBench {
    fn default() -> Self {
        Self {
            local_devices: 40,
            keys_per_device: 55,
            puppets: 100,
            connections: 64,
            claims: 2_000,
            serial_claims: 200,
            dir: PathBuf::from("target/bench-data"),
        }
    }
}

/// Figures of one `synapse` run.
#[derive(Debug, Serialize)]
pub struct SynapseReport {
    /// Synapse's version (as it reports it).
    pub synapse_version: String,
    /// Synapse's database.
    pub database: String,
    /// `/proc/loadavg` before the run (the machine is shared).
    pub loadavg_before: String,
    /// Seconds to start Synapse (venv cached) and provision everything.
    pub setup_s: f64,
    /// Local devices that uploaded keys.
    pub local_devices: usize,
    /// Keys each local device uploaded.
    pub keys_per_device: usize,
    /// Provisioned puppet devices.
    pub puppets: usize,
    /// Concurrent connections of the loaded phases.
    pub connections: usize,
    /// Claims per loaded phase.
    pub claims: usize,
    /// Claims per serial phase.
    pub serial_claims: usize,

    /// Local keys claimed per second (loaded).
    pub synapse_local_claims_per_s: f64,
    /// Median local claim latency (loaded, client side).
    pub synapse_local_p50_ms: f64,
    /// 99th percentile local claim latency (loaded, client side).
    pub synapse_local_p99_ms: f64,
    /// Local claims that did not return exactly one fresh key.
    pub synapse_local_failures: usize,

    /// Proxied keys claimed per second (loaded).
    pub synapse_proxied_claims_per_s: f64,
    /// Median proxied claim latency (loaded, client side).
    pub synapse_proxied_p50_ms: f64,
    /// 99th percentile proxied claim latency (loaded, client side).
    pub synapse_proxied_p99_ms: f64,
    /// Proxied claims that did not return exactly one fresh, non-fallback key.
    pub synapse_proxied_failures: usize,

    /// CPU during the loaded local phase.
    pub local_cpu: CpuUse,
    /// CPU during the loaded proxied phase.
    pub proxied_cpu: CpuUse,
    /// Claim requests our listener saw during the loaded proxied phase.
    pub listener_claim_requests: usize,
    /// Mean time inside our listener per proxied claim (loaded).
    pub listener_mean_ms: f64,
    /// Median time inside our listener per claim request (loaded).
    pub listener_p50_ms: f64,
    /// 99th percentile time inside our listener per claim request (loaded).
    pub listener_p99_ms: f64,
    /// Claims answered per `fsync` during the loaded proxied phase.
    pub listener_claims_per_flush: f64,
    /// listener_mean_ms / mean client latency of a proxied claim (loaded).
    pub appservice_share: f64,

    /// Serial (one connection): median local claim latency.
    pub serial_local_p50_ms: f64,
    /// Serial: median proxied claim latency.
    pub serial_proxied_p50_ms: f64,
    /// Serial: mean time inside our listener per proxied claim.
    pub serial_listener_mean_ms: f64,
    /// Serial: median time inside our listener per claim request.
    pub serial_listener_p50_ms: f64,
    /// Serial: listener mean / mean client latency of a proxied claim.
    pub serial_appservice_share: f64,
    /// Serial: of the listener's time per claim request, the mean spent
    /// waiting for the request body to arrive (the homeserver's sending).
    pub serial_listener_body_wait_mean_ms: f64,
    /// Serial: of the listener's time per claim request, the mean spent
    /// answering the parsed claim (the durable `AccountManager::claim` and
    /// the answer's assembly; the listener's `claim_duration_seconds`). The rest is
    /// HTTP, authentication and JSON in and out.
    pub serial_listener_answer_mean_ms: f64,
    /// Serial `AccountManager::claim` without HTTP (durable), median: the
    /// floor of the listener's time.
    pub direct_claim_p50_ms: f64,
    /// Mean of the same.
    pub direct_claim_mean_ms: f64,
    /// One 4 KiB in-place write + `fdatasync` in the store's directory,
    /// median: the disk's barrier alone (noisy on a shared VM).
    pub fdatasync_p50_ms: f64,
    /// Mean of the same.
    pub fdatasync_mean_ms: f64,
    /// Failures of the serial phases (both kinds).
    pub serial_failures: usize,
    /// Public keys that came back more than once (across all phases).
    pub keys_handed_out_twice: usize,
    /// Local claims that returned a key no local device uploaded.
    pub local_keys_not_uploaded: usize,
    /// The first failure seen, if any (for the reader).
    pub first_failure: Option<String>,
}

impl SynapseReport {
    /// Print the figures as a table, like the other scenarios.
    pub fn print(&self) {
        let row = |label: String, value: String| println!("  {label:<44} {value}");
        let ms2 = |a: f64, b: f64| format!("{a:>7.2} / {b:.2} ms");
        println!(
            "scenario: synapse (Synapse {}, {}; setup {:.1} s; loadavg before: {})",
            self.synapse_version, self.database, self.setup_s, self.loadavg_before
        );
        row(
            "local devices x uploaded keys each".into(),
            format!("{:>7} x {}", self.local_devices, self.keys_per_device),
        );
        row("provisioned puppets".into(), format!("{:>7}", self.puppets));
        row(
            format!("local claims ({} connections)", self.connections),
            format!("{:>7.0} claims/s", self.synapse_local_claims_per_s),
        );
        row(
            "  latency p50 / p99".into(),
            ms2(self.synapse_local_p50_ms, self.synapse_local_p99_ms),
        );
        row(
            "  cores busy: Synapse / bench".into(),
            format!(
                "{:>7.2} / {:.2}",
                self.local_cpu.synapse_cores, self.local_cpu.bench_cores
            ),
        );
        row(
            format!("proxied claims ({} connections)", self.connections),
            format!("{:>7.0} claims/s", self.synapse_proxied_claims_per_s),
        );
        row(
            "  latency p50 / p99".into(),
            ms2(self.synapse_proxied_p50_ms, self.synapse_proxied_p99_ms),
        );
        row(
            "  cores busy: Synapse / bench".into(),
            format!(
                "{:>7.2} / {:.2}",
                self.proxied_cpu.synapse_cores, self.proxied_cpu.bench_cores
            ),
        );
        row(
            format!(
                "  in our listener mean / p50 ({} requests)",
                self.listener_claim_requests
            ),
            ms2(self.listener_mean_ms, self.listener_p50_ms),
        );
        row(
            "  in our listener p99".into(),
            format!("{:>7.2} ms", self.listener_p99_ms),
        );
        row(
            "  claims per fsync".into(),
            format!("{:>7.1}", self.listener_claims_per_flush),
        );
        row(
            "  appservice_share (goal <= 0.10)".into(),
            format!("{:>7.3}", self.appservice_share),
        );
        row(
            format!(
                "serial ({} claims, 1 connection) local p50",
                self.serial_claims
            ),
            format!("{:>7.2} ms", self.serial_local_p50_ms),
        );
        row(
            "  proxied p50".into(),
            format!("{:>7.2} ms", self.serial_proxied_p50_ms),
        );
        row(
            "  in our listener mean / p50".into(),
            ms2(self.serial_listener_mean_ms, self.serial_listener_p50_ms),
        );
        row(
            "    of which: body wait / answering / HTTP+JSON".into(),
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                self.serial_listener_body_wait_mean_ms,
                self.serial_listener_answer_mean_ms,
                (self.serial_listener_mean_ms
                    - self.serial_listener_body_wait_mean_ms
                    - self.serial_listener_answer_mean_ms)
                    .max(0.0)
            ),
        );
        row(
            "  appservice_share".into(),
            format!("{:>7.3}", self.serial_appservice_share),
        );
        row(
            "  durable AccountManager::claim p50 / mean".into(),
            ms2(self.direct_claim_p50_ms, self.direct_claim_mean_ms),
        );
        row(
            "  in-place 4 KiB fdatasync p50 / mean".into(),
            ms2(self.fdatasync_p50_ms, self.fdatasync_mean_ms),
        );
        row(
            "failures local / proxied / serial".into(),
            format!(
                "{:>7} / {} / {}",
                self.synapse_local_failures, self.synapse_proxied_failures, self.serial_failures
            ),
        );
        row(
            "keys twice / local keys not uploaded".into(),
            format!(
                "{:>7} / {}",
                self.keys_handed_out_twice, self.local_keys_not_uploaded
            ),
        );
        if let Some(why) = &self.first_failure {
            println!("  first failure: {why}");
        }
    }

    /// Claims that failed any check, over all phases.
    pub fn failures(&self) -> usize {
        self.synapse_local_failures
            + self.synapse_proxied_failures
            + self.serial_failures
            + self.keys_handed_out_twice
            + self.local_keys_not_uploaded
    }
}

/// A bridge that does nothing with transactions.
struct NoBridge;

impl BridgeHandler for NoBridge {
    async fn transaction(&self, _: &Transaction) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Time spent inside the listener on the claim paths, and how much of it
/// went on waiting for the request body.
#[derive(Default)]
struct ListenerClock(Mutex<(Vec<Duration>, Duration)>);

impl ListenerClock {
    fn record(&self, d: Duration, body_wait: Duration) {
        let mut clock = self.0.lock().unwrap_or_else(|e| e.into_inner());
        clock.0.push(d);
        clock.1 += body_wait;
    }

    /// The times recorded since the last take, and their body waits' sum.
    fn take(&self) -> (Vec<Duration>, Duration) {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Outermost middleware around [`Appservice::router`]: times the claim
/// requests from the moment the router gets them until the answer (whose
/// body is already built) leaves it.
async fn time_claims(
    State(clock): State<Arc<ListenerClock>>,
    req: Request,
    next: Next,
) -> Response {
    if !paths::CLAIM.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let started = Instant::now();
    // The body first, so the time spent waiting for it (the homeserver's
    // send, not our work) is told apart.
    let (parts, body) = req.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body_in = started.elapsed();
    let response = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    clock.record(started.elapsed(), body_in);
    response
}

/// `(sum, count)` of the listener's `claim_duration_seconds` histogram: the time
/// spent answering claims once the request is parsed (the account
/// manager's durable claim and the answer's assembly).
fn claim_seconds(appservice_metrics: &str) -> (f64, f64) {
    let value = |name: &str| {
        appservice_metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("bridgekeys_appservice_claim_duration_seconds_sum "),
        value("bridgekeys_appservice_claim_duration_seconds_count "),
    )
}

/// Whose keys a phase claims.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Local,
    Proxied,
}

/// A device whose keys are claimed.
#[derive(Clone, Debug)]
struct Target {
    user: String,
    device: String,
}

/// What one load phase measured.
struct Phase {
    /// Latencies of the successful claims, sorted.
    latencies: Vec<Duration>,
    failures: usize,
    first_failure: Option<String>,
    elapsed_s: f64,
    /// The public keys handed out (for the never-twice check).
    keys: Vec<String>,
}

impl Phase {
    fn per_s(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed_s
    }

    fn mean_ms(&self) -> f64 {
        mean_ms(&self.latencies)
    }
}

fn mean_ms(d: &[Duration]) -> f64 {
    if d.is_empty() {
        return 0.0;
    }
    d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / d.len() as f64
}

/// The single key a claim answer must hold for `target`, or why not.
fn check_answer(answer: &Value, target: &Target, kind: Kind) -> Result<String, String> {
    let Some(keys) = answer["one_time_keys"][&target.user][&target.device].as_object() else {
        return Err(format!(
            "no key for {} {}: {answer}",
            target.user, target.device
        ));
    };
    let mut entries = keys.iter();
    let (Some((id, key)), None) = (entries.next(), entries.next()) else {
        return Err(format!("{} keys instead of 1: {answer}", keys.len()));
    };
    if !id.starts_with("signed_curve25519:") {
        return Err(format!("unexpected key id {id}"));
    }
    if kind == Kind::Proxied && key.get("fallback").is_some() {
        return Err(format!("a fallback key while the bridge is up: {key}"));
    }
    if key["signatures"][&target.user]
        .as_object()
        .is_none_or(|s| s.is_empty())
    {
        return Err(format!("unsigned key: {key}"));
    }
    key["key"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no public key in {key}"))
}

/// The claim load generator's connection: raw hyper on purpose (not
/// reqwest), to measure Synapse's throughput over exactly the connections
/// asked for, with nothing in between. The bridge's own homeserver calls
/// go through `HomeserverClient` (reqwest).
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One claim over a kept-alive connection: status and JSON body.
async fn claim_once(
    sender: &mut Sender,
    port: u16,
    token: &str,
    target: &Target,
) -> anyhow::Result<(StatusCode, Value)> {
    let body = json!({
        "one_time_keys": { target.user.as_str(): { target.device.as_str(): "signed_curve25519" } }
    });
    let request = HttpRequest::post("/_matrix/client/v3/keys/claim")
        .header("host", format!("127.0.0.1:{port}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Claim `claims` keys, one per request, on `connections` keep-alive
/// connections to Synapse as the claiming user; claim `i` (counted by the
/// shared `cursor`, so phases continue where the last one stopped) goes to
/// `targets[i % len]`.
async fn claim_load(
    port: u16,
    token: Arc<String>,
    targets: Arc<Vec<Target>>,
    cursor: Arc<AtomicUsize>,
    claims: usize,
    connections: usize,
    kind: Kind,
) -> anyhow::Result<Phase> {
    let remaining = Arc::new(AtomicUsize::new(claims));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let (token, targets, cursor, remaining) = (
            token.clone(),
            targets.clone(),
            cursor.clone(),
            remaining.clone(),
        );
        clients.spawn(async move {
            let mut sender = connect(port).await?;
            let mut latencies = Vec::new();
            let mut keys = Vec::new();
            let mut failures = 0usize;
            let mut first_failure = None;
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                let target = &targets[i % targets.len()];
                let t = Instant::now();
                let outcome = match claim_once(&mut sender, port, &token, target).await {
                    Ok((StatusCode::OK, answer)) => check_answer(&answer, target, kind),
                    Ok((status, answer)) => Err(format!("claim answered {status}: {answer}")),
                    Err(e) => {
                        // A broken connection: count it and reconnect.
                        sender = connect(port).await?;
                        Err(format!("transport: {e}"))
                    }
                };
                let latency = t.elapsed();
                match outcome {
                    Ok(key) => {
                        latencies.push(latency);
                        keys.push(key);
                    }
                    Err(why) => {
                        failures += 1;
                        first_failure.get_or_insert(why);
                    }
                }
            }
            anyhow::Ok((latencies, keys, failures, first_failure))
        });
    }
    let mut phase = Phase {
        latencies: Vec::with_capacity(claims),
        failures: 0,
        first_failure: None,
        elapsed_s: 0.0,
        keys: Vec::with_capacity(claims),
    };
    while let Some(r) = clients.join_next().await {
        let (latencies, keys, failures, first_failure) = r??;
        phase.latencies.extend(latencies);
        phase.keys.extend(keys);
        phase.failures += failures;
        if phase.first_failure.is_none() {
            phase.first_failure = first_failure;
        }
    }
    phase.elapsed_s = started.elapsed().as_secs_f64();
    phase.latencies.sort();
    Ok(phase)
}

/// Run `f(i)` for `i in 0..n`, at most `width` at once.
async fn for_each_concurrently<F, Fut>(n: usize, width: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..width.max(1) {
        let (next, f) = (next.clone(), f.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                f(i).await?;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    Ok(())
}

/// Device keys and `count` one-time keys of a fresh client account, signed
/// like a real client does (ed25519 over canonical JSON): the keys/upload
/// body and the one-time public keys in it.
fn client_upload(user: &TestUser, count: usize) -> anyhow::Result<(Value, Vec<String>)> {
    let mut account = Account::new();
    let (user_id, device_id) = (user.user_id.as_str(), user.device_id.as_str());
    let signing_key = format!("ed25519:{device_id}");
    let mut device_keys = json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device_id}"): account.curve25519_key().to_base64(),
            signing_key.clone(): account.ed25519_key().to_base64(),
        }
    });
    let signature = sign_json(&account, &device_keys)?;
    device_keys["signatures"] = json!({ user_id: { signing_key.clone(): signature } });

    account.generate_one_time_keys(count);
    let mut one_time_keys = serde_json::Map::new();
    let mut publics = Vec::with_capacity(count);
    for (id, key) in account.one_time_keys() {
        publics.push(key.to_base64());
        let mut object = json!({ "key": key.to_base64() });
        let signature = sign_json(&account, &object)?;
        object["signatures"] = json!({ user_id: { signing_key.clone(): signature } });
        one_time_keys.insert(format!("signed_curve25519:{}", id.to_base64()), object);
    }
    account.mark_keys_as_published();
    Ok((
        json!({ "device_keys": device_keys, "one_time_keys": one_time_keys }),
        publics,
    ))
}

/// Synapse's version, from its admin endpoint if it answers, else the one
/// the testkit installs.
async fn synapse_version(synapse: &Synapse) -> String {
    match synapse
        .request(Method::GET, "/_synapse/admin/v1/server_version", None, None)
        .await
    {
        Ok((StatusCode::OK, v)) => v["server_version"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| bridgekeys_testkit::SYNAPSE_VERSION.to_owned()),
        _ => bridgekeys_testkit::SYNAPSE_VERSION.to_owned(),
    }
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat`; `None` where that is not readable.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_s())
}

fn clock_ticks_per_s() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The pid of the Synapse whose data directory is `data` (found by its
/// command line, since the testkit keeps the child to itself).
fn synapse_pid(data: &std::path::Path) -> Option<String> {
    let config = data.join("homeserver.yaml");
    let config = config.to_str()?;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("synapse.app.homeserver") && cmdline.contains(config)).then_some(pid)
        })
}

/// CPU used by Synapse and by this process (listener + load generator)
/// across a phase, as cores busy on average.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuUse {
    /// Synapse's CPU seconds / wall seconds (1.0 = one core busy).
    pub synapse_cores: f64,
    /// This process's CPU seconds / wall seconds.
    pub bench_cores: f64,
}

struct CpuMeter {
    synapse_pid: Option<String>,
    start: (Option<f64>, Option<f64>, Instant),
}

impl CpuMeter {
    fn start(synapse_pid: Option<String>) -> Self {
        let start = (
            synapse_pid.as_deref().and_then(cpu_seconds),
            cpu_seconds("self"),
            Instant::now(),
        );
        Self { synapse_pid, start }
    }

    fn stop(self) -> CpuUse {
        let wall = self.start.2.elapsed().as_secs_f64().max(1e-9);
        let used = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(b), Some(a)) => (a - b) / wall,
            _ => f64::NAN,
        };
        CpuUse {
            synapse_cores: used(
                self.start.0,
                self.synapse_pid.as_deref().and_then(cpu_seconds),
            ),
            bench_cores: used(self.start.1, cpu_seconds("self")),
        }
    }
}

/// Median and mean of `n` 4 KiB writes, each followed by `fdatasync`, into
/// a preallocated file in `dir` (no size change, like sled's segments):
/// what one durability barrier costs on this disk. On the 2-vCPU reference
/// VM this swings between ~0.1 ms and ~4 ms with what else is running (a
/// lone waiter on an otherwise idle VM seems to wake on a 4 ms tick), so
/// read it next to `direct_claim_*`, which pays the same barrier.
fn fdatasync_ms(dir: &std::path::Path, n: usize) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let path = dir.join("fsync-probe");
    let file = std::fs::File::create(&path)?;
    file.set_len((n * BLOCK) as u64)?;
    file.sync_all()?;
    let block = [0x5au8; BLOCK];
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        file.write_all_at(&block, (i * BLOCK) as u64)?;
        file.sync_data()?;
        times.push(t.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort();
    Ok((percentile_ms(&times, 50.0), mean_ms(&times)))
}

fn first_of(failures: [&Option<String>; 4]) -> Option<String> {
    failures.into_iter().flatten().next().cloned()
}

/// Run the scenario.
pub async fn run(config: &SynapseBench) -> anyhow::Result<SynapseReport> {
    let local_keys = config.local_devices * config.keys_per_device;
    anyhow::ensure!(
        config.local_devices > 0 && config.puppets > 0,
        "need at least one local device and one puppet"
    );
    anyhow::ensure!(
        local_keys >= config.claims + config.serial_claims,
        "{} local devices x {} keys = {local_keys} keys: too few for {} + {} claims \
         (every measured claim must consume an uploaded key)",
        config.local_devices,
        config.keys_per_device,
        config.claims,
        config.serial_claims
    );
    let loadavg_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let setup = Instant::now();

    // The bridge's side: a durable store, the manager, the registration.
    std::fs::create_dir_all(&config.dir)?;
    let data = tempfile::tempdir_in(&config.dir)?;
    let store = open_store(data.path(), &StoreKey::generate())?;
    let manager = Arc::new(AccountManager::new(store.clone(), ManagerConfig::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let registration = Registration::generate(
        "bridgekeys-bench",
        format!("http://{addr}"),
        "echo_bot",
        "@echo_.*:localhost",
    );
    let registration_path = data.path().join("registration.yaml");
    registration.write_new(&registration_path)?;

    // Synapse, configured to proxy claims for the namespace to us.
    let synapse = Synapse::start(SynapseOptions {
        appservice_registrations: vec![registration_path],
        ..SynapseOptions::default()
    })
    .await?;
    let port = synapse.port();
    let synapse_version = synapse_version(&synapse).await;

    // Our listener: the library's router inside the timing middleware.
    let client =
        HomeserverClient::new(&synapse.url(), AsToken::new(registration.as_token.clone()))?;
    let provisioner = Arc::new(Provisioner::new(
        client,
        manager.clone(),
        store.clone(),
        ProvisionConfig::from_registration(&registration),
    ));
    let server_name = <&ServerName>::try_from("localhost")?;
    let appservice = Appservice::new(
        AppserviceConfig::from_registration(&registration, server_name)?,
        manager.clone(),
        store.clone(),
        Arc::new(NoBridge),
    )?
    .with_provisioner(provisioner.clone());
    let clock = Arc::new(ListenerClock::default());
    let appservice_metrics = appservice.clone();
    let app = appservice
        .router()
        .layer(middleware::from_fn_with_state(clock.clone(), time_claims));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    // Puppets: registered, device created, keys uploaded by the Provisioner.
    let puppet_targets = Arc::new(Mutex::new(vec![None; config.puppets]));
    {
        let (provisioner, puppet_targets) = (provisioner.clone(), puppet_targets.clone());
        for_each_concurrently(config.puppets, 8, move |i| {
            let (provisioner, puppet_targets) = (provisioner.clone(), puppet_targets.clone());
            async move {
                let user = UserId::parse(format!("@echo_{i}:localhost"))?;
                let device = provisioner.ensure_puppet(&user).await?;
                puppet_targets.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Target {
                    user: user.to_string(),
                    device: device.to_string(),
                });
                Ok(())
            }
        })
        .await?;
    }
    let puppet_targets: Vec<Target> =
        std::mem::take(&mut *puppet_targets.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .flatten()
            .collect();

    // Local devices: registered users that upload signed one-time keys.
    let synapse = Arc::new(synapse);
    let local_targets = Arc::new(Mutex::new(vec![None; config.local_devices]));
    let uploaded = Arc::new(Mutex::new(HashSet::new()));
    {
        let (synapse, local_targets, uploaded) =
            (synapse.clone(), local_targets.clone(), uploaded.clone());
        let keys_per_device = config.keys_per_device;
        for_each_concurrently(config.local_devices, 8, move |i| {
            let (synapse, local_targets, uploaded) =
                (synapse.clone(), local_targets.clone(), uploaded.clone());
            async move {
                let user = synapse
                    .register_user(&format!("local_{i}"), "bench password")
                    .await?;
                let (upload, publics) = client_upload(&user, keys_per_device)?;
                let (status, answer) = synapse
                    .request(
                        Method::POST,
                        "/_matrix/client/v3/keys/upload",
                        Some(&user.access_token),
                        Some(&upload),
                    )
                    .await?;
                let stored = answer["one_time_key_counts"]["signed_curve25519"].as_u64();
                anyhow::ensure!(
                    status == StatusCode::OK && stored == Some(keys_per_device as u64),
                    "keys/upload for {} answered {status}: {answer}",
                    user.user_id
                );
                uploaded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(publics);
                local_targets.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Target {
                    user: user.user_id,
                    device: user.device_id,
                });
                Ok(())
            }
        })
        .await?;
    }
    let local_targets: Vec<Target> =
        std::mem::take(&mut *local_targets.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .flatten()
            .collect();
    let claimer = synapse.register_user("claimer", "bench password").await?;
    let token = Arc::new(claimer.access_token.clone());
    let setup_s = setup.elapsed().as_secs_f64();

    let local_targets = Arc::new(local_targets);
    let puppet_targets = Arc::new(puppet_targets);
    let local_cursor = Arc::new(AtomicUsize::new(0));
    let puppet_cursor = Arc::new(AtomicUsize::new(0));
    let phase =
        |targets: &Arc<Vec<Target>>, cursor: &Arc<AtomicUsize>, claims, connections, kind| {
            claim_load(
                port,
                token.clone(),
                targets.clone(),
                cursor.clone(),
                claims,
                connections,
                kind,
            )
        };

    let synapse_pid = synapse_pid(synapse.data_dir());

    // (a) local keys, loaded.
    let cpu = CpuMeter::start(synapse_pid.clone());
    let local = phase(
        &local_targets,
        &local_cursor,
        config.claims,
        config.connections,
        Kind::Local,
    )
    .await?;
    let local_cpu = cpu.stop();

    // (b) proxied keys, loaded, with the listener timed.
    clock.take();
    let flushes_before = store.commit_stats().flushes;
    let cpu = CpuMeter::start(synapse_pid);
    let proxied = phase(
        &puppet_targets,
        &puppet_cursor,
        config.claims,
        config.connections,
        Kind::Proxied,
    )
    .await?;
    let proxied_cpu = cpu.stop();
    let flushes = store.commit_stats().flushes - flushes_before;
    let (mut listener_times, _) = clock.take();
    listener_times.sort();

    // Serial phases: one connection, the cost of each hop without queueing.
    let serial_local = phase(
        &local_targets,
        &local_cursor,
        config.serial_claims,
        1,
        Kind::Local,
    )
    .await?;
    clock.take();
    let answered_before = claim_seconds(&appservice_metrics.metrics_text()?);
    let serial_proxied = phase(
        &puppet_targets,
        &puppet_cursor,
        config.serial_claims,
        1,
        Kind::Proxied,
    )
    .await?;
    let (mut serial_listener, serial_body_wait) = clock.take();
    serial_listener.sort();
    let answered_after = claim_seconds(&appservice_metrics.metrics_text()?);
    let serial_answer_mean_ms = {
        let (sum, count) = (
            answered_after.0 - answered_before.0,
            answered_after.1 - answered_before.1,
        );
        if count > 0.0 {
            sum * 1000.0 / count
        } else {
            0.0
        }
    };

    // The floor of the listener's time: the durable claim alone.
    let mut direct = Vec::with_capacity(config.serial_claims);
    for i in 0..config.serial_claims {
        let target = &puppet_targets[i % puppet_targets.len()];
        let user = UserId::parse(target.user.as_str())?;
        let device = ruma::OwnedDeviceId::from(target.device.as_str());
        let t = Instant::now();
        let keys = manager
            .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await?;
        direct.push(t.elapsed());
        anyhow::ensure!(keys.len() == 1, "direct claim returned {} keys", keys.len());
    }
    direct.sort();
    let (fdatasync_p50_ms, fdatasync_mean_ms) =
        fdatasync_ms(data.path(), config.serial_claims.max(50))?;

    let _ = stop.send(());
    server.await??;
    drop(synapse);

    // No public key may have been handed out twice, in any phase.
    let mut seen = HashSet::new();
    let keys_handed_out_twice = [&local, &proxied, &serial_local, &serial_proxied]
        .iter()
        .flat_map(|p| &p.keys)
        .filter(|key| !seen.insert(*key))
        .count();
    // Every local key must be one a local device uploaded.
    let local_keys_not_uploaded = {
        let uploaded = uploaded.lock().unwrap_or_else(|e| e.into_inner());
        [&local, &serial_local]
            .iter()
            .flat_map(|p| &p.keys)
            .filter(|key| !uploaded.contains(*key))
            .count()
    };
    let first_failure = first_of([
        &local.first_failure,
        &proxied.first_failure,
        &serial_local.first_failure,
        &serial_proxied.first_failure,
    ])
    .or_else(|| {
        (keys_handed_out_twice > 0)
            .then(|| format!("{keys_handed_out_twice} keys handed out twice"))
    })
    .or_else(|| {
        (local_keys_not_uploaded > 0)
            .then(|| format!("{local_keys_not_uploaded} local keys that no device uploaded"))
    });

    let listener_total: f64 = listener_times.iter().map(Duration::as_secs_f64).sum();
    let listener_mean_ms = listener_total * 1000.0 / proxied.latencies.len().max(1) as f64;
    let serial_listener_total: f64 = serial_listener.iter().map(Duration::as_secs_f64).sum();
    let serial_listener_mean_ms =
        serial_listener_total * 1000.0 / serial_proxied.latencies.len().max(1) as f64;
    let share = |listener: f64, client: f64| if client > 0.0 { listener / client } else { 0.0 };

    Ok(SynapseReport {
        synapse_version,
        database: "sqlite3".into(),
        loadavg_before,
        setup_s,
        local_devices: config.local_devices,
        keys_per_device: config.keys_per_device,
        puppets: config.puppets,
        connections: config.connections,
        claims: config.claims,
        serial_claims: config.serial_claims,
        synapse_local_claims_per_s: local.per_s(),
        synapse_local_p50_ms: percentile_ms(&local.latencies, 50.0),
        synapse_local_p99_ms: percentile_ms(&local.latencies, 99.0),
        synapse_local_failures: local.failures,
        synapse_proxied_claims_per_s: proxied.per_s(),
        synapse_proxied_p50_ms: percentile_ms(&proxied.latencies, 50.0),
        synapse_proxied_p99_ms: percentile_ms(&proxied.latencies, 99.0),
        synapse_proxied_failures: proxied.failures,
        local_cpu,
        proxied_cpu,
        listener_claim_requests: listener_times.len(),
        listener_mean_ms,
        listener_p50_ms: percentile_ms(&listener_times, 50.0),
        listener_p99_ms: percentile_ms(&listener_times, 99.0),
        listener_claims_per_flush: listener_times.len() as f64 / flushes.max(1) as f64,
        appservice_share: share(listener_mean_ms, proxied.mean_ms()),
        serial_local_p50_ms: percentile_ms(&serial_local.latencies, 50.0),
        serial_proxied_p50_ms: percentile_ms(&serial_proxied.latencies, 50.0),
        serial_listener_mean_ms,
        serial_listener_p50_ms: percentile_ms(&serial_listener, 50.0),
        serial_appservice_share: share(serial_listener_mean_ms, serial_proxied.mean_ms()),
        serial_listener_body_wait_mean_ms: serial_body_wait.as_secs_f64() * 1000.0
            / serial_listener.len().max(1) as f64,
        serial_listener_answer_mean_ms: serial_answer_mean_ms,
        direct_claim_p50_ms: percentile_ms(&direct, 50.0),
        direct_claim_mean_ms: mean_ms(&direct),
        fdatasync_p50_ms,
        fdatasync_mean_ms,
        serial_failures: serial_local.failures + serial_proxied.failures,
        keys_handed_out_twice,
        local_keys_not_uploaded,
        first_failure,
    })
}

#[cfg(test)]
mod tests {
    use super::claim_seconds;

    #[test]
    fn the_claim_histogram_is_read_from_the_listeners_metrics() {
        let text = "# TYPE bridgekeys_appservice_claim_duration_seconds histogram\n\
            bridgekeys_appservice_claim_duration_seconds_bucket{le=\"0.0005\"} 3\n\
            bridgekeys_appservice_claim_duration_seconds_sum 0.125\n\
            bridgekeys_appservice_claim_duration_seconds_count 250\n\
            bridgekeys_appservice_claims_total 250\n";
        assert_eq!(claim_seconds(text), (0.125, 250.0));
        assert_eq!(claim_seconds(""), (0.0, 0.0));
    }
}
