//! echo-bridge: a complete, tiny Matrix bridge on bridgekeys.
//!
//! Every user `@echo_<anything>:<server>` exists. Invite one to a room and it
//! joins (its device, device keys and fallback key provisioned on the
//! homeserver first, so it can be claimed keys for like any device); say
//! something in `m.text` and every puppet in the room answers `echo: <it>`.
//!
//! * [`init`] writes `config.toml` and `registration.yaml`;
//! * [`run`] serves the appservice API until shut down ([`EchoBridge`] for
//!   the pieces, e.g. in tests);
//! * `demo::demo` (feature `demo`) runs the whole story against a local
//!   Synapse.
//!
//! The binary (`src/main.rs`) is a thin CLI over these.

mod bridge;
mod client;
mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod storage;
pub mod tunables;

pub use bridge::{EchoBridge, EchoHandler, run};
pub use client::PuppetClient;
pub use config::{
    APPSERVICE_ID, BOT_LOCALPART, CONFIG_FILE, Config, InitOptions, Initialized, PoolMode,
    PoolSettings, REGISTRATION_FILE, init, user_regex,
};
