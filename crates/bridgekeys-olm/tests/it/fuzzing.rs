//! Shared pieces of the property tests (fuzzing): the case count and
//! mutations of byte strings.

use proptest::prelude::*;

/// `default` cases per property unless `PROPTEST_CASES` says otherwise.
pub fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        // Shrinking a failure is welcome; keeping failures in a file is not
        // (regression tests are named instead).
        failure_persistence: None,
        ..ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default),
        )
    }
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

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ]
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
