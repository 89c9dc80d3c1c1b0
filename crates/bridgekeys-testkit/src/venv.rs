//! The Python side: a virtualenv with a pinned Synapse from PyPI, created
//! once and reused (it takes a minute; starting Synapse takes seconds).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::TestkitError;

/// The Synapse release the testkit installs: the one our wire facts were
/// read from (`shared/specs/homeserver-facts.md`).
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// Where the venv goes unless told: `$BRIDGEKEYS_SYNAPSE_VENV`, else the
/// user's cache directory (`$XDG_CACHE_HOME` or `~/.cache`), else the
/// system temp directory; one directory per Synapse version.
pub fn default_venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRIDGEKEYS_SYNAPSE_VENV") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache
        .join("bridgekeys")
        .join(format!("synapse-{SYNAPSE_VERSION}"))
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Make sure `venv` holds Synapse [`SYNAPSE_VERSION`]; return its python.
///
/// Blocking (runs pip). Safe to call from several test processes at once:
/// a lock file next to the venv serialises the installs, and a marker file
/// written last says the venv is complete.
pub fn ensure_synapse(venv: &Path) -> Result<PathBuf, TestkitError> {
    let base = std::env::var("BRIDGEKEYS_PYTHON").unwrap_or_else(|_| "python3".into());
    ensure_synapse_with(venv, &base)
}

/// [`ensure_synapse`] with an explicit base interpreter for the venv.
pub fn ensure_synapse_with(venv: &Path, base: &str) -> Result<PathBuf, TestkitError> {
    let parent = venv.parent().unwrap_or(venv);
    std::fs::create_dir_all(parent)
        .map_err(TestkitError::io(format!("creating {}", parent.display())))?;
    let lock_path = venv.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).map_err(TestkitError::io(format!(
        "creating {}",
        lock_path.display()
    )))?;
    lock.lock()
        .map_err(TestkitError::io(format!("locking {}", lock_path.display())))?;

    let python = venv.join("bin").join("python");
    let marker = venv.join(format!(".bridgekeys-synapse-{SYNAPSE_VERSION}"));
    if marker.exists() && python.exists() {
        return Ok(python);
    }
    let created = Command::new(base)
        .args(["-m", "venv", "--clear"])
        .arg(venv)
        .output()
        .map_err(|e| TestkitError::PythonMissing {
            detail: format!("running {base}: {e}"),
        })?;
    if !created.status.success() {
        return Err(TestkitError::PythonMissing {
            detail: format!("`{base} -m venv` failed: {}", tail(&created.stderr)),
        });
    }
    let installed = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--disable-pip-version-check", "--quiet"])
        .arg(format!("matrix-synapse=={SYNAPSE_VERSION}"))
        .output()
        .map_err(|e| TestkitError::Install {
            version: SYNAPSE_VERSION.into(),
            venv: venv.to_owned(),
            detail: e.to_string(),
        })?;
    if !installed.status.success() {
        return Err(TestkitError::Install {
            version: SYNAPSE_VERSION.into(),
            venv: venv.to_owned(),
            detail: tail(&installed.stderr),
        });
    }
    std::fs::write(&marker, SYNAPSE_VERSION)
        .map_err(TestkitError::io(format!("writing {}", marker.display())))?;
    Ok(python)
}
