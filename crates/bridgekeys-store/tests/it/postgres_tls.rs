//! PgStore over TLS to a real PostgreSQL server that serves a certificate
//! from a throwaway CA (`bridgekeys_testkit::TestCa`): each `sslmode`
//! either connects with every connection encrypted (as the server itself
//! reports in `pg_stat_ssl`) or is refused before anything is written.

use std::path::{Path, PathBuf};

use bridgekeys_store::{PgStore, PgStoreConfig, Store, StoreError, StoreKey};
use bridgekeys_testkit::{Postgres, PostgresOptions, TestCa};

use crate::pg_server::fresh_database;

/// The superuser's password: no error may show it.
const PASSWORD: &str = "tls-test-Pa55word";

/// A TLS server whose certificate names only `localhost` (not
/// `127.0.0.1`, so the name check can be caught failing), the file of the
/// CA that signed it, and the file of a CA that did not.
async fn tls_server(dir: &Path) -> (Postgres, PathBuf, PathBuf) {
    let ca = TestCa::generate("bridgekeys test CA").unwrap();
    let stranger = TestCa::generate("some other CA").unwrap();
    let server = start_tls(&ca, PostgresOptions::default()).await;
    let (trusted, untrusted) = (dir.join("ca.pem"), dir.join("stranger.pem"));
    std::fs::write(&trusted, ca.pem()).unwrap();
    std::fs::write(&untrusted, stranger.pem()).unwrap();
    (server, trusted, untrusted)
}

/// A server serving a certificate of `ca` for `localhost`, with the
/// superuser's password [`PASSWORD`] and whatever else `options` says.
async fn start_tls(ca: &TestCa, options: PostgresOptions) -> Postgres {
    Postgres::start_with(PostgresOptions {
        fsync: false,
        password: PASSWORD.into(),
        tls: Some(ca.issue(&["localhost"]).unwrap()),
        ..options
    })
    .await
    .unwrap_or_else(|e| panic!("a TLS PostgreSQL for this test: {e}"))
}

/// `(encrypted, all)` connections the server has open to `database`.
async fn connections(server: &Postgres, database: &str) -> (u32, u32) {
    let counts = server
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s \
                 JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{database}'"
            ),
        )
        .await
        .unwrap();
    let (encrypted, all) = counts.split_once('|').unwrap();
    (encrypted.parse().unwrap(), all.parse().unwrap())
}

/// Tables of a store in `database` (none after a refused connection).
async fn store_tables(server: &Postgres, database: &str) -> u32 {
    server
        .psql(
            database,
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bk\\_%'",
        )
        .await
        .unwrap()
        .parse()
        .unwrap()
}

/// `postgres://user:password@HOST:port/DATABASE?PARAMS`.
fn url(server: &Postgres, host: &str, database: &str, params: &str) -> String {
    let base = server
        .database_url(database)
        .replacen("@127.0.0.1:", &format!("@{host}:"), 1);
    if params.is_empty() {
        base
    } else {
        format!("{base}?{params}")
    }
}

/// What opening a store should come to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// Opens, every connection encrypted.
    Encrypted,
    /// Opens, no connection encrypted.
    Plain,
    /// Refused before anything is written.
    Refused,
}

/// Create a store at `url` (on `database` of `server`) and check that it
/// comes to `outcome`: a store that opens takes key ids through its pools,
/// and the server's own `pg_stat_ssl` says which of its connections are
/// encrypted; a refusal is an engine error without the password, and no
/// table was made. The refusal's message, for more checks.
async fn open_expecting(
    server: &Postgres,
    case: &str,
    database: &str,
    url: String,
    outcome: Outcome,
) -> Option<String> {
    let config = PgStoreConfig::new(url, StoreKey::generate());
    let opened = tokio::task::spawn_blocking(move || PgStore::create(config))
        .await
        .unwrap();
    match opened {
        Ok(store) => {
            assert_ne!(
                outcome,
                Outcome::Refused,
                "{case}: connected, but must be refused"
            );
            let first = store.reserve_key_ids(3).unwrap();
            assert_eq!(store.reserve_key_ids(1).unwrap(), first + 3, "{case}");
            let (tls, all) = connections(server, database).await;
            assert!(all >= 1, "{case}: the store holds no connection");
            if outcome == Outcome::Encrypted {
                assert_eq!(tls, all, "{case}: {tls} of {all} connections encrypted");
            } else {
                assert_eq!(tls, 0, "{case}: TLS although sslmode=disable");
            }
            assert!(
                store_tables(server, database).await > 0,
                "{case}: a store was made"
            );
            None
        }
        Err(e) => {
            let message = e.to_string();
            eprintln!("{case}: refused: {message}");
            assert_eq!(outcome, Outcome::Refused, "{case}: refused: {message}");
            assert!(matches!(e, StoreError::Engine(_)), "{case}: {message}");
            assert!(
                !message.contains(PASSWORD),
                "{case}: the password in {message}"
            );
            assert_eq!(
                store_tables(server, database).await,
                0,
                "{case}: nothing written"
            );
            Some(message)
        }
    }
}

#[tokio::test]
async fn every_sslmode_gets_libpqs_meaning_against_a_real_tls_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, trusted, untrusted) = tls_server(dir.path()).await;
    let (trusted, untrusted) = (trusted.display(), untrusted.display());
    // (case, host, parameters, outcome)
    let cases = [
        (
            "verify_full",
            "localhost",
            format!("sslmode=verify-full&sslrootcert={trusted}"),
            Outcome::Encrypted,
        ),
        (
            "verify_full_wrong_name",
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={trusted}"),
            Outcome::Refused,
        ),
        (
            "verify_full_wrong_ca",
            "localhost",
            format!("sslmode=verify-full&sslrootcert={untrusted}"),
            Outcome::Refused,
        ),
        (
            "verify_ca_any_name",
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={trusted}"),
            Outcome::Encrypted,
        ),
        (
            "verify_ca_wrong_ca",
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={untrusted}"),
            Outcome::Refused,
        ),
        (
            "public_roots_mean_verify_full",
            "localhost",
            "sslrootcert=system".to_owned(),
            Outcome::Refused,
        ),
        (
            "require_unchecked",
            "127.0.0.1",
            "sslmode=require".to_owned(),
            Outcome::Encrypted,
        ),
        (
            "require_with_wrong_root",
            "127.0.0.1",
            format!("sslmode=require&sslrootcert={untrusted}"),
            Outcome::Refused,
        ),
        (
            "prefer_by_default",
            "127.0.0.1",
            String::new(),
            Outcome::Encrypted,
        ),
        (
            "disable",
            "127.0.0.1",
            "sslmode=disable".to_owned(),
            Outcome::Plain,
        ),
    ];
    for (case, host, params, outcome) in cases {
        let database = format!("bk_tls_{case}");
        server.create_database(&database).await.unwrap();
        let url = url(&server, host, &database, &params);
        if let Some(message) = open_expecting(&server, case, &database, url, outcome).await {
            assert!(
                message.contains("certificate"),
                "{case}: the refusal names the certificate: {message}"
            );
        }
    }
    // The key-value form, checked all the way (chain and name); and an
    // address without a host name, which libpq allows (encrypted, but the
    // certificate names `localhost`, not the address).
    for (database, target, params, outcome) in [
        (
            "bk_tls_key_value",
            "host=localhost",
            format!("sslmode=verify-full sslrootcert='{trusted}'"),
            Outcome::Encrypted,
        ),
        (
            "bk_tls_hostaddr",
            "hostaddr=127.0.0.1",
            "sslmode=require".to_owned(),
            Outcome::Encrypted,
        ),
        (
            "bk_tls_hostaddr_full",
            "hostaddr=127.0.0.1",
            format!("sslmode=verify-full sslrootcert='{trusted}'"),
            Outcome::Refused,
        ),
    ] {
        server.create_database(database).await.unwrap();
        let key_value = format!(
            "{target} port={} user={} password='{PASSWORD}' dbname={database} {params}",
            server.port(),
            server.user(),
        );
        open_expecting(&server, database, database, key_value, outcome).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required_and_used_plain_when_preferred() {
    let (plain_url, _server) = fresh_database().await;
    let required = PgStoreConfig::new(format!("{plain_url}?sslmode=require"), StoreKey::generate());
    let refused = tokio::task::spawn_blocking(move || PgStore::create(required))
        .await
        .unwrap();
    match &refused {
        Err(e @ StoreError::Engine(_)) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains("TLS"), "the refusal says why: {e}");
        }
        other => panic!(
            "sslmode=require against a server without TLS must fail, got {:?}",
            other.as_ref().map(|s| s.id())
        ),
    }
    let preferred = PgStoreConfig::new(plain_url, StoreKey::generate());
    let store = tokio::task::spawn_blocking(move || PgStore::create(preferred))
        .await
        .unwrap()
        .expect("prefer falls back to a plain connection");
    store.reserve_key_ids(1).unwrap();
}

#[tokio::test]
async fn a_role_that_logs_in_by_client_certificate_gets_in_with_sslcert_and_sslkey_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate("bridgekeys test CA").unwrap();
    let clients = TestCa::generate("bridgekeys client CA").unwrap();
    let stranger = TestCa::generate("some other CA").unwrap();
    let server = start_tls(
        &ca,
        PostgresOptions {
            client_ca: Some(clients.pem()),
            hba: vec!["hostssl all certuser 127.0.0.1/32 cert".into()],
            ..PostgresOptions::default()
        },
    )
    .await;
    server
        .psql("postgres", "CREATE ROLE certuser LOGIN")
        .await
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let root = write("ca.pem", ca.pem());
    let ours = clients.issue_client("certuser").unwrap();
    let (cert, key) = (
        write("client.crt", ours.cert_pem),
        write("client.key", ours.key_pem),
    );
    let forged = stranger.issue_client("certuser").unwrap();
    let (forged_cert, forged_key) = (
        write("forged.crt", forged.cert_pem),
        write("forged.key", forged.key_pem),
    );
    let checked = format!("sslmode=verify-full&sslrootcert={root}");
    // (case, extra parameters, outcome)
    let cases = [
        (
            "with_certificate",
            format!("&sslcert={cert}&sslkey={key}"),
            Outcome::Encrypted,
        ),
        ("without_certificate", String::new(), Outcome::Refused),
        (
            "certificate_of_another_ca",
            format!("&sslcert={forged_cert}&sslkey={forged_key}"),
            Outcome::Refused,
        ),
    ];
    for (case, extra, outcome) in cases {
        let database = format!("bk_cert_{case}");
        server
            .psql(
                "postgres",
                &format!("CREATE DATABASE {database} OWNER certuser"),
            )
            .await
            .unwrap();
        // No password: the certificate is the credential.
        let url = format!(
            "postgres://certuser@localhost:{}/{database}?{checked}{extra}",
            server.port()
        );
        open_expecting(&server, case, &database, url, outcome).await;
    }
    server.stop().await.unwrap();
}

/// A connection string that names the server's socket directory works
/// with `sslmode=require`, as it does with psql: libpq ignores the mode over
/// a Unix socket (the server never offers TLS there), so asking for TLS and
/// refusing the answer would fail a string every other client accepts.
#[tokio::test]
async fn over_the_servers_unix_socket_sslmode_require_connects_as_with_libpq() {
    let server = bridgekeys_testkit::Postgres::start().await.unwrap();
    server.create_database("by_socket").await.unwrap();
    let string = format!(
        "host={} port={} user={} dbname=by_socket sslmode=require",
        server.socket_dir().display(),
        server.port(),
        server.user(),
    );
    let config = PgStoreConfig::new(string, StoreKey::generate());
    let store = tokio::task::spawn_blocking(move || PgStore::create(config))
        .await
        .unwrap()
        .expect("sslmode=require over the server's Unix socket connects");
    let first = store.reserve_key_ids(3).unwrap();
    assert_eq!(store.reserve_key_ids(1).unwrap(), first + 3);
    server.stop().await.unwrap();
}
