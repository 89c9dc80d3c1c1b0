//! The claim path survives SIGKILL: no key id issued twice, no returned key lost.
#![allow(clippy::unwrap_used)]

use bridgekeys_bench::crash::{CrashConfig, run};
use bridgekeys_powercut::Model;

/// The short CI run: 20 kills, 4 devices, up to 60 keys before each kill,
/// the store under `data`.
fn short_run(data: &tempfile::TempDir, power_loss: Option<Model>) -> CrashConfig {
    CrashConfig {
        cycles: 20,
        devices: 4,
        max_keys_before_kill: 60,
        exe: env!("CARGO_BIN_EXE_bridgekeys-bench").into(),
        dir: data.path().to_owned(),
        seed: None,
        power_loss,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_key_and_reuses_no_key_id() {
    let data = tempfile::tempdir().unwrap();
    let config = short_run(&data, None);
    let report = run(&config)
        .await
        .unwrap_or_else(|e| panic!("crash torture failed: {e:#}"));
    println!("{report:?}");
    assert_eq!(report.cycles, 20);
    assert!(
        report.keys_reported >= 20,
        "every cycle waits for at least one key"
    );
    assert_eq!(
        report.keys_verified, report.keys_reported,
        "a returned key was lost"
    );
    assert!(
        report.second_open_refused,
        "a second process opened the held store"
    );
}

/// Every kill is also a power cut under `model`; the store must open after
/// each one and keep both promises.
async fn power_cuts(model: Model) {
    let data = tempfile::tempdir().unwrap();
    let config = short_run(&data, Some(model));
    let report = run(&config)
        .await
        .unwrap_or_else(|e| panic!("power-loss torture ({model:?}) failed: {e:#}"));
    println!("{report:?}");
    assert_eq!(report.power_cuts, 20, "the store opened after every cut");
    assert_eq!(
        report.startup_cuts, 5,
        "one cut in four lands during start-up"
    );
    assert!(
        report.keys_reported >= 15,
        "every cycle under load waits for a key"
    );
    assert_eq!(
        report.keys_verified, report.keys_reported,
        "an acknowledged key was lost to a power cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_claim_load_lose_no_acknowledged_key_strict_posix_model() {
    power_cuts(Model::Strict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_claim_load_lose_no_acknowledged_key_torn_write_model() {
    power_cuts(Model::Torn).await;
}
