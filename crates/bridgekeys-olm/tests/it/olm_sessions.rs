//! Olm sessions of puppet devices: verified payloads, sessions that last,
//! outbound encryption and device tracking.

use std::collections::BTreeMap;

use crate::common::{Peer, alice, decrypt, device_keys, manager, payload_for, peer_user};
use bridgekeys_olm::{
    AccountManager, DeviceRefusal, ManagerConfig, OlmError, PayloadError, Recipient,
    canonical_json_for_signing,
};
use bridgekeys_store::{DeviceKey, StoreKey};
use ruma::{DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, UserId, device_id};
use serde_json::{Value, json};
use vodozemac::olm::{Account, OlmMessage, SessionConfig};

const SC: OneTimeKeyAlgorithm = OneTimeKeyAlgorithm::SignedCurve25519;

async fn puppet(m: &AccountManager) -> (ruma::OwnedUserId, OwnedDeviceId) {
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    (user, device)
}

/// A peer whose outbound session is on a one-time key claimed of the
/// puppet device.
async fn peer_on_a_claimed_key(m: &AccountManager, user: &UserId, device: &DeviceId) -> Peer {
    let key = m.claim(user, device, &SC, 1).await.unwrap().remove(0);
    Peer::new(m, user, device, key.key.key.as_bytes())
}

fn counts(m: &AccountManager, user: &UserId, device: &DeviceId, peer: &Peer) -> (usize, usize) {
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    (
        m.store().count_one_time_keys(&dev).unwrap(),
        m.store()
            .sessions(&dev, &peer.curve25519().to_bytes())
            .unwrap()
            .len(),
    )
}

/// The puppet's reply to a peer, decrypted by the peer's own session.
fn peer_reads(peer: &mut Peer, content: &Value) -> Value {
    let ciphertext = &content["ciphertext"][peer.curve25519().to_base64()];
    let message = OlmMessage::from_parts(
        ciphertext["type"].as_u64().unwrap() as usize,
        &vodozemac::base64_decode(ciphertext["body"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    serde_json::from_slice(&peer.session.decrypt(&message).unwrap()).unwrap()
}

#[tokio::test]
async fn every_payload_field_violation_is_refused_with_no_state_change_and_the_key_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    let key = m.claim(&user, &device, &SC, 1).await.unwrap().remove(0);
    let mut peer = Peer::new(&m, &user, &device, key.key.key.as_bytes());
    let good: Value =
        serde_json::from_str(&payload_for(&m, &user, &device, &peer.account, "x")).unwrap();
    let other = Account::new();
    let cases = [
        (
            "recipient",
            json!("@someone:example.org"),
            PayloadError::WrongRecipient,
        ),
        (
            "recipient_keys",
            json!({"ed25519": other.ed25519_key().to_base64()}),
            PayloadError::WrongRecipientKey,
        ),
        (
            "sender",
            json!("@mallory:example.org"),
            PayloadError::WrongSender,
        ),
        ("keys", json!({}), PayloadError::Missing("keys.ed25519")),
    ];
    for (field, value, expected) in cases {
        let mut bad = good.clone();
        bad[field] = value;
        // Each attempt is a new pre-key message on the same claimed key.
        let mut attempt = Peer::new(&m, &user, &device, key.key.key.as_bytes());
        let message = attempt.session.encrypt(bad.to_string()).unwrap();
        let err = decrypt(&m, &user, &device, attempt.curve25519(), &message, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OlmError::Payload(e) if *e == expected),
            "{field}: {err}"
        );
        assert_eq!(counts(&m, &user, &device, &attempt), (1, 0), "{field}");
    }
    assert_eq!(m.stats().payloads_refused, 4);
    assert_eq!(m.stats().prekeys_decrypted, 0);
    // The key was kept: the correctly addressed message still starts the
    // one session, and consumes it.
    let message = peer.send(&m, &user, &device, "hello");
    let inbound = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
        .await
        .unwrap();
    assert_eq!(inbound.plaintext, b"hello");
    assert_eq!(counts(&m, &user, &device, &peer), (0, 1));

    // A normal message with a bad payload is refused and leaves the
    // session as it was: the next good message still decrypts.
    let reply = m
        .encrypt_olm(
            (&user, &device),
            &peer_recipient(&peer),
            "m.dummy",
            &json!({}),
        )
        .await
        .unwrap();
    peer_reads(&mut peer, &reply.content);
    let mut bad = good.clone();
    bad["recipient"] = json!("@someone:example.org");
    let message = peer.session.encrypt(bad.to_string()).unwrap();
    assert!(matches!(message, OlmMessage::Normal(_)));
    let err = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, OlmError::Payload(PayloadError::WrongRecipient)),
        "{err}"
    );
    let message = peer.send(&m, &user, &device, "still here");
    let inbound = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
        .await
        .unwrap();
    assert_eq!(inbound.plaintext, b"still here");
}

fn peer_recipient(peer: &Peer) -> Recipient<'_> {
    Recipient {
        user_id: peer_user(),
        device_id: device_id!("PEERDEV"),
        curve25519: peer.account.curve25519_key(),
        ed25519: peer.account.ed25519_key(),
    }
}

#[tokio::test]
async fn normal_messages_after_a_prekey_message_decrypt_both_ways_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store_key = StoreKey::generate();
    let (user, device) = alice();
    let mut peer = {
        let m = manager(dir.path(), &store_key, ManagerConfig::default());
        m.create_device(&user, &device).await.unwrap();
        let mut peer = peer_on_a_claimed_key(&m, &user, &device).await;
        let first = peer.send(&m, &user, &device, "one");
        let inbound = decrypt(&m, &user, &device, peer.curve25519(), &first, None)
            .await
            .unwrap();
        assert!(inbound.new_session);
        // The puppet answers on the same session; the peer reads it, so its
        // next messages are normal (type 1) messages.
        let reply = m
            .encrypt_olm(
                (&user, &device),
                &peer_recipient(&peer),
                "m.test",
                &json!({"n": 1}),
            )
            .await
            .unwrap();
        assert_eq!(reply.session_id, inbound.session_id);
        let read = peer_reads(&mut peer, &reply.content);
        assert_eq!(read["content"], json!({"n": 1}));
        assert_eq!(read["sender"], json!(user));
        assert_eq!(read["recipient"], json!(peer_user()));
        for n in 0..3 {
            let message = peer.send(&m, &user, &device, &format!("normal {n}"));
            assert!(matches!(message, OlmMessage::Normal(_)));
            let inbound = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
                .await
                .unwrap();
            assert!(!inbound.new_session);
            assert_eq!(inbound.plaintext, format!("normal {n}").as_bytes());
        }
        peer
        // Dropped without a shutdown: only what was durable remains.
    };
    let m = manager(dir.path(), &store_key, ManagerConfig::default());
    let message = peer.send(&m, &user, &device, "after restart");
    let inbound = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
        .await
        .unwrap();
    assert_eq!(inbound.plaintext, b"after restart");
    let reply = m
        .encrypt_olm(
            (&user, &device),
            &peer_recipient(&peer),
            "m.test",
            &json!({"n": 2}),
        )
        .await
        .unwrap();
    assert_eq!(reply.message_type, 1);
    assert_eq!(
        peer_reads(&mut peer, &reply.content)["content"],
        json!({"n": 2})
    );
    assert_eq!(m.stats().olm_decrypted, 1);
}

#[tokio::test]
async fn a_second_prekey_message_on_a_known_session_goes_to_that_session() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    let mut peer = peer_on_a_claimed_key(&m, &user, &device).await;
    // The peer sends twice before hearing back: both are pre-key messages
    // of one session, on one (consumed after the first) one-time key.
    let first = peer.send(&m, &user, &device, "first");
    let second = peer.send(&m, &user, &device, "second");
    assert!(matches!(second, OlmMessage::PreKey(_)));
    let a = decrypt(&m, &user, &device, peer.curve25519(), &first, None)
        .await
        .unwrap();
    let b = decrypt(&m, &user, &device, peer.curve25519(), &second, None)
        .await
        .unwrap();
    assert_eq!((a.new_session, b.new_session), (true, false));
    assert_eq!(a.session_id, b.session_id);
    assert_eq!(b.plaintext, b"second");
    assert_eq!(counts(&m, &user, &device, &peer), (0, 1));
    assert_eq!(m.stats().prekeys_decrypted, 1);
}

#[tokio::test]
async fn a_normal_message_no_session_decrypts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    // A session with some other device produces normal messages we cannot
    // read.
    let stranger = Account::new();
    let mut other = Account::new();
    other.generate_one_time_keys(1);
    let otk = *other.one_time_keys().values().next().unwrap();
    let mut session = stranger
        .create_outbound_session(SessionConfig::version_1(), other.curve25519_key(), otk)
        .unwrap();
    let OlmMessage::PreKey(prekey) = session.encrypt("hi").unwrap() else {
        panic!("pre-key first")
    };
    let mut inbound = other
        .create_inbound_session(
            SessionConfig::version_1(),
            stranger.curve25519_key(),
            &prekey,
        )
        .unwrap()
        .session;
    let normal = inbound.encrypt("x").unwrap();
    let err = decrypt(&m, &user, &device, other.curve25519_key(), &normal, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::NoMatchingSession), "{err}");
}

#[tokio::test]
async fn sessions_per_peer_are_bounded_and_the_least_recently_used_goes() {
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = ManagerConfig::default();
        c.max_sessions_per_peer = 2;
        c
    };
    let m = manager(dir.path(), &StoreKey::generate(), config);
    let (user, device) = puppet(&m).await;
    let keys = m.claim(&user, &device, &SC, 3).await.unwrap();
    // One peer device (one curve25519 key) starting three sessions.
    let account = Account::new();
    let identity = m.identity_keys(&user, &device).unwrap();
    let mut sessions = Vec::new();
    for key in &keys {
        let otk = vodozemac::Curve25519PublicKey::from_slice(key.key.key.as_bytes()).unwrap();
        let session = account
            .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
            .unwrap();
        sessions.push(session);
    }
    let mut ids = Vec::new();
    for session in &mut sessions {
        let payload = payload_for(&m, &user, &device, &account, "s");
        let message = session.encrypt(payload).unwrap();
        let inbound = decrypt(&m, &user, &device, account.curve25519_key(), &message, None)
            .await
            .unwrap();
        ids.push(inbound.session_id);
    }
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    let mut stored: Vec<String> = m
        .store()
        .sessions(&dev, &account.curve25519_key().to_bytes())
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    stored.sort();
    let mut newest = ids[1..].to_vec();
    newest.sort();
    assert_eq!(stored, newest, "the oldest session was not the one evicted");
    assert_eq!(m.stats().sessions_evicted, 1);
}

/// A peer's signed one-time key, as a claim through the homeserver returns it.
fn signed_one_time_key(peer: &mut Account, user: &UserId, device: &DeviceId) -> Value {
    peer.generate_one_time_keys(1);
    let otk = *peer.one_time_keys().values().next().unwrap();
    peer.mark_keys_as_published();
    let mut key = json!({ "key": otk.to_base64() });
    let signature = peer.sign(canonical_json_for_signing(&key).unwrap());
    key["signatures"] =
        json!({ user.as_str(): { format!("ed25519:{device}"): signature.to_base64() } });
    key
}

#[tokio::test]
async fn outbound_sessions_are_created_from_a_verified_claimed_key_and_then_reused() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    let mut peer = Account::new();
    let recipient = Recipient {
        user_id: peer_user(),
        device_id: device_id!("PEERDEV"),
        curve25519: peer.curve25519_key(),
        ed25519: peer.ed25519_key(),
    };
    assert!(
        !m.has_session((&user, &device), &recipient.curve25519)
            .unwrap()
    );
    let err = m
        .encrypt_olm((&user, &device), &recipient, "m.test", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::NoMatchingSession), "{err}");

    // A key whose signature does not verify is refused.
    let mut forged = signed_one_time_key(&mut peer, peer_user(), device_id!("PEERDEV"));
    let stranger = Account::new();
    forged["signatures"][peer_user().as_str()]["ed25519:PEERDEV"] = json!(
        stranger
            .sign(canonical_json_for_signing(&forged).unwrap())
            .to_base64()
    );
    let err = m
        .create_outbound_session((&user, &device), &recipient, &forged)
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::BadKeySignature), "{err}");
    let mut tampered = signed_one_time_key(&mut peer, peer_user(), device_id!("PEERDEV"));
    tampered["key"] = json!(stranger.curve25519_key().to_base64());
    assert!(matches!(
        m.create_outbound_session((&user, &device), &recipient, &tampered)
            .await,
        Err(OlmError::BadKeySignature)
    ));
    assert!(
        !m.has_session((&user, &device), &recipient.curve25519)
            .unwrap()
    );

    let key = signed_one_time_key(&mut peer, peer_user(), device_id!("PEERDEV"));
    let session_id = m
        .create_outbound_session((&user, &device), &recipient, &key)
        .await
        .unwrap();
    let first = m
        .encrypt_olm((&user, &device), &recipient, "m.test", &json!({"n": 1}))
        .await
        .unwrap();
    let second = m
        .encrypt_olm((&user, &device), &recipient, "m.test", &json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!((first.message_type, second.message_type), (0, 0));
    assert_eq!(
        (&first.session_id, &second.session_id),
        (&session_id, &session_id)
    );
    assert_eq!(m.stats().sessions_created_outbound, 1);
    assert_eq!(m.stats().olm_encrypted, 2);

    // The peer (plain vodozemac) opens the session and checks the payload.
    let identity = m.identity_keys(&user, &device).unwrap();
    assert_eq!(
        first.content["sender_key"],
        json!(identity.curve25519.to_base64())
    );
    let body = first.content["ciphertext"][peer.curve25519_key().to_base64()]["body"]
        .as_str()
        .unwrap();
    let prekey = vodozemac::olm::PreKeyMessage::from_base64(body).unwrap();
    let created = peer
        .create_inbound_session(SessionConfig::version_1(), identity.curve25519, &prekey)
        .unwrap();
    let payload: Value = serde_json::from_slice(&created.plaintext).unwrap();
    assert_eq!(
        payload,
        json!({
            "sender": user, "sender_device": device,
            "recipient": peer_user(), "recipient_keys": {"ed25519": peer.ed25519_key().to_base64()},
            "keys": {"ed25519": identity.ed25519.to_base64()},
            "type": "m.test", "content": {"n": 1},
        })
    );
}

#[tokio::test]
async fn tracked_devices_are_verified_a_key_change_is_refused_and_invalidation_marks_outdated() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let bob = ruma::user_id!("@bob:example.org");
    let (one, two, three) = (Account::new(), Account::new(), Account::new());
    let forged = {
        let mut raw: Value =
            serde_json::from_str(device_keys(&two, bob, device_id!("FORGED")).json().get())
                .unwrap();
        raw["keys"]["ed25519:FORGED"] = json!(three.ed25519_key().to_base64());
        serde_json::from_value(raw).unwrap()
    };
    let queried = BTreeMap::from([
        (
            device_id!("ONE").to_owned(),
            device_keys(&one, bob, device_id!("ONE")),
        ),
        (
            device_id!("TWO").to_owned(),
            device_keys(&two, bob, device_id!("TWO")),
        ),
        (
            device_id!("WRONGID").to_owned(),
            device_keys(&two, bob, device_id!("OTHER")),
        ),
        (device_id!("FORGED").to_owned(), forged),
    ]);
    let update = m.update_tracked_devices(bob, &queried).await.unwrap();
    assert_eq!(
        update.added,
        vec![device_id!("ONE").to_owned(), device_id!("TWO").to_owned()]
    );
    assert_eq!(
        update.refused,
        vec![
            (device_id!("FORGED").to_owned(), DeviceRefusal::BadSignature),
            (device_id!("WRONGID").to_owned(), DeviceRefusal::WrongIds),
        ]
    );
    // Device TWO comes back with other keys (validly self-signed by them):
    // refused, the old keys stay. ONE is gone from the listing: removed.
    let queried = BTreeMap::from([(
        device_id!("TWO").to_owned(),
        device_keys(&three, bob, device_id!("TWO")),
    )]);
    let update = m.update_tracked_devices(bob, &queried).await.unwrap();
    assert_eq!(
        update.refused,
        vec![(device_id!("TWO").to_owned(), DeviceRefusal::KeysChanged)]
    );
    assert_eq!(update.removed, vec![device_id!("ONE").to_owned()]);
    let tracked = m.tracked_devices(bob).unwrap().unwrap();
    assert_eq!(tracked.devices.len(), 1);
    assert_eq!(
        tracked.devices[device_id!("TWO")].ed25519,
        two.ed25519_key()
    );
    assert!(!tracked.outdated);
    assert_eq!(m.stats().devices_refused, 3);

    // device_lists.changed marks the user outdated; a fresh query clears it.
    let stranger = ruma::user_id!("@nobody:example.org");
    let marked = m.mark_devices_outdated([bob, stranger]).await.unwrap();
    assert_eq!(marked, vec![bob.to_owned()]);
    assert!(m.tracked_devices(bob).unwrap().unwrap().outdated);
    let queried = BTreeMap::from([(
        device_id!("TWO").to_owned(),
        device_keys(&two, bob, device_id!("TWO")),
    )]);
    m.update_tracked_devices(bob, &queried).await.unwrap();
    assert!(!m.tracked_devices(bob).unwrap().unwrap().outdated);
    // device_lists.left forgets the user.
    m.forget_tracked_devices([bob]).await.unwrap();
    assert!(m.tracked_devices(bob).unwrap().is_none());
}

#[tokio::test]
async fn a_message_from_a_tracked_device_must_carry_that_devices_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    let keys = m.claim(&user, &device, &SC, 2).await.unwrap();
    let mut peer = Peer::new(&m, &user, &device, keys[0].key.key.as_bytes());
    // PEERDEV is tracked with the peer's curve25519 key but another
    // ed25519 key than the payload claims.
    let imposter = Account::new();
    let mut tracked_keys: Value = serde_json::from_str(
        device_keys(&peer.account, peer_user(), device_id!("PEERDEV"))
            .json()
            .get(),
    )
    .unwrap();
    tracked_keys["keys"]["ed25519:PEERDEV"] = json!(imposter.ed25519_key().to_base64());
    tracked_keys.as_object_mut().unwrap().remove("signatures");
    let signature = imposter.sign(canonical_json_for_signing(&tracked_keys).unwrap());
    tracked_keys["signatures"] =
        json!({ peer_user().as_str(): { "ed25519:PEERDEV": signature.to_base64() } });
    let queried = BTreeMap::from([(
        device_id!("PEERDEV").to_owned(),
        serde_json::from_value(tracked_keys).unwrap(),
    )]);
    let update = m
        .update_tracked_devices(peer_user(), &queried)
        .await
        .unwrap();
    assert!(update.refused.is_empty(), "{update:?}");

    let message = peer.send(&m, &user, &device, "hi");
    let err = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, OlmError::Payload(PayloadError::SenderKeysMismatch)),
        "{err}"
    );

    // The tracked device id keeps its keys: the right ones are now refused
    // under that id, also after the user was forgotten (a tombstone).
    m.forget_tracked_devices([peer_user()]).await.unwrap();
    let right = BTreeMap::from([(
        device_id!("PEERDEV").to_owned(),
        device_keys(&peer.account, peer_user(), device_id!("PEERDEV")),
    )]);
    let update = m.update_tracked_devices(peer_user(), &right).await.unwrap();
    assert_eq!(
        update.refused,
        vec![(device_id!("PEERDEV").to_owned(), DeviceRefusal::KeysChanged)]
    );

    // A bridge that tracked the right keys from the start verifies the
    // sender device, and reports the device the keys matched.
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    let mut peer = peer_on_a_claimed_key(&m, &user, &device).await;
    let right = BTreeMap::from([(
        device_id!("PEERDEV").to_owned(),
        device_keys(&peer.account, peer_user(), device_id!("PEERDEV")),
    )]);
    m.update_tracked_devices(peer_user(), &right).await.unwrap();
    let message = peer.send(&m, &user, &device, "hi");
    let decrypted = m
        .decrypt_olm(
            (&user, &device),
            peer_user(),
            peer.curve25519(),
            &message,
            None,
        )
        .await
        .unwrap();
    assert!(decrypted.payload.sender_device_verified);
    assert_eq!(
        decrypted.payload.sender_device.as_deref(),
        Some(device_id!("PEERDEV"))
    );
    // A payload naming another device of the sender's than the one whose
    // key the channel is: refused.
    let mut ghost: Value =
        serde_json::from_str(&payload_for(&m, &user, &device, &peer.account, "boo")).unwrap();
    ghost["sender_device"] = json!("GHOST");
    let message = peer.session.encrypt(ghost.to_string()).unwrap();
    let err = decrypt(&m, &user, &device, peer.curve25519(), &message, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, OlmError::Payload(PayloadError::SenderKeysMismatch)),
        "{err}"
    );
}

#[tokio::test]
async fn a_device_left_out_of_an_answer_cannot_come_back_with_other_keys_and_a_late_answer_keeps_the_invalidation()
 {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let bob = ruma::user_id!("@bob:example.org");
    let (first, second) = (Account::new(), Account::new());
    let listed = |account: &Account| {
        BTreeMap::from([(
            device_id!("PHONE").to_owned(),
            device_keys(account, bob, device_id!("PHONE")),
        )])
    };
    m.update_tracked_devices(bob, &listed(&first))
        .await
        .unwrap();
    // One answer leaves the device out...
    let update = m
        .update_tracked_devices(bob, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(update.removed, vec![device_id!("PHONE").to_owned()]);
    // ...the next lists it with other keys: refused, not "added".
    let update = m
        .update_tracked_devices(bob, &listed(&second))
        .await
        .unwrap();
    assert!(update.added.is_empty(), "{update:?}");
    assert_eq!(
        update.refused,
        vec![(device_id!("PHONE").to_owned(), DeviceRefusal::KeysChanged)]
    );
    assert!(m.tracked_devices(bob).unwrap().unwrap().devices.is_empty());
    // With its own keys it comes back.
    let update = m
        .update_tracked_devices(bob, &listed(&first))
        .await
        .unwrap();
    assert_eq!(update.added, vec![device_id!("PHONE").to_owned()]);

    // A query is sent; device_lists.changed arrives before its answer: the
    // answer is stored, but the user stays outdated.
    let before = m.tracked_generation(bob).unwrap();
    m.mark_devices_outdated([bob]).await.unwrap();
    m.update_tracked_devices_since(bob, &listed(&first), Some(before))
        .await
        .unwrap();
    assert!(m.tracked_devices(bob).unwrap().unwrap().outdated);
    // The next query, sent after the change, clears it.
    let now = m.tracked_generation(bob).unwrap();
    m.update_tracked_devices_since(bob, &listed(&first), Some(now))
        .await
        .unwrap();
    assert!(!m.tracked_devices(bob).unwrap().unwrap().outdated);
}

#[tokio::test]
async fn a_remembered_delivery_is_only_given_back_to_the_same_sender_on_the_same_channel() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = puppet(&m).await;
    let mut peer = peer_on_a_claimed_key(&m, &user, &device).await;
    let message = peer.send(&m, &user, &device, "once");
    let first = decrypt(
        &m,
        &user,
        &device,
        peer.curve25519(),
        &message,
        Some("txn-9"),
    )
    .await
    .unwrap();
    assert_eq!(first.plaintext, b"once");
    // The same bytes in a retry of that delivery, claiming another channel
    // or another sender: not the remembered message.
    let other_key = Account::new().curve25519_key();
    let err = decrypt(&m, &user, &device, other_key, &message, Some("txn-9"))
        .await
        .unwrap_err();
    assert!(!matches!(err, OlmError::Store(_)), "{err}");
    let mallory = ruma::user_id!("@mallory:example.org");
    let err = m
        .decrypt_olm(
            (&user, &device),
            mallory,
            peer.curve25519(),
            &message,
            Some("txn-9"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, OlmError::Replay), "{err}");
    // The genuine retry still gets it.
    let again = decrypt(
        &m,
        &user,
        &device,
        peer.curve25519(),
        &message,
        Some("txn-9"),
    )
    .await
    .unwrap();
    assert_eq!(again.plaintext, b"once");
}

#[tokio::test]
async fn eviction_follows_use_not_creation_and_a_device_holds_a_bounded_number_of_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = ManagerConfig::default();
        c.max_sessions_per_peer = 2;
        c.max_sessions_per_device = 3;
        c
    };
    let m = manager(dir.path(), &StoreKey::generate(), config);
    let (user, device) = puppet(&m).await;
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    let keys = m.claim(&user, &device, &SC, 6).await.unwrap();
    let identity = m.identity_keys(&user, &device).unwrap();
    // One peer device starts sessions A and B; A is used again; C comes.
    let account = Account::new();
    let mut sessions = Vec::new();
    for key in &keys[..3] {
        let otk = vodozemac::Curve25519PublicKey::from_slice(key.key.key.as_bytes()).unwrap();
        sessions.push(
            account
                .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
                .unwrap(),
        );
    }
    let send = async |session: &mut vodozemac::olm::Session, body: &str| {
        let message = session
            .encrypt(payload_for(&m, &user, &device, &account, body))
            .unwrap();
        decrypt(&m, &user, &device, account.curve25519_key(), &message, None)
            .await
            .unwrap()
            .session_id
    };
    let a = send(&mut sessions[0], "a").await;
    let b = send(&mut sessions[1], "b").await;
    assert_eq!(send(&mut sessions[0], "a again").await, a);
    let c = send(&mut sessions[2], "c").await;
    let mut kept: Vec<String> = m
        .store()
        .sessions(&dev, &account.curve25519_key().to_bytes())
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    kept.sort();
    let mut expected = vec![a.clone(), c.clone()];
    expected.sort();
    assert_eq!(kept, expected, "B was the least recently used, not A");
    assert!(!kept.contains(&b));

    // Two more peers: the device holds at most 3 sessions in all, and the
    // least recently used one (A) goes first.
    for key in &keys[3..5] {
        let mut other = Peer::new(&m, &user, &device, key.key.key.as_bytes());
        let message = other.send(&m, &user, &device, "hi");
        decrypt(&m, &user, &device, other.curve25519(), &message, None)
            .await
            .unwrap();
    }
    let stamps = m.store().session_stamps(&dev).unwrap();
    assert_eq!(stamps.len(), 3, "{stamps:?}");
    assert!(
        !stamps.iter().any(|(_, id, _)| *id == a),
        "A outlived the bound"
    );
    assert!(stamps.iter().any(|(_, id, _)| *id == c));
    assert_eq!(m.stats().sessions_evicted, 2);
}

/// Issue 14, item 8: a device cached at a version another holder of the
/// store has since replaced (another manager on the same store rotated its
/// fallback key) loses its first write of a pre-key message to the
/// conflict; the manager reloads the device and decrypts the message again
/// (issue 15: it no longer needs the homeserver's retry). Without the
/// reload every later message for that device would fail the same way.
#[tokio::test]
async fn a_pre_key_message_on_a_stale_cached_account_reloads_and_decrypts() {
    use bridgekeys_store::{SledStore, SledStoreConfig};
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        SledStore::create(SledStoreConfig::new(
            dir.path().join("store"),
            StoreKey::generate(),
        ))
        .unwrap(),
    );
    let cached = AccountManager::new(store.clone(), ManagerConfig::default());
    let other = AccountManager::new(store, ManagerConfig::default());
    let (user, device) = puppet(&cached).await;
    // `cached` holds the device in memory from here on.
    let key = cached
        .claim(&user, &device, &SC, 1)
        .await
        .unwrap()
        .remove(0);
    other.rotate_fallback_key(&user, &device, 1).await.unwrap();

    let mut peer = Peer::new(&cached, &user, &device, key.key.key.as_bytes());
    let message = peer.send(&cached, &user, &device, "hello");
    let dev = DeviceKey::new(user.as_str(), device.as_str());
    assert_eq!(cached.store().count_one_time_keys(&dev).unwrap(), 1);
    let retry = decrypt(&cached, &user, &device, peer.curve25519(), &message, None)
        .await
        .expect("decrypted on the reloaded account");
    assert_eq!(
        cached.stats().session_conflicts,
        1,
        "the write on the stale account was refused once"
    );
    assert_eq!(retry.plaintext, b"hello");
    assert!(retry.new_session);
    assert_eq!(cached.store().count_one_time_keys(&dev).unwrap(), 0);
}
