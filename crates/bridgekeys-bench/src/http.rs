//! The `http` scenario: key claims over loopback HTTP to the real listener
//! (auth, parsing, namespace, durable store), as the homeserver sends them.
//!
//! The load generator stays on raw hyper (one HTTP/1 connection per
//! client task, nothing between it and the socket) rather than reqwest:
//! it measures the server's throughput and latency, so the client side
//! must add as little, and as predictable, work as it can.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use bridgekeys_appservice::{
    Appservice, AppserviceConfig, BridgeHandler, HandlerError, Registration, Transaction,
};
use bridgekeys_store::StoreKey;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng, rngs::StdRng};
use ruma::ServerName;
use serde::Serialize;

use crate::{
    manager::measure_raw,
    pg::Server,
    support::{create_puppets, open_store, percentile_ms, puppet},
};

/// Knobs of the `http` scenario.
#[derive(Clone, Debug)]
pub struct HttpBench {
    /// Provisioned puppet devices.
    pub devices: usize,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Claims to measure (1 key each).
    pub claims: usize,
    /// Seconds per raw crypto measurement.
    pub raw_seconds: f64,
    /// Where the store goes (a temporary directory inside it).
    pub dir: std::path::PathBuf,
}

/// Figures of one `http` run.
#[derive(Debug, Serialize)]
pub struct HttpReport {
    /// vodozemac generate + sign, keys/s on one thread.
    pub raw_keys_per_s_1t: f64,
    /// vodozemac generate + sign, keys/s on all cores.
    pub raw_keys_per_s_all: f64,
    /// Devices provisioned.
    pub devices: usize,
    /// Concurrent connections.
    pub connections: usize,
    /// Claims measured.
    pub claims: usize,
    /// Claims per second over HTTP, durable.
    pub http_claims_per_s: f64,
    /// Median claim latency (client side).
    pub http_p50_ms: f64,
    /// 99th percentile claim latency (client side).
    pub http_p99_ms: f64,
    /// http_claims_per_s / raw_keys_per_s_all.
    pub ratio_to_raw: f64,
    /// Claims per group-commit flush during the claim load: how many claims
    /// shared each `fsync` (1 at one connection; more as connections are
    /// added and the flusher gathers them).
    pub claims_per_flush: f64,
    /// The same load on `/_matrix/app/v1/ping` (authenticated, JSON, no
    /// crypto, no store): what HTTP alone allows on this machine, requests/s.
    pub http_floor_per_s: f64,
    /// The best `ratio_to_raw` possible if the store cost nothing, with the
    /// crypto and the HTTP floor sharing the cores:
    /// 1 / (1 + raw_keys_per_s_all / http_floor_per_s).
    pub ratio_bound_without_store: f64,
    /// The process's memory allocator ([`crate::ALLOCATOR`]): HTTP
    /// figures move with it (about 15 % more claims per second on jemalloc
    /// than on glibc's malloc).
    pub allocator: &'static str,
    /// The same claim load on a PostgreSQL store, measured in the same run
    /// (`--store postgres`); the figures above are sled's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PgHttp>,
}

/// The `http` claim load on a PostgreSQL store, beside sled's.
#[derive(Debug, Serialize)]
pub struct PgHttp {
    /// Where the server is (a local one shares the machine's cores).
    pub server: String,
    /// Claims measured.
    pub claims: usize,
    /// Claims per second over HTTP, durable.
    pub http_claims_per_s: f64,
    /// Median claim latency (client side).
    pub http_p50_ms: f64,
    /// 99th percentile claim latency (client side).
    pub http_p99_ms: f64,
    /// http_claims_per_s / raw_keys_per_s_all.
    pub ratio_to_raw: f64,
    /// http_claims_per_s / sled's http_claims_per_s.
    pub postgres_to_sled: f64,
}

struct NoBridge;

impl BridgeHandler for NoBridge {
    async fn transaction(&self, _: &Transaction) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Run the scenario (sled).
pub async fn run(config: &HttpBench) -> anyhow::Result<HttpReport> {
    run_on(config, None).await
}

/// Run the scenario on sled, then the same claim load on a fresh
/// PostgreSQL database of `server`, in the same run.
pub async fn run_compared(config: &HttpBench, server: &Server) -> anyhow::Result<HttpReport> {
    run_on(config, Some(server)).await
}

async fn run_on(config: &HttpBench, server: Option<&Server>) -> anyhow::Result<HttpReport> {
    let raw = measure_raw(config.raw_seconds);
    let (raw_1t, raw_all) = (raw.per_s_1t, raw.per_s_all);

    std::fs::create_dir_all(&config.dir)?;
    let dir = tempfile::tempdir_in(&config.dir)?;
    let store = open_store(dir.path(), &StoreKey::generate())?;
    let (latencies, elapsed, floor_per_s, flushes) = serve_and_load(store, config, true).await?;
    let claims_per_s = latencies.len() as f64 / elapsed;
    let floor_per_s = floor_per_s.unwrap_or(f64::NAN);
    let postgres = match server {
        None => None,
        Some(server) => {
            let url = server.fresh_database("http").await?;
            let store = crate::pg::create_store(&url, &StoreKey::generate()).await?;
            let (pg, pg_elapsed, _, _) = serve_and_load(store, config, false).await?;
            let pg_per_s = pg.len() as f64 / pg_elapsed;
            Some(PgHttp {
                server: server.describe(),
                claims: pg.len(),
                http_claims_per_s: pg_per_s,
                http_p50_ms: percentile_ms(&pg, 50.0),
                http_p99_ms: percentile_ms(&pg, 99.0),
                ratio_to_raw: pg_per_s / raw_all,
                postgres_to_sled: pg_per_s / claims_per_s,
            })
        }
    };
    Ok(HttpReport {
        raw_keys_per_s_1t: raw_1t,
        raw_keys_per_s_all: raw_all,
        devices: config.devices,
        connections: config.connections,
        claims: latencies.len(),
        http_claims_per_s: claims_per_s,
        http_p50_ms: percentile_ms(&latencies, 50.0),
        http_p99_ms: percentile_ms(&latencies, 99.0),
        ratio_to_raw: claims_per_s / raw_all,
        claims_per_flush: latencies.len() as f64 / flushes.max(1) as f64,
        http_floor_per_s: floor_per_s,
        ratio_bound_without_store: 1.0 / (1.0 + raw_all / floor_per_s),
        allocator: crate::ALLOCATOR,
        postgres,
    })
}

/// Provision the devices in `store`, serve the listener over it and run
/// the claim load (and, with `floor`, the same load on `/ping`): claim
/// latencies sorted, the seconds they took, pings/s, and the store's
/// flushes during the claim load.
async fn serve_and_load<S>(
    store: Arc<S>,
    config: &HttpBench,
    floor: bool,
) -> anyhow::Result<(Vec<std::time::Duration>, f64, Option<f64>, u64)>
where
    S: bridgekeys_store::Store + bridgekeys_store::TransactionLog + 'static,
{
    let manager = Arc::new(bridgekeys_olm::AccountManager::new(
        store.clone(),
        Default::default(),
    ));
    create_puppets(&manager, config.devices).await?;
    // Steady state: a running bridge has its active devices in memory (the
    // cold path is what the `scale` scenario measures).
    for i in 0..config.devices {
        let (user, device) = puppet(i)?;
        manager.device_keys(&user, &device)?;
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let registration = Registration::generate(
        "bench",
        format!("http://{addr}"),
        "bench_bot",
        "@echo_.*:bench\\.invalid",
    );
    let server_name = <&ServerName>::try_from("bench.invalid")?;
    let appservice = Appservice::new(
        AppserviceConfig::from_registration(&registration, server_name)?,
        manager.clone(),
        store,
        Arc::new(NoBridge),
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        appservice
            .serve_on(listener, async {
                let _ = stopped.await;
            })
            .await
    });

    let token = registration.hs_token.clone();
    let devices = config.devices;
    let claim = move |rng: &mut StdRng| -> anyhow::Result<Call> {
        let (user, device) = puppet(rng.gen_range(0..devices))?;
        let body = serde_json::json!({ user.as_str(): { device.as_str(): ["signed_curve25519"] } });
        Ok(Call {
            path: "/_matrix/app/unstable/org.matrix.msc3983/keys/claim",
            body: body.to_string(),
            check: Box::new(move |status, answer| {
                let keys = answer[user.as_str()][device.as_str()]
                    .as_object()
                    .map_or(0, |k| k.len());
                anyhow::ensure!(
                    status == 200 && keys == 1,
                    "claim answered {status}: {answer}"
                );
                Ok(())
            }),
        })
    };
    let flushes_before = manager.store().commit_stats().flushes;
    let (latencies, elapsed) = load(addr, &token, config.connections, config.claims, claim).await?;
    let flushes = manager.store().commit_stats().flushes - flushes_before;
    let floor_per_s = if floor {
        // The floor: the same load on the cheapest authenticated endpoint,
        // so HTTP, routing and JSON alone (no crypto, no store).
        let ping = |_: &mut StdRng| -> anyhow::Result<Call> {
            Ok(Call {
                path: "/_matrix/app/v1/ping",
                body: r#"{"transaction_id":"bench"}"#.to_owned(),
                check: Box::new(|status, answer| {
                    anyhow::ensure!(status == 200, "ping answered {status}: {answer}");
                    Ok(())
                }),
            })
        };
        let (pings, ping_elapsed) =
            load(addr, &token, config.connections, config.claims, ping).await?;
        Some(pings.len() as f64 / ping_elapsed)
    } else {
        None
    };
    let _ = stop.send(());
    server.await??;
    Ok((latencies, elapsed, floor_per_s, flushes))
}

/// One request of a load: where, what, and how to check the answer.
struct Call {
    path: &'static str,
    body: String,
    check: Box<dyn FnOnce(hyper::StatusCode, serde_json::Value) -> anyhow::Result<()> + Send>,
}

/// `total` requests made by `make` over `connections` keep-alive HTTP/1.1
/// connections with the homeserver's token. Client-side latencies, sorted,
/// and the seconds the whole load took.
async fn load<F>(
    addr: std::net::SocketAddr,
    token: &str,
    connections: usize,
    total: usize,
    make: F,
) -> anyhow::Result<(Vec<std::time::Duration>, f64)>
where
    F: Fn(&mut StdRng) -> anyhow::Result<Call> + Clone + Send + 'static,
{
    let authorization = Arc::new(format!("Bearer {token}"));
    let remaining = Arc::new(AtomicUsize::new(total));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (authorization, remaining, make) =
            (authorization.clone(), remaining.clone(), make.clone());
        clients.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut rng = StdRng::from_entropy();
            let mut latencies = Vec::new();
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let call = make(&mut rng)?;
                let request = Request::post(call.path)
                    .header("host", addr.to_string())
                    .header("authorization", authorization.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(call.body)))?;
                let t = Instant::now();
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let bytes = response.into_body().collect().await?.to_bytes();
                latencies.push(t.elapsed());
                (call.check)(status, serde_json::from_slice(&bytes)?)?;
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(r) = clients.join_next().await {
        latencies.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    Ok((latencies, elapsed))
}
