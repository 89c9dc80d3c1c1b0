//! The account manager: one vodozemac Olm account per puppet device, signed
//! one-time keys generated on demand, each handed out exactly once.
//!
//! A bridge answers the homeserver's `keys/claim` (MSC3983) by calling
//! [`AccountManager::claim`]. The manager
//!
//! 1. serialises claims per device (claims for different devices run in
//!    parallel),
//! 2. generates fresh one-time keys in the device's account, signs each
//!    `{"key": ...}` object over canonical JSON with the device's ed25519 key,
//! 3. writes the advanced key-id counter and the private keys to the
//!    [`Store`](bridgekeys_store::Store) in one atomic write, and
//! 4. returns only once that write is durable.
//!
//! Private one-time keys live in the store as separate records, not inside
//! the account pickle, so a claim costs the same whether the device has one
//! outstanding key or thousands. When a pre-key message arrives,
//! [`AccountManager::decrypt_prekey`] loads the one key it names, creates the
//! inbound session and removes the key (durably) only if decryption succeeded.
//!
//! Fallback keys (MSC2732) live inside the account pickle with their
//! schedule beside it ([`fallback`]): generated and persisted before any
//! upload ([`AccountManager::fallback_key_for_upload`]), rotated when used
//! or too old and the previous one forgotten after a grace period
//! ([`AccountManager::apply_fallback_policy`]), with an injected clock.
#![deny(missing_docs)]

mod account;
mod config;
mod error;
pub mod fallback;
mod fallback_ops;
mod manager;
mod signing;
mod stats;

pub use config::ManagerConfig;
pub use error::OlmError;
pub use fallback::{FallbackAction, FallbackPolicy, FallbackState, UnixMillis};
pub use fallback_ops::FallbackKey;
pub use manager::{AccountManager, ClaimedKey, InboundMessage};
pub use signing::{canonical_json_for_signing, sign_json};
pub use stats::ManagerStats;

pub use vodozemac;
