//! Behaviour of the sled store: versions, atomicity, keys, locking, schema.

use bridgekeys_store::{
    DeviceKey, DeviceWrite, FIRST_KEY_ID, KeyAppend, OneTimeKeyRecord, Pending, SCHEMA_VERSION,
    SessionRecord, SessionWrite, SledStore, SledStoreConfig, Store, StoreError, StoreKey, Version,
};
use zeroize::Zeroizing;

fn open(dir: &std::path::Path, key: &StoreKey) -> Result<SledStore, StoreError> {
    SledStore::open_or_create(SledStoreConfig::new(dir.join("store"), key.clone()))
}

fn account(bytes: &[u8]) -> DeviceWrite {
    DeviceWrite {
        account: Zeroizing::new(bytes.to_vec()),
        ..DeviceWrite::default()
    }
}

/// Wait until an accepted write is durable.
async fn durable(write: Result<Pending, StoreError>) {
    write.unwrap().durable().await.unwrap();
}

fn otk(id: u64, fill: u8) -> OneTimeKeyRecord {
    OneTimeKeyRecord {
        key_id: id,
        public_key: [fill; 32],
        secret_key: Zeroizing::new([fill ^ 0xff; 32]),
    }
}

#[tokio::test]
async fn stale_version_is_a_conflict_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreKey::generate()).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    durable(store.write_device(&dev, None, account(b"v1"))).await;
    durable(store.write_device(&dev, Some(Version(1)), account(b"v2"))).await;

    let mut stale = account(b"stale");
    stale.add_keys.push(otk(7, 7));
    let err = store
        .write_device(&dev, Some(Version(1)), stale)
        .err()
        .unwrap();
    assert!(matches!(
        err,
        StoreError::Conflict {
            expected: Some(Version(1)),
            found: Some(Version(2))
        }
    ));
    let err = store
        .write_device(&dev, None, account(b"recreate"))
        .err()
        .unwrap();
    assert!(matches!(
        err,
        StoreError::Conflict {
            expected: None,
            found: Some(Version(2))
        }
    ));

    let rec = store.load_account(&dev).unwrap().unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (Version(2), &b"v2"[..]));
    assert!(
        store.one_time_key(&dev, &[7; 32]).unwrap().is_none(),
        "a refused write added a key"
    );
}

#[tokio::test]
async fn keys_are_added_and_removed_atomically_with_the_account() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let dev = DeviceKey::new("@a:x", "D");
    {
        let store = open(dir.path(), &key).unwrap();
        let mut w = account(b"one");
        w.add_keys = vec![otk(1, 1), otk(2, 2), otk(3, 3)];
        durable(store.write_device(&dev, None, w)).await;
        let mut w = account(b"two");
        w.remove_keys = vec![(1, [1; 32])];
        w.sessions = vec![SessionRecord {
            peer_key: [7; 32],
            session_id: "sess".into(),
            last_used: 11,
            pickle: Zeroizing::new(b"pickle".to_vec()),
            version: None,
        }];
        durable(store.write_device(&dev, Some(Version(1)), w)).await;
    }
    // Reopened: the durable state is all there.
    let store = open(dir.path(), &key).unwrap();
    assert!(store.one_time_key(&dev, &[1; 32]).unwrap().is_none());
    let k2 = store.one_time_key(&dev, &[2; 32]).unwrap().unwrap();
    assert_eq!((k2.key_id, *k2.secret_key), (2, [2 ^ 0xff; 32]));
    assert_eq!(
        store.oldest_one_time_keys(&dev, 1).unwrap(),
        vec![(2, [2; 32])]
    );
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 2);
    let session = store.load_session(&dev, &[7; 32], "sess").unwrap().unwrap();
    assert_eq!(
        (session.pickle.as_slice(), session.last_used),
        (&b"pickle"[..], 11)
    );
    assert!(
        store
            .load_session(&dev, &[8; 32], "sess")
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.load_account(&dev).unwrap().unwrap().data.as_slice(),
        b"two"
    );
}

#[tokio::test]
async fn devices_with_prefix_related_ids_do_not_see_each_others_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreKey::generate()).unwrap();
    let a = DeviceKey::new("@a:x", "D");
    let b = DeviceKey::new("@a:x", "DD");
    let mut w = account(b"a");
    w.add_keys = vec![otk(1, 1)];
    durable(store.write_device(&a, None, w)).await;
    durable(store.write_device(&b, None, account(b"b"))).await;
    assert_eq!(store.count_one_time_keys(&b).unwrap(), 0);
    assert!(store.one_time_key(&b, &[1; 32]).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_concurrent_write_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let store = std::sync::Arc::new(open(dir.path(), &key).unwrap());
    let mut tasks = Vec::new();
    for i in 0..256 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let dev = DeviceKey::new("@a:x", &format!("D{i}"));
            durable(store.write_device(&dev, None, account(b"x"))).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.commit_stats().writes, 256);
    drop(std::sync::Arc::try_unwrap(store).ok().unwrap());
    let store = open(dir.path(), &key).unwrap();
    for i in 0..256 {
        let dev = DeviceKey::new("@a:x", &format!("D{i}"));
        assert!(
            store.load_account(&dev).unwrap().is_some(),
            "device {i} lost"
        );
    }
}

#[test]
fn wrong_key_is_refused_clearly_and_the_store_still_opens_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    drop(open(dir.path(), &key).unwrap());
    let err = open(dir.path(), &StoreKey::generate()).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("different store key"), "{err}");
    open(dir.path(), &key).expect("right key opens");
}

#[test]
fn second_open_of_the_same_store_fails_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let first = open(dir.path(), &key).unwrap();
    let mut config = SledStoreConfig::new(dir.path().join("store"), key.clone());
    config.lock_wait = std::time::Duration::from_millis(200);
    let started = std::time::Instant::now();
    let err = SledStore::open(config).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "gave up before the configured wait"
    );
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().join("store").display().to_string()),
        "{message}"
    );
    assert!(message.contains("another process"), "{message}");
    drop(first);
    open(dir.path(), &key).expect("opens once the first handle is gone");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    drop(open(dir.path(), &key).unwrap());
    {
        let raw = sled::open(dir.path().join("store")).unwrap();
        raw.insert("m/schema", &(SCHEMA_VERSION + 1).to_be_bytes())
            .unwrap();
        raw.flush().unwrap();
    }
    let err = open(dir.path(), &key).unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedSchema { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
}

#[test]
fn a_schema_1_store_is_upgraded_at_open_so_an_older_build_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    drop(open(dir.path(), &key).unwrap());
    let schema = || {
        let raw = sled::open(dir.path().join("store")).unwrap();
        let found = raw.get("m/schema").unwrap().unwrap();
        u32::from_be_bytes(<[u8; 4]>::try_from(found.as_ref()).unwrap())
    };
    {
        let raw = sled::open(dir.path().join("store")).unwrap();
        raw.insert("m/schema", &1u32.to_be_bytes()).unwrap();
        raw.flush().unwrap();
    }
    assert_eq!(schema(), 1);
    drop(open(dir.path(), &key).expect("a schema 1 store opens"));
    assert_eq!(schema(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 4);
}

#[tokio::test]
async fn sealed_values_do_not_appear_in_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let marker = b"PLAINTEXT-ACCOUNT-MARKER-0123456789";
    let secret = [0x5a; 32];
    {
        let store = open(dir.path(), &StoreKey::generate()).unwrap();
        let dev = DeviceKey::new("@a:x", "D");
        let mut w = account(marker);
        w.add_keys = vec![OneTimeKeyRecord {
            key_id: 1,
            public_key: [1; 32],
            secret_key: Zeroizing::new(secret),
        }];
        durable(store.write_device(&dev, None, w)).await;
    }
    let bytes = all_file_bytes(&dir.path().join("store"));
    assert!(!bytes.is_empty());
    assert!(!contains(&bytes, marker), "account plaintext on disk");
    assert!(!contains(&bytes, &secret), "secret key on disk");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn all_file_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_file_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn reserved_key_ids_never_repeat_across_reopens_and_stay_clear_of_vodozemac_ids() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let mut seen = std::collections::BTreeSet::new();
    let mut last = 0;
    for round in 0..3 {
        let store = open(dir.path(), &key).unwrap();
        for count in [1u64, 3, 1, 50] {
            let first = store.reserve_key_ids(count).unwrap();
            assert!(first >= FIRST_KEY_ID, "id {first} is in vodozemac's range");
            assert!(first >= last, "ids went backwards in round {round}");
            for id in first..first + count {
                assert!(seen.insert(id), "id {id} reserved twice");
            }
            last = first + count;
        }
        // Only the keys' own durability wait is needed for the mark.
        store.sync().durable().await.unwrap();
    }
    assert_eq!(seen.len(), 3 * 55);
}

#[tokio::test]
async fn appended_keys_are_found_by_public_key_and_evictions_remove_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreKey::generate()).unwrap();
    let dev = DeviceKey::new("@a:x", "D");
    durable(store.write_device(&dev, None, account(b"v1"))).await;
    let append = KeyAppend {
        add_keys: vec![otk(7, 1), otk(9, 2)],
        evict_keys: Vec::new(),
    };
    durable(store.append_keys(&dev, append)).await;
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 2);
    assert_eq!(
        store.one_time_key(&dev, &[2; 32]).unwrap().unwrap().key_id,
        9
    );
    assert_eq!(
        store.oldest_one_time_keys(&dev, 1).unwrap(),
        vec![(7, [1; 32])]
    );
    let evict = KeyAppend {
        add_keys: vec![otk(11, 3)],
        evict_keys: vec![(7, [1; 32])],
    };
    durable(store.append_keys(&dev, evict)).await;
    assert!(store.one_time_key(&dev, &[1; 32]).unwrap().is_none());
    assert_eq!(store.count_one_time_keys(&dev).unwrap(), 2);
    // The account record was not touched by either append.
    assert_eq!(
        store.load_account(&dev).unwrap().unwrap().version,
        Version(1)
    );
}

#[test]
fn opening_a_missing_or_empty_store_is_refused_naming_the_path_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let missing = dir.path().join("store");
    let err = SledStore::open(SledStoreConfig::new(&missing, key.clone())).unwrap_err();
    assert!(
        matches!(&err, StoreError::Missing { path } if path == &missing),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("init"),
        "says how to create one: {message}"
    );
    assert!(!missing.exists(), "opening created the store");

    // An empty directory is not a store either.
    std::fs::create_dir(&missing).unwrap();
    let err = SledStore::open(SledStoreConfig::new(&missing, key.clone())).unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }), "{err:?}");
    assert_eq!(
        std::fs::read_dir(&missing).unwrap().count(),
        0,
        "files appeared"
    );

    // Creating is explicit, and works over an empty directory.
    let id = SledStore::create(SledStoreConfig::new(&missing, key.clone()))
        .unwrap()
        .id();
    let store = SledStore::open(SledStoreConfig::new(&missing, key).expect_id(id)).unwrap();
    assert_eq!(store.id(), id);
}

#[test]
fn a_store_with_another_id_is_refused_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let ours = SledStore::create(SledStoreConfig::new(dir.path().join("ours"), key.clone()))
        .unwrap()
        .id();
    let other_path = dir.path().join("other");
    let theirs = SledStore::create(SledStoreConfig::new(&other_path, key.clone()))
        .unwrap()
        .id();
    assert_ne!(ours, theirs, "ids are minted per store");
    let before = all_file_bytes(&other_path);

    let err = SledStore::open(SledStoreConfig::new(&other_path, key.clone()).expect_id(ours))
        .unwrap_err();
    match &err {
        StoreError::Foreign {
            path,
            expected,
            found,
        } => {
            assert_eq!(path, &other_path);
            assert_eq!((*expected, *found), (ours, Some(theirs)));
        }
        other => panic!("expected Foreign, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&ours.to_string()) && message.contains(&theirs.to_string()),
        "{message}"
    );
    assert_eq!(all_file_bytes(&other_path), before, "a refused open wrote");
    // Its own id opens it.
    SledStore::open(SledStoreConfig::new(&other_path, key).expect_id(theirs)).unwrap();
}

#[test]
fn create_refuses_an_existing_store_and_reopening_keeps_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let path = dir.path().join("store");
    let id = SledStore::create(SledStoreConfig::new(&path, key.clone()))
        .unwrap()
        .id();
    let err = SledStore::create(SledStoreConfig::new(&path, key.clone())).unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists { path: p } if p == &path),
        "{err:?}"
    );
    assert_eq!(
        SledStore::open(SledStoreConfig::new(&path, key))
            .unwrap()
            .id(),
        id
    );
    // No staging directory is left next to it: the store and its watermark.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec!["store", "store.watermark"]);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn a_store_restored_from_an_old_backup_is_refused_until_accepted_and_then_reuses_no_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let path = dir.path().join("store");
    let backup = dir.path().join("backup");
    let config = || SledStoreConfig::new(&path, key.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();

    let store = SledStore::create(config()).unwrap();
    let id = store.id();
    let first = store.reserve_key_ids(1).unwrap();
    rt.block_on(store.sync().durable()).unwrap();
    drop(store);
    copy_dir(&path, &backup);

    // The bridge runs on: more than one block of key ids is handed out.
    let store = SledStore::open(config().expect_id(id)).unwrap();
    let last = store.reserve_key_ids(200_000).unwrap() + 200_000 - 1;
    rt.block_on(store.sync().durable()).unwrap();
    drop(store);

    // The operator restores the old backup of the store directory.
    std::fs::remove_dir_all(&path).unwrap();
    copy_dir(&backup, &path);
    let err = SledStore::open(config().expect_id(id)).unwrap_err();
    let marks = match &err {
        StoreError::RolledBack {
            path: p,
            store_mark,
            watermark,
        } => {
            assert_eq!(p, &path);
            assert!(store_mark < watermark && *watermark > last, "{err:?}");
            (*store_mark, *watermark)
        }
        other => panic!("expected RolledBack, got {other:?}"),
    };
    assert!(err.to_string().contains("accept"), "says what to do: {err}");
    // Refused without a change: the same marks again.
    match SledStore::open(config().expect_id(id)).unwrap_err() {
        StoreError::RolledBack {
            store_mark,
            watermark,
            ..
        } => assert_eq!(
            (store_mark, watermark),
            marks,
            "a refused open moved a mark"
        ),
        other => panic!("expected RolledBack, got {other:?}"),
    }

    // Accepted on purpose: ids resume past everything handed out, and stay
    // there after a plain reopen.
    let mut accepting = config().expect_id(id);
    accepting.accept_restored = true;
    let store = SledStore::open(accepting).unwrap();
    let next = store.reserve_key_ids(1).unwrap();
    assert!(next > last && next > first, "key id {next} issued again");
    rt.block_on(store.sync().durable()).unwrap();
    drop(store);
    let store = SledStore::open(config().expect_id(id)).unwrap();
    assert!(store.reserve_key_ids(1).unwrap() > next);
}

#[tokio::test]
async fn an_unfinished_snapshot_left_by_a_crash_does_not_make_the_store_unreadable() {
    // sled reads the newest `snap.*` file, an unfinished `.generating` one
    // too; a cut while it was written leaves it short or zeroed.
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let path = dir.path().join("store");
    let store = SledStore::create(SledStoreConfig::new(&path, key.clone())).unwrap();
    let id = store.id();
    let dev = DeviceKey::new("@a:x", "D");
    durable(store.write_device(&dev, None, account(b"kept"))).await;
    drop(store);
    let unfinished = path.join("snap.7FFFFFFFFFFFFFFF.generating");
    std::fs::write(&unfinished, [0u8; 102]).unwrap();

    let store = SledStore::open(SledStoreConfig::new(&path, key).expect_id(id))
        .unwrap_or_else(|e| panic!("the store did not open: {e}"));
    let record = store.load_account(&dev).unwrap().unwrap();
    assert_eq!(record.data.as_slice(), b"kept");
    assert!(
        !unfinished.exists(),
        "the unfinished snapshot is still there"
    );
}

fn session(peer: u8, id: &str, last_used: u64, pickle: &[u8]) -> SessionRecord {
    SessionRecord {
        peer_key: [peer; 32],
        session_id: id.into(),
        last_used,
        pickle: Zeroizing::new(pickle.to_vec()),
        version: None,
    }
}

#[tokio::test]
async fn sessions_are_found_by_peer_replaced_removed_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let dev = DeviceKey::new("@p:hs", "DEV");
    let other = DeviceKey::new("@q:hs", "DEV");
    {
        let store = open(dir.path(), &key).unwrap();
        let write = SessionWrite {
            put: vec![
                session(1, "a", 1, b"a1"),
                session(1, "b", 2, b"b1"),
                session(2, "c", 3, b"c1"),
            ],
            ..SessionWrite::default()
        };
        durable(store.write_sessions(&dev, write)).await;
        // A ratchet step replaces a session; an eviction removes another.
        let write = SessionWrite {
            put: vec![SessionRecord {
                version: Some(Version(1)),
                ..session(1, "a", 4, b"a2")
            }],
            remove: vec![([1; 32], "b".into())],
            ..SessionWrite::default()
        };
        durable(store.write_sessions(&dev, write)).await;
        durable(store.write_tracked_user("@alice:hs", Some(b"devices"))).await;
    }
    let store = open(dir.path(), &key).unwrap();
    let of_peer_1 = store.sessions(&dev, &[1; 32]).unwrap();
    let found: Vec<_> = of_peer_1
        .iter()
        .map(|s| (s.session_id.as_str(), s.last_used, s.pickle.to_vec()))
        .collect();
    assert_eq!(found, vec![("a", 4, b"a2".to_vec())]);
    assert_eq!(store.sessions(&dev, &[2; 32]).unwrap().len(), 1);
    assert!(store.sessions(&other, &[1; 32]).unwrap().is_empty());
    assert!(store.sessions(&dev, &[3; 32]).unwrap().is_empty());
    assert_eq!(
        store
            .load_tracked_user("@alice:hs")
            .unwrap()
            .unwrap()
            .as_slice(),
        b"devices"
    );
    durable(store.write_tracked_user("@alice:hs", None)).await;
    assert!(store.load_tracked_user("@alice:hs").unwrap().is_none());
}

#[test]
fn an_open_waits_for_a_holder_that_lets_go_within_the_lock_wait() {
    // A restart in place: the old handle is dropped on another thread a
    // moment after the new open starts. The open must wait for it, not fail.
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate();
    let first = open(dir.path(), &key).unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        started_rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    started_tx.send(()).unwrap();
    let config = SledStoreConfig::new(dir.path().join("store"), key.clone());
    let reopened = SledStore::open(config).expect("opens once the holder let go");
    holder.join().unwrap();
    drop(reopened);
}
