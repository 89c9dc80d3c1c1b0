//! Transactions: everything is handed over, each id is processed once (also
//! when the duplicate arrives mid-flight or after a restart), failures make
//! the homeserver retry, and pre-key messages to puppets arrive decrypted.

use std::sync::{Arc, atomic::Ordering};

use crate::common::*;
use axum::http::{Method, StatusCode};
use bridgekeys_appservice::{Limits, paths};
use bridgekeys_olm::vodozemac::{
    Curve25519PublicKey,
    olm::{Account, OlmMessage, SessionConfig},
};
use bridgekeys_store::{DeviceKey, Store, TransactionLog};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

fn txn_path(id: &str) -> String {
    format!("/_matrix/app/v1/transactions/{id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_of_a_transaction_reaches_the_handler_under_stable_and_unstable_names() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let body = json!({
        "events": [{"type": "m.room.message", "event_id": "$1"}, {"type": "m.room.member", "event_id": "$2"}],
        "ephemeral": [{"type": "m.typing"}],
        "de.sorunome.msc2409.ephemeral": [{"type": "m.receipt"}],
        "de.sorunome.msc2409.to_device": [
            {"to_user_id": "@echo_0:localhost", "to_device_id": "PUPPETDEV", "type": "m.room_key_request", "sender": "@alice:localhost", "content": {}}
        ],
        "to_device": [
            {"to_user_id": "@echo_0:localhost", "to_device_id": "PUPPETDEV", "type": "m.dummy", "sender": "@alice:localhost", "content": {}}
        ],
        "org.matrix.msc3202.device_one_time_keys_count": {"@echo_0:localhost": {"PUPPETDEV": {"signed_curve25519": 0}}},
        "org.matrix.msc3202.device_unused_fallback_key_types": {"@echo_0:localhost": {"PUPPETDEV": []}},
        "org.matrix.msc3202.device_lists": {"changed": ["@alice:localhost"], "left": ["@bob:localhost"]},
    });
    let (status, resp) = fx.put_transaction("t1", &body).await;
    assert_eq!((status, resp), (StatusCode::OK, json!({})));
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.txn_id, "t1");
    assert_eq!(seen.events, 2);
    assert_eq!(seen.ephemeral, 2);
    let types: Vec<_> = seen
        .other_to_device
        .iter()
        .map(|(t, _)| t.as_str())
        .collect();
    assert_eq!(types, ["m.room_key_request", "m.dummy"]);
    assert_eq!(
        seen.otk_counts,
        json!({"@echo_0:localhost": {"PUPPETDEV": {"signed_curve25519": 0}}})
    );
    assert_eq!(
        seen.fallback_types,
        json!({"@echo_0:localhost": {"PUPPETDEV": []}}),
        "an empty list (the rotation signal) is kept"
    );
    assert_eq!(
        seen.device_lists,
        (
            vec!["@alice:localhost".into()],
            vec!["@bob:localhost".into()]
        )
    );
    assert!(fx.store.transaction_completed(TXN_NS, "t1").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_transaction_id_is_acknowledged_without_processing_on_either_path() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let body = json!({"events": [{"type": "m.room.message"}]});
    for path in [
        "/_matrix/app/v1/transactions/same",
        "/transactions/same",
        "/_matrix/app/v1/transactions/same",
    ] {
        let (status, _) = fx.call(authed(Method::PUT, path, json_body(&body))).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        fx.metric("bridgekeys_appservice_transactions_total").await,
        1.0
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_transactions_duplicate_total")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_transaction_sent_twice_concurrently_is_processed_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    *fx.handler.gate.lock().unwrap() = Some((entered_tx, Arc::clone(&release)));
    let body = json!({"events": [{"type": "m.room.message"}]});

    let router = fx.router.clone();
    let b = body.clone();
    let first = tokio::spawn(async move {
        call(
            &router,
            authed(
                Method::PUT,
                "/_matrix/app/v1/transactions/dup",
                json_body(&b),
            ),
        )
        .await
    });
    // The first is inside the bridge's handler, not yet recorded.
    entered.recv().await.unwrap();
    let router = fx.router.clone();
    let second = tokio::spawn(async move {
        call(
            &router,
            authed(
                Method::PUT,
                "/_matrix/app/v1/transactions/dup",
                json_body(&body),
            ),
        )
        .await
    });
    // Wait until the second has found the first in flight (a condition, not
    // a sleep): the in-flight duplicate counter says so.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while fx
            .metric("bridgekeys_appservice_transactions_in_flight_duplicate_total")
            .await
            < 1.0
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the duplicate reached the listener while the first was running");
    assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 1);
    release.notify_one();

    let (s1, _) = first.await.unwrap();
    let (s2, _) = second.await.unwrap();
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 1, "processed once");
    assert!(
        entered.try_recv().is_err(),
        "the handler was never entered again"
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_transactions_duplicate_total")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let body = json!({"events": [{"type": "m.room.message"}]});
    {
        let fx = Fixture::open(dir.path(), Limits::default());
        let (status, _) = fx.put_transaction("before-restart", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 1);
    } // listener, manager and store closed: a process restart
    let fx = Fixture::open(dir.path(), Limits::default());
    let (status, _) = fx.put_transaction("before-restart", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fx.handler.calls.load(Ordering::SeqCst),
        0,
        "not processed again after the restart"
    );
    let (status, _) = fx.put_transaction("after-restart", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fx.handler.calls.load(Ordering::SeqCst),
        1,
        "new ids still processed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failure_answers_an_error_and_the_retry_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let body = json!({"events": [{"type": "m.room.message"}]});
    fx.handler.fail.store(true, Ordering::SeqCst);
    let (status, resp) = fx.put_transaction("flaky", &body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp["errcode"], "M_UNKNOWN");
    assert!(
        !fx.store.transaction_completed(TXN_NS, "flaky").unwrap(),
        "a failure is not recorded"
    );
    fx.handler.fail.store(false, Ordering::SeqCst);
    let (status, _) = fx.put_transaction("flaky", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fx.handler.calls.load(Ordering::SeqCst),
        2,
        "the retry was processed"
    );
    assert_eq!(fx.handler.seen.lock().unwrap().len(), 1);
    assert!(fx.store.transaction_completed(TXN_NS, "flaky").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_200_when_the_transaction_record_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.faults.fail_txn_record.store(true, Ordering::SeqCst);
    let body = json!({"events": []});
    let (status, resp) = fx.put_transaction("t", &body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp["errcode"], "M_UNKNOWN");
    assert!(!fx.store.transaction_completed(TXN_NS, "t").unwrap());
}

/// A user's device talking Olm to puppet 0: a session started on a key
/// claimed through the listener, and spec payloads from `@alice:localhost`.
struct Peer {
    account: Account,
    session: bridgekeys_olm::vodozemac::olm::Session,
    identity: bridgekeys_olm::vodozemac::olm::IdentityKeys,
}

impl Peer {
    async fn new(fx: &Fixture) -> Self {
        let req = json!({"@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]}});
        let (_, body) = fx
            .call(authed(Method::POST, paths::CLAIM[1], json_body(&req)))
            .await;
        let otk = Curve25519PublicKey::from_base64(claimed_public_key(&body)).unwrap();
        let identity = fx.manager.identity_keys(&puppet(0), &device()).unwrap();
        let account = Account::new();
        let session = account
            .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
            .unwrap();
        Self {
            account,
            session,
            identity,
        }
    }

    fn payload(&self, body: &str) -> Value {
        json!({
            "type": "m.test", "content": {"body": body},
            "sender": "@alice:localhost", "sender_device": "ALICEDEV",
            "recipient": "@echo_0:localhost",
            "recipient_keys": {"ed25519": self.identity.ed25519.to_base64()},
            "keys": {"ed25519": self.account.ed25519_key().to_base64()},
        })
    }

    /// Encrypt `payload` and wrap it as the homeserver delivers it.
    fn encrypt_to_device(&mut self, payload: &Value) -> Value {
        let message = self.session.encrypt(payload.to_string()).unwrap();
        let (kind, body) = match message {
            OlmMessage::PreKey(m) => (0, m.to_base64()),
            OlmMessage::Normal(m) => (1, m.to_base64()),
        };
        json!({
            "to_user_id": "@echo_0:localhost", "to_device_id": "PUPPETDEV",
            "type": "m.room.encrypted", "sender": "@alice:localhost",
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": self.account.curve25519_key().to_base64(),
                "ciphertext": {self.identity.curve25519.to_base64(): {"type": kind, "body": body}}
            }
        })
    }
}

/// A peer's first (pre-key) message carrying `body` to puppet 0.
async fn prekey_to_device(fx: &Fixture, body: &str) -> (Value, Curve25519PublicKey) {
    let mut peer = Peer::new(fx).await;
    let msg = peer.encrypt_to_device(&peer.payload(body));
    (msg, peer.account.curve25519_key())
}

/// The content the handler sees for a payload carrying `body`.
fn content(body: &str) -> Vec<u8> {
    json!({"body": body}).to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prekey_message_to_a_puppet_is_handed_over_decrypted_and_consumes_its_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let (msg, _) = prekey_to_device(&fx, "room key").await;
    let dk = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
    assert_eq!(fx.store.count_one_time_keys(&dk).unwrap(), 1);

    let body = json!({"events": [], "de.sorunome.msc2409.to_device": [msg.clone()]});
    let (status, _) = fx.put_transaction("olm-1", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.decrypted.len(), 1);
    assert_eq!(seen.decrypted[0].0, "@echo_0:localhost");
    assert_eq!(seen.decrypted[0].1, "@alice:localhost");
    assert_eq!(seen.decrypted[0].2, content("room key"));
    assert_eq!(
        fx.store.count_one_time_keys(&dk).unwrap(),
        0,
        "the one-time key was consumed"
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_prekey_messages_decrypted_total")
            .await,
        1.0
    );

    // The same message in a new transaction (a replay): handed over as
    // received, marked undecryptable; the transaction still succeeds.
    let body = json!({"events": [], "to_device": [msg]});
    let (status, _) = fx.put_transaction("olm-2", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[1].clone();
    assert!(seen.decrypted.is_empty());
    assert_eq!(seen.other_to_device.len(), 1);
    assert_eq!(seen.other_to_device[0].0, "m.room.encrypted");
    assert!(
        seen.other_to_device[0].1.is_some(),
        "the replay is flagged undecryptable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_messages_not_for_a_puppet_device_pass_through_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let (msg, _) = prekey_to_device(&fx, "secret").await;
    let mut to_unknown_device = msg.clone();
    to_unknown_device["to_device_id"] = json!("NOTPROVISIONED");
    let mut to_foreign_user = msg.clone();
    to_foreign_user["to_user_id"] = json!("@alice:localhost");
    let mut for_another_key = msg.clone();
    let ct = for_another_key["content"]["ciphertext"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    for_another_key["content"]["ciphertext"] =
        json!({"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA": ct});
    let body =
        json!({"events": [], "to_device": [to_unknown_device, to_foreign_user, for_another_key]});
    let (status, _) = fx.put_transaction("pass", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert!(seen.decrypted.is_empty());
    assert_eq!(seen.other_to_device.len(), 3);
    assert!(seen.other_to_device.iter().all(|(_, why)| why.is_none()));
    let dk = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
    assert_eq!(
        fx.store.count_one_time_keys(&dk).unwrap(),
        1,
        "no key consumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_the_timeout_is_answered_503_not_recorded_and_its_retry_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), {
        let mut c = Limits::default();
        c.request_timeout = std::time::Duration::from_millis(200);
        c
    });
    // A handler that never finishes (never released).
    let (entered_tx, _entered) = mpsc::unbounded_channel();
    *fx.handler.gate.lock().unwrap() = Some((entered_tx, Arc::new(Notify::new())));
    let body = json!({"events": []});
    let (status, resp) = fx.put_transaction("slow", &body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp["errcode"], "M_UNKNOWN");
    assert!(!fx.store.transaction_completed(TXN_NS, "slow").unwrap());

    // The abandoned attempt released its hold on the id: the retry runs.
    *fx.handler.gate.lock().unwrap() = None;
    let (status, _) = fx.put_transaction("slow", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 2);
    assert!(fx.store.transaction_completed(TXN_NS, "slow").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_of_a_failed_transaction_still_hands_over_its_decrypted_prekey_message() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let (msg, _) = prekey_to_device(&fx, "room key payload").await;
    let body = json!({"events": [], "to_device": [msg]});
    fx.handler.fail.store(true, Ordering::SeqCst);
    let (status, _) = fx.put_transaction("retry-olm", &body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let dk = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
    assert_eq!(
        fx.store.count_one_time_keys(&dk).unwrap(),
        0,
        "decryption consumed the key"
    );

    fx.handler.fail.store(false, Ordering::SeqCst);
    let (status, _) = fx.put_transaction("retry-olm", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(
        seen.decrypted.len(),
        1,
        "the retry got the plaintext, not a replay error"
    );
    assert_eq!(seen.decrypted[0].2, content("room key payload"));
    assert_eq!(
        fx.metric("bridgekeys_appservice_prekey_messages_decrypted_total")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_retried_transaction_still_hands_over_its_decrypted_prekey_message() {
    let dir = tempfile::tempdir().unwrap();
    let (body, message_bytes) = {
        let fx = Fixture::open(dir.path(), Limits::default());
        fx.provision(1).await;
        let (msg, _) = prekey_to_device(&fx, "room key payload").await;
        let ciphertext = msg["content"]["ciphertext"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap();
        let message = bridgekeys_olm::vodozemac::olm::PreKeyMessage::from_base64(
            ciphertext["body"].as_str().unwrap(),
        )
        .unwrap();
        // A delivery record is keyed by the message type and bytes.
        let mut message_bytes = vec![0u8];
        message_bytes.extend(message.to_bytes());
        let body = json!({"events": [], "to_device": [msg]});
        fx.handler.fail.store(true, Ordering::SeqCst);
        let (status, _) = fx.put_transaction("crash-olm", &body).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        (body, message_bytes)
        // The bridge process dies here: its in-memory retry cache is gone.
    };

    let fx = Fixture::open(dir.path(), Limits::default());
    let dk = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
    let tag = format!("txn/{TXN_NS}/crash-olm");
    assert!(
        fx.store
            .load_delivery(&dk, &tag, &message_bytes)
            .unwrap()
            .is_some()
    );
    let (status, _) = fx.put_transaction("crash-olm", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(
        seen.decrypted.len(),
        1,
        "the retry after the crash lost the message"
    );
    assert_eq!(seen.decrypted[0].2, content("room key payload"));
    assert!(
        fx.store
            .load_delivery(&dk, &tag, &message_bytes)
            .unwrap()
            .is_none(),
        "the plaintext is kept after the transaction was recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_olm_messages_after_the_prekey_message_reach_the_handler_decrypted() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let mut peer = Peer::new(&fx).await;
    let first = peer.encrypt_to_device(&peer.payload("one"));
    let body = json!({"events": [], "to_device": [first]});
    let (status, _) = fx.put_transaction("n-1", &body).await;
    assert_eq!(status, StatusCode::OK);
    // The puppet answers, so the peer's next messages are normal ones.
    let recipient = bridgekeys_olm::Recipient {
        user_id: ruma::user_id!("@alice:localhost"),
        device_id: ruma::device_id!("ALICEDEV"),
        curve25519: peer.account.curve25519_key(),
        ed25519: peer.account.ed25519_key(),
    };
    let reply = fx
        .manager
        .encrypt_olm((&puppet(0), &device()), &recipient, "m.test", &json!({}))
        .await
        .unwrap();
    let ciphertext = &reply.content["ciphertext"][peer.account.curve25519_key().to_base64()];
    let message = OlmMessage::from_parts(
        ciphertext["type"].as_u64().unwrap() as usize,
        &bridgekeys_olm::vodozemac::base64_decode(ciphertext["body"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    peer.session.decrypt(&message).unwrap();
    let second = peer.encrypt_to_device(&peer.payload("two"));
    let third = peer.encrypt_to_device(&peer.payload("three"));
    assert_eq!(
        second["content"]["ciphertext"][peer.identity.curve25519.to_base64()]["type"],
        1
    );
    let body = json!({"events": [], "to_device": [second, third]});
    let (status, _) = fx.put_transaction("n-2", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[1].clone();
    let bodies: Vec<Vec<u8>> = seen.decrypted.iter().map(|d| d.2.clone()).collect();
    assert_eq!(bodies, vec![content("two"), content("three")]);
    assert_eq!(
        fx.metric("bridgekeys_appservice_olm_messages_decrypted_total")
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misaddressed_payload_never_reaches_the_handler_is_counted_and_keeps_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let mut peer = Peer::new(&fx).await;
    let mut payload = peer.payload("for someone else");
    payload["recipient"] = json!("@echo_1:localhost");
    let msg = peer.encrypt_to_device(&payload);
    let body = json!({"events": [], "to_device": [msg]});
    let (status, _) = fx.put_transaction("bad-1", &body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a refused payload does not fail the transaction"
    );
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert!(seen.decrypted.is_empty());
    assert!(
        seen.other_to_device.is_empty(),
        "the refused message was handed over"
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_olm_payloads_refused_total")
            .await,
        1.0
    );
    let dk = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
    assert_eq!(
        fx.store.count_one_time_keys(&dk).unwrap(),
        1,
        "the key was consumed"
    );
    assert!(
        fx.store
            .sessions(&dk, &peer.account.curve25519_key().to_bytes())
            .unwrap()
            .is_empty(),
        "a session was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_changes_under_either_name_mark_tracked_users_outdated_and_left_users_are_forgotten()
 {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    let olm = Arc::new(bridgekeys_appservice::PuppetOlm::new(
        Arc::clone(&fx.manager),
        bridgekeys_appservice::HomeserverClient::new(
            "http://127.0.0.1:9",
            bridgekeys_appservice::AsToken::new("unused"),
        )
        .unwrap(),
    ));
    let fx = fx.with_olm(olm);
    let track = |user: &'static str| {
        let manager = Arc::clone(&fx.manager);
        async move {
            let user = ruma::UserId::parse(user).unwrap();
            manager
                .update_tracked_devices(&user, &Default::default())
                .await
                .unwrap();
        }
    };
    for user in ["@a:localhost", "@b:localhost", "@c:localhost"] {
        track(user).await;
    }
    let outdated = |user: &str| {
        fx.manager
            .tracked_devices(&ruma::UserId::parse(user).unwrap())
            .unwrap()
            .map(|t| t.outdated)
    };
    let body = json!({
        "events": [],
        "org.matrix.msc3202.device_lists": {"changed": ["@a:localhost"], "left": ["@c:localhost"]},
        "device_lists": {"changed": ["@b:localhost"], "left": []},
    });
    let (status, _) = fx.put_transaction("dl", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outdated("@a:localhost"), Some(true));
    assert_eq!(outdated("@b:localhost"), Some(true));
    assert_eq!(outdated("@c:localhost"), None);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(
        seen.device_lists,
        (
            vec!["@b:localhost".to_owned(), "@a:localhost".to_owned()],
            vec!["@c:localhost".to_owned()]
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_key_in_a_transaction_decrypts_the_encrypted_room_events_that_come_with_it() {
    use bridgekeys_olm::vodozemac::megolm::{GroupSession, SessionConfig};
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let mut peer = Peer::new(&fx).await;
    let mut group = GroupSession::new(SessionConfig::version_1());
    let room = "!dm:localhost";
    let mut payload = peer.payload("");
    payload["type"] = json!("m.room_key");
    payload["content"] = json!({
        "algorithm": "m.megolm.v1.aes-sha2", "room_id": room,
        "session_id": group.session_id(), "session_key": group.session_key().to_base64(),
    });
    let key_message = peer.encrypt_to_device(&payload);
    let mut event = |n: u32, body: &str| {
        let plaintext =
            json!({"type": "m.room.message", "room_id": room, "content": {"body": body}});
        json!({
            "type": "m.room.encrypted", "event_id": format!("$e{n}"), "room_id": room,
            "sender": "@alice:localhost", "origin_server_ts": 1,
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": group.encrypt(plaintext.to_string()).to_base64(),
                "session_id": group.session_id(),
                "sender_key": peer.account.curve25519_key().to_base64(),
                "device_id": "ALICEDEV",
            }
        })
    };
    let (first, second) = (event(1, "hello"), event(2, "again"));
    let body = json!({
        "events": [first, {"type": "m.room.message", "event_id": "$plain", "room_id": room, "sender": "@alice:localhost", "content": {}}, second.clone()],
        "to_device": [key_message],
    });
    let (status, _) = fx.put_transaction("mg-1", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(
        seen.room_events,
        vec![
            ("$e1".to_owned(), Ok(json!({"body": "hello"}).to_string())),
            ("$e2".to_owned(), Ok(json!({"body": "again"}).to_string())),
        ]
    );
    assert_eq!(seen.events, 3, "the raw events are all still there");

    // The same ciphertext under another event id is a replay. (An event
    // whose key has not come is held: see the tests below.)
    let mut replayed = second;
    replayed["event_id"] = json!("$e2-again");
    let body = json!({"events": [replayed]});
    let (status, _) = fx.put_transaction("mg-2", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[1].clone();
    assert_eq!(seen.room_events.len(), 1);
    assert_eq!(seen.room_events[0].0, "$e2-again");
    assert!(
        seen.room_events[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("replayed"),
        "{:?}",
        seen.room_events
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_room_events_decrypted_total")
            .await,
        2.0
    );
}

/// A room key whose write loses to other processes on every attempt
/// (`OlmError::Contended`) is not dropped: the transaction fails, is not
/// recorded and reaches no handler, so the homeserver sends it again. Here
/// "another process" writes the session's record right before each write
/// of ours, and one attempt is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_key_that_loses_every_race_fails_its_transaction_instead_of_being_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut manager_config = bridgekeys_olm::ManagerConfig::default();
    manager_config.session_write_attempts = 1;
    let fx = Fixture::open_with(dir.path(), Limits::default(), manager_config);
    fx.provision(1).await;
    let mut peer = Peer::new(&fx).await;
    let room = SharedRoom::new();
    let key = room.key_for(&mut peer);
    let inner = Arc::clone(fx.store.inner());
    fx.store.intercept(move |write| {
        if let bridgekeys_store::testing::Write::GroupSession(room, session) = write {
            let _applied = inner.write_group_session(room, session, b"another process's copy")?;
        }
        Ok(())
    });
    let (status, body) = fx
        .put_transaction("contended-1", &json!({"events": [], "to_device": [key]}))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
    assert!(
        fx.handler.seen.lock().unwrap().is_empty(),
        "the transaction reached the handler"
    );
    assert!(
        !fx.store
            .transaction_completed(TXN_NS, "contended-1")
            .unwrap(),
        "the transaction was recorded: its retry would be skipped"
    );
}

/// A room's group session and a peer that shares it with puppet 0.
struct SharedRoom {
    group: bridgekeys_olm::vodozemac::megolm::GroupSession,
    room: &'static str,
}

impl SharedRoom {
    fn new() -> Self {
        Self {
            group: bridgekeys_olm::vodozemac::megolm::GroupSession::new(
                bridgekeys_olm::vodozemac::megolm::SessionConfig::version_1(),
            ),
            room: "!late:localhost",
        }
    }

    fn event(&mut self, id: &str, body: &str) -> Value {
        let plaintext =
            json!({"type": "m.room.message", "room_id": self.room, "content": {"body": body}});
        json!({
            "type": "m.room.encrypted", "event_id": id, "room_id": self.room,
            "sender": "@alice:localhost",
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": self.group.encrypt(plaintext.to_string()).to_base64(),
                "session_id": self.group.session_id(),
            }
        })
    }

    fn key_for(&self, peer: &mut Peer) -> Value {
        let mut payload = peer.payload("");
        payload["type"] = json!("m.room_key");
        payload["content"] = json!({
            "algorithm": "m.megolm.v1.aes-sha2", "room_id": self.room,
            "session_id": self.group.session_id(), "session_key": self.group.session_key().to_base64(),
        });
        peer.encrypt_to_device(&payload)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_key_comes_later_is_held_and_handed_over_once_when_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let mut peer = Peer::new(&fx).await;
    let mut room = SharedRoom::new();
    // The key is taken at index 0, but the event comes first.
    let key = room.key_for(&mut peer);
    let early = room.event("$early", "before the key");
    let put = async |id: &str, body: Value| {
        let (status, _) = fx.put_transaction(id, &body).await;
        assert_eq!(status, StatusCode::OK);
    };
    put("late-1", json!({"events": [early]})).await;
    put("late-2", json!({"events": [], "to_device": [key]})).await;
    put("late-3", json!({"events": []})).await;
    let seen = fx.handler.seen.lock().unwrap().clone();
    assert!(
        seen[0].room_events.is_empty(),
        "held, not handed over undecryptable"
    );
    assert_eq!(
        seen[1].room_events,
        vec![(
            "$early".to_owned(),
            Ok(json!({"body": "before the key"}).to_string())
        )]
    );
    assert!(seen[2].room_events.is_empty(), "handed over twice");
    assert_eq!(
        fx.metric("bridgekeys_appservice_room_events_held_total")
            .await,
        1.0
    );
    assert_eq!(
        fx.metric("bridgekeys_appservice_room_events_held_released_total")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_event_whose_key_never_comes_is_reported_undecryptable_once_and_survives_a_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let mut room = SharedRoom::new();
    let lost = room.event("$lost", "no key");
    {
        let fx = Fixture::open(dir.path(), Limits::default());
        let (status, _) = fx.put_transaction("h-1", &json!({"events": [lost]})).await;
        assert_eq!(status, StatusCode::OK);
        assert!(fx.handler.seen.lock().unwrap()[0].room_events.is_empty());
    }
    // Restarted with a zero wait: the held event is given up, once.
    let fx = Fixture::open(dir.path(), {
        let mut c = Limits::default();
        c.held_event_max_age = std::time::Duration::ZERO;
        c
    });
    for id in ["h-2", "h-3"] {
        let (status, _) = fx.put_transaction(id, &json!({"events": []})).await;
        assert_eq!(status, StatusCode::OK);
    }
    let seen = fx.handler.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].room_events,
        vec![("$lost".to_owned(), Err("unknown Megolm session".to_owned()))]
    );
    assert!(seen[1].room_events.is_empty(), "reported twice");
    assert_eq!(
        fx.metric("bridgekeys_appservice_room_events_held_given_up_total")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_olm_message_twice_in_one_transaction_is_handed_over_decrypted_once() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let (msg, _) = prekey_to_device(&fx, "only once").await;
    let body = json!({"events": [], "to_device": [msg.clone(), msg]});
    let (status, _) = fx.put_transaction("dup", &body).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.decrypted.len(), 1);
    assert_eq!(seen.other_to_device.len(), 1);
    assert!(
        seen.other_to_device[0]
            .1
            .as_deref()
            .is_some_and(|why| why.contains("copy")),
        "{:?}",
        seen.other_to_device
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_many_sessions_is_decrypted_in_order_with_replays_refused_and_unknown_keys_held()
 {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(1).await;
    let mut peer = Peer::new(&fx).await;
    let mut rooms: Vec<SharedRoom> = (0..4).map(|_| SharedRoom::new()).collect();
    let keys: Vec<Value> = rooms[..3].iter().map(|r| r.key_for(&mut peer)).collect();
    // The fourth session's key, taken at index 0 but delivered last.
    let late_key = rooms[3].key_for(&mut peer);
    let put = async |id: &str, body: Value| {
        let (status, _) = fx.put_transaction(id, &body).await;
        assert_eq!(status, StatusCode::OK);
    };
    put("many-1", json!({"events": [], "to_device": keys})).await;
    // Three rounds over four sessions, interleaved; the fourth's key has
    // not come. One event is replayed under another id, in the same
    // transaction: the first in order wins.
    let mut events = Vec::new();
    let mut expected = Vec::new();
    for round in 0..3 {
        for (s, room) in rooms.iter_mut().enumerate() {
            let id = format!("$r{round}s{s}");
            let body = format!("round {round} session {s}");
            let event = room.event(&id, &body);
            if s < 3 {
                expected.push((id.clone(), Ok(json!({ "body": body }).to_string())));
            }
            events.push(event);
        }
    }
    let mut replay = events[1].clone();
    replay["event_id"] = json!("$replayed");
    events.push(replay);
    put("many-2", json!({ "events": events })).await;
    let seen = fx.handler.seen.lock().unwrap().clone();
    let got = &seen[1].room_events;
    assert_eq!(got.len(), expected.len() + 1, "{got:?}");
    assert_eq!(&got[..expected.len()], &expected[..], "order and content");
    let (id, result) = &got[expected.len()];
    assert_eq!(id, "$replayed");
    assert!(result.is_err(), "a replayed index was accepted");
    // The fourth session's three events were held, and come with its key.
    put("many-3", json!({"events": [], "to_device": [late_key]})).await;
    let seen = fx.handler.seen.lock().unwrap().clone();
    let released: Vec<&str> = seen[2]
        .room_events
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(released.len(), 3, "{released:?}");
    for round in 0..3 {
        assert!(
            released.contains(&format!("$r{round}s3").as_str()),
            "{released:?}"
        );
    }
    assert!(seen[2].room_events.iter().all(|(_, r)| r.is_ok()));
}

#[tokio::test]
async fn dedup_records_are_kept_for_their_max_age_and_pruned_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let body = json!({"events": [{"type": "m.room.message"}]});
    let send = |fx: &Fixture, id: &'static str| {
        let request = authed(Method::PUT, &txn_path(id), json_body(&body));
        let router = fx.router.clone();
        async move { call(&router, request).await.0 }
    };
    {
        // Within the default week: pruning keeps the record, the retry is
        // acknowledged without processing.
        let fx = Fixture::open(dir.path(), Limits::default());
        assert_eq!(send(&fx, "t1").await, StatusCode::OK);
        assert_eq!(fx.appservice.prune_transactions().await.unwrap(), 0);
        assert_eq!(send(&fx, "t1").await, StatusCode::OK);
        assert_eq!(fx.handler.calls.load(Ordering::SeqCst), 1);
    }
    // With a max age of zero every record written before now goes: the log
    // does not grow without bound (and a retry that old would be processed
    // again, which is why the default is far past the homeserver's retries).
    let limits = {
        let mut c = Limits::default();
        c.transaction_record_max_age = std::time::Duration::ZERO;
        c
    };
    let fx = Fixture::open(dir.path(), limits);
    let recorded = bridgekeys_store::unix_millis();
    while bridgekeys_store::unix_millis() <= recorded {
        std::thread::yield_now();
    }
    assert_eq!(fx.appservice.prune_transactions().await.unwrap(), 1);
    assert_eq!(send(&fx, "t1").await, StatusCode::OK);
    assert_eq!(
        fx.handler.calls.load(Ordering::SeqCst),
        1,
        "processed again"
    );
}
