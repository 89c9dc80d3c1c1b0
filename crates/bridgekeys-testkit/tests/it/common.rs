//! Shared setup of the testkit's tests: a started Synapse, two started
//! Olm peers.

use bridgekeys_testkit::{OlmPeer, Synapse, SynapseOptions};

/// A real Synapse serving `server_name`, or a panic saying why not.
pub async fn start_synapse(server_name: &str) -> Synapse {
    Synapse::start(SynapseOptions {
        server_name: server_name.into(),
        ..SynapseOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("could not provide Synapse: {e}"))
}

/// Two Olm peers (matrix-nio), started side by side.
pub async fn two_peers() -> (OlmPeer, OlmPeer) {
    let (alice, bob) = tokio::join!(OlmPeer::start(), OlmPeer::start());
    let alice = alice.unwrap_or_else(|e| panic!("could not start the olm peer: {e}"));
    (alice, bob.unwrap())
}
