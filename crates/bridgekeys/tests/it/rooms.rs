//! The facade's room encryption with ruma types: decrypting gives a typed
//! event and refuses (with no state change) another room and a replayed
//! index; encrypting never falls back to plaintext.
#![allow(clippy::unwrap_used)]

use std::{num::NonZeroUsize, sync::Arc};

use bridgekeys::{
    PuppetRooms, RoomCryptoError,
    appservice::{AsToken, HomeserverClient, ProvisionConfig, Provisioner, PuppetOlm, RoomStates},
    olm::{AccountManager, ManagerConfig, RotationSettings},
    ruma::{
        OwnedRoomId, RoomId, UserId, device_id,
        events::{
            AnyMessageLikeEvent, MessageLikeEvent,
            room::{encrypted::OriginalSyncRoomEncryptedEvent, message::RoomMessageEventContent},
        },
        room_id, user_id,
    },
    store::{PuppetRegistry, SledStore, SledStoreConfig, Store, StoreKey},
};
use serde_json::{Value, json};

struct Setup {
    _dir: tempfile::TempDir,
    manager: Arc<AccountManager>,
    rooms: Arc<RoomStates>,
    facade: PuppetRooms,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SledStore::create(SledStoreConfig::new(
            dir.path().join("store"),
            StoreKey::generate(),
        ))
        .unwrap(),
    );
    let manager = Arc::new(AccountManager::new(
        Arc::clone(&store) as Arc<dyn Store>,
        ManagerConfig::default(),
    ));
    manager
        .create_device(user_id!("@echo_bob:hs"), device_id!("BRIDGEKEYS"))
        .await
        .unwrap();
    // No homeserver is ever reached by these tests.
    let hs = || HomeserverClient::new("http://127.0.0.1:9", AsToken::new("unused")).unwrap();
    let rooms = Arc::new(RoomStates::new(
        Arc::clone(&store) as Arc<dyn Store>,
        NonZeroUsize::new(8).unwrap(),
    ));
    let olm = Arc::new(PuppetOlm::new(Arc::clone(&manager), hs()));
    let provisioner = Arc::new(Provisioner::new(
        hs(),
        Arc::clone(&manager),
        store as Arc<dyn PuppetRegistry>,
        ProvisionConfig::default(),
    ));
    let facade = PuppetRooms::new(olm, Arc::clone(&rooms), provisioner);
    Setup {
        _dir: dir,
        manager,
        rooms,
        facade,
    }
}

/// An `m.room.encrypted` event as a homeserver delivers it.
fn event(content: &Value, event_id: &str) -> OriginalSyncRoomEncryptedEvent {
    serde_json::from_value(json!({
        "type": "m.room.encrypted",
        "event_id": event_id,
        "sender": "@echo_bob:hs",
        "origin_server_ts": 1_700_000_000_000_u64,
        "content": content,
    }))
    .unwrap()
}

/// The puppet's own Megolm message (its session is also its own inbound
/// session), encrypted below the facade.
async fn puppet_message(manager: &AccountManager, room: &RoomId, body: &str) -> Value {
    let from = (user_id!("@echo_bob:hs"), device_id!("BRIDGEKEYS"));
    manager
        .prepare_group_session(from, room, RotationSettings::default(), &[])
        .await
        .unwrap();
    manager
        .encrypt_room_event(
            from,
            room,
            "m.room.message",
            &serde_json::to_value(RoomMessageEventContent::text_plain(body)).unwrap(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn decrypt_gives_a_ruma_event_and_refuses_another_room_and_a_replayed_index() {
    let s = setup().await;
    let room = room_id!("!dm:hs");
    let content = puppet_message(&s.manager, room, "hello").await;
    let delivered = event(&content, "$first");

    // Another room: refused, and nothing was recorded by the refusal.
    let other: OwnedRoomId = room_id!("!other:hs").to_owned();
    let err = s.facade.decrypt_room_event(&other, &delivered).unwrap_err();
    assert!(matches!(err, RoomCryptoError::Decrypt(_)), "{err}");

    let decrypted = s.facade.decrypt_room_event(room, &delivered).unwrap();
    assert_eq!(decrypted.message_index, 0);
    let Ok(AnyMessageLikeEvent::RoomMessage(MessageLikeEvent::Original(message))) =
        decrypted.event.deserialize()
    else {
        panic!("not a room message");
    };
    assert_eq!(message.content.body(), "hello");
    assert_eq!(message.event_id, "$first");
    assert_eq!(message.room_id, room);
    assert_eq!(message.sender, user_id!("@echo_bob:hs"));

    // The same event again (a retried transaction) decrypts again; the same
    // index under another event id is a replay and is refused.
    s.facade.decrypt_room_event(room, &delivered).unwrap();
    let replay = event(&content, "$replayed");
    let err = s.facade.decrypt_room_event(room, &replay).unwrap_err();
    assert!(matches!(err, RoomCryptoError::Decrypt(_)), "{err}");
}

#[tokio::test]
async fn encrypt_refuses_a_room_that_is_not_encrypted_or_not_megolm() {
    let s = setup().await;
    let puppet: &UserId = user_id!("@echo_bob:hs");
    let plain = room_id!("!plain:hs");
    let odd = room_id!("!odd:hs");
    let state = |room: &RoomId, event_type: &str, key: &str, content: Value| {
        serde_json::value::to_raw_value(&json!({
            "type": event_type, "state_key": key, "room_id": room,
            "sender": "@alice:hs", "event_id": "$s", "content": content,
        }))
        .map(bridgekeys::ruma::serde::Raw::from_json)
        .unwrap()
    };
    s.rooms
        .apply_events(&[
            state(
                plain,
                "m.room.member",
                "@echo_bob:hs",
                json!({"membership": "join"}),
            ),
            state(
                odd,
                "m.room.encryption",
                "",
                json!({"algorithm": "m.olm.v9"}),
            ),
        ])
        .await
        .unwrap();
    let text = RoomMessageEventContent::text_plain("secret");
    let err = s
        .facade
        .encrypt_room_event(puppet, plain, &text)
        .await
        .unwrap_err();
    assert!(matches!(err, RoomCryptoError::NotEncrypted { .. }), "{err}");
    let err = s
        .facade
        .encrypt_room_event(puppet, odd, &text)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RoomCryptoError::UnsupportedAlgorithm { .. }),
        "{err}"
    );
}
