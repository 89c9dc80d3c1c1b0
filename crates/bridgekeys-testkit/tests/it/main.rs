//! The testkit's integration tests (a real Synapse, the nio Olm peer, a
//! real PostgreSQL), one module per area, in one test binary.
#![allow(clippy::unwrap_used)]

mod common;

mod megolm_peer;
mod olm_peer;
mod postgres;
mod synapse;
