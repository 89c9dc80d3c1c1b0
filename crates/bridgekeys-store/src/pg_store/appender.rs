//! The claim path's group commit.
//!
//! A claim must not wait for a database round trip while it holds a tokio
//! worker: the [`Store`](crate::Store) trait is synchronous, so a claim
//! that blocked on its own `INSERT` would keep as many claims in flight as
//! the caller has worker threads (two, on a two-core machine), and the
//! database would spend a commit on each.
//!
//! So [`Store::append_keys`](crate::Store::append_keys) does not talk to
//! the database at all. It records the append in this process's
//! *overlay* (what is appended but not yet committed, per device), queues
//! it for the [`Writer`] and returns at once. The writer takes every
//! append queued meanwhile (up to [`PgStoreConfig::max_append_batch`](super::PgStoreConfig::max_append_batch))
//! and applies the whole batch in one statement, committed synchronously:
//! when it returns the batch is durable, and every append of it is
//! answered. While one batch commits the next one gathers: one commit for
//! many claims.
//!
//! # What a reader sees
//!
//! * In this process, an append is visible when `append_keys` returns:
//!   the key reads (`one_time_key`, `oldest_one_time_keys`,
//!   `count_one_time_keys`) look at the overlay first, then at the
//!   database. That order matters: an append leaves the overlay only after
//!   its batch committed, so a reader that misses it in the overlay finds
//!   it in the database.
//! * In other processes, an append is visible once it is durable. That is
//!   enough: a key is only ever used by a peer after its claim was
//!   answered, which is after its append is durable.
//! * Writes that touch the same device's keys in the database
//!   ([`Store::write_device`](crate::Store::write_device)) first wait until
//!   that device's queued appends are committed, so a key consumed right
//!   after its append cannot be inserted again by the batch behind it.
//!
//! # Order and failure
//!
//! Batches run one at a time, in queue order. Within a batch the net
//! effect is applied: a key both added and evicted in the batch is never
//! inserted (ids never repeat, so nothing can re-add it). A batch is one
//! statement: a failure (the database gone, the operation timeout) rolls
//! it back whole, every append in it is answered with
//! [`StoreError::Durability`] and leaves the overlay, and no claim of it
//! is answered. A key id of a failed append is never issued again.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use deadpool_postgres::Pool;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{mpsc, oneshot};

use super::{Pg, Stats};
use crate::{Pending, StoreError};

/// One sealed key as it will be inserted: `(order-preserving id, public
/// key, sealed secret)`.
pub(crate) type SealedKey = (i64, [u8; 32], Vec<u8>);

/// A device's keys appended but not yet committed.
struct Entry {
    ticket: u64,
    added: Arc<[SealedKey]>,
    evicted: Arc<[i64]>,
}

/// What is appended but not committed, per device (in ticket order), and
/// the queue to the writer (`None` once the store closes).
struct State {
    queue: Option<mpsc::UnboundedSender<Op>>,
    next_ticket: u64,
    devices: HashMap<Vec<u8>, Vec<Entry>>,
}

/// One queued append (or, with no device, a barrier for `sync`).
pub(crate) struct Op {
    ticket: u64,
    device: Option<Vec<u8>>,
    // Shared with the overlay's entry: the claim path copies no key.
    added: Arc<[SealedKey]>,
    evicted: Arc<[i64]>,
    answer: oneshot::Sender<Result<(), String>>,
}

/// A device's uncommitted keys as a reader needs them.
#[derive(Default)]
pub(crate) struct Overlay {
    /// Added keys not evicted since, oldest first.
    pub(crate) added: Vec<SealedKey>,
    /// Keys whose eviction is not committed yet.
    pub(crate) evicted: HashSet<i64>,
}

/// The overlay, the queue, and how far the writer got.
pub(crate) struct Appender {
    state: Mutex<State>,
    /// Every ticket up to this one is finished (committed or failed).
    done: Mutex<u64>,
    finished: Condvar,
    stats: Arc<Stats>,
    /// How long `settle` waits for the writer before giving up.
    timeout: Duration,
}

impl Appender {
    /// An appender and the receiving end its [`Writer`] runs on.
    pub(crate) fn new(
        stats: Arc<Stats>,
        timeout: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Op>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let appender = Arc::new(Self {
            state: Mutex::new(State {
                queue: Some(tx),
                next_ticket: 1,
                devices: HashMap::new(),
            }),
            done: Mutex::new(0),
            finished: Condvar::new(),
            stats,
            timeout,
        });
        (appender, rx)
    }

    /// Queue an append: visible to this process's readers at return,
    /// durable when the returned [`Pending`] resolves.
    pub(crate) fn append(
        &self,
        device: &[u8],
        added: Vec<SealedKey>,
        evicted: Vec<i64>,
    ) -> Pending {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let (answer, reply) = oneshot::channel();
        let (added, evicted): (Arc<[SealedKey]>, Arc<[i64]>) = (added.into(), evicted.into());
        {
            // Tickets are handed out and queued under one lock: queue
            // order is ticket order, which `finish` relies on.
            let mut state = self.state.lock();
            let ticket = state.next_ticket;
            let op = Op {
                ticket,
                device: Some(device.to_vec()),
                added: Arc::clone(&added),
                evicted: Arc::clone(&evicted),
                answer,
            };
            let Some(queue) = state.queue.as_ref() else {
                return Pending::failed(StoreError::Closed);
            };
            if queue.send(op).is_err() {
                return Pending::failed(StoreError::Closed);
            }
            state.next_ticket += 1;
            state
                .devices
                .entry(device.to_vec())
                .or_default()
                .push(Entry {
                    ticket,
                    added,
                    evicted,
                });
        }
        answered(reply)
    }

    /// Resolves once every append queued before this call is finished:
    /// durable, or failed (and its own [`Pending`] says so).
    pub(crate) fn barrier(&self) -> Pending {
        let (answer, reply) = oneshot::channel();
        let mut state = self.state.lock();
        let ticket = state.next_ticket;
        let op = Op {
            ticket,
            device: None,
            added: Arc::new([]),
            evicted: Arc::new([]),
            answer,
        };
        match state.queue.as_ref().map(|q| q.send(op)) {
            Some(Ok(())) => {
                state.next_ticket += 1;
                drop(state);
                answered(reply)
            }
            _ => Pending::failed(StoreError::Closed),
        }
    }

    /// The uncommitted keys of a device (empty for most devices).
    pub(crate) fn overlay(&self, device: &[u8]) -> Overlay {
        let state = self.state.lock();
        let mut overlay = Overlay::default();
        if let Some(entries) = state.devices.get(device) {
            for entry in entries {
                overlay.evicted.extend(entry.evicted.iter().copied());
                overlay.added.extend(entry.added.iter().cloned());
            }
            let evicted = &overlay.evicted;
            overlay.added.retain(|(id, _, _)| !evicted.contains(id));
        }
        overlay
    }

    /// Block until this device's queued appends are finished, so a write
    /// that changes its keys in the database is ordered after them.
    pub(crate) fn settle(&self, device: &[u8]) -> Result<(), StoreError> {
        let last = {
            let state = self.state.lock();
            match state.devices.get(device).and_then(|e| e.last()) {
                Some(entry) => entry.ticket,
                None => return Ok(()),
            }
        };
        let mut done = self.done.lock();
        // The bound runs from the writer's last progress, not from the
        // start: a backlog of several batches is no reason to give up.
        let mut seen = *done;
        let mut deadline = std::time::Instant::now() + self.timeout;
        while *done < last {
            let timed_out = self.finished.wait_until(&mut done, deadline).timed_out();
            if *done > seen {
                seen = *done;
                deadline = std::time::Instant::now() + self.timeout;
            } else if timed_out {
                return Err(StoreError::engine(format!(
                    "the appended one-time keys of this device were not committed within {:?}",
                    self.timeout
                )));
            }
        }
        Ok(())
    }

    /// Stop taking appends: the writer finishes what is queued, then ends.
    pub(crate) fn close(&self) {
        self.state.lock().queue.take();
    }

    /// A batch is finished: its entries leave the overlay (after the
    /// commit, see the module docs), then waiters on `settle` wake.
    fn finish(&self, batch: &[Op]) {
        let Some(last) = batch.last().map(|op| op.ticket) else {
            return;
        };
        {
            let mut state = self.state.lock();
            for op in batch {
                let Some(device) = &op.device else { continue };
                if let Some(entries) = state.devices.get_mut(device) {
                    entries.retain(|e| e.ticket != op.ticket);
                    if entries.is_empty() {
                        state.devices.remove(device);
                    }
                }
            }
        }
        *self.done.lock() = last;
        self.finished.notify_all();
    }
}

/// A [`Pending`] for the writer's answer.
fn answered(reply: oneshot::Receiver<Result<(), String>>) -> Pending {
    Pending::from_future(async move {
        match reply.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StoreError::Durability { reason }),
            Err(_) => Err(StoreError::Closed),
        }
    })
}

/// The writer task: one synchronous commit per batch of queued appends.
pub(crate) struct Writer {
    /// The writer's own connections (synchronous commits, and the
    /// operation timeout as `statement_timeout`), so a busy pool never
    /// holds the claims up.
    pub(crate) pool: Pool,
    pub(crate) appender: Arc<Appender>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) max_batch: usize,
    /// Bound of one batch (`PgStoreConfig::operation_timeout`).
    pub(crate) timeout: Duration,
}

/// How much longer than the operation timeout the writer waits for a
/// statement the server should have cancelled already.
const LAST_RESORT: Duration = Duration::from_secs(5);

/// The batch's statement: the net inserts, then the net evictions.
const APPLY: &str = "WITH added AS (\
     INSERT INTO bk_one_time_keys (device, key_id, public_key, sealed) \
     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[], $4::bytea[]) \
     ON CONFLICT (device, key_id) DO UPDATE \
     SET public_key = excluded.public_key, sealed = excluded.sealed RETURNING 1), \
     evicted AS (\
     DELETE FROM bk_one_time_keys k USING unnest($5::bytea[], $6::int8[]) AS e(device, key_id) \
     WHERE k.device = e.device AND k.key_id = e.key_id RETURNING 1) \
     SELECT (SELECT count(*) FROM added), (SELECT count(*) FROM evicted)";

/// The batch's statement when it evicts nothing (most batches): the
/// inserts alone, which the server plans and runs for less.
const INSERT: &str = "INSERT INTO bk_one_time_keys (device, key_id, public_key, sealed) \
     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[], $4::bytea[]) \
     ON CONFLICT (device, key_id) DO UPDATE \
     SET public_key = excluded.public_key, sealed = excluded.sealed";

/// A batch as column arrays: insert devices, ids, publics, sealed; evict
/// devices, ids.
type Columns = (
    Vec<Vec<u8>>,
    Vec<i64>,
    Vec<Vec<u8>>,
    Vec<Vec<u8>>,
    Vec<Vec<u8>>,
    Vec<i64>,
);

impl Writer {
    /// Apply batches until the queue is closed and drained.
    pub(crate) async fn run(self, mut queue: mpsc::UnboundedReceiver<Op>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let columns = net_effect(&batch);
            let result = if columns.1.is_empty() && columns.5.is_empty() {
                Ok(())
            } else {
                let outcome = self.apply(columns).await;
                if outcome.is_ok() {
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                } else if let Err(e) = &outcome {
                    tracing::error!(error = %e, appends = batch.len(), "committing appended one-time keys failed; those claims are not acknowledged");
                }
                outcome
            };
            self.appender.finish(&batch);
            for op in batch {
                // The caller may have given up (request cancelled): fine.
                let _ = op
                    .answer
                    .send(result.as_ref().map_err(|e| e.to_string()).copied());
            }
        }
    }

    /// One statement, committed synchronously: durable when it returns.
    async fn apply(&self, columns: Columns) -> Result<(), StoreError> {
        let (devices, ids, publics, sealed, evict_devices, evict_ids) = columns;
        let client = self.pool.get().await.pg()?;
        let statement = async {
            if evict_ids.is_empty() {
                let statement = client.prepare_cached(INSERT).await?;
                client
                    .execute(&statement, &[&devices, &ids, &publics, &sealed])
                    .await
            } else {
                let statement = client.prepare_cached(APPLY).await?;
                client
                    .execute(
                        &statement,
                        &[
                            &devices,
                            &ids,
                            &publics,
                            &sealed,
                            &evict_devices,
                            &evict_ids,
                        ],
                    )
                    .await
            }
        };
        // The server cancels the statement itself after the operation
        // timeout (`statement_timeout` on the writer's connections); this
        // bound is the last resort for a server that stopped answering.
        let result = match tokio::time::timeout(self.timeout + LAST_RESORT, statement).await {
            Ok(result) => result.map(|_| ()).pg(),
            Err(_) => Err(StoreError::engine(format!(
                "the database did not commit within {:?}",
                self.timeout + LAST_RESORT
            ))),
        };
        if result.is_err() {
            // Not back into the pool: a connection whose statement failed
            // or hung may be broken, and closing it ends anything still
            // running there.
            drop(deadpool_postgres::Object::take(client));
        }
        result
    }
}

/// The net effect of a batch: every key added and not evicted within the
/// batch (the last of a repeated id winning), and every eviction.
fn net_effect(batch: &[Op]) -> Columns {
    // Sorted: two processes evicting the same keys lock their rows in the
    // same order, so their batches cannot deadlock each other.
    let mut evicted: BTreeSet<(&[u8], i64)> = BTreeSet::new();
    for op in batch {
        if let Some(device) = &op.device {
            evicted.extend(op.evicted.iter().map(|id| (device.as_slice(), *id)));
        }
    }
    let mut at: HashMap<(&[u8], i64), usize> = HashMap::new();
    let mut columns: Columns = Default::default();
    for op in batch {
        let Some(device) = &op.device else { continue };
        for (id, public, sealed) in op.added.iter() {
            if evicted.contains(&(device.as_slice(), *id)) {
                continue;
            }
            match at.get(&(device.as_slice(), *id)) {
                Some(&i) => {
                    columns.2[i] = public.to_vec();
                    columns.3[i] = sealed.clone();
                }
                None => {
                    at.insert((device.as_slice(), *id), columns.0.len());
                    columns.0.push(device.clone());
                    columns.1.push(*id);
                    columns.2.push(public.to_vec());
                    columns.3.push(sealed.clone());
                }
            }
        }
    }
    for (device, id) in evicted {
        columns.4.push(device.to_vec());
        columns.5.push(id);
    }
    columns
}
