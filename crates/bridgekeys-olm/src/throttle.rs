//! Warnings that would repeat on every claim, summarised instead.
//!
//! A device whose outstanding keys sit at the bound evicts a key on every
//! claim; a bridge under a claim flood would write one warning line per
//! claim. [`Throttle`] lets one line through per window and counts the rest,
//! which the next line reports. The exact totals are in the counters.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One line per `window`; what was held back in between is counted.
#[derive(Debug)]
pub(crate) struct Throttle {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    /// Events held back since the last line.
    held: u64,
    /// Their total amount (keys evicted).
    held_amount: u64,
}

/// What a line that gets through reports of the events held back before
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    /// Events held back since the last line.
    pub events: u64,
    /// Their total amount.
    pub amount: u64,
}

impl Throttle {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            state: Mutex::new(State::default()),
        }
    }

    /// An event of `amount` at `now`: `Some` (with what was held back
    /// before it) if its line should be written, `None` if it is held back.
    pub(crate) fn note(&self, now: Instant, amount: u64) -> Option<Held> {
        let mut state = self.state.lock();
        let open = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.window);
        if open {
            let held = Held {
                events: state.held,
                amount: state.held_amount,
            };
            *state = State {
                last: Some(now),
                held: 0,
                held_amount: 0,
            };
            Some(held)
        } else {
            state.held += 1;
            state.held_amount += amount;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_and_the_next_line_reports_what_was_held_back() {
        let throttle = Throttle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(
            throttle.note(t0, 1),
            Some(Held {
                events: 0,
                amount: 0
            })
        );
        for i in 1..1000u64 {
            assert_eq!(throttle.note(t0 + Duration::from_millis(i), 2), None);
        }
        assert_eq!(
            throttle.note(t0 + Duration::from_secs(60), 1),
            Some(Held {
                events: 999,
                amount: 1998
            })
        );
        assert_eq!(throttle.note(t0 + Duration::from_secs(61), 1), None);
    }
}
