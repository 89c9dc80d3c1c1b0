//! Syncing the sled store's directories and the files sled leaves unsynced.
//!
//! sled creates, renames and removes snapshot files in the store directory,
//! and writes every value too large for its log (above a quarter of a
//! segment) to a file of its own under `blobs/`; it syncs neither those
//! files nor the directories. Every group commit therefore lists both
//! directories and syncs what changed: a new or grown file before its
//! directory, and both before the log is synced.
//!
//! "Grown" matters for `blobs/`: sled creates a blob file, then writes it,
//! on the inserting thread, while a commit for other writers may be
//! listing the directory. A commit that saw the file half-written synced
//! half of it; the commit that answers the blob's writer starts after the
//! write returned and sees a longer file, so it syncs the file again.
//! sled only ever appends to a new blob file and never rewrites one, so
//! its length tells a finished file from one that was synced too early.
//!
//! Listing costs a few system calls per commit (an `openat`, two
//! `getdents64`, a `close` per directory, and a `statx` per blob file).
//! A cheaper check of the directories' change times was tried and dropped:
//! trusting a timestamp to move with every change fails when the clock is
//! stepped back or the file system keeps another machine's clock (NFS).

use std::{
    ffi::OsString,
    io,
    os::unix::fs::DirEntryExt,
    path::{Path, PathBuf},
};

use crate::durable;

/// The store directory and its `blobs/`, watched for new and grown files.
pub(crate) struct DirWatch {
    dirs: Vec<WatchedDir>,
}

impl DirWatch {
    /// Watch the store directory and its `blobs/`, syncing them (and every
    /// file in `blobs/`) once now.
    pub(crate) fn new(store: &Path) -> io::Result<Self> {
        let watch = Self {
            dirs: vec![
                WatchedDir::new(store.join("blobs"), true),
                WatchedDir::new(store.to_owned(), false),
            ],
        };
        watch.sync_if_changed()?;
        Ok(watch)
    }

    /// Sync what changed: new (and, in `blobs/`, grown) files, then their
    /// directory. `blobs/` first, so its entry in the store directory is
    /// synced after its contents.
    pub(crate) fn sync_if_changed(&self) -> io::Result<()> {
        for watched in &self.dirs {
            watched.sync_if_changed()?;
        }
        Ok(())
    }
}

/// One entry as last synced: name, inode and, for files whose length is
/// watched, the length synced (0 otherwise).
type Entry = (OsString, u64, u64);

struct WatchedDir {
    dir: PathBuf,
    /// Whether files here can still be growing when first seen (`blobs/`),
    /// so their length is compared too. In the store directory sled syncs
    /// what it writes (snapshots) itself, and the log grows all the time
    /// and is synced by the commit; there only names matter.
    watch_lengths: bool,
    /// What the last sync saw, sorted.
    synced: parking_lot::Mutex<Vec<Entry>>,
    /// Files synced so far (for tests).
    #[cfg(test)]
    file_syncs: std::sync::atomic::AtomicU64,
}

impl WatchedDir {
    fn new(dir: PathBuf, watch_lengths: bool) -> Self {
        Self {
            dir,
            watch_lengths,
            synced: parking_lot::Mutex::new(Vec::new()),
            #[cfg(test)]
            file_syncs: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn listing(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // sled creates `blobs/` at open; a missing one has nothing to sync.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let len = if self.watch_lengths {
                match entry.metadata() {
                    Ok(meta) => meta.len(),
                    // Removed since the listing: nothing to sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            } else {
                0
            };
            out.push((entry.file_name(), entry.ino(), len));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Sync the directory's new (or grown) files and the directory itself
    /// if anything changed since the last sync. A listing is read before
    /// its syncs: a change made after the read shows at the next commit.
    fn sync_if_changed(&self) -> io::Result<()> {
        let listing = self.listing()?;
        let mut synced = self.synced.lock();
        if *synced == listing {
            return Ok(());
        }
        for entry in listing.iter().filter(|e| synced.binary_search(e).is_err()) {
            let path = self.dir.join(&entry.0);
            match std::fs::File::open(&path) {
                Ok(file) if file.metadata()?.is_file() => {
                    file.sync_all()?;
                    #[cfg(test)]
                    self.file_syncs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                // Removed since the listing (an old snapshot): nothing to sync.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if !listing.is_empty() || self.dir.exists() {
            durable::sync_dir(&self.dir)?;
        }
        *synced = listing;
        Ok(())
    }

    #[cfg(test)]
    fn file_syncs(&self) -> u64 {
        self.file_syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(test)]
    fn synced_names(&self) -> Vec<OsString> {
        self.synced
            .lock()
            .iter()
            .map(|(name, _, _)| name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_blob_synced_while_half_written_is_synced_again_once_it_is_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let watched = WatchedDir::new(tmp.path().to_owned(), true);
        // sled creates the file, then writes it: a commit for another
        // writer lists the directory in between.
        let mut blob = std::fs::File::create_new(tmp.path().join("1")).expect("create");
        blob.write_all(b"crc").expect("write");
        watched.sync_if_changed().expect("sync");
        assert_eq!(watched.file_syncs(), 1, "the new file is synced");
        blob.write_all(b"the rest of the value").expect("write");
        // The commit that answers the blob's writer.
        watched.sync_if_changed().expect("sync");
        assert_eq!(
            watched.file_syncs(),
            2,
            "the grown file is synced again, whole this time"
        );
        watched.sync_if_changed().expect("sync");
        assert_eq!(
            watched.file_syncs(),
            2,
            "an unchanged file is not synced again"
        );
    }

    #[test]
    fn new_and_renamed_entries_are_found_and_a_growing_log_is_not_synced_here() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("db"), b"log").expect("write");
        let watched = WatchedDir::new(tmp.path().to_owned(), false);
        watched.sync_if_changed().expect("sync");
        assert_eq!(watched.synced_names(), vec![OsString::from("db")]);
        let syncs = watched.file_syncs();
        std::fs::write(tmp.path().join("db"), b"a longer log").expect("write");
        watched.sync_if_changed().expect("sync");
        assert_eq!(
            watched.file_syncs(),
            syncs,
            "the store directory's files are watched by name (the commit syncs the log itself)"
        );
        std::fs::write(tmp.path().join("snap.1.generating"), b"s").expect("write");
        std::fs::rename(
            tmp.path().join("snap.1.generating"),
            tmp.path().join("snap.1"),
        )
        .expect("rename");
        watched.sync_if_changed().expect("sync");
        assert_eq!(
            watched.synced_names(),
            vec![OsString::from("db"), OsString::from("snap.1")]
        );
    }

    #[test]
    fn a_missing_directory_is_nothing_to_sync_and_is_found_once_created() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("blobs");
        let watched = WatchedDir::new(dir.clone(), true);
        watched.sync_if_changed().expect("no directory, no error");
        assert!(watched.synced_names().is_empty());
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("1"), b"blob").expect("write");
        watched.sync_if_changed().expect("sync");
        assert_eq!(watched.synced_names(), vec![OsString::from("1")]);
    }
}
