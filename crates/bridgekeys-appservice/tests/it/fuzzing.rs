//! Shared pieces of the listener's property tests (fuzzing): the case
//! count, a runner over one fixture, and strategies for untrusted JSON.

use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::Value;

/// `default` cases per property unless `PROPTEST_CASES` says otherwise.
/// Failures are shrunk and printed, not persisted: a bug found gets a named
/// regression test instead.
pub fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default),
        )
    }
}

/// Run `check` on generated values against shared state `rig`, driving the
/// async listener on a 2-worker runtime. Returns the rig, for checks that
/// the run reached what it meant to.
pub fn run<R, S: Strategy>(
    default_cases: u32,
    make: impl FnOnce(&tokio::runtime::Runtime) -> R,
    strategy: S,
    check: impl Fn(&tokio::runtime::Runtime, &R, S::Value),
) -> R {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rig = make(&rt);
    let mut runner = TestRunner::new(config(default_cases));
    runner
        .run(&strategy, |value| {
            check(&rt, &rig, value);
            Ok(())
        })
        .unwrap();
    rig
}

/// Strings an attacker would try: ids of the namespace, provisioned and
/// not, foreign and malformed ids, algorithm names, control characters,
/// very long strings, arbitrary Unicode.
pub fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("@echo_0:localhost".to_owned()),
        Just("@echo_1:localhost".to_owned()),
        Just("@echo_9:localhost".to_owned()),
        Just("@alice:localhost".to_owned()),
        Just("PUPPETDEV".to_owned()),
        Just(String::new()),
        Just("signed_curve25519".to_owned()),
        Just("curve25519".to_owned()),
        Just("\u{0}".to_owned()),
        Just(format!("@echo_{}:localhost", "a".repeat(300))),
        "@echo_[a-zA-Z0-9_.=/-]{0,12}:[a-z.:0-9]{0,12}",
        "@\\PC{0,16}",
        "\\PC{0,24}",
        any::<String>(),
    ]
}

/// Arbitrary JSON, a few levels deep.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(nasty_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A raw request body: JSON text or arbitrary bytes, possibly not UTF-8.
pub fn raw_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        proptest::collection::vec(any::<u8>(), 0..256),
        Just(b"{".to_vec()),
        Just(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes()),
        Just(
            format!(
                "{{\"events\": {}{}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes()
        ),
    ]
}

/// Percent-encode every byte but the unreserved ones, for a path segment.
pub fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A mutation of a byte string: flip, set, insert, remove, truncate, append.
#[derive(Clone, Debug)]
pub enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    Append(Vec<u8>),
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ];
    proptest::collection::vec(one, 1..5)
}

pub fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip(i, b) if len > 0 => bytes[i % len] ^= b,
            Mutation::Set(i, b) if len > 0 => bytes[i % len] = *b,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), *b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            Mutation::Append(tail) => bytes.extend_from_slice(tail),
            _ => {}
        }
    }
}
