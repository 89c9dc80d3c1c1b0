use std::path::PathBuf;

use crate::UndecryptableEvent;

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
    /// Creating a venv or installing packages (Synapse, or the Olm peer's
    /// matrix-nio) into it failed.
    #[error("could not install {packages} into {venv}: {detail}")]
    Install {
        /// The pinned requirements pip was asked for.
        packages: String,
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
    /// The Olm peer (matrix-nio in a Python process) failed a command: it
    /// answered an error, did not answer in time, or exited.
    #[error("olm peer: {command} failed: {error}\n--- last lines of its log ({log}) ---\n{tail}")]
    Peer {
        /// The command (`start`, `login`, `send_olm`, `wait_to_device`,
        /// `create_room`, `invite`, `join`, `leave`, `wait_joined`, `room_send`,
        /// `wait_room_message`, `quit`).
        command: String,
        /// The peer's error (e.g. `undecryptable: ...`) or what went wrong
        /// talking to it.
        error: String,
        /// The peer's log file (its stderr: our script's and nio's logging).
        log: PathBuf,
        /// The end of that log.
        tail: String,
    },
    /// The Olm peer received an encrypted room event that nio could not
    /// decrypt (no room key for its session, a libolm error, a replayed
    /// message index) or decrypted but rejected; see
    /// [`OlmPeer::wait_room_message`](crate::OlmPeer::wait_room_message).
    #[error(
        "olm peer: nio could not decrypt {} from {} in {} (Megolm session {}): {}",
        .0.event_id,
        .0.sender,
        .0.room_id,
        .0.session_id.as_deref().unwrap_or("unknown"),
        .0.reason
    )]
    Undecryptable(Box<UndecryptableEvent>),
    /// No usable PostgreSQL for a [`Postgres`](crate::Postgres): its
    /// programs are not installed, or (as root) there is no user or tool to
    /// run the server as someone else.
    #[error(
        "PostgreSQL is required for this test ({detail}); install it with `apt-get install postgresql` (Debian puts the server in /usr/lib/postgresql/<version>/bin, which is searched after PATH), or point BRIDGEKEYS_POSTGRES_BIN at a directory with initdb, postgres, pg_isready and psql"
    )]
    PostgresMissing {
        /// What was not found.
        detail: String,
    },
    /// A test certificate could not be made.
    #[error("test certificate: {detail}")]
    Tls {
        /// What failed.
        detail: String,
    },
    /// The PostgreSQL server did not come up (`initdb` failed, the server
    /// exited, or it did not accept connections in time).
    #[error("postgres did not start: {reason}\n--- last lines of its log ({log}) ---\n{tail}")]
    PostgresStart {
        /// What went wrong.
        reason: String,
        /// The log file (`initdb`'s and the server's output).
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// A command on the running PostgreSQL server failed: `psql` (creating
    /// a database, a query), or stopping or killing it.
    #[error("postgres: {what} failed: {detail}")]
    Postgres {
        /// Which command.
        what: String,
        /// Its exit status and complaint.
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
