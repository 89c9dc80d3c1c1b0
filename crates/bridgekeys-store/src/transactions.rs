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
//! Records are `t/<length-prefixed namespace><txn id>` keys whose value is
//! the time they were recorded (Unix milliseconds, 8 bytes big-endian;
//! records written before that have an empty value and count as recorded at
//! 0): public data (a homeserver-chosen id), so nothing is sealed. A record
//! only has to outlive the homeserver's retries of its transaction, so
//! [`TransactionLog::prune_transactions`] removes old ones and the log does
//! not grow without bound.

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

    /// Remove every record (all namespaces) recorded before `before` (Unix
    /// milliseconds); returns how many, and the write to wait for. Pick
    /// `before` well past the homeserver's retry horizon: a transaction
    /// retried after its record is gone is processed again.
    fn prune_transactions(&self, before: u64) -> Result<(usize, Pending), StoreError>;

    /// Claim the right to process transaction `txn_id` of `namespace` for
    /// `lease_ms` milliseconds, as `owner` (one id per running listener).
    ///
    /// This is what keeps a transaction from being processed twice when
    /// several bridge processes share one store: the homeserver retries a
    /// transaction that timed out, and the retry may land on another
    /// process while the first still works on it. Exactly one caller holds
    /// an unexpired lease at a time; claiming again as the same owner
    /// renews it. A lease ends with [`TransactionLog::record_transaction`]
    /// (completed), [`TransactionLog::release_transaction`] (failed, free
    /// for a retry) or by expiring (its owner died).
    ///
    /// The default suits a backend only one process can open (sled): the
    /// listener's own per-id lock already serialises duplicates there, so
    /// it reports [`TransactionClaim::Completed`] or
    /// [`TransactionClaim::Claimed`] and stores no lease. A backend that
    /// several processes share must implement it for real (the lease
    /// checks of the conformance suite, `testing::conformance::LEASE_CHECKS`
    /// with feature `testing`, say what that means).
    fn claim_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<TransactionClaim, StoreError> {
        let _ = (owner, lease_ms);
        Ok(if self.transaction_completed(namespace, txn_id)? {
            TransactionClaim::Completed
        } else {
            TransactionClaim::Claimed
        })
    }

    /// Give up `owner`'s lease on a transaction that was not completed (its
    /// processing failed), so a retry anywhere may claim it at once. A
    /// lease held by another owner is left alone. The default does nothing
    /// (see [`TransactionLog::claim_transaction`]).
    fn release_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        let _ = (namespace, txn_id, owner);
        Ok(())
    }
}

/// What [`TransactionLog::claim_transaction`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransactionClaim {
    /// The transaction was completed before: acknowledge, do not process.
    Completed,
    /// The caller now holds the lease: process it, then record it.
    Claimed,
    /// Another owner holds an unexpired lease: it is being processed
    /// elsewhere. Wait and ask again (it completes, or its lease expires).
    HeldElsewhere {
        /// When that lease expires, in Unix milliseconds.
        until_ms: u64,
    },
}

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
        self.db
            .insert(txn_key(namespace, txn_id), &unix_millis().to_be_bytes()[..])?;
        Ok(self.commit.pending())
    }

    fn prune_transactions(&self, before: u64) -> Result<(usize, Pending), StoreError> {
        let mut batch = sled::Batch::default();
        let mut pruned = 0;
        for entry in self.db.scan_prefix(b"t/") {
            let (key, value) = entry?;
            let recorded = <[u8; 8]>::try_from(value.as_ref()).map_or(0, u64::from_be_bytes);
            if recorded < before {
                batch.remove(key);
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.db.apply_batch(batch)?;
        }
        Ok((pruned, self.commit.pending()))
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

    #[tokio::test]
    async fn records_older_than_the_cutoff_are_pruned_durably_and_newer_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open(dir.path());
            let _applied = store.record_transaction("as", "old").expect("record");
            // A record written before timestamps: empty value, counts as 0.
            store
                .db
                .insert(txn_key("as", "legacy"), &[][..])
                .expect("insert");
            let cutoff = unix_millis();
            // The next record is strictly newer than the cutoff.
            while unix_millis() <= cutoff {
                std::thread::yield_now();
            }
            let _applied = store.record_transaction("other", "new").expect("record");
            let (none, _) = store.prune_transactions(0).expect("prune");
            assert_eq!(none, 0, "nothing is older than the epoch");
            let (pruned, pending) = store.prune_transactions(cutoff + 1).expect("prune");
            pending.durable().await.expect("durable");
            assert_eq!(pruned, 2);
        }
        let store = open(dir.path());
        assert!(!store.transaction_completed("as", "old").expect("read"));
        assert!(!store.transaction_completed("as", "legacy").expect("read"));
        assert!(store.transaction_completed("other", "new").expect("read"));
    }
}
