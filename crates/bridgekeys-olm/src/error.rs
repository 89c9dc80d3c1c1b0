use bridgekeys_store::StoreError;

/// Why the account manager refused or failed an operation.
///
/// Every error leaves the device's stored state as it was, with one
/// exception: when waiting for durability itself fails ([`OlmError::Store`]
/// after the write was applied), the change may still reach the disk with a
/// later flush. A message decrypted then is lost unless it came in a
/// delivery (pass a delivery tag, as the listener does).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OlmError {
    /// The device was never created with [`crate::AccountManager::create_device`].
    #[error("unknown device {device_id} of {user_id}")]
    UnknownDevice {
        /// The user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// Only `signed_curve25519` one-time keys are served.
    #[error("unsupported one-time key algorithm {0:?}: only signed_curve25519 is served")]
    UnsupportedAlgorithm(String),
    /// A claim asked for zero keys or more than the configured maximum.
    #[error("a claim may ask for 1 to {max} keys per device, not {requested}")]
    BadKeyCount {
        /// Keys asked for.
        requested: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The pre-key message names a one-time key this device does not hold
    /// (never issued, already used, or evicted).
    #[error("the pre-key message uses a one-time key this device does not hold")]
    UnknownOneTimeKey,
    /// Creating the inbound session failed: tampered or mis-addressed message.
    /// Nothing was consumed.
    #[error("could not decrypt the pre-key message: {0}")]
    Decryption(#[from] vodozemac::olm::SessionCreationError),
    /// The pre-key message starts a session this device already has: a
    /// replay. Nothing was processed again.
    #[error("replayed pre-key message: its session already exists")]
    Replay,
    /// The decrypted payload failed the spec's checks (wrong recipient,
    /// sender or keys): refused, nothing stored, plaintext not released.
    #[error("Olm payload refused: {0}")]
    Payload(#[from] crate::PayloadError),
    /// The puppet device has no outbound group session in the room:
    /// prepare (and share) one before encrypting.
    #[error("no outbound group session in this room: prepare one first")]
    NoGroupSession,
    /// A room key or a Megolm room event was refused.
    #[error(transparent)]
    Megolm(#[from] crate::MegolmError),
    /// A normal (type 1) Olm message that none of the sender's stored
    /// sessions decrypts (unknown session, evicted, or tampered).
    #[error("no stored Olm session with the sender decrypts this message")]
    NoMatchingSession,
    /// A claimed one-time key of a recipient device did not verify against
    /// the device's ed25519 key: refused, no session created.
    #[error("the claimed one-time key's signature does not verify")]
    BadKeySignature,
    /// A message could not be encrypted (payload serialisation).
    #[error("could not encrypt: {0}")]
    Encryption(String),
    /// The stored account state could not be read back.
    #[error("stored account state is unreadable: {0}")]
    Corrupt(String),
    /// JSON could not be put in canonical form for signing.
    #[error("canonical JSON: {0}")]
    CanonicalJson(#[from] ruma::CanonicalJsonError),
    /// A write of a session (or of a tracked user's device list, or of a
    /// received room key) lost the
    /// race to another process sharing the store on every one of
    /// [`crate::ManagerConfig::session_write_attempts`] attempts. Nothing
    /// was returned and nothing of this record was stored; it may be
    /// retried. (An operation over several users, such as
    /// `mark_devices_outdated`, may have stored the users before it.)
    #[error("{what}: another process changed the same record first on each of {attempts} attempts")]
    Contended {
        /// The operation.
        what: &'static str,
        /// How many attempts lost.
        attempts: usize,
    },
    /// The store failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
}
