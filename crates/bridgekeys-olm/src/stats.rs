use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the account manager since it started. Non-exhaustive: new
/// counters are added as the manager grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStats {
    /// Claims answered successfully.
    pub claims: u64,
    /// One-time keys handed out.
    pub keys_issued: u64,
    /// Outstanding keys evicted because a device hit its bound.
    pub evicted_keys: u64,
    /// Pre-key messages that started a new session (one-time key consumed,
    /// or the fallback key used).
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
    /// Reads of a device's account record to put it in memory: a device
    /// used while not cached (its first use, or after its eviction),
    /// reloaded after a failed write, or refreshed after another process
    /// wrote it. Counted when the read is sent, so reads that found no
    /// device or failed count too. Concurrent calls that load one uncached
    /// device read it once. A rotation pass's look at an idle device's
    /// schedule, which puts nothing in memory, is not counted.
    pub device_loads: u64,
    /// Olm messages decrypted and verified (both types, new sessions included).
    pub olm_decrypted: u64,
    /// Olm messages refused before their payload was read (no session decrypts them, unknown key, replay).
    pub olm_refused: u64,
    /// Olm messages that decrypted but whose payload failed its checks.
    pub payloads_refused: u64,
    /// Olm sessions removed past the per-peer bound.
    pub sessions_evicted: u64,
    /// Outbound Olm sessions created from a claimed one-time key.
    pub sessions_created_outbound: u64,
    /// Olm messages encrypted to a recipient device.
    pub olm_encrypted: u64,
    /// Queried devices refused (bad signature, keys changed under the same id).
    pub devices_refused: u64,
    /// Room keys stored or improved (`m.room_key`).
    pub room_keys_stored: u64,
    /// Megolm room events decrypted.
    pub room_events_decrypted: u64,
    /// Megolm room events refused (unknown session, mismatch, replay, bad).
    pub room_events_refused: u64,
    /// Outbound group sessions started (new rooms and rotations).
    pub group_sessions_created: u64,
    /// Megolm room events encrypted.
    pub room_events_encrypted: u64,
    /// Session writes (Olm or outbound Megolm) refused because another
    /// process sharing the store had advanced the session first: each was
    /// redone on the reloaded session (see
    /// [`crate::ManagerConfig::session_write_attempts`]).
    pub session_conflicts: u64,
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
    pub device_loads: AtomicU64,
    pub olm_decrypted: AtomicU64,
    pub olm_refused: AtomicU64,
    pub payloads_refused: AtomicU64,
    pub sessions_evicted: AtomicU64,
    pub sessions_created_outbound: AtomicU64,
    pub olm_encrypted: AtomicU64,
    pub devices_refused: AtomicU64,
    pub room_keys_stored: AtomicU64,
    pub room_events_decrypted: AtomicU64,
    pub room_events_refused: AtomicU64,
    pub group_sessions_created: AtomicU64,
    pub room_events_encrypted: AtomicU64,
    pub session_conflicts: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn note_device_refused(&self) {
        Self::add(&self.devices_refused, 1);
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
            device_loads: get(&self.device_loads),
            olm_decrypted: get(&self.olm_decrypted),
            olm_refused: get(&self.olm_refused),
            payloads_refused: get(&self.payloads_refused),
            sessions_evicted: get(&self.sessions_evicted),
            sessions_created_outbound: get(&self.sessions_created_outbound),
            olm_encrypted: get(&self.olm_encrypted),
            devices_refused: get(&self.devices_refused),
            room_keys_stored: get(&self.room_keys_stored),
            room_events_decrypted: get(&self.room_events_decrypted),
            room_events_refused: get(&self.room_events_refused),
            group_sessions_created: get(&self.group_sessions_created),
            room_events_encrypted: get(&self.room_events_encrypted),
            session_conflicts: get(&self.session_conflicts),
        }
    }
}
