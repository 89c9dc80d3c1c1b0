//! The conformance suite (`bridgekeys_store::testing::conformance`) against
//! every backend of this crate: the in-memory one, sled and (feature
//! `postgres`) PostgreSQL.

/// Every check, leases included: the memory store's leases are real.
mod memory {
    use std::sync::Arc;

    use bridgekeys_store::{Backend, testing::MemoryStore};

    bridgekeys_store::conformance_tests!(async {
        Arc::new(MemoryStore::new()) as Arc<dyn Backend>
    });
    bridgekeys_store::lease_conformance_tests!(async {
        Arc::new(MemoryStore::new()) as Arc<dyn Backend>
    });
}

/// Every check but the lease checks: only one process can open a sled
/// store, so it keeps the trait's default claim (no stored lease).
mod sled {
    use std::sync::Arc;

    use bridgekeys_store::{Backend, SledStore, SledStoreConfig, StoreKey};

    /// A new store in a new temporary directory, which lives as long as
    /// the check.
    async fn fresh() -> (Arc<dyn Backend>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::create(SledStoreConfig::new(
            dir.path().join("store"),
            StoreKey::generate(),
        ))
        .unwrap();
        (Arc::new(store), dir)
    }

    bridgekeys_store::conformance_tests!(fresh());
}

/// Every check, leases included, each on a fresh database of the shared
/// test server (see `pg_server`).
#[cfg(feature = "postgres")]
mod pg {
    use std::sync::Arc;

    use bridgekeys_store::{Backend, PgStore, PgStoreConfig, StoreKey};

    use crate::pg_server::{ServerGuard, fresh_database};

    async fn fresh() -> (Arc<dyn Backend>, ServerGuard) {
        let (url, server) = fresh_database().await;
        let store = PgStore::create(PgStoreConfig::new(url, StoreKey::generate())).unwrap();
        (Arc::new(store), server)
    }

    bridgekeys_store::conformance_tests!(fresh());
    bridgekeys_store::lease_conformance_tests!(fresh());
}
