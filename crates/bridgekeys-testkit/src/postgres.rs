//! A throwaway PostgreSQL server for a test: a store backend tested against
//! the database it will meet, not a mock of it.
//!
//! [`Postgres::start`] runs `initdb` into a fresh temporary directory and
//! starts `postgres` on a free loopback port (TCP on 127.0.0.1 only; its
//! unix socket in that directory), with `fsync` on unless told otherwise:
//! the stores under test are about durability. It returns once the server
//! accepts connections. Its superuser logs in with a password over TCP, so
//! a client needs nothing but [`Postgres::url`]; [`Postgres::create_database`]
//! gives each test its own empty database on one shared server.
//!
//! Only the PostgreSQL command-line tools are used (`initdb`, `postgres`,
//! `pg_isready`, `psql`), found on `PATH`, else in Debian's
//! `/usr/lib/postgresql/<version>/bin` (the highest version); the testkit
//! has no PostgreSQL driver of its own.
//!
//! PostgreSQL refuses to run as root. When the test runs as root (CI), the
//! server runs as the `postgres` system user (which Debian's package
//! creates), else as `nobody`, through util-linux's `setpriv` (or
//! `runuser`), and the temporary directory is handed to that user.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{IssuedCertificate, TestkitError, free_port, log_tail};

/// The environment variable naming a directory that holds `initdb`,
/// `postgres`, `pg_isready` and `psql`, searched before `PATH`: for a
/// machine with several PostgreSQL versions, to pick one.
pub const POSTGRES_BIN_ENV: &str = "BRIDGEKEYS_POSTGRES_BIN";

/// Debian's `postgresql` package puts the server binaries here, one
/// directory per major version, not on `PATH`.
const DEBIAN_LIB_DIR: &str = "/usr/lib/postgresql";

/// How long a stop may take before the server's processes are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the testkit looks again while it waits for the server.
const POLL: Duration = Duration::from_millis(25);

/// How to start a test PostgreSQL server.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Whether the server flushes to disk (`fsync`, default on). A test of
    /// what survives a crash wants the real thing; a test that only needs
    /// a database may turn it off to run faster. Off, `initdb` skips its
    /// own flushes too.
    pub fsync: bool,
    /// The superuser's name (the role in [`Postgres::url`]).
    pub user: String,
    /// The superuser's password: the server asks for it on TCP
    /// connections (`scram-sha-256`), as a deployed one would.
    pub password: String,
    /// A directory with `initdb`, `postgres`, `pg_isready` and `psql`; if
    /// `None`, [`POSTGRES_BIN_ENV`], then `PATH`, then
    /// `/usr/lib/postgresql/*/bin`.
    pub bin_dir: Option<PathBuf>,
    /// How long the server may take to accept connections once started.
    pub start_timeout: Duration,
    /// More server settings, each passed as `-c name=value` after the
    /// testkit's own (so they win), e.g. `("max_connections", "20")`.
    pub settings: Vec<(String, String)>,
    /// Serve TLS with this certificate (`ssl = on`); `None` (the default):
    /// no TLS, and a client that requires it is refused. Make one with
    /// [`TestCa::issue`](crate::TestCa::issue) for `127.0.0.1` and/or
    /// `localhost`, the addresses the server listens on.
    pub tls: Option<IssuedCertificate>,
    /// With [`PostgresOptions::tls`]: ask clients for a certificate and
    /// accept those this CA (PEM, e.g. [`TestCa::pem`](crate::TestCa::pem))
    /// signed (`ssl_ca_file`). Which roles must show one is up to
    /// [`PostgresOptions::hba`].
    pub client_ca: Option<String>,
    /// Lines put first in `pg_hba.conf`, before the testkit's own (local:
    /// trust; TCP: `scram-sha-256`), e.g.
    /// `hostssl all certuser 127.0.0.1/32 cert` for a role that logs in by
    /// client certificate.
    pub hba: Vec<String>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            user: "bridgekeys".into(),
            password: "bridgekeys".into(),
            bin_dir: None,
            start_timeout: Duration::from_secs(60),
            settings: Vec::new(),
            tls: None,
            client_ca: None,
            hba: Vec::new(),
        }
    }
}

/// The PostgreSQL programs the testkit runs.
#[derive(Clone, Debug)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
    pg_isready: PathBuf,
    psql: PathBuf,
}

/// Who runs `initdb` and `postgres`: this process's user, or (when that is
/// root, which PostgreSQL refuses) an unprivileged one.
#[derive(Clone, Debug)]
enum RunAs {
    /// Not root: run the programs directly.
    Me,
    /// Root: `setpriv` switches user and then execs the program, so the
    /// child process is the server itself.
    Setpriv {
        setpriv: PathBuf,
        user: String,
        uid: u32,
        gid: u32,
    },
    /// Root without `setpriv`: `runuser` forks the program and waits for
    /// it, so the child process is `runuser`, not the server.
    Runuser { runuser: PathBuf, user: String },
}

impl RunAs {
    /// A command running `program` as the chosen user.
    fn command(&self, program: &Path) -> Command {
        match self {
            Self::Me => Command::new(program),
            Self::Setpriv {
                setpriv, uid, gid, ..
            } => {
                let mut command = Command::new(setpriv);
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                command
            }
            Self::Runuser { runuser, user } => {
                let mut command = Command::new(runuser);
                command.args(["-u", user, "--"]).arg(program);
                command
            }
        }
    }

    /// For error messages: who ran the programs.
    fn describe(&self) -> String {
        match self {
            Self::Me => "this process's user".into(),
            Self::Setpriv { user, .. } | Self::Runuser { user, .. } => format!(
                "user {user} (we are root, which PostgreSQL refuses; the temporary \
                 directory and its parents must be traversable by {user})"
            ),
        }
    }
}

/// A running PostgreSQL server on loopback, stopped (and its data
/// directory removed) on drop.
#[derive(Debug)]
pub struct Postgres {
    /// The server process (or `runuser` around it); `None` while stopped.
    child: Option<Child>,
    bins: Binaries,
    run_as: RunAs,
    port: u16,
    user: String,
    password: String,
    /// The `-c` settings the server is started with, every time.
    settings: Vec<(String, String)>,
    start_timeout: Duration,
    /// The temporary directory's path (kept apart from `dir`, which
    /// [`Postgres::stop`] takes to remove it).
    root: PathBuf,
    log: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Postgres {
    /// Start a server with the default options ([`PostgresOptions`]):
    /// `fsync` on, superuser `bridgekeys` with password `bridgekeys`.
    pub async fn start() -> Result<Self, TestkitError> {
        Self::start_with(PostgresOptions::default()).await
    }

    /// `initdb` a fresh cluster in a temporary directory and start a
    /// server on it; returns once it accepts connections.
    pub async fn start_with(options: PostgresOptions) -> Result<Self, TestkitError> {
        if options.client_ca.is_some() && options.tls.is_none() {
            return Err(TestkitError::Postgres {
                what: "starting postgres".into(),
                detail: "client_ca needs tls: clients show certificates only over TLS".into(),
            });
        }
        if !options.hba.is_empty() && options.settings.iter().any(|(name, _)| name == "hba_file") {
            return Err(TestkitError::Postgres {
                what: "starting postgres".into(),
                detail: "hba lines go into the cluster's own pg_hba.conf, not into an hba_file \
                         set in settings"
                    .into(),
            });
        }
        let bins = find_binaries(options.bin_dir.as_deref())?;
        let dir = tempfile::Builder::new()
            .prefix("bridgekeys-postgres-")
            .tempdir()
            .map_err(TestkitError::io("creating the postgres directory"))?;
        let root = dir.path().to_owned();
        let run_as = run_as_for(&root)?;
        let log = root.join("postgres.log");
        let data = root.join("data");

        // initdb reads the superuser's password from a file, not from its
        // command line (visible to every user in `ps`).
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", options.password))
            .map_err(TestkitError::io(format!("writing {}", pwfile.display())))?;
        let mut initdb = run_as.command(&bins.initdb);
        initdb
            .arg("--pgdata")
            .arg(&data)
            .arg("--username")
            .arg(&options.user)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .args((!options.fsync).then_some("--no-sync"))
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(open_log(&log, "initdb")?)
            .stderr(open_log(&log, "initdb")?);
        let initialised = tokio::process::Command::from(initdb)
            .status()
            .await
            .map_err(TestkitError::io(format!(
                "running {}",
                bins.initdb.display()
            )))?;
        std::fs::remove_file(&pwfile)
            .map_err(TestkitError::io(format!("removing {}", pwfile.display())))?;
        if !initialised.success() {
            return Err(TestkitError::PostgresStart {
                reason: format!(
                    "initdb exited with {initialised}; it ran as {}",
                    run_as.describe()
                ),
                tail: log_tail(&log, 30),
                log,
            });
        }

        let port = free_port()?;
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), port.to_string()),
            ("unix_socket_directories".into(), root.display().to_string()),
            (
                "fsync".into(),
                if options.fsync { "on" } else { "off" }.into(),
            ),
        ];
        if let Some(tls) = &options.tls {
            settings.extend(write_tls_files(&root, tls, options.client_ca.as_deref())?);
        }
        if !options.hba.is_empty() {
            let hba = data.join("pg_hba.conf");
            let defaults = std::fs::read_to_string(&hba)
                .map_err(TestkitError::io(format!("reading {}", hba.display())))?;
            std::fs::write(&hba, format!("{}\n{defaults}", options.hba.join("\n")))
                .map_err(TestkitError::io(format!("writing {}", hba.display())))?;
        }
        settings.extend(options.settings);
        let mut postgres = Self {
            child: None,
            bins,
            run_as,
            port,
            user: options.user,
            password: options.password,
            settings,
            start_timeout: options.start_timeout,
            root,
            log,
            dir: Some(dir),
        };
        postgres.spawn().await?;
        tracing::info!(port, "postgres is up");
        Ok(postgres)
    }

    /// Start the server process on the existing data directory and wait
    /// until it accepts connections.
    async fn spawn(&mut self) -> Result<(), TestkitError> {
        let mut command = self.run_as.command(&self.bins.postgres);
        command.arg("-D").arg(self.data_dir());
        for (name, value) in &self.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(open_log(&self.log, "postgres")?)
            // In the test's process group: a Ctrl-C to the test reaches
            // the server too, which then shuts down (fast) by itself.
            .stderr(open_log(&self.log, "postgres")?);
        let child = command.spawn().map_err(TestkitError::io(format!(
            "starting {}",
            self.bins.postgres.display()
        )))?;
        self.child = Some(child);
        self.wait_until_ready().await
    }

    /// Poll `pg_isready` until the server accepts connections, its process
    /// exits (an error with its log) or the start timeout passes.
    async fn wait_until_ready(&mut self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + self.start_timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.start_error(format!(
                    "postgres exited with {status}; it ran as {}",
                    self.run_as.describe()
                )));
            }
            let ready = tokio::process::Command::new(&self.bins.pg_isready)
                .args(["--quiet", "--timeout=1", "--host=127.0.0.1"])
                .arg(format!("--port={}", self.port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .map_err(TestkitError::io(format!(
                    "running {}",
                    self.bins.pg_isready.display()
                )))?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "not accepting connections on port {} within {:?}",
                    self.port, self.start_timeout
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn start_error(&self, reason: String) -> TestkitError {
        TestkitError::PostgresStart {
            reason,
            log: self.log.clone(),
            tail: log_tail(&self.log, 40),
        }
    }

    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/postgres`: the superuser
    /// on the `postgres` database that every cluster has.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server, as the superuser (the
    /// database need not exist yet; see [`Postgres::create_database`]).
    pub fn database_url(&self, name: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(&self.user),
            percent_encode(&self.password),
            self.port,
            percent_encode(name)
        )
    }

    /// Create an empty database `name` and return its URL: each test gets
    /// its own database on one shared server. `name` is 1 to 63 of `a-z`,
    /// `0-9` and `_`, not starting with a digit, so that it needs no
    /// quoting anywhere; a name already taken is an error.
    pub async fn create_database(&self, name: &str) -> Result<String, TestkitError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(TestkitError::Postgres {
                what: format!("creating database {name:?}"),
                detail: "a test database's name is 1 to 63 of a-z, 0-9 and _, \
                         not starting with a digit"
                    .into(),
            });
        }
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(self.database_url(name))
    }

    /// Run `sql` with `psql` in database `database` as the superuser (over
    /// TCP, with the password, as a client would) and return what it
    /// printed: rows one a line, columns separated by `|`, no headers, the
    /// final newline cut. Stops at the first error, which is returned.
    pub async fn psql(&self, database: &str, sql: &str) -> Result<String, TestkitError> {
        let output = tokio::process::Command::new(&self.bins.psql)
            .args(["--no-psqlrc", "--quiet", "--no-align", "--tuples-only"])
            .args(["--set", "ON_ERROR_STOP=1", "--host", "127.0.0.1"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--username={}", self.user))
            .arg(format!("--dbname={database}"))
            .arg("--command")
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(TestkitError::io(format!(
                "running {}",
                self.bins.psql.display()
            )))?;
        if !output.status.success() {
            return Err(TestkitError::Postgres {
                what: format!("psql in database {database}: {sql}"),
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        let mut printed = String::from_utf8_lossy(&output.stdout).into_owned();
        if printed.ends_with('\n') {
            printed.pop();
        }
        Ok(printed)
    }

    /// Kill the server and every one of its processes at once (`SIGKILL`
    /// to the postmaster and all its children): a crash, as a test of
    /// recovery needs. No
    /// shutdown checkpoint runs; what was committed is in the write-ahead
    /// log. The kernel's page cache survives, so this is a crash of
    /// PostgreSQL, not a power cut of the machine. Returns once all of its
    /// processes are gone; [`Postgres::restart`] starts it again.
    pub async fn kill(&mut self) -> Result<(), TestkitError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let killed = kill_server(&mut child, &self.data_dir())?;
        // A new server refuses to start while a killed backend still holds
        // the old shared memory: wait until the kernel has ended them all.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while killed.iter().any(|&pid| alive(pid)) {
            if Instant::now() >= deadline {
                return Err(TestkitError::Postgres {
                    what: "killing the server".into(),
                    detail: format!(
                        "some of processes {killed:?} still alive after {STOP_TIMEOUT:?}"
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Stop the server cleanly if it runs (fast shutdown: sessions are
    /// ended, a checkpoint is written), then start it again on the same
    /// data directory and port; returns once it accepts connections.
    /// After [`Postgres::kill`], this is the start after a crash, with
    /// PostgreSQL's recovery from its write-ahead log.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        if let Some(child) = self.child.take() {
            shutdown(child, &self.data_dir(), "INT").await?;
        }
        self.spawn().await
    }

    /// Stop the server (immediate shutdown: the data is thrown away next)
    /// and remove its temporary directory, reporting what failed; dropping
    /// a `Postgres` does the same, silently.
    pub async fn stop(mut self) -> Result<(), TestkitError> {
        if let Some(child) = self.child.take() {
            shutdown(child, &self.data_dir(), "QUIT").await?;
        }
        match self.dir.take() {
            Some(dir) => dir.close().map_err(TestkitError::io(format!(
                "removing {}",
                self.root.display()
            ))),
            None => Ok(()),
        }
    }

    /// The loopback port the server listens on (the same after a restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The cluster's data directory (`PGDATA`), in the temporary directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The directory of the server's unix socket (`.s.PGSQL.<port>`), for
    /// a client that connects with `host=<this directory>`. Without a
    /// password: local connections are trusted.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// CPU seconds (user + system) the server has used so far: the
    /// postmaster, its live children (backends, WAL writer, checkpointer)
    /// and the children it has reaped (backends of closed connections).
    /// For a benchmark that wants to know how much of the machine the
    /// database took, read before and after. `None` where `/proc` cannot
    /// tell (not Linux, or the server is not running).
    pub fn server_cpu_s(&self) -> Option<f64> {
        let postmaster = postmaster_pid(&self.data_dir())?;
        // A child reaped between reading the postmaster and reading its
        // children would be in neither count (or, the other way round, in
        // both): so read the postmaster on both sides of the children and
        // take a reading in which its count of reaped children held still.
        let mut reading = None;
        for _ in 0..READ_ATTEMPTS {
            let before = proc_stat(postmaster)?.ticks;
            let children: u64 = children_of(postmaster)
                .into_iter()
                .filter_map(proc_stat)
                .map(|stat| stat.ticks)
                .sum();
            let after = proc_stat(postmaster)?.ticks;
            reading = Some(after + children);
            if before == after {
                break;
            }
        }
        Some(reading? as f64 / CLOCK_TICKS_PER_S)
    }

    /// The server's log file (`initdb`'s output, then the server's).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let postmaster = postmaster_pid(&self.data_dir()).unwrap_or(child.id());
            let _ = signal(&[postmaster], "QUIT");
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut exited = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(POLL);
            }
            if !exited {
                let _ = kill_server(&mut child, &self.data_dir());
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log ({}), last 60 lines ---\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}

/// Send `signal` to the postmaster, wait (up to [`STOP_TIMEOUT`]) for it
/// to finish: it waits for its backends first. If it does not, kill it
/// and its children.
async fn shutdown(mut child: Child, data: &Path, signal_name: &str) -> Result<(), TestkitError> {
    let postmaster = postmaster_pid(data).unwrap_or(child.id());
    signal(&[postmaster], signal_name)?;
    match wait_exit(&mut child, STOP_TIMEOUT).await? {
        Some(_) => Ok(()),
        None => {
            kill_server(&mut child, data)?;
            Err(TestkitError::Postgres {
                what: format!("stopping the server (SIG{signal_name})"),
                detail: format!("it did not stop within {STOP_TIMEOUT:?}; it was killed"),
            })
        }
    }
}

/// Wait for `child` to exit, up to `timeout`; `None` if it did not.
async fn wait_exit(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>, TestkitError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(TestkitError::io("waiting for postgres"))?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The server's pid, from the first line of `postmaster.pid`: the child
/// process is `runuser`, not the server, when that ran it.
fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `kill -s SIGNAL -- PID...`: without `unsafe` and the libc crate, the
/// kill(1) program sends the signals other than `SIGKILL` to a single
/// child. An error if kill(1) could not run or a process could not be
/// signalled (e.g. it was gone already).
fn signal(pids: &[u32], signal: &str) -> Result<(), TestkitError> {
    let output = Command::new("kill")
        .args(["-s", signal, "--"])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .output()
        .map_err(TestkitError::io("running kill"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(TestkitError::Postgres {
            what: format!("kill -s {signal} -- {pids:?}"),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `SIGKILL` the server's processes all at once and reap `child`; returns
/// their pids. Each backend PostgreSQL forks is its own session (it calls
/// `setsid`), so a signal to a process group would reach the postmaster
/// alone, and its backends would live on for a moment: they are found as
/// its children in `/proc`, with the postmaster stopped (`SIGSTOP`) so that
/// it forks no new one meanwhile.
///
/// When `runuser` is the child, it is left alive to reap the postmaster
/// and exit: killed too, it would leave the postmaster a zombie for PID 1
/// to reap, and until then a new server takes the old one for running.
fn kill_server(child: &mut Child, data: &Path) -> Result<Vec<u32>, TestkitError> {
    let postmaster = postmaster_pid(data).unwrap_or(child.id());
    // It may have exited already: then there is nothing to stop.
    let _ = signal(&[postmaster], "STOP");
    let mut pids = vec![postmaster];
    pids.extend(children_of(postmaster));
    // Some may be gone already (an error); the others are killed all the
    // same. If kill(1) could not run at all, std's SIGKILL to our child
    // at least ends the wait below.
    let sent = signal(&pids, "KILL");
    if child.id() != postmaster {
        // runuser passes its child's stop on to itself (it stops too, to
        // be continued by a shell): continue it so that it reaps.
        let _ = signal(&[child.id()], "CONT");
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let exited = child
            .try_wait()
            .map_err(TestkitError::io("waiting for the killed postgres"))?;
        if exited.is_some() {
            break;
        }
        if matches!(sent, Err(TestkitError::Io { .. })) || Instant::now() >= deadline {
            let _ = child.kill();
            child
                .wait()
                .map_err(TestkitError::io("waiting for the killed postgres"))?;
            break;
        }
        std::thread::sleep(POLL);
    }
    Ok(pids)
}

/// `/proc/<pid>/stat` counts in USER_HZ: 100 on every Linux platform.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// How often [`Postgres::server_cpu_s`] reads again when a child was
/// reaped under it.
const READ_ATTEMPTS: usize = 20;

/// What this module reads of `/proc/<pid>/stat` (Linux).
struct ProcStat {
    state: String,
    ppid: u32,
    /// User + system ticks of the process and of its reaped children.
    ticks: u64,
}

/// Parse `/proc/<pid>/stat`; `None` if the process is gone.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses,
    // so read after the last ')'. utime, stime, cutime and cstime are
    // the 12th to 15th fields after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(ProcStat {
        state: (*fields.first()?).to_owned(),
        ppid: u32::try_from(number(1)?).ok()?,
        ticks: number(11)? + number(12)? + number(13)? + number(14)?,
    })
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            (proc_stat(pid)?.ppid == parent).then_some(pid)
        })
        .collect()
}

/// Whether process `pid` is alive: it exists and is not a zombie (which
/// has released its memory; and one orphaned to a PID 1 that does not
/// reap would otherwise count forever).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|stat| stat.state != "Z" && stat.state != "X")
}

/// Open the log for appending (each program's output is added to it).
fn open_log(log: &Path, what: &str) -> Result<std::fs::File, TestkitError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(TestkitError::io(format!("opening the log for {what}")))
}

/// Write the server's certificate and key into `root`, owned by whoever
/// owns `root` (the user the server runs as) with the key private, as the
/// server demands; the settings that serve them.
fn write_tls_files(
    root: &Path,
    tls: &IssuedCertificate,
    client_ca: Option<&str>,
) -> Result<Vec<(String, String)>, TestkitError> {
    use std::os::unix::fs::OpenOptionsExt;
    let owner =
        std::fs::metadata(root).map_err(TestkitError::io(format!("reading {}", root.display())))?;
    let (cert, key, ca) = (
        root.join("server.crt"),
        root.join("server.key"),
        root.join("client-ca.crt"),
    );
    let mut files = vec![(&cert, tls.cert_pem.as_str()), (&key, tls.key_pem.as_str())];
    if let Some(pem) = client_ca {
        files.push((&ca, pem));
    }
    for (path, pem) in files {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(TestkitError::io(format!("creating {}", path.display())))?;
        std::io::Write::write_all(&mut file, pem.as_bytes())
            .map_err(TestkitError::io(format!("writing {}", path.display())))?;
        // Only as root, whose server runs as the owner of `root`: a user
        // running the server themselves already owns the file (and may
        // not be in `root`'s group, under a setgid TMPDIR).
        let mine = file
            .metadata()
            .map_err(TestkitError::io(format!("reading {}", path.display())))?;
        if mine.uid() != owner.uid() {
            std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))
                .map_err(TestkitError::io(format!("giving away {}", path.display())))?;
        }
    }
    let mut settings = vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), cert.display().to_string()),
        ("ssl_key_file".into(), key.display().to_string()),
    ];
    if client_ca.is_some() {
        settings.push(("ssl_ca_file".into(), ca.display().to_string()));
    }
    Ok(settings)
}

/// Who runs the server, decided from the owner of the temporary directory
/// `root` we just created (our effective uid, read without libc). As
/// root, `root` is given to the unprivileged user: tempfile creates it
/// mode 0700, and `initdb` creates the data directory inside it.
fn run_as_for(root: &Path) -> Result<RunAs, TestkitError> {
    let uid = std::fs::metadata(root)
        .map_err(TestkitError::io(format!("reading {}", root.display())))?
        .uid();
    if uid != 0 {
        return Ok(RunAs::Me);
    }
    let (user, uid, gid) = ["postgres", "nobody"]
        .into_iter()
        .find_map(|user| Some((user.to_owned(), id(user, "-u")?, id(user, "-g")?)))
        .ok_or_else(|| TestkitError::PostgresMissing {
            detail: "we are root, which PostgreSQL refuses, and there is neither a \
                     `postgres` nor a `nobody` user to run it as"
                .into(),
        })?;
    std::os::unix::fs::chown(root, Some(uid), Some(gid)).map_err(TestkitError::io(format!(
        "giving {} to user {user}",
        root.display()
    )))?;
    let search = search_dirs(None);
    if let Some(setpriv) = find_in(&search, "setpriv") {
        Ok(RunAs::Setpriv {
            setpriv,
            user,
            uid,
            gid,
        })
    } else if let Some(runuser) = find_in(&search, "runuser") {
        Ok(RunAs::Runuser { runuser, user })
    } else {
        Err(TestkitError::PostgresMissing {
            detail: "we are root, which PostgreSQL refuses, and neither `setpriv` nor \
                     `runuser` (util-linux) is on PATH to run it as another user"
                .into(),
        })
    }
}

/// `id -u USER` or `id -g USER`: the user's uid or primary gid, if it
/// exists (through NSS, as the system sees it).
fn id(user: &str, which: &str) -> Option<u32> {
    let output = Command::new("id")
        .args([which, user])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// Where to look for the PostgreSQL programs: an explicit directory only,
/// if given; else `PATH`, then Debian's version directories, highest first.
fn search_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir.to_owned()];
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(DEBIAN_LIB_DIR)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| {
                    let name = entry.file_name();
                    let version = name
                        .to_str()?
                        .split('.')
                        .map(|part| part.parse().ok())
                        .collect::<Option<Vec<u32>>>()?;
                    Some((version, entry.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.extend(versions.into_iter().map(|(_, dir)| dir));
    dirs
}

/// The first `dir/name` among `dirs` that is an executable file.
fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|dir| dir.join(name)).find(|path| {
        std::fs::metadata(path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

/// Find the programs: `initdb` and `postgres` from one directory (they
/// must be the same version), the client tools preferably from there too.
fn find_binaries(explicit: Option<&Path>) -> Result<Binaries, TestkitError> {
    let from_env = std::env::var_os(POSTGRES_BIN_ENV).map(PathBuf::from);
    let explicit = explicit.or(from_env.as_deref());
    let dirs = search_dirs(explicit);
    let searched = match explicit {
        Some(dir) => dir.display().to_string(),
        None => format!("PATH and {DEBIAN_LIB_DIR}/*/bin"),
    };
    let server_dir = dirs
        .iter()
        .find(|dir| {
            let one = std::slice::from_ref(*dir);
            find_in(one, "initdb").is_some() && find_in(one, "postgres").is_some()
        })
        .ok_or_else(|| TestkitError::PostgresMissing {
            detail: format!("no directory with both initdb and postgres in {searched}"),
        })?;
    let mut client_dirs = vec![server_dir.clone()];
    client_dirs.extend(dirs.iter().cloned());
    let client = |name: &str| {
        find_in(&client_dirs, name).ok_or_else(|| TestkitError::PostgresMissing {
            detail: format!("no {name} in {searched}"),
        })
    };
    Ok(Binaries {
        initdb: server_dir.join("initdb"),
        postgres: server_dir.join("postgres"),
        pg_isready: client("pg_isready")?,
        psql: client("psql")?,
    })
}

/// Percent-encode everything but URL-unreserved characters, so that any
/// user, password or database name makes a valid URL.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts_are_percent_encoded() {
        assert_eq!(percent_encode("plain_name-1.x~"), "plain_name-1.x~");
        assert_eq!(percent_encode("p@ss:w/rd é"), "p%40ss%3Aw%2Frd%20%C3%A9");
    }

    #[tokio::test]
    async fn options_that_cannot_work_together_are_refused_before_anything_starts() {
        let ca = crate::TestCa::generate("ca").expect("ca");
        let no_tls = Postgres::start_with(PostgresOptions {
            client_ca: Some(ca.pem()),
            ..PostgresOptions::default()
        })
        .await
        .expect_err("client_ca without tls");
        assert!(
            no_tls.to_string().contains("client_ca needs tls"),
            "{no_tls}"
        );
        let elsewhere = Postgres::start_with(PostgresOptions {
            hba: vec!["host all all 127.0.0.1/32 trust".into()],
            settings: vec![("hba_file".into(), "/elsewhere".into())],
            ..PostgresOptions::default()
        })
        .await
        .expect_err("hba with an hba_file");
        assert!(elsewhere.to_string().contains("hba_file"), "{elsewhere}");
    }
}
