//! Interop tests of bridgekeys against real Matrix clients; the tests live
//! in `tests/` (this library is empty).
//!
//! * `tests/strict_client.rs`: a matrix-rust-sdk client with identity-based
//!   room-key sharing (MSC4153: only devices their owner cross-signed get
//!   room keys) talks to an echo-bridge puppet in an encrypted DM.
