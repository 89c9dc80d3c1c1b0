//! The account manager: one vodozemac Olm account per puppet device, signed
//! one-time keys generated on demand, each handed out exactly once.
//!
//! A bridge answers the homeserver's `keys/claim` (MSC3983) by calling
//! [`AccountManager::claim`]. The manager
//!
//! 1. serialises claims per device (claims for different devices run in
//!    parallel),
//! 2. generates fresh one-time key pairs with vodozemac, numbers them from
//!    the store's never-repeating key-id sequence and signs each
//!    `{"key": ...}` object over canonical JSON with the device's ed25519 key,
//! 3. writes the private keys to the [`Store`](bridgekeys_store::Store) as
//!    records of their own (the account itself does not change, so it is not
//!    rewritten), and
//! 4. returns only once those writes are durable.
//!
//! So a claim costs the same whether the device has one outstanding key or
//! thousands. Decoded accounts are cached, up to
//! [`ManagerConfig::max_cached_devices`].
//!
//! Olm for puppet devices:
//!
//! * [`AccountManager::decrypt_olm`] decrypts any Olm message to a puppet
//!   device. Sessions are stored by (device, peer key); a pre-key message
//!   starts one from the one-time key it names (removed in the same write)
//!   or goes to its existing session; the payload is checked
//!   ([`payload`]) before anything is written, and the ratchet step is
//!   durable before the plaintext is returned.
//! * [`AccountManager::create_outbound_session`] (from a claimed key whose
//!   signature is verified) and [`AccountManager::encrypt_olm`] (spec
//!   payload, durable ratchet step before the ciphertext leaves).
//! * [`devices`]: the verified device keys of the users puppets talk to.
//! * [`megolm`]: room keys from verified Olm payloads, and the room events
//!   they decrypt (room, sender and replay checks).
//! * [`megolm_out`]: a puppet's outbound group session per room, rotated
//!   when due, shared once per device, and never reusing a message index.
//!
//! Fallback keys (MSC2732) live inside the account pickle with their
//! schedule beside it ([`fallback`]): generated and persisted before any
//! upload ([`AccountManager::fallback_key_for_upload`]), rotated when used
//! or too old and the previous one forgotten after a grace period
//! ([`AccountManager::apply_fallback_policy`]), with an injected clock.
#![deny(missing_docs)]

mod account;
mod config;
pub mod cross_signing;
pub mod devices;
mod error;
pub mod fallback;
mod fallback_ops;
mod manager;
pub mod megolm;
pub mod megolm_out;
mod outbound;
pub mod payload;
mod sessions;
mod signing;
mod stats;
mod throttle;
mod wipe;

pub use config::ManagerConfig;
pub use cross_signing::CrossSigningKeys;
pub use devices::{DeviceRefusal, DeviceUpdate, TrackedDevice, TrackedDevices};
pub use error::OlmError;
pub use fallback::{FallbackAction, FallbackPolicy, FallbackState, UnixMillis};
pub use fallback_ops::FallbackKey;
pub use manager::{AccountManager, ClaimedKey};
pub use megolm::{DecryptedRoomEvent, MEGOLM_ALGORITHM, MegolmError, RoomKeyOutcome};
pub use megolm_out::{GroupRecipient, PreparedGroupSession, RotationSettings};
pub use outbound::{EncryptedOlm, OLM_ALGORITHM, Recipient};
pub use payload::{OlmPayload, PayloadError};
pub use sessions::DecryptedOlm;
pub use signing::{canonical_json_for_signing, sign_json};
pub use stats::ManagerStats;

pub use vodozemac;
