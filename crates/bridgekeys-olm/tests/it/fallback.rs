//! Fallback keys (MSC2732): persisted before upload, the same key until
//! published, decrypting without being consumed, replays refused, and the
//! rotation schedule (injected clock) across restarts.

use std::{path::Path, time::Duration};

use crate::common::{
    DecryptPrekey, alice, manager, prekey_message_to, upload_and_publish, verifier_keys,
};
use bridgekeys_olm::{
    AccountManager, FallbackAction, FallbackKey, FallbackPolicy, ManagerConfig, OlmError,
    fallback::RotationReason,
};
use bridgekeys_store::StoreKey;
use ruma::{CanonicalJsonObject, signatures::verify_json};

const HOUR: u64 = 3_600_000;
const T0: u64 = 1_700_000_000_000;

fn open(dir: &Path, key: &StoreKey) -> AccountManager {
    manager(dir, key, ManagerConfig::default())
}

/// Create the device, upload its first fallback key at `now` and record the 200.
async fn provisioned(m: &AccountManager, now: u64) -> FallbackKey {
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    upload_and_publish(m, now).await
}

fn json(key: &FallbackKey) -> serde_json::Value {
    serde_json::to_value(&key.key).unwrap()
}

#[tokio::test]
async fn the_upload_key_is_persisted_first_and_the_same_until_published_even_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let first = {
        let m = open(dir.path(), &store_key);
        m.create_device(&user, &device).await.unwrap();
        let first = m
            .fallback_key_for_upload(&user, &device, T0)
            .await
            .unwrap()
            .unwrap();
        let again = m
            .fallback_key_for_upload(&user, &device, T0 + 5)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.key_id, again.key_id);
        assert_eq!(
            json(&first),
            json(&again),
            "a retry re-sends the same bytes"
        );
        assert_eq!(m.stats().fallback_keys_generated, 1);
        first
    };
    // "Crash" before the upload's 200 was recorded: the reopened store
    // hands out the very same key, never a new one.
    let m = open(dir.path(), &store_key);
    let after = m
        .fallback_key_for_upload(&user, &device, T0 + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(json(&first), json(&after));
    assert_eq!(m.stats().fallback_keys_generated, 0);
    assert!(m.published_fallback_key(&user, &device).unwrap().is_none());

    // A stale acknowledgement (another id) changes nothing.
    let other: ruma::OwnedOneTimeKeyId = "signed_curve25519:AAAAAAAAAAZ".try_into().unwrap();
    assert!(
        !m.mark_fallback_published(&user, &device, &other, T0 + 15)
            .await
            .unwrap()
    );
    assert!(
        m.mark_fallback_published(&user, &device, &first.key_id, T0 + 15)
            .await
            .unwrap()
    );
    assert!(
        m.fallback_key_for_upload(&user, &device, T0 + 20)
            .await
            .unwrap()
            .is_none(),
        "a published key is not uploaded again"
    );
    drop(m);
    let m = open(dir.path(), &store_key);
    let published = m.published_fallback_key(&user, &device).unwrap().unwrap();
    assert_eq!(json(&published), json(&first), "published survives restart");
    let state = m.fallback_state(&user, &device).unwrap();
    let current = state.current.unwrap();
    assert!(current.published && !current.used);
    assert_eq!(current.created_ms, T0);
}

#[tokio::test]
async fn the_fallback_key_is_marked_fallback_and_its_signature_verifies_independently() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), &StoreKey::generate());
    let (user, device) = alice();
    let device_keys = m.create_device(&user, &device).await.unwrap();
    let key = m
        .fallback_key_for_upload(&user, &device, T0)
        .await
        .unwrap()
        .unwrap();
    assert!(key.key_id.as_str().starts_with("signed_curve25519:"));
    let value = json(&key);
    assert_eq!(value["fallback"], serde_json::Value::Bool(true));
    let key_map = verifier_keys(&user, &device, &device_keys);
    let object: CanonicalJsonObject = serde_json::from_value(value.clone()).unwrap();
    verify_json(&key_map, &object).unwrap();
    // `fallback: true` is covered by the signature.
    let mut forged = value;
    forged.as_object_mut().unwrap().remove("fallback");
    let forged: CanonicalJsonObject = serde_json::from_value(forged).unwrap();
    assert!(verify_json(&key_map, &forged).is_err());
}

#[tokio::test]
async fn a_prekey_message_on_the_fallback_key_decrypts_and_the_key_stays() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), &StoreKey::generate());
    let (user, device) = alice();
    let key = provisioned(&m, T0).await;

    for text in ["first peer", "second peer"] {
        let (sender, message) = prekey_message_to(&m, &user, &device, key.key.key.as_bytes(), text);
        let inbound = m
            .decrypt_prekey(&user, &device, sender, &message)
            .await
            .unwrap();
        assert!(inbound.used_fallback_key);
        assert_eq!(inbound.plaintext.as_slice(), text.as_bytes());
    }
    let state = m.fallback_state(&user, &device).unwrap();
    let current = state.current.unwrap();
    assert_eq!(
        current.public_key,
        key.key.key.encode(),
        "the fallback key is not consumed by use"
    );
    assert!(current.used, "a message on it records it as used");
    let stats = m.stats();
    assert_eq!((stats.prekeys_decrypted, stats.fallback_prekeys), (2, 2));
}

#[tokio::test]
async fn a_replayed_fallback_prekey_message_is_refused_also_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let m = open(dir.path(), &store_key);
    let key = provisioned(&m, T0).await;
    let (sender, message) = prekey_message_to(&m, &user, &device, key.key.key.as_bytes(), "once");
    m.decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap();
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    drop(m);
    let m = open(dir.path(), &store_key);
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    assert_eq!(m.stats().prekeys_decrypted, 0);
}

#[tokio::test]
async fn a_used_report_rotates_and_the_previous_key_is_forgotten_after_grace_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), &StoreKey::generate());
    let (user, device) = alice();
    let policy = FallbackPolicy::default();
    let old = provisioned(&m, T0).await;
    assert!(matches!(
        m.apply_fallback_policy(&user, &device, &policy, T0 + 1)
            .await
            .unwrap(),
        FallbackAction::Wait { .. }
    ));

    assert!(m.mark_fallback_used(&user, &device).await.unwrap());
    assert!(
        !m.mark_fallback_used(&user, &device).await.unwrap(),
        "a repeated report changes nothing"
    );
    let t1 = T0 + 2 * HOUR;
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, t1)
            .await
            .unwrap(),
        FallbackAction::Rotate(RotationReason::Used)
    );
    let new = m
        .fallback_key_for_upload(&user, &device, t1)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(new.key.key, old.key.key);
    assert_ne!(new.key_id, old.key_id);
    // A report that arrives before the new key is uploaded is stale.
    assert!(!m.mark_fallback_used(&user, &device).await.unwrap());
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, t1 + 1)
            .await
            .unwrap(),
        FallbackAction::Upload
    );
    m.mark_fallback_published(&user, &device, &new.key_id, t1)
        .await
        .unwrap();

    // Within the grace period the previous key still decrypts.
    let (sender, message) = prekey_message_to(&m, &user, &device, old.key.key.as_bytes(), "late");
    assert!(
        m.decrypt_prekey(&user, &device, sender, &message)
            .await
            .unwrap()
            .used_fallback_key
    );
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, t1 + HOUR - 1)
            .await
            .unwrap(),
        FallbackAction::Wait {
            until: Some(t1 + HOUR)
        }
    );
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, t1 + HOUR)
            .await
            .unwrap(),
        FallbackAction::ForgetPrevious
    );
    let (sender, message) =
        prekey_message_to(&m, &user, &device, old.key.key.as_bytes(), "too late");
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownOneTimeKey), "{err}");
    // The current key is unaffected.
    let (sender, message) =
        prekey_message_to(&m, &user, &device, new.key.key.as_bytes(), "current");
    m.decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap();
    let stats = m.stats();
    assert_eq!((stats.fallback_rotations, stats.fallback_forgets), (1, 1));
}

#[tokio::test]
async fn an_old_key_rotates_at_max_age_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), &StoreKey::generate());
    let (user, device) = alice();
    let policy = {
        let mut c = FallbackPolicy::default();
        c.max_age = Duration::from_secs(24 * 3600);
        c.grace = Duration::from_secs(60);
        c
    };
    provisioned(&m, T0).await;
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, T0 + 24 * HOUR - 1)
            .await
            .unwrap(),
        FallbackAction::Wait {
            until: Some(T0 + 24 * HOUR)
        }
    );
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, T0 + 24 * HOUR)
            .await
            .unwrap(),
        FallbackAction::Rotate(RotationReason::Expired)
    );
    let state = m.fallback_state(&user, &device).unwrap();
    assert_eq!(state.previous_since_ms, Some(T0 + 24 * HOUR));
    assert_eq!(state.current.unwrap().created_ms, T0 + 24 * HOUR);
}

#[tokio::test]
async fn a_restart_in_the_middle_keeps_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let policy = FallbackPolicy::default();
    let t1 = T0 + 8 * 24 * HOUR;
    {
        let m = open(dir.path(), &store_key);
        provisioned(&m, T0).await;
        assert_eq!(
            m.apply_fallback_policy(&user, &device, &policy, t1)
                .await
                .unwrap(),
            FallbackAction::Rotate(RotationReason::Expired)
        );
    }
    {
        // Restarted before the upload: the same rotated key is uploaded.
        let m = open(dir.path(), &store_key);
        assert_eq!(
            m.apply_fallback_policy(&user, &device, &policy, t1 + 10)
                .await
                .unwrap(),
            FallbackAction::Upload
        );
        let key = m
            .fallback_key_for_upload(&user, &device, t1 + 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.fallback_state(&user, &device)
                .unwrap()
                .current
                .unwrap()
                .created_ms,
            t1
        );
        m.mark_fallback_published(&user, &device, &key.key_id, t1 + 10)
            .await
            .unwrap();
    }
    {
        // Restarted within the grace period (which started when the new key
        // was published, at t1 + 10): still waiting for the same time.
        let m = open(dir.path(), &store_key);
        assert_eq!(
            m.apply_fallback_policy(&user, &device, &policy, t1 + 10 + HOUR - 1)
                .await
                .unwrap(),
            FallbackAction::Wait {
                until: Some(t1 + 10 + HOUR)
            }
        );
    }
    let m = open(dir.path(), &store_key);
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, t1 + 10 + HOUR)
            .await
            .unwrap(),
        FallbackAction::ForgetPrevious
    );
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, t1 + 10 + HOUR)
            .await
            .unwrap(),
        FallbackAction::Wait {
            until: Some(t1 + 7 * 24 * HOUR)
        }
    );
}

#[tokio::test]
async fn fallback_operations_refuse_unknown_devices() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), &StoreKey::generate());
    let (user, device) = alice();
    let err = m
        .fallback_key_for_upload(&user, &device, T0)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownDevice { .. }), "{err}");
    let err = m
        .apply_fallback_policy(&user, &device, &FallbackPolicy::default(), T0)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownDevice { .. }), "{err}");
}

#[tokio::test]
async fn a_pass_over_idle_devices_does_not_load_them_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let policy = FallbackPolicy::default();
    {
        let m = open(dir.path(), &store_key);
        provisioned(&m, T0).await;
    }
    let m = open(dir.path(), &store_key);
    assert_eq!(m.loaded_devices(), 0);
    assert!(matches!(
        m.apply_fallback_policy(&user, &device, &policy, T0 + 1)
            .await
            .unwrap(),
        FallbackAction::Wait { .. }
    ));
    assert_eq!(m.loaded_devices(), 0, "an idle device stays on disk only");
    assert_eq!(
        m.apply_fallback_policy(&user, &device, &policy, T0 + 8 * 24 * HOUR)
            .await
            .unwrap(),
        FallbackAction::Rotate(RotationReason::Expired)
    );
    assert_eq!(m.loaded_devices(), 1);
}

#[tokio::test]
async fn a_forced_rotation_and_forget_act_at_once_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), &StoreKey::generate());
    let (user, device) = alice();
    let old = provisioned(&m, T0).await;
    m.rotate_fallback_key(&user, &device, T0 + 5).await.unwrap();
    let new = m
        .fallback_key_for_upload(&user, &device, T0 + 6)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(new.key.key, old.key.key);
    assert_eq!(
        m.fallback_state(&user, &device).unwrap().previous_since_ms,
        Some(T0 + 5)
    );
    assert!(
        m.forget_previous_fallback_key(&user, &device)
            .await
            .unwrap()
    );
    assert!(
        !m.forget_previous_fallback_key(&user, &device)
            .await
            .unwrap()
    );
    let (sender, message) = prekey_message_to(&m, &user, &device, old.key.key.as_bytes(), "x");
    let err = m
        .decrypt_prekey(&user, &device, sender, &message)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::UnknownOneTimeKey), "{err}");
    let stats = m.stats();
    assert_eq!((stats.fallback_rotations, stats.fallback_forgets), (1, 1));
}

/// A manager over a `MemoryStore` that counts the device writes it
/// applies and refuses them while `refuse` is set.
struct CountedStore {
    manager: AccountManager,
    store: std::sync::Arc<bridgekeys_store::testing::Intercepted>,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CountedStore {
    fn new() -> Self {
        use bridgekeys_store::{
            Backend, StoreError,
            testing::{Intercepted, MemoryStore, Write},
        };
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        };
        let store = Arc::new(Intercepted::new(
            Arc::new(MemoryStore::new()) as Arc<dyn Backend>
        ));
        let (writes, refuse) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (counted, refusing) = (Arc::clone(&writes), Arc::clone(&refuse));
        store.intercept(move |w| {
            if matches!(w, Write::Device(_)) {
                if refusing.load(Ordering::SeqCst) {
                    return Err(StoreError::engine("refused by the test"));
                }
                counted.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        });
        let manager = AccountManager::new(
            Arc::clone(&store) as Arc<dyn bridgekeys_store::Store>,
            ManagerConfig::default(),
        );
        Self {
            manager,
            store,
            writes,
            refuse,
        }
    }
}

/// Generating the fallback key for upload and recording the puppet (with
/// its due time) is one write of the account record; asked again before
/// the upload it returns the very same key and still records; with the key
/// published it returns none, records and reschedules, and a device
/// recorded and cross-signed already keeps its flag.
#[tokio::test]
async fn generating_the_fallback_key_and_recording_the_puppet_is_one_write() {
    use bridgekeys_store::{DeviceKey, PuppetRegistry};
    use std::sync::atomic::Ordering;
    let CountedStore {
        manager: m,
        store,
        writes,
        ..
    } = CountedStore::new();
    let (user, device) = alice();
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    m.create_device(&user, &device).await.unwrap();
    let before = writes.load(Ordering::SeqCst);
    let key = m
        .fallback_key_for_upload_and_record_puppet(&user, &device, T0, T0 + 5)
        .await
        .unwrap()
        .expect("a new key to upload");
    assert_eq!(
        writes.load(Ordering::SeqCst) - before,
        1,
        "one device write"
    );
    assert_eq!(m.stats().fallback_keys_generated, 1);
    assert!(store.contains_puppet(&dev).unwrap());
    assert_eq!(
        store.due_rotations(T0 + 5, None, 10).unwrap(),
        vec![(dev.clone(), T0 + 5)]
    );
    assert!(store.due_rotations(T0 + 4, None, 10).unwrap().is_empty());
    // Before the upload's 200: the same key, recorded again (rescheduled).
    let again = m
        .fallback_key_for_upload_and_record_puppet(&user, &device, T0 + 1, T0 + 7)
        .await
        .unwrap()
        .expect("the unpublished key again");
    assert_eq!(again.key_id, key.key_id);
    assert_eq!(
        serde_json::to_string(&again.key).unwrap(),
        serde_json::to_string(&key.key).unwrap()
    );
    assert_eq!(
        m.stats().fallback_keys_generated,
        1,
        "nothing new generated"
    );
    assert_eq!(
        store.due_rotations(u64::MAX, None, 10).unwrap(),
        vec![(dev.clone(), T0 + 7)]
    );
    assert!(
        m.mark_fallback_published(&user, &device, &key.key_id, T0 + 2)
            .await
            .unwrap()
    );
    // Published: nothing to upload, still recorded and rescheduled, the
    // cross-signed flag kept.
    store
        .record_cross_signed(&dev)
        .unwrap()
        .durable()
        .await
        .unwrap();
    let before = writes.load(Ordering::SeqCst);
    assert!(
        m.fallback_key_for_upload_and_record_puppet(&user, &device, T0 + 3, T0 + 9)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        writes.load(Ordering::SeqCst) - before,
        1,
        "the mark is written"
    );
    assert!(store.is_cross_signed(&dev).unwrap());
    assert_eq!(
        store.due_rotations(u64::MAX, None, 10).unwrap(),
        vec![(dev, T0 + 9)]
    );
}

/// Marking the uploaded fallback key published can schedule the device's
/// next step in the same write: at the key's maximum age by the policy
/// (the time a rotation pass would set), one device write; when that write
/// fails, neither the publication nor the schedule lands; a repeat (the
/// key is published already) writes nothing and schedules nothing; a key
/// already past its age when its upload is acknowledged is due at once.
#[tokio::test]
async fn marking_the_key_published_schedules_the_policys_next_step_in_the_same_write() {
    use bridgekeys_store::{DeviceKey, PuppetRegistry};
    use std::sync::atomic::Ordering;
    let CountedStore {
        manager: m,
        store,
        writes,
        refuse,
    } = CountedStore::new();
    let policy = FallbackPolicy::default();
    let max_age = u64::try_from(policy.max_age.as_millis()).unwrap();
    let (user, device) = alice();
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    m.create_device(&user, &device).await.unwrap();
    let key = m
        .fallback_key_for_upload_and_record_puppet(&user, &device, T0, T0)
        .await
        .unwrap()
        .expect("a key to upload");
    let published = || {
        m.fallback_state(&user, &device)
            .unwrap()
            .current
            .is_some_and(|c| c.published)
    };
    let scheduled = || store.due_rotations(u64::MAX, None, 10).unwrap();
    // The device write refused: nothing of it lands, schedule included.
    refuse.store(true, Ordering::SeqCst);
    m.mark_fallback_published_and_schedule(&user, &device, &key.key_id, T0 + 10, &policy)
        .await
        .expect_err("the write was refused");
    refuse.store(false, Ordering::SeqCst);
    assert!(!published(), "not published");
    assert_eq!(scheduled(), vec![(dev.clone(), T0)], "still due at once");
    let before = writes.load(Ordering::SeqCst);
    let at = m
        .mark_fallback_published_and_schedule(&user, &device, &key.key_id, T0 + 10, &policy)
        .await
        .unwrap();
    assert_eq!(at, Some(T0 + max_age), "the key's maximum age");
    assert_eq!(
        writes.load(Ordering::SeqCst) - before,
        1,
        "one device write"
    );
    assert!(published());
    assert_eq!(scheduled(), vec![(dev.clone(), T0 + max_age)]);
    let before = writes.load(Ordering::SeqCst);
    let repeat = m
        .mark_fallback_published_and_schedule(&user, &device, &key.key_id, T0 + 20, &policy)
        .await
        .unwrap();
    assert_eq!(repeat, None, "published already");
    assert_eq!(writes.load(Ordering::SeqCst), before, "nothing written");

    // Another device whose key is older than the maximum age when its
    // upload is acknowledged: its rotation is due at once.
    let other = ruma::device_id!("LATE").to_owned();
    m.create_device(&user, &other).await.unwrap();
    let late = m
        .fallback_key_for_upload_and_record_puppet(&user, &other, T0, T0)
        .await
        .unwrap()
        .expect("a key to upload");
    let acknowledged = T0 + max_age + 1;
    let scheduled = m
        .mark_fallback_published_and_schedule(&user, &other, &late.key_id, acknowledged, &policy)
        .await
        .unwrap();
    assert_eq!(scheduled, Some(acknowledged), "due at once");
    assert_eq!(
        store.due_rotations(acknowledged, None, 10).unwrap(),
        vec![
            (dev, T0 + max_age),
            (DeviceKey::new(user.as_str(), other.as_str()), acknowledged)
        ]
    );
}
