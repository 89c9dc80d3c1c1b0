//! The project's documents stay true to the code: every test they cite as
//! proof of an invariant exists, and they stand alone (nothing points
//! outside the repository into the proposals we read).
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project's Markdown documents.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.push(root.join("README.md"));
    docs.push(root.join("examples/echo-bridge/README.md"));
    docs
}

/// Every `fn name` in the Rust sources under `dir`.
fn functions(dir: &Path, into: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                functions(&path, into);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for rest in text.split("fn ").skip(1) {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                into.insert(name);
            }
        }
    }
}

/// Test names cited as `file.rs::name` (or `...::name`); `Type::field`
/// and `module::item` paths are not citations.
fn cited_tests(text: &str) -> Vec<String> {
    text.match_indices("::")
        .filter(|(at, _)| {
            let before = &text[..*at];
            // `file.rs::name`, `...::name`, or `file.rs::module::name`.
            before.ends_with(".rs")
                || before.ends_with("...")
                || before.rsplit_once("::").is_some_and(|(head, module)| {
                    head.ends_with(".rs")
                        && !module.is_empty()
                        && module.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
        })
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // A module on the way to the test is not a test itself.
            (!rest[name.len()..].starts_with("::")).then_some(name)
        })
        // A name cut short (`prefix_`) names a family of tests.
        .filter(|name| !name.is_empty() && !name.ends_with('_'))
        .collect()
}

#[test]
fn every_test_the_documents_cite_exists() {
    let mut known = BTreeSet::new();
    functions(&root().join("crates"), &mut known);
    functions(&root().join("examples"), &mut known);
    let mut missing = Vec::new();
    let mut cited = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for name in cited_tests(&text) {
            cited += 1;
            if !known.contains(&name) {
                missing.push(format!("{}: {name}", doc.display()));
            }
        }
    }
    assert!(
        cited > 50,
        "found only {cited} citations: the scan is broken"
    );
    assert!(
        missing.is_empty(),
        "cited tests that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_documents_do_not_point_outside_the_repository() {
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        assert!(
            !text.contains("../shared"),
            "{} points into ../shared: restate the fact in our own words",
            doc.display()
        );
    }
}

#[test]
fn a_citation_is_read_up_to_the_end_of_its_name() {
    let text = "proved by `tests/x.rs::a_claim_on_every_path_returns_keys`, and `paths::CLAIM`; \
                `...::the_retry_runs_after_a_failed_record_` is a prefix, \
                `Limits::transaction_record_max_age` a field, `...::dedup_survives`, \
                `megolm.rs::outbound::a_session_rotates`";
    assert_eq!(
        cited_tests(text),
        [
            "a_claim_on_every_path_returns_keys",
            "dedup_survives",
            "a_session_rotates"
        ]
    );
}
