//! Start a real Synapse (and, for stores, a real PostgreSQL) for a test, so
//! that a bridge is tested against the homeserver and database it will
//! meet, not mocks of them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bridgekeys_testkit::TestkitError> {
//! use bridgekeys_testkit::{Synapse, SynapseOptions};
//!
//! let synapse = Synapse::start(SynapseOptions {
//!     appservice_registrations: vec!["registration.yaml".into()],
//!     ..SynapseOptions::default()
//! })
//! .await?;
//! let alice = synapse.register_user("alice", "correct horse").await?;
//! println!("{} talks to {}", alice.user_id, synapse.url());
//! # Ok(()) }
//! ```
//!
//! The first start creates a Python virtualenv with `matrix-synapse` from
//! PyPI ([`SYNAPSE_VERSION`], about a minute) and caches it
//! ([`default_venv_dir`]); later starts take seconds. Each [`Synapse`] has
//! its own temporary data directory, SQLite database and free loopback
//! port, and is stopped when dropped; if the test is panicking at that
//! moment, the end of Synapse's log is printed to help find out why.
//!
//! For Olm interop tests, an [`OlmPeer`] is a real Matrix client we did not
//! write: matrix-nio ([`MATRIX_NIO_VERSION`]) on python-olm, i.e. libolm
//! ([`PYTHON_OLM_VERSION`]), in its own cached venv
//! ([`default_olm_peer_venv_dir`]), doing all of its Olm itself:
//!
//! ```no_run
//! # fn bridge_sends_a_room_key_to(_: &str, _: &str) {}
//! # async fn demo(synapse: &bridgekeys_testkit::Synapse) -> Result<(), bridgekeys_testkit::TestkitError> {
//! use std::time::Duration;
//! use bridgekeys_testkit::{OlmPeer, PeerLogin};
//!
//! synapse.register_user("carol", "pw").await?;
//! let mut carol = OlmPeer::start().await?;
//! let device = carol
//!     .login(&PeerLogin::new(synapse.url(), "@carol:localhost", "pw"))
//!     .await?;
//! bridge_sends_a_room_key_to(&device.user_id, &device.device_id);
//! let got = carol
//!     .wait_to_device("m.room_key", Duration::from_secs(30))
//!     .await?
//!     .expect("the bridge's room key arrives");
//! assert_eq!(got.sender_key, "the bridge device's curve25519 key");
//! carol.quit().await?;
//! # Ok(()) }
//! ```
//!
//! For a store on PostgreSQL, a [`Postgres`] is a real, throwaway server:
//! `initdb` into a temporary directory, `postgres` on a free loopback port
//! with `fsync` on (the tests are about durability; [`PostgresOptions`]
//! can turn it off), a password-protected superuser, and one fresh
//! database per test. [`Postgres::kill`] and [`Postgres::restart`] crash
//! and recover it. It uses the PostgreSQL command-line tools, found on
//! `PATH` or in Debian's `/usr/lib/postgresql/<version>/bin`
//! (`apt-get install postgresql`); as root, it runs the server as the
//! `postgres` (else `nobody`) user, since PostgreSQL refuses root. It is
//! stopped and its directory removed when dropped; if the test is
//! panicking, the end of its log is printed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bridgekeys_testkit::TestkitError> {
//! use bridgekeys_testkit::Postgres;
//!
//! let mut pg = Postgres::start().await?;
//! let url = pg.create_database("my_test").await?; // postgres://…/my_test
//! pg.psql("my_test", "CREATE TABLE t (n int); INSERT INTO t VALUES (1)").await?;
//! pg.kill().await?; // SIGKILL to the server and all of its processes
//! pg.restart().await?; // crash recovery, same port and URL
//! assert_eq!(pg.psql("my_test", "SELECT n FROM t").await?, "1");
//! # let _ = url; Ok(()) }
//! ```
#![deny(missing_docs)]

mod config;
mod error;
mod http;
mod peer;
mod postgres;
mod tls;
mod venv;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use error::TestkitError;
pub use peer::{
    NewRoom, OlmPeer, PeerDevice, PeerDeviceKeys, PeerLogin, PeerRoomMessage, PeerVersions,
    ReceivedOlm, RoomMessageQuery, SentOlm, SentRoomMessage, UndecryptableEvent, UserDevice,
};
pub use postgres::{POSTGRES_BIN_ENV, Postgres, PostgresOptions};
pub use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
pub use tls::{IssuedCertificate, TestCa};
pub use venv::{
    MATRIX_NIO_VERSION, PYTHON_OLM_VERSION, SYNAPSE_VERSION, default_olm_peer_venv_dir,
    default_venv_dir, ensure_olm_peer, ensure_olm_peer_with, ensure_synapse, ensure_synapse_with,
};

/// How to start a test homeserver.
#[derive(Clone, Debug)]
pub struct SynapseOptions {
    /// The server name (the part after `:` in user ids).
    pub server_name: String,
    /// Appservice registration files to load (`app_service_config_files`).
    pub appservice_registrations: Vec<PathBuf>,
    /// The venv to use (created if needed); [`default_venv_dir`] if `None`.
    pub venv: Option<PathBuf>,
    /// How long Synapse may take to answer after it was started.
    pub start_timeout: Duration,
    /// Whether Synapse asks appservices for their users' one-time keys
    /// (`msc3983_appservice_otk_claims`, default on). Off, it behaves as
    /// homeservers without MSC3983 do: only uploaded keys are handed out.
    pub proxy_key_claims: bool,
    /// Whether Synapse asks appservices for their users' device keys
    /// (`msc3984_appservice_key_query`, default on). Off, `keys/query`
    /// shows the homeserver's own copy.
    pub proxy_key_queries: bool,
}

impl Default for SynapseOptions {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            appservice_registrations: Vec::new(),
            venv: None,
            start_timeout: Duration::from_secs(90),
            proxy_key_claims: true,
            proxy_key_queries: true,
        }
    }
}

/// A user registered on the test homeserver.
#[derive(Clone, Debug)]
pub struct TestUser {
    /// The full user id.
    pub user_id: String,
    /// Its access token.
    pub access_token: String,
    /// The device the registration logged in.
    pub device_id: String,
}

/// A running Synapse, stopped on drop.
#[derive(Debug)]
pub struct Synapse {
    child: Child,
    python: PathBuf,
    port: u16,
    server_name: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16, TestkitError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(TestkitError::io("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(TestkitError::io("finding a free port"))?
        .port();
    Ok(port)
}

pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn write_json(path: &Path, value: &Value) -> Result<(), TestkitError> {
    std::fs::write(path, value.to_string())
        .map_err(TestkitError::io(format!("writing {}", path.display())))
}

impl Synapse {
    /// Install (once) and start a Synapse; returns when it answers HTTP.
    pub async fn start(options: SynapseOptions) -> Result<Self, TestkitError> {
        let venv = options.venv.clone().unwrap_or_else(default_venv_dir);
        let python = tokio::task::spawn_blocking(move || ensure_synapse(&venv))
            .await
            .map_err(|e| TestkitError::PythonMissing {
                detail: e.to_string(),
            })??;

        let dir = tempfile::Builder::new()
            .prefix("bridgekeys-synapse-")
            .tempdir()
            .map_err(TestkitError::io("creating the data directory"))?;
        let data = dir.path().to_owned();
        let log = data.join("synapse.log");
        let log_file = |what: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(TestkitError::io(format!("opening the log for {what}")))
        };

        // Synapse's own config: signing key, macaroon and form secrets.
        let main_config = data.join("homeserver.yaml");
        let generated = Command::new(&python)
            .args([
                "-m",
                "synapse.app.homeserver",
                "--generate-config",
                "--report-stats=no",
            ])
            .arg("--server-name")
            .arg(&options.server_name)
            .arg("--config-path")
            .arg(&main_config)
            .arg("--data-directory")
            .arg(&data)
            .current_dir(&data)
            .stdout(log_file("config generation")?)
            .stderr(log_file("config generation")?)
            .status()
            .map_err(TestkitError::io("running synapse --generate-config"))?;
        if !generated.success() {
            return Err(TestkitError::Start {
                reason: format!("--generate-config exited with {generated}"),
                tail: log_tail(&log, 30),
                log,
            });
        }

        let port = free_port()?;
        let overrides = data.join("overrides.yaml");
        write_json(&data.join("log.config.yaml"), &config::log_config())?;
        write_json(
            &overrides,
            &config::overrides(
                &data,
                port,
                &options.appservice_registrations,
                options.proxy_key_claims,
                options.proxy_key_queries,
            ),
        )?;
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&main_config)
            .arg("-c")
            .arg(&overrides)
            .current_dir(&data)
            .stdin(Stdio::null())
            .stdout(log_file("synapse")?)
            .stderr(log_file("synapse")?)
            .spawn()
            .map_err(TestkitError::io("starting synapse"))?;
        let mut synapse = Self {
            child,
            python,
            port,
            server_name: options.server_name,
            log,
            dir,
        };
        synapse.wait_until_ready(options.start_timeout).await?;
        tracing::info!(port, "synapse is up");
        Ok(synapse)
    }

    /// Poll `/_matrix/client/versions` until it answers, the process exits
    /// (an error with its log) or the timeout passes.
    async fn wait_until_ready(&mut self, timeout: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.start_error(format!("synapse exited with {status}")));
            }
            if let Ok((StatusCode::OK, _)) = self
                .request(Method::GET, "/_matrix/client/versions", None, None)
                .await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "no answer on port {} within {timeout:?}",
                    self.port
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_error(&self, reason: String) -> TestkitError {
        TestkitError::Start {
            reason,
            log: self.log.clone(),
            tail: log_tail(&self.log, 40),
        }
    }

    /// `http://127.0.0.1:<port>`: the client-server API base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The loopback port Synapse listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server name.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Synapse's log file (kept while the `Synapse` lives).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The data directory (config, database, log).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of Synapse's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// A JSON request to the homeserver: status and JSON body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        access_token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), TestkitError> {
        http::json(self.port, method, path, access_token, body).await
    }

    /// Register a normal user (open registration with the dummy auth stage)
    /// and return its id, access token and device.
    pub async fn register_user(
        &self,
        localpart: &str,
        password: &str,
    ) -> Result<TestUser, TestkitError> {
        let path = "/_matrix/client/v3/register";
        let mut body = json!({ "username": localpart, "password": password });
        let (status, answer) = self.request(Method::POST, path, None, Some(&body)).await?;
        let answer = if status == StatusCode::UNAUTHORIZED {
            // User-interactive auth: finish the dummy stage in the session.
            body["auth"] = json!({ "type": "m.login.dummy", "session": answer["session"] });
            let (status, answer) = self.request(Method::POST, path, None, Some(&body)).await?;
            expect_ok("register", status, answer)?
        } else {
            expect_ok("register", status, answer)?
        };
        test_user(&answer)
    }

    /// Register a server admin with Synapse's own `register_new_matrix_user`
    /// (the config's shared registration secret), logged in: for admin API
    /// calls such as deleting a user's device.
    pub async fn register_admin(
        &self,
        localpart: &str,
        password: &str,
    ) -> Result<TestUser, TestkitError> {
        let status = Command::new(&self.python)
            .args([
                "-m",
                "synapse._scripts.register_new_matrix_user",
                "-a",
                "-u",
            ])
            .arg(localpart)
            .arg("-p")
            .arg(password)
            .arg("-c")
            .arg(self.dir.path().join("homeserver.yaml"))
            .arg(self.url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(TestkitError::io("running register_new_matrix_user"))?;
        if !status.success() {
            return Err(TestkitError::Start {
                reason: format!("register_new_matrix_user exited with {status}"),
                log: self.log.clone(),
                tail: log_tail(&self.log, 20),
            });
        }
        self.login(localpart, password).await
    }

    /// Log an existing user in with a password (a new device).
    pub async fn login(&self, localpart: &str, password: &str) -> Result<TestUser, TestkitError> {
        let body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": localpart },
            "password": password
        });
        let (status, answer) = self
            .request(Method::POST, "/_matrix/client/v3/login", None, Some(&body))
            .await?;
        test_user(&expect_ok("login", status, answer)?)
    }
}

fn expect_ok(what: &str, status: StatusCode, answer: Value) -> Result<Value, TestkitError> {
    if status == StatusCode::OK {
        Ok(answer)
    } else {
        Err(TestkitError::Request {
            what: what.into(),
            detail: format!("{status}: {answer}"),
        })
    }
}

fn test_user(answer: &Value) -> Result<TestUser, TestkitError> {
    let field = |name: &str| {
        answer[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| TestkitError::Request {
                what: "register/login".into(),
                detail: format!("answer has no {name}: {answer}"),
            })
    };
    Ok(TestUser {
        user_id: field("user_id")?,
        access_token: field("access_token")?,
        device_id: field("device_id")?,
    })
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- synapse log ({}), last 60 lines ---\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}
