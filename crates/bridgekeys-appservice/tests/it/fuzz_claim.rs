//! Property tests (fuzzing) of the key claim listener (MSC3983), sent
//! in-process: arbitrary JSON, arbitrary bytes and arbitrary nested maps of
//! user ids, device ids and algorithm lists (huge counts, weird ids) never
//! panic it. Every answer is either a 4xx Matrix error `{errcode, error}`
//! that changed nothing, or a 200 holding exactly the keys asked of
//! provisioned in-namespace devices, well-formed, signed, never issued
//! before, and counted by the manager.
//!
//! Default case counts keep `cargo test --workspace` fast. Longer run:
//!
//! ```sh
//! PROPTEST_CASES=5000 cargo test -p bridgekeys-appservice --test it fuzz_claim::
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
};

use crate::common::*;
use crate::fuzzing::{json, nasty_string, raw_body, run};
use axum::{
    body::Body,
    http::{Method, StatusCode},
};
use bridgekeys_appservice::{Limits, paths};
use proptest::prelude::*;
use serde_json::Value;

const CASES: u32 = 256;
const PROVISIONED: [&str; 2] = ["@echo_0:localhost", "@echo_1:localhost"];

fn limits() -> Limits {
    {
        let mut c = Limits::default();
        c.max_body_bytes = 256 * 1024;
        c.max_keys_per_device = 20;
        c.max_devices_per_claim = 16;
        c
    }
}

/// A listener with two provisioned puppets, and every key id it served.
struct Rig {
    fx: Fixture,
    served: Mutex<HashSet<String>>,
    _dir: tempfile::TempDir,
}

fn rig(rt: &tokio::runtime::Runtime) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let fx = rt.block_on(async {
        let fx = Fixture::open(dir.path(), limits());
        fx.provision(2).await;
        fx
    });
    Rig {
        fx,
        served: Mutex::new(HashSet::new()),
        _dir: dir,
    }
}

/// Send `body` to one of the claim paths and check the answer against the
/// promise. `request` is the body as parsed JSON, if it is JSON.
fn claim_and_check(rt: &tokio::runtime::Runtime, rig: &Rig, path: usize, body: Vec<u8>) {
    let fx = &rig.fx;
    let path = paths::CLAIM[path % paths::CLAIM.len()];
    let before = fx.state();
    let (status, answer) =
        rt.block_on(fx.call(authed(Method::POST, path, Body::from(body.clone()))));
    if status.is_client_error() {
        assert!(answer["errcode"].is_string(), "{status}: {answer}");
        assert!(answer["error"].is_string(), "{status}: {answer}");
        assert_eq!(fx.state(), before, "a refused claim changed state");
        return;
    }
    assert_eq!(status, StatusCode::OK, "neither 200 nor 4xx: {answer}");
    // A 200 is only possible for a body of the right shape.
    let request: BTreeMap<String, BTreeMap<String, Vec<String>>> =
        serde_json::from_slice(&body).expect("a 200 for a body that is not a claim request");
    let answer = answer.as_object().expect("the answer is an object");
    let mut issued = 0u64;
    for (user, devices) in answer {
        assert!(PROVISIONED.contains(&user.as_str()), "keys for {user}");
        let devices = devices.as_object().expect("devices object");
        for (device_id, keys) in devices {
            assert_eq!(
                device_id, "PUPPETDEV",
                "keys for unknown device {device_id}"
            );
            let keys = keys.as_object().expect("keys object");
            let asked = request[user][device_id]
                .iter()
                .filter(|a| *a == "signed_curve25519")
                .count();
            assert_eq!(
                keys.len(),
                asked,
                "{user}/{device_id}: keys served vs asked"
            );
            let user_id: ruma::OwnedUserId = user.as_str().try_into().unwrap();
            for (key_id, key) in keys {
                assert_signed_key(&fx.manager, &user_id, &device(), key_id, key);
                assert!(
                    rig.served
                        .lock()
                        .unwrap()
                        .insert(format!("{user}/{device_id}/{key_id}")),
                    "key {key_id} of {user} served twice"
                );
            }
            issued += keys.len() as u64;
        }
    }
    // Every provisioned device asked for a key got its keys.
    for user in PROVISIONED {
        let asked = request
            .get(user)
            .and_then(|d| d.get("PUPPETDEV"))
            .is_some_and(|a| a.iter().any(|a| a == "signed_curve25519"));
        assert_eq!(
            asked,
            answer
                .get(user)
                .is_some_and(|d| d.get("PUPPETDEV").is_some()),
            "{user}: served iff asked"
        );
    }
    let after = fx.state();
    assert_eq!(after.1 - before.1, issued, "keys counted as issued");
    assert_eq!(
        (after.2, after.3, after.4),
        (before.2, before.3, before.4),
        "a claim created a device or called the bridge"
    );
    if issued == 0 {
        assert_eq!(after, before, "a claim serving nothing changed state");
    }
}

/// An algorithm list: mostly the served algorithm, sometimes more than the
/// per-device cap, sometimes junk.
fn algorithms() -> impl Strategy<Value = Vec<String>> {
    let algorithm = prop_oneof![
        4 => Just("signed_curve25519".to_owned()),
        1 => Just("curve25519".to_owned()),
        1 => Just("signed_curve25519 ".to_owned()),
        1 => nasty_string(),
    ];
    prop_oneof![
        4 => proptest::collection::vec(algorithm.clone(), 0..5),
        1 => proptest::collection::vec(algorithm, 0..30),
    ]
}

/// A claim-shaped request: users -> devices -> algorithms, with ids from
/// the namespace (provisioned or not), foreign, malformed or huge; now and
/// then a value of the wrong shape.
fn claim_request() -> impl Strategy<Value = Value> {
    let device = prop_oneof![
        3 => Just("PUPPETDEV".to_owned()),
        1 => nasty_string(),
    ];
    let device_value = prop_oneof![
        9 => algorithms().prop_map(Value::from),
        1 => json(),
    ];
    let devices = proptest::collection::btree_map(device, device_value, 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    let user_value = prop_oneof![
        9 => devices,
        1 => json(),
    ];
    proptest::collection::btree_map(nasty_string(), user_value, 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

#[test]
fn arbitrary_claim_bodies_never_panic_and_answer_a_matrix_error_with_no_state_change() {
    let _ = run(
        CASES,
        rig,
        (any::<usize>(), raw_body()),
        |rt, rig, (path, body)| claim_and_check(rt, rig, path, body),
    );
}

#[test]
fn claim_shaped_requests_serve_exactly_the_keys_asked_of_provisioned_devices_and_nothing_else() {
    let rig = run(
        CASES,
        rig,
        (any::<usize>(), claim_request()),
        |rt, rig, (path, request)| {
            claim_and_check(rt, rig, path, serde_json::to_vec(&request).unwrap());
        },
    );
    let served = rig.served.lock().unwrap().len();
    assert!(served > 0, "the run never reached a served key");
    eprintln!("keys served over the run: {served}");
}

#[test]
fn huge_key_and_device_counts_are_refused_whole_with_no_state_change() {
    let _ = run(
        32,
        rig,
        (any::<usize>(), 21usize..5000, 17usize..3000, any::<bool>()),
        |rt, rig, (path, keys, devices, many_keys)| {
            let mut request = serde_json::Map::new();
            request.insert(
                "@echo_0:localhost".into(),
                serde_json::json!({"PUPPETDEV": ["signed_curve25519"]}),
            );
            if many_keys {
                request.insert(
                    "@echo_1:localhost".into(),
                    serde_json::json!({"PUPPETDEV": vec!["signed_curve25519"; keys]}),
                );
            } else {
                for i in 0..devices {
                    request.insert(
                        format!("@echo_{i}:localhost"),
                        serde_json::json!({"PUPPETDEV": ["signed_curve25519"]}),
                    );
                }
            }
            let before = rig.fx.state();
            let (status, answer) = rt.block_on(rig.fx.call(authed(
                Method::POST,
                paths::CLAIM[path % paths::CLAIM.len()],
                json_body(&Value::Object(request)),
            )));
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            assert_eq!(answer["errcode"], "M_INVALID_PARAM");
            assert!(answer["error"].is_string());
            assert_eq!(rig.fx.state(), before);
        },
    );
}
