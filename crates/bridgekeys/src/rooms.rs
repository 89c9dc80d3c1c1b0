//! Encrypted rooms for puppets with ruma types: [`PuppetRooms`].
//!
//! A bridge author who has a ruma event content to post as a puppet, or an
//! `m.room.encrypted` event to read, should not need to know what Olm,
//! Megolm, a group session or a room key is. [`PuppetRooms`] puts the
//! pieces together:
//!
//! * [`PuppetRooms::encrypt_room_event`] reads what the bridge knows about
//!   the room ([`RoomStates`]: encrypted? with which rotation? who
//!   should read it?), makes sure the puppet has its device, shares the
//!   room key with every verified device of the members that lacks it and
//!   returns the `m.room.encrypted` content to send. The advanced ratchet
//!   is durable before the content is returned, so no message index is
//!   ever used twice; a room that is not encrypted is an error, never a
//!   plaintext fallback.
//! * [`PuppetRooms::decrypt_room_event`] decrypts an
//!   `m.room.encrypted` event with the room keys the puppets were sent,
//!   with the room, sender and replay checks, and gives back the inner
//!   event as a ruma [`AnyMessageLikeEvent`]. (Events that arrive in
//!   transactions are already decrypted by the listener:
//!   `Transaction::decrypted_events`.)

use std::sync::Arc;

use bridgekeys_appservice::{
    ProvisionError, Provisioner, PuppetOlm, PuppetOlmError, RoomStateError, RoomStates,
};
use bridgekeys_olm::OlmError;
use ruma::{
    OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, UserId,
    events::{
        AnyMessageLikeEvent, MessageLikeEventContent,
        room::encrypted::{OriginalSyncRoomEncryptedEvent, RoomEncryptedEventContent},
    },
    serde::Raw,
};
use serde::Serialize;

/// Why a room event could not be encrypted or decrypted. Nothing was sent
/// and nothing recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoomCryptoError {
    /// The room is not encrypted (as far as its state says): send the event
    /// in the clear yourself if that is what you want. This never does.
    #[error("{room} is not encrypted")]
    NotEncrypted {
        /// The room.
        room: OwnedRoomId,
    },
    /// The room asks for an algorithm puppets do not speak.
    #[error("{room} asks for {algorithm}, which puppets do not speak")]
    UnsupportedAlgorithm {
        /// The room.
        room: OwnedRoomId,
        /// What it asks for.
        algorithm: String,
    },
    /// The room's state could not be read.
    #[error("room state: {0}")]
    RoomState(#[from] RoomStateError),
    /// The puppet's device could not be made ready.
    #[error("the puppet's device: {0}")]
    Device(#[from] ProvisionError),
    /// Encrypting or sharing the room key failed.
    #[error("encrypting: {0}")]
    Encrypt(#[from] PuppetOlmError),
    /// Decrypting failed or was refused (unknown session, another room,
    /// another sender, a replayed message index).
    #[error("decrypting: {0}")]
    Decrypt(#[from] OlmError),
    /// An event or content that does not have the expected shape.
    #[error("malformed event: {0}")]
    Malformed(String),
}

/// A room event encrypted for a puppet, ready to send as `m.room.encrypted`.
#[derive(Debug)]
#[non_exhaustive]
pub struct EncryptedContent {
    /// The content to send (event type `m.room.encrypted`).
    pub content: RoomEncryptedEventContent,
    /// The Megolm session it was encrypted with.
    pub session_id: String,
    /// Whether a new session was started for it (rotation).
    pub rotated: bool,
    /// Devices that could not be sent the room key: they cannot read this
    /// event (they are tried again with the next one).
    pub key_failed: Vec<(OwnedUserId, OwnedDeviceId)>,
}

/// A decrypted room event.
#[derive(Debug)]
#[non_exhaustive]
pub struct DecryptedEvent {
    /// The inner event with the outer event's id, sender, time and room.
    /// Never log its content.
    pub event: Raw<AnyMessageLikeEvent>,
    /// The Megolm session that decrypted it.
    pub session_id: String,
    /// Its message index in that session.
    pub message_index: u32,
    /// Whether the sending device's keys were tracked and matched.
    pub sender_device_verified: bool,
}

/// Encrypted rooms for puppets, with ruma types (see the module docs).
#[derive(Clone, Debug)]
pub struct PuppetRooms {
    olm: Arc<PuppetOlm>,
    rooms: Arc<RoomStates>,
    provisioner: Arc<Provisioner>,
}

impl PuppetRooms {
    /// Over the bridge's Olm (`PuppetOlm`), room state (attach the same
    /// [`RoomStates`] to the listener with `Appservice::with_room_states`
    /// so it follows the transactions) and provisioner (puppet devices).
    pub fn new(olm: Arc<PuppetOlm>, rooms: Arc<RoomStates>, provisioner: Arc<Provisioner>) -> Self {
        Self {
            olm,
            rooms,
            provisioner,
        }
    }

    /// Encrypt `content` from `puppet` (a member of `room_id`) for the
    /// room's members. Send the result as `m.room.encrypted` as the puppet.
    pub async fn encrypt_room_event<C>(
        &self,
        puppet: &UserId,
        room_id: &RoomId,
        content: &C,
    ) -> Result<EncryptedContent, RoomCryptoError>
    where
        C: MessageLikeEventContent + Serialize,
    {
        let state = self.rooms.ensure(room_id, puppet).await?;
        let encryption =
            state
                .encryption
                .as_ref()
                .ok_or_else(|| RoomCryptoError::NotEncrypted {
                    room: room_id.to_owned(),
                })?;
        if !encryption.is_megolm() {
            return Err(RoomCryptoError::UnsupportedAlgorithm {
                room: room_id.to_owned(),
                algorithm: encryption.algorithm.clone(),
            });
        }
        let device = self.provisioner.ensure_puppet(puppet).await?;
        let plain = serde_json::to_value(content)
            .map_err(|e| RoomCryptoError::Malformed(format!("the content: {e}")))?;
        let sent = self
            .olm
            .encrypt_room_event(
                (puppet, &device),
                room_id,
                &state.recipients(),
                encryption.rotation(),
                &content.event_type().to_string(),
                &plain,
            )
            .await?;
        let encrypted = serde_json::from_value(sent.content)
            .map_err(|e| RoomCryptoError::Malformed(format!("the encrypted content: {e}")))?;
        Ok(EncryptedContent {
            content: encrypted,
            session_id: sent.session_id,
            rotated: sent.rotated,
            key_failed: sent
                .key_failed
                .into_iter()
                .map(|(user, device, _)| (user, device))
                .collect(),
        })
    }

    /// Decrypt `event`, an `m.room.encrypted` event of `room_id`, with the
    /// room keys the puppets hold.
    pub fn decrypt_room_event(
        &self,
        room_id: &RoomId,
        event: &OriginalSyncRoomEncryptedEvent,
    ) -> Result<DecryptedEvent, RoomCryptoError> {
        let content = serde_json::value::to_raw_value(&event.content)
            .map_err(|e| RoomCryptoError::Malformed(format!("the content: {e}")))?;
        let decrypted = self.olm.manager().decrypt_room_event(
            room_id,
            &event.sender,
            event.event_id.as_str(),
            &content,
        )?;
        let inner = serde_json::json!({
            "type": decrypted.event_type,
            "content": decrypted.content,
            "event_id": event.event_id,
            "sender": event.sender,
            "origin_server_ts": event.origin_server_ts,
            "room_id": room_id,
        });
        let event = serde_json::value::to_raw_value(&inner)
            .map(Raw::from_json)
            .map_err(|e| RoomCryptoError::Malformed(format!("the inner event: {e}")))?;
        Ok(DecryptedEvent {
            event,
            session_id: decrypted.session_id,
            message_index: decrypted.message_index,
            sender_device_verified: decrypted.sender_device_verified,
        })
    }
}
