//! Tracked users' device lists when several processes share one store
//! (issue 15): two account managers on one shared store stand for two
//! bridge processes.
//!
//! A tracked user's record is read, changed and written back. Between one
//! process's read and its write, the other may write the same record: a
//! `device_lists.changed` invalidation arriving in one process while the
//! other stores the answer to its `keys/query`. The answer must not
//! overwrite the invalidation, or the user is never queried again and a new
//! device of theirs gets no room key. The race is forced, not hoped for: an
//! [`Intercepted`] store runs the other process's invalidation right before
//! this process's write.
//!
//! On a shared [`MemoryStore`] and on two [`PgStore`]s over one real
//! PostgreSQL database.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{
    Backend, Store,
    testing::{Intercepted, MemoryStore, Write},
};
use ruma::device_id;
use vodozemac::olm::Account;

use crate::common::{device_keys, peer_user, postgres_pair};

async fn an_invalidation_stored_while_the_other_process_answers_a_query_is_kept(
    first: Arc<dyn Backend>,
    second: Arc<dyn Backend>,
) {
    let racing = Arc::new(Intercepted::new(first));
    let a = AccountManager::new(
        Arc::clone(&racing) as Arc<dyn Store>,
        ManagerConfig::default(),
    );
    let b = Arc::new(AccountManager::new(
        second as Arc<dyn Store>,
        ManagerConfig::default(),
    ));
    let peer = peer_user();
    let device = device_id!("PEERDEV");
    let listing = BTreeMap::from([(
        device.to_owned(),
        device_keys(&Account::new(), peer, device),
    )]);
    a.update_tracked_devices(peer, &listing).await.unwrap();
    // `a` sends a `keys/query` for the peer at this generation...
    let queried_at = a.tracked_generation(peer).unwrap();

    // ...and right before `a` stores the answer, `b` handles a
    // `device_lists.changed` for the peer (once).
    let pending_b = Mutex::new(Some(Arc::clone(&b)));
    let handle = tokio::runtime::Handle::current();
    racing.intercept(move |write| {
        if !matches!(write, Write::TrackedUser(_)) {
            return Ok(());
        }
        let taken = pending_b.lock().unwrap().take();
        if let Some(b) = taken {
            let handle = handle.clone();
            let marked =
                std::thread::spawn(move || handle.block_on(b.mark_devices_outdated([peer_user()])))
                    .join()
                    .unwrap()
                    .unwrap();
            assert_eq!(marked, vec![peer_user().to_owned()]);
        }
        Ok(())
    });
    a.update_tracked_devices_since(peer, &listing, Some(queried_at))
        .await
        .unwrap();
    racing.clear();

    let tracked = a.tracked_devices(peer).unwrap().unwrap();
    assert!(
        tracked.outdated,
        "the invalidation b stored while a answered its query was overwritten"
    );
    assert!(tracked.generation > queried_at);
    assert!(
        tracked.devices.contains_key(device),
        "the answer is stored too"
    );
    // And `b` reads the same.
    assert!(b.tracked_devices(peer).unwrap().unwrap().outdated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_memory_store_an_invalidation_is_not_overwritten_by_the_other_processs_query_answer()
{
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    an_invalidation_stored_while_the_other_process_answers_a_query_is_kept(
        Arc::clone(&store),
        store,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_postgres_database_an_invalidation_is_not_overwritten_by_the_other_processs_query_answer()
 {
    let (_server, [first, second]) = postgres_pair("shared_tracking").await;
    an_invalidation_stored_while_the_other_process_answers_a_query_is_kept(first, second).await;
}
