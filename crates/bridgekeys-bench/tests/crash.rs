//! The claim path survives SIGKILL: no key id issued twice, no returned key lost.
#![allow(clippy::unwrap_used)]

use bridgekeys_bench::crash::{CrashConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_key_and_reuses_no_key_id() {
    let data = tempfile::tempdir().unwrap();
    let config = CrashConfig {
        cycles: 20,
        devices: 4,
        max_keys_before_kill: 60,
        exe: env!("CARGO_BIN_EXE_bridgekeys-bench").into(),
        dir: data.path().to_owned(),
        seed: None,
    };
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
