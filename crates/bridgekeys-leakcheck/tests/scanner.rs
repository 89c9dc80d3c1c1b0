//! The scanner itself: it finds a secret in a plain buffer that is freed,
//! in a buffer a growing `Vec` left behind and in a JSON value tree, and
//! finds nothing when the buffer was zeroed.
#![allow(clippy::unwrap_used)]

use bridgekeys_leakcheck::{LeakCheck, Pattern, freed_blocks_holding};
use zeroize::Zeroizing;

#[global_allocator]
static ALLOC: LeakCheck = LeakCheck;

const SECRET: [u8; 32] = [
    201, 7, 99, 150, 3, 250, 18, 77, 64, 129, 33, 240, 5, 91, 172, 44, 210, 66, 13, 199, 88, 121,
    36, 147, 9, 230, 58, 111, 180, 27, 245, 70,
];

/// A stand-in for `size_of::<serde_json::Value>()` (users pass theirs).
const STRIDE: usize = 32;

fn patterns() -> Vec<Pattern> {
    Pattern::all_forms(&SECRET, STRIDE)
}

#[test]
fn a_secret_freed_in_a_plain_vec_is_found() {
    let ((), hits) = freed_blocks_holding(patterns(), || {
        let v = std::hint::black_box(SECRET.to_vec());
        drop(v);
    });
    assert_eq!(hits, 1);
}

#[test]
fn a_zeroized_buffer_leaves_nothing() {
    let ((), hits) = freed_blocks_holding(patterns(), || {
        let v = std::hint::black_box(Zeroizing::new(SECRET.to_vec()));
        drop(v);
    });
    assert_eq!(hits, 0);
}

#[test]
fn the_old_block_of_a_growing_vec_is_found_even_if_the_vec_is_zeroized() {
    let ((), hits) = freed_blocks_holding(patterns(), || {
        let mut v = Zeroizing::new(Vec::with_capacity(32));
        v.extend_from_slice(&SECRET);
        // Grows: the first block is freed with the secret in it.
        v.extend_from_slice(&[0u8; 64]);
        std::hint::black_box(&v);
    });
    assert_eq!(hits, 1);
}

#[test]
fn the_json_text_and_widened_forms_are_found() {
    let ((), hits) = freed_blocks_holding(patterns(), || {
        let numbers: Vec<String> = SECRET.iter().map(u8::to_string).collect();
        drop(std::hint::black_box(format!(
            "{{\"k\":[{}]}}",
            numbers.join(",")
        )));
        let stride = STRIDE;
        let mut widened = vec![0u8; SECRET.len() * stride + 5];
        for (i, b) in SECRET.iter().enumerate() {
            let at = 5 + i * stride;
            widened[at..at + 8].copy_from_slice(&u64::from(*b).to_le_bytes());
        }
        drop(std::hint::black_box(widened));
    });
    assert!(hits >= 2, "{hits}");
}
