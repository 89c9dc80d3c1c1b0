//! Encrypted room events in transactions: room keys that arrived in the
//! transaction's verified Olm messages are stored first, then every
//! `m.room.encrypted` Megolm room event is decrypted (room, sender and
//! replay checks in [`bridgekeys_olm::megolm`]).
//!
//! The raw events stay in [`crate::Transaction::events`]; the results are
//! in [`crate::Transaction::decrypted_events`], one per encrypted event,
//! in order. A key that arrives in the same transaction as its events is
//! used for them (to-device messages are processed first).

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
struct Algorithm {
    algorithm: Option<String>,
}

/// Store the room keys the transaction's decrypted Olm messages carry.
/// A refused key is logged and skipped; a store failure fails the
/// transaction (it is retried).
pub(crate) async fn take_room_keys<H: BridgeHandler>(
    inner: &Inner<H>,
    to_device: &[ToDevice],
) -> Result<(), MatrixError> {
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
            }
            Err(OlmError::Store(e)) => return Err(MatrixError::internal(format!("store: {e}"))),
            Err(e) => {
                tracing::warn!(sender = %d.sender, error = %e, "room key refused");
            }
        }
    }
    Ok(())
}

/// Decrypt the transaction's Megolm room events.
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
        let decrypted =
            match inner
                .manager
                .decrypt_room_event(&room_id, &sender, event_id.as_str(), content)
            {
                Ok(event) => {
                    inner.metrics.room_events_decrypted.inc();
                    Ok(event)
                }
                Err(OlmError::Megolm(e)) => {
                    inner.metrics.room_events_undecryptable.inc();
                    Err(e)
                }
                Err(OlmError::Store(e)) => {
                    return Err(MatrixError::internal(format!("store: {e}")));
                }
                Err(e) => {
                    inner.metrics.room_events_undecryptable.inc();
                    Err(MegolmError::Decryption(e.to_string()))
                }
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
