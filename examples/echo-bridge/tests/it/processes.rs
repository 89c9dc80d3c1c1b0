//! Two echo-bridge processes on one PostgreSQL database behind one
//! registration, as a bridge runs for high availability: a round-robin
//! proxy stands where a load balancer would, so Synapse's transactions, key
//! claims and pings alternate between the processes. A real client
//! (matrix-nio, doing its own Olm and Megolm) opens an encrypted DM with a
//! puppet and talks: each message's transaction lands on one process or
//! the other, the room key it needs came in a to-device message that may
//! have landed on the other, and each echo is encrypted by whichever
//! process handles it, on Megolm sessions both share. Every echo must reach
//! the client, decrypted.
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::common::{
    Deployment, Exchange, Hook, Proxy, Upstream, echo_of, encrypted_dm_with_bob, free_addr, hook,
};
use bridgekeys_testkit::{Method, Postgres};

/// A load balancer in miniature: each request goes to the next process in
/// turn (to the other one if that one does not answer the connection), and
/// the transactions each process took are counted. Transactions take turns
/// among themselves (other requests could otherwise fall between them in a
/// pattern that sends every transaction to one process).
struct RoundRobin {
    processes: [SocketAddr; 2],
    next: AtomicUsize,
    next_transaction: AtomicUsize,
    transactions: [AtomicUsize; 2],
}

impl RoundRobin {
    fn hook(self: &Arc<Self>) -> Hook {
        let this = self.clone();
        hook(move |exchange: Exchange, _: Upstream| {
            let this = this.clone();
            async move {
                let is_transaction =
                    exchange.method == Method::PUT && exchange.path.contains("/transactions/");
                let turn = if is_transaction {
                    &this.next_transaction
                } else {
                    &this.next
                };
                let first = turn.fetch_add(1, Ordering::SeqCst) % 2;
                let mut last_error = None;
                for i in [first, 1 - first] {
                    match Upstream(this.processes[i]).forward(&exchange).await {
                        Ok(answer) => {
                            if is_transaction {
                                this.transactions[i].fetch_add(1, Ordering::SeqCst);
                            }
                            return Ok(answer);
                        }
                        Err(e) => last_error = Some(e),
                    }
                }
                Err(last_error.unwrap())
            }
        })
    }

    fn transactions(&self) -> [usize; 2] {
        [
            self.transactions[0].load(Ordering::SeqCst),
            self.transactions[1].load(Ordering::SeqCst),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_database_take_turns_and_every_encrypted_echo_decrypts() {
    let postgres = Postgres::start().await.unwrap();
    let url = postgres.create_database("echo_processes").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let balancer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut deployment =
        Deployment::init_with_database(dir.path(), Some(balancer.local_addr().unwrap()), Some(url))
            .await
            .unwrap();
    let other = free_addr();
    let round_robin = Arc::new(RoundRobin {
        processes: [deployment.bridge_addr, other],
        next: AtomicUsize::new(0),
        next_transaction: AtomicUsize::new(0),
        transactions: [AtomicUsize::new(0), AtomicUsize::new(0)],
    });
    let _balancer = Proxy::start_on(
        balancer,
        Upstream(deployment.bridge_addr),
        round_robin.hook(),
    );
    deployment.start_another(other).await.unwrap();
    deployment.start_bridge().await.unwrap();
    let (mut phone, room) = encrypted_dm_with_bob(&deployment).await;
    // Both processes encrypt on the puppet's one outbound Megolm session,
    // stored in the database: one session, and no message index used twice.
    let mut session = None;
    let mut indices: Vec<u32> = Vec::new();
    for body in ["one", "two", "three", "four", "five", "six"] {
        assert!(phone.room_send(&room, body).await.unwrap().encrypted);
        let echo = echo_of(&mut phone, &room, body, false).await;
        let echo_session = echo.session_id.clone().expect("a Megolm session");
        assert_eq!(
            session.get_or_insert_with(|| echo_session.clone()),
            &echo_session,
            "the puppet changed Megolm session between processes"
        );
        let index = echo.message_index.expect("the echo's message index");
        assert!(
            indices.iter().all(|&seen| index > seen),
            "{body:?} at index {index}, not above every index before: {indices:?}"
        );
        indices.push(index);
    }
    let [first, second] = round_robin.transactions();
    eprintln!("transactions handled: {first} and {second}; echo indices {indices:?}");
    assert!(
        first > 0 && second > 0,
        "both processes must have handled transactions: {first} and {second}"
    );
    phone.quit().await.unwrap();
}
