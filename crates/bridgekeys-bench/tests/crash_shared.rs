//! Three bridge processes on one PostgreSQL database, claiming for the same
//! devices and killed with SIGKILL at random moments (issue 15): no key id
//! or key handed out twice, every signature valid, every acknowledged key
//! still decrypts a pre-key message.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn three_processes_on_one_database_killed_at_random_repeat_no_key_and_lose_none() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("crash-shared.json");
    let output = Command::new(env!("CARGO_BIN_EXE_bridgekeys-bench"))
        .args(["crash", "--store", "postgres", "--processes", "3"])
        .args(["--cycles", "6", "--devices", "4", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the torture failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let n = |field: &str| report[field].as_u64().unwrap();
    assert_eq!(report["store"], "postgres");
    assert_eq!(n("processes"), 3);
    assert_eq!(n("cycles"), 6);
    assert!(n("kills") >= 6, "one kill per cycle: {report}");
    assert!(
        n("keys_reported") > 0,
        "every cycle waits for keys: {report}"
    );
    assert_eq!(
        n("keys_verified"),
        n("keys_reported"),
        "an acknowledged key was lost: {report}"
    );
    assert_eq!(
        n("signatures_verified"),
        n("keys_reported"),
        "a key's signature was not checked: {report}"
    );
    assert_eq!(n("repeated_key_ids"), 0, "a key id issued twice: {report}");
    assert_eq!(n("repeated_keys"), 0, "a key handed out twice: {report}");
}

#[test]
fn more_than_one_process_or_power_loss_on_postgres_is_refused() {
    let exe = env!("CARGO_BIN_EXE_bridgekeys-bench");
    for args in [
        &["crash", "--processes", "2", "--cycles", "1"][..],
        &["crash", "--store", "postgres", "--power-loss", "strict"][..],
        &["crash", "--store", "postgres", "--peers", "2"][..],
    ] {
        let output = Command::new(exe).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} ran");
        assert!(
            stderr.contains("--store postgres") || stderr.contains("--store sled"),
            "{args:?}: {stderr}"
        );
    }
}
