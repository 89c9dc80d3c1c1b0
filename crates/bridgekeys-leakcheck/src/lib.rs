//! Finds secrets left behind in freed heap memory (a test tool).
//!
//! A buffer that held a secret and is freed without being zeroed keeps the
//! secret in memory until something else overwrites it: a core dump, a swap
//! page or a later bug can show it. `Zeroizing` prevents that only for the
//! buffers it wraps, and only if nothing copied the bytes elsewhere first
//! (a `Vec` that grows, a `serde_json::Value`, a `String` built on the way).
//!
//! Install [`LeakCheck`] as the test binary's global allocator, then run the
//! code under test inside [`freed_blocks_holding`] with the patterns of the
//! secret: every block freed on this thread while it runs is scanned, and
//! the number of blocks that still held a pattern is returned.
//!
//! ```
//! use bridgekeys_leakcheck::{LeakCheck, Pattern, freed_blocks_holding};
//!
//! #[global_allocator]
//! static ALLOC: LeakCheck = LeakCheck;
//!
//! fn main() {
//!     let secret = [7u8; 32];
//!     let ((), hits) = freed_blocks_holding(vec![Pattern::Bytes(secret.to_vec())], || {
//!         drop(std::hint::black_box(secret.to_vec()));
//!     });
//!     assert_eq!(hits, 1, "a Vec freed with the secret in it");
//! }
//! ```
#![deny(missing_docs)]
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::{Cell, RefCell},
};

/// How a secret may sit in a freed block.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// Its bytes in a row (raw bytes, or a text form such as JSON).
    Bytes(Vec<u8>),
    /// Each byte widened to a little-endian `u64`, one every `stride`
    /// bytes: how an array of numbers sits in a `Vec<serde_json::Value>`.
    Widened {
        /// The secret's bytes.
        bytes: Vec<u8>,
        /// Distance between two elements (`size_of::<serde_json::Value>()`).
        stride: usize,
    },
}

impl Pattern {
    /// The usual forms of a secret key: raw, as a JSON array of numbers
    /// (serde's form of a byte array), and as that array parsed into a
    /// `Vec` of JSON values with elements `value_stride` bytes apart.
    pub fn all_forms(secret: &[u8], value_stride: usize) -> Vec<Pattern> {
        let numbers: Vec<String> = secret.iter().map(u8::to_string).collect();
        vec![
            Pattern::Bytes(secret.to_vec()),
            Pattern::Bytes(format!("[{}]", numbers.join(",")).into_bytes()),
            Pattern::Widened {
                bytes: secret.to_vec(),
                stride: value_stride,
            },
        ]
    }

    fn found_in(&self, block: &[u8]) -> bool {
        match self {
            Pattern::Bytes(needle) => {
                !needle.is_empty() && block.windows(needle.len()).any(|w| w == needle.as_slice())
            }
            Pattern::Widened { bytes, stride } => {
                let Some(span) = bytes
                    .len()
                    .checked_sub(1)
                    .and_then(|n| n.checked_mul(*stride))
                    .and_then(|n| n.checked_add(8))
                else {
                    return false;
                };
                if bytes.is_empty() || span > block.len() {
                    return false;
                }
                (0..=block.len() - span).any(|base| {
                    bytes.iter().enumerate().all(|(i, b)| {
                        let at = base + i * stride;
                        block[at..at + 8] == u64::from(*b).to_le_bytes()
                    })
                })
            }
        }
    }
}

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static PATTERNS: RefCell<Vec<Pattern>> = const { RefCell::new(Vec::new()) };
    static HITS: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, scanning each block freed on an armed thread
/// before handing it back.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeakCheck;

// SAFETY: every call is forwarded to `System` with the same arguments; the
// only addition is reading the `layout.size()` bytes of a block that is
// still allocated (before it is freed).
unsafe impl GlobalAlloc for LeakCheck {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        scan(ptr, layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    // `realloc` is GlobalAlloc's default: alloc, copy, dealloc, so the
    // block a growing buffer leaves behind is scanned too.
}

fn scan(ptr: *const u8, size: usize) {
    // Disarm while scanning: nothing below allocates, but stay safe if it
    // ever does (and during thread teardown, when the locals are gone).
    if !ARMED.try_with(|a| a.replace(false)).unwrap_or(false) {
        return;
    }
    // SAFETY: the block is allocated with this size until the dealloc that
    // called us forwards it.
    let block = unsafe { std::slice::from_raw_parts(ptr, size) };
    let hit = PATTERNS
        .try_with(|p| p.borrow().iter().any(|pattern| pattern.found_in(block)))
        .unwrap_or(false);
    if hit {
        let _ = HITS.try_with(|h| h.set(h.get() + 1));
    }
    let _ = ARMED.try_with(|a| a.set(true));
}

/// Run `f` with the blocks freed on this thread scanned for `patterns`;
/// return its result and how many freed blocks held one of them.
///
/// Only meaningful when [`LeakCheck`] is the global allocator (it returns
/// 0 otherwise). Blocks freed on other threads are not scanned, so keep `f`
/// synchronous or on a current-thread runtime.
pub fn freed_blocks_holding<R>(patterns: Vec<Pattern>, f: impl FnOnce() -> R) -> (R, usize) {
    PATTERNS.with(|p| *p.borrow_mut() = patterns);
    HITS.with(|h| h.set(0));
    ARMED.with(|a| a.set(true));
    let result = f();
    ARMED.with(|a| a.set(false));
    let hits = HITS.with(Cell::get);
    PATTERNS.with(|p| p.borrow_mut().clear());
    (result, hits)
}
