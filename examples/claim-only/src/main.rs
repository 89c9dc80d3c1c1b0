//! Only the key claims: a bridge that already has its own appservice
//! framework (its own transaction handler, health check, server) mounts
//! bridgekeys' MSC3983 claim endpoint next to its routes, and nothing else.
//!
//! 1. the bridge's own axum app: a transaction endpoint (its framework's),
//!    a health check;
//! 2. the claim service merged into it: `ClaimService::router()` serves the
//!    claim paths only, behind the homeserver token;
//! 3. a self-check against the running server, as the homeserver would
//!    call it: a claim answered with a key signed by the puppet device, a
//!    wrong token refused, a transaction left to the bridge's own handler;
//! 4. a clean shutdown.
//!
//! Run it with `cargo run -p claim-only`: it serves on a free local port,
//! checks itself and exits. `-- --serve 127.0.0.1:29300` keeps serving
//! until Ctrl-C instead (the homeserver token is printed at start).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context, bail, ensure};
use axum::{Json, Router, extract::Path, routing::get, routing::put};
use bridgekeys::{
    appservice::{AppserviceConfig, ClaimService, Registration, paths, shutdown_signal},
    olm::{AccountManager, ManagerConfig, canonical_json_for_signing, vodozemac::Ed25519Signature},
    store::{SledStore, SledStoreConfig, StoreKey},
};
use ruma::{OwnedDeviceId, ServerName, UserId};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What the bridge's own framework does with a transaction (here: count it).
async fn own_transaction(
    Path(txn_id): Path<String>,
    seen: axum::extract::State<Arc<AtomicUsize>>,
) -> Json<Value> {
    seen.fetch_add(1, Ordering::SeqCst);
    println!("   (the bridge's own framework handled transaction {txn_id})");
    Json(json!({}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let serve: Option<SocketAddr> = match args.iter().position(|a| a == "--serve") {
        Some(i) => Some(
            args.get(i + 1)
                .context("--serve needs an address, e.g. 127.0.0.1:29300")?
                .parse()
                .context("--serve needs an address, e.g. 127.0.0.1:29300")?,
        ),
        None => None,
    };

    // What the bridge has already: its registration, a store, puppets with
    // devices (a real bridge provisions them on the homeserver too).
    let dir = tempfile::tempdir()?;
    let registration = Registration::generate(
        "claim-only",
        "http://127.0.0.1:29300",
        "claimbot",
        "@claim_.*",
    );
    let server_name = ServerName::parse("example.org")?;
    let store = SledStore::create(SledStoreConfig::new(
        dir.path().join("store"),
        StoreKey::generate(),
    ))?;
    let manager = Arc::new(AccountManager::new(
        Arc::new(store),
        ManagerConfig::default(),
    ));
    let puppet = UserId::parse("@claim_bob:example.org")?;
    let device = OwnedDeviceId::from("BRIDGEKEYS");
    manager.create_device(&puppet, &device).await?;

    // 1 + 2. The bridge's own app, and the claim service merged into it.
    let claims = ClaimService::from_config(
        &AppserviceConfig::from_registration(&registration, &server_name)?,
        Arc::clone(&manager),
    )?;
    let transactions = Arc::new(AtomicUsize::new(0));
    let own_routes = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            paths::TRANSACTION[0],
            put(own_transaction).with_state(Arc::clone(&transactions)),
        );
    let app = own_routes.merge(claims.router());

    let listener = TcpListener::bind(serve.unwrap_or(([127, 0, 0, 1], 0).into())).await?;
    let addr = listener.local_addr()?;
    println!("1. the bridge's own app serves /health and its transactions on http://{addr}");
    println!(
        "2. the claim service is mounted on {} (hs_token required)",
        paths::CLAIM.join(", ")
    );

    if serve.is_some() {
        println!("   hs_token: {}", registration.hs_token);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        println!("4. stopped");
        return Ok(());
    }

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    let checked = self_check(&format!("http://{addr}"), &registration, &manager).await;
    let _ = stop.send(());
    server.await??;
    checked?;
    ensure!(
        transactions.load(Ordering::SeqCst) == 1,
        "the transaction did not reach the bridge's own handler"
    );
    println!("4. stopped cleanly");
    // The claim counters, for the bridge's own metrics endpoint.
    for line in claims.metrics_text()?.lines().filter(|l| {
        l.starts_with("bridgekeys_appservice_claims_total")
            || l.starts_with("bridgekeys_appservice_keys_issued_total")
    }) {
        println!("   {line}");
    }
    Ok(())
}

/// Call the running server as the homeserver would.
async fn self_check(
    base: &str,
    registration: &Registration,
    manager: &AccountManager,
) -> anyhow::Result<()> {
    let puppet = UserId::parse("@claim_bob:example.org")?;
    let device = OwnedDeviceId::from("BRIDGEKEYS");
    let client = reqwest::Client::new();
    let claim = json!({ puppet.as_str(): { device.as_str(): ["signed_curve25519"] } }).to_string();

    let answer = client
        .post(format!("{base}{}", paths::CLAIM[1]))
        .bearer_auth(&registration.hs_token)
        .body(claim.clone())
        .send()
        .await?;
    ensure!(answer.status() == 200, "claim answered {}", answer.status());
    let body: Value = serde_json::from_str(&answer.text().await?)?;
    let keys = body[puppet.as_str()][device.as_str()]
        .as_object()
        .context("no key for the puppet device")?;
    let Some((key_id, key)) = keys.iter().next() else {
        bail!("an empty answer");
    };
    // The key is signed by the puppet device's ed25519 key, over canonical
    // JSON, as a client checks it before starting an Olm session.
    let identity = manager.identity_keys(&puppet, &device)?;
    let signature = key["signatures"][puppet.as_str()][format!("ed25519:{device}")]
        .as_str()
        .context("no signature by the device")?;
    identity.ed25519.verify(
        canonical_json_for_signing(key)?.as_bytes(),
        &Ed25519Signature::from_base64(signature)?,
    )?;
    println!("3. claimed {key_id} for {puppet} {device}: signature verified");

    let refused = client
        .post(format!("{base}{}", paths::CLAIM[0]))
        .bearer_auth("not-the-hs-token")
        .body(claim)
        .send()
        .await?;
    let status = refused.status();
    let body: Value = serde_json::from_str(&refused.text().await?)?;
    ensure!(
        status == 403 && body["errcode"] == "M_FORBIDDEN",
        "a wrong token got {status} {body}"
    );
    println!("   a wrong token is refused: {status} {}", body["errcode"]);

    let txn = client
        .put(format!("{base}/_matrix/app/v1/transactions/t1"))
        .bearer_auth(&registration.hs_token)
        .body(r#"{"events": []}"#)
        .send()
        .await?;
    ensure!(txn.status() == 200, "transaction answered {}", txn.status());
    let health = client.get(format!("{base}/health")).send().await?;
    ensure!(
        health.status() == 200,
        "health answered {}",
        health.status()
    );
    println!("   transactions and /health are the bridge's own: not touched by the claim service");
    Ok(())
}
