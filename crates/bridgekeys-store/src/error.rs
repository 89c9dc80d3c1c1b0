use std::path::PathBuf;

use crate::{StoreId, Version};

/// Everything that can go wrong in the store.
///
/// Each variant leaves the store unchanged: a failed write writes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (or another handle in this one) holds the store open.
    #[error(
        "the store at {path} is locked: another process holds it open (only one bridge process may use a store at a time)"
    )]
    Locked {
        /// The store directory.
        path: PathBuf,
    },
    /// There is no store at the path (or only an empty directory): it was
    /// never created, or it was moved or lost. Opening never creates one.
    #[error(
        "no bridgekeys store at {path} (missing or empty). If this bridge never had one, create it \
         explicitly (`echo-bridge init`, or `SledStore::create`). If it had one, do not create a new \
         one: it would give every puppet new identity keys and reuse key ids; restore the store \
         directory from where it was (or from a backup, see docs/STORAGE.md) and check the \
         configured path"
    )]
    Missing {
        /// The configured store directory.
        path: PathBuf,
    },
    /// [`crate::SledStore::create`] found something at the path already.
    #[error(
        "{path} already exists and is not empty: refusing to create a store over it (open it \
         instead, or choose another path)"
    )]
    AlreadyExists {
        /// The configured store directory.
        path: PathBuf,
    },
    /// The store at the path is not the one the configuration names.
    #[error(
        "the store at {path} has id {}, but the configuration expects {expected}: this is \
         another bridge's store, or a new store created where this bridge's store was lost. \
         Nothing was changed. Point the configuration at the right store (its id is in the \
         store's `m/storeid` record and printed by `init`)",
        found.map_or_else(|| "none (made before store ids)".to_owned(), |f| f.to_string())
    )]
    Foreign {
        /// The store directory.
        path: PathBuf,
        /// The id the configuration expects.
        expected: StoreId,
        /// The id of the store found (`None`: a store made before store ids).
        found: Option<StoreId>,
    },
    /// The store's key-id sequence is behind its watermark (the file
    /// `<store>.watermark` beside it): the store was restored from an older
    /// backup, and would hand out key ids it handed out before.
    #[error(
        "the store at {path} is older than its key-id watermark (store mark {store_mark}, \
         watermark {watermark}): it was restored from a backup. Keys handed out after that backup \
         are lost with it. Nothing was changed. To use it anyway, open it once with \
         accept_restored (echo-bridge: `run --accept-restored-store`): key ids then jump past \
         the watermark so none is issued twice"
    )]
    RolledBack {
        /// The store directory.
        path: PathBuf,
        /// The key-id mark found in the store.
        store_mark: u64,
        /// The mark the watermark file recorded.
        watermark: u64,
    },
    /// The storage engine could not read the store's files.
    #[error(
        "the store at {path} cannot be read: {reason}. Its files are `conf` (engine settings, \
         written once at creation), `db` (the log) and `snap.*` (snapshots). Do not delete them \
         and do not create a new store in their place (that re-issues identities and key ids): \
         keep a copy of the directory, then restore the store from your latest backup as \
         docs/STORAGE.md describes"
    )]
    Unreadable {
        /// The store directory.
        path: PathBuf,
        /// What the engine reported.
        reason: String,
    },
    /// A file-system operation on the store's directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the store was doing.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The store key from configuration does not open this store.
    #[error(
        "the store at {path} was created with a different store key: check the configured key (the data is intact, nothing was changed)"
    )]
    WrongKey {
        /// The store directory.
        path: PathBuf,
    },
    /// The store was written by a newer (or unknown) schema.
    #[error("the store at {path} has schema version {found}, this build supports {supported}")]
    UnsupportedSchema {
        /// The store directory.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A versioned write lost a race: somebody else wrote the record first.
    #[error("version conflict: expected {expected:?}, found {found:?}")]
    Conflict {
        /// The version the writer read.
        expected: Option<Version>,
        /// The version actually stored.
        found: Option<Version>,
    },
    /// A record failed authentication or has an impossible shape.
    #[error("corrupt record in the store: {what}")]
    Corrupt {
        /// Which record and why.
        what: String,
    },
    /// The store-wide one-time key id sequence is used up (2^64 ids).
    #[error("no one-time key ids left in this store")]
    KeyIdsExhausted,
    /// The store could not make a write durable. The write was not acknowledged.
    #[error("the store could not flush to disk: {reason}")]
    Durability {
        /// The underlying error.
        reason: String,
    },
    /// The store was closed before a pending write was flushed.
    #[error("the store was closed before the write was flushed")]
    Closed,
    /// An error of the storage engine (sled, or another backend's
    /// database): boxed, so the contract names no engine and any backend
    /// can report its own.
    #[error("storage engine error: {0}")]
    Engine(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl StoreError {
    /// An error of a backend's storage engine ([`StoreError::Engine`]).
    pub fn engine(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self::Engine(error.into())
    }
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        Self::Engine(Box::new(error))
    }
}
