//! The claim path's group commit: queued key appends written many claims to
//! one transaction, and the overlay that shows them to this process's
//! readers until that transaction committed.
//!
//! Order is what makes the overlay safe: a job gets its sequence number and
//! its overlay entries, and is queued, under one lock, so the writer sees
//! jobs in sequence order. After a batch's transaction ended (committed or
//! not) the writer drops the overlay entries up to the batch's last
//! sequence number, and only then answers the batch's callers. A reader
//! looks at the overlay *before* the database: a key that left the overlay
//! is already committed (or failed), so it is never missed; a key seen in
//! both is counted once (by id).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::{Pg, Stats};
use crate::StoreError;

/// One `append_keys` (or, empty, a `sync` barrier) waiting for the writer.
pub(crate) struct AppendJob {
    pub(crate) seq: u64,
    pub(crate) device: Vec<u8>,
    /// `(key id (order-preserving), public key, sealed private key)`.
    pub(crate) add: Vec<(i64, Vec<u8>, Vec<u8>)>,
    /// Key ids (order-preserving) to evict.
    pub(crate) evict: Vec<i64>,
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

/// A key queued but maybe not committed yet.
pub(crate) struct QueuedKey {
    pub(crate) public: [u8; 32],
    pub(crate) sealed: Vec<u8>,
    seq: u64,
}

/// Queued changes of one device.
#[derive(Default)]
pub(crate) struct DeviceOverlay {
    pub(crate) added: BTreeMap<u64, QueuedKey>,
    pub(crate) evicted: HashMap<u64, u64>,
}

/// What this process queued and has not seen committed yet, by device.
#[derive(Default)]
pub(crate) struct Overlay {
    next_seq: u64,
    devices: HashMap<Vec<u8>, DeviceOverlay>,
}

/// A reader's snapshot of one device's queued changes.
pub(crate) struct View {
    /// Queued keys not queued for eviction: `(key id, public, sealed)`.
    pub(crate) live: Vec<(u64, [u8; 32], Vec<u8>)>,
    /// Every key id the overlay speaks for (queued or evicted): the
    /// database's row of such an id is ignored.
    pub(crate) masked: HashSet<u64>,
}

impl Overlay {
    /// Take the next sequence number and record a job's changes.
    pub(crate) fn record(
        &mut self,
        device: &[u8],
        add: impl IntoIterator<Item = (u64, [u8; 32], Vec<u8>)>,
        evict: impl IntoIterator<Item = u64>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut add = add.into_iter().peekable();
        let mut evict = evict.into_iter().peekable();
        if add.peek().is_none() && evict.peek().is_none() {
            return seq;
        }
        let entry = self.devices.entry(device.to_vec()).or_default();
        for (id, public, sealed) in add {
            entry.added.insert(
                id,
                QueuedKey {
                    public,
                    sealed,
                    seq,
                },
            );
        }
        for id in evict {
            entry.evicted.insert(id, seq);
        }
        seq
    }

    /// Forget every change of jobs up to `seq` (their transaction ended).
    pub(crate) fn settle(&mut self, seq: u64) {
        self.devices.retain(|_, d| {
            d.added.retain(|_, k| k.seq > seq);
            d.evicted.retain(|_, s| *s > seq);
            !d.added.is_empty() || !d.evicted.is_empty()
        });
    }

    /// Forget the changes of one job that never reached the writer.
    pub(crate) fn forget(&mut self, seq: u64) {
        self.devices.retain(|_, d| {
            d.added.retain(|_, k| k.seq != seq);
            d.evicted.retain(|_, s| *s != seq);
            !d.added.is_empty() || !d.evicted.is_empty()
        });
    }

    pub(crate) fn view(&self, device: &[u8]) -> View {
        let Some(d) = self.devices.get(device) else {
            return View {
                live: Vec::new(),
                masked: HashSet::new(),
            };
        };
        let live = d
            .added
            .iter()
            .filter(|(id, _)| !d.evicted.contains_key(id))
            .map(|(id, k)| (*id, k.public, k.sealed.clone()))
            .collect();
        let masked = d.added.keys().chain(d.evicted.keys()).copied().collect();
        View { live, masked }
    }
}

/// The writer task: one transaction per batch of queued jobs.
pub(crate) struct Writer {
    pub(crate) pool: Pool,
    pub(crate) overlay: Arc<parking_lot::Mutex<super::Overlay>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) max_batch: usize,
}

impl Writer {
    /// Write batches until the queue is closed and drained. While one
    /// batch commits, the next one gathers: that is the group commit.
    pub(crate) async fn run(self, mut queue: mpsc::UnboundedReceiver<AppendJob>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let result = self.write(&batch).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, claims = batch.len(), "writing queued one-time keys failed; those claims are not acknowledged");
            } else {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(last) = batch.last() {
                self.overlay.lock().settle(last.seq);
            }
            let answer = result.map_err(|e| e.to_string());
            for job in batch {
                // The caller may have given up (request cancelled): fine.
                let _ = job.done.send(answer.clone());
            }
        }
    }

    /// Every job's inserts, then every job's evictions, in one transaction.
    /// Inserts first is the jobs' own order for any key both added and
    /// evicted in the batch (ids are never reused, so no eviction precedes
    /// an insert of the same id).
    async fn write(&self, batch: &[AppendJob]) -> Result<(), StoreError> {
        let mut devices = Vec::new();
        let mut ids = Vec::new();
        let mut publics = Vec::new();
        let mut sealed = Vec::new();
        let mut evict_devices = Vec::new();
        let mut evict_ids = Vec::new();
        for job in batch {
            for (id, public, value) in &job.add {
                devices.push(job.device.as_slice());
                ids.push(*id);
                publics.push(public.as_slice());
                sealed.push(value.as_slice());
            }
            for id in &job.evict {
                evict_devices.push(job.device.as_slice());
                evict_ids.push(*id);
            }
        }
        if devices.is_empty() && evict_devices.is_empty() {
            // Only sync barriers: everything before them has committed.
            return Ok(());
        }
        let mut client = self.pool.get().await.pg()?;
        let tx = client.transaction().await.pg()?;
        if !devices.is_empty() {
            let insert = tx
                .prepare_cached(
                    "INSERT INTO bk_one_time_keys (device, key_id, public_key, sealed) \
                     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[], $4::bytea[]) \
                     ON CONFLICT (device, key_id) DO UPDATE \
                     SET public_key = excluded.public_key, sealed = excluded.sealed",
                )
                .await
                .pg()?;
            tx.execute(&insert, &[&devices, &ids, &publics, &sealed])
                .await
                .pg()?;
        }
        if !evict_devices.is_empty() {
            let evict = tx
                .prepare_cached(
                    "DELETE FROM bk_one_time_keys WHERE (device, key_id) IN \
                     (SELECT * FROM unnest($1::bytea[], $2::int8[]))",
                )
                .await
                .pg()?;
            tx.execute(&evict, &[&evict_devices, &evict_ids])
                .await
                .pg()?;
        }
        tx.commit().await.pg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_shows_queued_keys_until_their_batch_settles() {
        let mut overlay = Overlay::default();
        let a = overlay.record(b"dev", [(5, [5; 32], vec![5])], []);
        let b = overlay.record(b"dev", [(6, [6; 32], vec![6])], [5]);
        let view = overlay.view(b"dev");
        assert_eq!(view.live.len(), 1, "key 5 is queued for eviction");
        assert_eq!(view.live[0].0, 6);
        assert_eq!(view.masked, HashSet::from([5, 6]));
        overlay.settle(a);
        let view = overlay.view(b"dev");
        assert_eq!(view.masked, HashSet::from([5, 6]), "b is still queued");
        overlay.settle(b);
        assert!(overlay.view(b"dev").masked.is_empty());
        assert!(overlay.devices.is_empty(), "settled devices are dropped");
        let c = overlay.record(b"other", [(7, [7; 32], vec![7])], []);
        overlay.forget(c);
        assert!(overlay.devices.is_empty());
    }
}
