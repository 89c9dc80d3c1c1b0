//! An encrypted DM with a puppet, end to end: a real client we did not write
//! (matrix-nio on libolm, doing its own Olm and Megolm) talks to the echo
//! bridge through a real Synapse.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bridgekeys_testkit::{NewRoom, OlmPeer, PeerLogin, PeerRoomMessage, RoomMessageQuery};
use echo_bridge::demo::Local;

const TIMEOUT: Duration = Duration::from_secs(45);
const BOB: &str = "@echo_bob:localhost";
const PASSWORD: &str = "correct horse battery";

async fn client(local: &Local) -> OlmPeer {
    let mut peer = OlmPeer::start()
        .await
        .unwrap_or_else(|e| panic!("could not start the Olm peer: {e}"));
    peer.login(&PeerLogin::new(
        local.synapse.url(),
        "@alice:localhost",
        PASSWORD,
    ))
    .await
    .unwrap();
    peer
}

/// The echo of `body`, decrypted. Any echo the client cannot decrypt on
/// the way fails the test.
async fn echo_of(peer: &mut OlmPeer, room: &str, body: &str) -> PeerRoomMessage {
    let echo = format!("echo: {body}");
    peer.wait_room_message(
        &RoomMessageQuery::in_room(room)
            .sent_by(BOB)
            .body_prefix(echo.clone()),
        TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("the echo of {body:?} could not be read: {e}"))
    .unwrap_or_else(|| panic!("no echo of {body:?}"))
}

/// The echo of `body` as a device that joined late sees it: the room's
/// earlier messages, sent before it existed, are undecryptable to it (they
/// were encrypted before it got the key) and are passed over; the echo
/// itself must decrypt.
async fn echo_on_new_device(peer: &mut OlmPeer, room: &str, body: &str) -> PeerRoomMessage {
    let echo = format!("echo: {body}");
    let query = RoomMessageQuery::in_room(room)
        .sent_by(BOB)
        .body_prefix(echo);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match peer.wait_room_message(&query, left).await {
            Ok(Some(message)) => return message,
            Ok(None) => panic!("no echo of {body:?} on the new device"),
            Err(bridgekeys_testkit::TestkitError::Undecryptable(old)) => {
                eprintln!("the new device cannot read an earlier message: {old:?}");
            }
            Err(e) => panic!("the new device failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_gets_encrypted_echoes_on_its_devices_across_a_rejoin_and_a_bridge_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = Local::start(dir.path()).await.unwrap();
    local
        .synapse
        .register_user("alice", PASSWORD)
        .await
        .unwrap();
    let mut phone = client(&local).await;

    // 1. The client opens an encrypted DM with the puppet; the bridge joins
    //    on the invite; "hello" goes out encrypted and its echo comes back
    //    encrypted, and the client decrypts it.
    let room = phone
        .create_room(&NewRoom::encrypted_dm(BOB))
        .await
        .unwrap();
    assert!(phone.wait_joined(&room, BOB, TIMEOUT).await.unwrap());
    let sent = phone.room_send(&room, "hello").await.unwrap();
    assert!(sent.encrypted);
    let echo = echo_of(&mut phone, &room, "hello").await;
    assert!(echo.decrypted, "the echo came in the clear: {echo:?}");
    assert_eq!(echo.body, "echo: hello");
    let first_session = echo.session_id.clone().expect("a Megolm session");

    // 2. A second device of the user, logged in mid-conversation, decrypts
    //    the next echo (the puppet learns of it from the device list change
    //    and shares its key with it).
    let mut laptop = client(&local).await;
    phone.room_send(&room, "second").await.unwrap();
    let on_phone = echo_of(&mut phone, &room, "second").await;
    let on_laptop = echo_on_new_device(&mut laptop, &room, "second").await;
    assert!(on_phone.decrypted && on_laptop.decrypted);

    // 3. The user leaves and comes back: the puppet starts a new session
    //    (a device that left had the old one).
    phone.leave(&room).await.unwrap();
    // The room is invite-only and the puppet is its last member: the test
    // invites Alice back as the puppet (what a bridge does when asked).
    let invite = format!(
        "/_matrix/client/v3/rooms/{}/invite?user_id={}",
        room.replace('!', "%21").replace(':', "%3A"),
        BOB.replace('@', "%40").replace(':', "%3A")
    );
    let (status, answer) = local
        .synapse
        .request(
            bridgekeys_testkit::Method::POST,
            &invite,
            Some(&local.registration.as_token),
            Some(&serde_json::json!({ "user_id": "@alice:localhost" })),
        )
        .await
        .unwrap();
    assert_eq!(status, bridgekeys_testkit::StatusCode::OK, "{answer}");
    phone.join(&room).await.unwrap();
    phone.room_send(&room, "back again").await.unwrap();
    let after_rejoin = echo_of(&mut phone, &room, "back again").await;
    assert!(after_rejoin.decrypted);
    let rejoin_session = after_rejoin.session_id.clone().expect("a Megolm session");
    assert_ne!(
        rejoin_session, first_session,
        "the puppet kept the session a departed member had"
    );

    // 4. The bridge stops mid-conversation and comes back: the next echo
    //    still decrypts, on the session it was using, at a new index.
    local.restart().await.unwrap();
    phone.room_send(&room, "after restart").await.unwrap();
    let after_restart = echo_of(&mut phone, &room, "after restart").await;
    assert!(after_restart.decrypted);
    assert_eq!(
        after_restart.session_id.as_deref(),
        Some(rejoin_session.as_str())
    );

    phone.quit().await.unwrap();
    laptop.quit().await.unwrap();
    local.stop().await.unwrap();
}
