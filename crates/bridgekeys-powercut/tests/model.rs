//! The two power-loss models keep exactly what they promise, checked with a
//! process we did not write (CPython doing its own file calls).
#![allow(clippy::unwrap_used)]

use std::{fs, path::Path};

use bridgekeys_powercut::{Disk, Model};
use rand::{SeedableRng, rngs::StdRng};

/// Run `script` (Python) under the shim with `root` as its argument.
fn run_python(disk: &Disk, script: &str) {
    let status = disk
        .command("python3")
        .unwrap()
        .arg("-c")
        .arg(script)
        .arg(disk.root())
        .status()
        .expect("python3 is needed for the power-cut model tests");
    assert!(status.success(), "python child failed");
}

/// The same workload for both models: one file synced with its directory,
/// one synced without, one never synced, a new directory never synced, a
/// synced unlink and an unsynced one, a rename made durable and one not.
const WORKLOAD: &str = r#"
import os, sys
root = sys.argv[1]
def fsync_dir(p):
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
def write(p, data, sync):
    with open(p, "wb") as f:
        f.write(data); f.flush()
        if sync: os.fsync(f.fileno())
write(os.path.join(root, "durable"), b"A" * 10000, True)
write(os.path.join(root, "renamed.tmp"), b"R" * 100, True)
os.rename(os.path.join(root, "renamed.tmp"), os.path.join(root, "renamed"))
os.unlink(os.path.join(root, "gone"))
fsync_dir(root)
write(os.path.join(root, "no-dir-sync"), b"B" * 100, True)
write(os.path.join(root, "no-sync"), b"C" * 9000, False)
os.unlink(os.path.join(root, "kept"))
os.rename(os.path.join(root, "durable"), os.path.join(root, "durable-moved"))
os.mkdir(os.path.join(root, "newdir"))
write(os.path.join(root, "newdir", "inner"), b"D" * 10, True)
with open(os.path.join(root, "appended"), "ab") as f:
    f.write(b"E" * 5000)
"#;

fn setup(tmp: &Path) -> Disk {
    let disk = Disk::new(tmp.join("disk"), tmp.join("work")).unwrap();
    fs::write(disk.root().join("gone"), b"old").unwrap();
    fs::write(disk.root().join("kept"), b"old").unwrap();
    fs::write(disk.root().join("appended"), vec![b'F'; 3000]).unwrap();
    disk
}

/// Compare a file with what it must hold, without printing megabytes.
fn assert_content(path: &Path, expected: &[u8]) {
    let found = fs::read(path).unwrap();
    assert!(
        found == expected,
        "{} holds {} bytes starting {:?}, expected {} bytes starting {:?}",
        path.display(),
        found.len(),
        &found[..found.len().min(8)],
        expected.len(),
        &expected[..expected.len().min(8)]
    );
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn strict_model_keeps_only_what_was_synced_file_and_directory_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let mut disk = setup(tmp.path());
    run_python(&disk, WORKLOAD);
    // Before the cut the process sees everything it did.
    assert!(disk.root().join("newdir/inner").exists());
    let report = disk
        .cut(Model::Strict, &mut StdRng::seed_from_u64(1))
        .unwrap();
    let root = disk.root();
    // Entries as of the last directory fsync: the durable file under its old
    // name, the durable rename, the synced unlink; the later unlink undone.
    assert_eq!(
        names(root),
        vec!["appended", "durable", "kept", "renamed"],
        "entries after the cut"
    );
    assert_content(&root.join("durable"), &vec![b'A'; 10000]);
    assert_content(&root.join("renamed"), &[b'R'; 100]);
    assert_content(&root.join("kept"), b"old");
    // Appended without a sync: the old content only.
    assert_content(&root.join("appended"), &vec![b'F'; 3000]);
    // Lost: durable-moved, newdir (and inner), no-dir-sync, no-sync.
    assert_eq!(report.names_lost, 5, "{report:?}");
    assert!(report.blocks_lost >= 2, "{report:?}");
}

#[test]
fn torn_model_keeps_entries_and_sizes_but_only_part_of_unsynced_data() {
    let tmp = tempfile::tempdir().unwrap();
    let mut zeros_seen = false;
    let mut new_seen = false;
    for seed in 0..8 {
        let sub = tmp.path().join(format!("run-{seed}"));
        let mut disk = setup(&sub);
        run_python(&disk, WORKLOAD);
        disk.cut(Model::Torn, &mut StdRng::seed_from_u64(seed))
            .unwrap();
        let root = disk.root();
        assert_eq!(
            names(root),
            vec![
                "appended",
                "durable-moved",
                "newdir",
                "no-dir-sync",
                "no-sync",
                "renamed"
            ],
            "every entry as at the cut"
        );
        // Synced data is intact whatever the seed.
        assert_content(&root.join("durable-moved"), &vec![b'A'; 10000]);
        assert_content(&root.join("no-dir-sync"), &[b'B'; 100]);
        assert_content(&root.join("newdir/inner"), &[b'D'; 10]);
        // Unsynced data: the new size, each block new or zeros.
        let no_sync = fs::read(root.join("no-sync")).unwrap();
        assert_eq!(no_sync.len(), 9000);
        for block in no_sync.chunks(4096) {
            let first = block[0];
            assert!(first == b'C' || first == 0, "block is new bytes or zeros");
            assert!(
                block.iter().all(|b| *b == first),
                "a block is kept or lost whole"
            );
            zeros_seen |= first == 0;
            new_seen |= first == b'C';
        }
        // The append: the old first block's bytes stay where they were synced.
        let appended = fs::read(root.join("appended")).unwrap();
        assert_eq!(appended.len(), 8000);
        assert!(appended[4096..].iter().all(|b| *b == b'E' || *b == 0));
    }
    assert!(
        zeros_seen && new_seen,
        "over 8 seeds some unsynced blocks are lost, some kept"
    );
}

/// A process killed while the shim records that an unlinked file's inode is
/// dead (its generation update) leaves an image the harness can read, with
/// the old generation or the new one: random kills land there (sled renames
/// and removes files at start-up), and an update written in place once left
/// an empty generation that failed the cut. The unlink was never made
/// durable, so the strict cut brings the file back.
#[test]
fn a_kill_in_the_middle_of_a_generation_update_leaves_a_readable_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut disk = Disk::new(tmp.path().join("disk"), tmp.path().join("work")).unwrap();
    fs::write(disk.root().join("victim"), b"old").unwrap();
    let status = disk
        .command("python3")
        .unwrap()
        .env("POWERCUT_KILL_IN_RETIRE", "1")
        .arg("-c")
        .arg("import os, sys; os.unlink(os.path.join(sys.argv[1], 'victim'))")
        .arg(disk.root())
        .status()
        .expect("python3 is needed for the power-cut model tests");
    assert!(
        !status.success(),
        "the child is killed in the middle of the update"
    );
    disk.cut(Model::Strict, &mut StdRng::seed_from_u64(3))
        .expect("the image stays readable");
    assert_content(&disk.root().join("victim"), b"old");
}
