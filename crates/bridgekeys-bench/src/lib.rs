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
