//! Encrypted room events in transactions: room keys that arrived in the
//! transaction's verified Olm messages are stored first, then every
//! `m.room.encrypted` Megolm room event is decrypted (room, sender and
//! replay checks in [`bridgekeys_olm::megolm`]).
//!
//! The raw events stay in [`crate::Transaction::events`]; the results are
//! in [`crate::Transaction::decrypted_events`]. A key that arrives in the
//! same transaction as its events is used for them (to-device messages are
//! processed first).
//!
//! **Keys that come late.** The homeserver does not order to-device
//! messages and room events: an event whose session is unknown is *held*,
//! sealed in the store (bounded by [`crate::Limits::max_held_events`]), and
//! not handed over yet. When its room key arrives (in any later
//! transaction) the event is decrypted and handed over in that
//! transaction's `decrypted_events`. One held longer than
//! [`crate::Limits::held_event_max_age`], or pushed out by the bound, is
//! handed over once as undecryptable ([`MegolmError::UnknownSession`]).
//!
//! **Keys that never come: `m.room_key_request`.** To-device messages sent
//! while the bridge was down can be lost. Once a held event has waited
//! [`crate::Limits::room_key_request_after`] (default 60 s; `None` never
//! asks), the puppet device the bridge names for its room
//! ([`crate::BridgeHandler::room_key_requester`]; held events are kept per
//! room, not per puppet) sends **one** unencrypted `m.room_key_request` to
//! every device of the event's sender ([`crate::PuppetOlm::request_room_key`]):
//! one per (room, session), however many events wait for it (two processes
//! sharing a store may each send one; only one is noted). The request
//! (id, puppet device, time) is written into the session's held records,
//! durably, only once the homeserver took it: a retried transaction or a
//! restart does not ask again, and a failed send (logged, counted in
//! `room_key_requests_failed_total`) is tried again at the next check.
//! When the key comes, or the session's last held event is given up, the
//! same puppet device sends a `request_cancellation` with the same request
//! id (best effort: one attempt, logged on failure).
//!
//! The check runs after every recorded transaction (before its answer,
//! one `sendToDevice` attempt per due session) and whenever the bridge
//! calls [`crate::Appservice::request_room_keys`] (from a timer, if its
//! transactions can be rare); one check at a time. Without a
//! [`crate::PuppetOlm`] attached ([`crate::Appservice::with_olm`]) there is
//! no homeserver client to send with, and nothing is asked. A crash between
//! the send and its durable record asks once more after the restart.

use std::collections::{BTreeMap, HashSet};

use bridgekeys_olm::{DecryptedRoomEvent, MEGOLM_ALGORITHM, MegolmError, OlmError};
use ruma::{
    OwnedDeviceId, OwnedEventId, OwnedRoomId, OwnedUserId, events::AnyTimelineEvent, serde::Raw,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{
    BridgeHandler, MatrixError, olm::RoomKeyRequest, server::Inner, transactions::ToDevice,
};

/// One encrypted room event of a transaction, and what decrypting it gave.
#[derive(Debug)]
pub struct EncryptedRoomEvent {
    /// The event id.
    pub event_id: OwnedEventId,
    /// The room.
    pub room_id: OwnedRoomId,
    /// The sender, as the homeserver states it.
    pub sender: OwnedUserId,
    /// The decrypted inner event, or why it could not be decrypted (for
    /// example [`MegolmError::UnknownSession`]: its room key has not
    /// arrived).
    pub decrypted: Result<DecryptedRoomEvent, MegolmError>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    event_type: String,
    event_id: Option<OwnedEventId>,
    room_id: Option<OwnedRoomId>,
    sender: Option<OwnedUserId>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SenderKeyOnly {
    sender_key: Option<String>,
}

/// What a held event keeps: when it was held, the event as received, and
/// the key request sent for its session, if any.
#[derive(serde::Serialize, Deserialize)]
struct Held {
    held_ms: u64,
    sender: OwnedUserId,
    content: Box<RawValue>,
    /// Absent in records written before key requests existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    requested: Option<Requested>,
}

/// An `m.room_key_request` the homeserver took for a held event's session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub(crate) struct Requested {
    /// The request id (its cancellation repeats it).
    request_id: String,
    /// When it was sent (ms since the epoch).
    requested_ms: u64,
    /// The puppet that asked.
    user_id: OwnedUserId,
    /// The puppet's device that asked.
    device_id: OwnedDeviceId,
}

/// Keeps key-request checks one at a time, and keeps a check's writes from
/// bringing back a held event that a recorded transaction just forgot.
#[derive(Default)]
pub(crate) struct KeyRequests {
    /// Held by the running check.
    check: tokio::sync::Mutex<()>,
    /// Held while held records are rewritten or forgotten.
    held: parking_lot::Mutex<()>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn store_error(e: impl std::fmt::Display) -> MatrixError {
    MatrixError::internal(format!("store: {e}"))
}

/// Store the room keys the transaction's decrypted Olm messages carry, and
/// return the (room, session) of each, for the held events they release.
/// A refused key is logged and skipped; a store failure, or a write that
/// lost every race to other processes, fails the transaction (it is
/// retried).
pub(crate) async fn take_room_keys<H: BridgeHandler>(
    inner: &Inner<H>,
    to_device: &[ToDevice],
) -> Result<Vec<(OwnedRoomId, String)>, MatrixError> {
    let mut taken = Vec::new();
    for message in to_device {
        let ToDevice::Decrypted(d) = message else {
            continue;
        };
        if d.olm.payload.event_type != "m.room_key" {
            continue;
        }
        match inner.manager.receive_room_key(&d.olm).await {
            Ok(outcome) => {
                inner.metrics.room_keys.inc();
                tracing::debug!(sender = %d.sender, ?outcome, "room key taken in");
                if let Ok(key) = serde_json::from_str::<KeyIds>(d.olm.payload.content.get()) {
                    taken.push((key.room_id, key.session_id));
                }
            }
            Err(OlmError::Store(e)) => return Err(MatrixError::internal(format!("store: {e}"))),
            // Other processes kept changing the session's record: nothing
            // was stored, and the key must not be dropped, so the
            // transaction fails and the homeserver sends it again.
            Err(e @ OlmError::Contended { .. }) => {
                return Err(MatrixError::internal(format!("room key: {e}")));
            }
            Err(e) => {
                tracing::warn!(sender = %d.sender, error = %e, "room key refused");
            }
        }
    }
    Ok(taken)
}

#[derive(Deserialize)]
struct KeyIds {
    room_id: OwnedRoomId,
    session_id: String,
}

/// Decrypt one event; `Ok(None)` if its session is unknown.
fn decrypt_one<H: BridgeHandler>(
    inner: &Inner<H>,
    room_id: &OwnedRoomId,
    sender: &OwnedUserId,
    event_id: &OwnedEventId,
    content: &RawValue,
) -> Result<Option<Result<DecryptedRoomEvent, MegolmError>>, MatrixError> {
    match inner
        .manager
        .decrypt_room_event(room_id, sender, event_id.as_str(), content)
    {
        Ok(event) => {
            inner.metrics.room_events_decrypted.inc();
            Ok(Some(Ok(event)))
        }
        Err(OlmError::Megolm(MegolmError::UnknownSession)) => Ok(None),
        Err(OlmError::Megolm(e)) => {
            inner.metrics.room_events_undecryptable.inc();
            Ok(Some(Err(e)))
        }
        Err(OlmError::Store(e)) => Err(store_error(e)),
        Err(e) => {
            inner.metrics.room_events_undecryptable.inc();
            Ok(Some(Err(MegolmError::Decryption(e.to_string()))))
        }
    }
}

/// A held event handed over by a transaction: its (room id, session id,
/// event id), and its session's key request with the sender asked.
#[derive(Debug)]
pub(crate) struct HeldKey {
    room_id: String,
    session_id: String,
    event_id: String,
    request: Option<(OwnedUserId, Requested)>,
}

impl HeldKey {
    fn new(room_id: &str, session_id: &str, event_id: &str, record: &Held) -> Self {
        Self {
            room_id: room_id.to_owned(),
            session_id: session_id.to_owned(),
            event_id: event_id.to_owned(),
            request: record.requested.clone().map(|r| (record.sender.clone(), r)),
        }
    }
}

/// Forget held events handed over by a transaction that is now recorded.
/// A failure is logged: the event is then handed over again later (at
/// least once, as with any redelivery).
pub(crate) fn forget_held<H: BridgeHandler>(inner: &Inner<H>, done: &[HeldKey]) {
    let _held = inner.key_requests.held.lock();
    for h in done {
        if let Err(e) =
            inner
                .manager
                .store()
                .hold_event(&h.room_id, &h.session_id, &h.event_id, None)
        {
            tracing::warn!(room = %h.room_id, event = %h.event_id, error = %e, "could not forget a held event");
        }
    }
}

/// After a transaction is recorded (and its handed-over held events
/// forgotten): take back the key requests of sessions it left with no
/// held event, then send the requests now due ([`request_due`]).
pub(crate) async fn after_recorded<H: BridgeHandler>(inner: &Inner<H>, done: &[HeldKey]) {
    cancel_requests(inner, done).await;
    request_due(inner).await;
}

/// Send `request_cancellation` for the key requests of `done`'s sessions
/// that have no held event left (the key came, or all were given up).
/// Best effort: one attempt, a failure is logged.
async fn cancel_requests<H: BridgeHandler>(inner: &Inner<H>, done: &[HeldKey]) {
    let Some(olm) = inner.olm.get() else {
        return;
    };
    let mut cancelled = HashSet::new();
    for h in done {
        let Some((sender, request)) = &h.request else {
            continue;
        };
        if !cancelled.insert(request.request_id.as_str()) {
            continue;
        }
        match inner
            .manager
            .store()
            .held_events(Some((&h.room_id, &h.session_id)))
        {
            Ok(left) if left.is_empty() => {}
            // Others of the session still wait: the request stands.
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(room = %h.room_id, error = %e, "could not read held events; key request not cancelled");
                continue;
            }
        }
        let puppet = (request.user_id.as_ref(), request.device_id.as_ref());
        match olm
            .cancel_room_key_request(puppet, sender, &request.request_id)
            .await
        {
            Ok(()) => {
                inner.metrics.room_key_request_cancellations.inc();
                tracing::debug!(room = %h.room_id, session_id = %h.session_id, %sender, request_id = %request.request_id, "room key request cancelled");
            }
            Err(e) => {
                tracing::warn!(room = %h.room_id, session_id = %h.session_id, %sender, request_id = %request.request_id, error = %e, "could not cancel a room key request");
            }
        }
    }
}

/// One held event of a session: its id and record.
type HeldRecord = (String, Held);

/// Send one `m.room_key_request` for each session whose oldest held event
/// has waited [`crate::Limits::room_key_request_after`] and that was not
/// asked for yet; record each sent request durably in the session's held
/// records. Skipped without a wait, without a [`crate::PuppetOlm`], or
/// while another check runs. Failures are logged and retried at the next
/// check.
pub(crate) async fn request_due<H: BridgeHandler>(inner: &Inner<H>) {
    let Some(wait) = inner.config.limits.room_key_request_after else {
        return;
    };
    let Some(olm) = inner.olm.get() else {
        return;
    };
    let Ok(_one_check) = inner.key_requests.check.try_lock() else {
        return;
    };
    let held = match inner.manager.store().held_events(None) {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, "could not read held events for key requests");
            return;
        }
    };
    let mut sessions: BTreeMap<(String, String), Vec<HeldRecord>> = BTreeMap::new();
    for h in held {
        let Ok(record) = serde_json::from_slice::<Held>(&h.record) else {
            continue;
        };
        sessions
            .entry((h.room_id, h.session_id))
            .or_default()
            .push((h.event_id, record));
    }
    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let now = now_ms();
    for ((room, session), events) in sessions {
        if let Some(request) = events.iter().find_map(|(_, r)| r.requested.clone()) {
            // Asked already (perhaps before a restart); events held since
            // then get the same request, so its cancellation finds it.
            if events.iter().any(|(_, r)| r.requested.is_none()) {
                mark_requested(inner, &room, &session, &request).await;
            }
            continue;
        }
        let Some((_, oldest)) = events.iter().min_by_key(|(_, r)| r.held_ms) else {
            continue;
        };
        if now.saturating_sub(oldest.held_ms) < wait_ms {
            continue;
        }
        let Ok(room_id) = OwnedRoomId::try_from(room.as_str()) else {
            continue;
        };
        let sender = oldest.sender.clone();
        let Some((user_id, device_id)) = inner.handler.room_key_requester(&room_id, &sender).await
        else {
            tracing::debug!(%room, session_id = %session, %sender, "no puppet named to request the room key");
            continue;
        };
        if !inner.config.namespace.contains(&user_id)
            || inner.manager.identity_keys(&user_id, &device_id).is_err()
        {
            tracing::warn!(%room, puppet = %user_id, device_id = %device_id, "the puppet named to request a room key is not a device of the bridge");
            continue;
        }
        let request = RoomKeyRequest {
            room_id,
            session_id: session.clone(),
            sender_key: serde_json::from_str::<SenderKeyOnly>(oldest.content.get())
                .ok()
                .and_then(|k| k.sender_key),
            request_id: crate::random_token(),
        };
        if let Err(e) = olm
            .request_room_key((&user_id, &device_id), &sender, &request)
            .await
        {
            inner.metrics.room_key_request_failures.inc();
            tracing::warn!(%room, session_id = %session, %sender, puppet = %user_id, error = %e, "could not send a room key request; trying again at the next check");
            continue;
        }
        inner.metrics.room_key_requests.inc();
        tracing::info!(%room, session_id = %session, %sender, puppet = %user_id, device_id = %device_id, request_id = %request.request_id, held = events.len(), "room key requested from the sender's devices");
        let requested = Requested {
            request_id: request.request_id,
            requested_ms: now,
            user_id,
            device_id,
        };
        mark_requested(inner, &room, &session, &requested).await;
    }
}

/// Write `request` into the session's held records that lack it, and wait
/// until that is on disk. A failure is logged (the session is then asked
/// for again at the next check).
async fn mark_requested<H: BridgeHandler>(
    inner: &Inner<H>,
    room: &str,
    session: &str,
    request: &Requested,
) {
    let store = inner.manager.store();
    let written = {
        // Only events still held: one a recorded transaction has just
        // forgotten must not come back. The lock keeps this process's
        // transactions out; another process sharing the store may forget
        // an event between our read and our write, so each record is
        // written only over what was read (then it is left alone).
        let _held = inner.key_requests.held.lock();
        match store.held_events(Some((room, session))) {
            Ok(events) => {
                let mut written = true;
                for h in events {
                    let Ok(mut record) = serde_json::from_slice::<Held>(&h.record) else {
                        continue;
                    };
                    if record.requested.is_some() {
                        continue;
                    }
                    record.requested = Some(request.clone());
                    let result = serde_json::to_vec(&record)
                        .map_err(|e| e.to_string())
                        .and_then(|bytes| {
                            store
                                .replace_held_event(
                                    room,
                                    session,
                                    &h.event_id,
                                    Some(&h.record),
                                    Some(&bytes),
                                )
                                .map_err(|e| e.to_string())
                        });
                    let result = match result {
                        Ok(Some(_applied)) => Ok(()),
                        Ok(None) => {
                            tracing::debug!(%room, event = %h.event_id, "a held event changed or was handed over elsewhere; its record is left as it is");
                            Ok(())
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        written = false;
                        tracing::warn!(%room, event = %h.event_id, error = %e, "could not record a room key request");
                    }
                }
                written
            }
            Err(e) => {
                tracing::warn!(%room, error = %e, "could not record a room key request");
                false
            }
        }
    };
    if written && let Err(e) = store.sync().durable().await {
        tracing::warn!(%room, error = %e, "a room key request's record is not on disk");
    }
}

/// Events held for the keys just taken in, decrypted now; they are
/// forgotten once the transaction is recorded ([`forget_held`]).
pub(crate) fn release_held<H: BridgeHandler>(
    inner: &Inner<H>,
    keys: &[(OwnedRoomId, String)],
    done: &mut Vec<HeldKey>,
) -> Result<Vec<EncryptedRoomEvent>, MatrixError> {
    let mut out = Vec::new();
    for (room_id, session_id) in keys {
        for held in inner
            .manager
            .store()
            .held_events(Some((room_id.as_str(), session_id)))
            .map_err(store_error)?
        {
            let (Ok(record), Ok(event_id)) = (
                serde_json::from_slice::<Held>(&held.record),
                OwnedEventId::try_from(held.event_id.as_str()),
            ) else {
                continue;
            };
            if let Some(decrypted) =
                decrypt_one(inner, room_id, &record.sender, &event_id, &record.content)?
            {
                // Forgotten only once this transaction is recorded: a crash
                // before that hands it over again (at least once).
                done.push(HeldKey::new(
                    room_id.as_str(),
                    session_id,
                    &held.event_id,
                    &record,
                ));
                inner.metrics.held_events_released.inc();
                out.push(EncryptedRoomEvent {
                    event_id,
                    room_id: room_id.clone(),
                    sender: record.sender,
                    decrypted,
                });
            }
        }
    }
    Ok(out)
}

/// Held events past their age, or beyond the bound (oldest first): given
/// up, handed over once as undecryptable.
pub(crate) fn expire_held<H: BridgeHandler>(
    inner: &Inner<H>,
    done: &mut Vec<HeldKey>,
) -> Result<Vec<EncryptedRoomEvent>, MatrixError> {
    let limits = &inner.config.limits;
    let now = now_ms();
    // A configured age past u64 milliseconds means "never", not a wrap.
    let max_age = u64::try_from(limits.held_event_max_age.as_millis()).unwrap_or(u64::MAX);
    let mut held: Vec<(u64, bridgekeys_store::HeldEvent, Held)> = inner
        .manager
        .store()
        .held_events(None)
        .map_err(store_error)?
        .into_iter()
        .filter_map(|h| {
            let record = serde_json::from_slice::<Held>(&h.record).ok()?;
            Some((record.held_ms, h, record))
        })
        .collect();
    held.sort_by_key(|(ms, _, _)| *ms);
    let over = held.len().saturating_sub(limits.max_held_events);
    let mut out = Vec::new();
    for (n, (held_ms, h, record)) in held.into_iter().enumerate() {
        if n >= over && now.saturating_sub(held_ms) < max_age {
            continue;
        }
        done.push(HeldKey::new(
            &h.room_id,
            &h.session_id,
            &h.event_id,
            &record,
        ));
        let (Ok(room_id), Ok(event_id)) = (
            OwnedRoomId::try_from(h.room_id.as_str()),
            OwnedEventId::try_from(h.event_id.as_str()),
        ) else {
            continue;
        };
        inner.metrics.held_events_expired.inc();
        inner.metrics.room_events_undecryptable.inc();
        out.push(EncryptedRoomEvent {
            event_id,
            room_id,
            sender: record.sender,
            decrypted: Err(MegolmError::UnknownSession),
        });
    }
    Ok(out)
}

/// Decrypt the transaction's Megolm room events; hold those whose room
/// key has not arrived.
pub(crate) fn decrypt_events<H: BridgeHandler>(
    inner: &Inner<H>,
    events: &[Raw<AnyTimelineEvent>],
) -> Result<Vec<EncryptedRoomEvent>, MatrixError> {
    // The transaction's Megolm events, in order.
    let mut candidates = Vec::new();
    for raw in events {
        let Ok(event) = serde_json::from_str::<Envelope<'_>>(raw.json().get()) else {
            continue;
        };
        if event.event_type != "m.room.encrypted" {
            continue;
        }
        let (Some(event_id), Some(room_id), Some(sender), Some(content)) =
            (event.event_id, event.room_id, event.sender, event.content)
        else {
            continue;
        };
        // One look at the content for both fields.
        let Ok(Outer {
            algorithm: Some(algorithm),
            session_id,
        }) = serde_json::from_str::<Outer<'_>>(content.get())
        else {
            continue;
        };
        if algorithm != MEGOLM_ALGORITHM {
            continue;
        }
        let session_id = session_id.unwrap_or_default().into_owned();
        candidates.push(Candidate {
            event_id,
            room_id,
            sender,
            content,
            session_id,
        });
    }
    let results = decrypt_candidates(inner, &candidates)?;
    let mut out = Vec::new();
    for (candidate, decrypted) in candidates.into_iter().zip(results) {
        let Candidate {
            event_id,
            room_id,
            sender,
            content,
            session_id,
        } = candidate;
        let Some(decrypted) = decrypted else {
            // Its room key has not come (yet): hold it, sealed, until it
            // does. Applied now, durable with the transaction's record.
            // Held already (a retried transaction): it keeps its age and
            // its session's key request, so the request is not sent again.
            let earlier = inner
                .manager
                .store()
                .held_events(Some((room_id.as_str(), &session_id)))
                .map_err(store_error)?
                .into_iter()
                .find(|h| h.event_id == event_id.as_str())
                .and_then(|h| serde_json::from_slice::<Held>(&h.record).ok());
            let again = earlier.is_some();
            let (held_ms, requested) =
                earlier.map_or((now_ms(), None), |h| (h.held_ms, h.requested));
            let record = Held {
                held_ms,
                sender,
                content: content.to_owned(),
                requested,
            };
            let record = serde_json::to_vec(&record).map_err(store_error)?;
            let _applied = inner
                .manager
                .store()
                .hold_event(
                    room_id.as_str(),
                    &session_id,
                    event_id.as_str(),
                    Some(&record),
                )
                .map_err(store_error)?;
            if !again {
                inner.metrics.held_events.inc();
            }
            continue;
        };
        out.push(EncryptedRoomEvent {
            event_id,
            room_id,
            sender,
            decrypted,
        });
    }
    Ok(out)
}

/// The outer fields of an `m.room.encrypted` content this module routes by.
#[derive(Deserialize)]
struct Outer<'a> {
    #[serde(borrow)]
    algorithm: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    session_id: Option<std::borrow::Cow<'a, str>>,
}

/// A Megolm room event of a transaction, parsed.
struct Candidate<'a> {
    event_id: OwnedEventId,
    room_id: OwnedRoomId,
    sender: OwnedUserId,
    content: &'a RawValue,
    session_id: String,
}

/// What [`decrypt_one`] gives for one candidate.
type Outcome = Option<Result<DecryptedRoomEvent, MegolmError>>;

/// Below this many events a transaction is decrypted on the calling thread
/// (starting a thread costs more than it saves).
const PARALLEL_FROM: usize = 8;

/// Decrypt `candidates`, in their order. Events of one Megolm session stay
/// on one thread, in order (its decoded session is cached advanced, and
/// replay records are taken in order); different sessions are spread over
/// the cores: a transaction from a bridge in many rooms carries one or two
/// events of each of many sessions.
fn decrypt_candidates<H: BridgeHandler>(
    inner: &Inner<H>,
    candidates: &[Candidate<'_>],
) -> Result<Vec<Outcome>, MatrixError> {
    let one = |c: &Candidate<'_>| decrypt_one(inner, &c.room_id, &c.sender, &c.event_id, c.content);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    if candidates.len() < PARALLEL_FROM || threads < 2 {
        return candidates.iter().map(one).collect();
    }
    // Sessions to threads: each session's events go to one bucket.
    let mut bucket_of: std::collections::HashMap<(&str, &str), usize> =
        std::collections::HashMap::new();
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); threads];
    for (i, c) in candidates.iter().enumerate() {
        let next = bucket_of.len() % threads;
        let b = *bucket_of
            .entry((c.room_id.as_str(), c.session_id.as_str()))
            .or_insert(next);
        buckets[b].push(i);
    }
    buckets.retain(|b| !b.is_empty());
    if buckets.len() < 2 {
        return candidates.iter().map(one).collect();
    }
    let mut results: Vec<Option<Outcome>> = (0..candidates.len()).map(|_| None).collect();
    let run = |bucket: &[usize]| -> Result<Vec<(usize, Outcome)>, MatrixError> {
        bucket
            .iter()
            .map(|&i| one(&candidates[i]).map(|o| (i, o)))
            .collect()
    };
    let done: Vec<Result<Vec<(usize, Outcome)>, MatrixError>> =
        std::thread::scope(|scope| {
            let (first, rest) = buckets
                .split_first()
                .map_or((&[][..], &[][..]), |(f, r)| (f.as_slice(), r));
            let others: Vec<_> = rest
                .iter()
                .map(|bucket| scope.spawn(|| run(bucket)))
                .collect();
            let mut all = vec![run(first)];
            for handle in others {
                all.push(handle.join().unwrap_or_else(|_| {
                    Err(MatrixError::internal("a decryption thread panicked"))
                }));
            }
            all
        });
    for part in done {
        for (i, outcome) in part? {
            results[i] = Some(outcome);
        }
    }
    Ok(results.into_iter().map(Option::flatten).collect())
}
