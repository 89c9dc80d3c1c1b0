//! Where the bridge keeps its keys: the embedded sled store (the default:
//! one process, nothing to install) or a PostgreSQL database that several
//! bridge processes share (`database = "postgres://..."` in
//! `config.toml`), and `echo-bridge migrate`, which moves a sled store into
//! PostgreSQL.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use bridgekeys::store::{
    Backend, SledStore, SledStoreConfig, StoreId, StoreKey, durable, migrate::MigrationReport,
};
use zeroize::Zeroizing;

use crate::Config;

/// The open store and its id.
pub struct Opened {
    /// The store, whichever backend.
    pub store: Arc<dyn Backend>,
    /// Its id (recorded in the configuration).
    pub id: StoreId,
    /// Where it is, for messages: a path, or the database without its
    /// password.
    pub location: String,
}

/// Open the store the configuration names. Never creates one: `init` (or
/// `migrate`) did, and a missing store is an error that says so.
pub fn open(config: &Config) -> anyhow::Result<Opened> {
    match &config.database {
        None => {
            let store_dir = config.store_dir();
            let store = SledStore::open(config.store_config()?)
                .with_context(|| format!("opening the store at {}", store_dir.display()))?;
            Ok(Opened {
                id: store.id(),
                location: store_dir.display().to_string(),
                store: Arc::new(store),
            })
        }
        Some(url) => open_postgres(config, url),
    }
}

#[cfg(feature = "postgres")]
fn open_postgres(config: &Config, url: &str) -> anyhow::Result<Opened> {
    use bridgekeys::store::{PgStore, PgStoreConfig};
    if config.accept_restored_store {
        bail!(
            "--accept-restored-store is for the sled store; a PostgreSQL database keeps its \
             key-id sequence itself (restore the whole database, never a part of it)"
        );
    }
    let mut pg = PgStoreConfig::new(url, config.store_key()?);
    pg.expected_id = config.store_id()?;
    let store = PgStore::open(pg).context("opening the store in PostgreSQL")?;
    Ok(Opened {
        id: store.id(),
        location: store.location().display().to_string(),
        store: Arc::new(store),
    })
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &Config, _: &str) -> anyhow::Result<Opened> {
    bail!(
        "config.toml names a PostgreSQL database, but this echo-bridge was built without \
         PostgreSQL support: build it with `--features postgres` (on by default)"
    )
}

/// Create a new store for `init`: in `database` when given, else the sled
/// store at `store_path`. Returns its id.
pub fn create(
    database: Option<&str>,
    store_path: &Path,
    key: &StoreKey,
) -> anyhow::Result<StoreId> {
    match database {
        None => {
            let store = SledStore::create(SledStoreConfig::new(store_path, key.clone()))
                .with_context(|| format!("creating the store at {}", store_path.display()))?;
            Ok(store.id())
        }
        Some(url) => create_postgres(url, key),
    }
}

#[cfg(feature = "postgres")]
fn create_postgres(url: &str, key: &StoreKey) -> anyhow::Result<StoreId> {
    use bridgekeys::store::{PgStore, PgStoreConfig};
    let store = PgStore::create(PgStoreConfig::new(url, key.clone()))
        .context("creating the store in PostgreSQL")?;
    Ok(store.id())
}

#[cfg(not(feature = "postgres"))]
fn create_postgres(_: &str, _: &StoreKey) -> anyhow::Result<StoreId> {
    bail!("this echo-bridge was built without PostgreSQL support (feature `postgres`)")
}

/// What `migrate` did.
#[derive(Debug)]
pub struct Migrated {
    /// What was copied.
    pub report: MigrationReport,
    /// The new store's id, now in the configuration.
    pub store_id: StoreId,
    /// Where the sled store was moved, so that it is never run again.
    pub old_store: PathBuf,
}

/// Copy the sled store `config_path` names into a new store in the
/// PostgreSQL database `to`, then point the configuration at it.
///
/// Refuses (changing nothing) a configuration already on PostgreSQL, a
/// sled store a running bridge holds (its lock), and a database that
/// already holds a store. On success the configuration gains `database`
/// and the new `store_id` (its other lines, comments included, are kept),
/// and the sled store directory is renamed to `<store>.migrated`, so that
/// neither a restart nor a mistake runs the old store again: two stores
/// handing out keys for the same puppet devices would issue the same key
/// ids twice.
#[cfg(feature = "postgres")]
pub async fn migrate(config_path: &Path, to: &str) -> anyhow::Result<Migrated> {
    use bridgekeys::store::{PgStore, PgStoreConfig, StoreError, migrate::copy};
    let config = Config::load(config_path)?;
    if config.database.is_some() {
        bail!(
            "{} already names a PostgreSQL database; migrate copies a sled store",
            config_path.display()
        );
    }
    let store_dir = config.store_dir();
    let source = SledStore::open(config.store_config()?)
        .with_context(|| format!("opening the store at {}", store_dir.display()))?;
    let target = match PgStore::create(PgStoreConfig::new(to, config.store_key()?)) {
        Err(e @ StoreError::AlreadyExists { .. }) => {
            return Err(anyhow::Error::new(e).context(
                "the target database already holds a store; migrate only into an empty database",
            ));
        }
        other => other.context("creating the store in PostgreSQL")?,
    };
    let report = copy(&source, &target)
        .await
        .context("copying the store into PostgreSQL")?;
    let store_id = target.id();
    drop(target);
    // The sled store stays open (its lock held) until the configuration
    // names PostgreSQL and the store is renamed: a bridge restarting
    // meanwhile (a supervisor retrying) gets `Locked`, never a window in
    // which it could start on the old store and issue key ids the new one
    // also issues.
    point_config_at(config_path, to, store_id)?;
    let old_store = store_dir.with_extension("migrated");
    std::fs::rename(&store_dir, &old_store).with_context(|| {
        format!(
            "the store was copied and the configuration now names PostgreSQL, but renaming {} \
             failed; rename or remove it yourself so it is never run again",
            store_dir.display()
        )
    })?;
    durable::sync_parent(&old_store)
        .with_context(|| format!("syncing the directory of {}", old_store.display()))?;
    drop(source);
    Ok(Migrated {
        report,
        store_id,
        old_store,
    })
}

#[cfg(not(feature = "postgres"))]
pub async fn migrate(_: &Path, _: &str) -> anyhow::Result<Migrated> {
    bail!("this echo-bridge was built without PostgreSQL support (feature `postgres`)")
}

/// Rewrite `config_path` with `database = <url>` and `store_id = <id>` as
/// its first settings, every other line kept, replacing the file
/// atomically and durably.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn point_config_at(config_path: &Path, url: &str, id: StoreId) -> anyhow::Result<()> {
    let text = Zeroizing::new(
        std::fs::read_to_string(config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    );
    let mut out = Zeroizing::new(String::with_capacity(text.len() + url.len() + 64));
    let mut top_level = true;
    let mut inserted = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            top_level = false;
        }
        let setting = |name: &str| {
            trimmed
                .strip_prefix(name)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        };
        if top_level && (setting("database") || setting("store_id")) {
            continue;
        }
        if !inserted && !trimmed.starts_with('#') && !trimmed.is_empty() {
            // After the leading comments, before the first setting.
            out.push_str(&format!(
                "database = {}\nstore_id = \"{id}\"\n",
                toml::Value::String(url.to_owned())
            ));
            inserted = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !inserted {
        bail!("{} holds no settings", config_path.display());
    }
    let tmp = config_path.with_extension("toml.migrating");
    let _ = std::fs::remove_file(&tmp);
    durable::write_new(&tmp, out.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, config_path)
        .with_context(|| format!("replacing {}", config_path.display()))?;
    durable::sync_parent(config_path)
        .with_context(|| format!("syncing the directory of {}", config_path.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pointing_the_config_at_postgres_keeps_every_other_line_and_replaces_the_store_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "# comment kept\nhomeserver_url = \"http://hs\"\nstore_id = \"old\"\n\n[keys]\n\
             store_id = \"not top level\"\n",
        )
        .unwrap();
        let id: StoreId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        point_config_at(&path, "postgres://u:p@h/db", id).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "# comment kept\ndatabase = \"postgres://u:p@h/db\"\n\
             store_id = \"0123456789abcdef0123456789abcdef\"\nhomeserver_url = \"http://hs\"\n\n\
             [keys]\nstore_id = \"not top level\"\n"
        );
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["database"].as_str(), Some("postgres://u:p@h/db"));
    }
}
