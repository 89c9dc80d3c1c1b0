//! Power-loss simulation for tests.
//!
//! SIGKILL only proves that what a process wrote survives the process: the
//! kernel still holds it. A power cut also loses whatever the kernel had not
//! yet written to the disk, and POSIX promises little about that: a file's
//! data is on disk after `fsync`/`fdatasync` of that file, and a directory
//! entry (a new file, a rename, an unlink) after `fsync` of its directory.
//!
//! This crate simulates the cut without a kernel or a special file system:
//!
//! 1. [`Disk::command`] starts a process with an `LD_PRELOAD` shim (C, in
//!    `shim/powercut.c`, built by this crate's build script). The process
//!    works on the real files under [`Disk::root`]. The shim watches its
//!    writes and syncs under that root and keeps, in a shadow directory, the
//!    image a disk would hold: file blocks copied when the file is synced,
//!    directory listings recorded when the directory is synced.
//! 2. The test kills the process (SIGKILL) at a moment of its choosing.
//! 3. [`Disk::cut`] replaces the tree under the root with what the disk would
//!    show after the power came back, under one of two [`Model`]s.
//!
//! The process's own `sync_file_range` does not count as durable (it neither
//! flushes the drive's cache nor the file size), nor does anything not
//! synced. Only glibc calls are seen: a process that writes through `mmap` or
//! raw system calls is not modelled (the store under test does neither).
#![deny(missing_docs)]

use std::{
    collections::HashMap,
    ffi::OsString,
    fs,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use rand::Rng;

/// The size of a block: the unit a torn write keeps or loses.
pub const BLOCK: usize = 4096;

/// Where the build script put the compiled shim.
const SHIM: &str = env!("BRIDGEKEYS_POWERCUT_SHIM");

/// What a disk keeps at a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// The POSIX minimum: file data and sizes only as of the file's last
    /// `fsync`/`fdatasync`, directory entries only as of the directory's
    /// last `fsync`. Anything newer is gone: new files and directories whose
    /// parent was never synced vanish, unsynced renames and unlinks are
    /// undone.
    Strict,
    /// A journalling file system that orders metadata but not data (ext4
    /// `data=writeback`, older XFS): every directory entry and file size is
    /// as at the cut, but of the data written since the file's last sync
    /// each block independently holds either the new bytes or what the disk
    /// had before (zeros past the old end). A file whose size reached the
    /// disk before its data reads partly as zeros.
    Torn,
}

impl std::str::FromStr for Model {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(Self::Strict),
            "torn" => Ok(Self::Torn),
            other => Err(format!(
                "unknown power-loss model {other:?} (strict or torn)"
            )),
        }
    }
}

/// Why a simulation step failed.
#[derive(Debug, thiserror::Error)]
pub enum PowercutError {
    /// A file operation of the harness failed.
    #[error("power-cut simulation: {what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The shadow image does not have the shape the shim writes.
    #[error("power-cut simulation: malformed shadow image: {0}")]
    Shadow(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PowercutError {
    let what = what.into();
    move |source| PowercutError::Io { what, source }
}

/// What one cut did to the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files in the tree after the cut.
    pub files: usize,
    /// Directories in the tree after the cut (the root not counted).
    pub dirs: usize,
    /// Names (files or directories) present before the cut and missing after.
    pub names_lost: usize,
    /// Blocks whose content after the cut differs from before it.
    pub blocks_lost: usize,
    /// Whether the shim had started in the process (taken its image of the
    /// tree). A process killed before that ran none of its own code, so the
    /// tree is left as it was; a caller that saw the process do anything
    /// should treat `false` as the shim not loading.
    pub shim_started: bool,
}

/// A simulated disk: a directory tree whose durability is modelled.
#[derive(Debug)]
pub struct Disk {
    root: PathBuf,
    work: PathBuf,
    cuts: usize,
}

impl Disk {
    /// A disk whose tree is `root` (created if missing; what it holds now
    /// counts as durable). `work` holds the shim's shadow images and must be
    /// outside `root`.
    pub fn new(root: impl Into<PathBuf>, work: impl Into<PathBuf>) -> Result<Self, PowercutError> {
        let (root, work) = (root.into(), work.into());
        fs::create_dir_all(&root).map_err(io_err(format!("create {}", root.display())))?;
        fs::create_dir_all(&work).map_err(io_err(format!("create {}", work.display())))?;
        let root = root
            .canonicalize()
            .map_err(io_err(format!("resolve {}", root.display())))?;
        let work = work
            .canonicalize()
            .map_err(io_err(format!("resolve {}", work.display())))?;
        if work.starts_with(&root) {
            return Err(PowercutError::Shadow(format!(
                "the work directory {} is inside the root {}",
                work.display(),
                root.display()
            )));
        }
        Ok(Self {
            root,
            work,
            cuts: 0,
        })
    }

    /// The tree a process under [`Disk::command`] works in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The shared library to preload (for callers that build their own
    /// command).
    pub fn shim() -> &'static Path {
        Path::new(SHIM)
    }

    fn shadow(&self) -> PathBuf {
        self.work.join("shadow")
    }

    /// A command for `program` that runs with the shim watching this disk.
    /// Start at most one such process between cuts: the shadow image is
    /// reset here, taking the tree as it is now as durable.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, PowercutError> {
        let shadow = self.shadow();
        if shadow.exists() {
            fs::remove_dir_all(&shadow).map_err(io_err("reset the shadow image"))?;
        }
        fs::create_dir_all(&shadow).map_err(io_err("create the shadow image"))?;
        let mut preload = OsString::from(SHIM);
        if let Some(existing) = std::env::var_os("LD_PRELOAD") {
            preload.push(":");
            preload.push(existing);
        }
        let mut cmd = Command::new(program);
        cmd.env("LD_PRELOAD", preload)
            .env("POWERCUT_ROOT", &self.root)
            .env("POWERCUT_SHADOW", &shadow);
        Ok(cmd)
    }

    /// Cut the power: the process started with [`Disk::command`] must be
    /// dead already (killed). Replaces the tree under the root with what the
    /// disk shows after the cut under `model`, randomness from `rng` (the
    /// torn model's choice of blocks).
    pub fn cut(&mut self, model: Model, rng: &mut impl Rng) -> Result<CutReport, PowercutError> {
        let shadow = self.shadow();
        if !shadow.join("root").exists() {
            // Killed before the shim's constructor finished: before the
            // program's own code ran. Nothing changed.
            return Ok(CutReport::default());
        }
        let image = Image::read(&shadow)?;
        self.cuts += 1;
        let after = self.work.join(format!("after-cut-{}", self.cuts));
        if after.exists() {
            fs::remove_dir_all(&after).map_err(io_err("clear the rebuild directory"))?;
        }
        let mut report = CutReport {
            shim_started: true,
            ..CutReport::default()
        };
        match model {
            Model::Strict => image.rebuild_strict(&image.root, &after, &mut report)?,
            Model::Torn => image.rebuild_torn(&self.root, &after, rng, &mut report)?,
        }
        report.names_lost = lost_names(&self.root, &after)?;
        report.blocks_lost = diff_blocks(&self.root, &after)?;
        // Swap the rebuilt tree in at the same path, so that configured
        // paths stay valid.
        fs::remove_dir_all(&self.root).map_err(io_err("remove the pre-cut tree"))?;
        fs::rename(&after, &self.root).map_err(io_err("put the post-cut tree in place"))?;
        Ok(report)
    }
}

/// The shim's durable image, read back.
struct Image {
    dir: PathBuf,
    root: String,
    /// Current generation per inode, where not 0.
    gens: HashMap<u64, u32>,
}

impl Image {
    fn read(dir: &Path) -> Result<Self, PowercutError> {
        let root = fs::read_to_string(dir.join("root")).map_err(io_err(
            "read the shadow root (was the process started with Disk::command, and did the shim load?)",
        ))?;
        let mut gens = HashMap::new();
        let g = dir.join("g");
        if g.exists() {
            for entry in fs::read_dir(&g).map_err(io_err("list generations"))? {
                let entry = entry.map_err(io_err("list generations"))?;
                let ino = entry
                    .file_name()
                    .to_string_lossy()
                    .parse::<u64>()
                    .map_err(|e| PowercutError::Shadow(format!("generation file name: {e}")))?;
                let gen_text =
                    fs::read_to_string(entry.path()).map_err(io_err("read generation"))?;
                let generation = gen_text
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| PowercutError::Shadow(format!("generation: {e}")))?;
                gens.insert(ino, generation);
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            root: root.trim().to_owned(),
            gens,
        })
    }

    /// The durable content of file object `id`, if it was ever synced.
    fn file(&self, id: &str) -> Result<Option<Vec<u8>>, PowercutError> {
        match fs::read(self.dir.join("f").join(id)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("read durable file {id}"))(e)),
        }
    }

    /// The durable listing of directory object `id`: (is_dir, id, name).
    fn listing(&self, id: &str) -> Result<Vec<(bool, String, String)>, PowercutError> {
        let text = match fs::read_to_string(self.dir.join("d").join(id)) {
            Ok(t) => t,
            // Never synced: the directory exists (its parent says so) but
            // none of its entries reached the disk.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("read durable listing {id}"))(e)),
        };
        text.lines()
            .map(|line| {
                let mut parts = line.splitn(3, ' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(kind @ ("f" | "d")), Some(id), Some(name)) if !name.contains('/') => {
                        Ok((kind == "d", id.to_owned(), name.to_owned()))
                    }
                    _ => Err(PowercutError::Shadow(format!("listing line {line:?}"))),
                }
            })
            .collect()
    }

    fn rebuild_strict(
        &self,
        dir_id: &str,
        out: &Path,
        report: &mut CutReport,
    ) -> Result<(), PowercutError> {
        fs::create_dir_all(out).map_err(io_err(format!("create {}", out.display())))?;
        for (is_dir, id, name) in self.listing(dir_id)? {
            let path = out.join(&name);
            if is_dir {
                report.dirs += 1;
                self.rebuild_strict(&id, &path, report)?;
            } else {
                report.files += 1;
                let bytes = self.file(&id)?.unwrap_or_default();
                fs::write(&path, bytes).map_err(io_err(format!("write {}", path.display())))?;
            }
        }
        Ok(())
    }

    fn rebuild_torn(
        &self,
        live: &Path,
        out: &Path,
        rng: &mut impl Rng,
        report: &mut CutReport,
    ) -> Result<(), PowercutError> {
        fs::create_dir_all(out).map_err(io_err(format!("create {}", out.display())))?;
        for entry in fs::read_dir(live).map_err(io_err(format!("list {}", live.display())))? {
            let entry = entry.map_err(io_err(format!("list {}", live.display())))?;
            let meta = fs::symlink_metadata(entry.path())
                .map_err(io_err(format!("stat {}", entry.path().display())))?;
            let path = out.join(entry.file_name());
            if meta.is_dir() {
                report.dirs += 1;
                self.rebuild_torn(&entry.path(), &path, rng, report)?;
            } else if meta.is_file() {
                report.files += 1;
                let ino = meta.ino();
                let id = format!("{ino}.{}", self.gens.get(&ino).copied().unwrap_or(0));
                let old = self.file(&id)?.unwrap_or_default();
                let new = read_file(&entry.path())?;
                let torn = tear(&old, &new, rng);
                fs::write(&path, torn).map_err(io_err(format!("write {}", path.display())))?;
            }
        }
        Ok(())
    }
}

/// The torn model for one file: the new size, and of every block that
/// differs between the durable `old` and the live `new` content, either the
/// new bytes or the old ones (zeros past the old end), half and half.
fn tear(old: &[u8], new: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = vec![0u8; new.len()];
    for (i, chunk) in out.chunks_mut(BLOCK).enumerate() {
        let start = i * BLOCK;
        let new_block = &new[start..start + chunk.len()];
        let old_block: Vec<u8> = (start..start + chunk.len())
            .map(|j| old.get(j).copied().unwrap_or(0))
            .collect();
        if new_block == old_block.as_slice() || rng.gen_bool(0.5) {
            chunk.copy_from_slice(new_block);
        } else {
            chunk.copy_from_slice(&old_block);
        }
    }
    out
}

fn read_file(path: &Path) -> Result<Vec<u8>, PowercutError> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(format!("read {}", path.display())))?;
    Ok(bytes)
}

/// Paths under `before` that `after` does not have.
fn lost_names(before: &Path, after: &Path) -> Result<usize, PowercutError> {
    let mut n = 0;
    for entry in fs::read_dir(before).map_err(io_err(format!("list {}", before.display())))? {
        let entry = entry.map_err(io_err(format!("list {}", before.display())))?;
        let other = after.join(entry.file_name());
        let is_dir = entry.file_type().map_err(io_err("file type"))?.is_dir();
        if fs::symlink_metadata(&other).is_err() {
            n += 1;
            if is_dir {
                n += count_names(&entry.path())?;
            }
        } else if is_dir && other.is_dir() {
            n += lost_names(&entry.path(), &other)?;
        }
    }
    Ok(n)
}

fn count_names(dir: &Path) -> Result<usize, PowercutError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))? {
        let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
        n += 1;
        if entry.file_type().map_err(io_err("file type"))?.is_dir() {
            n += count_names(&entry.path())?;
        }
    }
    Ok(n)
}

/// Blocks of files under `before` whose content differs in `after` (a file
/// missing in `after` counts all its blocks).
fn diff_blocks(before: &Path, after: &Path) -> Result<usize, PowercutError> {
    let mut n = 0;
    for entry in fs::read_dir(before).map_err(io_err(format!("list {}", before.display())))? {
        let entry = entry.map_err(io_err(format!("list {}", before.display())))?;
        let other = after.join(entry.file_name());
        let kind = entry.file_type().map_err(io_err("file type"))?;
        if kind.is_dir() {
            if other.is_dir() {
                n += diff_blocks(&entry.path(), &other)?;
            } else {
                n += count_blocks(&entry.path())?;
            }
        } else if kind.is_file() {
            let a = read_file(&entry.path())?;
            let b = if other.is_file() {
                read_file(&other)?
            } else {
                Vec::new()
            };
            let blocks = a.len().max(b.len()).div_ceil(BLOCK);
            n += (0..blocks)
                .filter(|i| {
                    let r = i * BLOCK..(i + 1) * BLOCK;
                    a.get(r.start..r.end.min(a.len())) != b.get(r.start..r.end.min(b.len()))
                })
                .count();
        }
    }
    Ok(n)
}

fn count_blocks(dir: &Path) -> Result<usize, PowercutError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))? {
        let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
        let meta = entry.metadata().map_err(io_err("stat"))?;
        if meta.is_dir() {
            n += count_blocks(&entry.path())?;
        } else {
            n += (meta.len() as usize).div_ceil(BLOCK);
        }
    }
    Ok(n)
}
