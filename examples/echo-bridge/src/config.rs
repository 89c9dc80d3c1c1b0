//! `config.toml` and `echo-bridge init`: the files a deployment starts from.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use bridgekeys::{
    appservice::Registration,
    store::{SledStoreConfig, StoreId, StoreKey, durable},
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::tunables::{FallbackSettings, KeySettings, LimitSettings, LogSettings, RoomSettings};

/// The registration `id` of the echo bridge.
pub const APPSERVICE_ID: &str = "echo";
/// The bridge bot's localpart (`sender_localpart`).
pub const BOT_LOCALPART: &str = "echo_bot";
/// Name of the configuration file `init` writes.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of the registration file `init` writes.
pub const REGISTRATION_FILE: &str = "registration.yaml";

/// The bridge's configuration file, as written by `init`.
///
/// Relative paths are resolved against the directory of the file.
#[derive(Clone, Serialize, Deserialize)]
pub struct Config {
    /// Client-server API of the homeserver (`http://host:port` or
    /// `https://host`; IPv6 literals in brackets).
    pub homeserver_url: String,
    /// A PEM file of root certificate(s) to trust for an `https://`
    /// homeserver beside the built-in (Mozilla) roots: a private CA, or a
    /// self-signed certificate. Relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homeserver_ca: Option<PathBuf>,
    /// The homeserver's server name (the part after `:` in user ids).
    pub server_name: String,
    /// Where the appservice API listens (the registration `url` points here).
    pub listen: SocketAddr,
    /// The registration file shared with the homeserver.
    pub registration: PathBuf,
    /// 32-byte key encrypting the store at rest, hex. Losing it loses every
    /// puppet's keys; never log it.
    pub store_key: String,
    /// The PostgreSQL database to keep the store in, as a URL
    /// (`postgres://user:password@host:5432/dbname`), for a bridge that
    /// runs as several processes; absent: the embedded sled store at
    /// `store_path` (the default). TLS as libpq's `sslmode` and
    /// `sslrootcert` say (`?sslmode=verify-full&sslrootcert=/path/ca.pem`
    /// for a database on another machine). It may hold a password: never
    /// log it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The store directory; `store` next to the config file if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_path: Option<PathBuf>,
    /// The id of the store `init` created (32 hex digits). `run` refuses a
    /// store with another id: a store swapped for another, or a new empty
    /// one where the bridge's store was lost. Absent in configurations
    /// written before store ids: then any store is accepted, with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
    /// Accept a store restored from an older backup (`run
    /// --accept-restored-store`, never from the file): its key ids jump past
    /// the watermark. Keys handed out after the backup are lost.
    #[serde(skip)]
    pub accept_restored_store: bool,
    /// `[one_time_keys]`: how puppets' one-time keys reach the users who
    /// claim them (detected by default; see [`PoolSettings`]).
    #[serde(default)]
    pub one_time_keys: PoolSettings,
    /// `[keys]`: the account manager's bounds.
    #[serde(default, skip_serializing_if = "is_default")]
    pub keys: KeySettings,
    /// `[fallback]`: fallback key ages and the rotation task.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fallback: FallbackSettings,
    /// `[limits]`: the listener's bounds.
    #[serde(default, skip_serializing_if = "is_default")]
    pub limits: LimitSettings,
    /// `[rooms]`: the room-state cache.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rooms: RoomSettings,
    /// `[logging]`: log format and colour.
    #[serde(default, skip_serializing_if = "is_default")]
    pub logging: LogSettings,
}

/// How one-time keys reach claimers: handed out on demand where the
/// homeserver proxies claims (MSC3983), from a small uploaded pool per
/// contacted puppet device where it does not.
///
/// ```toml
/// [one_time_keys]
/// mode = "detect"            # or "proxied" / "pool" when you know
/// pool_size = 10             # keys per contacted device in pool mode
/// refill_below = 5           # top up when the homeserver holds fewer
/// probe_interval_secs = 600  # how often the mode is detected again
/// check_interval_secs = 300  # how often contacted devices' counts are read
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSettings {
    /// `detect`, `proxied` or `pool`. Detection also works with several
    /// processes on one PostgreSQL database (the process the homeserver
    /// asks answers the probe with a marker that reaches the detecting
    /// one), as long as every process runs a build that does: during a
    /// rolling upgrade from an older one, set `proxied` or `pool`.
    pub mode: PoolMode,
    /// Keys per contacted puppet device after a top-up.
    pub pool_size: usize,
    /// Top up when the homeserver holds fewer than this many.
    pub refill_below: usize,
    /// Seconds between two detections of the mode.
    pub probe_interval_secs: u64,
    /// Seconds between two checks of contacted devices' counts.
    pub check_interval_secs: u64,
}

/// The `mode` of [`PoolSettings`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Find out at start and every `probe_interval_secs`.
    #[default]
    Detect,
    /// The homeserver proxies claims (Synapse with
    /// `msc3983_appservice_otk_claims`): never upload one-time keys.
    Proxied,
    /// It does not: keep uploaded pools.
    Pool,
}

impl Default for PoolSettings {
    fn default() -> Self {
        let d = bridgekeys::appservice::PoolConfig::default();
        Self {
            mode: PoolMode::Detect,
            pool_size: d.size,
            refill_below: d.refill_below,
            probe_interval_secs: d.probe_interval.as_secs(),
            check_interval_secs: d.check_interval.as_secs(),
        }
    }
}

impl PoolSettings {
    /// The library's configuration from these settings; refuses sizes the
    /// account manager would refuse.
    pub fn pool_config(&self) -> anyhow::Result<bridgekeys::appservice::PoolConfig> {
        use bridgekeys::appservice::{ModeSetting, PoolConfig};
        if self.pool_size == 0 || self.pool_size > 50 {
            bail!(
                "one_time_keys.pool_size must be 1 to 50, not {}",
                self.pool_size
            );
        }
        if self.refill_below > self.pool_size {
            bail!(
                "one_time_keys.refill_below ({}) must not exceed pool_size ({})",
                self.refill_below,
                self.pool_size
            );
        }
        Ok({
            let mut c = PoolConfig::default();
            c.mode = match self.mode {
                PoolMode::Detect => ModeSetting::Detect,
                PoolMode::Proxied => ModeSetting::Proxied,
                PoolMode::Pool => ModeSetting::Pool,
            };
            c.size = self.pool_size;
            c.refill_below = self.refill_below;
            c.probe_interval = std::time::Duration::from_secs(self.probe_interval_secs.max(1));
            c.check_interval = std::time::Duration::from_secs(self.check_interval_secs.max(1));
            c
        })
    }
}

/// Sections left at their defaults are not written: the file `init` writes
/// stays short, and follows the library's defaults until a field is set.
fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("homeserver_url", &self.homeserver_url)
            .field("homeserver_ca", &self.homeserver_ca)
            .field("server_name", &self.server_name)
            .field("listen", &self.listen)
            .field("registration", &self.registration)
            .field("store_key", &"<redacted>")
            .field("database", &self.database.as_ref().map(|_| "<redacted>"))
            .field("store_path", &self.store_path)
            .field("store_id", &self.store_id)
            .field("one_time_keys", &self.one_time_keys)
            .field("keys", &self.keys)
            .field("fallback", &self.fallback)
            .field("limits", &self.limits)
            .field("rooms", &self.rooms)
            .field("logging", &self.logging)
            .finish()
    }
}

impl Config {
    /// Read `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            // The message and the line, never toml's quote of the line: it
            // may be the store key.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            match line {
                Some(line) => {
                    anyhow::anyhow!("parsing {} (line {line}): {}", path.display(), e.message())
                }
                None => anyhow::anyhow!("parsing {}: {}", path.display(), e.message()),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.registration = base.join(&config.registration);
        config.homeserver_ca = config.homeserver_ca.map(|ca| base.join(ca));
        config.store_path =
            Some(base.join(config.store_path.as_deref().unwrap_or(Path::new("store"))));
        Ok(config)
    }

    /// The store directory (`store` next to the registration if unset).
    pub fn store_dir(&self) -> PathBuf {
        self.store_path.clone().unwrap_or_else(|| {
            self.registration
                .parent()
                .unwrap_or(Path::new("."))
                .join("store")
        })
    }

    /// The store id `init` recorded, parsed.
    pub fn store_id(&self) -> anyhow::Result<Option<StoreId>> {
        self.store_id
            .as_deref()
            .map(|s| s.parse::<StoreId>().context("store_id"))
            .transpose()
    }

    /// How to open the store: its path, key and (if recorded) expected id.
    pub fn store_config(&self) -> anyhow::Result<SledStoreConfig> {
        let mut config = SledStoreConfig::new(self.store_dir(), self.store_key()?);
        config.expected_id = self.store_id()?;
        config.accept_restored = self.accept_restored_store;
        Ok(config)
    }

    /// The store key, decoded.
    pub fn store_key(&self) -> anyhow::Result<StoreKey> {
        let bytes = decode_hex(&self.store_key).context("store_key must be 64 hex digits")?;
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("store_key must be 32 bytes (64 hex digits)"))?;
        Ok(StoreKey::new(bytes))
    }
}

/// What `init` needs.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Directory for `config.toml` and `registration.yaml` (created if missing).
    pub dir: PathBuf,
    /// The homeserver's client-server API.
    pub homeserver_url: String,
    /// The homeserver's server name.
    pub server_name: String,
    /// The listen address of the appservice API.
    pub listen: SocketAddr,
    /// Create the store in this PostgreSQL database (it must hold none)
    /// instead of the sled store `store` beside the files.
    pub database: Option<String>,
}

/// What `init` wrote.
#[derive(Clone, Debug)]
pub struct Initialized {
    /// The configuration file.
    pub config: PathBuf,
    /// The registration file.
    pub registration: PathBuf,
    /// The user namespace regex registered.
    pub user_regex: String,
    /// The store created: its directory, or the database without its
    /// password.
    pub store: String,
    /// Its id, recorded in the configuration.
    pub store_id: StoreId,
}

/// The exclusive user namespace of the bridge on `server_name`.
pub fn user_regex(server_name: &str) -> String {
    format!("@echo_.*:{}", regex::escape(server_name))
}

/// Write a fresh `config.toml` and `registration.yaml` (random tokens and
/// store key) into `options.dir` and create the store (`store` beside them).
/// Refuses, writing nothing, if either file or the store exists: a new
/// registration means new tokens the homeserver does not know, a new store
/// key makes the existing store unreadable, and a new store gives every
/// puppet new identity keys.
///
/// Everything is durable when this returns: the files, the store, and their
/// names in their directories (a power cut right after loses none of them).
pub fn init(options: &InitOptions) -> anyhow::Result<Initialized> {
    durable::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let config_path = options.dir.join(CONFIG_FILE);
    let registration_path = options.dir.join(REGISTRATION_FILE);
    let store_path = options.dir.join("store");
    for path in [&config_path, &registration_path] {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite it (it holds the tokens and keys of an \
                 existing bridge). Remove it first or choose another --dir.",
                path.display()
            );
        }
    }
    if options.database.is_none() && store_path.exists() {
        bail!(
            "a store already exists at {} but no {CONFIG_FILE} names it; refusing to touch it. \
             If an earlier `init` was interrupted, nothing in it was ever used: remove it and run \
             `init` again. If it belongs to a bridge, restore that bridge's {CONFIG_FILE} instead.",
            store_path.display()
        );
    }
    let server_name = ruma::ServerName::parse(&options.server_name)
        .with_context(|| format!("invalid server name {:?}", options.server_name))?;
    let regex = user_regex(server_name.as_str());
    let registration = Registration::generate(
        APPSERVICE_ID,
        format!("http://{}", options.listen),
        BOT_LOCALPART,
        regex.clone(),
    );
    let key = StoreKey::generate();
    let database = options.database.as_deref();
    let store_id = crate::storage::create(database, &store_path, &key)?;
    // Leave nothing half-initialised behind if a file cannot be written: the
    // store is brand new, nothing in it was ever handed out. (A new
    // PostgreSQL store stays: the database is the operator's; `init` again
    // into it is refused, so they see it.)
    let undo = |e: anyhow::Error| {
        let _ = std::fs::remove_file(&config_path);
        if database.is_none() {
            let _ = std::fs::remove_dir_all(&store_path);
        }
        e
    };
    let config = Config {
        homeserver_url: options.homeserver_url.trim_end_matches('/').to_owned(),
        homeserver_ca: None,
        server_name: server_name.to_string(),
        listen: options.listen,
        registration: PathBuf::from(REGISTRATION_FILE),
        store_key: encode_hex(key.as_bytes()),
        database: options.database.clone(),
        store_path: None,
        store_id: Some(store_id.to_string()),
        accept_restored_store: false,
        one_time_keys: PoolSettings::default(),
        keys: KeySettings::default(),
        fallback: FallbackSettings::default(),
        limits: LimitSettings::default(),
        rooms: RoomSettings::default(),
        logging: LogSettings::default(),
    };
    let text = Zeroizing::new(
        toml::to_string(&config)
            .context("serializing the config")
            .map_err(undo)?,
    );
    write_new_private(
        &config_path,
        &format!(
            "# echo-bridge configuration (written by `echo-bridge init`).\n\
             # store_key encrypts the store: keep it secret, keep it safe.\n\
             # Optional: store_path = \"store\" (relative to this file).\n{}",
            text.as_str()
        ),
    )
    .map_err(undo)?;
    registration
        .write_new(&registration_path)
        .context(format!("writing {}", registration_path.display()))
        .map_err(undo)?;
    Ok(Initialized {
        config: config_path,
        registration: registration_path,
        user_regex: regex,
        store: match database {
            None => store_path.display().to_string(),
            Some(_) => "the PostgreSQL database".to_owned(),
        },
        store_id,
    })
}

/// Create `path` (never overwriting), owner-only on Unix, its bytes and its
/// name durable.
fn write_new_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    durable::write_new(path, contents.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        bail!("odd length or non-ASCII");
    }
    // `from_str_radix` alone would take a sign: "+a" as 0x0a.
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("not a hex digit");
    }
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 2));
    for i in (0..text.len()).step_by(2) {
        out.push(u8::from_str_radix(&text[i..i + 2], 16).context("not a hex digit")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(encode_hex(&bytes), "0001abff");
        assert_eq!(decode_hex("0001abff").expect("hex").as_slice(), &bytes);
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
    }

    #[test]
    fn homeserver_ca_is_optional_and_relative_to_the_config_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(CONFIG_FILE);
        let base = "homeserver_url = \"https://[::1]:8448\"\nserver_name = \"example.org\"\n\
                    listen = \"127.0.0.1:29300\"\nregistration = \"registration.yaml\"\n\
                    store_key = \"00\"\n";
        std::fs::write(&path, base).expect("write");
        assert_eq!(Config::load(&path).expect("load").homeserver_ca, None);
        std::fs::write(&path, format!("{base}homeserver_ca = \"ca.pem\"\n")).expect("write");
        let config = Config::load(&path).expect("load");
        assert_eq!(config.homeserver_ca, Some(dir.path().join("ca.pem")));
        assert_eq!(config.homeserver_url, "https://[::1]:8448");
    }

    #[test]
    fn the_namespace_escapes_the_server_name() {
        assert_eq!(user_regex("example.org"), r"@echo_.*:example\.org");
    }
}
