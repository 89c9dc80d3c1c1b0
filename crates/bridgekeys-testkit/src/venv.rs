//! The Python side: virtualenvs with pinned packages from PyPI, created
//! once and reused (installing takes a minute; starting takes seconds).
//! One venv holds Synapse; another holds the Olm peer's matrix-nio, kept
//! apart so neither's dependencies can move the other's.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::TestkitError;

/// The Synapse release the testkit installs: the one our wire facts were
/// checked against (see `docs/APPSERVICE.md`, "Against a real homeserver").
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// The matrix-nio release the [`OlmPeer`](crate::OlmPeer) runs. 0.25.x is
/// the last line whose Olm is python-olm (libolm); 0.26 moved to the
/// vodozemac bindings, the same Olm code our bridge uses, which would make
/// the interop test compare vodozemac with itself.
pub const MATRIX_NIO_VERSION: &str = "0.25.2";

/// The python-olm (libolm) release under matrix-nio. PyPI has manylinux
/// wheels of it for CPython up to 3.12; on a newer Python pip builds it
/// from its source distribution (vendored libolm), which needs a C++
/// compiler, make and the Python headers (`python3-dev`), or point
/// `BRIDGEKEYS_PYTHON` at a Python 3.10 to 3.12.
pub const PYTHON_OLM_VERSION: &str = "3.2.16";

/// The user's cache directory for the testkit's venvs: `$XDG_CACHE_HOME`
/// or `~/.cache`, else the system temp directory; then `bridgekeys`.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("bridgekeys")
}

/// Where the venv goes unless told: `$BRIDGEKEYS_SYNAPSE_VENV`, else the
/// user's cache directory (`$XDG_CACHE_HOME` or `~/.cache`), else the
/// system temp directory; one directory per Synapse version.
pub fn default_venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRIDGEKEYS_SYNAPSE_VENV") {
        return dir.into();
    }
    cache_dir().join(format!("synapse-{SYNAPSE_VERSION}"))
}

/// Where the Olm peer's venv goes unless told: `$BRIDGEKEYS_OLM_PEER_VENV`,
/// else next to the Synapse venv in the cache directory; one directory per
/// matrix-nio and python-olm version pair.
pub fn default_olm_peer_venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRIDGEKEYS_OLM_PEER_VENV") {
        return dir.into();
    }
    cache_dir().join(format!(
        "olm-peer-nio-{MATRIX_NIO_VERSION}-olm-{PYTHON_OLM_VERSION}"
    ))
}

fn base_python() -> String {
    std::env::var("BRIDGEKEYS_PYTHON").unwrap_or_else(|_| "python3".into())
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
    ensure_synapse_with(venv, &base_python())
}

/// [`ensure_synapse`] with an explicit base interpreter for the venv.
pub fn ensure_synapse_with(venv: &Path, base: &str) -> Result<PathBuf, TestkitError> {
    ensure_venv(
        venv,
        base,
        &[format!("matrix-synapse=={SYNAPSE_VERSION}")],
        &format!(".bridgekeys-synapse-{SYNAPSE_VERSION}"),
    )
}

/// Make sure `venv` holds matrix-nio [`MATRIX_NIO_VERSION`] with its
/// end-to-end extra on python-olm [`PYTHON_OLM_VERSION`]; return its
/// python. Blocking, locked and marked like [`ensure_synapse`].
pub fn ensure_olm_peer(venv: &Path) -> Result<PathBuf, TestkitError> {
    ensure_olm_peer_with(venv, &base_python())
}

/// [`ensure_olm_peer`] with an explicit base interpreter for the venv.
pub fn ensure_olm_peer_with(venv: &Path, base: &str) -> Result<PathBuf, TestkitError> {
    ensure_venv(
        venv,
        base,
        &[
            format!("matrix-nio[e2e]=={MATRIX_NIO_VERSION}"),
            format!("python-olm=={PYTHON_OLM_VERSION}"),
        ],
        &format!(".bridgekeys-olm-peer-nio-{MATRIX_NIO_VERSION}-olm-{PYTHON_OLM_VERSION}"),
    )
}

/// Create `venv` from `base` and pip-install `requirements` into it, unless
/// the `marker` file (written last) says that was done already.
fn ensure_venv(
    venv: &Path,
    base: &str,
    requirements: &[String],
    marker: &str,
) -> Result<PathBuf, TestkitError> {
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
    let marker = venv.join(marker);
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
    let install_error = |detail: String| TestkitError::Install {
        packages: requirements.join(" "),
        venv: venv.to_owned(),
        detail,
    };
    let installed = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--disable-pip-version-check", "--quiet"])
        .args(requirements)
        .output()
        .map_err(|e| install_error(e.to_string()))?;
    if !installed.status.success() {
        return Err(install_error(tail(&installed.stderr)));
    }
    std::fs::write(&marker, requirements.join("\n"))
        .map_err(TestkitError::io(format!("writing {}", marker.display())))?;
    Ok(python)
}
