//! The fallback key (MSC2732) rotation policy: a pure function of the
//! device's stored fallback state, the configured ages and the time.
//!
//! Why a pure function: every rule of the life cycle (generate, upload,
//! rotate when used or too old, forget the previous key after a grace period)
//! is decided here from data that lives in the device's account record, so
//! the schedule survives restarts and can be tested with any clock. The
//! account manager applies the decision
//! ([`crate::AccountManager::apply_fallback_policy`]); the appservice's
//! background task calls it and uploads.
//!
//! The life cycle of one device, in order of precedence:
//!
//! 1. No fallback key yet: [`FallbackAction::Generate`].
//! 2. The current key is not yet published (uploaded with a 200):
//!    [`FallbackAction::Upload`] the same persisted key. A previous key is
//!    kept meanwhile, however long the homeserver is unreachable: until the
//!    new key is up, the homeserver still hands out the previous one.
//! 3. A previous key is held: [`FallbackAction::ForgetPrevious`] once
//!    [`FallbackPolicy::grace`] has passed since the current key was
//!    published (MSC2732's security section: do not keep the private part
//!    of a used fallback key), else wait. Rotating within the grace period
//!    would make vodozemac (current + previous only) drop the previous key
//!    early, and with it the messages still in flight that used it; the
//!    current key keeps serving meanwhile, replays are refused by the
//!    session store.
//! 4. The current key was reported used, or is older than
//!    [`FallbackPolicy::max_age`]: [`FallbackAction::Rotate`].
//! 5. Otherwise wait until it is too old.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the time unit of the fallback schedule
/// (stored in the account record, so it must be wall-clock time that
/// survives restarts).
pub type UnixMillis = u64;

/// The current time as [`UnixMillis`], from the system clock.
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How long fallback keys live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FallbackPolicy {
    /// Rotate a fallback key that is older than this even if nobody used it,
    /// so a key whose private part leaked stops being served. Default 7 days.
    pub max_age: Duration,
    /// Keep the previous fallback key this long after a rotation, so
    /// messages that used it and are still in flight can be decrypted; then
    /// forget it. Default 1 hour (MSC2732's example).
    pub grace: Duration,
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            grace: Duration::from_secs(3600),
        }
    }
}

/// The device's current fallback key, as recorded next to its account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentFallback {
    /// vodozemac's fallback key id (its own counter, separate from the
    /// one-time keys').
    pub key_id: u64,
    /// The public key, base64 (public data).
    pub public_key: String,
    /// When it was generated.
    pub created_ms: UnixMillis,
    /// Uploaded and acknowledged (200) by the homeserver.
    pub published: bool,
    /// When the acknowledgement was recorded: from then on the homeserver
    /// hands out this key instead of the previous one, so the previous
    /// key's grace period starts here. `None` in records written before
    /// this field existed (the rotation time is used instead).
    #[serde(default)]
    pub published_ms: Option<UnixMillis>,
    /// The homeserver reported it used (or a pre-key message used it).
    pub used: bool,
}

/// A device's fallback key state, stored in its account record (so every
/// change is written atomically with the vodozemac pickle that holds the
/// private keys).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackState {
    /// The current key, if one was ever generated.
    #[serde(default)]
    pub current: Option<CurrentFallback>,
    /// When the previous key (still held) was replaced by the current one
    /// (the rotation); `None` if no previous key is held.
    #[serde(default)]
    pub previous_since_ms: Option<UnixMillis>,
}

/// Why a fallback key is rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationReason {
    /// The homeserver handed it out (or a pre-key message used it).
    Used,
    /// It is older than [`FallbackPolicy::max_age`].
    Expired,
}

/// What the fallback life cycle asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackAction {
    /// Generate the device's first fallback key.
    Generate,
    /// Upload the current (persisted, unpublished) key.
    Upload,
    /// Forget the previous key: its grace period is over.
    ForgetPrevious,
    /// Replace the current key with a new one (which then needs an upload).
    Rotate(RotationReason),
    /// Nothing to do before `until` (`None`: nothing scheduled).
    Wait {
        /// When the next step becomes due.
        until: Option<UnixMillis>,
    },
}

impl FallbackAction {
    /// When the device should be looked at again, seen at `now`: the time a
    /// [`FallbackAction::Wait`] names (never before `now`; never, as
    /// `UnixMillis::MAX`, when nothing is scheduled), or `now` for any step
    /// that is due.
    ///
    /// Why: the provisioner's rotation pass schedules a device by this rule,
    /// and the write that publishes a new device's fallback key schedules it
    /// by the same rule in the same write; one rule keeps the two from
    /// drifting apart (a device scheduled late misses a rotation).
    pub fn next_due(&self, now: UnixMillis) -> UnixMillis {
        match self {
            FallbackAction::Wait { until } => until.unwrap_or(UnixMillis::MAX).max(now),
            _ => now,
        }
    }
}

fn plus(t: UnixMillis, d: Duration) -> UnixMillis {
    t.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The next step of a device's fallback life cycle at `now` (see the module
/// docs for the rules and their order).
pub fn due(state: &FallbackState, policy: &FallbackPolicy, now: UnixMillis) -> FallbackAction {
    let Some(current) = &state.current else {
        return FallbackAction::Generate;
    };
    if !current.published {
        return FallbackAction::Upload;
    }
    if let Some(rotated) = state.previous_since_ms {
        let grace_from = current.published_ms.map_or(rotated, |p| p.max(rotated));
        let forget_at = plus(grace_from, policy.grace);
        if now >= forget_at {
            return FallbackAction::ForgetPrevious;
        }
        return FallbackAction::Wait {
            until: Some(forget_at),
        };
    }
    if current.used {
        return FallbackAction::Rotate(RotationReason::Used);
    }
    let expires = plus(current.created_ms, policy.max_age);
    if now >= expires {
        return FallbackAction::Rotate(RotationReason::Expired);
    }
    FallbackAction::Wait {
        until: Some(expires),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn published(created_ms: u64) -> FallbackState {
        FallbackState {
            current: Some(CurrentFallback {
                key_id: 0,
                public_key: "k".into(),
                created_ms,
                published: true,
                published_ms: Some(created_ms),
                used: false,
            }),
            previous_since_ms: None,
        }
    }

    #[test]
    fn the_next_look_is_the_wait_time_never_in_the_past_or_now_for_a_due_step() {
        let now = 10 * HOUR;
        let wait = |until| FallbackAction::Wait { until };
        assert_eq!(wait(Some(12 * HOUR)).next_due(now), 12 * HOUR);
        assert_eq!(
            wait(Some(9 * HOUR)).next_due(now),
            now,
            "a time already passed is now"
        );
        assert_eq!(
            wait(None).next_due(now),
            UnixMillis::MAX,
            "nothing scheduled"
        );
        for step in [
            FallbackAction::Generate,
            FallbackAction::Upload,
            FallbackAction::ForgetPrevious,
            FallbackAction::Rotate(RotationReason::Used),
        ] {
            assert_eq!(step.next_due(now), now, "{step:?} is due at once");
        }
    }

    #[test]
    fn a_device_without_a_fallback_key_generates_one() {
        assert_eq!(
            due(&FallbackState::default(), &FallbackPolicy::default(), 0),
            FallbackAction::Generate
        );
    }

    #[test]
    fn an_unpublished_key_is_uploaded_first_and_the_previous_key_kept_until_then() {
        let mut s = published(0);
        if let Some(c) = s.current.as_mut() {
            c.published = false;
            c.published_ms = None;
            c.used = true;
        }
        let p = FallbackPolicy::default();
        assert_eq!(due(&s, &p, 30 * 24 * HOUR), FallbackAction::Upload);
        // Long past the grace period, but the homeserver may still hand out
        // the previous key: keep it until the new one is up.
        s.previous_since_ms = Some(0);
        assert_eq!(due(&s, &p, 5 * HOUR), FallbackAction::Upload);
    }

    #[test]
    fn the_grace_period_starts_when_the_new_key_is_published() {
        let p = FallbackPolicy::default();
        let mut s = published(0);
        s.previous_since_ms = Some(0);
        if let Some(c) = s.current.as_mut() {
            c.published_ms = Some(3 * HOUR);
        }
        assert_eq!(
            due(&s, &p, 4 * HOUR - 1),
            FallbackAction::Wait {
                until: Some(4 * HOUR)
            }
        );
        assert_eq!(due(&s, &p, 4 * HOUR), FallbackAction::ForgetPrevious);
    }

    #[test]
    fn a_used_key_rotates_and_an_old_key_rotates() {
        let p = FallbackPolicy::default();
        let mut s = published(1000);
        assert_eq!(
            due(&s, &p, 1001),
            FallbackAction::Wait {
                until: Some(1000 + 7 * 24 * HOUR)
            }
        );
        assert_eq!(
            due(&s, &p, 1000 + 7 * 24 * HOUR),
            FallbackAction::Rotate(RotationReason::Expired)
        );
        if let Some(c) = s.current.as_mut() {
            c.used = true;
        }
        assert_eq!(
            due(&s, &p, 1001),
            FallbackAction::Rotate(RotationReason::Used)
        );
    }

    #[test]
    fn the_previous_key_is_forgotten_after_the_grace_period_and_not_before() {
        let p = FallbackPolicy::default();
        let mut s = published(5 * HOUR);
        s.previous_since_ms = Some(5 * HOUR);
        assert_eq!(
            due(&s, &p, 6 * HOUR - 1),
            FallbackAction::Wait {
                until: Some(6 * HOUR)
            }
        );
        assert_eq!(due(&s, &p, 6 * HOUR), FallbackAction::ForgetPrevious);
    }

    #[test]
    fn a_used_key_waits_for_the_previous_one_to_be_forgotten_before_rotating() {
        let p = FallbackPolicy::default();
        let mut s = published(0);
        s.previous_since_ms = Some(0);
        if let Some(c) = s.current.as_mut() {
            c.used = true;
        }
        assert_eq!(due(&s, &p, 10), FallbackAction::Wait { until: Some(HOUR) });
        s.previous_since_ms = None;
        assert_eq!(
            due(&s, &p, 10),
            FallbackAction::Rotate(RotationReason::Used)
        );
    }

    #[test]
    fn configured_ages_are_honoured() {
        let p = FallbackPolicy {
            max_age: Duration::from_secs(60),
            grace: Duration::from_secs(5),
        };
        let mut s = published(0);
        assert_eq!(
            due(&s, &p, 60_000),
            FallbackAction::Rotate(RotationReason::Expired)
        );
        s.previous_since_ms = Some(0);
        assert_eq!(due(&s, &p, 5_000), FallbackAction::ForgetPrevious);
    }
}
