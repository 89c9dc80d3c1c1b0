//! The claim path's group commit.
//!
//! [`Store::append_keys`](crate::Store::append_keys) writes its keys with
//! one statement on a connection whose `synchronous_commit` is off: the
//! commit returns without waiting for the WAL flush, and the keys are
//! visible to every reader (any process) from then on, as the contract
//! asks. It then waits here: the [`Flusher`] runs, for every waiter queued
//! meanwhile, one small transaction with `synchronous_commit` on, whose
//! commit flushes the WAL up to its own commit record, and so every
//! earlier commit of the append connections too (the WAL is one sequence).
//! When it returns, all of those appends are durable: one flush for many
//! claims, and PostgreSQL's own group commit across processes on top.
//!
//! That argument holds within one life of the server: an append whose
//! asynchronous commit was lost in a crash of the database server must not
//! be answered by a flush that ran after the restart (on a new connection,
//! the pool replaces dead ones without a word). So the append statement
//! returns the server's start time (`pg_postmaster_start_time()`), the
//! waiter carries it, and the flush returns its own: a waiter whose append
//! ran in another life of the server than the flush is answered with an
//! error, never `Ok`.
//!
//! An append committed but not yet flushed is lost in a crash of the
//! database server: that is allowed ([`Store::append_keys`](crate::Store::append_keys)
//! is ordered, not atomic, until durable), because no caller acknowledged
//! its keys, and its key ids are never issued again (the counter row is
//! always committed synchronously).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::{Pg, Stats};
use crate::StoreError;

/// Someone waiting for everything committed so far to be durable: the
/// start time of the server their append committed on (`None`: no append
/// of their own, e.g. `sync`), and where to answer.
pub(crate) type Waiter = (Option<i64>, oneshot::Sender<Result<(), String>>);

/// SQL for the server's start time, in microseconds since the epoch: the
/// same value for the whole life of the server, another after a restart.
macro_rules! server_life {
    () => {
        "(extract(epoch from pg_postmaster_start_time()) * 1000000)::int8"
    };
}
pub(crate) use server_life;

/// The flusher task: one synchronous commit per batch of waiters.
pub(crate) struct Flusher {
    /// The pool of synchronous connections.
    pub(crate) pool: Pool,
    pub(crate) stats: Arc<Stats>,
    /// Appends committed so far (counted after their commit returned,
    /// before their waiter is queued).
    pub(crate) appended: Arc<AtomicU64>,
    /// This store's row in `bk_flush`.
    pub(crate) instance: i64,
    pub(crate) max_batch: usize,
    /// Bound of one flush (`PgStoreConfig::operation_timeout`).
    pub(crate) timeout: std::time::Duration,
}

impl Flusher {
    /// Answer waiters until the queue is closed and drained. While one
    /// flush runs the next batch gathers: that is the group commit.
    pub(crate) async fn run(self, mut queue: mpsc::UnboundedReceiver<Waiter>) {
        let mut flushed = 0;
        // The server life the last flush ran in.
        let mut flushed_in: Option<i64> = None;
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(waiter) => batch.push(waiter),
                    Err(_) => break,
                }
            }
            // Every append counted here committed before the flush starts.
            let appended = self.appended.load(Ordering::Acquire);
            let result = if appended == flushed {
                // Nothing asynchronous since the last flush: every other
                // write committed synchronously already.
                Ok(flushed_in)
            } else {
                let result = tokio::time::timeout(self.timeout, self.flush())
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Durability {
                            reason: format!("the database did not flush within {:?}", self.timeout),
                        })
                    });
                match &result {
                    Ok(life) => {
                        flushed = appended;
                        flushed_in = Some(*life);
                        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, waiters = batch.len(), "flushing appended one-time keys failed; those claims are not acknowledged");
                    }
                }
                result.map(Some)
            };
            for (appended_in, waiter) in batch {
                let answer = match &result {
                    Err(e) => Err(e.to_string()),
                    Ok(life) if appended_in.is_none() || appended_in == *life => Ok(()),
                    Ok(_) => Err(
                        "the database server restarted before the appended keys were \
                                  flushed: they may be lost, so the claim is not acknowledged"
                            .to_owned(),
                    ),
                };
                // The caller may have given up (request cancelled): fine.
                let _ = waiter.send(answer);
            }
        }
        // The store is closing: its row goes (a crashed process leaves a
        // row of two numbers behind, harmless).
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "DELETE FROM bk_flush WHERE instance = $1",
                    &[&self.instance],
                )
                .await;
        }
    }

    /// One transaction that writes WAL (this store's own counter row, so
    /// processes do not queue on one row lock) and commits synchronously.
    async fn flush(&self) -> Result<i64, StoreError> {
        let client = self.pool.get().await.pg()?;
        let statement = client
            .prepare_cached(concat!(
                "INSERT INTO bk_flush (instance, flushes) VALUES ($1, 1) \
                 ON CONFLICT (instance) DO UPDATE SET flushes = bk_flush.flushes + 1 RETURNING ",
                server_life!()
            ))
            .await
            .pg()?;
        let row = client.query_one(&statement, &[&self.instance]).await.pg()?;
        row.try_get(0).pg()
    }
}
