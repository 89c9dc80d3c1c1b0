//! [`TransactionLog`] with real leases, and [`PuppetRegistry`], for
//! [`PgStore`]. Everything here is public data: nothing is sealed.

use super::{Pg, PgStore, millis, ord, params, unord};
use crate::{
    DeviceKey, Pending, PuppetRegistry, StoreError, TransactionClaim, TransactionLog, unix_millis,
};

/// The database's clock, in Unix milliseconds: lease times are compared
/// against one clock whichever process claims.
const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// Longest lease honoured (about 35 years), so the expiry never overflows.
const MAX_LEASE_MS: u64 = 1 << 50;

impl TransactionLog for PgStore {
    fn transaction_completed(&self, namespace: &str, txn_id: &str) -> Result<bool, StoreError> {
        let rows = self.engine.query(
            "SELECT 1 FROM bk_transactions \
             WHERE namespace = $1 AND txn_id = $2 AND completed_at IS NOT NULL",
            params![namespace.to_owned(), txn_id.to_owned()],
        )?;
        Ok(!rows.is_empty())
    }

    /// Completes the transaction and ends any lease on it (whoever held it).
    fn record_transaction(&self, namespace: &str, txn_id: &str) -> Result<Pending, StoreError> {
        self.engine.execute(
            "INSERT INTO bk_transactions (namespace, txn_id, completed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (namespace, txn_id) DO UPDATE \
             SET completed_at = excluded.completed_at, lease_owner = NULL, lease_until = NULL",
            params![
                namespace.to_owned(),
                txn_id.to_owned(),
                millis(unix_millis())
            ],
        )?;
        Ok(Pending::ready())
    }

    /// Also removes leases that expired before `before` (their owners
    /// died long ago); only completion records are counted. Leases are
    /// timed by the database's clock and `before` by the caller's: a lease
    /// is removed only once it expired by both, so a caller whose clock runs
    /// ahead cannot free a lease that is still held.
    fn prune_transactions(&self, before: u64) -> Result<(usize, Pending), StoreError> {
        let rows = self.engine.query(
            // The database's clock as `DB_NOW` reads it.
            "WITH gone AS (DELETE FROM bk_transactions \
             WHERE completed_at < $1 OR (completed_at IS NULL AND lease_until < \
             LEAST($1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)) \
             RETURNING completed_at) \
             SELECT count(*) FILTER (WHERE completed_at IS NOT NULL) FROM gone",
            params![millis(before)],
        )?;
        self.engine.committed();
        let pruned: i64 = rows
            .first()
            .map(|row| row.try_get(0))
            .transpose()
            .pg()?
            .unwrap_or(0);
        Ok((usize::try_from(pruned).unwrap_or(0), Pending::ready()))
    }

    /// One upsert takes the lease where the row is new, not completed, and
    /// free, expired or already the caller's; where it is not, the row is
    /// locked all the same, so what it holds is read in the same
    /// transaction without a race.
    fn claim_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<TransactionClaim, StoreError> {
        let namespace = namespace.to_owned();
        let txn_id = txn_id.to_owned();
        let owner = owner.to_owned();
        let lease = millis(lease_ms.min(MAX_LEASE_MS));
        let claim = self.engine.call(move |pool| async move {
            let mut client = pool.get().await.pg()?;
            let tx = client.transaction().await.pg()?;
            let claimed = tx
                .query(
                    &format!(
                        "INSERT INTO bk_transactions AS t (namespace, txn_id, lease_owner, lease_until) \
                         VALUES ($1, $2, $3, {DB_NOW} + $4) \
                         ON CONFLICT (namespace, txn_id) DO UPDATE \
                         SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until \
                         WHERE t.completed_at IS NULL AND (t.lease_owner IS NULL \
                         OR t.lease_owner = excluded.lease_owner OR t.lease_until <= {DB_NOW}) \
                         RETURNING 1"
                    ),
                    &[&namespace, &txn_id, &owner, &lease],
                )
                .await
                .pg()?;
            let claim = if claimed.is_empty() {
                let row = tx
                    .query_one(
                        "SELECT completed_at IS NOT NULL, COALESCE(lease_until, 0) \
                         FROM bk_transactions WHERE namespace = $1 AND txn_id = $2",
                        &[&namespace, &txn_id],
                    )
                    .await
                    .pg()?;
                if row.try_get::<_, bool>(0).pg()? {
                    TransactionClaim::Completed
                } else {
                    let until: i64 = row.try_get(1).pg()?;
                    TransactionClaim::HeldElsewhere {
                        until_ms: u64::try_from(until).unwrap_or(0),
                    }
                }
            } else {
                TransactionClaim::Claimed
            };
            tx.commit().await.pg()?;
            Ok(claim)
        })?;
        if claim == TransactionClaim::Claimed {
            self.engine.committed();
        }
        Ok(claim)
    }

    fn release_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.engine.execute(
            "DELETE FROM bk_transactions WHERE namespace = $1 AND txn_id = $2 \
             AND lease_owner = $3 AND completed_at IS NULL",
            params![namespace.to_owned(), txn_id.to_owned(), owner.to_owned()],
        )?;
        Ok(())
    }
}

fn device_of(raw: &[u8]) -> Result<DeviceKey, StoreError> {
    DeviceKey::from_bytes(raw).ok_or_else(|| StoreError::Corrupt {
        what: "puppet registry entry".into(),
    })
}

/// The schedule is a column of the puppet's row (indexed where set), not a
/// separate index as in sled: an entry can never outlive its device, and
/// `found_at` has nothing left to clean.
impl PuppetRegistry for PgStore {
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        self.engine.execute(
            "INSERT INTO bk_puppets (device) VALUES ($1) ON CONFLICT (device) DO NOTHING",
            params![device.as_bytes().to_vec()],
        )?;
        Ok(Pending::ready())
    }

    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        let rows = self.engine.query(
            "SELECT 1 FROM bk_puppets WHERE device = $1",
            params![device.as_bytes().to_vec()],
        )?;
        Ok(!rows.is_empty())
    }

    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError> {
        let rows = self
            .engine
            .query("SELECT device FROM bk_puppets ORDER BY device", Vec::new())?;
        rows.iter()
            .map(|row| device_of(&row.try_get::<_, Vec<u8>>(0).pg()?))
            .collect()
    }

    /// Like sled's, records the device too if it was not recorded.
    fn record_cross_signed(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        self.engine.execute(
            "INSERT INTO bk_puppets (device, cross_signed) VALUES ($1, TRUE) \
             ON CONFLICT (device) DO UPDATE SET cross_signed = TRUE",
            params![device.as_bytes().to_vec()],
        )?;
        Ok(Pending::ready())
    }

    fn is_cross_signed(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        let rows = self.engine.query(
            "SELECT 1 FROM bk_puppets WHERE device = $1 AND cross_signed",
            params![device.as_bytes().to_vec()],
        )?;
        Ok(!rows.is_empty())
    }

    fn schedule_rotation(
        &self,
        device: &DeviceKey,
        due_ms: u64,
        _found_at: Option<u64>,
    ) -> Result<Pending, StoreError> {
        self.engine.execute(
            // Not rewritten when already so (a full pass over idle
            // devices would make a new row version of each).
            "UPDATE bk_puppets SET due_ms = $2 WHERE device = $1 AND due_ms IS DISTINCT FROM $2",
            params![device.as_bytes().to_vec(), ord(due_ms)],
        )?;
        Ok(Pending::ready())
    }

    fn due_rotations(
        &self,
        now_ms: u64,
        after: Option<&(DeviceKey, u64)>,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        // No cursor: strictly after (0, empty device), i.e. every entry.
        let (after_due, after_device) = match after {
            Some((device, due)) => (ord(*due), device.as_bytes().to_vec()),
            None => (ord(0), Vec::new()),
        };
        let rows = self.engine.query(
            "SELECT device, due_ms FROM bk_puppets \
             WHERE due_ms IS NOT NULL AND due_ms <= $1 AND (due_ms, device) > ($2, $3) \
             ORDER BY due_ms, device LIMIT $4",
            params![
                ord(now_ms),
                after_due,
                after_device,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
        )?;
        rows.iter()
            .map(|row| {
                Ok((
                    device_of(&row.try_get::<_, Vec<u8>>(0).pg()?)?,
                    unord(row.try_get(1).pg()?),
                ))
            })
            .collect()
    }
}
