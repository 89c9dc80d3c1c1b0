//! Room state when several bridge processes share one store (issue 15):
//! two `RoomStates` on one shared store stand for two processes, each with
//! its own cache.
//!
//! The homeserver sends each transaction to one process. A process that
//! kept its own copy of a room would miss what the other applied: the room
//! turning encrypted (it would send in the clear) or a member joining or
//! leaving (it would share the room key with the wrong members), and its
//! next write would put its stale copy back in the store. Each process
//! reads the record again on a shared store, and writes only over what it
//! read. The race between a read and a write is forced, not hoped for: an
//! [`Intercepted`] store runs the other process's write right before this
//! process's.
//!
//! On a shared [`MemoryStore`] and on two [`PgStore`]s over one real
//! PostgreSQL database.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
};

use bridgekeys_appservice::RoomStates;
use bridgekeys_olm::MEGOLM_ALGORITHM;
use bridgekeys_store::{
    Backend, PgStore, PgStoreConfig, Store, StoreKey,
    testing::{Intercepted, MemoryStore, Write},
};
use ruma::{RoomId, events::AnyTimelineEvent, serde::Raw};
use serde_json::json;

const ROOM: &str = "!shared:localhost";

fn event(event_type: &str, state_key: &str, content: serde_json::Value) -> Raw<AnyTimelineEvent> {
    serde_json::from_value(json!({
        "type": event_type,
        "room_id": ROOM,
        "sender": "@alice:localhost",
        "state_key": state_key,
        "event_id": format!("${event_type}{state_key}"),
        "origin_server_ts": 1,
        "content": content,
    }))
    .unwrap()
}

fn join(user: &str) -> Raw<AnyTimelineEvent> {
    event("m.room.member", user, json!({ "membership": "join" }))
}

fn rooms(store: Arc<dyn Store>) -> RoomStates {
    RoomStates::new(store, NonZeroUsize::new(16).unwrap())
}

fn members(rooms: &RoomStates) -> Vec<String> {
    let room = RoomId::parse(ROOM).unwrap();
    let mut members: Vec<String> = rooms
        .get(&room)
        .unwrap()
        .unwrap()
        .recipients()
        .iter()
        .map(|u| u.to_string())
        .collect();
    members.sort();
    members
}

fn encrypted(rooms: &RoomStates) -> bool {
    let room = RoomId::parse(ROOM).unwrap();
    rooms.get(&room).unwrap().unwrap().is_encrypted()
}

async fn what_one_process_applies_the_other_sees_and_keeps(
    first: Arc<dyn Backend>,
    second: Arc<dyn Backend>,
) {
    let racing = Arc::new(Intercepted::new(first));
    let a = rooms(Arc::clone(&racing) as Arc<dyn Store>);
    let b = Arc::new(rooms(second as Arc<dyn Store>));

    // `b` handles a join and keeps the room in its cache.
    b.apply_events(&[join("@bob:localhost")]).await.unwrap();
    assert!(!encrypted(&b));
    // The next transaction, which turns the room encrypted, goes to `a`.
    a.apply_events(&[event(
        "m.room.encryption",
        "",
        json!({ "algorithm": MEGOLM_ALGORITHM }),
    )])
    .await
    .unwrap();
    assert!(
        encrypted(&b),
        "b would send in the clear in an encrypted room"
    );
    assert_eq!(members(&b), ["@bob:localhost"]);

    // The next one, a join, goes to `b`: encryption must stay on in the
    // store, and `a` must see the new member.
    b.apply_events(&[join("@carol:localhost")]).await.unwrap();
    assert!(
        encrypted(&a),
        "b's write turned encryption off in the store"
    );
    assert_eq!(
        members(&a),
        ["@bob:localhost", "@carol:localhost"],
        "a would not share the room key with carol"
    );

    // A write by `b` right between `a`'s read and its write: both stay.
    let pending_b = Mutex::new(Some(Arc::clone(&b)));
    let handle = tokio::runtime::Handle::current();
    racing.intercept(move |write| {
        if !matches!(write, Write::RoomState(_)) {
            return Ok(());
        }
        let taken = pending_b.lock().unwrap().take();
        if let Some(b) = taken {
            let handle = handle.clone();
            std::thread::spawn(move || handle.block_on(b.apply_events(&[join("@dave:localhost")])))
                .join()
                .unwrap()
                .unwrap();
        }
        Ok(())
    });
    a.apply_events(&[join("@erin:localhost")]).await.unwrap();
    racing.clear();
    let expected = [
        "@bob:localhost",
        "@carol:localhost",
        "@dave:localhost",
        "@erin:localhost",
    ];
    assert_eq!(members(&a), expected, "a's write lost b's join");
    assert_eq!(members(&b), expected);
    assert!(encrypted(&a) && encrypted(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_each_process_sees_and_keeps_what_the_other_applied_to_a_room() {
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    what_one_process_applies_the_other_sees_and_keeps(Arc::clone(&store), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_each_process_sees_and_keeps_what_the_other_applied_to_a_room() {
    let server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database("shared_rooms").await.unwrap();
    let key = StoreKey::generate();
    let first: Arc<dyn Backend> =
        Arc::new(PgStore::create(PgStoreConfig::new(&url, key.clone())).unwrap());
    let second: Arc<dyn Backend> = Arc::new(PgStore::open(PgStoreConfig::new(&url, key)).unwrap());
    what_one_process_applies_the_other_sees_and_keeps(first, second).await;
}
