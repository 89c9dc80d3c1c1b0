//! At start the bridge relearns its puppets' rooms from the homeserver (one
//! `joined_rooms` call per puppet, one after another). That must not keep
//! it from serving: a process that holds its socket open without answering
//! stalls the homeserver's transactions (behind a load balancer, for every
//! process of the bridge) and the key claims sent to it. Here Synapse's
//! answers to `joined_rooms` are held for as long as the test runs; the
//! restarted bridge must still be reachable, and echo, meanwhile.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use crate::common::{
    Deployment, Exchange, Hook, Proxy, TIMEOUT, Upstream, echo_of, encrypted_dm_with_bob, hook,
};
use tokio::sync::oneshot;

/// Between the bridge and Synapse: passes everything on, except that, once
/// armed, every `joined_rooms` call is held and never answered (retries
/// included); the first one held is reported.
#[derive(Default)]
struct HoldJoinedRooms {
    armed: Mutex<bool>,
    first: Mutex<Option<oneshot::Sender<()>>>,
}

impl HoldJoinedRooms {
    fn arm(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        *self.first.lock().unwrap() = Some(tx);
        *self.armed.lock().unwrap() = true;
        rx
    }

    fn hook(self: &Arc<Self>) -> Hook {
        let this = self.clone();
        hook(move |exchange: Exchange, upstream: Upstream| {
            let this = this.clone();
            async move {
                let held = *this.armed.lock().unwrap() && exchange.path.contains("/joined_rooms");
                if held {
                    if let Some(tell) = this.first.lock().unwrap().take() {
                        let _ = tell.send(());
                    }
                    std::future::pending().await
                } else {
                    upstream.forward(&exchange).await
                }
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_serves_and_echoes_while_it_still_relearns_its_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let mut deployment = Deployment::init(dir.path(), None).await.unwrap();
    let hold = Arc::new(HoldJoinedRooms::default());
    let proxy = Proxy::start(
        Upstream(([127, 0, 0, 1], deployment.synapse.port()).into()),
        hold.hook(),
    )
    .await;
    deployment.set_homeserver_url(&proxy.url()).unwrap();
    deployment.start_bridge().await.unwrap();
    let (mut phone, room) = encrypted_dm_with_bob(&deployment).await;
    phone.room_send(&room, "before").await.unwrap();
    echo_of(&mut phone, &room, "before", false).await;

    // Restarted with every `joined_rooms` answer held: relearning the
    // puppet's rooms never finishes, and each call would only give up after
    // the client's timeout and retries (minutes).
    deployment.kill_bridge();
    let relearning = hold.arm();
    deployment
        .start_bridge()
        .await
        .expect("the bridge serves while it relearns its rooms");
    tokio::time::timeout(TIMEOUT, relearning)
        .await
        .expect("the bridge relearns its rooms at start")
        .unwrap();
    // The room is on record already: the echo does not wait for the
    // relearning either.
    phone.room_send(&room, "during").await.unwrap();
    echo_of(&mut phone, &room, "during", false).await;
    phone.quit().await.unwrap();
}
