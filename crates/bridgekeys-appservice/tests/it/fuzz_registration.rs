//! Property tests (fuzzing) of the registration YAML parser: arbitrary text
//! and YAML-shaped garbage never panic `Registration::from_yaml`, and any
//! registration round-trips through `to_yaml` and `from_yaml` unchanged.
//!
//! Default case counts keep `cargo test --workspace` fast. Longer run:
//!
//! ```sh
//! PROPTEST_CASES=50000 cargo test -p bridgekeys-appservice --test it fuzz_registration::
//! ```

use bridgekeys_appservice::{NamespaceEntry, Namespaces, Registration};
use proptest::prelude::*;

use crate::fuzzing;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    fuzzing::config(256)
}

/// A scalar, collection or YAML syntax fragment.
fn yaml_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("~".to_owned()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("no".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("[a, {b: c}]".to_owned()),
        Just("&anchor".to_owned()),
        Just("*anchor".to_owned()),
        Just("!!binary".to_owned()),
        Just("!custom".to_owned()),
        Just("|".to_owned()),
        Just(">-".to_owned()),
        Just("- ".to_owned()),
        Just("? ".to_owned()),
        Just("<<: *anchor".to_owned()),
        Just("---".to_owned()),
        Just("...".to_owned()),
        Just("%YAML 1.2".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("'it''s'".to_owned()),
        Just("1e400".to_owned()),
        Just("-0x7fffffffffffffff".to_owned()),
        Just("\t".to_owned()),
        "[a-z_.]{0,12}",
        "\\PC{0,12}",
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

/// A line of a registration-shaped document: a known (or odd) key, some
/// indentation and a value made of tokens.
fn yaml_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("id"),
        Just("url"),
        Just("as_token"),
        Just("hs_token"),
        Just("sender_localpart"),
        Just("rate_limited"),
        Just("receive_ephemeral"),
        Just("de.sorunome.msc2409.push_ephemeral"),
        Just("org.matrix.msc3202"),
        Just("io.element.msc4190"),
        Just("namespaces"),
        Just("users"),
        Just("aliases"),
        Just("rooms"),
        Just("regex"),
        Just("exclusive"),
        Just("protocols"),
        Just("- regex"),
        Just(""),
    ];
    (
        0usize..6,
        key,
        proptest::collection::vec(yaml_token(), 0..3),
    )
        .prop_map(|(indent, key, value)| {
            format!("{}{key}: {}", " ".repeat(indent), value.join(" "))
        })
}

fn entry() -> impl Strategy<Value = NamespaceEntry> {
    (any::<String>(), any::<bool>())
        .prop_map(|(regex, exclusive)| NamespaceEntry { regex, exclusive })
}

fn registration() -> impl Strategy<Value = Registration> {
    let entries = || proptest::collection::vec(entry(), 0..3);
    (
        (
            any::<String>(),
            proptest::option::of(any::<String>()),
            any::<String>(),
            any::<String>(),
            any::<String>(),
        ),
        (
            proptest::option::of(any::<bool>()),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (entries(), entries(), entries()),
        proptest::collection::vec(any::<String>(), 0..3),
    )
        .prop_map(
            |(
                (id, url, as_token, hs_token, sender_localpart),
                (rate_limited, receive_ephemeral, push_ephemeral_unstable, msc3202, msc4190),
                (users, aliases, rooms),
                protocols,
            )| Registration {
                id,
                url,
                as_token,
                hs_token,
                sender_localpart,
                rate_limited,
                receive_ephemeral,
                push_ephemeral_unstable,
                msc3202,
                msc4190,
                namespaces: Namespaces {
                    users,
                    aliases,
                    rooms,
                },
                protocols,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics_the_registration_parser(text in any::<String>()) {
        let _ = Registration::from_yaml(&text);
    }

    #[test]
    fn registration_shaped_garbage_never_panics_the_registration_parser(
        lines in proptest::collection::vec(yaml_line(), 0..24),
    ) {
        let _ = Registration::from_yaml(&lines.join("\n"));
    }

    #[test]
    fn a_mutated_valid_registration_never_panics_the_parser(
        cut in any::<usize>(),
        insert in yaml_token(),
    ) {
        let yaml = Registration::generate("echo", "http://127.0.0.1:1", "echo_bot", "@echo_.*:localhost")
            .to_yaml()
            .unwrap();
        let mut at = cut % (yaml.len() + 1);
        while !yaml.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{insert}{}", &yaml[..at], &yaml[at..]);
        let _ = Registration::from_yaml(&mutated);
        let _ = Registration::from_yaml(&yaml[..at]);
    }

    #[test]
    fn any_registration_round_trips_through_yaml_unchanged(reg in registration()) {
        let yaml = reg.to_yaml().unwrap();
        let back = Registration::from_yaml(&yaml)
            .unwrap_or_else(|e| panic!("{e}: the YAML we wrote does not parse:\n{yaml}"));
        prop_assert_eq!(&back, &reg, "YAML:\n{}", yaml);
    }

    #[test]
    fn a_generated_registration_round_trips_through_yaml_unchanged(
        id in any::<String>(),
        url in any::<String>(),
        localpart in any::<String>(),
        regex in any::<String>(),
    ) {
        let reg = Registration::generate(id, url, localpart, regex);
        let back = Registration::from_yaml(&reg.to_yaml().unwrap()).unwrap();
        prop_assert_eq!(back, reg);
    }
}

/// Regression (found by this fuzzing): 100 000 nested `[` or `{` took over a
/// minute to refuse, the parser's time growing with the square of the depth.
#[test]
fn deeply_nested_flow_yaml_is_refused_at_once_not_in_quadratic_time() {
    let depth = 100_000;
    let started = std::time::Instant::now();
    for yaml in [
        format!("id: {}{}", "[".repeat(depth), "]".repeat(depth)),
        format!("namespaces: {}x", "{a: ".repeat(depth)),
        format!("id: {}", "[".repeat(depth)),
    ] {
        let err = Registration::from_yaml(&yaml).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }
    // Generous for a slow shared machine; it was over 60 s.
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn nesting_within_the_limit_still_parses_as_before() {
    let reg = Registration::generate("echo", "http://h:1", "echo_bot", "@echo_[a-z]{1,3}:hs");
    let yaml = reg.to_yaml().unwrap();
    assert_eq!(Registration::from_yaml(&yaml).unwrap(), reg);
    // 100 levels: refused by the type (not by the depth guard), as before.
    let nested = format!("id: {}{}", "[".repeat(100), "]".repeat(100));
    let err = Registration::from_yaml(&nested).unwrap_err();
    assert!(!err.to_string().contains("nested deeper"), "{err}");
}

#[test]
fn an_alias_expansion_bomb_is_refused_quickly() {
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        yaml.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    yaml.push_str("id: *a11\n");
    assert!(Registration::from_yaml(&yaml).is_err());
}

/// A namespace regex built from regex syntax fragments, balanced or not.
fn namespace_regex() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("@echo_"),
        Just(".*"),
        Just(":localhost"),
        Just("("),
        Just(")"),
        Just("|"),
        Just("[a-z]"),
        Just("["),
        Just("]"),
        Just("\\"),
        Just("\\."),
        Just("*"),
        Just("+"),
        Just("?"),
        Just("^"),
        Just("$"),
        Just("{2}"),
        Just("(?i)"),
        Just("(?:"),
        Just("x"),
    ];
    proptest::collection::vec(fragment, 0..8).prop_map(|f| f.concat())
}

fn user_id() -> impl Strategy<Value = ruma::OwnedUserId> {
    prop_oneof![
        "@echo_[a-z0-9]{0,6}:localhost",
        "@[a-z_]{1,8}:localhost",
        "@[a-z_]{1,8}:[a-z]{1,6}\\.org",
        Just("@x:localhost".to_owned()),
        Just("@echo_x:localhost".to_owned()),
    ]
    .prop_map(|s| s.as_str().try_into().unwrap())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_namespace_regex_means_what_it_means_alone_anchored_at_the_start_or_is_refused(
        regex in namespace_regex(),
        users in proptest::collection::vec(user_id(), 1..6),
    ) {
        let namespace = bridgekeys_appservice::UserNamespace::new([regex.as_str()], None);
        match regex::Regex::new(&regex) {
            Err(_) => prop_assert!(
                namespace.is_err(),
                "{:?} is not a regex, yet it was accepted as a namespace",
                regex
            ),
            Ok(alone) => {
                let namespace = namespace.unwrap();
                for user in &users {
                    // Synapse's re.match: a match starting at the start.
                    // The leftmost match starts there if any does.
                    let synapse = alone.find(user.as_str()).is_some_and(|m| m.start() == 0);
                    prop_assert_eq!(namespace.contains(user), synapse, "{:?} on {}", regex, user);
                }
            }
        }
    }
}

/// Regression (found by this fuzzing): a regex that is malformed alone but
/// balanced once wrapped in `^(?:…)` was accepted, and `x)|(.*` then claimed
/// every user (Synapse refuses such a registration outright).
#[test]
fn a_namespace_regex_that_only_compiles_wrapped_is_refused() {
    for regex in [")(", "x)|(.*", "@echo_.*:localhost)|(@.*"] {
        assert!(
            bridgekeys_appservice::UserNamespace::new([regex], None).is_err(),
            "{regex} accepted"
        );
    }
    let mut reg = Registration::generate("echo", "http://h:1", "echo_bot", "@echo_.*:hs)|(.*");
    reg.namespaces.users[0].exclusive = true;
    assert!(
        bridgekeys_appservice::AppserviceConfig::from_registration(&reg, ruma::server_name!("hs"))
            .is_err()
    );
}
