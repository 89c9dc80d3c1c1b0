//! Benchmarks and torture runs of bridgekeys.
//!
//! Each scenario is a function returning a report that the binary prints as
//! a table and, with `--json`, writes as one JSON object. The crash torture
//! lives here too so that `cargo test` (a short run) and
//! `bridgekeys-bench crash --cycles N` (the long run) share one implementation.

pub mod all;
pub mod charts;
pub mod crash;
pub mod http;
pub mod manager;
pub mod megolm;
pub mod olm;
pub mod pg;
pub mod progress;
pub mod scale;
pub mod storage;
pub mod support;
pub mod synapse;
pub mod upgrade;

/// jemalloc is the allocator of every process linking this crate (the
/// bench binary, its child processes and its tests), with the default
/// feature `jemalloc`. Over HTTP it served about 15 % more claims per
/// second than glibc's malloc (median of nine alternating pairs, 7 to
/// 37 %), raw crypto unchanged (docs/BENCHMARKS.md); a bridge binary
/// chooses its allocator the same way, as echo-bridge does.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The memory allocator this build runs on, as reports name it.
pub const ALLOCATOR: &str = if cfg!(all(feature = "jemalloc", not(target_env = "msvc"))) {
    "jemalloc"
} else {
    "system malloc"
};
