//! An encrypted message that reaches the bridge before its room key is
//! echoed once the key arrives: the bridge holds the event it cannot
//! decrypt yet instead of dropping it. Synapse alone decides in which
//! transaction a to-device message and a room event go, so a reordering
//! proxy between Synapse and the bridge makes the bad order certain.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use crate::common::{
    Answer, BOB, Deployment, Exchange, Hook, PASSWORD, Proxy, TIMEOUT, Upstream, client, echo_of,
    hook,
};
use bridgekeys_testkit::{Method, NewRoom, RoomMessageQuery, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Where Synapse puts to-device messages in a transaction (MSC4203's
/// unstable name, and the stable one).
const TO_DEVICE_KEYS: [&str; 2] = ["de.sorunome.msc2409.to_device", "to_device"];
const TRANSACTIONS: &str = "/_matrix/app/v1/transactions/";
/// The id of a transaction the proxy makes starts so.
const RELEASED: &str = "held-by-test-proxy-after-";

/// One transaction the proxy delivered to the bridge, and the answer.
#[derive(Clone, Debug)]
struct Delivery {
    /// Synapse's, or one the proxy made for the held to-device messages
    /// ([`RELEASED`] and Synapse's id).
    txn_id: String,
    /// Event ids of the `m.room.encrypted` room events in it.
    encrypted_room_events: Vec<String>,
    /// (sender, sender_key) of the `m.room.encrypted` to-device messages.
    encrypted_to_device: Vec<(String, String)>,
    status: StatusCode,
}

impl Delivery {
    fn of(txn_id: &str, body: &Value, status: StatusCode) -> Self {
        let encrypted = |e: &&Value| e["type"] == "m.room.encrypted";
        Self {
            txn_id: txn_id.to_owned(),
            encrypted_room_events: body["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(encrypted)
                .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
                .collect(),
            encrypted_to_device: TO_DEVICE_KEYS
                .iter()
                .flat_map(|key| body[*key].as_array().into_iter().flatten())
                .filter(encrypted)
                .map(|e| {
                    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                    (text(&e["sender"]), text(&e["content"]["sender_key"]))
                })
                .collect(),
            status,
        }
    }
}

#[derive(Default)]
struct State {
    /// Encrypted to-device messages held back, with the key they came under.
    held: Vec<(&'static str, Value)>,
    /// Whether a transaction with an encrypted room event was delivered
    /// (then the held messages went too, and nothing is held any more).
    room_event_delivered: bool,
    deliveries: Vec<Delivery>,
}

/// Between Synapse and the bridge (appservice API): in each transaction
/// from Synapse, room events go on at once, and `m.room.encrypted`
/// to-device messages (room keys come so) are held back until a
/// transaction with an `m.room.encrypted` room event has been delivered;
/// then they follow in a transaction of their own (a fresh id). Synapse
/// gets its answer once the bridge answered. Everything else passes.
#[derive(Default)]
struct KeysAfterEvents {
    state: tokio::sync::Mutex<State>,
}

impl KeysAfterEvents {
    fn hook(self: &Arc<Self>) -> Hook {
        let this = self.clone();
        hook(move |exchange: Exchange, upstream: Upstream| {
            let this = this.clone();
            async move { this.deliver(exchange, upstream).await }
        })
    }

    async fn deliver(&self, exchange: Exchange, upstream: Upstream) -> anyhow::Result<Answer> {
        let path = exchange.path.split('?').next().unwrap_or_default();
        let Some(txn_id) = path.strip_prefix(TRANSACTIONS).map(str::to_owned) else {
            return upstream.forward(&exchange).await;
        };
        if exchange.method != Method::PUT {
            return upstream.forward(&exchange).await;
        }
        // One transaction at a time (Synapse sends them so anyway).
        let mut state = self.state.lock().await;
        let mut body = exchange.json()?;
        if !state.room_event_delivered {
            for key in TO_DEVICE_KEYS {
                let Some(list) = body.get_mut(key).and_then(Value::as_array_mut) else {
                    continue;
                };
                let (encrypted, rest): (Vec<Value>, Vec<Value>) = list
                    .drain(..)
                    .partition(|e| e["type"] == "m.room.encrypted");
                *list = rest;
                for message in encrypted {
                    // A retried transaction brings them again.
                    if !state.held.iter().any(|(_, m)| *m == message) {
                        state.held.push((key, message));
                    }
                }
            }
        }
        let forwarded = Exchange {
            body: serde_json::to_vec(&body)?.into(),
            ..exchange.clone()
        };
        let answer = upstream.forward(&forwarded).await?;
        let delivery = Delivery::of(&txn_id, &body, answer.status);
        let has_room_event = !delivery.encrypted_room_events.is_empty();
        state.deliveries.push(delivery);
        if !answer.status.is_success() || state.room_event_delivered || !has_room_event {
            return Ok(answer);
        }
        if !state.held.is_empty() {
            let mut released = json!({ "events": [] });
            for (key, message) in &state.held {
                let list = released[*key].as_array_mut().map(std::mem::take);
                let mut list = list.unwrap_or_default();
                list.push(message.clone());
                released[*key] = Value::Array(list);
            }
            let txn_id = format!("{RELEASED}{txn_id}");
            let release = Exchange {
                method: Method::PUT,
                path: format!("{TRANSACTIONS}{txn_id}"),
                headers: exchange.headers.clone(),
                body: serde_json::to_vec(&released)?.into(),
            };
            let released_answer = upstream.forward(&release).await?;
            state
                .deliveries
                .push(Delivery::of(&txn_id, &released, released_answer.status));
            if !released_answer.status.is_success() {
                // Synapse retries its transaction; they go again then.
                return Ok(released_answer);
            }
            state.held.clear();
        }
        state.room_event_delivered = true;
        Ok(answer)
    }

    async fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().await.deliveries.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_message_delivered_before_its_room_key_is_echoed_once_the_key_arrives() {
    let dir = tempfile::tempdir().unwrap();
    // Synapse reaches the appservice at the proxy; the proxy, the bridge.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut deployment = Deployment::init(dir.path(), Some(listener.local_addr().unwrap()))
        .await
        .unwrap();
    let reorder = Arc::new(KeysAfterEvents::default());
    let _proxy = Proxy::start_on(listener, Upstream(deployment.bridge_addr), reorder.hook());
    deployment.start_bridge().await.unwrap();

    deployment
        .synapse
        .register_user("alice", PASSWORD)
        .await
        .unwrap();
    let (mut phone, device) = client(&deployment.synapse, "@alice:localhost").await;
    let alice_key = device.curve25519;
    let room = phone
        .create_room(&NewRoom::encrypted_dm(BOB))
        .await
        .unwrap();
    assert!(phone.wait_joined(&room, BOB, TIMEOUT).await.unwrap());

    // The client's first message in the room: nio sends the room key to
    // the puppet's device (Olm, to-device), then the message (Megolm).
    let sent = phone.room_send(&room, "hello").await.unwrap();
    assert!(sent.encrypted);
    assert!(
        sent.shared_with.iter().any(|d| d.user_id == BOB),
        "nio did not share its room key with the puppet: {sent:?}"
    );
    let echo = echo_of(&mut phone, &room, "hello", false).await;
    assert!(echo.decrypted);

    // The bridge got the message before the key: the proxy delivered the
    // event, and only after the bridge had answered for it, the key.
    let deliveries = reorder.deliveries().await;
    let event_at = deliveries
        .iter()
        .position(|d| d.encrypted_room_events.contains(&sent.event_id))
        .unwrap_or_else(|| panic!("the message never went to the bridge: {deliveries:#?}"));
    let from_alice = |d: &Delivery| {
        d.encrypted_to_device
            .iter()
            .any(|(sender, key)| sender == "@alice:localhost" && *key == alice_key)
    };
    let key_at = deliveries
        .iter()
        .position(from_alice)
        .unwrap_or_else(|| panic!("the room key never went to the bridge: {deliveries:#?}"));
    assert!(
        event_at < key_at,
        "the room key went before the message: {deliveries:#?}"
    );
    assert!(deliveries[event_at].status.is_success());
    assert!(
        deliveries[key_at].txn_id.starts_with(RELEASED),
        "the room key was not held back by the proxy: {deliveries:#?}"
    );

    eprintln!("transactions as the bridge got them: {deliveries:#?}");

    // Later messages pass in Synapse's order and are echoed as usual.
    phone.room_send(&room, "again").await.unwrap();
    let next = phone
        .wait_room_message(&RoomMessageQuery::in_room(&room).sent_by(BOB), TIMEOUT)
        .await
        .unwrap()
        .expect("an echo of \"again\"");
    assert_eq!(next.body, "echo: again", "{next:?}");
    assert!(next.decrypted);
    phone.quit().await.unwrap();
}
