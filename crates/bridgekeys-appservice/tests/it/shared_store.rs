//! Several bridge processes on one store: two listeners sharing one
//! `MemoryStore` (with real transaction leases), and two listeners on two
//! `PgStore`s over one real PostgreSQL database, stand for two processes.
//! A homeserver retry that lands on the other process is handled once.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Router,
    http::{Method, StatusCode},
};
use bridgekeys_appservice::{Appservice, Limits};
use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{Backend, PgStore, PgStoreConfig, StoreKey, testing::MemoryStore};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

use crate::common::{Recorder, TXN_NS, authed, call, config, json_body, metric_value};

/// One "process": its own manager, handler and listener on the shared store.
struct Process {
    handler: Arc<Recorder>,
    router: Router,
}

impl Process {
    fn on(backend: Arc<dyn Backend>) -> Self {
        let manager = Arc::new(AccountManager::new(
            backend.clone(),
            ManagerConfig::default(),
        ));
        let handler = Arc::new(Recorder::default());
        let appservice = Appservice::new(
            config(Limits::default()),
            manager,
            backend,
            Arc::clone(&handler),
        )
        .unwrap();
        Self {
            handler,
            router: appservice.router(),
        }
    }

    async fn put(&self, id: &str) -> StatusCode {
        let body = json!({"events": [{"type": "m.room.message"}]});
        let path = format!("/_matrix/app/v1/transactions/{id}");
        call(&self.router, authed(Method::PUT, &path, json_body(&body)))
            .await
            .0
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_value(&metrics_text(&self.router).await, name)
    }
}

async fn metrics_text(router: &Router) -> String {
    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;
    let resp = router
        .clone()
        .oneshot(
            axum::http::Request::get("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    String::from_utf8(
        to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap()
}

const HELD_ELSEWHERE: &str = "bridgekeys_appservice_transactions_held_elsewhere_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_retried_to_another_process_while_the_first_handles_it_is_handled_once() {
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    retried_elsewhere_is_handled_once(&store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_postgres_a_transaction_retried_to_another_process_while_the_first_handles_it_is_handled_once()
 {
    let server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database("shared_listeners").await.unwrap();
    let key = StoreKey::generate();
    // Two stores on one database: two processes' views of it.
    let first: Arc<dyn Backend> =
        Arc::new(PgStore::create(PgStoreConfig::new(&url, key.clone())).unwrap());
    let second: Arc<dyn Backend> = Arc::new(PgStore::open(PgStoreConfig::new(&url, key)).unwrap());
    retried_elsewhere_is_handled_once(&first, &second).await;
}

/// A retry landing on `second`'s listener while `first`'s handles the
/// transaction waits, and is acknowledged without being handled again.
async fn retried_elsewhere_is_handled_once(first: &Arc<dyn Backend>, second: &Arc<dyn Backend>) {
    let store = Arc::clone(first);
    let (first, second) = (
        Process::on(Arc::clone(first)),
        Process::on(Arc::clone(second)),
    );
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    *first.handler.gate.lock().unwrap() = Some((entered_tx, Arc::clone(&release)));

    let first = Arc::new(first);
    let running = {
        let first = Arc::clone(&first);
        tokio::spawn(async move { first.put("slow").await })
    };
    // The first process is inside the bridge's handler, not yet recorded.
    entered.recv().await.unwrap();
    let second = Arc::new(second);
    let retried = {
        let second = Arc::clone(&second);
        tokio::spawn(async move { second.put("slow").await })
    };
    // The retry found the lease held by the first process (a condition,
    // not a sleep: the second listener's counter says so).
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while second.metric(HELD_ELSEWHERE).await < 1.0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the retry waited for the lease held by the other process");
    assert_eq!(second.handler.calls.load(Ordering::SeqCst), 0);
    assert!(
        !retried.is_finished(),
        "the retry is not answered before the first records"
    );
    release.notify_one();

    assert_eq!(running.await.unwrap(), StatusCode::OK);
    assert_eq!(retried.await.unwrap(), StatusCode::OK);
    assert_eq!(first.handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        second.handler.calls.load(Ordering::SeqCst),
        0,
        "handled once, by the first process"
    );
    assert_eq!(
        second
            .metric("bridgekeys_appservice_transactions_duplicate_total")
            .await,
        1.0
    );
    assert!(store.transaction_completed(TXN_NS, "slow").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_releases_the_lease_so_the_retry_on_another_process_runs_at_once() {
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    let (first, second) = (Process::on(store.clone()), Process::on(store.clone()));
    first.handler.fail.store(true, Ordering::SeqCst);
    assert_eq!(first.put("flaky").await, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!store.transaction_completed(TXN_NS, "flaky").unwrap());

    // Without the release, the retry would wait for the lease to expire
    // (request timeout plus 10 s) and count as held elsewhere.
    assert_eq!(second.put("flaky").await, StatusCode::OK);
    assert_eq!(second.handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(second.metric(HELD_ELSEWHERE).await, 0.0);
    assert!(store.transaction_completed(TXN_NS, "flaky").unwrap());
    // And back on the first process it is now a duplicate.
    first.handler.fail.store(false, Ordering::SeqCst);
    assert_eq!(first.put("flaky").await, StatusCode::OK);
    assert_eq!(
        first.handler.calls.load(Ordering::SeqCst),
        1,
        "only the failed attempt"
    );
}

/// A claim whose commit failed must not leave the manager counting its
/// keys: PostgreSQL commits claims in batches, and a failed batch stores
/// none of them. An inflated count would make a later claim evict keys
/// already handed out to peers.
///
/// The store is told to be its own sole writer (one process uses it here),
/// so the manager relies on its own count as it does on sled: on a shared
/// store it counts again from the database before evicting anyway, which
/// would hide a wrong count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_claims_whose_commit_failed_are_recounted_so_no_handed_out_key_is_evicted() {
    use bridgekeys_store::{DeviceKey, Store, testing::Intercepted};
    use ruma::{OneTimeKeyAlgorithm, device_id, user_id};

    let mut server = bridgekeys_testkit::Postgres::start().await.unwrap();
    let url = server.create_database("recount").await.unwrap();
    let mut store_config = PgStoreConfig::new(&url, StoreKey::generate());
    store_config.connect_timeout = std::time::Duration::from_secs(2);
    let pg: Arc<dyn Backend> = Arc::new(PgStore::create(store_config).unwrap());
    let store = Arc::new(Intercepted::new(pg).with_sole_writer(true));
    let mut manager_config = ManagerConfig::default();
    manager_config.max_outstanding_keys = 4;
    let manager = Arc::new(AccountManager::new(store.clone(), manager_config));
    let (user, device) = (user_id!("@bot_a:example.org"), device_id!("PUPPET"));
    let algorithm = OneTimeKeyAlgorithm::SignedCurve25519;
    manager.create_device(user, device).await.unwrap();
    let handed_out: Vec<[u8; 32]> = manager
        .claim(user, device, &algorithm, 3)
        .await
        .unwrap()
        .iter()
        .map(|k| <[u8; 32]>::try_from(k.key.key.as_bytes()).unwrap())
        .collect();

    // Two claims whose commit is held up by a table lock, then lost with
    // the database server.
    let (locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE bk_one_time_keys IN SHARE MODE")
        .await
        .unwrap();
    let claims: Vec<_> = (0..2)
        .map(|_| {
            let manager = Arc::clone(&manager);
            let algorithm = algorithm.clone();
            tokio::spawn(async move { manager.claim(user, device, &algorithm, 1).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = locker
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the commit never blocked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.kill().await.unwrap();
    drop(locker);
    for claim in claims {
        assert!(
            claim.await.unwrap().is_err(),
            "nothing lost is acknowledged"
        );
    }
    server.restart().await.unwrap();

    // 3 outstanding + 1 is within the bound of 4: nothing is evicted. (A
    // count of 5 would evict the two oldest, handed out above.)
    manager.claim(user, device, &algorithm, 1).await.unwrap();
    let key = DeviceKey::new(user.as_str(), device.as_str());
    assert_eq!(store.count_one_time_keys(&key).unwrap(), 4);
    for public in &handed_out {
        assert!(
            store.one_time_key(&key, public).unwrap().is_some(),
            "a key handed out to a peer is still there for its pre-key message"
        );
    }
}
