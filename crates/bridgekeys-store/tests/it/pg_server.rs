//! The PostgreSQL server the PgStore tests run against, and a fresh
//! database per test on it.
//!
//! By default a throwaway server from the testkit (`initdb` into a temporary
//! directory, see `bridgekeys_testkit::Postgres`), shared by the tests that
//! run at the same time: each test holds it (an `Arc`) until it ends, and the
//! last one to let go stops it, in the test, so no server outlives the test
//! binary. The server process is not tied to the runtime of the test that
//! started it, so it serves the others after that runtime is gone.
//!
//! `BRIDGEKEYS_TEST_POSTGRES_URL` (a `postgres://` URL of a role that may
//! `CREATE DATABASE`) points the tests at an existing server instead. If
//! neither can be had, the tests fail, saying why: they never pass without
//! a database.

use std::sync::{Arc, Weak};

use bridgekeys_store::StoreId;
use bridgekeys_testkit::Postgres;

/// The environment variable naming an existing server to use.
pub const URL_ENV: &str = "BRIDGEKEYS_TEST_POSTGRES_URL";

/// Keeps the test's server running: hold it as long as the database is used.
pub type ServerGuard = Option<Arc<Postgres>>;

static SHARED: tokio::sync::Mutex<Weak<Postgres>> = tokio::sync::Mutex::const_new(Weak::new());

/// A fresh, empty database: its URL, and the guard of its server.
pub async fn fresh_database() -> (String, ServerGuard) {
    let name = format!("bk_{}", StoreId::generate());
    if let Ok(base) = std::env::var(URL_ENV) {
        return (create_on(&base, &name).await, None);
    }
    let server = {
        let mut shared = SHARED.lock().await;
        match shared.upgrade() {
            Some(server) => server,
            None => {
                let server = Arc::new(Postgres::start().await.unwrap_or_else(|e| {
                    panic!(
                        "the PgStore tests need PostgreSQL (initdb, postgres, pg_isready, psql \
                         on PATH or in /usr/lib/postgresql/*/bin), or {URL_ENV} naming a \
                         server: {e}"
                    )
                }));
                *shared = Arc::downgrade(&server);
                server
            }
        }
    };
    let url = server
        .create_database(&name)
        .await
        .unwrap_or_else(|e| panic!("creating the test database: {e}"));
    (url, Some(server))
}

/// Create database `name` on the server at `base`; its URL.
async fn create_on(base: &str, name: &str) -> String {
    let (client, connection) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the server named by {URL_ENV}: {e}"));
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("creating the test database: {e}"));
    drop(client);
    let _ = connection.await;
    // postgres://user@host:port/<database>
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_at = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}", &base[..path_at])
}
