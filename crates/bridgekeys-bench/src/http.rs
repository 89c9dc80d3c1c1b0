//! The `http` scenario: key claims over loopback HTTP to the real listener
//! (auth, parsing, namespace, durable store), as the homeserver sends them.

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
    support::{open_store, percentile_ms, puppet},
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
}

struct NoBridge;

impl BridgeHandler for NoBridge {
    async fn transaction(&self, _: &Transaction) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Run the scenario.
pub async fn run(config: &HttpBench) -> anyhow::Result<HttpReport> {
    let raw = measure_raw(config.raw_seconds);
    let (raw_1t, raw_all) = (raw.per_s_1t, raw.per_s_all);

    std::fs::create_dir_all(&config.dir)?;
    let dir = tempfile::tempdir_in(&config.dir)?;
    let store = open_store(dir.path(), &StoreKey::generate())?;
    let manager = Arc::new(bridgekeys_olm::AccountManager::new(
        store.clone(),
        Default::default(),
    ));
    for i in 0..config.devices {
        let (user, device) = puppet(i)?;
        manager.create_device(&user, &device).await?;
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
        store.clone(),
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

    let token = Arc::new(registration.hs_token.clone());
    let remaining = Arc::new(AtomicUsize::new(config.claims));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..config.connections {
        let (token, remaining, devices) = (token.clone(), remaining.clone(), config.devices);
        clients.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut rng = StdRng::from_entropy();
            let mut latencies = Vec::new();
            while remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                let (user, device) = puppet(rng.gen_range(0..devices))?;
                let body = serde_json::json!({ user.as_str(): { device.as_str(): ["signed_curve25519"] } });
                let request = Request::post("/_matrix/app/unstable/org.matrix.msc3983/keys/claim")
                    .header("host", addr.to_string())
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))?;
                let t = Instant::now();
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let bytes = response.into_body().collect().await?.to_bytes();
                latencies.push(t.elapsed());
                let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
                let keys = answer[user.as_str()][device.as_str()].as_object().map_or(0, |k| k.len());
                anyhow::ensure!(status == 200 && keys == 1, "claim answered {status}: {answer}");
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(config.claims);
    while let Some(r) = clients.join_next().await {
        latencies.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    server.await??;
    latencies.sort();
    let claims_per_s = latencies.len() as f64 / elapsed;
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
    })
}
