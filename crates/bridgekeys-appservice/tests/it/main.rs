//! The listener's integration tests, one module per area, in one test
//! binary; `common` holds the shared fixtures, `fuzzing` the shared pieces
//! of the property tests.
//!
//! Kept apart, each in a binary of its own (they share `common` by path):
//! - `tests/logs.rs` sets a thread-local tracing subscriber, which only
//!   sees every callsite when no other test thread hits them first;
//! - `tests/homeserver_logs.rs` installs a process-wide subscriber (and
//!   routes `log` records into it).
#![allow(clippy::unwrap_used)]

mod common;
mod fuzzing;

mod bad_input;
mod claim;
mod claim_service;
mod fuzz_claim;
mod fuzz_registration;
mod fuzz_transactions;
mod homeserver;
mod key_pool;
mod key_query;
mod olm;
mod provision;
mod room_key_requests;
mod room_state;
mod serve;
mod shared_room_state;
mod shared_store;
mod synapse;
mod transactions;
