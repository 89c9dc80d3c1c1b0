//! Syncing the sled store's directories when, and only when, their entries
//! changed.
//!
//! sled creates, renames and removes snapshot files in the store directory,
//! and writes every value too large for its log (above a quarter of a
//! segment) to a file of its own under `blobs/`; it syncs neither those
//! files nor the directories. Every group commit therefore syncs what
//! changed: a new file before its directory, and both before the log that
//! refers to them.
//!
//! Whether anything changed is asked of the directory's own inode first.
//! Adding, removing or renaming an entry sets the directory's change time
//! (`ctime`, which no user call can set back) to the current time. So a
//! directory whose change time has not moved since the last listing, and
//! was already a few seconds old when that listing was taken, has the same
//! entries: one `stat` instead of opening and reading two directories on
//! every commit (about ten system calls, which a lone claim waits for).
//!
//! "A few seconds old" matters because file-system timestamps come from a
//! coarse clock, and some file systems keep only whole seconds: a change in
//! the same tick as the one before could leave the change time as it was.
//! A listing whose directory changed less than [`SETTLE`] before it is
//! therefore not trusted, and the directory is listed again at the next
//! commit until it settles.

use std::{
    ffi::OsString,
    io,
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::durable;

/// How old a directory's last change must be before its listing is trusted
/// to stay current while its change time does not move: longer than any
/// file system's timestamp granularity (two seconds at worst).
pub(crate) const SETTLE: Duration = Duration::from_secs(3);

/// The store directory and its `blobs/`, watched for new entries.
pub(crate) struct DirWatch {
    dirs: Vec<WatchedDir>,
}

impl DirWatch {
    /// Watch the store directory and its `blobs/`, syncing them (and every
    /// file in `blobs/`) once now.
    pub(crate) fn new(store: &Path) -> io::Result<Self> {
        let watch = Self {
            dirs: vec![
                WatchedDir::new(store.join("blobs")),
                WatchedDir::new(store.to_owned()),
            ],
        };
        watch.sync_if_changed()?;
        Ok(watch)
    }

    /// Sync what changed: new files, then their directory. `blobs/` first,
    /// so its entry in the store directory is synced after its contents.
    pub(crate) fn sync_if_changed(&self) -> io::Result<()> {
        let now = SystemTime::now();
        for watched in &self.dirs {
            watched.sync_if_changed(now)?;
        }
        Ok(())
    }
}

/// What identifies a directory's entries without reading them: its inode,
/// and its modification and change times to the nanosecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The directory's stamp, `None` when there is no such directory.
    fn of(dir: &Path) -> io::Result<Option<Self>> {
        match std::fs::metadata(dir) {
            Ok(meta) => Ok(Some(Self {
                ino: meta.ino(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether both times are at least [`SETTLE`] before `now`.
    fn settled_at(&self, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let Some(limit) = now.checked_sub(SETTLE) else {
            return false;
        };
        let before = |(secs, nanos): (i64, i64)| {
            match (u64::try_from(secs), u32::try_from(nanos)) {
                (Ok(secs), Ok(nanos)) => Duration::new(secs, 0)
                    .checked_add(Duration::from_nanos(u64::from(nanos)))
                    .is_some_and(|t| t < limit),
                // A time before 1970 or out of range: never trusted.
                _ => false,
            }
        };
        before(self.mtime) && before(self.ctime)
    }
}

/// What the last sync of one directory saw.
#[derive(Default)]
struct Seen {
    /// Names and inode numbers, sorted, as synced.
    listing: Vec<(OsString, u64)>,
    /// The directory's stamp taken before that listing, when it was
    /// already settled then: while the directory still has it, the listing
    /// is current.
    trusted: Option<Stamp>,
    /// How many times the directory was read (for tests).
    listings: u64,
}

struct WatchedDir {
    dir: PathBuf,
    seen: parking_lot::Mutex<Seen>,
}

impl WatchedDir {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            seen: parking_lot::Mutex::new(Seen::default()),
        }
    }

    fn listing(&self) -> io::Result<Vec<(OsString, u64)>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // sled creates `blobs/` at open; a missing one has nothing to sync.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            out.push((entry.file_name(), entry.ino()));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Sync the directory's new files and the directory itself if its
    /// entries changed since the last sync. `now` is the time the commit
    /// started (a parameter so tests can age a directory).
    fn sync_if_changed(&self, now: SystemTime) -> io::Result<()> {
        // The stamp is taken before the listing: a change made after it
        // moves the change time, so it cannot hide behind this listing.
        let stamp = Stamp::of(&self.dir)?;
        let mut seen = self.seen.lock();
        if stamp.is_some() && stamp == seen.trusted {
            return Ok(());
        }
        let listing = self.listing()?;
        seen.listings += 1;
        if seen.listing != listing {
            for entry in listing
                .iter()
                .filter(|e| seen.listing.binary_search(e).is_err())
            {
                let path = self.dir.join(&entry.0);
                match std::fs::File::open(&path) {
                    Ok(file) if file.metadata()?.is_file() => file.sync_all()?,
                    Ok(_) => {}
                    // Removed since the listing (an old snapshot): nothing to sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            if !listing.is_empty() || self.dir.exists() {
                durable::sync_dir(&self.dir)?;
            }
            seen.listing = listing;
        }
        seen.trusted = stamp.filter(|s| s.settled_at(now));
        Ok(())
    }

    #[cfg(test)]
    fn listings(&self) -> u64 {
        self.seen.lock().listings
    }

    #[cfg(test)]
    fn synced_names(&self) -> Vec<OsString> {
        self.seen
            .lock()
            .listing
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> SystemTime {
        SystemTime::now() + SETTLE * 10
    }

    /// Set the directory's modification time far back, so the next entry
    /// change moves it whatever the clock's granularity (the tests run
    /// faster than one tick of the file system's clock).
    fn age(dir: &Path) {
        std::fs::File::open(dir)
            .expect("open the directory")
            .set_modified(UNIX_EPOCH + Duration::from_secs(946_684_800))
            .expect("set its modification time");
    }

    #[test]
    fn a_settled_directory_is_read_once_until_an_entry_is_added() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a"), b"a").expect("write");
        age(tmp.path());
        let watched = WatchedDir::new(tmp.path().to_owned());
        // Seen from well after its last change: settled.
        watched.sync_if_changed(later()).expect("sync");
        watched.sync_if_changed(later()).expect("sync");
        watched.sync_if_changed(later()).expect("sync");
        assert_eq!(
            watched.listings(),
            1,
            "an unchanged, settled directory is read once"
        );
        assert_eq!(watched.synced_names(), vec![OsString::from("a")]);

        std::fs::write(tmp.path().join("b"), b"b").expect("write");
        watched.sync_if_changed(later()).expect("sync");
        assert_eq!(watched.listings(), 2, "a new entry moves the change time");
        assert_eq!(
            watched.synced_names(),
            vec![OsString::from("a"), OsString::from("b")],
            "the new file is found and synced"
        );

        age(tmp.path());
        watched.sync_if_changed(later()).expect("sync");
        std::fs::rename(tmp.path().join("a"), tmp.path().join("c")).expect("rename");
        watched.sync_if_changed(later()).expect("sync");
        assert_eq!(
            watched.synced_names(),
            vec![OsString::from("b"), OsString::from("c")],
            "a rename is found too"
        );
    }

    #[test]
    fn a_directory_that_changed_moments_ago_is_read_at_every_commit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a"), b"a").expect("write");
        let watched = WatchedDir::new(tmp.path().to_owned());
        let now = SystemTime::now();
        for _ in 0..3 {
            watched.sync_if_changed(now).expect("sync");
        }
        assert_eq!(
            watched.listings(),
            3,
            "a change within the timestamp granularity could hide another one"
        );
    }

    #[test]
    fn a_missing_directory_is_nothing_to_sync_and_is_found_once_created() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("blobs");
        let watched = WatchedDir::new(dir.clone());
        watched
            .sync_if_changed(later())
            .expect("no directory, no error");
        assert!(watched.synced_names().is_empty());
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("1"), b"blob").expect("write");
        watched.sync_if_changed(later()).expect("sync");
        assert_eq!(watched.synced_names(), vec![OsString::from("1")]);
    }
}
