//! Inbound Megolm: room keys from verified Olm payloads, room events they
//! decrypt, and every refusal (room, sender, replay, worse copy) leaving
//! nothing behind.

use crate::common::{Peer, alice, manager, peer_user};
use bridgekeys_olm::{
    AccountManager, ManagerConfig, MegolmError, OlmError, RoomKeyOutcome,
    canonical_json_for_signing,
};
use bridgekeys_store::StoreKey;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, RoomId, room_id};
use serde_json::{Value, json};
use vodozemac::megolm::{GroupSession, SessionConfig, SessionKey};

struct Room {
    m: AccountManager,
    puppet: (OwnedUserId, OwnedDeviceId),
    peer: Peer,
    group: GroupSession,
    _dir: tempfile::TempDir,
}

impl Room {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
        let (user, device) = alice();
        m.create_device(&user, &device).await.unwrap();
        let key = m
            .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await
            .unwrap()
            .remove(0);
        let peer = Peer::new(&m, &user, &device, key.key.key.as_bytes());
        Self {
            m,
            puppet: (user, device),
            peer,
            group: GroupSession::new(SessionConfig::version_1()),
            _dir: dir,
        }
    }

    fn room() -> &'static RoomId {
        room_id!("!dm:example.org")
    }

    /// The peer shares `key` for `room` in an Olm message; the puppet
    /// decrypts it and stores the room key.
    async fn share(
        &mut self,
        room: &RoomId,
        key: &SessionKey,
        session_id: &str,
    ) -> Result<RoomKeyOutcome, OlmError> {
        let identity = self
            .m
            .identity_keys(&self.puppet.0, &self.puppet.1)
            .unwrap();
        let payload = json!({
            "type": "m.room_key",
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2", "room_id": room,
                "session_id": session_id, "session_key": key.to_base64(),
            },
            "sender": peer_user(), "sender_device": "PEERDEV",
            "recipient": self.puppet.0,
            "recipient_keys": {"ed25519": identity.ed25519.to_base64()},
            "keys": {"ed25519": self.peer.account.ed25519_key().to_base64()},
        });
        let message = self.peer.session.encrypt(payload.to_string()).unwrap();
        let olm = self
            .m
            .decrypt_olm(
                (&self.puppet.0, &self.puppet.1),
                peer_user(),
                self.peer.curve25519(),
                &message,
                None,
            )
            .await
            .unwrap();
        self.m.receive_room_key(&olm).await
    }

    async fn share_current(&mut self) -> RoomKeyOutcome {
        let key = self.group.session_key();
        let id = self.group.session_id();
        self.share(Self::room(), &key, &id).await.unwrap()
    }

    /// An `m.room.encrypted` content carrying `body`, with `room` inside
    /// the plaintext.
    fn encrypt(&mut self, room: &RoomId, body: &str) -> Value {
        let plaintext = json!({
            "type": "m.room.message", "room_id": room,
            "content": {"msgtype": "m.text", "body": body},
        });
        let message = self.group.encrypt(plaintext.to_string());
        json!({
            "algorithm": "m.megolm.v1.aes-sha2",
            "ciphertext": message.to_base64(),
            "session_id": self.group.session_id(),
            "sender_key": self.peer.curve25519().to_base64(),
            "device_id": "PEERDEV",
        })
    }

    fn decrypt(
        &self,
        room: &RoomId,
        sender: &ruma::UserId,
        event_id: &str,
        content: &Value,
    ) -> Result<String, OlmError> {
        let raw = serde_json::value::to_raw_value(content).unwrap();
        let event = self.m.decrypt_room_event(room, sender, event_id, &raw)?;
        assert_eq!(event.event_type, "m.room.message");
        let inner: Value = serde_json::from_str(event.content.get()).unwrap();
        Ok(inner["body"].as_str().unwrap().to_owned())
    }
}

fn megolm_err(result: Result<String, OlmError>) -> MegolmError {
    match result {
        Err(OlmError::Megolm(e)) => e,
        other => panic!("expected a Megolm refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_shared_room_key_decrypts_the_rooms_events_and_survives_a_restart_of_the_manager() {
    let mut r = Room::new().await;
    assert_eq!(r.share_current().await, RoomKeyOutcome::Stored);
    let first = r.encrypt(Room::room(), "hello");
    let second = r.encrypt(Room::room(), "again");
    assert_eq!(
        r.decrypt(Room::room(), peer_user(), "$1", &first).unwrap(),
        "hello"
    );
    assert_eq!(
        r.decrypt(Room::room(), peer_user(), "$2", &second).unwrap(),
        "again"
    );
    // The same event delivered again (a retried transaction) still decrypts.
    assert_eq!(
        r.decrypt(Room::room(), peer_user(), "$1", &first).unwrap(),
        "hello"
    );
    assert_eq!(r.m.stats().room_events_decrypted, 3);
    // A new manager on the same store knows the session.
    let store = r.m.store().clone();
    let fresh = AccountManager::new(store, ManagerConfig::default());
    let raw = serde_json::value::to_raw_value(&r.encrypt(Room::room(), "third")).unwrap();
    let event = fresh
        .decrypt_room_event(Room::room(), peer_user(), "$3", &raw)
        .unwrap();
    assert_eq!(event.message_index, 2);
}

#[tokio::test]
async fn every_refusal_leaves_the_index_free_for_the_real_event() {
    let mut r = Room::new().await;
    r.share_current().await;
    let event = r.encrypt(Room::room(), "hello");

    // Another room: no session there.
    let other_room = room_id!("!elsewhere:example.org");
    assert_eq!(
        megolm_err(r.decrypt(other_room, peer_user(), "$a", &event)),
        MegolmError::UnknownSession
    );
    // Another sender than the user who shared the session.
    let mallory = ruma::user_id!("@mallory:example.org");
    assert_eq!(
        megolm_err(r.decrypt(Room::room(), mallory, "$a", &event)),
        MegolmError::SenderMismatch
    );
    // A content claiming another sender key.
    let mut claimed = event.clone();
    claimed["sender_key"] = json!(vodozemac::olm::Account::new().curve25519_key().to_base64());
    assert_eq!(
        megolm_err(r.decrypt(Room::room(), peer_user(), "$a", &claimed)),
        MegolmError::SenderMismatch
    );
    // None of these used index 0: the real event decrypts.
    assert_eq!(
        r.decrypt(Room::room(), peer_user(), "$a", &event).unwrap(),
        "hello"
    );
    // The same index under another event id is a replay.
    assert_eq!(
        megolm_err(r.decrypt(Room::room(), peer_user(), "$b", &event)),
        MegolmError::Replay(0)
    );
    // A ciphertext made for another room (its plaintext says so) presented
    // in this one.
    let smuggled = r.encrypt(other_room, "for elsewhere");
    assert_eq!(
        megolm_err(r.decrypt(Room::room(), peer_user(), "$c", &smuggled)),
        MegolmError::RoomMismatch
    );
    // That refusal recorded nothing either; the next real event (index 2)
    // decrypts.
    let next = r.encrypt(Room::room(), "next");
    assert_eq!(
        r.decrypt(Room::room(), peer_user(), "$d", &next).unwrap(),
        "next"
    );
    assert_eq!(r.m.stats().room_events_refused, 5);
}

#[tokio::test]
async fn a_better_copy_replaces_a_worse_one_never_the_reverse() {
    let mut r = Room::new().await;
    let from_start = r.group.session_key();
    let early = r.encrypt(Room::room(), "early");
    let later_key = r.group.session_key();
    let id = r.group.session_id();
    // The copy that starts at index 1 cannot read index 0.
    assert_eq!(
        r.share(Room::room(), &later_key, &id).await.unwrap(),
        RoomKeyOutcome::Stored
    );
    assert!(matches!(
        megolm_err(r.decrypt(Room::room(), peer_user(), "$e", &early)),
        MegolmError::Decryption(_)
    ));
    // The better copy replaces it; the worse one never comes back.
    assert_eq!(
        r.share(Room::room(), &from_start, &id).await.unwrap(),
        RoomKeyOutcome::Improved
    );
    assert_eq!(
        r.share(Room::room(), &later_key, &id).await.unwrap(),
        RoomKeyOutcome::Kept
    );
    assert_eq!(
        r.decrypt(Room::room(), peer_user(), "$e", &early).unwrap(),
        "early"
    );
}

#[tokio::test]
async fn a_room_key_whose_id_is_not_its_own_or_that_is_malformed_is_refused() {
    let mut r = Room::new().await;
    let key = r.group.session_key();
    let other = GroupSession::new(SessionConfig::version_1()).session_id();
    assert!(matches!(
        r.share(Room::room(), &key, &other).await,
        Err(OlmError::Megolm(MegolmError::SessionIdMismatch))
    ));
    let event = r.encrypt(Room::room(), "x");
    assert_eq!(
        megolm_err(r.decrypt(Room::room(), peer_user(), "$x", &event)),
        MegolmError::UnknownSession
    );
    assert_eq!(r.m.stats().room_keys_stored, 0);
}

#[tokio::test]
async fn a_tracked_sender_must_own_the_sessions_key() {
    let mut r = Room::new().await;
    r.share_current().await;
    // The sender's devices become tracked, and none has the session's key.
    let stranger = vodozemac::olm::Account::new();
    let mut keys = json!({
        "user_id": peer_user(), "device_id": "OTHER",
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {
            "curve25519:OTHER": stranger.curve25519_key().to_base64(),
            "ed25519:OTHER": stranger.ed25519_key().to_base64(),
        },
    });
    let signature = stranger.sign(canonical_json_for_signing(&keys).unwrap());
    keys["signatures"] =
        json!({ peer_user().as_str(): { "ed25519:OTHER": signature.to_base64() } });
    let listed = std::collections::BTreeMap::from([(
        OwnedDeviceId::from("OTHER"),
        serde_json::from_value(keys).unwrap(),
    )]);
    r.m.update_tracked_devices(peer_user(), &listed)
        .await
        .unwrap();
    let event = r.encrypt(Room::room(), "hello");
    assert_eq!(
        megolm_err(r.decrypt(Room::room(), peer_user(), "$t", &event)),
        MegolmError::SenderMismatch
    );
}

mod outbound {
    use super::*;
    use bridgekeys_olm::{GroupRecipient, RotationSettings};
    use vodozemac::megolm::{InboundGroupSession, MegolmMessage};

    fn recipient(user: &str, device: &str) -> GroupRecipient {
        GroupRecipient {
            user_id: OwnedUserId::try_from(user).unwrap(),
            device_id: device.into(),
            curve25519: vodozemac::olm::Account::new().curve25519_key().to_base64(),
        }
    }

    fn room() -> &'static RoomId {
        room_id!("!out:example.org")
    }

    /// What a member's client does with the shared key and a message.
    fn member_reads(room_key: &str, content: &Value) -> (u32, Value) {
        let key: Value = serde_json::from_str(room_key).unwrap();
        let session_key = SessionKey::from_base64(key["session_key"].as_str().unwrap()).unwrap();
        let mut inbound = InboundGroupSession::new(&session_key, SessionConfig::version_1());
        assert_eq!(key["session_id"], content["session_id"]);
        let message = MegolmMessage::from_base64(content["ciphertext"].as_str().unwrap()).unwrap();
        let decrypted = inbound.decrypt(&message).unwrap();
        (
            decrypted.message_index,
            serde_json::from_slice(&decrypted.plaintext).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_room_session_is_shared_once_per_device_rotated_when_a_device_goes_and_never_reuses_an_index()
     {
        let r = Room::new().await;
        let from = (r.puppet.0.as_ref(), r.puppet.1.as_ref());
        let err =
            r.m.encrypt_room_event(from, room(), "m.room.message", &json!({}))
                .await
                .unwrap_err();
        assert!(matches!(err, OlmError::NoGroupSession), "{err}");

        let (a, b) = (recipient("@a:x", "A"), recipient("@b:x", "B"));
        let settings = RotationSettings::default();
        let first =
            r.m.prepare_group_session(from, room(), settings, &[a.clone(), b.clone()])
                .await
                .unwrap();
        assert!(first.rotated);
        assert_eq!(first.needs_key, vec![a.clone(), b.clone()]);
        r.m.mark_group_session_shared(from, room(), &first.session_id, std::slice::from_ref(&a))
            .await
            .unwrap();
        // Only B still needs it; a new device C too.
        let c = recipient("@a:x", "C");
        let again =
            r.m.prepare_group_session(from, room(), settings, &[a.clone(), b.clone(), c.clone()])
                .await
                .unwrap();
        assert!(!again.rotated);
        assert_eq!(again.session_id, first.session_id);
        // Sorted by user then device: @a:x's C, then @b:x's B.
        assert_eq!(again.needs_key, vec![c.clone(), b.clone()]);
        r.m.mark_group_session_shared(from, room(), &first.session_id, &[b.clone(), c.clone()])
            .await
            .unwrap();

        let mut indexes = Vec::new();
        for n in 0..3 {
            let content =
                r.m.encrypt_room_event(from, room(), "m.room.message", &json!({"n": n}))
                    .await
                    .unwrap();
            let (index, plaintext) = member_reads(&first.room_key, &content);
            assert_eq!(plaintext["content"], json!({"n": n}));
            assert_eq!(plaintext["room_id"], json!(room()));
            indexes.push(index);
        }
        // A new manager on the same store (a restart) goes on from the
        // stored index.
        let fresh = AccountManager::new(r.m.store().clone(), ManagerConfig::default());
        let content = fresh
            .encrypt_room_event(from, room(), "m.room.message", &json!({"n": 3}))
            .await
            .unwrap();
        indexes.push(member_reads(&first.room_key, &content).0);
        assert_eq!(indexes, vec![0, 1, 2, 3], "an index was reused or skipped");
        // The puppet's own copy reads it too.
        let raw = serde_json::value::to_raw_value(&content).unwrap();
        let own = fresh
            .decrypt_room_event(room(), &r.puppet.0, "$own", &raw)
            .unwrap();
        assert_eq!(own.message_index, 3);

        // Device B disappears (or its user left): the next message rotates.
        let after = fresh
            .prepare_group_session(from, room(), settings, &[a.clone(), c.clone()])
            .await
            .unwrap();
        assert!(after.rotated);
        assert_ne!(after.session_id, first.session_id);
        assert_eq!(after.needs_key, vec![a, c]);
    }

    #[tokio::test]
    async fn a_session_rotates_after_its_message_budget() {
        let r = Room::new().await;
        let from = (r.puppet.0.as_ref(), r.puppet.1.as_ref());
        let settings = RotationSettings {
            period_msgs: 2,
            ..RotationSettings::default()
        };
        let a = recipient("@a:x", "A");
        let mut ids = Vec::new();
        for n in 0..5 {
            let prepared =
                r.m.prepare_group_session(from, room(), settings, std::slice::from_ref(&a))
                    .await
                    .unwrap();
            r.m.mark_group_session_shared(from, room(), &prepared.session_id, &prepared.needs_key)
                .await
                .unwrap();
            r.m.encrypt_room_event(from, room(), "m.room.message", &json!({"n": n}))
                .await
                .unwrap();
            ids.push(prepared.session_id);
        }
        assert_eq!(ids[0], ids[1]);
        assert_ne!(ids[1], ids[2]);
        assert_eq!(ids[2], ids[3]);
        assert_ne!(ids[3], ids[4]);
        assert_eq!(r.m.stats().group_sessions_created, 3);
        assert_eq!(
            RotationSettings::from_encryption_content(
                &json!({"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_msgs": 10})
            ),
            RotationSettings {
                period_ms: RotationSettings::default().period_ms,
                period_msgs: 10
            }
        );
    }
}
