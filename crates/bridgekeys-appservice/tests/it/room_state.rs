//! Durable room state through the listener: the state events of a
//! transaction are applied before the handler runs, survive a restart, and
//! memory stays bounded.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
};

use crate::common::{authed, call, config, json_body, store_key};
use axum::http::{Method, StatusCode};
use bridgekeys_appservice::{
    Appservice, BridgeHandler, HandlerError, Limits, RoomStates, Transaction, UserDecision,
};
use bridgekeys_olm::{AccountManager, MEGOLM_ALGORITHM, ManagerConfig};
use bridgekeys_store::{SledStore, SledStoreConfig, Store, TransactionLog};
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

const ROOM: &str = "!dm:localhost";

fn state_event(event_type: &str, state_key: &str, content: Value, n: usize) -> Value {
    json!({
        "type": event_type,
        "room_id": ROOM,
        "sender": "@alice:localhost",
        "state_key": state_key,
        "event_id": format!("$state{n}"),
        "origin_server_ts": 1,
        "content": content,
    })
}

/// Records, inside each transaction, what the room state said then.
struct Observer {
    rooms: Arc<RoomStates>,
    seen: Mutex<Vec<(bool, Vec<String>)>>,
}

impl BridgeHandler for Observer {
    async fn transaction(&self, _t: &Transaction) -> Result<(), HandlerError> {
        let room = RoomId::parse(ROOM).map_err(|e| HandlerError::new(e.to_string()))?;
        let state = self
            .rooms
            .get(&room)
            .map_err(|e| HandlerError::new(e.to_string()))?
            .unwrap_or_default();
        let recipients = state.recipients().iter().map(|u| u.to_string()).collect();
        self.seen
            .lock()
            .unwrap()
            .push((state.is_encrypted(), recipients));
        Ok(())
    }

    async fn query_user(&self, _user_id: &UserId) -> Result<UserDecision, HandlerError> {
        Ok(UserDecision::Reject)
    }
}

struct Bridge {
    rooms: Arc<RoomStates>,
    handler: Arc<Observer>,
    router: axum::Router,
}

fn open(dir: &std::path::Path, cache_rooms: usize) -> Bridge {
    let store = Arc::new(
        SledStore::open_or_create(SledStoreConfig::new(dir.join("store"), store_key())).unwrap(),
    );
    let manager = Arc::new(AccountManager::new(
        Arc::clone(&store) as Arc<dyn Store>,
        ManagerConfig::default(),
    ));
    let rooms = Arc::new(RoomStates::new(
        Arc::clone(&store) as Arc<dyn Store>,
        NonZeroUsize::new(cache_rooms).unwrap(),
    ));
    let handler = Arc::new(Observer {
        rooms: Arc::clone(&rooms),
        seen: Mutex::default(),
    });
    let appservice = Appservice::new(
        config(Limits::default()),
        manager,
        store as Arc<dyn TransactionLog>,
        Arc::clone(&handler),
    )
    .unwrap()
    .with_room_states(Arc::clone(&rooms));
    Bridge {
        rooms,
        handler,
        router: appservice.router(),
    }
}

async fn put(bridge: &Bridge, txn: &str, events: Vec<Value>) {
    let (status, body) = call(
        &bridge.router,
        authed(
            Method::PUT,
            &format!("/_matrix/app/v1/transactions/{txn}"),
            json_body(&json!({ "events": events })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_transactions_state_events_are_seen_by_its_own_handler_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let room = RoomId::parse(ROOM).unwrap();
    {
        let bridge = open(dir.path(), 16);
        put(
            &bridge,
            "1",
            vec![
                state_event(
                    "m.room.member",
                    "@alice:localhost",
                    json!({"membership": "join"}),
                    1,
                ),
                state_event(
                    "m.room.member",
                    "@echo_bob:localhost",
                    json!({"membership": "invite"}),
                    2,
                ),
                state_event(
                    "m.room.encryption",
                    "",
                    json!({"algorithm": MEGOLM_ALGORITHM, "rotation_period_msgs": 10}),
                    3,
                ),
                // Not state (no state key): ignored.
                json!({"type": "m.room.member", "room_id": ROOM, "sender": "@x:localhost",
                       "event_id": "$m", "content": {"membership": "join"}}),
            ],
        )
        .await;
        // The handler of the same transaction already saw the room encrypted.
        assert_eq!(
            bridge.handler.seen.lock().unwrap().clone(),
            vec![(
                true,
                vec![
                    "@alice:localhost".to_owned(),
                    "@echo_bob:localhost".to_owned()
                ]
            )]
        );
        put(
            &bridge,
            "2",
            vec![
                state_event(
                    "m.room.member",
                    "@echo_bob:localhost",
                    json!({"membership": "join"}),
                    4,
                ),
                state_event(
                    "m.room.member",
                    "@alice:localhost",
                    json!({"membership": "leave"}),
                    5,
                ),
                // An encryption event without an algorithm never turns
                // encryption off.
                state_event("m.room.encryption", "", json!({}), 6),
            ],
        )
        .await;
        let state = bridge.rooms.get(&room).unwrap().unwrap();
        assert!(state.is_encrypted());
        assert_eq!(
            state
                .recipients()
                .iter()
                .map(|u| u.as_str())
                .collect::<Vec<_>>(),
            ["@echo_bob:localhost"]
        );
        assert!(!state.complete, "built from transactions only");
    }
    // A new process over the same store knows the room without asking.
    let bridge = open(dir.path(), 16);
    let state = bridge
        .rooms
        .get(&room)
        .unwrap()
        .expect("the record is on disk");
    assert!(state.is_encrypted());
    assert_eq!(
        state.encryption.as_ref().map(|e| e.rotation().period_msgs),
        Some(10)
    );
    assert_eq!(
        state.joined().map(|u| u.as_str()).collect::<Vec<_>>(),
        ["@echo_bob:localhost"]
    );
    assert_eq!(bridge.rooms.rooms().unwrap(), vec![room.clone()]);
    bridge.rooms.forget(&room).await.unwrap();
    assert!(bridge.rooms.get(&room).unwrap().is_none());
}

#[tokio::test]
async fn memory_holds_at_most_the_configured_rooms_and_the_rest_is_read_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = open(dir.path(), 2);
    let events: Vec<Value> = (0..5)
        .map(|i| {
            json!({
                "type": "m.room.encryption", "state_key": "", "room_id": format!("!r{i}:localhost"),
                "sender": "@alice:localhost", "event_id": format!("$e{i}"),
                "content": {"algorithm": MEGOLM_ALGORITHM},
            })
        })
        .collect();
    put(&bridge, "1", events).await;
    assert!(bridge.rooms.cached_rooms() <= 2);
    for i in 0..5 {
        let room = RoomId::parse(format!("!r{i}:localhost")).unwrap();
        assert!(bridge.rooms.get(&room).unwrap().unwrap().is_encrypted());
        assert!(bridge.rooms.cached_rooms() <= 2);
    }
    assert_eq!(bridge.rooms.rooms().unwrap().len(), 5);
}
