//! PgStore takes its password from libpq's password file when the URL
//! has none, against a real PostgreSQL that asks for one (scram-sha-256
//! over TCP), and ignores a file that others may read.

use std::os::unix::fs::PermissionsExt;

use bridgekeys_store::{PgStore, PgStoreConfig, Store, StoreKey};

use crate::pg_server::{URL_ENV, fresh_database};

#[tokio::test]
async fn a_url_without_a_password_takes_it_from_a_private_password_file_only() {
    if std::env::var(URL_ENV).is_ok() || std::env::var("PGPASSWORD").is_ok() {
        // Another server (maybe trusting every client) or a password from
        // the environment: the file would not be what is tested.
        eprintln!("skipped: {URL_ENV} or PGPASSWORD is set");
        return;
    }
    let (url, _server) = fresh_database().await;
    let pg: tokio_postgres::Config = url.parse().unwrap();
    let host = match &pg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("a TCP test server, not {other:?}"),
    };
    let (port, user, database) = (
        pg.get_ports()[0],
        pg.get_user().unwrap().to_owned(),
        pg.get_dbname().unwrap().to_owned(),
    );
    let password = String::from_utf8(pg.get_password().unwrap().to_vec()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgpass");
    let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
    // A line for another port and one for another database, with wrong
    // passwords, must not match; the right line must win over the catch-all
    // after it (the first line that matches wins).
    std::fs::write(
        &file,
        format!(
            "# bridge credentials\n{host}:{}:{database}:{user}:wrong-port\n\
             {host}:{port}:other_db:{user}:wrong-database\n\
             {host}:{port}:{database}:{user}:{escaped}\n\
             *:*:*:*:catch-all\n",
            port + 1
        ),
    )
    .unwrap();
    let without_password = format!(
        "postgres://{user}@{host}:{port}/{database}?passfile={}",
        file.display()
    );
    let open = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            PgStore::create(PgStoreConfig::new(url, StoreKey::generate()))
        })
        .await
        .unwrap()
    };

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The testkit's server wants a password over TCP: a file others may
    // read is ignored, so there is none.
    let refused = open(without_password.clone()).await;
    assert!(refused.is_err(), "a world-readable password file was used");

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = open(without_password)
        .await
        .expect("the password file's password");
    store.reserve_key_ids(1).unwrap();
}
