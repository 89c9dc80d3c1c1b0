//! What the listener needs to know: the token, the namespace, the limits.

use std::time::Duration;

use ruma::{OwnedDeviceId, ServerName};
use zeroize::Zeroizing;

use crate::{AppserviceError, Registration, UserNamespace};

/// The `hs_token`: the secret the homeserver presents on every request.
///
/// Kept zeroized and never printed (`Debug` redacts it).
#[derive(Clone)]
pub struct HsToken(Zeroizing<String>);

impl HsToken {
    /// Wrap a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Zeroizing::new(token.into()))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for HsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HsToken(<redacted>)")
    }
}

/// Bounds on what one request may cost.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Limits {
    /// Largest request body accepted; larger gets 413 `M_TOO_LARGE`. Synapse
    /// sends at most 100 events and 100 to-device messages per transaction.
    pub max_body_bytes: usize,
    /// A request running longer is answered 503 and its work abandoned (a
    /// claim's keys that were not returned are simply never used; a
    /// transaction is not recorded, so the homeserver retries). Keep it below
    /// Synapse's 60 s so the homeserver sees our answer, not its own timeout.
    pub request_timeout: Duration,
    /// Most keys one claim may ask for per device (the algorithm repeated);
    /// a request over it is refused whole with 400 `M_INVALID_PARAM` before
    /// anything is generated. Synapse asks for at most 5 per device.
    pub max_keys_per_device: usize,
    /// Most devices one claim may name in total.
    pub max_devices_per_claim: usize,
    /// Most devices of one claim served at the same time.
    pub claim_concurrency: usize,
    /// Most encrypted room events held (durably) while their room key has
    /// not arrived. Past it the oldest is given up: handed to the bridge as
    /// undecryptable.
    pub max_held_events: usize,
    /// How long an encrypted room event is held for its room key before it
    /// is handed to the bridge as undecryptable.
    pub held_event_max_age: Duration,
    /// How long a held event waits for its room key before the bridge asks
    /// for it: once past this, the puppet device the bridge names
    /// ([`crate::BridgeHandler::room_key_requester`]) sends one
    /// `m.room_key_request` to all of the sender's devices, per (room,
    /// session). The homeserver does not order to-device messages and room
    /// events, so a key usually arrives a transaction or two after its
    /// events; a key that has not come after a minute was most likely lost
    /// (to-device messages sent while the bridge was down can be dropped).
    /// `Some(Duration::ZERO)` asks at the first check after the event is
    /// held; `None` never asks. Checked after every transaction and by
    /// [`crate::Appservice::request_room_keys`] (see
    /// [`crate::room_events`]).
    pub room_key_request_after: Option<Duration>,
    /// How long a completed transaction's dedup record is kept
    /// ([`crate::Appservice::prune_transactions`] removes older ones).
    /// It only has to outlive the homeserver's retries of that
    /// transaction, which come within minutes of a failure (Synapse backs
    /// off up to about 8.5 minutes); the default keeps a week.
    pub transaction_record_max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(50),
            max_keys_per_device: 20,
            max_devices_per_claim: 10_000,
            claim_concurrency: 64,
            max_held_events: 10_000,
            held_event_max_age: Duration::from_secs(24 * 3600),
            room_key_request_after: Some(Duration::from_secs(60)),
            transaction_record_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Configuration of an [`crate::Appservice`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AppserviceConfig {
    /// The token the homeserver must present.
    pub hs_token: HsToken,
    /// The users the bridge answers for (claims, user queries, pre-key
    /// decryption).
    pub namespace: UserNamespace,
    /// Separates this appservice's transaction ids in the dedup log (the
    /// registration `id`).
    pub txn_namespace: String,
    /// The device id given to a puppet accepted by a user query when the
    /// bridge's handler names none. One fixed id per puppet keeps
    /// provisioning idempotent across retries and restarts.
    pub puppet_device_id: OwnedDeviceId,
    /// Request bounds.
    pub limits: Limits,
}

/// The default puppet device id, `BRIDGEKEYS`.
pub const DEFAULT_PUPPET_DEVICE_ID: &str = "BRIDGEKEYS";

impl AppserviceConfig {
    /// A configuration from its three required parts, with the default
    /// puppet device id ([`DEFAULT_PUPPET_DEVICE_ID`]) and default limits;
    /// set the other fields after.
    pub fn new(
        hs_token: HsToken,
        namespace: UserNamespace,
        txn_namespace: impl Into<String>,
    ) -> Self {
        Self {
            hs_token,
            namespace,
            txn_namespace: txn_namespace.into(),
            puppet_device_id: DEFAULT_PUPPET_DEVICE_ID.into(),
            limits: Limits::default(),
        }
    }

    /// The configuration a registration implies, with default limits.
    pub fn from_registration(
        registration: &Registration,
        server_name: &ServerName,
    ) -> Result<Self, AppserviceError> {
        Ok(Self {
            hs_token: HsToken::new(registration.hs_token.clone()),
            namespace: UserNamespace::from_registration(registration, server_name)?,
            txn_namespace: registration.id.clone(),
            puppet_device_id: DEFAULT_PUPPET_DEVICE_ID.into(),
            limits: Limits::default(),
        })
    }
}
