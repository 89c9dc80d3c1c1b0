//! The account manager's integration tests, one module per area, in one
//! test binary.
//!
//! Kept apart, each in a binary of its own (they share `common` by path):
//! - `tests/secrets.rs` installs a `#[global_allocator]` that scans every
//!   freed block, for the whole process;
//! - `tests/eviction_log.rs` sets a thread-local tracing subscriber, which
//!   only sees every callsite when no other test thread hits them first.
#![allow(clippy::unwrap_used)]

mod common;
mod fuzzing;

mod cold_loads;
mod cross_signing;
mod fallback;
mod fixture;
mod fuzz_prekey;
mod manager;
mod megolm;
mod olm_sessions;
mod shared_keys;
mod shared_megolm;
mod shared_sessions;
mod shared_tracking;
