//! Inbound Megolm: room keys from verified Olm payloads, room events they
//! decrypt, and every refusal (room, sender, replay, worse copy) leaving
//! nothing behind.
#![allow(clippy::unwrap_used)]

mod common;

use bridgekeys_olm::{
    AccountManager, ManagerConfig, MegolmError, OlmError, RoomKeyOutcome,
    canonical_json_for_signing,
};
use bridgekeys_store::StoreKey;
use common::{Peer, alice, manager, peer_user};
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
