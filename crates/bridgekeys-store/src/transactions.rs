//! Durable transaction dedup: which homeserver transactions a bridge has
//! already processed.
//!
//! The homeserver retries `PUT /_matrix/app/v1/transactions/{txnId}` until it
//! gets a 200, so the same transaction id arrives more than once, also after
//! a bridge restart. The listener records an id only after the
//! transaction's effects are done, and answers 200 only once that record is
//! durable ([`Pending::durable`]); a later arrival of the same id is then
//! acknowledged without being processed again. Keeping this in memory only is
//! a known field failure (duplicates after every restart): it lives here.
//!
//! Records are `t/<length-prefixed namespace><txn id>` keys with an empty
//! value: public data (a homeserver-chosen id), so nothing is sealed.

use crate::{Pending, SledStore, StoreError};

/// Which transactions were completed, durably.
///
/// `namespace` separates independent id spaces (for example two appservice
/// registrations sharing one store); transaction ids are only unique per
/// appservice.
pub trait TransactionLog: Send + Sync + 'static {
    /// Whether transaction `txn_id` of `namespace` was recorded as completed.
    fn transaction_completed(&self, namespace: &str, txn_id: &str) -> Result<bool, StoreError>;

    /// Record transaction `txn_id` of `namespace` as completed.
    ///
    /// The record is applied when this returns; await [`Pending::durable`]
    /// before acknowledging the transaction. Recording twice is harmless.
    fn record_transaction(&self, namespace: &str, txn_id: &str) -> Result<Pending, StoreError>;
}

fn txn_key(namespace: &str, txn_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 4 + namespace.len() + txn_id.len());
    k.extend_from_slice(b"t/");
    k.extend_from_slice(&(namespace.len() as u32).to_be_bytes());
    k.extend_from_slice(namespace.as_bytes());
    k.extend_from_slice(txn_id.as_bytes());
    k
}

impl TransactionLog for SledStore {
    fn transaction_completed(&self, namespace: &str, txn_id: &str) -> Result<bool, StoreError> {
        Ok(self.db.contains_key(txn_key(namespace, txn_id))?)
    }

    fn record_transaction(&self, namespace: &str, txn_id: &str) -> Result<Pending, StoreError> {
        self.db.insert(txn_key(namespace, txn_id), &[][..])?;
        Ok(self.commit.pending())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SledStoreConfig, StoreKey};

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open_or_create(SledStoreConfig::new(dir, StoreKey::new([7; 32]))).expect("open")
    }

    #[tokio::test]
    async fn a_recorded_transaction_survives_a_restart_and_namespaces_are_separate() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open(dir.path());
            assert!(!store.transaction_completed("as", "t1").expect("read"));
            store
                .record_transaction("as", "t1")
                .expect("record")
                .durable()
                .await
                .expect("durable");
        }
        let store = open(dir.path());
        assert!(store.transaction_completed("as", "t1").expect("read"));
        assert!(!store.transaction_completed("other", "t1").expect("read"));
        assert!(!store.transaction_completed("as", "t2").expect("read"));
    }
}
