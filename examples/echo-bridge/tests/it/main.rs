//! echo-bridge's integration tests, one binary. Most run the bridge against
//! a real Synapse through the `demo` feature's local homeserver, so the
//! binary requires that feature (`cargo test -p echo-bridge --features
//! demo`; the workspace's `cargo test --workspace --all-features` has it).
#![allow(clippy::unwrap_used)]

mod common;
mod encrypted;
mod fuzz_config;
mod key_after_event;
mod killed;
mod logging;
mod pool;
#[cfg(feature = "postgres")]
mod postgres;
mod power_cut;
#[cfg(feature = "postgres")]
mod processes;
mod relearn;
mod synapse;
