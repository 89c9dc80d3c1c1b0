//! The optional sections of `config.toml` that tune the library: every
//! bound and age a deployment may need to change, with the library's
//! defaults when a section or a field is left out.
//!
//! ```toml
//! [keys]                        # the account manager
//! max_outstanding_keys = 1000   # per puppet device; the oldest are evicted past it
//! max_cached_devices = 100000   # accounts kept decoded in memory (about 1 KiB each)
//! max_keys_per_claim = 50
//! max_sessions_per_peer = 5
//! max_sessions_per_device = 10000
//!
//! [fallback]                    # fallback keys (MSC2732)
//! max_age_secs = 604800         # rotate an unused fallback key after a week
//! grace_secs = 3600             # keep the previous one this long after its successor is up
//! rotation_interval_secs = 300  # how often due devices are looked at
//! full_pass_interval_secs = 86400
//!
//! [limits]                      # the listener
//! max_body_bytes = 16777216
//! request_timeout_secs = 50
//! max_keys_per_device = 20      # per device in one claim
//! max_devices_per_claim = 10000
//! claim_concurrency = 64
//! max_held_events = 10000       # encrypted events waiting for their room key
//! held_event_max_age_secs = 86400
//! room_key_request_after_secs = 60   # absent or -1: never ask
//! transaction_record_max_age_secs = 604800
//!
//! [rooms]
//! cached_rooms = 10000          # room states kept in memory; the rest on disk
//!
//! [logging]
//! format = "text"               # or "json": one JSON object per line
//! colour = "auto"               # "always" / "never"; auto: only on a terminal
//! ```

use std::{num::NonZeroUsize, time::Duration};

use anyhow::{Context, bail};
use bridgekeys::{
    appservice::{Limits, ProvisionConfig, Registration, room_state::DEFAULT_CACHED_ROOMS},
    olm::{FallbackPolicy, ManagerConfig},
};
use serde::{Deserialize, Serialize};

/// `[keys]`: the account manager's bounds ([`ManagerConfig`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeySettings {
    /// Outstanding (claimed, unused) one-time keys kept per device.
    pub max_outstanding_keys: usize,
    /// Accounts kept decoded in memory.
    pub max_cached_devices: usize,
    /// Keys one claim may ask for per device.
    pub max_keys_per_claim: usize,
    /// Olm sessions kept per (device, peer).
    pub max_sessions_per_peer: usize,
    /// Olm sessions kept per device.
    pub max_sessions_per_device: usize,
}

impl Default for KeySettings {
    fn default() -> Self {
        let d = ManagerConfig::default();
        Self {
            max_outstanding_keys: d.max_outstanding_keys,
            max_cached_devices: d.max_cached_devices,
            max_keys_per_claim: d.max_keys_per_claim,
            max_sessions_per_peer: d.max_sessions_per_peer,
            max_sessions_per_device: d.max_sessions_per_device,
        }
    }
}

impl KeySettings {
    /// The manager's configuration; every bound must be at least 1.
    pub fn manager_config(&self) -> anyhow::Result<ManagerConfig> {
        for (name, value) in [
            ("max_outstanding_keys", self.max_outstanding_keys),
            ("max_cached_devices", self.max_cached_devices),
            ("max_keys_per_claim", self.max_keys_per_claim),
            ("max_sessions_per_peer", self.max_sessions_per_peer),
            ("max_sessions_per_device", self.max_sessions_per_device),
        ] {
            if value == 0 {
                bail!("keys.{name} must be at least 1");
            }
        }
        Ok({
            let mut c = ManagerConfig::default();
            c.max_outstanding_keys = self.max_outstanding_keys;
            c.max_cached_devices = self.max_cached_devices;
            c.max_keys_per_claim = self.max_keys_per_claim;
            c.max_sessions_per_peer = self.max_sessions_per_peer;
            c.max_sessions_per_device = self.max_sessions_per_device;
            c
        })
    }
}

/// `[fallback]`: fallback key ages and the rotation task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackSettings {
    /// Rotate an unused fallback key older than this.
    pub max_age_secs: u64,
    /// Keep the previous key this long after its successor is published.
    pub grace_secs: u64,
    /// Seconds between two rotation passes over the devices that are due.
    pub rotation_interval_secs: u64,
    /// Seconds between two passes over every device.
    pub full_pass_interval_secs: u64,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        let d = ProvisionConfig::default();
        Self {
            max_age_secs: d.policy.max_age.as_secs(),
            grace_secs: d.policy.grace.as_secs(),
            rotation_interval_secs: d.rotation_interval.as_secs(),
            full_pass_interval_secs: d.full_rotation_pass_interval.as_secs(),
        }
    }
}

impl FallbackSettings {
    /// The provisioner's configuration for `registration` with these ages.
    pub fn provision_config(&self, registration: &Registration) -> anyhow::Result<ProvisionConfig> {
        if self.max_age_secs == 0 || self.rotation_interval_secs == 0 {
            bail!("fallback.max_age_secs and fallback.rotation_interval_secs must be at least 1");
        }
        if self.full_pass_interval_secs < self.rotation_interval_secs {
            bail!("fallback.full_pass_interval_secs must not be below rotation_interval_secs");
        }
        Ok({
            let mut c = ProvisionConfig::from_registration(registration);
            c.policy = {
                let mut c = FallbackPolicy::default();
                c.max_age = Duration::from_secs(self.max_age_secs);
                c.grace = Duration::from_secs(self.grace_secs);
                c
            };
            c.rotation_interval = Duration::from_secs(self.rotation_interval_secs);
            c.full_rotation_pass_interval = Duration::from_secs(self.full_pass_interval_secs);
            c
        })
    }
}

/// `[limits]`: the listener's bounds ([`Limits`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Seconds a request may run.
    pub request_timeout_secs: u64,
    /// Keys one claim may ask for per device.
    pub max_keys_per_device: usize,
    /// Devices one claim may name.
    pub max_devices_per_claim: usize,
    /// Devices of one claim served at the same time.
    pub claim_concurrency: usize,
    /// Encrypted events held while their room key has not come.
    pub max_held_events: usize,
    /// Seconds an event is held before it is given up.
    pub held_event_max_age_secs: u64,
    /// Seconds a held event waits before its room key is asked for; -1
    /// never asks.
    pub room_key_request_after_secs: i64,
    /// Seconds a transaction's dedup record is kept.
    pub transaction_record_max_age_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        let d = Limits::default();
        Self {
            max_body_bytes: d.max_body_bytes,
            request_timeout_secs: d.request_timeout.as_secs(),
            max_keys_per_device: d.max_keys_per_device,
            max_devices_per_claim: d.max_devices_per_claim,
            claim_concurrency: d.claim_concurrency,
            max_held_events: d.max_held_events,
            held_event_max_age_secs: d.held_event_max_age.as_secs(),
            room_key_request_after_secs: d
                .room_key_request_after
                .map_or(-1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            transaction_record_max_age_secs: d.transaction_record_max_age.as_secs(),
        }
    }
}

impl LimitSettings {
    /// The listener's limits.
    pub fn limits(&self) -> anyhow::Result<Limits> {
        for (name, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_keys_per_device", self.max_keys_per_device),
            ("max_devices_per_claim", self.max_devices_per_claim),
            ("claim_concurrency", self.claim_concurrency),
            ("max_held_events", self.max_held_events),
        ] {
            if value == 0 {
                bail!("limits.{name} must be at least 1");
            }
        }
        if self.request_timeout_secs == 0 {
            bail!("limits.request_timeout_secs must be at least 1");
        }
        // A record must outlive the homeserver's retries (minutes).
        if self.transaction_record_max_age_secs < 3600 {
            bail!("limits.transaction_record_max_age_secs must be at least 3600");
        }
        let room_key_request_after = match self.room_key_request_after_secs {
            -1 => None,
            s => Some(Duration::from_secs(u64::try_from(s).context(
                "limits.room_key_request_after_secs must be -1 (never) or at least 0",
            )?)),
        };
        Ok({
            let mut c = Limits::default();
            c.max_body_bytes = self.max_body_bytes;
            c.request_timeout = Duration::from_secs(self.request_timeout_secs);
            c.max_keys_per_device = self.max_keys_per_device;
            c.max_devices_per_claim = self.max_devices_per_claim;
            c.claim_concurrency = self.claim_concurrency;
            c.max_held_events = self.max_held_events;
            c.held_event_max_age = Duration::from_secs(self.held_event_max_age_secs);
            c.room_key_request_after = room_key_request_after;
            c.transaction_record_max_age =
                Duration::from_secs(self.transaction_record_max_age_secs);
            c
        })
    }
}

/// `[rooms]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomSettings {
    /// Room states kept in memory.
    pub cached_rooms: usize,
}

impl Default for RoomSettings {
    fn default() -> Self {
        Self {
            cached_rooms: DEFAULT_CACHED_ROOMS,
        }
    }
}

impl RoomSettings {
    /// The cache size, at least 1.
    pub fn cached_rooms(&self) -> anyhow::Result<NonZeroUsize> {
        NonZeroUsize::new(self.cached_rooms).context("rooms.cached_rooms must be at least 1")
    }
}

/// `[logging]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// `auto`, `always` or `never`.
    pub colour: Colour,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

/// Whether text lines carry colour codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Only when the output is a terminal (not a file, pipe or journal).
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl LogSettings {
    /// Whether to write colour codes, given whether the output is a
    /// terminal.
    pub fn ansi(&self, terminal: bool) -> bool {
        match (self.format, self.colour) {
            (LogFormat::Json, _) | (_, Colour::Never) => false,
            (LogFormat::Text, Colour::Always) => true,
            (LogFormat::Text, Colour::Auto) => terminal,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Config;

    const BASE: &str = r#"
homeserver_url = "http://127.0.0.1:8008"
server_name = "example.org"
listen = "127.0.0.1:29300"
registration = "registration.yaml"
store_key = "00"
"#;

    fn parse(extra: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(&format!("{BASE}{extra}"))
    }

    #[test]
    fn every_section_reaches_the_library_configuration() {
        let config = parse(
            r#"
[keys]
max_outstanding_keys = 7
max_cached_devices = 8
max_keys_per_claim = 9
max_sessions_per_peer = 2
max_sessions_per_device = 300

[fallback]
max_age_secs = 86400
grace_secs = 600
rotation_interval_secs = 60
full_pass_interval_secs = 7200

[limits]
max_body_bytes = 1000000
request_timeout_secs = 20
max_keys_per_device = 4
max_devices_per_claim = 500
claim_concurrency = 8
max_held_events = 99
held_event_max_age_secs = 3600
room_key_request_after_secs = -1
transaction_record_max_age_secs = 86400

[rooms]
cached_rooms = 123

[logging]
format = "json"
colour = "always"
"#,
        )
        .unwrap();
        let keys = config.keys.manager_config().unwrap();
        assert_eq!(
            (
                keys.max_outstanding_keys,
                keys.max_cached_devices,
                keys.max_keys_per_claim,
                keys.max_sessions_per_peer,
                keys.max_sessions_per_device
            ),
            (7, 8, 9, 2, 300)
        );
        let registration: Registration = serde_yaml_ng::from_str(
            "id: echo\nurl: null\nas_token: a\nhs_token: h\nsender_localpart: echo_bot\n\
             namespaces: {users: [], aliases: [], rooms: []}\nio.element.msc4190: true\n",
        )
        .unwrap();
        let provision = config.fallback.provision_config(&registration).unwrap();
        assert_eq!(provision.policy.max_age, Duration::from_secs(86400));
        assert_eq!(provision.policy.grace, Duration::from_secs(600));
        assert_eq!(provision.rotation_interval, Duration::from_secs(60));
        assert_eq!(
            provision.full_rotation_pass_interval,
            Duration::from_secs(7200)
        );
        assert!(provision.msc4190, "the registration's own settings stay");
        let limits = config.limits.limits().unwrap();
        assert_eq!(limits.max_body_bytes, 1_000_000);
        assert_eq!(limits.request_timeout, Duration::from_secs(20));
        assert_eq!(
            (
                limits.max_keys_per_device,
                limits.max_devices_per_claim,
                limits.claim_concurrency,
                limits.max_held_events
            ),
            (4, 500, 8, 99)
        );
        assert_eq!(limits.held_event_max_age, Duration::from_secs(3600));
        assert_eq!(limits.room_key_request_after, None);
        assert_eq!(
            limits.transaction_record_max_age,
            Duration::from_secs(86400)
        );
        assert_eq!(config.rooms.cached_rooms().unwrap().get(), 123);
        assert_eq!(config.logging.format, LogFormat::Json);
        assert!(!config.logging.ansi(true), "JSON never carries colour");
    }

    #[test]
    fn left_out_sections_are_the_library_defaults() {
        let config = parse("").unwrap();
        let keys = config.keys.manager_config().unwrap();
        let d = ManagerConfig::default();
        assert_eq!(keys.max_outstanding_keys, d.max_outstanding_keys);
        let limits = config.limits.limits().unwrap();
        assert_eq!(
            limits.room_key_request_after,
            Limits::default().room_key_request_after
        );
        assert_eq!(
            limits.transaction_record_max_age,
            Limits::default().transaction_record_max_age
        );
        assert_eq!(
            config.rooms.cached_rooms().unwrap().get(),
            DEFAULT_CACHED_ROOMS
        );
        assert!(config.logging.ansi(true) && !config.logging.ansi(false));
    }

    #[test]
    fn a_malformed_config_is_reported_by_line_without_quoting_the_store_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let secret = "d41d8cd98f00b204e9800998ecf8427ed41d8cd98f00b204e9800998ecf8427e";
        let text = BASE.replace("store_key = \"00\"", &format!("store_key = \"{secret}"));
        std::fs::write(&path, text).unwrap();
        let error = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(!error.contains(secret), "{error}");
        assert!(error.contains("line 6"), "{error}");
    }

    #[test]
    fn unknown_fields_and_impossible_values_are_refused_with_their_name() {
        let unknown = parse("[keys]\nmax_outstanding = 5\n").err().unwrap();
        assert!(unknown.to_string().contains("max_outstanding"), "{unknown}");
        let zero = parse("[keys]\nmax_outstanding_keys = 0\n").unwrap();
        let e = zero.keys.manager_config().unwrap_err();
        assert!(e.to_string().contains("keys.max_outstanding_keys"), "{e}");
        let short = parse("[limits]\ntransaction_record_max_age_secs = 60\n").unwrap();
        assert!(short.limits.limits().is_err());
        let never = parse("[limits]\nroom_key_request_after_secs = -2\n").unwrap();
        assert!(never.limits.limits().is_err());
        let colour = parse("[logging]\ncolour = \"sometimes\"\n").err().unwrap();
        assert!(colour.to_string().contains("sometimes"), "{colour}");
    }
}
