//! The Olm peer is a working, independent Olm client: two of them (matrix-nio
//! on libolm) exchange Olm to-device messages both ways through a real
//! Synapse, before any bridge test relies on one.

use std::time::{Duration, Instant};

use crate::common::{start_synapse, two_peers};
use bridgekeys_testkit::{
    MATRIX_NIO_VERSION, Method, PYTHON_OLM_VERSION, PeerLogin, StatusCode, TestkitError,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nio_peers_exchange_olm_to_device_messages_both_ways() {
    let started = Instant::now();
    let synapse = start_synapse("olmpeer.local").await;
    let alice_user = synapse
        .register_user("alice", "alice password")
        .await
        .unwrap();
    synapse.register_user("bob", "bob password").await.unwrap();

    let (mut alice, mut bob) = two_peers().await;
    assert_eq!(alice.versions().matrix_nio, MATRIX_NIO_VERSION);
    assert_eq!(alice.versions().python_olm, PYTHON_OLM_VERSION);
    eprintln!(
        "synapse and two peers up after {:?}: {:?}",
        started.elapsed(),
        alice.versions()
    );

    let a = alice
        .login(&PeerLogin::new(
            synapse.url(),
            "@alice:olmpeer.local",
            "alice password",
        ))
        .await
        .unwrap();
    // A refused login is an error naming the command, not a hang; the peer
    // stays usable.
    let refused = bob
        .login(&PeerLogin::new(
            synapse.url(),
            "@bob:olmpeer.local",
            "wrong password",
        ))
        .await
        .unwrap_err();
    let TestkitError::Peer { command, error, .. } = &refused else {
        panic!("{refused}");
    };
    assert_eq!(command, "login");
    assert!(error.contains("M_FORBIDDEN"), "{error}");
    assert!(!refused.to_string().contains("wrong password"), "{refused}");
    let b = bob
        .login(&PeerLogin::new(
            synapse.url(),
            "@bob:olmpeer.local",
            "bob password",
        ))
        .await
        .unwrap();
    assert_eq!(a.user_id, "@alice:olmpeer.local");
    assert_ne!(
        a.device_id, alice_user.device_id,
        "the peer is its own device"
    );
    assert_ne!(a.curve25519, b.curve25519);

    // Alice has no session with Bob: nio claims one of his one-time keys
    // and the first message is a pre-key message.
    let first = alice
        .send_olm(
            &b.user_id,
            &b.device_id,
            "org.bridgekeys.test.ping",
            &json!({ "n": 1, "text": "hello bob" }),
        )
        .await
        .unwrap();
    assert_eq!(first.message_type, 0, "{first:?}");
    assert!(first.claimed_one_time_key);
    assert_eq!(first.recipient_curve25519, b.curve25519);

    let got = bob
        .wait_to_device("org.bridgekeys.test.ping", WAIT)
        .await
        .unwrap()
        .expect("bob receives alice's first message");
    assert_eq!(got.content, json!({ "n": 1, "text": "hello bob" }));
    assert_eq!(got.event_type, "org.bridgekeys.test.ping");
    assert_eq!(got.message_type, 0);
    assert!(got.verified_payload);
    assert_eq!(got.sender, a.user_id);
    assert_eq!(got.sender_key, a.curve25519);
    assert_eq!(got.sender_device.as_deref(), Some(a.device_id.as_str()));
    assert_eq!(got.keys, json!({ "ed25519": a.ed25519 }));
    assert_eq!(got.recipient.as_deref(), Some(b.user_id.as_str()));
    assert_eq!(got.recipient_keys, json!({ "ed25519": b.ed25519 }));
    assert_eq!(got.keys_match, Some(true));
    let alice_keys = got.sender_device_keys.expect("alice's device is published");
    assert_eq!(alice_keys.device_id, a.device_id);
    assert_eq!(alice_keys.ed25519, a.ed25519);

    // Bob answers on the session Alice's pre-key message created: a normal
    // message, no key claimed.
    let reply = bob
        .send_olm(
            &a.user_id,
            &a.device_id,
            "org.bridgekeys.test.pong",
            &json!({ "n": 2 }),
        )
        .await
        .unwrap();
    assert_eq!(reply.message_type, 1, "{reply:?}");
    assert!(!reply.claimed_one_time_key);
    assert_eq!(reply.session_id, first.session_id, "one session, both ways");

    let got = alice
        .wait_to_device("org.bridgekeys.test.pong", WAIT)
        .await
        .unwrap()
        .expect("alice receives bob's reply");
    assert_eq!(got.content, json!({ "n": 2 }));
    assert_eq!(got.message_type, 1);
    assert_eq!(got.sender_key, b.curve25519);
    assert_eq!(got.keys_match, Some(true));

    // Having received on the session, Alice's next message is a normal one.
    let second = alice
        .send_olm(
            &b.user_id,
            &b.device_id,
            "org.bridgekeys.test.ping",
            &json!({ "n": 3 }),
        )
        .await
        .unwrap();
    assert_eq!(second.message_type, 1, "{second:?}");
    assert_eq!(second.session_id, first.session_id);
    let got = bob
        .wait_to_device("org.bridgekeys.test.ping", WAIT)
        .await
        .unwrap()
        .expect("bob receives alice's second message");
    assert_eq!(got.content, json!({ "n": 3 }));
    assert_eq!(got.message_type, 1);

    // A to-device Olm event nio cannot decrypt is reported, not skipped.
    let garbage = json!({ "messages": { b.user_id.as_str(): { b.device_id.as_str(): {
        "algorithm": "m.olm.v1.curve25519-aes-sha2",
        "sender_key": "not a curve25519 key",
        "ciphertext": { b.curve25519.as_str(): { "type": 1, "body": "bm90IG9sbQ" } }
    } } } });
    let (status, body) = synapse
        .request(
            Method::PUT,
            "/_matrix/client/v3/sendToDevice/m.room.encrypted/garbage-1",
            Some(&alice_user.access_token),
            Some(&garbage),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    match bob.wait_to_device("org.bridgekeys.test.ping", WAIT).await {
        Err(TestkitError::Peer { command, error, .. }) => {
            assert_eq!(command, "wait_to_device");
            assert!(error.starts_with("undecryptable: "), "{error}");
            assert!(error.contains("not a curve25519 key"), "{error}");
        }
        other => panic!("garbage must be reported as undecryptable, got {other:?}"),
    }

    // Nothing else is pending: a wait times out quietly.
    let nothing = bob
        .wait_to_device("org.bridgekeys.test.ping", Duration::from_millis(500))
        .await
        .unwrap();
    assert!(nothing.is_none(), "{nothing:?}");

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    eprintln!("done after {:?}", started.elapsed());
}
