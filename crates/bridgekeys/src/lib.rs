//! bridgekeys: end-to-end encryption for Matrix bridges (appservices).
//!
//! This facade re-exports the pieces a bridge author needs:
//!
//! * [`store`]: durable, encrypted, versioned records ([`store::SledStore`]);
//! * [`olm`]: the account manager that provisions puppet devices, hands
//!   out signed one-time keys on demand, each exactly once, and speaks Olm
//!   for them: verified payloads, lasting sessions, outbound encryption,
//!   tracked devices ([`olm::AccountManager`]);
//! * [`appservice`]: the listener the homeserver calls (MSC3983 key claims,
//!   deduplicated transactions with Olm messages decrypted, queries)
//!   ([`appservice::Appservice`]), and Olm through the homeserver as a
//!   puppet ([`appservice::PuppetOlm`]);
//! * [`Bridgekeys::builder`]: all of the above wired from a registration
//!   in a few lines, served with its background tasks ([`Bridge::serve_on`]);
//! * [`PuppetRooms`]: encrypted rooms for puppets with ruma types, without
//!   knowing Olm or Megolm ([`PuppetRooms::encrypt_room_event`],
//!   [`PuppetRooms::decrypt_room_event`]).
//!
//! Tests against a real Synapse and a real Olm client come from the
//! separate `bridgekeys-testkit` crate.
//! Start with `examples/quickstart` (two pages) and `docs/ARCHITECTURE.md`.
#![deny(missing_docs)]

pub use bridgekeys_appservice as appservice;
pub use bridgekeys_olm as olm;
/// The vodozemac version bridgekeys stores and speaks (the key types a
/// bridge names: `Curve25519PublicKey`, `Ed25519PublicKey`, Olm messages).
pub use bridgekeys_olm::vodozemac;
pub use bridgekeys_store as store;
/// The ruma version bridgekeys speaks (ids, events, API types).
pub use ruma;

pub mod builder;
pub mod rooms;

pub use builder::{Bridge, BridgeBuilder, BridgeError, Bridgekeys, Parts};
pub use rooms::{DecryptedEvent, EncryptedContent, PuppetRooms, RoomCryptoError};

/// The Rust snippets of the README, compiled (and run where they can) as
/// doc tests, so the front page never shows code that does not build.
// The README shows the PostgreSQL backend too: its snippets build with the
// `postgres` feature (the workspace's test command turns every feature on).
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
