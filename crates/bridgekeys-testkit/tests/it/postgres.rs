//! The testkit gives a test a real, throwaway PostgreSQL server.

use std::{
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use bridgekeys_testkit::{Postgres, PostgresOptions, TestkitError};

async fn start() -> Postgres {
    Postgres::start()
        .await
        .unwrap_or_else(|e| panic!("could not provide PostgreSQL: {e}"))
}

/// Whether the port refuses TCP connections before `timeout` passes
/// (polled: a server that stops takes a moment to close its socket).
async fn refuses_connections_within(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_created_database_is_separate_so_a_table_in_one_is_not_in_another() {
    let pg = start().await;
    let port = pg.port();
    assert_eq!(
        pg.url(),
        format!("postgres://bridgekeys:bridgekeys@127.0.0.1:{port}/postgres")
    );
    let first = pg.create_database("first").await.unwrap();
    let second = pg.create_database("second").await.unwrap();
    assert_eq!(
        first,
        format!("postgres://bridgekeys:bridgekeys@127.0.0.1:{port}/first")
    );
    assert_eq!(second, pg.database_url("second"));

    pg.psql(
        "first",
        "CREATE TABLE devices (id text PRIMARY KEY); INSERT INTO devices VALUES ('ABC')",
    )
    .await
    .unwrap();
    assert_eq!(
        pg.psql("first", "SELECT id FROM devices").await.unwrap(),
        "ABC"
    );
    // The other database has no such table: to_regclass is NULL, printed
    // as an empty line, and reading it is an error naming the relation.
    assert_eq!(
        pg.psql("second", "SELECT to_regclass('public.devices')")
            .await
            .unwrap(),
        ""
    );
    let err = pg
        .psql("second", "SELECT id FROM devices")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("relation \"devices\" does not exist"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_database_refuses_a_taken_name_and_names_that_need_quoting() {
    let pg = start().await;
    pg.create_database("taken").await.unwrap();
    let err = pg.create_database("taken").await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    for bad in ["", "Upper", "1st", "semi;colon", "quo\"te", &"x".repeat(64)] {
        let err = pg.create_database(bad).await.unwrap_err();
        assert!(
            matches!(err, TestkitError::Postgres { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_survive_a_kill_9_and_restart_on_the_same_port() {
    let mut pg = start().await;
    let port = pg.port();
    pg.create_database("durable").await.unwrap();
    pg.psql(
        "durable",
        "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await
    .unwrap();

    // When kill returns, none of the server's processes is left, not only
    // the postmaster (a backend holding the old shared memory would make
    // the restart fail). Backends also exit by themselves soon after the
    // postmaster dies, so this checks the promise, not how it is kept.
    let helpers = pg
        .psql(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE backend_type IN ('checkpointer', 'walwriter')",
        )
        .await
        .unwrap();
    let helpers: Vec<u32> = helpers.lines().map(|p| p.parse().unwrap()).collect();
    assert_eq!(helpers.len(), 2, "{helpers:?}");

    pg.kill().await.unwrap();
    for pid in &helpers {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "server process {pid} outlived the kill: {state}"
        );
    }
    assert!(
        refuses_connections_within(port, Duration::from_secs(10)).await,
        "the killed server still accepts connections"
    );

    pg.restart().await.unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.psql("durable", "SELECT count(*), sum(n) FROM t")
            .await
            .unwrap(),
        "100|5050"
    );
    // The restart was a crash recovery, not a clean start.
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(
        log.contains("was not properly shut down"),
        "{}",
        pg.log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_the_data_and_the_url() {
    let mut pg = start().await;
    let url = pg.create_database("kept").await.unwrap();
    pg.psql(
        "kept",
        "CREATE TABLE t (s text); INSERT INTO t VALUES ('still here')",
    )
    .await
    .unwrap();
    pg.restart().await.unwrap();
    assert_eq!(pg.database_url("kept"), url);
    assert_eq!(
        pg.psql("kept", "SELECT s FROM t").await.unwrap(),
        "still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_stops_it_and_removes_its_data() {
    let pg = start().await;
    let port = pg.port();
    let data = pg.data_dir();
    assert!(data.join("PG_VERSION").exists());
    drop(pg);
    assert!(
        refuses_connections_within(port, Duration::from_secs(10)).await,
        "port {port} still accepts connections after the drop"
    );
    assert!(!data.exists(), "{} was left behind", data.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_stop_stops_the_server_and_removes_its_data() {
    let pg = start().await;
    let port = pg.port();
    let data = pg.data_dir();
    pg.stop().await.unwrap();
    assert!(refuses_connections_within(port, Duration::from_secs(10)).await);
    assert!(!data.exists(), "{} was left behind", data.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_is_on_unless_turned_off_and_the_server_listens_on_loopback_only() {
    let durable = start().await;
    assert_eq!(durable.psql("postgres", "SHOW fsync").await.unwrap(), "on");
    assert_eq!(
        durable
            .psql("postgres", "SHOW listen_addresses")
            .await
            .unwrap(),
        "127.0.0.1"
    );
    let fast = Postgres::start_with(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(fast.psql("postgres", "SHOW fsync").await.unwrap(), "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_never_runs_as_root() {
    let pg = start().await;
    // PostgreSQL refuses root; as root, the testkit hands the data to an
    // unprivileged user (postgres, else nobody).
    let owner = std::fs::metadata(pg.data_dir()).unwrap().uid();
    assert_ne!(owner, 0, "the data directory belongs to root");
    assert_eq!(pg.psql("postgres", "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn missing_postgres_binaries_are_a_clear_error_naming_the_install() {
    let err = Postgres::start_with(PostgresOptions {
        bin_dir: Some("/nonexistent/pg/bin".into()),
        ..PostgresOptions::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, TestkitError::PostgresMissing { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("apt-get install postgresql"), "{message}");
    assert!(message.contains("/nonexistent/pg/bin"), "{message}");
    assert!(message.contains("initdb"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cpu_counts_the_work_of_a_backend_that_has_already_exited() {
    let pg = start().await;
    let before = pg.server_cpu_s().expect("a running server's CPU time");
    // A second or more of CPU in one backend (psql's), which exits before
    // the second reading: its time must still be counted (as the
    // postmaster's reaped child). The work is about three times the 0.3 s
    // asked for on a fast machine (3 000 000 rows once took only 0.29 s
    // in CI); a backend not counted would add next to nothing.
    pg.psql(
        "postgres",
        "SELECT count(*) FROM (SELECT md5(i::text) FROM generate_series(1, 10000000) i) s",
    )
    .await
    .unwrap();
    let after = pg.server_cpu_s().expect("a running server's CPU time");
    assert!(
        after - before >= 0.3,
        "the server's CPU time moved only from {before} s to {after} s"
    );
}
