//! The appservice registration file the homeserver loads
//! (`app_service_config_files`), and a generator for a fresh one.
//!
//! Wire shape (YAML), as Synapse reads it:
//!
//! ```yaml
//! id: echo
//! url: http://127.0.0.1:29300
//! as_token: <random>
//! hs_token: <random>
//! sender_localpart: echo_bot
//! rate_limited: false
//! receive_ephemeral: true
//! de.sorunome.msc2409.push_ephemeral: true
//! org.matrix.msc3202: true
//! io.element.msc4190: true
//! namespaces:
//!   users: [{regex: "@echo_.*:localhost", exclusive: true}]
//! ```

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::AppserviceError;

/// One namespace entry: a regex and whether the appservice owns it alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceEntry {
    /// The regex (Synapse matches it anchored at the start only).
    pub regex: String,
    /// Exclusive namespaces are the only ones whose key claims the
    /// homeserver proxies (MSC3983).
    #[serde(default)]
    pub exclusive: bool,
}

/// The `namespaces` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    /// User ids the bridge owns or watches.
    #[serde(default)]
    pub users: Vec<NamespaceEntry>,
    /// Room aliases the bridge owns or watches.
    #[serde(default)]
    pub aliases: Vec<NamespaceEntry>,
    /// Room ids the bridge watches.
    #[serde(default)]
    pub rooms: Vec<NamespaceEntry>,
}

/// An appservice registration, with the fields Synapse reads for an
/// encrypting bridge.
///
/// `Debug` redacts both tokens: a registration may be logged, its secrets not.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Unique id of the appservice on the homeserver. Also namespaces the
    /// transaction dedup log.
    pub id: String,
    /// Where the homeserver reaches this listener (`None`: no pushes).
    pub url: Option<String>,
    /// The token the bridge uses towards the homeserver.
    pub as_token: String,
    /// The token the homeserver presents to this listener.
    pub hs_token: String,
    /// Localpart of the bridge bot user.
    pub sender_localpart: String,
    /// Whether the homeserver rate-limits the bridge's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited: Option<bool>,
    /// Receive ephemeral events (typing, receipts, presence) in transactions.
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// The unstable (MSC2409) name of `receive_ephemeral`; older Synapse
    /// versions read only this one.
    #[serde(rename = "de.sorunome.msc2409.push_ephemeral", default)]
    pub push_ephemeral_unstable: bool,
    /// MSC3202: one-time key counts, unused fallback key types and device
    /// lists ride along in transactions (fallback rotation needs them).
    #[serde(rename = "org.matrix.msc3202", default)]
    pub msc3202: bool,
    /// MSC4190: the bridge creates puppet devices with
    /// `PUT /devices/{deviceId}` instead of logging in.
    #[serde(rename = "io.element.msc4190", default)]
    pub msc4190: bool,
    /// Users, aliases and rooms the bridge owns or watches.
    pub namespaces: Namespaces,
    /// Third-party protocols the bridge serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("as_token", &"<redacted>")
            .field("hs_token", &"<redacted>")
            .field("sender_localpart", &self.sender_localpart)
            .field("receive_ephemeral", &self.receive_ephemeral)
            .field("msc3202", &self.msc3202)
            .field("msc4190", &self.msc4190)
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

/// Deepest flow-collection nesting [`Registration::from_yaml`] parses.
const MAX_FLOW_DEPTH: usize = 128;

/// Whether `[`/`{` nest deeper than `max` (quotes and comments ignored: an
/// over-estimate, which only a file with over a hundred unbalanced brackets
/// in its strings could notice).
fn flow_depth_exceeds(yaml: &str, max: usize) -> bool {
    let mut depth = 0usize;
    for byte in yaml.bytes() {
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A fresh random token: 32 bytes from the OS RNG, URL-safe base64
/// (43 characters, 256 bits).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Registration {
    /// A fresh registration for an encrypting bridge: random tokens, one
    /// exclusive user namespace, and every flag this SDK relies on switched
    /// on (ephemeral events, MSC3202, MSC4190).
    pub fn generate(
        id: impl Into<String>,
        url: impl Into<String>,
        sender_localpart: impl Into<String>,
        user_regex: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            url: Some(url.into()),
            as_token: random_token(),
            hs_token: random_token(),
            sender_localpart: sender_localpart.into(),
            rate_limited: Some(false),
            receive_ephemeral: true,
            push_ephemeral_unstable: true,
            msc3202: true,
            msc4190: true,
            namespaces: Namespaces {
                users: vec![NamespaceEntry {
                    regex: user_regex.into(),
                    exclusive: true,
                }],
                ..Namespaces::default()
            },
            protocols: Vec::new(),
        }
    }

    /// Parse a registration from YAML.
    ///
    /// Flow collections (`[`, `{`) nested deeper than 128 levels are refused
    /// before parsing: the YAML parser's time grows with the square of that
    /// depth (40 KB of `[` took seconds), and deserialisation would refuse
    /// them anyway.
    pub fn from_yaml(yaml: &str) -> Result<Self, AppserviceError> {
        if flow_depth_exceeds(yaml, MAX_FLOW_DEPTH) {
            return Err(AppserviceError::RegistrationYaml(
                <serde_yaml_ng::Error as serde::de::Error>::custom(format!(
                    "flow collections nested deeper than {MAX_FLOW_DEPTH} levels"
                )),
            ));
        }
        Ok(serde_yaml_ng::from_str(yaml)?)
    }

    /// The registration as YAML.
    pub fn to_yaml(&self) -> Result<String, AppserviceError> {
        Ok(serde_yaml_ng::to_string(self)?)
    }

    /// Read a registration file.
    pub fn load(path: &Path) -> Result<Self, AppserviceError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| AppserviceError::RegistrationIo {
                path: path.to_owned(),
                source,
            })?;
        Self::from_yaml(&text)
    }

    /// Write the registration to a NEW file (never overwrites: replacing a
    /// registration changes the tokens the homeserver knows), readable by
    /// the owner only on Unix, and synced to disk.
    pub fn write_new(&self, path: &Path) -> Result<(), AppserviceError> {
        let yaml = self.to_yaml()?;
        let io = |source| AppserviceError::RegistrationIo {
            path: path.to_owned(),
            source,
        };
        // Bytes and name both durable: a power cut right after cannot lose
        // the file the homeserver is about to be configured with.
        bridgekeys_store::durable::write_new(path, yaml.as_bytes(), 0o600).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FACTS_EXAMPLE: &str = r#"
id: echo
url: http://127.0.0.1:29300
as_token: aaa
hs_token: bbb
sender_localpart: echo_bot
rate_limited: false
receive_ephemeral: true
de.sorunome.msc2409.push_ephemeral: true
org.matrix.msc3202: true
io.element.msc4190: true
namespaces:
  users: [{regex: "@echo_.*:localhost", exclusive: true}]
"#;

    #[test]
    fn the_homeserver_facts_example_parses_with_every_flag() {
        let reg = Registration::from_yaml(FACTS_EXAMPLE).expect("parse");
        assert_eq!(reg.id, "echo");
        assert_eq!(reg.hs_token, "bbb");
        assert!(reg.receive_ephemeral && reg.push_ephemeral_unstable);
        assert!(reg.msc3202 && reg.msc4190);
        assert_eq!(reg.rate_limited, Some(false));
        assert_eq!(reg.namespaces.users[0].regex, "@echo_.*:localhost");
        assert!(reg.namespaces.users[0].exclusive);
    }

    #[test]
    fn a_generated_registration_has_fresh_tokens_and_round_trips_through_a_new_file() {
        let a = Registration::generate("echo", "http://127.0.0.1:1", "bot", "@echo_.*:hs");
        let b = Registration::generate("echo", "http://127.0.0.1:1", "bot", "@echo_.*:hs");
        assert_ne!(a.hs_token, b.hs_token);
        assert_ne!(a.as_token, a.hs_token);
        assert_eq!(a.hs_token.len(), 43);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registration.yaml");
        a.write_new(&path).expect("write");
        assert_eq!(Registration::load(&path).expect("load"), a);
        let yaml = std::fs::read_to_string(&path).expect("read");
        assert!(yaml.contains("org.matrix.msc3202: true"));
        assert!(yaml.contains("io.element.msc4190: true"));
        assert!(
            a.write_new(&path).is_err(),
            "an existing registration is never overwritten"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "tokens are readable by the owner only");
        }
    }

    #[test]
    fn debug_output_redacts_the_tokens() {
        let reg = Registration::from_yaml(FACTS_EXAMPLE).expect("parse");
        let shown = format!("{reg:?}");
        assert!(!shown.contains("aaa") && !shown.contains("bbb"), "{shown}");
    }
}
