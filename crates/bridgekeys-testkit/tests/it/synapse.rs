//! The testkit gives a test a real, working Synapse.

use crate::common::start_synapse;
use bridgekeys_testkit::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_synapse_registers_users_who_can_then_use_the_client_api() {
    let synapse = start_synapse("testkit.local").await;
    let alice = synapse
        .register_user("alice", "correct horse battery")
        .await
        .unwrap();
    assert_eq!(alice.user_id, "@alice:testkit.local");

    let (status, whoami) = synapse
        .request(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&alice.access_token),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{whoami}");
    assert_eq!(whoami["user_id"], "@alice:testkit.local");
    assert_eq!(whoami["device_id"], alice.device_id.as_str());

    // A second login is a second device; a wrong token is refused.
    let again = synapse
        .login("alice", "correct horse battery")
        .await
        .unwrap();
    assert_ne!(again.device_id, alice.device_id);
    let (status, _) = synapse
        .request(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some("not-a-token"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[test]
fn a_missing_python_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        bridgekeys_testkit::ensure_synapse_with(&dir.path().join("venv"), "/nonexistent/python3")
            .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("python3 with the venv module is required"),
        "{message}"
    );
    assert!(message.contains("/nonexistent/python3"), "{message}");
}
