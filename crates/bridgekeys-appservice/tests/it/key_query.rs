//! MSC3984 key queries: provisioned puppets' device keys from the store,
//! with exactly the signatures the homeserver would publish.

use crate::common::*;
use axum::http::{Method, StatusCode};
use bridgekeys_appservice::{Limits, paths};
use bridgekeys_olm::{canonical_json_for_signing, vodozemac};
use bridgekeys_store::Store;
use serde_json::{Value, json};

fn verify(key: &str, object: &Value, signature: &str) -> bool {
    let key = vodozemac::Ed25519PublicKey::from_base64(key).unwrap();
    let signature = vodozemac::Ed25519Signature::from_base64(signature).unwrap();
    key.verify(
        canonical_json_for_signing(object).unwrap().as_bytes(),
        &signature,
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_query_answers_provisioned_puppets_with_their_own_and_their_cross_signing_signature()
{
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), Limits::default());
    fx.provision(2).await;
    // Puppet 0 has a cross-signing identity; puppet 1 does not (yet).
    let cross = fx.manager.cross_signing_keys(&puppet(0)).await.unwrap();
    let self_signing = public_of(&serde_json::to_value(&cross.self_signing_key).unwrap());
    let request = json!({
        "@echo_0:localhost": ["PUPPETDEV", "NOSUCHDEV"],
        "@echo_1:localhost": [],
        "@echo_9:localhost": ["PUPPETDEV"],
        "@alice:localhost": ["PUPPETDEV"],
        "not a user id": [],
    });
    for path in paths::QUERY {
        let (status, body) = fx
            .call(authed(Method::POST, path, json_body(&request)))
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let users = body["device_keys"].as_object().unwrap();
        // Only provisioned devices in the namespace; an empty list is the
        // puppet's device.
        assert_eq!(
            users.keys().collect::<Vec<_>>(),
            ["@echo_0:localhost", "@echo_1:localhost"],
            "{path}: {body}"
        );
        assert_eq!(users["@echo_0:localhost"].as_object().unwrap().len(), 1);
        for n in 0..2 {
            let user = puppet(n);
            let keys = &users[user.as_str()]["PUPPETDEV"];
            let identity = fx.manager.identity_keys(&user, &device()).unwrap();
            assert_eq!(keys["user_id"], user.as_str());
            assert_eq!(keys["device_id"], "PUPPETDEV");
            let signatures = keys["signatures"][user.as_str()].as_object().unwrap();
            let own = signatures["ed25519:PUPPETDEV"].as_str().unwrap();
            assert!(
                verify(&identity.ed25519.to_base64(), keys, own),
                "{path}: the device's own signature"
            );
            if n == 0 {
                assert_eq!(signatures.len(), 2, "{path}: {keys}");
                let by_identity = signatures[&format!("ed25519:{self_signing}")]
                    .as_str()
                    .unwrap();
                assert!(
                    verify(&self_signing, keys, by_identity),
                    "{path}: the self-signing key's signature"
                );
            } else {
                assert_eq!(signatures.len(), 1, "{path}: {keys}");
            }
        }
    }
    // Read-only: no identity was created for puppet 1 by answering.
    assert!(
        fx.store
            .load_cross_signing("@echo_1:localhost")
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_query_over_the_device_bound_or_malformed_is_refused_with_a_matrix_error() {
    let dir = tempfile::tempdir().unwrap();
    let limits = {
        let mut c = Limits::default();
        c.max_devices_per_claim = 3;
        c
    };
    let fx = Fixture::open(dir.path(), limits);
    fx.provision(1).await;
    let before = fx.state();
    let too_many =
        json!({"@echo_0:localhost": ["A", "B"], "@echo_1:localhost": [], "@echo_2:localhost": []});
    let (status, body) = fx
        .call(authed(Method::POST, paths::QUERY[0], json_body(&too_many)))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errcode"], "M_INVALID_PARAM");
    let (status, body) = fx
        .call(authed(
            Method::POST,
            paths::QUERY[0],
            json_body(&json!({"@echo_0:localhost": "PUPPETDEV"})),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errcode"], "M_BAD_JSON");
    assert_eq!(fx.state(), before, "a refused query changed something");
}
