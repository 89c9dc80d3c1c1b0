//! The store's integration tests, one module per area, in one test binary.
//!
//! `power_cut` re-executes this binary (`std::env::current_exe`) to run its
//! ignored child test by its full name, `power_cut::blob_child`, under the
//! power-cut shim.
#![allow(clippy::unwrap_used)]

mod conformance;
mod migrate;
#[cfg(feature = "postgres")]
mod pg_server;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
mod postgres_passfile;
#[cfg(feature = "postgres")]
mod postgres_tls;
mod power_cut;
mod store;
mod upgrade;
