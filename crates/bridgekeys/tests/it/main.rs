//! The facade's integration tests, one binary.
#![allow(clippy::unwrap_used)]

mod builder;
mod docs;
mod rooms;
