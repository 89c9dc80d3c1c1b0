//! Making file-system changes survive a power cut, not only a killed process.
//!
//! After a process is killed the kernel still holds everything it wrote. After
//! a power cut only what was synced is certain: a file's bytes after an
//! `fsync` of that file, and a file's *name* (its creation, a rename, an
//! unlink) after an `fsync` of the directory holding it. Neither sled nor
//! `std::fs` syncs directories, so these helpers do; the store uses them at
//! creation and in every group commit, and a bridge can use them for its own
//! files (echo-bridge `init` does).

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

/// `fsync` the directory `dir`: its entries (files created, renamed or
/// removed in it) become durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// `fsync` the directory that holds `path` (the current directory for a bare
/// name), making `path`'s own entry durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// `fsync` every file and directory under `root` (children before their
/// directory), and `root` itself.
pub fn sync_tree(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(root)
}

/// Create the directory `dir` and any missing parents, each made durable in
/// its parent.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_parent(dir)
}

/// Write `contents` to a new file at `path` (refusing to replace one), with
/// Unix permissions `mode`, and make both its bytes and its name durable
/// before returning.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    sync_parent(path)
}
