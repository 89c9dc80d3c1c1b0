//! Property tests (fuzzing) of the transaction listener, sent in-process:
//! arbitrary bodies and transaction ids never panic it; a refused body is a
//! 4xx Matrix error that changed nothing and was not recorded, so a valid
//! body resent under the same id is still processed. To-device pre-key
//! messages (`m.room.encrypted`, `ciphertext.{curve25519}.body`, `type: 0`)
//! with garbage or mutated parts never consume the puppet's one-time key:
//! the valid message still decrypts in a later transaction.
//!
//! Default case counts keep `cargo test --workspace` fast. Longer run:
//!
//! ```sh
//! PROPTEST_CASES=5000 cargo test -p bridgekeys-appservice --test it fuzz_transactions::
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::*;
use crate::fuzzing::{Mutation, apply, json, mutations, nasty_string, path_segment, raw_body, run};
use axum::{
    body::Body,
    http::{Method, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use bridgekeys_appservice::Limits;
use bridgekeys_olm::vodozemac::{
    Curve25519PublicKey,
    olm::{Account, OlmMessage, SessionConfig},
};
use bridgekeys_store::{DeviceKey, Store, TransactionLog};
use proptest::prelude::*;
use ruma::OneTimeKeyAlgorithm;
use serde_json::{Value, json};

const CASES: u32 = 256;
/// The content of the peer's (valid) payload, as the handler sees it.
const PLAINTEXT: &str = "{\"n\":1}";

fn limits() -> Limits {
    {
        let mut c = Limits::default();
        c.max_body_bytes = 256 * 1024;
        c
    }
}

/// A listener with one provisioned puppet, and a counter for fresh ids.
struct Rig {
    fx: Fixture,
    next: AtomicUsize,
    _dir: tempfile::TempDir,
}

fn rig(rt: &tokio::runtime::Runtime) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let fx = rt.block_on(async {
        let fx = Fixture::open(dir.path(), limits());
        fx.provision(1).await;
        fx
    });
    Rig {
        fx,
        next: AtomicUsize::new(0),
        _dir: dir,
    }
}

impl Rig {
    /// A transaction id never used before, ending in `suffix`.
    fn fresh_id(&self, suffix: &str) -> String {
        format!("fz{}-{suffix}", self.next.fetch_add(1, Ordering::SeqCst))
    }

    fn put(
        &self,
        rt: &tokio::runtime::Runtime,
        legacy: bool,
        id: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let prefix = if legacy {
            "/transactions/"
        } else {
            "/_matrix/app/v1/transactions/"
        };
        let path = format!("{prefix}{}", path_segment(id));
        rt.block_on(self.fx.call(authed(Method::PUT, &path, Body::from(body))))
    }

    fn completed(&self, id: &str) -> bool {
        self.fx.store.transaction_completed(TXN_NS, id).unwrap()
    }

    fn handler_calls(&self) -> usize {
        self.fx.handler.calls.load(Ordering::SeqCst)
    }

    /// Send `body` under a fresh id and check the promise: a 4xx changed
    /// nothing, was not recorded, and the valid body resent under the same
    /// id is processed; a 200 was processed once and its resend is not.
    /// Returns the status.
    fn send_and_check(
        &self,
        rt: &tokio::runtime::Runtime,
        legacy: bool,
        suffix: &str,
        body: Vec<u8>,
    ) -> StatusCode {
        let id = self.fresh_id(suffix);
        let before = self.fx.state();
        let (status, answer) = self.put(rt, legacy, &id, body.clone());
        if status.is_client_error() {
            assert!(answer["errcode"].is_string(), "{status}: {answer}");
            assert!(answer["error"].is_string(), "{status}: {answer}");
            assert_eq!(
                self.fx.state(),
                before,
                "a refused transaction changed state"
            );
            assert!(!self.completed(&id), "a refused transaction was recorded");
            let calls = self.handler_calls();
            let (resent, answer) = self.put(
                rt,
                legacy,
                &id,
                serde_json::to_vec(&json!({"events": []})).unwrap(),
            );
            assert_eq!(
                resent,
                StatusCode::OK,
                "valid resend after refusal: {answer}"
            );
            assert_eq!(
                self.handler_calls(),
                calls + 1,
                "the valid resend was not processed"
            );
            assert!(self.completed(&id));
            return status;
        }
        assert_eq!(status, StatusCode::OK, "neither 200 nor 4xx: {answer}");
        assert_eq!(
            self.handler_calls(),
            before.3 + 1,
            "a 200 without processing"
        );
        assert!(self.completed(&id), "a 200 not recorded");
        let (again, answer) = self.put(rt, legacy, &id, body);
        assert_eq!(again, StatusCode::OK, "{answer}");
        assert_eq!(
            self.handler_calls(),
            before.3 + 1,
            "a repeated id was processed again"
        );
        status
    }
}

/// A body of a transaction's shape whose members are sometimes of the
/// wrong type or missing.
fn nearly_valid_transaction() -> impl Strategy<Value = Value> {
    let to_device = prop_oneof![
        3 => (
            nasty_string(),
            nasty_string(),
            prop_oneof![Just("m.room.encrypted".to_owned()), nasty_string()],
            nasty_string(),
            json(),
        )
            .prop_map(|(user, device, kind, sender, content)| json!({
                "to_user_id": user, "to_device_id": device, "type": kind,
                "sender": sender, "content": content,
            })),
        1 => json(),
    ];
    let member = |key: &'static str| {
        prop_oneof![
            Just(None),
            json().prop_map(move |v| Some((key, v))),
            proptest::collection::vec(json(), 0..4).prop_map(move |v| Some((key, Value::Array(v)))),
        ]
    };
    (
        prop_oneof![
            4 => proptest::collection::vec(json(), 0..4).prop_map(|v| Some(Value::Array(v))),
            1 => proptest::option::of(json()),
        ],
        proptest::collection::vec(to_device, 0..3),
        any::<bool>(),
        (
            member("ephemeral"),
            member("de.sorunome.msc2409.ephemeral"),
            member("org.matrix.msc3202.device_one_time_keys_count"),
            member("org.matrix.msc3202.device_one_time_key_counts"),
            member("org.matrix.msc3202.device_unused_fallback_key_types"),
            member("org.matrix.msc3202.device_lists"),
        ),
    )
        .prop_map(|(events, to_device, unstable, members)| {
            let mut body = serde_json::Map::new();
            if let Some(events) = events {
                body.insert("events".into(), events);
            }
            let name = if unstable {
                "de.sorunome.msc2409.to_device"
            } else {
                "to_device"
            };
            body.insert(name.into(), Value::Array(to_device));
            let (a, b, c, d, e, f) = members;
            for (key, value) in [a, b, c, d, e, f].into_iter().flatten() {
                body.insert(key.into(), value);
            }
            Value::Object(body)
        })
}

#[test]
fn arbitrary_transaction_bodies_never_panic_and_a_refused_one_is_not_recorded_so_its_valid_resend_is_processed()
 {
    let rig = run(
        CASES,
        rig,
        (
            any::<bool>(),
            nasty_string(),
            prop_oneof![
                raw_body(),
                nearly_valid_transaction().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            ],
        ),
        |rt, rig, (legacy, suffix, body)| {
            rig.send_and_check(rt, legacy, &suffix, body);
        },
    );
    assert!(rig.handler_calls() > 0);
}

/// How a to-device pre-key message is spoiled.
#[derive(Clone, Debug)]
enum Spoil {
    /// The message bytes mutated, then base64-encoded.
    Bytes(Vec<Mutation>),
    /// The base64 body text mutated.
    Text(Vec<Mutation>),
    /// An arbitrary body string.
    Body(String),
    /// An arbitrary `type`.
    Type(Value),
    /// An arbitrary `sender_key`.
    SenderKey(String),
    /// A different but valid curve25519 `sender_key`.
    OtherSender([u8; 32]),
    /// Arbitrary `algorithm`.
    Algorithm(String),
    /// The whole ciphertext entry replaced.
    Ciphertext(Value),
    /// The whole content replaced.
    Content(Value),
    /// Nothing: the valid message (the success path of the property).
    Nothing,
}

fn spoil() -> impl Strategy<Value = Spoil> {
    prop_oneof![
        4 => mutations().prop_map(Spoil::Bytes),
        2 => mutations().prop_map(Spoil::Text),
        1 => nasty_string().prop_map(Spoil::Body),
        1 => prop_oneof![
            Just(json!(1)),
            Just(json!("0")),
            Just(json!(-1)),
            Just(json!(256)),
            Just(json!(0.0)),
            json(),
        ]
        .prop_map(Spoil::Type),
        1 => nasty_string().prop_map(Spoil::SenderKey),
        1 => proptest::array::uniform32(any::<u8>()).prop_map(Spoil::OtherSender),
        1 => nasty_string().prop_map(Spoil::Algorithm),
        1 => json().prop_map(Spoil::Ciphertext),
        1 => json().prop_map(Spoil::Content),
        1 => Just(Spoil::Nothing),
    ]
}

#[test]
fn spoiled_prekey_to_device_messages_never_panic_nor_consume_the_key_and_the_valid_one_decrypts_later()
 {
    let rig = run(
        CASES,
        rig,
        (any::<bool>(), spoil()),
        |rt, rig, (legacy, spoil)| {
            let fx = &rig.fx;
            let key = rt
                .block_on(fx.manager.claim(
                    &puppet(0),
                    &device(),
                    &OneTimeKeyAlgorithm::SignedCurve25519,
                    1,
                ))
                .unwrap()
                .remove(0);
            let otk = Curve25519PublicKey::from_slice(key.key.key.as_bytes()).unwrap();
            let identity = fx.manager.identity_keys(&puppet(0), &device()).unwrap();
            let peer = Account::new();
            let mut session = peer
                .create_outbound_session(SessionConfig::version_1(), identity.curve25519, otk)
                .unwrap();
            let payload = json!({
                "type": "m.dummy", "content": {"n": 1},
                "sender": "@alice:localhost", "recipient": "@echo_0:localhost",
                "recipient_keys": {"ed25519": identity.ed25519.to_base64()},
                "keys": {"ed25519": peer.ed25519_key().to_base64()},
            });
            let OlmMessage::PreKey(message) = session.encrypt(payload.to_string()).unwrap() else {
                panic!("first message of a session is a pre-key message")
            };
            let curve = identity.curve25519.to_base64();
            let valid = json!({
                "to_user_id": "@echo_0:localhost", "to_device_id": "PUPPETDEV",
                "type": "m.room.encrypted", "sender": "@alice:localhost",
                "content": {
                    "algorithm": "m.olm.v1.curve25519-aes-sha2",
                    "sender_key": peer.curve25519_key().to_base64(),
                    "ciphertext": {curve.clone(): {"type": 0, "body": message.to_base64()}}
                }
            });
            let mut spoiled = valid.clone();
            let content = &mut spoiled["content"];
            match &spoil {
                Spoil::Bytes(m) => {
                    let mut bytes = message.to_bytes();
                    apply(&mut bytes, m);
                    content["ciphertext"][&curve]["body"] = STANDARD_NO_PAD.encode(bytes).into();
                }
                Spoil::Text(m) => {
                    let mut text = message.to_base64().into_bytes();
                    apply(&mut text, m);
                    content["ciphertext"][&curve]["body"] =
                        String::from_utf8_lossy(&text).into_owned().into();
                }
                Spoil::Body(s) => content["ciphertext"][&curve]["body"] = s.clone().into(),
                Spoil::Type(t) => content["ciphertext"][&curve]["type"] = t.clone(),
                Spoil::SenderKey(s) => content["sender_key"] = s.clone().into(),
                Spoil::OtherSender(b) => {
                    content["sender_key"] = Curve25519PublicKey::from_bytes(*b).to_base64().into();
                }
                Spoil::Algorithm(s) => content["algorithm"] = s.clone().into(),
                Spoil::Ciphertext(v) => content["ciphertext"][&curve] = v.clone(),
                Spoil::Content(v) => *content = v.clone(),
                Spoil::Nothing => {}
            }
            let dev = DeviceKey::new("@echo_0:localhost", "PUPPETDEV");
            let stored = || {
                fx.store
                    .one_time_key(&dev, otk.as_bytes())
                    .unwrap()
                    .is_some()
            };
            let seen_before = fx.handler.seen.lock().unwrap().len();
            let to_device = |msg: &Value| {
                serde_json::to_vec(&json!({"events": [], "to_device": [msg]})).unwrap()
            };
            let status = rig.send_and_check(rt, legacy, "spoiled", to_device(&spoiled));
            let decrypted = {
                let seen = fx.handler.seen.lock().unwrap();
                assert!(
                    seen.len() > seen_before,
                    "{status}: the handler saw nothing"
                );
                let last = seen.last().unwrap().clone();
                last.decrypted
            };
            if decrypted.is_empty() {
                assert!(stored(), "{spoil:?}: a refused message consumed the key");
                rig.send_and_check(rt, legacy, "valid", to_device(&valid));
                let seen = fx.handler.seen.lock().unwrap();
                let last = seen.last().unwrap();
                assert_eq!(
                    last.decrypted.len(),
                    1,
                    "{spoil:?}: the valid message no longer decrypts: {:?}",
                    last.other_to_device
                );
                assert_eq!(last.decrypted[0].2, PLAINTEXT.as_bytes());
            } else {
                // Only the message itself (in an equivalent encoding) may
                // decrypt, and only to its own plaintext.
                assert_eq!(decrypted.len(), 1);
                assert_eq!(decrypted[0].2, PLAINTEXT.as_bytes(), "{spoil:?}");
                assert!(
                    !matches!(spoil, Spoil::OtherSender(_) | Spoil::SenderKey(_)),
                    "{spoil:?}: decrypted under a sender key not the peer's"
                );
            }
            assert!(!stored(), "the key outlived its message");
        },
    );
    assert!(rig.fx.manager.stats().prekeys_decrypted > 0);
}
