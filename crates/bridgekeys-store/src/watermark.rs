//! The key-id watermark: a small file beside the store that remembers how
//! far the store's key-id sequence had durably reached.
//!
//! A store restored from an old backup has an old key-id mark: left alone it
//! would hand out key ids it already handed out (and whose private halves it
//! no longer has). The store itself cannot notice, so this file, kept
//! *outside* the store directory (`<store>.watermark`), does: it is written
//! only after the mark it records is durable in the store, so a store whose
//! mark is below it was rolled back. Restoring the store directory alone is
//! then refused ([`crate::StoreError::RolledBack`]) until the operator says
//! so ([`crate::SledStoreConfig::accept_restored`]), and then the sequence
//! jumps past the watermark.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::{StoreId, durable};

const MAGIC: &str = "bridgekeys key-id watermark v1";

/// Where the watermark of the store at `store` lives.
pub(crate) fn path_for(store: &Path) -> PathBuf {
    let mut name = store
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(".watermark");
    store.with_file_name(name)
}

/// The recorded (store id, mark), if the file exists.
pub(crate) fn read(path: &Path) -> io::Result<Option<(StoreId, u64)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a key-id watermark");
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad());
    }
    let id = lines
        .next()
        .and_then(|l| l.parse::<StoreId>().ok())
        .ok_or_else(bad)?;
    let mark = lines
        .next()
        .and_then(|l| l.parse::<u64>().ok())
        .ok_or_else(bad)?;
    Ok(Some((id, mark)))
}

/// Record `mark` for store `id`: written beside, synced, renamed over the old
/// file, and the directory synced, so the file is always whole.
pub(crate) fn write(path: &Path, id: StoreId, mark: u64) -> io::Result<()> {
    let tmp = path.with_extension("watermark.tmp");
    let _ = std::fs::remove_file(&tmp);
    durable::write_new(&tmp, format!("{MAGIC}\n{id}\n{mark}\n").as_bytes(), 0o600)?;
    std::fs::rename(&tmp, path)?;
    durable::sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_round_trips_and_sits_beside_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("keys");
        let path = path_for(&store);
        assert_eq!(path, dir.path().join("keys.watermark"));
        assert_eq!(read(&path).expect("read"), None);
        let id = StoreId::generate();
        write(&path, id, 42).expect("write");
        write(&path, id, 43).expect("overwrite");
        assert_eq!(read(&path).expect("read"), Some((id, 43)));
        std::fs::write(&path, "garbage").expect("spoil");
        assert!(read(&path).is_err());
    }
}
