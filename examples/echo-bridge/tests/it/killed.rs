//! The echo bridge killed with SIGKILL mid-conversation, as a real child
//! process against a real Synapse, with a real client (matrix-nio on
//! libolm) in an encrypted DM: restarted from the same config and store,
//! its next echo still decrypts, on the same Megolm session, at a message
//! index above every index used before, even one the kill kept from ever
//! reaching the room.
#![allow(clippy::unwrap_used)]

use std::{
    os::unix::process::ExitStatusExt,
    sync::{Arc, Mutex},
};

use crate::common::{
    BOB, Deployment, Exchange, Hook, Proxy, TIMEOUT, Upstream, echo_of, encrypted_dm_with_bob,
    hook, megolm_message_index,
};
use bridgekeys_testkit::{Method, PeerRoomMessage, RoomMessageQuery};
use tokio::sync::oneshot;

/// Between the bridge and Synapse (client-server API): passes everything
/// on, except that, once armed, it holds the next `m.room.encrypted` the
/// bridge sends to a room and never answers it: the bridge has encrypted
/// the echo (and stored the advanced ratchet) but the room never gets it.
#[derive(Default)]
struct HoldNextEcho {
    armed: Mutex<Option<oneshot::Sender<Exchange>>>,
}

impl HoldNextEcho {
    /// Hold the next echo; the receiver gets it when it is held.
    fn arm(&self) -> oneshot::Receiver<Exchange> {
        let (tx, rx) = oneshot::channel();
        *self.armed.lock().unwrap() = Some(tx);
        rx
    }

    fn hook(self: &Arc<Self>) -> Hook {
        let this = self.clone();
        hook(move |exchange: Exchange, upstream: Upstream| {
            let this = this.clone();
            async move {
                let is_echo = exchange.method == Method::PUT
                    && exchange.path.contains("/send/m.room.encrypted/");
                let held = if is_echo {
                    this.armed.lock().unwrap().take()
                } else {
                    None
                };
                match held {
                    Some(tell) => {
                        let _ = tell.send(exchange);
                        // Never answered: the bridge waits until it dies.
                        std::future::pending().await
                    }
                    None => upstream.forward(&exchange).await,
                }
            }
        })
    }
}

/// The Megolm session and message indices of the puppet's echoes, as the
/// client saw them, in order.
#[derive(Default)]
struct Indices {
    session: Option<String>,
    seen: Vec<u32>,
}

impl Indices {
    /// Every echo is on the one session, at an index above all before it.
    fn record(&mut self, echo: &PeerRoomMessage) -> u32 {
        let session = echo.session_id.clone().expect("a Megolm session");
        let session = self.session.get_or_insert(session);
        assert_eq!(
            echo.session_id.as_ref(),
            Some(&*session),
            "the puppet changed Megolm session: {echo:?}"
        );
        let index = echo.message_index.expect("the echo's message index");
        self.assert_above_all(index, &echo.body);
        self.seen.push(index);
        index
    }

    fn assert_above_all(&self, index: u32, what: &str) {
        assert!(
            self.seen.iter().all(|&seen| index > seen),
            "{what:?} is at index {index}, not above every index seen before: {:?}",
            self.seen
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_restarted_bridge_echoes_on_the_same_megolm_session_at_never_used_indices()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut deployment = Deployment::init(dir.path(), None).await.unwrap();
    let hold = Arc::new(HoldNextEcho::default());
    let proxy = Proxy::start(
        Upstream(([127, 0, 0, 1], deployment.synapse.port()).into()),
        hold.hook(),
    )
    .await;
    deployment.set_homeserver_url(&proxy.url()).unwrap();
    deployment.start_bridge().await.unwrap();
    let (mut phone, room) = encrypted_dm_with_bob(&deployment).await;
    let mut indices = Indices::default();

    // 1. Encrypted echoes from the bridge process, one index after another.
    for body in ["one", "two"] {
        assert!(phone.room_send(&room, body).await.unwrap().encrypted);
        indices.record(&echo_of(&mut phone, &room, body, false).await);
    }

    // 2. SIGKILL right after an echo reached the client; the bridge comes
    //    back from the same config and store.
    let status = deployment.kill_bridge();
    assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");
    deployment.start_bridge().await.unwrap();
    phone.room_send(&room, "three").await.unwrap();
    indices.record(&echo_of(&mut phone, &room, "three", false).await);

    // 3. SIGKILL with messages in flight: Synapse's transaction carrying
    //    "four" is unanswered, and the bridge has encrypted its echo (the
    //    ratchet advanced and stored) but the echo never reaches the room.
    let held = hold.arm();
    phone.room_send(&room, "four").await.unwrap();
    let lost = tokio::time::timeout(TIMEOUT, held)
        .await
        .expect("the bridge did not send an echo of \"four\"")
        .unwrap();
    let lost = lost.json().unwrap();
    assert_eq!(
        lost["session_id"].as_str(),
        indices.session.as_deref(),
        "{lost}"
    );
    let lost_index = megolm_message_index(lost["ciphertext"].as_str().unwrap()).unwrap();
    indices.assert_above_all(lost_index, "the echo lost to the kill");
    let status = deployment.kill_bridge();
    assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");

    // Synapse counted the bridge as down (its transaction failed); the
    // restart's ping makes it retry the transaction with "four" at once.
    deployment.start_bridge().await.unwrap();
    let four = echo_of(&mut phone, &room, "four", false).await;
    indices.record(&four);
    assert!(
        four.message_index.unwrap() > lost_index,
        "the echo of \"four\" reused the index {lost_index} of the echo lost to the kill"
    );

    // 4. The next message's echo is the next thing the puppet says: "four"
    //    was echoed once, and the conversation goes on.
    phone.room_send(&room, "five").await.unwrap();
    let next = phone
        .wait_room_message(&RoomMessageQuery::in_room(&room).sent_by(BOB), TIMEOUT)
        .await
        .unwrap()
        .expect("an echo of \"five\"");
    assert_eq!(next.body, "echo: five", "{next:?}");
    assert!(next.decrypted);
    indices.record(&next);

    assert_eq!(deployment.starts, 3);
    eprintln!(
        "echo indices seen by the client: {:?}, lost to the kill: {lost_index}",
        indices.seen
    );
    phone.quit().await.unwrap();
}
