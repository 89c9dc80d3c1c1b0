//! A large value, which sled keeps in a file of its own under `blobs/`,
//! survives a power cut once its write was acknowledged.
//!
//! The test runs itself as the child (an ignored test that only acts when
//! the parent sets `BRIDGEKEYS_BLOB_CHILD`), under the power-cut shim.

use std::{io::BufRead, path::Path, process::Stdio};

use bridgekeys_powercut::{Disk, Model};
use bridgekeys_store::{DeviceKey, DeviceWrite, SledStore, SledStoreConfig, Store, StoreKey};
use rand::{SeedableRng, rngs::StdRng};
use zeroize::Zeroizing;

const CHILD_ENV: &str = "BRIDGEKEYS_BLOB_CHILD";
const KEY: [u8; 32] = [9; 32];
/// Far above sled's blob threshold (a quarter of its 512 KiB segment).
const SIZE: usize = 600 * 1024;

fn value() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

fn config(dir: &Path) -> SledStoreConfig {
    SledStoreConfig::new(dir.join("store"), StoreKey::new(KEY))
}

#[tokio::test]
#[ignore = "the child half of a_large_acknowledged_value_survives_a_power_cut"]
async fn blob_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = SledStore::open(config(Path::new(&dir))).unwrap();
    let write = DeviceWrite {
        account: Zeroizing::new(value()),
        ..DeviceWrite::default()
    };
    store
        .write_device(&DeviceKey::new("@big:x", "D"), None, write)
        .unwrap()
        .durable()
        .await
        .unwrap();
    println!("ACKNOWLEDGED");
    // Wait to be killed: the cut comes after the acknowledgement.
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_large_acknowledged_value_survives_a_power_cut() {
    for model in [Model::Strict, Model::Torn] {
        let tmp = tempfile::tempdir().unwrap();
        let mut disk = Disk::new(tmp.path().join("disk"), tmp.path().join("work")).unwrap();
        drop(SledStore::create(config(disk.root())).unwrap());
        bridgekeys_store::durable::sync_tree(disk.root()).unwrap();

        // This binary holds every test module: the child's full test name
        // is its path below the crate root (`power_cut::blob_child`).
        let (_, module) = module_path!().split_once("::").unwrap();
        let child_test = format!("{module}::blob_child");
        let mut child = disk
            .command(std::env::current_exe().unwrap())
            .unwrap()
            .args(["--ignored", "--exact", &child_test, "--nocapture"])
            .env(CHILD_ENV, disk.root())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let acknowledged = stdout
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("ACKNOWLEDGED"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(acknowledged, "the child never acknowledged its write");
        assert!(
            disk.root().join("store/blobs").read_dir().unwrap().count() > 0,
            "the value did not go to a blob file: the test proves nothing"
        );

        let cut = disk.cut(model, &mut StdRng::seed_from_u64(3)).unwrap();
        assert!(cut.shim_started);
        let store = SledStore::open(config(disk.root())).unwrap();
        let found = store
            .load_account(&DeviceKey::new("@big:x", "D"))
            .unwrap()
            .unwrap_or_else(|| panic!("{model:?}: the acknowledged value is gone"));
        assert!(
            found.data.as_slice() == value().as_slice(),
            "{model:?}: the acknowledged value changed ({} bytes)",
            found.data.len()
        );
    }
}
