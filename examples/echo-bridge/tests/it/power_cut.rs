//! `echo-bridge init` survives a power cut right after it returns, and
//! `run` refuses a missing or foreign store instead of starting a new one.
#![allow(clippy::unwrap_used)]

use bridgekeys::store::{SledStore, StoreError};
use bridgekeys_powercut::{Disk, Model};
use echo_bridge::{Config, InitOptions, init};
use rand::{SeedableRng, rngs::StdRng};

#[test]
fn what_init_wrote_survives_a_power_cut_right_after_it_returns() {
    for model in [Model::Strict, Model::Torn] {
        let tmp = tempfile::tempdir().unwrap();
        let mut disk = Disk::new(tmp.path().join("disk"), tmp.path().join("work")).unwrap();
        let bridge_dir = disk.root().join("srv").join("bridge");
        let status = disk
            .command(env!("CARGO_BIN_EXE_echo-bridge"))
            .unwrap()
            .args(["init", "--dir"])
            .arg(&bridge_dir)
            .args([
                "--homeserver-url",
                "http://127.0.0.1:8008",
                "--server-name",
                "example.org",
                "--listen",
                "127.0.0.1:29300",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let report = disk.cut(model, &mut StdRng::seed_from_u64(7)).unwrap();
        assert_eq!(
            report.names_lost, 0,
            "{model:?}: init left names unsynced: {report:?}"
        );
        assert_eq!(
            report.blocks_lost, 0,
            "{model:?}: init left data unsynced: {report:?}"
        );

        // The bridge starts from what survived: config, registration, store.
        let config = Config::load(&bridge_dir.join("config.toml")).unwrap();
        let store = SledStore::open(config.store_config().unwrap()).unwrap();
        assert_eq!(Some(store.id()), config.store_id().unwrap());
        assert!(bridge_dir.join("registration.yaml").is_file());
    }
}

#[test]
fn a_bridge_whose_store_is_missing_or_foreign_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let options = |dir: &str| InitOptions {
        dir: tmp.path().join(dir),
        homeserver_url: "http://127.0.0.1:8008".into(),
        server_name: "example.org".into(),
        listen: "127.0.0.1:29300".parse().unwrap(),
        database: None,
    };
    let ours = init(&options("ours")).unwrap();
    let theirs = init(&options("theirs")).unwrap();
    let config = Config::load(&ours.config).unwrap();

    // Lost: the store directory is gone. No new store appears.
    std::fs::rename(&ours.store, tmp.path().join("moved-away")).unwrap();
    let err = SledStore::open(config.store_config().unwrap()).unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }), "{err:?}");
    let message = format!(
        "{:#}",
        echo_bridge::EchoBridge::open(config.clone()).unwrap_err()
    );
    assert!(message.contains("no bridgekeys store"), "{message}");
    assert!(
        !std::path::Path::new(&ours.store).exists(),
        "starting the bridge created a store"
    );

    // Swapped: another bridge's store in its place (same key, to show that
    // the id, not the key, catches it).
    let theirs_config = Config::load(&theirs.config).unwrap();
    let mut swapped = config.clone();
    swapped.store_key = theirs_config.store_key.clone();
    std::fs::rename(&theirs.store, &ours.store).unwrap();
    let err = SledStore::open(swapped.store_config().unwrap()).unwrap_err();
    assert!(matches!(err, StoreError::Foreign { .. }), "{err:?}");
}
