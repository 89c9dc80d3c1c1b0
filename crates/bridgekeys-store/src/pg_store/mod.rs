//! The PostgreSQL backend ([`PgStore`], feature `postgres`): several bridge
//! processes on one database.
//!
//! # How the synchronous trait meets an async driver
//!
//! The [`Store`](crate::Store) methods are synchronous and are called from
//! inside tokio tasks, sometimes on a current-thread runtime, where
//! `Handle::block_on` or `block_in_place` would panic. So a `PgStore` owns a
//! thread of its own running a current-thread tokio runtime with its
//! connection pools (`deadpool-postgres` over `tokio-postgres`). A method
//! spawns its database work on that runtime and blocks its caller on a
//! plain channel until the answer comes, the way sled blocks its caller on
//! disk I/O. Sealing and opening happen on the caller's thread, except in
//! the compare-and-write of a tracked user or a room's state, which opens
//! the row it holds locked inside its transaction (with the store's one
//! cipher, shared, not copied).
//!
//! Two reads are awaited instead: loading a device for the account
//! manager's asynchronous calls (claims, decryption, encryption:
//! [`Store::load_account_counted_later`](crate::Store::load_account_counted_later)),
//! and a rotation pass's read of an idle device
//! ([`Store::load_account_later`](crate::Store::load_account_later)). Each
//! queues its statement on the store's runtime and returns a
//! [`Fetch`](crate::Fetch) that the caller awaits, and the record is opened
//! on the caller's thread once the row is back. A bridge that has just
//! started loads nearly every device it claims for; blocking, two runtime
//! workers could only have two such loads waiting on the server at once.
//! These loads hold at most one connection fewer than the pool has, so a
//! burst of them leaves one for every other call. (With appends of its own
//! still uncommitted for the device, the process loads it the blocking
//! way, as `load_account_counted` does: rare on the claim path, which loads
//! a device that is not cached.)
//!
//! # Durability
//!
//! PostgreSQL's `COMMIT` is the durability point: every connection runs
//! with `synchronous_commit=on` (set as a connection option, over whatever
//! the URL says), so a committed transaction is flushed to the WAL (and to
//! a synchronous standby, if one is configured). Writes other than
//! [`Store::append_keys`](crate::Store::append_keys) run their transaction
//! before they return and hand back [`Pending::ready`](crate::Pending::ready).
//!
//! The hot claim path does not wait for the database at all:
//! [`Store::reserve_key_ids`](crate::Store::reserve_key_ids) hands out ids
//! from a block reserved in the database ([`PgStoreConfig::key_id_block`]
//! ids per round trip), and [`Store::append_keys`](crate::Store::append_keys)
//! queues its keys and returns. One writer commits everything queued
//! meanwhile in one statement, and each append's [`Pending`](crate::Pending)
//! resolves when that commit returns: one commit for many claims (see
//! `appender.rs`). An append is visible to this process's readers when
//! `append_keys` returns, and to other processes once it is durable, which
//! is before any claim of it is answered. A database crash may lose a
//! queued append: nobody acknowledged its keys, and their ids are never
//! issued again.
//!
//! # Several processes
//!
//! * Key ids come from one counter row (`bk_key_ids`), taken in blocks: ids
//!   never repeat across processes, crashes and restarts (a crash skips the
//!   rest of a block). Within a process ids increase; across processes the
//!   lowest id is not the oldest key (a long-running process's block sits
//!   below a restarted one's), so keys also carry the order they were
//!   stored in (`seq`), and the oldest are evicted first by that.
//! * [`Store::write_device`](crate::Store::write_device) is one transaction
//!   whose account update is a compare-and-swap on the version (`UPDATE ...
//!   WHERE version = $expected`), so of two processes consuming the same
//!   one-time key exactly one wins and the other gets
//!   [`StoreError::Conflict`].
//! * Transaction leases ([`TransactionLog::claim_transaction`](crate::TransactionLog::claim_transaction))
//!   are rows, claimed with one upsert that succeeds only where no other
//!   owner holds an unexpired lease; lease times are the database's clock,
//!   so the processes' clocks need not agree.
//! * Migrations run at open under a transaction-scoped advisory lock, so
//!   processes starting at once apply each migration once.
//!
//! # Migration
//!
//! `PgStore` implements [`Export`](crate::migrate::Export), so
//! [`migrate::copy`](crate::migrate::copy) moves a sled store into a fresh
//! `PgStore` (the usual direction, when a bridge outgrows one process) and
//! a PostgreSQL store back out again.
//!
//! # Connections
//!
//! TCP (with TLS) or a Unix socket, as the connection string says. TLS
//! follows libpq's `sslmode` and `sslrootcert`, with libpq's meanings:
//!
//! | `sslmode` | TLS | the server's certificate is checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it | no |
//! | `require` | always | against `sslrootcert` if one is given (chain, not name), else not |
//! | `verify-ca` | always | chains to `sslrootcert` |
//! | `verify-full` | always | chains to `sslrootcert` and names the host |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! public web PKI roots (Mozilla's list), which means `verify-full` as in
//! libpq 16. `verify-ca` and `verify-full` refuse to start without a root
//! ([`PgTlsError::MissingRoot`]). `PGSSLMODE` and `PGSSLROOTCERT` fill in
//! what the string leaves out. A server that authenticates clients by
//! certificate gets the one `sslcert` and `sslkey` name. For a
//! database on another machine, use `verify-full`: the other modes do not
//! stop an active attacker in the middle (the sealed secrets stay sealed
//! either way, but the rest of the traffic is readable to it).
//!
//! # Not (yet) here
//!
//! One store per database (its tables
//! are in the connection's `search_path`, named `bk_*`). Schema 1 sled
//! sessions ([`Store::legacy_sessions`](crate::Store::legacy_sessions)) do
//! not exist here: a PostgreSQL store is always written by this schema.
//! There is no key-id watermark outside the database: a database restored
//! from an old backup is not detected.

mod appender;
mod connection_string;
mod export;
mod log;
mod passfile;
mod store;
mod tls;

pub use tls::PgTlsError;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use connection_string::env;

use crate::{
    CommitStats, StoreError, StoreId, StoreKey, crypto::Sealer, layout, sled_store::FIRST_KEY_ID,
};

/// The schema version this build of [`PgStore`] writes (the highest
/// migration it knows). A database at a higher version is refused with
/// [`StoreError::UnsupportedSchema`].
pub const PG_SCHEMA_VERSION: u32 = 2;

/// The migrations, in order: `(version, SQL)`. Each runs once, in the
/// transaction that records it in `bk_schema_version`.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("0001_initial.sql")),
    (2, include_str!("0002_session_versions.sql")),
];

/// The advisory lock key that serialises opening, creation and migration
/// (any 64-bit constant private to bridgekeys: "bkstore1").
const OPEN_LOCK: i64 = 0x626b_7374_6f72_6531;

/// Default of [`PgStoreConfig::pool_size`].
pub const DEFAULT_PG_POOL_SIZE: usize = 8;

/// Default of [`PgStoreConfig::key_id_block`].
pub const DEFAULT_KEY_ID_BLOCK: u64 = 1024;

/// Default of [`PgStoreConfig::max_append_batch`].
pub const DEFAULT_MAX_APPEND_BATCH: usize = 1024;

/// How to connect to a [`PgStore`].
///
/// Its `Debug` leaves out the URL's password and the key.
#[derive(Clone)]
#[non_exhaustive]
pub struct PgStoreConfig {
    /// The database, as a libpq-style URL or key-value string (parsed by
    /// `tokio_postgres::Config`), e.g.
    /// `postgres://bridge:secret@db.internal:5432/bridgekeys`. TLS follows
    /// libpq's `sslmode` (default `prefer`) and `sslrootcert` parameters,
    /// with libpq's meanings; see [Connections](self#connections).
    /// Without a password in it, the password is taken from the
    /// `PGPASSWORD` environment variable when that is set, else from
    /// libpq's password file (`passfile=` in the string, `PGPASSFILE`, or
    /// `~/.pgpass`; `host:port:database:user:password` lines, ignored
    /// unless only its owner can read it), as libpq does, so it need not be
    /// written into a config file or a command line.
    pub url: String,
    /// The key that seals every secret before it reaches the database.
    pub key: StoreKey,
    /// The id the store must have ([`PgStore::id`]); `None` accepts any. A
    /// bridge records the id at creation and sets it on every open, so
    /// another bridge's database is refused ([`StoreError::Foreign`]).
    pub expected_id: Option<StoreId>,
    /// Most connections this process holds open. Each call uses one for
    /// its round trips; the claim path's writer uses one per commit.
    /// Default [`DEFAULT_PG_POOL_SIZE`].
    pub pool_size: usize,
    /// Key ids taken from the database counter per round trip: a claim
    /// costs a database round trip for ids only once per this many keys,
    /// and a crash or restart skips at most this many ids. Default
    /// [`DEFAULT_KEY_ID_BLOCK`].
    pub key_id_block: u64,
    /// Most queued key appends one commit carries (the rest wait for the
    /// next). Default [`DEFAULT_MAX_APPEND_BATCH`].
    pub max_append_batch: usize,
    /// How long a call waits for a connection (opening one, or one of the
    /// pool to come free) before it fails with [`StoreError::Engine`]
    /// instead of blocking its caller indefinitely on an unreachable
    /// database. Default [`DEFAULT_PG_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// How long one call (its statements, after it has a connection) may
    /// take before it fails with [`StoreError::Engine`], and how long a
    /// group-commit flush may take before its claims fail. A database host
    /// that vanished mid-query (power loss, a moved address) would
    /// otherwise hold the caller until TCP gives up, many minutes later.
    /// Connections also send TCP keepalives after 10 s idle and give up on
    /// unacknowledged data after this long. Default
    /// [`DEFAULT_PG_OPERATION_TIMEOUT`].
    pub operation_timeout: Duration,
}

/// Default of [`PgStoreConfig::operation_timeout`].
pub const DEFAULT_PG_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`PgStoreConfig::connect_timeout`].
pub const DEFAULT_PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl PgStoreConfig {
    /// A configuration with the defaults.
    pub fn new(url: impl Into<String>, key: StoreKey) -> Self {
        Self {
            url: url.into(),
            key,
            expected_id: None,
            pool_size: DEFAULT_PG_POOL_SIZE,
            key_id_block: DEFAULT_KEY_ID_BLOCK,
            max_append_batch: DEFAULT_MAX_APPEND_BATCH,
            connect_timeout: DEFAULT_PG_CONNECT_TIMEOUT,
            operation_timeout: DEFAULT_PG_OPERATION_TIMEOUT,
        }
    }

    /// Require the store to have this id (see [`PgStoreConfig::expected_id`]).
    pub fn expect_id(mut self, id: StoreId) -> Self {
        self.expected_id = Some(id);
        self
    }
}

impl std::fmt::Debug for PgStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parsed = connection_string::ConnectionString::parse(&self.url).ok();
        let location = parsed
            .as_ref()
            .and_then(|u| u.config().ok())
            .map_or_else(|| "<unparsable url>".to_owned(), |c| describe(&c));
        f.debug_struct("PgStoreConfig")
            .field("url", &location)
            .field("tls", &parsed.map(|u| u.tls.describe()))
            .field("expected_id", &self.expected_id)
            .field("pool_size", &self.pool_size)
            .field("key_id_block", &self.key_id_block)
            .field("max_append_batch", &self.max_append_batch)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL-backed [`Store`](crate::Store),
/// [`TransactionLog`](crate::TransactionLog) and
/// [`PuppetRegistry`](crate::PuppetRegistry), for bridges whose processes
/// share one database. See the [module docs](self) for its guarantees.
///
/// Errors name the database as `postgres://user@host:port/dbname` (never the
/// password) where sled's name a path.
pub struct PgStore {
    location: PathBuf,
    id: StoreId,
    sealer: Arc<Sealer>,
    engine: Engine,
    key_ids: parking_lot::Mutex<KeyIdBlock>,
    key_id_block: u64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The ids this process may hand out without asking the database:
/// `next..end`.
#[derive(Default)]
struct KeyIdBlock {
    next: u64,
    end: u64,
}

impl PgStore {
    /// Create a new store in the database and open it: applies the
    /// migrations and writes the store's identity (its [`StoreId`] and a
    /// sealed key check), all in one transaction.
    ///
    /// Fails with [`StoreError::AlreadyExists`] if the database holds a
    /// store already (created by any process, also concurrently). Record
    /// [`PgStore::id`] and set it with [`PgStoreConfig::expect_id`] on every
    /// later open.
    pub fn create(config: PgStoreConfig) -> Result<Self, StoreError> {
        Self::start(config, Mode::Create)
    }

    /// Open the store in the database, applying any migrations this build
    /// knows that the database has not had yet.
    ///
    /// Never creates one: a database without a store is
    /// [`StoreError::Missing`]. Fails with [`StoreError::UnsupportedSchema`]
    /// if a newer build migrated it, [`StoreError::WrongKey`] if it was
    /// created with another key and [`StoreError::Foreign`] if
    /// [`PgStoreConfig::expected_id`] names another store; none of these
    /// failures changes anything.
    pub fn open(config: PgStoreConfig) -> Result<Self, StoreError> {
        Self::start(config, Mode::Open)
    }

    /// Open the store, creating it if the database has none.
    ///
    /// For tests, examples and tools whose store can be thrown away: like
    /// [`crate::SledStore::open_or_create`], it cannot tell a store that
    /// was never created from one that was lost. Safe when several
    /// processes call it at once: one creates, the others open.
    pub fn open_or_create(config: PgStoreConfig) -> Result<Self, StoreError> {
        match Self::open(config.clone()) {
            Err(StoreError::Missing { .. }) => match Self::create(config.clone()) {
                Err(StoreError::AlreadyExists { .. }) => Self::open(config),
                other => other,
            },
            other => other,
        }
    }

    /// The store's identity, minted at creation.
    pub fn id(&self) -> StoreId {
        self.id
    }

    /// Where the store is, as `postgres://user@host:port/dbname` (no
    /// password): what errors name.
    pub fn location(&self) -> &Path {
        &self.location
    }

    fn start(config: PgStoreConfig, mode: Mode) -> Result<Self, StoreError> {
        let url =
            connection_string::ConnectionString::parse(&config.url).map_err(StoreError::engine)?;
        let mut pg = url.config().map_err(StoreError::engine)?;
        let tls_used = if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            format!(
                "none ({}; over Unix sockets no TLS is asked)",
                url.tls.describe()
            )
        } else {
            url.tls.describe()
        };
        let connector = url.tls.connector().map_err(StoreError::engine)?;
        let location = PathBuf::from(describe(&pg));
        // As libpq does: a URL without a password takes `PGPASSWORD`, so the
        // password need not sit in a config file or on a command line.
        // An empty password counts as none, as libpq reads it.
        let no_password =
            |pg: &tokio_postgres::Config| pg.get_password().is_none_or(<[u8]>::is_empty);
        if no_password(&pg)
            && let Some(password) = std::env::var_os("PGPASSWORD").filter(|p| !p.is_empty())
        {
            pg.password(password.as_encoded_bytes());
        }
        // Then libpq's password file (`passfile`, `PGPASSFILE`, `~/.pgpass`).
        if no_password(&pg)
            && let Some(password) = passfile::password_for(&pg, url.passfile.clone(), env)
        {
            pg.password(password);
        }
        let options = pg.get_options().unwrap_or_default().to_owned();
        // COMMIT is the durability point: make sure it flushes, whatever
        // the URL says (a later `-c` wins): a URL that turned it off would
        // make every acknowledgement a guess.
        pg.options(format!("{options} -c synchronous_commit=on").trim());
        // The claim path's writer: its own two connections, whose statements
        // the server cancels after the operation timeout.
        let mut writes = pg.clone();
        writes.options(
            format!(
                "{options} -c synchronous_commit=on -c statement_timeout={}",
                config.operation_timeout.as_millis().max(1)
            )
            .trim(),
        );
        let writer_pool = build_pool(
            writes,
            connector.clone(),
            &PgStoreConfig {
                pool_size: 2,
                ..config.clone()
            },
        )?;
        let pool = build_pool(pg, connector, &config)?;
        let engine = Engine::start(
            pool,
            writer_pool,
            config.max_append_batch.max(1),
            config.operation_timeout,
            config.pool_size,
        )?;
        let opened = {
            let key = config.key.clone();
            let expected = config.expected_id;
            let location = location.clone();
            engine.call(move |pool| open_store(pool, key, expected, mode, location))?
        };
        tracing::info!(location = %location.display(), store_id = %opened, ?mode,
            tls = %tls_used, "opened a PostgreSQL store");
        Ok(Self {
            location,
            id: opened,
            sealer: Arc::new(config.key.cipher()),
            engine,
            key_ids: parking_lot::Mutex::new(KeyIdBlock::default()),
            key_id_block: config.key_id_block.max(1),
        })
    }
}

/// A pool over `pg` with the configured size and timeouts.
fn build_pool(
    mut pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    config: &PgStoreConfig,
) -> Result<Pool, StoreError> {
    // A dead peer is noticed within seconds, not the kernel's hours.
    pg.keepalives(true);
    if pg.get_keepalives_idle() > Duration::from_secs(10) {
        pg.keepalives_idle(Duration::from_secs(10));
    }
    #[cfg(target_os = "linux")]
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(config.operation_timeout);
    }
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size.max(2))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .build()
        .map_err(StoreError::engine)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Create,
    Open,
}

/// `postgres://user@host:port/dbname`, without the password.
fn describe(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        pg.get_user().unwrap_or_default(),
        pg.get_dbname().unwrap_or_default()
    )
}

/// The open procedure, in one transaction under the open lock: schema
/// check, identity check (or creation), migrations.
async fn open_store(
    pool: Pool,
    key: StoreKey,
    expected: Option<StoreId>,
    mode: Mode,
    location: PathBuf,
) -> Result<StoreId, StoreError> {
    let mut client = pool.get().await.pg()?;
    let tx = client.transaction().await.pg()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OPEN_LOCK])
        .await
        .pg()?;
    let has_tables: bool = tx
        .query_one("SELECT to_regclass('bk_schema_version') IS NOT NULL", &[])
        .await
        .pg()?
        .try_get(0)
        .pg()?;
    let found: u32 = if has_tables {
        let v: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM bk_schema_version",
                &[],
            )
            .await
            .pg()?
            .try_get(0)
            .pg()?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt {
            what: "schema version".into(),
        })?
    } else {
        0
    };
    if found > PG_SCHEMA_VERSION {
        return Err(StoreError::UnsupportedSchema {
            path: location,
            found,
            supported: PG_SCHEMA_VERSION,
        });
    }
    let meta = if found >= 1 {
        let rows = tx
            .query("SELECT name, value FROM bk_meta", &[])
            .await
            .pg()?;
        let mut id = None;
        let mut check = None;
        for row in rows {
            let name: String = row.try_get(0).pg()?;
            let value: Vec<u8> = row.try_get(1).pg()?;
            match name.as_str() {
                "store_id" => id = Some(value),
                "key_check" => check = Some(value),
                _ => {}
            }
        }
        id.map(|id| (id, check))
    } else {
        None
    };
    let sealer = key.cipher();
    let id = match (mode, meta) {
        (Mode::Create, Some(_)) => return Err(StoreError::AlreadyExists { path: location }),
        (Mode::Open, None) => return Err(StoreError::Missing { path: location }),
        (Mode::Create, None) => {
            migrate(&tx, found).await?;
            let id = StoreId::generate();
            let check = sealer.seal(layout::KEY_CHECK, layout::KEY_CHECK_PLAINTEXT);
            tx.execute(
                "INSERT INTO bk_meta (name, value) VALUES ('store_id', $1), ('key_check', $2)",
                &[&id.as_bytes().as_slice(), &check],
            )
            .await
            .pg()?;
            tx.execute(
                "INSERT INTO bk_key_ids (next_id) VALUES ($1)",
                &[&key_id_sql(FIRST_KEY_ID)?],
            )
            .await
            .pg()?;
            tracing::info!(location = %location.display(), store_id = %id, "created a new PostgreSQL store");
            id
        }
        (Mode::Open, Some((raw_id, check))) => {
            let check = check.ok_or_else(|| StoreError::Corrupt {
                what: "key check record missing".into(),
            })?;
            match sealer.open(layout::KEY_CHECK, &check) {
                Some(p) if p.as_slice() == layout::KEY_CHECK_PLAINTEXT => {}
                _ => return Err(StoreError::WrongKey { path: location }),
            }
            let found_id =
                StoreId::from_bytes(<[u8; 16]>::try_from(raw_id.as_slice()).map_err(|_| {
                    StoreError::Corrupt {
                        what: "store id record".into(),
                    }
                })?);
            if let Some(expected) = expected.filter(|e| *e != found_id) {
                return Err(StoreError::Foreign {
                    path: location,
                    expected,
                    found: Some(found_id),
                });
            }
            migrate(&tx, found).await?;
            found_id
        }
    };
    tx.commit().await.pg()?;
    Ok(id)
}

/// Apply every migration above `found`, recording each.
async fn migrate(tx: &deadpool_postgres::Transaction<'_>, found: u32) -> Result<(), StoreError> {
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql).await.pg()?;
        let v = i32::try_from(*version).map_err(StoreError::engine)?;
        tx.execute("INSERT INTO bk_schema_version (version) VALUES ($1)", &[&v])
            .await
            .pg()?;
        tracing::info!(version, "applied PostgreSQL store migration");
    }
    Ok(())
}

/// A key id as the counter row holds it (plain, below 2^63).
fn key_id_sql(id: u64) -> Result<i64, StoreError> {
    i64::try_from(id).map_err(|_| StoreError::KeyIdsExhausted)
}

/// A u64 as an order-preserving BIGINT (top bit flipped): for columns
/// compared or sorted in SQL whose values may use all 64 bits.
pub(crate) fn ord(v: u64) -> i64 {
    i64::from_be_bytes((v ^ (1 << 63)).to_be_bytes())
}

/// The inverse of [`ord`].
pub(crate) fn unord(v: i64) -> u64 {
    u64::from_be_bytes(v.to_be_bytes()) ^ (1 << 63)
}

/// A u64 carried bit for bit in a BIGINT (no ordering in SQL needed).
pub(crate) fn bits(v: u64) -> i64 {
    i64::from_be_bytes(v.to_be_bytes())
}

/// The inverse of [`bits`].
pub(crate) fn unbits(v: i64) -> u64 {
    u64::from_be_bytes(v.to_be_bytes())
}

/// A Unix-millisecond time for a BIGINT column (saturating at 2^63 - 1).
pub(crate) fn millis(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Database and pool errors become [`StoreError::Engine`].
pub(crate) trait Pg<T> {
    fn pg(self) -> Result<T, StoreError>;
}

impl<T> Pg<T> for Result<T, tokio_postgres::Error> {
    fn pg(self) -> Result<T, StoreError> {
        self.map_err(StoreError::engine)
    }
}

impl<T> Pg<T> for Result<T, deadpool_postgres::PoolError> {
    fn pg(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::engine(with_causes(&e)))
    }
}

/// An error and its causes on one line. The pool's error for a connection
/// that could not be made says only "error performing TLS handshake" or
/// "error connecting to server"; why (an untrusted certificate, a refused
/// port) is in its causes, and an operator needs it.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

/// Owned query parameters, to move into the background runtime.
pub(crate) type Params = Vec<Box<dyn ToSql + Send + Sync>>;

/// Build [`Params`] from values.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Box<dyn tokio_postgres::types::ToSql + Send + Sync>),*]
    };
}
pub(crate) use params;

/// Borrow owned parameters the way `tokio-postgres` takes them.
pub(crate) fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// One statement on a connection of `pool`, its rows.
async fn query_on(
    pool: Pool,
    sql: &'static str,
    params: Params,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let client = pool.get().await.pg()?;
    // Prepared once per connection: one round trip per call after.
    let statement = client.prepare_cached(sql).await.pg()?;
    client.query(&statement, &refs(&params)).await.pg()
}

/// The background runtime, its pool and the claim path's writer.
struct Engine {
    handle: tokio::runtime::Handle,
    /// Connections (every one commits synchronously).
    pool: Pool,
    /// Appended keys not yet committed, and the queue to their writer.
    appender: Arc<appender::Appender>,
    stats: Arc<Stats>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Bound of one call (see [`PgStoreConfig::operation_timeout`]).
    timeout: Duration,
    /// Connections awaited reads may hold at once: one fewer than the pool
    /// has, so that a burst of them, which nothing else
    /// bounds, leaves a connection for every other call.
    awaited: Arc<tokio::sync::Semaphore>,
}

/// Counters behind [`crate::Store::commit_stats`].
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) writes: AtomicU64,
    pub(crate) flushes: AtomicU64,
}

impl Engine {
    /// Start the runtime thread; it runs the appends' writer until the
    /// store drops.
    fn start(
        pool: Pool,
        writer_pool: Pool,
        max_batch: usize,
        timeout: Duration,
        pool_size: usize,
    ) -> Result<Self, StoreError> {
        let stats = Arc::new(Stats::default());
        let (appender, queue) = appender::Appender::new(Arc::clone(&stats), timeout * 2);
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let writer = appender::Writer {
            pool: writer_pool,
            appender: Arc::clone(&appender),
            stats: Arc::clone(&stats),
            max_batch,
            timeout,
        };
        let thread = std::thread::Builder::new()
            .name("bridgekeys-pg".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        // Runs until the queue is closed (the store
                        // dropped) and drained.
                        runtime.block_on(writer.run(queue));
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::engine(format!("starting the PostgreSQL thread: {e}")))?;
        let handle = handle_rx
            .recv()
            .map_err(|_| StoreError::Closed)?
            .map_err(|e| StoreError::engine(format!("starting the PostgreSQL runtime: {e}")))?;
        Ok(Self {
            handle,
            pool,
            appender,
            stats,
            thread: parking_lot::Mutex::new(Some(thread)),
            timeout,
            // The pool has `pool_size.max(2)` connections (`build_pool`).
            awaited: Arc::new(tokio::sync::Semaphore::new(pool_size.max(2) - 1)),
        })
    }

    /// Run `work` on the background runtime and wait for its answer.
    fn call<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(work, move |answer| {
            let _ = tx.send(answer);
        });
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// Start `work` on the background runtime and return at once; its
    /// answer resolves the returned future (awaited on any runtime).
    fn call_later<T, F, Fut>(
        &self,
        work: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.spawn(work, move |answer| {
            let _ = tx.send(answer);
        });
        async move { rx.await.map_err(|_| StoreError::Closed)? }
    }

    /// Spawn `work` on the background runtime, bounded by the operation
    /// timeout, and hand its answer to `reply`.
    fn spawn<T, F, Fut>(&self, work: F, reply: impl FnOnce(Result<T, StoreError>) + Send + 'static)
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let fut = work(self.pool.clone());
        let timeout = self.timeout;
        drop(self.handle.spawn(async move {
            // Past the bound the work is dropped: an open transaction is
            // rolled back (dropping it queues a ROLLBACK on its connection
            // before the connection goes back to the pool).
            let answer = tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::engine(format!(
                        "the database did not answer within {timeout:?}"
                    )))
                });
            reply(answer);
        }));
    }

    /// One statement, its rows.
    fn query(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.call(move |pool| query_on(pool, sql, params))
    }

    /// [`Engine::query`] without waiting: the statement is queued on the
    /// background runtime when this returns, and sent once a connection is
    /// free. At most [`Engine::awaited`]'s permits of these hold a
    /// connection at once; the rest wait for a permit, not in the pool's
    /// queue, where every blocking call would wait behind them.
    fn query_later(
        &self,
        sql: &'static str,
        params: Params,
    ) -> impl Future<Output = Result<Vec<tokio_postgres::Row>, StoreError>> + Send + 'static {
        let awaited = Arc::clone(&self.awaited);
        self.call_later(move |pool| async move {
            let _permit = awaited
                .acquire_owned()
                .await
                .map_err(|_| StoreError::Closed)?;
            query_on(pool, sql, params).await
        })
    }

    /// One statement (its own transaction), the rows it changed. Counts as
    /// a durable write.
    fn execute(&self, sql: &'static str, params: Params) -> Result<u64, StoreError> {
        let n = self.call(move |pool| async move {
            let client = pool.get().await.pg()?;
            let statement = client.prepare_cached(sql).await.pg()?;
            client.execute(&statement, &refs(&params)).await.pg()
        })?;
        self.committed();
        Ok(n)
    }

    /// Count one committed write.
    fn committed(&self) {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> CommitStats {
        CommitStats {
            writes: self.stats.writes.load(Ordering::Relaxed),
            flushes: self.stats.flushes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is queued and
        // stop; then the runtime thread ends.
        self.appender.close();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_preserving_ids_sort_like_the_u64s_they_carry() {
        let values = [0, 1, 1 << 32, (1 << 63) - 1, 1 << 63, u64::MAX];
        for pair in values.windows(2) {
            assert!(ord(pair[0]) < ord(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(unord(ord(v)), v);
            assert_eq!(unbits(bits(v)), v);
        }
        assert_eq!(millis(u64::MAX), i64::MAX);
    }

    #[test]
    fn the_config_debug_shows_neither_password_nor_key() {
        let config = PgStoreConfig::new(
            "postgres://bridge:hunter2@db:5433/keys",
            StoreKey::new([9; 32]),
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://bridge@db:5433/keys"), "{shown}");
    }

    #[test]
    fn migrations_are_numbered_from_one_without_gaps_up_to_the_schema_version() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.0), Some(PG_SCHEMA_VERSION));
    }
}
