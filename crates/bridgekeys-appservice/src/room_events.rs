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

use bridgekeys_olm::{DecryptedRoomEvent, MEGOLM_ALGORITHM, MegolmError, OlmError};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{BridgeHandler, MatrixError, server::Inner, transactions::ToDevice};

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
struct SessionOnly {
    session_id: String,
}

#[derive(Deserialize)]
struct Algorithm {
    algorithm: Option<String>,
}

/// What a held event keeps: when it was held, and the event as received.
#[derive(serde::Serialize, Deserialize)]
struct Held {
    held_ms: u64,
    sender: OwnedUserId,
    content: Box<RawValue>,
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
/// A refused key is logged and skipped; a store failure fails the
/// transaction (it is retried).
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

/// A held event's (room id, session id, event id).
pub(crate) type HeldKey = (String, String, String);

/// Forget held events handed over by a transaction that is now recorded.
/// A failure is logged: the event is then handed over again later (at
/// least once, as with any redelivery).
pub(crate) fn forget_held<H: BridgeHandler>(inner: &Inner<H>, done: &[HeldKey]) {
    for (room, session, event) in done {
        if let Err(e) = inner.manager.store().hold_event(room, session, event, None) {
            tracing::warn!(%room, %event, error = %e, "could not forget a held event");
        }
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
                done.push((
                    room_id.to_string(),
                    session_id.clone(),
                    held.event_id.clone(),
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
    let max_age = limits.held_event_max_age.as_millis() as u64;
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
        done.push((h.room_id.clone(), h.session_id.clone(), h.event_id.clone()));
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
    events: &[Box<RawValue>],
) -> Result<Vec<EncryptedRoomEvent>, MatrixError> {
    let mut out = Vec::new();
    for raw in events {
        let Ok(event) = serde_json::from_str::<Envelope<'_>>(raw.get()) else {
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
        let algorithm = serde_json::from_str::<Algorithm>(content.get())
            .ok()
            .and_then(|a| a.algorithm);
        if algorithm.as_deref() != Some(MEGOLM_ALGORITHM) {
            continue;
        }
        let Some(decrypted) = decrypt_one(inner, &room_id, &sender, &event_id, content)? else {
            // Its room key has not come (yet): hold it, sealed, until it
            // does. Applied now, durable with the transaction's record.
            let session_id = serde_json::from_str::<SessionOnly>(content.get())
                .map(|s| s.session_id)
                .unwrap_or_default();
            let record = Held {
                held_ms: now_ms(),
                sender,
                content: content.to_owned(),
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
            inner.metrics.held_events.inc();
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
