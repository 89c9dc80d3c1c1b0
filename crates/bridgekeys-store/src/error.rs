use std::path::PathBuf;

use crate::Version;

/// Everything that can go wrong in the store.
///
/// Each variant leaves the store unchanged: a failed write writes nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another handle in this one) holds the store open.
    #[error(
        "the store at {path} is locked: another process holds it open (only one bridge process may use a store at a time)"
    )]
    Locked {
        /// The store directory.
        path: PathBuf,
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
    /// An error of the storage engine.
    #[error("storage engine error: {0}")]
    Engine(#[from] sled::Error),
}
