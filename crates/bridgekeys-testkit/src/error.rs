use std::path::PathBuf;

/// Why a test homeserver could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// No usable Python: Synapse needs Python 3.10+ with the `venv` module.
    #[error(
        "python3 with the venv module is required to run Synapse ({detail}); install python3 and python3-venv, or point BRIDGEKEYS_PYTHON at one"
    )]
    PythonMissing {
        /// What failed.
        detail: String,
    },
    /// Creating the venv or installing Synapse into it failed.
    #[error("could not install matrix-synapse=={version} into {venv}: {detail}")]
    Install {
        /// The Synapse version asked for.
        version: String,
        /// The venv directory.
        venv: PathBuf,
        /// pip's (or venv's) complaint.
        detail: String,
    },
    /// Synapse did not come up (exited, or did not answer in time).
    #[error("synapse did not start: {reason}\n--- last lines of its log ({log}) ---\n{tail}")]
    Start {
        /// What went wrong.
        reason: String,
        /// The log file.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// A request to the homeserver failed or was refused.
    #[error("homeserver request {what} failed: {detail}")]
    Request {
        /// Which request.
        what: String,
        /// Status and body, or the transport error.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// Which operation.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
