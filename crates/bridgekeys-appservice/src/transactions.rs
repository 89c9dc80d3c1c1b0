//! `PUT /_matrix/app/v1/transactions/{txnId}`: events, ephemeral events,
//! to-device messages and MSC3202 device data, each transaction processed
//! once.
//!
//! Wire shape (fields other than `events` optional):
//!
//! ```jsonc
//! {
//!   "events": [ /* room events */ ],
//!   "ephemeral": [ /* typing, receipts, presence */ ],   // or de.sorunome.msc2409.ephemeral
//!   "de.sorunome.msc2409.to_device": [                    // or to_device
//!     {"to_user_id": "@p:hs", "to_device_id": "DEV", "type": "m.room.encrypted",
//!      "sender": "@alice:hs", "content": { /* ... */ }}
//!   ],
//!   "org.matrix.msc3202.device_one_time_keys_count": {"@p:hs": {"DEV": {"signed_curve25519": 0}}},
//!   "org.matrix.msc3202.device_unused_fallback_key_types": {"@p:hs": {"DEV": []}},
//!   "org.matrix.msc3202.device_lists": {"changed": ["@alice:hs"], "left": []}  // or device_lists
//! }
//! ```
//!
//! Processing, per transaction id:
//! 1. The body is parsed whole first: a bad body changes nothing.
//! 2. A per-id lock: a duplicate arriving while the first is running waits
//!    for it (counted as an in-flight duplicate).
//! 3. The durable log ([`TransactionLog`]) is asked for the id's lease: a
//!    completed id gets 200 without processing. When several bridge
//!    processes share one store, the homeserver's retry may land on another
//!    process while the first still works on it; the lease makes that one
//!    wait until the first records the id (then 200 without processing) or
//!    gives it up (a failed attempt releases it, a dead process's lease
//!    expires: request timeout plus 10 s). Counted as held elsewhere.
//! 4. Olm messages (`m.room.encrypted`, either type) addressed to a puppet
//!    device's curve25519 key are decrypted by the account manager, which
//!    verifies the payload (recipient, recipient keys, sender, sender keys)
//!    and makes the session's ratchet step (and a consumed one-time key)
//!    durable first. A message whose payload fails its checks is dropped:
//!    counted, logged without plaintext, never handed to the bridge.
//!    Messages that cannot be decrypted are handed over as received, with
//!    the reason; a store failure fails the transaction.
//! 5. The bridge's [`BridgeHandler::transaction`] runs; an error answers 500
//!    so the homeserver retries. A transaction holding decrypted messages is
//!    kept in memory until step 6 is done, and its retry reuses it: the
//!    one-time keys and message keys are spent, so the messages could not
//!    be decrypted twice (after a crash the sealed delivery records give
//!    the same plaintexts back).
//! 6. The id is recorded and the record flushed; only then 200.

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, extract::State};
use bridgekeys_olm::vodozemac::{Curve25519PublicKey, olm::OlmMessage};
use bridgekeys_olm::{DecryptedOlm, OLM_ALGORITHM, OlmError};
use bridgekeys_store::{TransactionClaim, TransactionLog};
pub use ruma::api::appservice::event::push_events::v1::{DeviceLists, EphemeralData};
use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedTransactionId, OwnedUserId, UInt,
    events::{AnyTimelineEvent, AnyToDeviceEventContent, ToDeviceEventType},
    serde::Raw,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{BridgeHandler, MatrixError, body::MatrixJson, path::MatrixPath, server::Inner};

/// One-time key counts: user -> device -> algorithm -> count.
pub type OneTimeKeyCounts =
    BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OneTimeKeyAlgorithm, UInt>>>;
/// Unused fallback key types: user -> device -> algorithms. An empty list
/// means the device's fallback key was used: rotate it.
pub type UnusedFallbackKeyTypes =
    BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Vec<OneTimeKeyAlgorithm>>>;

/// The counts as sent: ids and algorithms as strings, so that one bad entry
/// does not refuse the whole transaction (it is left out of the typed map).
type WireCounts = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;
/// The unused fallback key types as sent.
type WireFallbackTypes = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// MSC3202 device list changes as sent (ids as strings: one malformed id is
/// left out, not a refused transaction).
#[derive(Default, Deserialize)]
struct WireDeviceLists {
    #[serde(default, deserialize_with = "crate::body::null_as_empty")]
    changed: Vec<String>,
    #[serde(default, deserialize_with = "crate::body::null_as_empty")]
    left: Vec<String>,
}

/// A to-device message as the homeserver sends it (MSC2409).
#[derive(Deserialize)]
struct ToDeviceWire {
    to_user_id: String,
    to_device_id: String,
    #[serde(rename = "type")]
    event_type: String,
    sender: String,
    content: Box<RawValue>,
}

/// The transaction body as sent.
#[derive(Deserialize)]
pub(crate) struct TransactionBody {
    events: Vec<Box<RawValue>>,
    #[serde(default, deserialize_with = "crate::body::null_as_empty")]
    ephemeral: Vec<Box<RawValue>>,
    #[serde(
        default,
        rename = "de.sorunome.msc2409.ephemeral",
        deserialize_with = "crate::body::null_as_empty"
    )]
    ephemeral_unstable: Vec<Box<RawValue>>,
    #[serde(default, deserialize_with = "crate::body::null_as_empty")]
    to_device: Vec<ToDeviceWire>,
    #[serde(
        default,
        rename = "de.sorunome.msc2409.to_device",
        deserialize_with = "crate::body::null_as_empty"
    )]
    to_device_unstable: Vec<ToDeviceWire>,
    #[serde(default, rename = "org.matrix.msc3202.device_one_time_keys_count")]
    otk_count: Option<WireCounts>,
    #[serde(default, rename = "org.matrix.msc3202.device_one_time_key_counts")]
    otk_counts: Option<WireCounts>,
    #[serde(default, rename = "device_one_time_keys_count")]
    otk_count_stable: Option<WireCounts>,
    #[serde(default, rename = "device_one_time_key_counts")]
    otk_counts_stable: Option<WireCounts>,
    #[serde(default, rename = "device_unused_fallback_key_types")]
    unused_fallback_stable: Option<WireFallbackTypes>,
    #[serde(
        default,
        rename = "org.matrix.msc3202.device_unused_fallback_key_types"
    )]
    unused_fallback: Option<WireFallbackTypes>,
    #[serde(
        default,
        rename = "org.matrix.msc3202.device_lists",
        deserialize_with = "crate::body::optional_object"
    )]
    device_lists: Option<WireDeviceLists>,
    #[serde(
        default,
        rename = "device_lists",
        deserialize_with = "crate::body::optional_object"
    )]
    device_lists_stable: Option<WireDeviceLists>,
}

/// A to-device message handed to the bridge.
#[derive(Debug)]
pub enum ToDevice {
    /// An Olm message to a puppet device, decrypted and its payload
    /// verified; the session's new state is stored durably.
    Decrypted(Box<DecryptedToDevice>),
    /// Any other message, as received.
    Other(RawToDevice),
}

/// An Olm message the account manager decrypted and verified.
#[derive(Debug)]
pub struct DecryptedToDevice {
    /// The puppet it was addressed to.
    pub to_user_id: OwnedUserId,
    /// The puppet's device.
    pub to_device_id: OwnedDeviceId,
    /// The sending user, as the homeserver states it (and the payload
    /// confirmed).
    pub sender: OwnedUserId,
    /// The sender's curve25519 identity key (from the message content).
    pub sender_key: Curve25519PublicKey,
    /// The verified payload (`olm.payload`: inner type and content), the
    /// session, and the whole plaintext. Never log the plaintext.
    pub olm: DecryptedOlm,
}

/// A to-device message passed through untouched (its content not parsed:
/// [`Raw::deserialize`] it when needed). Messages whose recipient or sender
/// is not a valid id are left out of the transaction.
pub struct RawToDevice {
    /// Recipient user.
    pub to_user_id: OwnedUserId,
    /// Recipient device.
    pub to_device_id: OwnedDeviceId,
    /// Event type.
    pub event_type: ToDeviceEventType,
    /// Sender.
    pub sender: OwnedUserId,
    /// The content, as received.
    pub content: Raw<AnyToDeviceEventContent>,
    /// Set when this was an Olm message to a puppet device that could not
    /// be decrypted (no session, replayed, unknown one-time key, tampered):
    /// why.
    pub undecryptable: Option<String>,
}

impl std::fmt::Debug for RawToDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawToDevice")
            .field("to_user_id", &self.to_user_id)
            .field("to_device_id", &self.to_device_id)
            .field("event_type", &self.event_type)
            .field("sender", &self.sender)
            .field("undecryptable", &self.undecryptable)
            .finish_non_exhaustive()
    }
}

/// One transaction, ready for the bridge.
///
/// Its `Debug` names what it carries without the contents: room and
/// ephemeral events are counted, not printed (a message body in a log is
/// plaintext in a log), and decrypted messages print no plaintext.
pub struct Transaction {
    /// The homeserver's transaction id.
    pub txn_id: OwnedTransactionId,
    /// Room events, as received (parse one with [`Raw::deserialize`], or
    /// read single fields with [`Raw::get_field`]).
    pub events: Vec<Raw<AnyTimelineEvent>>,
    /// Ephemeral events (stable and MSC2409 names merged).
    pub ephemeral: Vec<Raw<EphemeralData>>,
    /// To-device messages (stable and MSC2409 names merged), Olm messages
    /// to puppets decrypted and verified (those that failed verification
    /// are left out).
    pub to_device: Vec<ToDevice>,
    /// MSC3202 one-time key counts of the bridge's devices.
    pub device_one_time_keys_count: OneTimeKeyCounts,
    /// MSC3202 unused fallback key types of the bridge's devices.
    pub device_unused_fallback_key_types: UnusedFallbackKeyTypes,
    /// MSC3202 device list changes (stable and unstable names merged;
    /// malformed user ids left out).
    pub device_lists: DeviceLists,
    /// Megolm `m.room.encrypted` events, each decrypted or with why not:
    /// first those held from earlier transactions whose room key came in
    /// this one, then this transaction's own (in order; those whose key has
    /// not come yet are held, not listed), then held events given up (see
    /// [`crate::room_events`]).
    pub decrypted_events: Vec<crate::EncryptedRoomEvent>,
    /// Held events handed over here, forgotten once this is recorded.
    held_done: Vec<crate::room_events::HeldKey>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("txn_id", &self.txn_id)
            .field("events", &self.events.len())
            .field("ephemeral", &self.ephemeral.len())
            .field("to_device", &self.to_device)
            .field(
                "device_one_time_keys_count",
                &self.device_one_time_keys_count,
            )
            .field(
                "device_unused_fallback_key_types",
                &self.device_unused_fallback_key_types,
            )
            .field("device_lists", &self.device_lists)
            .field("decrypted_events", &self.decrypted_events)
            .field("held_done", &self.held_done.len())
            .finish()
    }
}

/// The Olm content of an `m.room.encrypted` to-device message.
#[derive(Deserialize)]
struct OlmContent {
    algorithm: String,
    sender_key: String,
    ciphertext: BTreeMap<String, OlmCiphertext>,
}

#[derive(Deserialize)]
struct OlmCiphertext {
    #[serde(rename = "type")]
    message_type: u8,
    body: String,
}

/// Decrypt `msg` if it is an Olm message to a puppet device. `Ok(None)`:
/// its payload failed verification, or an id in it is malformed: drop it. `Err` only for store failures
/// (the transaction then fails and is retried).
async fn open_to_device<H: BridgeHandler>(
    inner: &Inner<H>,
    msg: ToDeviceWire,
    delivery: &str,
    seen: &mut SeenMessages,
) -> Result<Option<ToDevice>, MatrixError> {
    let (user, device, sender) = (
        msg.to_user_id.clone(),
        msg.to_device_id.clone(),
        msg.sender.clone(),
    );
    match decrypt_to_device(inner, msg, delivery, seen).await? {
        Ok(opened) => Ok(opened),
        Err(e) => {
            inner.metrics.olm_payloads_refused.inc();
            tracing::warn!(to_user_id = %user, to_device_id = %device, %sender, error = %e, "dropped an Olm message whose payload failed verification");
            Ok(None)
        }
    }
}

/// [`open_to_device`]'s work; the inner `Err` is a refused payload.
async fn decrypt_to_device<H: BridgeHandler>(
    inner: &Inner<H>,
    msg: ToDeviceWire,
    delivery: &str,
    seen: &mut SeenMessages,
) -> Result<Result<Option<ToDevice>, OlmError>, MatrixError> {
    let (Ok(user_id), Ok(sender)) = (
        OwnedUserId::try_from(msg.to_user_id.as_str()),
        OwnedUserId::try_from(msg.sender.as_str()),
    ) else {
        // Not a message anyone could have sent or be sent (ids are
        // public; cut short, they cannot flood the log).
        let short = |id: &str| id.chars().take(80).collect::<String>();
        tracing::debug!(
            to_user_id = %short(&msg.to_user_id),
            sender = %short(&msg.sender),
            event_type = %short(&msg.event_type),
            "left out a to-device message with a malformed user id"
        );
        return Ok(Ok(None));
    };
    let device_id: OwnedDeviceId = msg.to_device_id.as_str().into();
    let other = |msg: ToDeviceWire, undecryptable: Option<String>| {
        Some(ToDevice::Other(RawToDevice {
            to_user_id: user_id.clone(),
            to_device_id: device_id.clone(),
            event_type: msg.event_type.as_str().into(),
            sender: sender.clone(),
            content: Raw::from_json(msg.content),
            undecryptable,
        }))
    };
    if msg.event_type != "m.room.encrypted" {
        return Ok(Ok(other(msg, None)));
    }
    if !inner.config.namespace.contains(&user_id) {
        return Ok(Ok(other(msg, None)));
    }
    let Ok(content) = serde_json::from_str::<OlmContent>(msg.content.get()) else {
        return Ok(Ok(other(msg, None)));
    };
    if content.algorithm != OLM_ALGORITHM {
        return Ok(Ok(other(msg, None)));
    }
    let identity = match inner.manager.identity_keys(&user_id, &device_id) {
        Ok(k) => k,
        Err(OlmError::Store(e)) => {
            return Err(MatrixError::internal(format!("store: {e}")));
        }
        // Not a device the bridge provisioned: not ours to decrypt.
        Err(_) => return Ok(Ok(other(msg, None))),
    };
    let Some(ciphertext) = content.ciphertext.get(&identity.curve25519.to_base64()) else {
        return Ok(Ok(other(msg, None)));
    };
    let sender_key = match Curve25519PublicKey::from_base64(&content.sender_key) {
        Ok(k) => k,
        Err(e) => return Ok(Ok(other(msg, Some(format!("bad sender_key: {e}"))))),
    };
    let message = match vodozemac_message(ciphertext.message_type, &ciphertext.body) {
        Ok(m) => m,
        Err(e) => return Ok(Ok(other(msg, Some(format!("bad Olm message: {e}"))))),
    };
    // The same message twice in one transaction: the second copy would find
    // the first one's delivery record and be handed over again.
    let (kind, bytes) = message.clone().to_parts();
    if !seen.insert((user_id.clone(), device_id.clone(), kind, bytes)) {
        inner.metrics.olm_undecryptable.inc();
        return Ok(Ok(other(
            msg,
            Some("a copy of an earlier message in this transaction".into()),
        )));
    }
    match inner
        .manager
        .decrypt_olm(
            (&user_id, &device_id),
            &sender,
            sender_key,
            &message,
            Some(delivery),
        )
        .await
    {
        Ok(olm) => {
            inner.metrics.olm_decrypted.inc();
            if olm.new_session {
                inner.metrics.prekeys_decrypted.inc();
            }
            if olm.used_fallback_key {
                // Rotate now, not at the next pass: until a new key is up,
                // a homeserver that does not proxy claims hands everyone
                // this used one.
                if let Some(provisioner) = inner.provisioner.get() {
                    provisioner.fallback_key_used(&user_id, &device_id);
                }
            }
            Ok(Ok(Some(ToDevice::Decrypted(Box::new(DecryptedToDevice {
                to_user_id: user_id,
                to_device_id: device_id,
                sender,
                sender_key,
                olm,
            })))))
        }
        Err(OlmError::Store(e)) => Err(MatrixError::internal(format!("store: {e}"))),
        Err(e @ OlmError::Payload(_)) => Ok(Err(e)),
        Err(e) => {
            inner.metrics.olm_undecryptable.inc();
            Ok(Ok(other(msg, Some(e.to_string()))))
        }
    }
}

/// The Olm messages of a transaction already opened: (device, message type
/// and bytes).
type SeenMessages = std::collections::HashSet<(OwnedUserId, OwnedDeviceId, usize, Vec<u8>)>;

/// An Olm message of `message_type` (0 pre-key, 1 normal) from base64.
fn vodozemac_message(message_type: u8, body: &str) -> Result<OlmMessage, String> {
    let bytes = bridgekeys_olm::vodozemac::base64_decode(body).map_err(|e| e.to_string())?;
    OlmMessage::from_parts(usize::from(message_type), &bytes).map_err(|e| e.to_string())
}

/// The delivery a transaction's pre-key messages are remembered under, so
/// that a retry of the same transaction (even after a crash) gets the same
/// plaintexts although their one-time keys are consumed.
fn delivery_tag<H: BridgeHandler>(inner: &Inner<H>, txn_id: &str) -> String {
    format!("txn/{}/{txn_id}", inner.config.txn_namespace)
}

/// Turn a parsed body into a [`Transaction`], decrypting pre-key messages.
async fn open_transaction<H: BridgeHandler>(
    inner: &Inner<H>,
    txn_id: OwnedTransactionId,
    body: TransactionBody,
) -> Result<Transaction, MatrixError> {
    let mut to_device = Vec::with_capacity(body.to_device.len() + body.to_device_unstable.len());
    let mut seen = SeenMessages::new();
    for msg in body.to_device_unstable.into_iter().chain(body.to_device) {
        if let Some(opened) =
            open_to_device(inner, msg, &delivery_tag(inner, txn_id.as_str()), &mut seen).await?
        {
            to_device.push(opened);
        }
    }
    // Room keys first: events held earlier, and events later in this
    // transaction, may need them.
    let keys = crate::room_events::take_room_keys(inner, &to_device).await?;
    let mut held_done = Vec::new();
    let mut decrypted_events = crate::room_events::release_held(inner, &keys, &mut held_done)?;
    let events: Vec<Raw<AnyTimelineEvent>> = body.events.into_iter().map(Raw::from_json).collect();
    decrypted_events.extend(crate::room_events::decrypt_events(inner, &events)?);
    decrypted_events.extend(crate::room_events::expire_held(inner, &mut held_done)?);
    let ephemeral = body
        .ephemeral_unstable
        .into_iter()
        .chain(body.ephemeral)
        .map(Raw::from_json)
        .collect();
    Ok(Transaction {
        txn_id,
        decrypted_events,
        held_done,
        events,
        ephemeral,
        to_device,
        device_one_time_keys_count: typed_counts(
            body.otk_count_stable
                .or(body.otk_counts_stable)
                .or(body.otk_count)
                .or(body.otk_counts)
                .unwrap_or_default(),
        ),
        device_unused_fallback_key_types: typed_fallback_types(
            body.unused_fallback_stable
                .or(body.unused_fallback)
                .unwrap_or_default(),
        ),
        device_lists: merge_device_lists(body.device_lists_stable, body.device_lists),
    })
}

/// The counts with typed keys; entries whose user id is malformed are left
/// out (they cannot be the bridge's devices).
fn typed_counts(wire: WireCounts) -> OneTimeKeyCounts {
    wire.into_iter()
        .filter_map(|(user, devices)| Some((OwnedUserId::try_from(user).ok()?, devices)))
        .map(|(user, devices)| {
            let devices = devices
                .into_iter()
                .map(|(device, counts)| {
                    let counts = counts
                        .into_iter()
                        .map(|(algorithm, n)| {
                            (
                                OneTimeKeyAlgorithm::from(algorithm),
                                UInt::try_from(n).unwrap_or(UInt::MAX),
                            )
                        })
                        .collect();
                    (OwnedDeviceId::from(device), counts)
                })
                .collect();
            (user, devices)
        })
        .collect()
}

/// The unused fallback key types with typed keys, as [`typed_counts`].
fn typed_fallback_types(wire: WireFallbackTypes) -> UnusedFallbackKeyTypes {
    wire.into_iter()
        .filter_map(|(user, devices)| Some((OwnedUserId::try_from(user).ok()?, devices)))
        .map(|(user, devices)| {
            let devices = devices
                .into_iter()
                .map(|(device, types)| {
                    let types = types.into_iter().map(OneTimeKeyAlgorithm::from).collect();
                    (OwnedDeviceId::from(device), types)
                })
                .collect();
            (user, devices)
        })
        .collect()
}

/// The stable and MSC3202 `device_lists`, merged (a homeserver sends one
/// or the other; if both, every user named in either counts, once);
/// malformed user ids left out.
fn merge_device_lists(
    stable: Option<WireDeviceLists>,
    unstable: Option<WireDeviceLists>,
) -> DeviceLists {
    let mut merged = DeviceLists::new();
    let mut seen = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    for lists in [stable, unstable].into_iter().flatten() {
        for user in lists.changed {
            if let Ok(user) = OwnedUserId::try_from(user)
                && seen.0.insert(user.clone())
            {
                merged.changed.push(user);
            }
        }
        for user in lists.left {
            if let Ok(user) = OwnedUserId::try_from(user)
                && seen.1.insert(user.clone())
            {
                merged.left.push(user);
            }
        }
    }
    merged
}

/// Feed MSC3202 unused fallback key types of the bridge's devices into the
/// fallback rotation: an entry without `signed_curve25519` means the
/// homeserver handed the device's fallback key out. Marks it used (durably)
/// so the rotation policy replaces it, and wakes the provisioner's rotation
/// task if one is attached. A failure is logged, never fails the
/// transaction: the report is a hint, and the key's age bounds its life
/// anyway.
async fn note_fallback_reports<H: BridgeHandler>(
    inner: &Inner<H>,
    reports: &UnusedFallbackKeyTypes,
) {
    for (user_id, devices) in reports {
        if !inner.config.namespace.contains(user_id) {
            continue;
        }
        for (device_id, types) in devices {
            let result = match inner.provisioner.get() {
                Some(p) => p
                    .note_unused_fallback_key_types(user_id, device_id, types)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None if types.contains(&OneTimeKeyAlgorithm::SignedCurve25519) => Ok(()),
                None => match inner.manager.mark_fallback_used(user_id, device_id).await {
                    Ok(_) | Err(OlmError::UnknownDevice { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            };
            if let Err(e) = result {
                tracing::warn!(%user_id, %device_id, error = %e, "could not record the fallback key report");
            }
        }
    }
}

/// Feed the uploaded pools ([`crate::pool`]) from a transaction: the
/// one-time key counts of puppet devices (each device named is contacted,
/// and a low count tops it up), to-device messages to puppet devices, and
/// invites of puppet users. Costs nothing outside pool mode but the counts'
/// walk; top-ups run in the background (their keys are durable first).
fn note_pool_contacts<H: BridgeHandler>(inner: &Inner<H>, transaction: &Transaction) {
    let Some(pool) = inner.pool.get() else {
        return;
    };
    let ours = |user: &str| {
        OwnedUserId::try_from(user)
            .ok()
            .filter(|u| inner.config.namespace.contains(u))
    };
    for (user_id, devices) in &transaction.device_one_time_keys_count {
        if !inner.config.namespace.contains(user_id) {
            continue;
        }
        for (device, counts) in devices {
            let count = counts
                .get(&OneTimeKeyAlgorithm::SignedCurve25519)
                .map_or(0, |n| u64::from(*n));
            pool.note_count(user_id, device, count);
        }
    }
    if pool.mode() != crate::ClaimMode::Pool {
        return;
    }
    for message in &transaction.to_device {
        match message {
            ToDevice::Decrypted(m) => pool.touch(&m.to_user_id, &m.to_device_id),
            ToDevice::Other(m) => {
                if inner.config.namespace.contains(&m.to_user_id) {
                    pool.touch(&m.to_user_id, &m.to_device_id);
                }
            }
        }
    }
    for event in &transaction.events {
        if let Some(user_id) = invited(event.json()).as_deref().and_then(ours) {
            pool.touch_user(&user_id);
        }
    }
}

/// The user an `m.room.member` invite event invites.
fn invited(event: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Member<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        state_key: Option<std::borrow::Cow<'a, str>>,
        content: Option<Membership<'a>>,
    }
    #[derive(Deserialize)]
    struct Membership<'a> {
        #[serde(borrow)]
        membership: Option<std::borrow::Cow<'a, str>>,
    }
    let member: Member<'_> = serde_json::from_str(event.get()).ok()?;
    let invite =
        member.kind == "m.room.member" && member.content?.membership.as_deref() == Some("invite");
    invite
        .then(|| member.state_key.map(|s| s.into_owned()))
        .flatten()
}

/// Transactions holding decrypted pre-key messages whose processing has not
/// been recorded yet, by id, so a retry hands over the same plaintext
/// instead of failing to decrypt again. In memory only and bounded: the
/// oldest entry is dropped past [`RetryCache::CAPACITY`] (its retry then
/// sees the messages as undecryptable, and a warning is logged).
#[derive(Default)]
pub(crate) struct RetryCache {
    entries: std::sync::Mutex<RetryEntries>,
}

/// The kept transactions by id, and their ids oldest first.
type RetryEntries = (
    std::collections::HashMap<String, Arc<Transaction>>,
    std::collections::VecDeque<String>,
);

impl RetryCache {
    /// Most transactions kept for a retry.
    pub(crate) const CAPACITY: usize = 256;

    fn take(&self, txn_id: &str) -> Option<Arc<Transaction>> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        let found = map.remove(txn_id);
        if found.is_some() {
            order.retain(|id| id != txn_id);
        }
        found
    }

    fn put(&self, txn_id: String, transaction: Arc<Transaction>) {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        if map.insert(txn_id.clone(), transaction).is_none() {
            order.push_back(txn_id);
        }
        while order.len() > Self::CAPACITY {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
                tracing::warn!(txn_id = ?oldest, "dropped decrypted messages kept for a retry: too many failing transactions");
            }
        }
    }
}

/// How long a transaction lease lasts past the request timeout. The
/// request is abandoned at the timeout, but only at an await point: a
/// store call that blocks past it would let the lease expire under a live
/// owner, so the lease is also renewed while held (every third of it).
const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// A held transaction lease: renewed while held, released on drop unless
/// the transaction was recorded, so a failed attempt leaves the id free for
/// the retry at once.
struct Lease<'a> {
    log: &'a dyn TransactionLog,
    namespace: &'a str,
    txn_id: &'a str,
    owner: &'a str,
    done: bool,
    /// Set by the renewal when another owner took the lease (ours
    /// expired): this attempt must not record the transaction.
    lost: Arc<std::sync::atomic::AtomicBool>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Lease<'_> {
    /// Whether the lease is still ours (checked right before recording).
    fn held(&self) -> bool {
        !self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The transaction is recorded: recording ended the lease.
    fn completed(&mut self) {
        self.done = true;
    }
}

/// Renew `owner`'s lease every third of `lease_ms` until aborted; note in
/// `lost` if another owner holds it or it was completed elsewhere.
///
/// The task holds the log weakly: an aborted task is only dropped at the
/// runtime's next turn, and a strong handle would keep the store open
/// (and a single-process store locked) past the listener's end.
fn renew(
    log: std::sync::Weak<dyn TransactionLog>,
    namespace: String,
    txn_id: String,
    owner: String,
    lease_ms: u64,
    lost: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = std::time::Duration::from_millis((lease_ms / 3).max(1));
        loop {
            tokio::time::sleep(every).await;
            let Some(log) = log.upgrade() else { return };
            match log.claim_transaction(&namespace, &txn_id, &owner, lease_ms) {
                Ok(TransactionClaim::Claimed) => {}
                Ok(other) => {
                    tracing::warn!(?txn_id, found = ?other, "the transaction lease was lost while processing; this attempt will not record it");
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                // Not renewed this time; the lease still runs.
                Err(e) => {
                    tracing::warn!(?txn_id, error = %e, "could not renew the transaction lease")
                }
            }
        }
    })
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.renewal.abort();
        if !self.done
            && let Err(e) = self
                .log
                .release_transaction(self.namespace, self.txn_id, self.owner)
        {
            // It expires on its own; the retry waits until then.
            tracing::warn!(txn_id = ?self.txn_id, error = %e, "could not release the transaction lease");
        }
    }
}

/// Claim the lease of a transaction (see
/// [`TransactionLog::claim_transaction`]); `None` if it was completed
/// before. While another process sharing the store holds it, wait: it
/// completes (then `None`) or gives it up (then it is ours). The request
/// timeout bounds the wait.
async fn claim<'a, H: BridgeHandler>(
    inner: &'a Inner<H>,
    namespace: &'a str,
    txn_id: &'a str,
) -> Result<Option<Lease<'a>>, MatrixError> {
    let log: &dyn TransactionLog = inner.txn_log.as_ref();
    let lease_ms = u64::try_from((inner.config.limits.request_timeout + LEASE_MARGIN).as_millis())
        .unwrap_or(u64::MAX);
    let mut pause = std::time::Duration::from_millis(20);
    let mut counted = false;
    loop {
        match log
            .claim_transaction(namespace, txn_id, &inner.txn_owner, lease_ms)
            .map_err(|e| MatrixError::internal(format!("transaction log: {e}")))?
        {
            TransactionClaim::Completed => return Ok(None),
            TransactionClaim::Claimed => {
                let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let renewal = renew(
                    Arc::downgrade(&inner.txn_log),
                    namespace.to_owned(),
                    txn_id.to_owned(),
                    inner.txn_owner.clone(),
                    lease_ms,
                    Arc::clone(&lost),
                );
                return Ok(Some(Lease {
                    log,
                    namespace,
                    txn_id,
                    owner: &inner.txn_owner,
                    done: false,
                    lost,
                    renewal,
                }));
            }
            TransactionClaim::HeldElsewhere { .. } => {
                if !counted {
                    counted = true;
                    inner.metrics.held_elsewhere.inc();
                    tracing::debug!(
                        ?txn_id,
                        "transaction is being processed by another process; waiting for it"
                    );
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            other => {
                return Err(MatrixError::internal(format!(
                    "transaction log: unexpected claim {other:?}"
                )));
            }
        }
    }
}

/// The handler of `PUT /transactions/{txnId}` (both prefixes).
pub(crate) async fn put_transaction<H: BridgeHandler>(
    State(inner): State<Arc<Inner<H>>>,
    MatrixPath(txn_id): MatrixPath<String>,
    MatrixJson(body): MatrixJson<TransactionBody>,
) -> Result<Json<serde_json::Map<String, serde_json::Value>>, MatrixError> {
    let ns = inner.config.txn_namespace.as_str();
    let (_guard, _) = inner
        .txn_locks
        .lock(&txn_id, || inner.metrics.in_flight_duplicates.inc())
        .await;
    let log: &dyn TransactionLog = inner.txn_log.as_ref();
    let Some(mut lease) = claim(&inner, ns, &txn_id).await? else {
        inner.metrics.duplicates.inc();
        tracing::debug!(
            ?txn_id,
            "duplicate transaction acknowledged without processing"
        );
        return Ok(Json(serde_json::Map::new()));
    };

    // A retry of a transaction whose pre-key messages were already
    // decrypted (their keys are consumed) reuses that work.
    let transaction = match inner.retry_cache.take(&txn_id) {
        Some(cached) => cached,
        None => Arc::new(open_transaction(&inner, txn_id.as_str().into(), body).await?),
    };
    note_fallback_reports(&inner, &transaction.device_unused_fallback_key_types).await;
    note_pool_contacts(&inner, &transaction);
    if let Some(olm) = inner.olm.get() {
        // Before the handler runs, so a handler that encrypts to a changed
        // user queries its devices afresh. A store failure fails the
        // transaction (retried), so no invalidation is lost.
        olm.note_device_lists(&transaction.device_lists)
            .await
            .map_err(|e| MatrixError::internal(format!("device tracking: {e}")))?;
    }
    if let Some(provisioner) = inner.provisioner.get() {
        // A puppet's own device list changed: make sure the homeserver
        // still has its device (stale-device pruning deletes them).
        for user in &transaction.device_lists.changed {
            if let Ok(user_id) = OwnedUserId::try_from(user.as_str())
                && inner.config.namespace.contains(&user_id)
            {
                provisioner.puppet_devices_changed(&user_id);
            }
        }
    }
    if let Some(rooms) = inner.rooms.get() {
        rooms
            .apply_events(&transaction.events)
            .await
            .map_err(|e| MatrixError::internal(format!("room state: {e}")))?;
    }
    let holds_plaintext = transaction
        .to_device
        .iter()
        .any(|m| matches!(m, ToDevice::Decrypted(_)))
        || !transaction.decrypted_events.is_empty();
    if holds_plaintext {
        // Kept until the record is durable: a handler failure, a timeout or
        // a failed record leaves it here for the homeserver's retry.
        inner
            .retry_cache
            .put(txn_id.clone(), Arc::clone(&transaction));
    }
    if let Err(e) = inner.handler.transaction(&transaction).await {
        tracing::warn!(?txn_id, error = %e.chain(), "bridge handler failed; the homeserver will retry");
        return Err(MatrixError::internal(
            "the bridge could not process the transaction",
        ));
    }
    if !lease.held() {
        // Another process took the transaction over while this attempt
        // ran too long: it records it, not this one.
        return Err(MatrixError::internal(
            "the transaction was taken over by another process",
        ));
    }
    log.record_transaction(ns, &txn_id)
        .map_err(|e| MatrixError::internal(format!("transaction log: {e}")))?
        .durable()
        .await
        .map_err(|e| MatrixError::internal(format!("transaction log: {e}")))?;
    lease.completed();
    if holds_plaintext {
        inner.retry_cache.take(&txn_id);
    }
    let delivered_olm = transaction
        .to_device
        .iter()
        .any(|m| matches!(m, ToDevice::Decrypted(_)));
    if delivered_olm {
        // Recorded for good: the decrypted plaintexts kept (sealed) for a
        // retry after a crash can go. If this fails they stay sealed on
        // disk, and a retry of this id is a duplicate anyway. (Room events
        // leave no delivery records: nothing to forget without Olm.)
        if let Err(e) = inner
            .manager
            .forget_deliveries(&delivery_tag(&inner, &txn_id))
            .await
        {
            tracing::warn!(?txn_id, error = %e, "could not forget the transaction's delivery records");
        }
    }
    crate::room_events::forget_held(&inner, &transaction.held_done);
    crate::room_events::after_recorded(&inner, &transaction.held_done).await;
    inner.metrics.transactions.inc();
    Ok(Json(serde_json::Map::new()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bridgekeys_store::testing::MemoryStore;

    /// Poll `check` until it holds, for at most 10 s.
    async fn eventually(mut check: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_lease_is_renewed_past_its_length_and_a_lease_taken_over_is_noticed() {
        let store = Arc::new(MemoryStore::new());
        let log: Arc<dyn TransactionLog> = store.clone();
        let lease_ms = 600;
        assert_eq!(
            log.claim_transaction("ns", "t", "a", lease_ms).unwrap(),
            TransactionClaim::Claimed
        );
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewal = renew(
            Arc::downgrade(&log),
            "ns".into(),
            "t".into(),
            "a".into(),
            lease_ms,
            Arc::clone(&lost),
        );
        // Three lease lengths later, the renewed lease still keeps "b" out.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(3 * lease_ms);
        while std::time::Instant::now() < until {
            assert!(
                matches!(
                    log.claim_transaction("ns", "t", "b", lease_ms).unwrap(),
                    TransactionClaim::HeldElsewhere { .. }
                ),
                "the lease expired although its owner renewed it"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!lost.load(std::sync::atomic::Ordering::SeqCst));

        // Taken over (as after an expiry under a stalled owner): the
        // renewal notices, so the owner will not record it.
        log.release_transaction("ns", "t", "a").unwrap();
        assert_eq!(
            log.claim_transaction("ns", "t", "b", lease_ms).unwrap(),
            TransactionClaim::Claimed
        );
        assert!(eventually(|| lost.load(std::sync::atomic::Ordering::SeqCst)).await);
        assert!(renewal.is_finished() || eventually(|| renewal.is_finished()).await);
    }

    #[test]
    fn the_debug_of_a_transaction_counts_its_events_and_prints_no_content() {
        let event = |body: &str| {
            Raw::from_json(
                serde_json::value::to_raw_value(&serde_json::json!({
                    "type": "m.room.message",
                    "content": {"msgtype": "m.text", "body": body},
                }))
                .unwrap(),
            )
        };
        let transaction = Transaction {
            txn_id: "txn-7".into(),
            events: vec![event("the launch code is 0000"), event("second")],
            ephemeral: vec![Raw::from_json(
                serde_json::value::to_raw_value(&serde_json::json!({
                    "type": "m.typing", "content": {"user_ids": ["@typing_secret:hs"]},
                }))
                .unwrap(),
            )],
            to_device: vec![ToDevice::Other(RawToDevice {
                to_user_id: "@echo_a:hs".try_into().unwrap(),
                to_device_id: "D".into(),
                event_type: "m.secret.send".into(),
                sender: "@alice:hs".try_into().unwrap(),
                content: Raw::from_json(
                    serde_json::value::to_raw_value(&serde_json::json!({"secret": "s3cr3t"}))
                        .unwrap(),
                ),
                undecryptable: None,
            })],
            device_one_time_keys_count: Default::default(),
            device_unused_fallback_key_types: Default::default(),
            device_lists: DeviceLists::new(),
            decrypted_events: Vec::new(),
            held_done: Vec::new(),
        };
        let printed = format!("{transaction:?}");
        assert!(printed.contains("txn-7"), "{printed}");
        assert!(printed.contains("events: 2"), "{printed}");
        assert!(printed.contains("m.secret.send"), "{printed}");
        for secret in ["launch code", "second", "typing_secret", "s3cr3t"] {
            assert!(!printed.contains(secret), "{secret:?} in {printed}");
        }
    }
}
