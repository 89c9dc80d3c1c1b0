//! The claim path survives SIGKILL: no key id issued twice, no returned key
//! lost; and Olm sessions in the child lose no acknowledged ratchet step and
//! roll none back.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use bridgekeys_bench::{
    crash::{
        CrashConfig, run,
        sessions::{self, ChildOutput, Peers, SessionChecks},
    },
    support::{open_manager, puppet},
};
use bridgekeys_olm::AccountManager;
use bridgekeys_powercut::Model;
use bridgekeys_store::StoreKey;

/// Peers of the short runs (one per device).
const PEERS: usize = 4;

/// The short CI run: 20 kills, 4 devices, up to 60 keys before each kill,
/// 4 peers sending 4 Olm messages each per cycle, the store under `data`.
fn short_run(data: &tempfile::TempDir, power_loss: Option<Model>) -> CrashConfig {
    CrashConfig {
        cycles: 20,
        devices: 4,
        max_keys_before_kill: 60,
        exe: env!("CARGO_BIN_EXE_bridgekeys-bench").into(),
        dir: data.path().to_owned(),
        seed: None,
        power_loss,
        peers: PEERS,
        messages_per_peer: 4,
    }
}

/// Every acknowledged Olm message was checked, and every check passed.
fn all_session_checks_passed(s: &SessionChecks, at_least_acks: usize, verified_cycles: usize) {
    assert_eq!(s.peers, PEERS);
    assert!(
        s.acknowledged >= at_least_acks,
        "every cycle under load with peers waits for an acknowledged Olm message: {s:?}"
    );
    assert_eq!(
        s.replays_refused, s.acknowledged,
        "a message decrypted twice"
    );
    assert_eq!(s.redeliveries_answered, s.acknowledged);
    assert!(
        s.next_messages_decrypted >= PEERS * verified_cycles,
        "every peer's next message after every kill: {s:?}"
    );
    assert!(
        s.sessions_opened >= 1
            && s.replies_read >= 1
            && s.answers_read >= 1
            && s.normal_acknowledged >= 1,
        "sessions were opened, answered and advanced in the child: {s:?}"
    );
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
    // The peers exist from the first kill on: 19 cycles with messages.
    all_session_checks_passed(&report.sessions, 19, 19);
    assert_eq!(report.sessions.next_messages_decrypted, PEERS * 19);
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
    // The first cut may come before the devices exist: peers from the end
    // of cycle 1 at the latest; 15 cycles under load, 14 of them with peers.
    all_session_checks_passed(&report.sessions, 14, 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_claim_load_lose_no_acknowledged_key_strict_posix_model() {
    power_cuts(Model::Strict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_claim_load_lose_no_acknowledged_key_torn_write_model() {
    power_cuts(Model::Torn).await;
}

/// Run a script as the child does, in this process.
async fn as_child(manager: &AccountManager, script: Vec<String>) -> ChildOutput {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for line in script {
        sessions::handle(manager, &line, &tx).await.unwrap();
    }
    drop(tx);
    let mut output = ChildOutput::default();
    while let Some(line) = rx.recv().await {
        assert!(output.take(&line).unwrap(), "{line}");
    }
    output
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// One cycle of session traffic run in this process against the store in
/// `data`; with `roll_back`, the store directory is put back as it was
/// before the cycle (as if the acknowledged writes had never reached the
/// disk) before the parent's checks run.
async fn cycle(
    data: &Path,
    key: &StoreKey,
    peers: &mut Peers,
    n: usize,
    roll_back: bool,
) -> anyhow::Result<SessionChecks> {
    let script = peers.script(n)?;
    let snapshot = data.with_extension("snapshot");
    if roll_back {
        copy_tree(data, &snapshot);
    }
    let output = as_child(&open_manager(data, key)?, script).await;
    assert_eq!(output.acks.len(), 6, "every message acknowledged");
    if roll_back {
        std::fs::remove_dir_all(data)?;
        copy_tree(&snapshot, data);
        std::fs::remove_dir_all(&snapshot)?;
    }
    let mut checks = SessionChecks::default();
    peers
        .verify(&open_manager(data, key)?, n, output, &mut checks)
        .await?;
    Ok(checks)
}

/// The session checks are not vacuous: the checks that pass on a durable
/// store fail when the acknowledged ratchet steps are rolled back, both a
/// session's opening (pre-key messages) and its normal messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_checks_catch_a_rolled_back_ratchet_step() {
    for roll_back_opening in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let key = StoreKey::generate();
        let mut peers = Peers::new(2, 3);
        {
            let manager = open_manager(&data, &key).unwrap();
            for i in 0..2 {
                let (user, device) = puppet(i).unwrap();
                manager.create_device(&user, &device).await.unwrap();
            }
            peers.add_missing(&manager, 2).await.unwrap();
        }
        // Cycle 1: pre-key messages open the sessions and are answered.
        let opening = cycle(&data, &key, &mut peers, 1, roll_back_opening).await;
        let err = if roll_back_opening {
            opening.unwrap_err()
        } else {
            let checks = opening.unwrap();
            assert_eq!(
                (
                    checks.acknowledged,
                    checks.sessions_opened,
                    checks.replies_read
                ),
                (6, 2, 6)
            );
            assert_eq!((checks.replays_refused, checks.answers_read), (6, 2));
            // Cycle 2: normal messages (the peers read the replies), rolled
            // back. Peer 0 sent m0-m2 in cycle 1 and m3 in its checks.
            let err = cycle(&data, &key, &mut peers, 2, true).await.unwrap_err();
            assert!(err.to_string().contains("p0m4"), "{err:#}");
            err
        };
        assert!(
            err.to_string().contains("decrypted a second time"),
            "{err:#}"
        );
    }
}
