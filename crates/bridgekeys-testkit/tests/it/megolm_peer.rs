//! The Olm peer does Megolm in rooms, all of it nio's own: two nio peers
//! (libolm) in an encrypted DM through a real Synapse read each other's
//! messages, a device of Bob's that logs in later reads what is sent after
//! it appeared (and not what came before), a rejoin gets a fresh session,
//! and plaintext and undecryptable events are told apart from decrypted
//! ones.

use std::time::{Duration, Instant};

use crate::common::{start_synapse, two_peers};
use bridgekeys_testkit::{
    Method, NewRoom, OlmPeer, PeerLogin, RoomMessageQuery, StatusCode, TestkitError, UserDevice,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn device(d: &bridgekeys_testkit::PeerDevice) -> UserDevice {
    UserDevice {
        user_id: d.user_id.clone(),
        device_id: d.device_id.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nio_peers_talk_megolm_in_an_encrypted_dm() {
    let started = Instant::now();
    let synapse = start_synapse("megolmpeer.local").await;
    let alice_user = synapse.register_user("alice", "alice pw").await.unwrap();
    synapse.register_user("bob", "bob pw").await.unwrap();
    let (mut alice, mut bob) = two_peers().await;
    let a = alice
        .login(&PeerLogin::new(
            synapse.url(),
            &alice_user.user_id,
            "alice pw",
        ))
        .await
        .unwrap();
    let b = bob
        .login(&PeerLogin::new(
            synapse.url(),
            "@bob:megolmpeer.local",
            "bob pw",
        ))
        .await
        .unwrap();
    eprintln!("synapse and two peers up after {:?}", started.elapsed());

    // Alice opens an encrypted DM with Bob and writes at once: nio creates
    // a Megolm session and shares it with the device of Bob, who is only
    // invited yet and whom nobody verified, over Olm before encrypting.
    let room = alice
        .create_room(&NewRoom::encrypted_dm(&b.user_id))
        .await
        .unwrap();
    let t = Instant::now();
    let early = alice.room_send(&room, "before you join").await.unwrap();
    eprintln!(
        "first room_send: {:?} in nio ({:?} with the catch-up sync)",
        early.elapsed,
        t.elapsed()
    );
    assert!(early.encrypted, "{early:?}");
    let first_session = early.session_id.clone().unwrap();
    assert_eq!(early.shared_with, vec![device(&b)]);

    // Bob accepts and reads it; Alice's next message is on the same session.
    bob.join(&room).await.unwrap();
    assert!(alice.wait_joined(&room, &b.user_id, WAIT).await.unwrap());
    let got = bob
        .wait_room_message(&RoomMessageQuery::in_room(&room), WAIT)
        .await
        .unwrap()
        .expect("bob gets the message sent while he was invited");
    assert_eq!(got.body, "before you join");
    assert!(got.decrypted);
    assert_eq!(got.session_id, early.session_id);
    let hello = alice.room_send(&room, "hello").await.unwrap();
    assert_eq!(hello.session_id, early.session_id);

    let got = bob
        .wait_room_message(&RoomMessageQuery::in_room(&room).sent_by(&a.user_id), WAIT)
        .await
        .unwrap()
        .expect("bob gets alice's hello");
    assert_eq!(got.body, "hello");
    assert!(got.decrypted);
    assert!(!got.verified, "nobody verified alice's device");
    assert_eq!(got.event_id, hello.event_id);
    assert_eq!(got.msgtype.as_deref(), Some("m.text"));
    assert_eq!(got.session_id.as_deref(), Some(first_session.as_str()));
    assert_eq!(got.sender_key.as_deref(), Some(a.curve25519.as_str()));
    assert_eq!(got.sender_device.as_deref(), Some(a.device_id.as_str()));

    // Bob replies on a session of his own; Alice decrypts it.
    let reply = bob.room_send(&room, "hi alice").await.unwrap();
    assert!(reply.encrypted);
    assert_ne!(reply.session_id.as_deref(), Some(first_session.as_str()));
    assert_eq!(reply.shared_with, vec![device(&a)]);
    let got = alice
        .wait_room_message(&RoomMessageQuery::in_room(&room), WAIT)
        .await
        .unwrap()
        .expect("alice gets bob's reply (her own hello is skipped)");
    assert_eq!(got.body, "hi alice");
    assert!(got.decrypted);
    assert_eq!(got.sender, b.user_id);
    assert_eq!(got.session_id, reply.session_id);
    assert_eq!(got.sender_key.as_deref(), Some(b.curve25519.as_str()));

    // A second device of Bob's, logged in now (its own store).
    let mut bob2 = OlmPeer::start().await.unwrap();
    let b2 = bob2
        .login(&PeerLogin::new(
            synapse.url(),
            "@bob:megolmpeer.local",
            "bob pw",
        ))
        .await
        .unwrap();
    assert_eq!(b2.user_id, b.user_id);
    assert_ne!(b2.device_id, b.device_id);

    // Bob's device list changed, so nio drops the shared session and shares
    // a new one with both of his devices.
    let second = alice.room_send(&room, "for both of you").await.unwrap();
    let second_session = second.session_id.clone().unwrap();
    assert_ne!(second_session, first_session);
    let mut both = vec![device(&b), device(&b2)];
    both.sort();
    assert_eq!(second.shared_with, both);

    // The new device's first sync holds the history: Alice's messages on
    // the session it never got are undecryptable, and said so...
    let from_alice = RoomMessageQuery::in_room(&room).sent_by(&a.user_id);
    for old in [&early, &hello] {
        match bob2.wait_room_message(&from_alice, WAIT).await {
            Err(TestkitError::Undecryptable(event)) => {
                assert_eq!(event.event_id, old.event_id);
                assert_eq!(event.session_id.as_deref(), Some(first_session.as_str()));
                assert_eq!(event.sender_device.as_deref(), Some(a.device_id.as_str()));
                assert!(event.reason.contains("no session found"), "{event:?}");
            }
            other => panic!("history must be undecryptable on a new device, got {other:?}"),
        }
    }
    // ... and the message sent after it logged in is decrypted.
    let got = bob2
        .wait_room_message(&from_alice, WAIT)
        .await
        .unwrap()
        .expect("bob's second device gets the new message");
    assert_eq!(got.body, "for both of you");
    assert!(got.decrypted);
    assert_eq!(got.session_id.as_deref(), Some(second_session.as_str()));
    let got = bob
        .wait_room_message(&from_alice, WAIT)
        .await
        .unwrap()
        .expect("bob's first device too");
    assert_eq!(got.session_id.as_deref(), Some(second_session.as_str()));

    // Bob leaves: Alice's next session is shared with no device of his.
    // He rejoins: the one after is shared with both, and decrypted.
    bob.leave(&room).await.unwrap();
    let away = alice.room_send(&room, "while you are away").await.unwrap();
    assert!(away.encrypted);
    assert_ne!(away.session_id.as_deref(), Some(second_session.as_str()));
    assert_eq!(away.shared_with, Vec::<UserDevice>::new());
    alice.invite(&room, &b.user_id).await.unwrap();
    bob.join(&room).await.unwrap();
    let back = alice.room_send(&room, "welcome back").await.unwrap();
    assert_ne!(back.session_id, away.session_id);
    assert_eq!(back.shared_with, both);
    // The rejoin's timeline repeats the history (each event is queued once
    // though); what was sent while he was away stays unreadable to him.
    match bob.wait_room_message(&from_alice, WAIT).await {
        Err(TestkitError::Undecryptable(event)) => {
            assert_eq!(event.event_id, away.event_id);
            assert_eq!(event.session_id, away.session_id);
        }
        other => panic!("the message sent while bob was away, got {other:?}"),
    }
    let got = bob
        .wait_room_message(&from_alice, WAIT)
        .await
        .unwrap()
        .expect("bob gets the message after his rejoin");
    assert_eq!(got.body, "welcome back", "{got:?}");
    assert!(got.decrypted);

    // A plaintext message (from Alice's other, keyless device) comes back
    // as such, not as decrypted.
    let (status, answer) = synapse
        .request(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/plain-1"),
            Some(&alice_user.access_token),
            Some(&json!({ "msgtype": "m.notice", "body": "in the clear" })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let got = bob
        .wait_room_message(&from_alice.clone().body_prefix("in the"), WAIT)
        .await
        .unwrap()
        .expect("bob gets the plaintext message");
    assert_eq!(got.body, "in the clear");
    assert_eq!(got.msgtype.as_deref(), Some("m.notice"));
    assert!(!got.decrypted);
    assert_eq!(got.session_id, None);

    // A Megolm event on a session nobody shared is reported, not skipped.
    let (status, answer) = synapse
        .request(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.encrypted/bogus-1"),
            Some(&alice_user.access_token),
            Some(&json!({
                "algorithm": "m.megolm.v1.aes-sha2",
                "sender_key": a.curve25519,
                "device_id": alice_user.device_id,
                "session_id": "bogus session",
                "ciphertext": "bm90IG1lZ29sbQ",
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    match bob.wait_room_message(&from_alice, WAIT).await {
        Err(TestkitError::Undecryptable(event)) => {
            assert_eq!(event.session_id.as_deref(), Some("bogus session"));
            assert_eq!(event.event_id, answer["event_id"].as_str().unwrap());
            assert!(event.reason.contains("no session found"), "{event:?}");
        }
        other => panic!("an unknown session must be undecryptable, got {other:?}"),
    }

    // Nothing else is pending.
    let nothing = bob
        .wait_room_message(&from_alice, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(nothing.is_none(), "{nothing:?}");

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    bob2.quit().await.unwrap();
    eprintln!("done after {:?}", started.elapsed());
}
