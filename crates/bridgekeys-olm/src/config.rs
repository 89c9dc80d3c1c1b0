/// Limits of the account manager.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ManagerConfig {
    /// Most one-time keys one claim may ask for, per device. A homeserver
    /// asks for a handful (Synapse caps a client at 5 per device); a larger
    /// request is refused rather than answered slowly.
    pub max_keys_per_claim: usize,
    /// Most outstanding (claimed, not yet used) one-time keys kept per
    /// device. Past it the oldest are evicted, counted in
    /// [`crate::ManagerStats::evicted_keys`] and logged. The bound protects
    /// storage from a peer that claims keys and never uses them; set it above
    /// the number of sessions a puppet may see started before the senders'
    /// pre-key messages arrive.
    pub max_outstanding_keys: usize,
    /// Most devices whose decoded account is kept in memory (about 1 KiB
    /// each). Past it, devices not used recently are dropped from memory
    /// (never from the store) and loaded again on their next use, which
    /// costs a read and about 50 µs of key derivation. Counted in
    /// [`crate::ManagerStats::cache_evictions`].
    pub max_cached_devices: usize,
    /// Most Olm sessions kept per (puppet device, peer curve25519 key).
    /// A peer normally needs one; several appear when both sides start a
    /// session at once or a peer restores an old backup. Past the bound the
    /// least recently used is removed (counted in
    /// [`crate::ManagerStats::sessions_evicted`]); its messages can no longer
    /// be decrypted, and the peer starts a new session.
    pub max_sessions_per_peer: usize,
    /// Most Olm sessions kept per puppet device, all peers together. Anyone
    /// can claim a key of a puppet and start a session with a new identity
    /// key each time; past this bound the device's least recently used
    /// sessions are removed (counted in
    /// [`crate::ManagerStats::sessions_evicted`]), so storage stays bounded.
    pub max_sessions_per_device: usize,
    /// How many times one operation that advances a stored session (an Olm
    /// encryption or decryption, a Megolm encryption, a change of an
    /// outbound group session) is attempted when its write loses a race:
    /// another process sharing the store advanced the same session first
    /// (the store's compare-and-swap refused the write, nothing changed).
    /// Each attempt reloads the session and redoes the step on its latest
    /// state; each lost race means another process made progress, so a
    /// handful is plenty. Past it the operation fails with
    /// [`crate::OlmError::Contended`]. At least 1; counted in
    /// [`crate::ManagerStats::session_conflicts`]. The same bound applies
    /// to rewriting a tracked user's device list, or storing a better copy
    /// of a room key, when another process changed the record between our
    /// read and our write (not counted there).
    pub session_write_attempts: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_keys_per_claim: 50,
            max_outstanding_keys: 1000,
            max_cached_devices: 100_000,
            max_sessions_per_peer: 5,
            max_sessions_per_device: 10_000,
            session_write_attempts: 16,
        }
    }
}
