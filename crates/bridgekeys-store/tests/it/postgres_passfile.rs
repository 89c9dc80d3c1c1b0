//! PgStore takes its password from libpq's password file when the URL
//! has none, against a real PostgreSQL that asks for one (scram-sha-256
//! over TCP), and ignores a file that others may read.

use std::os::unix::fs::PermissionsExt;

use bridgekeys_store::{PgStore, PgStoreConfig, Store, StoreKey};

use crate::pg_server::{URL_ENV, fresh_database};

#[tokio::test]
async fn a_url_without_a_password_takes_it_from_a_private_password_file_only() {
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
    // A line for another database first, with a wrong password: the first
    // line that matches wins, and this one must not.
    std::fs::write(
        &file,
        format!(
            "# bridge credentials\n{host}:{port}:other_db:{user}:wrong\n\
             {host}:*:{database}:{user}:{escaped}\n"
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
    if std::env::var(URL_ENV).is_err() && std::env::var("PGPASSWORD").is_err() {
        // The testkit's server wants a password over TCP: a file others
        // may read is ignored, so there is none.
        let refused = open(without_password.clone()).await;
        assert!(refused.is_err(), "a world-readable password file was used");
    }

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = open(without_password)
        .await
        .expect("the password file's password");
    store.reserve_key_ids(1).unwrap();
}
