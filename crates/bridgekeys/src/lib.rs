//! bridgekeys: end-to-end encryption for Matrix bridges (appservices).
//!
//! This facade re-exports the pieces a bridge author needs:
//!
//! * [`store`]: durable, encrypted, versioned records ([`store::SledStore`]);
//! * [`olm`]: the account manager that provisions puppet devices and hands
//!   out signed one-time keys on demand, each exactly once
//!   ([`olm::AccountManager`]);
//! * [`appservice`]: the listener the homeserver calls (MSC3983 key claims,
//!   deduplicated transactions, queries) ([`appservice::Appservice`]).
//!
//! The Synapse testkit joins here as it lands.
//! Start with `examples/quickstart` and `docs/ARCHITECTURE.md`.
#![deny(missing_docs)]

pub use bridgekeys_appservice as appservice;
pub use bridgekeys_olm as olm;
pub use bridgekeys_store as store;
