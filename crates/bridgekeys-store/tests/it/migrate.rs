//! Copying a populated store into another backend (`migrate::copy`): every
//! kind of record arrives once, opened and re-sealed by the target, and the
//! target's key ids continue past every id the source handed out.

use std::sync::Arc;

use bridgekeys_store::{
    Backend, Delivery, DeviceKey, DeviceWrite, KeyAppend, OneTimeKeyRecord, SessionRecord,
    SledStore, SledStoreConfig, Store, StoreKey,
    migrate::{MigrateError, copy},
};
use zeroize::Zeroizing;

pub fn otk(id: u64, fill: u8) -> OneTimeKeyRecord {
    OneTimeKeyRecord {
        key_id: id,
        public_key: [fill; 32],
        secret_key: Zeroizing::new([fill ^ 0xff; 32]),
    }
}

fn session(peer: u8, id: &str, used: u64) -> SessionRecord {
    SessionRecord {
        peer_key: [peer; 32],
        session_id: id.into(),
        last_used: used,
        pickle: Zeroizing::new(format!("pickle of {id}").into_bytes()),
        version: None,
    }
}

pub fn devices() -> [DeviceKey; 2] {
    [
        DeviceKey::new("@echo_a:hs", "BRIDGEKEYS"),
        DeviceKey::new("@echo_b:hs", "BRIDGEKEYS"),
    ]
}

/// What `populate` wrote that `assert_holds` checks: the next key id the
/// source would have issued.
pub struct Populated {
    pub next_key_id: u64,
}

/// Write at least one record of every kind into `store`, through the
/// public API only, and wait until it is durable.
pub async fn populate(store: &dyn Backend) -> Populated {
    let [a, b] = devices();
    let first = store.reserve_key_ids(4).unwrap();
    let write = DeviceWrite {
        account: Zeroizing::new(b"account a".to_vec()),
        add_keys: vec![otk(first, 1), otk(first + 1, 2)],
        sessions: vec![session(7, "sess-a1", 10)],
        ..DeviceWrite::default()
    };
    let mut pending = vec![store.write_device(&a, None, write).unwrap()];
    // A second version of a's account: versions do not carry over, content does.
    let write = DeviceWrite {
        account: Zeroizing::new(b"account a v2".to_vec()),
        delivery: Some(Delivery {
            tag: "txn-1".into(),
            message: b"ciphertext".to_vec(),
            record: Zeroizing::new(b"plaintext kept for a retry".to_vec()),
        }),
        ..DeviceWrite::default()
    };
    pending.push(
        store
            .write_device(&a, Some(bridgekeys_store::Version(1)), write)
            .unwrap(),
    );
    let write = DeviceWrite {
        account: Zeroizing::new(b"account b".to_vec()),
        ..DeviceWrite::default()
    };
    pending.push(store.write_device(&b, None, write).unwrap());
    let append = KeyAppend {
        add_keys: vec![otk(first + 2, 3), otk(first + 3, 4)],
        ..KeyAppend::default()
    };
    pending.push(store.append_keys(&b, append).unwrap());
    pending.push(
        store
            .write_tracked_user("@alice:hs", Some(b"alice's devices"))
            .unwrap(),
    );
    pending.push(
        store
            .write_outbound_group_session(&a, "!room:hs", None, Some(b"outbound"))
            .unwrap(),
    );
    pending.push(
        store
            .write_group_session("!room:hs", "gs1", b"inbound")
            .unwrap(),
    );
    let _ = store
        .record_message_index("!room:hs", "gs1", 3, "$event3")
        .unwrap();
    pending.push(
        store
            .hold_event("!room:hs", "gs2", "$held", Some(b"held event"))
            .unwrap(),
    );
    pending.push(
        store
            .write_room_state("!room:hs", Some(b"encrypted room"))
            .unwrap(),
    );
    pending.push(
        store
            .create_cross_signing("@echo_a:hs", b"cross-signing keys")
            .unwrap()
            .unwrap(),
    );
    pending.push(store.record_transaction("as", "txn-0").unwrap());
    pending.push(store.record_puppet(&a).unwrap());
    pending.push(store.record_cross_signed(&a).unwrap());
    pending.push(store.schedule_rotation(&a, 5_000, None).unwrap());
    pending.push(store.record_puppet(&b).unwrap());
    for p in pending {
        p.durable().await.unwrap();
    }
    store.sync().durable().await.unwrap();
    Populated {
        next_key_id: first + 4,
    }
}

/// Every record `populate` wrote is in `store`, byte for byte.
pub fn assert_holds(store: &dyn Backend, populated: &Populated) {
    let [a, b] = devices();
    let account = store.load_account(&a).unwrap().expect("account a");
    assert_eq!(&account.data[..], b"account a v2");
    assert_eq!(
        &store.load_account(&b).unwrap().expect("account b").data[..],
        b"account b"
    );
    let first = populated.next_key_id - 4;
    for (device, id, fill) in [
        (&a, first, 1),
        (&a, first + 1, 2),
        (&b, first + 2, 3),
        (&b, first + 3, 4),
    ] {
        let key = store
            .one_time_key(device, &[fill; 32])
            .unwrap()
            .unwrap_or_else(|| panic!("key {id} of {device:?}"));
        assert_eq!(key.key_id, id);
        assert_eq!(*key.secret_key, [fill ^ 0xff; 32]);
    }
    assert_eq!(store.count_one_time_keys(&a).unwrap(), 2);
    assert_eq!(store.count_one_time_keys(&b).unwrap(), 2);
    let sessions = store.sessions(&a, &[7; 32]).unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].session_id, "sess-a1");
    assert_eq!(sessions[0].last_used, 10);
    assert_eq!(&sessions[0].pickle[..], b"pickle of sess-a1");
    assert_eq!(
        &store
            .load_delivery(&a, "txn-1", b"ciphertext")
            .unwrap()
            .expect("delivery")[..],
        b"plaintext kept for a retry"
    );
    assert_eq!(
        &store
            .load_tracked_user("@alice:hs")
            .unwrap()
            .expect("tracked")[..],
        b"alice's devices"
    );
    assert_eq!(
        &store
            .load_outbound_group_session(&a, "!room:hs")
            .unwrap()
            .expect("outbound")
            .data[..],
        b"outbound"
    );
    assert_eq!(
        &store
            .load_group_session("!room:hs", "gs1")
            .unwrap()
            .expect("inbound")[..],
        b"inbound"
    );
    assert!(matches!(
        store
            .record_message_index("!room:hs", "gs1", 3, "$other")
            .unwrap(),
        bridgekeys_store::IndexUse::OtherEvent
    ));
    let held = store.held_events(None).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].room_id.as_str(), held[0].session_id.as_str()),
        ("!room:hs", "gs2")
    );
    assert_eq!(held[0].event_id, "$held");
    assert_eq!(&held[0].record[..], b"held event");
    assert_eq!(store.room_state_ids().unwrap(), vec!["!room:hs".to_owned()]);
    assert_eq!(
        &store
            .load_cross_signing("@echo_a:hs")
            .unwrap()
            .expect("cross-signing")[..],
        b"cross-signing keys"
    );
    assert!(store.transaction_completed("as", "txn-0").unwrap());
    assert!(!store.transaction_completed("as", "txn-1").unwrap());
    assert_eq!(store.puppets().unwrap().len(), 2);
    assert!(store.is_cross_signed(&a).unwrap());
    assert!(!store.is_cross_signed(&b).unwrap());
    let due = store.due_rotations(5_000, None, 10).unwrap();
    assert_eq!(due, vec![(a.clone(), 5_000)]);
    assert!(store.due_rotations(4_999, None, 10).unwrap().is_empty());
}

fn sled(dir: &std::path::Path, name: &str) -> Arc<SledStore> {
    Arc::new(SledStore::create(SledStoreConfig::new(dir.join(name), StoreKey::generate())).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_copied_into_a_fresh_store_holds_every_record_and_never_reissues_a_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let source = sled(dir.path(), "source");
    let populated = populate(source.as_ref()).await;
    assert_holds(source.as_ref(), &populated);

    let key = StoreKey::generate();
    let config = SledStoreConfig::new(dir.path().join("target"), key);
    let target = Arc::new(SledStore::create(config.clone()).unwrap());
    let report = copy(source.as_ref(), target.as_ref()).await.unwrap();
    assert_eq!(report.accounts, 2);
    assert_eq!(report.one_time_keys, 4);
    assert_eq!(report.sessions, 1);
    assert_eq!(report.deliveries, 1);
    assert_eq!(report.transactions, 1);
    assert_eq!(report.puppets, 2);
    assert_eq!(report.cross_signing, 1);
    assert!(report.key_id_floor >= populated.next_key_id);
    assert_holds(target.as_ref(), &populated);
    let next = target.reserve_key_ids(1).unwrap();
    assert!(
        next >= report.key_id_floor,
        "the target issues {next}, below the source's floor {}",
        report.key_id_floor
    );

    // Reopened, the copy is still whole, and its ids still continue.
    drop(target);
    let target = SledStore::open(config).unwrap();
    assert_holds(&target, &populated);
    assert!(target.reserve_key_ids(1).unwrap() > next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_a_store_holding_one_of_the_accounts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = sled(dir.path(), "source");
    populate(source.as_ref()).await;
    let target = sled(dir.path(), "target");
    let [a, _] = devices();
    let write = DeviceWrite {
        account: Zeroizing::new(b"someone else's".to_vec()),
        ..DeviceWrite::default()
    };
    target
        .write_device(&a, None, write)
        .unwrap()
        .durable()
        .await
        .unwrap();
    let err = copy(source.as_ref(), target.as_ref()).await.unwrap_err();
    assert!(matches!(err, MigrateError::TargetNotEmpty { .. }), "{err}");
    assert_eq!(
        &target.load_account(&a).unwrap().unwrap().data[..],
        b"someone else's",
        "the target's own account is left as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_copied_into_another_backend_holds_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let source = sled(dir.path(), "source");
    let populated = populate(source.as_ref()).await;
    let target = bridgekeys_store::testing::MemoryStore::new();
    let report = copy(source.as_ref(), &target).await.unwrap();
    assert_eq!(report.one_time_keys, 4);
    assert_holds(&target, &populated);
    assert!(target.reserve_key_ids(1).unwrap() >= report.key_id_floor);
}
