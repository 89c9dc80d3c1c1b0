//! Progress lines on stderr for the long scenarios (provisioning a million
//! devices takes minutes): `scale: provisioned 230000/1000000 devices (23%,
//! 41 s)`, at most one line per [`INTERVAL`], and always the final one.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// The shortest time between two progress lines (the final line excepted).
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Counts work done towards a total and prints rate-limited progress lines.
/// Cloning shares the count.
#[derive(Clone, Debug)]
pub struct Progress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// What is counted, before the numbers ("scale: provisioned").
    what: String,
    /// The unit after the numbers ("devices").
    unit: String,
    total: usize,
    done: AtomicUsize,
    started: Instant,
    /// When the last line was printed.
    last: Mutex<Option<Instant>>,
}

impl Progress {
    /// Start counting `total` `unit`s of `what`.
    pub fn new(what: impl Into<String>, unit: impl Into<String>, total: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                what: what.into(),
                unit: unit.into(),
                total,
                done: AtomicUsize::new(0),
                started: Instant::now(),
                last: Mutex::new(None),
            }),
        }
    }

    /// Count `n` more done; print a line if the last one is older than
    /// [`INTERVAL`].
    pub fn add(&self, n: usize) {
        let done = self.inner.done.fetch_add(n, Ordering::Relaxed) + n;
        let now = Instant::now();
        let Ok(mut last) = self.inner.last.lock() else {
            return;
        };
        if due(*last, self.inner.started, now, INTERVAL) {
            *last = Some(now);
            drop(last);
            eprintln!("{}", self.line(done, now));
        }
    }

    /// Print the final line (whatever the time since the last one).
    pub fn finish(&self) {
        let done = self.inner.done.load(Ordering::Relaxed);
        eprintln!("{}", self.line(done, Instant::now()));
    }

    /// Units counted so far.
    pub fn done(&self) -> usize {
        self.inner.done.load(Ordering::Relaxed)
    }

    fn line(&self, done: usize, now: Instant) -> String {
        line(
            &self.inner.what,
            &self.inner.unit,
            done,
            self.inner.total,
            now.saturating_duration_since(self.inner.started),
        )
    }
}

/// Whether a line is due at `now`: the first one once `interval` has passed
/// since `started`, later ones `interval` after the previous line.
pub fn due(last: Option<Instant>, started: Instant, now: Instant, interval: Duration) -> bool {
    now.saturating_duration_since(last.unwrap_or(started)) >= interval
}

/// `"{what} {done}/{total} {unit} ({percent}%, {seconds} s)"`.
pub fn line(what: &str, unit: &str, done: usize, total: usize, elapsed: Duration) -> String {
    let percent = if total == 0 {
        100
    } else {
        (done.min(total) as u128 * 100 / total as u128) as usize
    };
    format!(
        "{what} {done}/{total} {unit} ({percent}%, {:.0} s)",
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_count_total_unit_percent_and_seconds() {
        assert_eq!(
            line(
                "scale: provisioned",
                "devices",
                230_000,
                1_000_000,
                Duration::from_millis(41_400)
            ),
            "scale: provisioned 230000/1000000 devices (23%, 41 s)"
        );
        assert_eq!(
            line("crash:", "cycles", 3, 3, Duration::ZERO),
            "crash: 3/3 cycles (100%, 0 s)"
        );
        assert_eq!(
            line("x", "devices", 0, 0, Duration::ZERO),
            "x 0/0 devices (100%, 0 s)",
            "nothing to do is done"
        );
    }

    #[test]
    fn lines_are_at_least_an_interval_apart() {
        let started = Instant::now();
        let at = |ms| started + Duration::from_millis(ms);
        let interval = Duration::from_secs(2);
        assert!(
            !due(None, started, at(1_999), interval),
            "too early for the first"
        );
        assert!(due(None, started, at(2_000), interval));
        assert!(!due(Some(at(2_000)), started, at(3_500), interval));
        assert!(due(Some(at(2_000)), started, at(4_100), interval));
    }

    #[test]
    fn clones_share_the_count() {
        let p = Progress::new("test:", "items", 10);
        let q = p.clone();
        p.add(3);
        q.add(4);
        assert_eq!(p.done(), 7);
    }
}
