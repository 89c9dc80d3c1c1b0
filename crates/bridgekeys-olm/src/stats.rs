use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the account manager since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Claims answered successfully.
    pub claims: u64,
    /// One-time keys handed out.
    pub keys_issued: u64,
    /// Outstanding keys evicted because a device hit its bound.
    pub evicted_keys: u64,
    /// Pre-key messages decrypted (one-time key consumed).
    pub prekeys_decrypted: u64,
    /// Pre-key messages refused (unknown key or failed decryption).
    pub prekeys_refused: u64,
    /// Devices created.
    pub devices_created: u64,
    /// Pre-key messages that used a fallback key (included in
    /// `prekeys_decrypted`).
    pub fallback_prekeys: u64,
    /// Fallback keys generated for a device that had none.
    pub fallback_keys_generated: u64,
    /// Fallback keys replaced by a new one (used or too old).
    pub fallback_rotations: u64,
    /// Previous fallback keys forgotten after their grace period.
    pub fallback_forgets: u64,
    /// Idle devices dropped from the in-memory cache (still in the store).
    pub cache_evictions: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub claims: AtomicU64,
    pub keys_issued: AtomicU64,
    pub evicted_keys: AtomicU64,
    pub prekeys_decrypted: AtomicU64,
    pub prekeys_refused: AtomicU64,
    pub devices_created: AtomicU64,
    pub fallback_prekeys: AtomicU64,
    pub fallback_keys_generated: AtomicU64,
    pub fallback_rotations: AtomicU64,
    pub fallback_forgets: AtomicU64,
    pub cache_evictions: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ManagerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ManagerStats {
            claims: get(&self.claims),
            keys_issued: get(&self.keys_issued),
            evicted_keys: get(&self.evicted_keys),
            prekeys_decrypted: get(&self.prekeys_decrypted),
            prekeys_refused: get(&self.prekeys_refused),
            devices_created: get(&self.devices_created),
            fallback_prekeys: get(&self.fallback_prekeys),
            fallback_keys_generated: get(&self.fallback_keys_generated),
            fallback_rotations: get(&self.fallback_rotations),
            fallback_forgets: get(&self.fallback_forgets),
            cache_evictions: get(&self.cache_evictions),
        }
    }
}
