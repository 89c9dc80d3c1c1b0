//! Property tests (fuzzing) of the echo-bridge `config.toml` parser:
//! arbitrary text, TOML-shaped garbage and mutations of a valid file never
//! panic `Config::load`, nor `store_key` and `store_dir` on what it accepts;
//! and `store_key` accepts exactly 64 hex digits.
//!
//! Default case counts keep `cargo test --workspace` fast. Longer run:
//!
//! ```sh
//! PROPTEST_CASES=50000 cargo test -p echo-bridge --features demo --test it fuzz_config::
//! ```
#![allow(clippy::unwrap_used)]

use std::path::Path;

use echo_bridge::{Config, InitOptions, init};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256),
        )
    }
}

/// Load `text` as a config file in `dir`, and use what it accepts.
fn load(dir: &Path, text: &[u8]) -> Option<Config> {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).ok()?;
    let _ = config.store_key();
    let _ = config.store_dir();
    let _ = format!("{config:?}");
    Some(config)
}

/// A valid config file, as `init` writes it.
fn valid_config() -> String {
    let dir = tempfile::tempdir().unwrap();
    let done = init(&InitOptions {
        dir: dir.path().join("bridge"),
        homeserver_url: "http://127.0.0.1:8008".into(),
        server_name: "example.org".into(),
        listen: "127.0.0.1:29300".parse().unwrap(),
        database: None,
    })
    .unwrap();
    std::fs::read_to_string(done.config).unwrap()
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"\"".to_owned()),
        Just("\"127.0.0.1:29300\"".to_owned()),
        Just("\"[::1]:0\"".to_owned()),
        Just("\"registration.yaml\"".to_owned()),
        Just(format!("\"{}\"", "ab".repeat(32))),
        Just(format!("\"{}\"", "é".repeat(32))),
        Just("1979-05-27T07:32:00Z".to_owned()),
        Just("inf".to_owned()),
        Just("nan".to_owned()),
        Just("0x7fffffffffffffff".to_owned()),
        Just("[1, \"a\", [true]]".to_owned()),
        Just("{ a = 1, b = { c = [] } }".to_owned()),
        Just("'''multi\nline'''".to_owned()),
        Just("\"\\uD800\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"\\PC{0,20}\"",
        "\\PC{0,20}",
    ]
}

fn toml_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("homeserver_url"),
        Just("server_name"),
        Just("listen"),
        Just("registration"),
        Just("store_key"),
        Just("store_path"),
        Just("\"quoted key\""),
        Just("a.b.c"),
        Just("[table]"),
        Just("[[array]]"),
        Just(""),
    ];
    (key, toml_value()).prop_map(|(key, value)| {
        if key.starts_with('[') {
            key.to_owned()
        } else {
            format!("{key} = {value}")
        }
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_the_config_parser(
        text in prop_oneof![
            any::<String>().prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..256),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        load(dir.path(), &text);
    }

    #[test]
    fn config_shaped_garbage_never_panics_the_config_parser(
        lines in proptest::collection::vec(toml_line(), 0..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        load(dir.path(), lines.join("\n").as_bytes());
    }

    #[test]
    fn a_mutated_valid_config_never_panics_the_parser(
        cut in any::<usize>(),
        insert in toml_value(),
    ) {
        let valid = VALID.with(Clone::clone);
        let dir = tempfile::tempdir().unwrap();
        let mut at = cut % (valid.len() + 1);
        while !valid.is_char_boundary(at) {
            at -= 1;
        }
        load(dir.path(), format!("{}{insert}{}", &valid[..at], &valid[at..]).as_bytes());
        load(dir.path(), &valid.as_bytes()[..at]);
    }

    #[test]
    fn store_key_accepts_exactly_64_hex_digits(
        key in prop_oneof![
            "[0-9a-fA-F]{64}",
            "[0-9a-fA-F]{0,70}",
            "\\PC{0,70}",
            "[0-9a-f]{62}\\PC{1,2}",
            " [0-9a-f]{64}\t",
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let text = VALID.with(Clone::clone);
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("store_key") {
                    format!("store_key = {}", toml_string(&key))
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = load(dir.path(), text.as_bytes()).expect("the rest of the file is valid");
        let trimmed = key.trim();
        let is_key = trimmed.len() == 64 && trimmed.chars().all(|c| c.is_ascii_hexdigit());
        prop_assert_eq!(config.store_key().is_ok(), is_key, "{:?}", key);
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Regression (found by this fuzzing): a sign passed for a hex digit, so
/// "+a" decoded as 0x0a and a 64-character key with `+` in it was accepted.
#[test]
fn a_store_key_with_a_sign_in_it_is_refused_not_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let valid = VALID.with(Clone::clone);
    for bad in [
        format!("{}+A", "0a".repeat(31)),
        format!("+a{}", "0a".repeat(31)),
        format!("{}-0", "0a".repeat(31)),
    ] {
        let text = valid
            .lines()
            .map(|l| {
                if l.starts_with("store_key") {
                    format!("store_key = \"{bad}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = load(dir.path(), text.as_bytes()).unwrap();
        assert!(config.store_key().is_err(), "{bad} was taken as a key");
    }
}

thread_local! {
    static VALID: String = valid_config();
}

#[test]
fn deeply_nested_toml_is_refused_without_overflowing_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    for depth in [1_000, 100_000] {
        let arrays = format!("listen = {}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(load(dir.path(), arrays.as_bytes()).is_none(), "{depth}");
        let tables = format!("listen = {}1{}", "{ a = ".repeat(depth), " }".repeat(depth));
        assert!(load(dir.path(), tables.as_bytes()).is_none(), "{depth}");
    }
}
