//! Group commit: one thread turns many applied writes into one `fsync`.
//!
//! Writers apply their transaction (in memory, fast), then register a waiter.
//! The flusher thread takes every waiter registered so far, flushes the
//! database once, and answers them all. A waiter registered during a flush
//! waits for the next one, so every answer covers its own write: a waiter is
//! only registered after its write was applied, and the flush that answers it
//! starts after it was taken.
//!
//! Under concurrent load the flusher gathers before flushing, so that one
//! `fsync` answers more writers: it waits until as many writers wait as the
//! last flush answered (a closed loop of N callers comes back N at a time),
//! or until a quiet spell passes with no writer joining, and never longer
//! than the gather time; a writer arriving after a pause longer than the
//! gather time is flushed at once. A fixed pause would hold a handful of callers for
//! the whole gather time on every round: four connections were no faster
//! than one.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::oneshot;

use crate::StoreError;

type FlushResult = Result<(), String>;

/// Counters of the group commit since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Writes that asked for durability.
    pub writes: u64,
    /// Flushes (`fsync`s) performed for them.
    pub flushes: u64,
}

/// A write that is applied but maybe not yet on disk.
///
/// Await [`Pending::durable`] before acknowledging anything that depends on
/// the write: that is the durability-before-acknowledgement rule.
///
/// Every backend returns one from each write. sled's comes from the group
/// commit; another backend makes its own: [`Pending::ready`] when the write
/// was durable before the call returned (a database transaction that
/// committed), [`Pending::from_future`] when durability comes later,
/// [`Pending::failed`] when it never will.
#[must_use = "a write is not durable until Pending::durable resolves"]
pub struct Pending(PendingInner);

/// A backend's own wait for durability.
type DurableFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

enum PendingInner {
    Waiting(oneshot::Receiver<FlushResult>),
    Ready,
    Later(DurableFuture),
    Failed(StoreError),
}

impl Pending {
    /// A write that was durable before it was returned.
    pub fn ready() -> Self {
        Self(PendingInner::Ready)
    }

    /// A write that is durable once `durable` resolves `Ok`.
    pub fn from_future(
        durable: impl Future<Output = Result<(), StoreError>> + Send + 'static,
    ) -> Self {
        Self(PendingInner::Later(Box::pin(durable)))
    }

    /// A write that was applied but cannot be made durable: awaiting it
    /// gives `error`.
    pub fn failed(error: StoreError) -> Self {
        Self(PendingInner::Failed(error))
    }

    /// Resolves once the write is on disk, or with the error that kept it off.
    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0 {
            PendingInner::Ready => Ok(()),
            PendingInner::Later(durable) => durable.await,
            PendingInner::Failed(e) => Err(e),
            PendingInner::Waiting(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(StoreError::Durability { reason }),
                Err(_) => Err(StoreError::Closed),
            },
        }
    }
}

struct State {
    waiters: Vec<oneshot::Sender<FlushResult>>,
    closed: bool,
    /// While the flusher gathers: the number of waiters it waits for (the
    /// writer that brings the count there wakes it). Zero otherwise.
    expected: usize,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    writes: AtomicU64,
    flushes: AtomicU64,
}

/// The flusher thread and its queue.
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    /// Start the flusher thread over `flush`, the engine's "make everything
    /// applied so far durable" operation.
    ///
    /// `gather` is the longest the flusher waits, after the first waiter
    /// arrives, for more writers to join the same flush, when the previous
    /// flush answered more than one writer (zero: always flush at once). It
    /// stops waiting sooner once as many writers wait as the previous flush
    /// answered, or once a window of a quarter of `gather` passes with none
    /// joining. After the flusher was idle for longer than `gather`, the
    /// next writer is flushed at once. A `gather` over an hour counts as an
    /// hour.
    pub(crate) fn start<F>(flush: F, gather: Duration) -> std::io::Result<Self>
    where
        F: Fn() -> FlushResult + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiters: Vec::new(),
                closed: false,
                expected: 0,
            }),
            wake: Condvar::new(),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("bridgekeys-store-flush".into())
            .spawn(move || flusher(&worker, flush, gather))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Register interest in the next flush. Call after the write was applied.
    pub(crate) fn pending(&self) -> Pending {
        let (tx, rx) = oneshot::channel();
        let mut state = self.shared.state.lock();
        if state.closed {
            return Pending::failed(StoreError::Closed);
        }
        state.waiters.push(tx);
        // The flusher sleeps on the condvar for the first waiter, or, while
        // it gathers, for the waiter that completes the expected count; the
        // others join without waking it.
        let wake = state.waiters.len() == 1 || state.waiters.len() == state.expected;
        self.shared.writes.fetch_add(1, Ordering::Relaxed);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Pending(PendingInner::Waiting(rx))
    }

    pub(crate) fn stats(&self) -> CommitStats {
        CommitStats {
            writes: self.shared.writes.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
        }
    }

    /// Flush what is pending, answer every waiter and stop the thread.
    pub(crate) fn close(&self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            // A flusher that panicked closed the queue and failed its
            // waiters as it unwound (`CloseOnExit`); nothing more to report.
            let _ = thread.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.close();
    }
}

/// Most waiters one flush answers (the rest wait for the next one).
const MAX_BATCH: usize = 1024;

/// The longest gather time the flusher uses: a longer configured one (a
/// mistake; it would hold every shared flush that long) counts as this,
/// which also keeps the flusher's clock arithmetic from overflowing.
const MAX_GATHER: Duration = Duration::from_secs(3600);

fn flusher<F: Fn() -> FlushResult>(shared: &Shared, flush: F, gather: Duration) {
    let gather = gather.min(MAX_GATHER);
    // If this thread panics (a flush that panics), close the queue and drop
    // every waiter's sender: they and later writes fail as closed instead
    // of waiting forever for a flusher that is gone.
    let _closing = CloseOnExit(shared);
    let mut last_batch = 0;
    loop {
        let batch = {
            let mut state = shared.state.lock();
            if state.waiters.is_empty() && !state.closed {
                let idle = Instant::now();
                while state.waiters.is_empty() && !state.closed {
                    shared.wake.wait(&mut state);
                }
                // Idle for longer than a gather: whatever load the last
                // flush saw is over, and this writer comes alone.
                if idle.elapsed() > gather {
                    last_batch = 0;
                }
            }
            // Gather only under concurrent load (the last flush answered
            // several writers, and writers kept coming since): after a
            // flush of one, or a pause, the next writer is answered at once.
            if !gather.is_zero() && last_batch > 1 && !state.closed {
                gather_writers(shared, &mut state, last_batch, gather);
            }
            if state.waiters.is_empty() {
                return; // closed and drained
            }
            let take = state.waiters.len().min(MAX_BATCH);
            state.waiters.drain(..take).collect::<Vec<_>>()
        };
        last_batch = batch.len();
        let result = flush();
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(reason) = &result {
            tracing::error!(%reason, waiters = batch.len(), "store flush failed; writes not acknowledged");
        }
        for waiter in batch {
            // The waiter may have given up (request cancelled): fine.
            let _ = waiter.send(result.clone());
        }
    }
}

/// Closes the queue when the flusher thread ends, by return or by panic.
struct CloseOnExit<'a>(&'a Shared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.closed = true;
        state.waiters.clear();
    }
}

/// Hold the flush, at most `gather`, for more writers to join it: until
/// `expected` writers wait (as many as the last flush answered), or until a
/// window of a quarter of `gather` passes in which no writer joined (so the
/// flush goes between a quarter and a half of `gather` after the last one
/// joined). The flusher sleeps through it; only the writer completing the
/// count wakes it.
fn gather_writers(
    shared: &Shared,
    state: &mut MutexGuard<'_, State>,
    expected: usize,
    gather: Duration,
) {
    let deadline = Instant::now() + gather;
    let quiet = gather / 4;
    state.expected = expected;
    loop {
        let seen = state.waiters.len();
        let now = Instant::now();
        if seen >= expected || state.closed || now >= deadline {
            break;
        }
        let until = (now + quiet).min(deadline);
        while state.waiters.len() < expected
            && !state.closed
            && !shared.wake.wait_until(state, until).timed_out()
        {}
        if state.waiters.len() == seen {
            break; // a quiet spell: nobody joined
        }
    }
    state.expected = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Issue 15, item 1: a backend outside this crate signals durability
    /// with the public constructors, and a write reported durable later
    /// waits for exactly its future.
    #[tokio::test]
    async fn a_backends_own_pending_writes_resolve_as_the_backend_says() {
        Pending::ready().durable().await.expect("durable at once");
        let (tx, rx) = oneshot::channel::<Result<(), StoreError>>();
        let later = tokio::spawn(
            Pending::from_future(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
                .durable(),
        );
        tokio::task::yield_now().await;
        assert!(
            !later.is_finished(),
            "not durable before the backend says so"
        );
        tx.send(Ok(())).expect("send");
        later.await.expect("join").expect("durable");
        let refused =
            Pending::from_future(async { Err(StoreError::engine("the database went away")) })
                .durable()
                .await;
        assert!(
            matches!(&refused, Err(StoreError::Engine(e)) if e.to_string() == "the database went away")
        );
        assert!(matches!(
            Pending::failed(StoreError::Closed).durable().await,
            Err(StoreError::Closed)
        ));
    }

    #[tokio::test]
    async fn every_waiter_is_answered_and_flushes_are_shared() {
        let gc = GroupCommit::start(
            || {
                std::thread::sleep(Duration::from_millis(2));
                Ok(())
            },
            Duration::ZERO,
        )
        .expect("thread");
        let pendings: Vec<_> = (0..200).map(|_| gc.pending()).collect();
        for p in pendings {
            p.durable().await.expect("durable");
        }
        let stats = gc.stats();
        assert_eq!(stats.writes, 200);
        assert!(
            stats.flushes < 200,
            "200 concurrent writes took {} flushes",
            stats.flushes
        );
    }

    #[tokio::test]
    async fn a_failed_flush_is_reported_to_its_waiters() {
        let fail = Arc::new(AtomicBool::new(true));
        let f = Arc::clone(&fail);
        let gc = GroupCommit::start(
            move || {
                if f.load(Ordering::SeqCst) {
                    Err("disk full".into())
                } else {
                    Ok(())
                }
            },
            Duration::from_micros(100),
        )
        .expect("thread");
        let err = gc.pending().durable().await.expect_err("must fail");
        assert!(matches!(err, StoreError::Durability { ref reason } if reason == "disk full"));
        fail.store(false, Ordering::SeqCst);
        gc.pending().durable().await.expect("next flush succeeds");
    }

    #[tokio::test]
    async fn a_lone_writer_is_not_held_back_by_the_gather_time() {
        // A gather time far longer than the test's patience: only a flusher
        // that skips gathering for a lone writer answers in time, every time.
        let gc = GroupCommit::start(|| Ok(()), Duration::from_secs(60)).expect("thread");
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(10), gc.pending().durable())
                .await
                .expect("a lone writer waited for the gather time")
                .expect("durable");
        }
    }

    /// A group commit whose first flush waits for the returned sender, so
    /// that a test can queue writers behind it: the flush after it then
    /// answers all of them in one batch.
    fn held_first_flush(gather: Duration) -> (GroupCommit, std::sync::mpsc::Sender<()>) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(Some(held));
        let gc = GroupCommit::start(
            move || {
                if let Some(held) = held.lock().take() {
                    let _ = held.recv();
                }
                Ok(())
            },
            gather,
        )
        .expect("thread");
        (gc, release)
    }

    /// Make the last flush of `gc` answer `n` writers at once (its first
    /// flush held while they queue), so that the next one gathers.
    async fn answer_a_batch(gc: &GroupCommit, release: &std::sync::mpsc::Sender<()>, n: usize) {
        let first = gc.pending();
        while gc.stats().flushes == 0 && gc.shared.state.lock().waiters.len() == 1 {
            // The flusher has not taken the first waiter yet.
            tokio::task::yield_now().await;
        }
        let queued: Vec<_> = (0..n).map(|_| gc.pending()).collect();
        release.send(()).expect("flusher alive");
        first.durable().await.expect("durable");
        for p in queued {
            p.durable().await.expect("durable");
        }
        assert_eq!(gc.stats().flushes, 2, "the queued writers shared one flush");
    }

    /// How long one writer on its own waits for its flush.
    async fn time_a_lone_writer(gc: &GroupCommit) -> Duration {
        let started = Instant::now();
        gc.pending().durable().await.expect("durable");
        started.elapsed()
    }

    /// Wait until the flusher of `gc` gathers for `expected` writers.
    async fn until_gathering(gc: &GroupCommit, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gc.shared.state.lock().expected != expected {
            assert!(Instant::now() < deadline, "the flusher never gathered");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_gathering_flush_goes_once_as_many_writers_wait_as_last_time() {
        // Four callers in a closed loop come back four at a time: the flush
        // goes when the fourth joins, not after the gather time (far longer
        // than the test's patience, and so is its quiet spell).
        let (gc, release) = held_first_flush(Duration::from_secs(120));
        answer_a_batch(&gc, &release, 4).await;
        // The first joins alone and the flusher starts gathering for four;
        // the other three join while it waits.
        let mut round = vec![gc.pending()];
        until_gathering(&gc, 4).await;
        round.extend((0..3).map(|_| gc.pending()));
        for p in round {
            tokio::time::timeout(Duration::from_secs(10), p.durable())
                .await
                .expect("the flush waited although every expected writer had joined")
                .expect("durable");
        }
        assert_eq!(gc.stats().flushes, 3, "the four writers shared one flush");
    }

    #[tokio::test]
    async fn a_gathering_flush_goes_after_a_quiet_spell_not_the_whole_gather_time() {
        // The last flush answered four; only one writer comes back. The
        // flusher waits a quarter of the gather time for others (2 s here),
        // then flushes: well before the gather time (8 s) is up.
        let (gc, release) = held_first_flush(Duration::from_secs(8));
        answer_a_batch(&gc, &release, 4).await;
        let waited = time_a_lone_writer(&gc).await;
        assert!(
            waited < Duration::from_secs(6),
            "a lone writer after a batch waited {waited:?}, the whole gather time"
        );
        assert!(
            waited >= Duration::from_millis(1500),
            "the flusher did not gather at all ({waited:?})"
        );
    }

    #[tokio::test]
    async fn a_gather_time_too_long_for_the_clock_does_not_stop_the_flusher() {
        // `commit_gather` is public configuration: a gather time that
        // overflows the clock must not panic the flusher (its writers
        // would then fail as closed).
        let (gc, release) = held_first_flush(Duration::MAX);
        answer_a_batch(&gc, &release, 2).await;
        let round: Vec<_> = (0..2).map(|_| gc.pending()).collect();
        for p in round {
            tokio::time::timeout(Duration::from_secs(10), p.durable())
                .await
                .expect("the flush never came")
                .expect("the flusher is still running");
        }
    }

    #[tokio::test]
    async fn a_writer_after_the_flusher_idled_is_flushed_at_once() {
        // A burst of four, then nothing for longer than the gather time
        // (2 s): the next writer comes alone and is not held for a quiet
        // window (a quarter of the gather time, 500 ms) first.
        let (gc, release) = held_first_flush(Duration::from_secs(2));
        answer_a_batch(&gc, &release, 4).await;
        // The idle time itself is what this test is about.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let waited = time_a_lone_writer(&gc).await;
        assert!(
            waited < Duration::from_millis(400),
            "a writer after an idle flusher waited {waited:?} for others"
        );
    }

    #[tokio::test]
    async fn closing_while_the_flusher_gathers_flushes_at_once() {
        // A store dropped while its flusher waits out a long gather: the
        // waiting writer is flushed and answered, and the close does not
        // wait for the gather time.
        let (gc, release) = held_first_flush(Duration::from_secs(120));
        answer_a_batch(&gc, &release, 2).await;
        let waiting = gc.pending();
        until_gathering(&gc, 2).await;
        let closed = tokio::task::spawn_blocking(move || gc.close());
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("close waited for the gather time")
            .expect("close");
        waiting.durable().await.expect("flushed before the close");
    }

    #[tokio::test]
    async fn writers_fail_as_closed_when_the_flusher_panicked() {
        let gc =
            GroupCommit::start(|| panic!("a flush that panics"), Duration::ZERO).expect("thread");
        let first = tokio::time::timeout(Duration::from_secs(10), gc.pending().durable())
            .await
            .expect("the first writer was never answered");
        assert!(matches!(first, Err(StoreError::Closed)), "{first:?}");
        // The flusher is gone: a later writer must not wait for it forever.
        let later = tokio::time::timeout(Duration::from_secs(10), gc.pending().durable())
            .await
            .expect("a writer after the panic waited forever");
        assert!(matches!(later, Err(StoreError::Closed)), "{later:?}");
    }

    #[tokio::test]
    async fn pending_after_close_fails_instead_of_hanging() {
        let gc = GroupCommit::start(|| Ok(()), Duration::ZERO).expect("thread");
        gc.close();
        assert!(matches!(
            gc.pending().durable().await,
            Err(StoreError::Closed)
        ));
    }
}
