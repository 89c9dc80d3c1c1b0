//! The trait a bridge implements: what to do with transactions and queries.

use std::future::Future;

use ruma::{OwnedDeviceId, OwnedUserId, RoomAliasId, RoomId, UserId};

use crate::transactions::Transaction;

/// A bridge's handler failed. The listener answers 500 `M_UNKNOWN` and does
/// not record the transaction, so the homeserver retries it.
///
/// It carries what failed as a source error ([`std::error::Error::source`]),
/// so the listener's log line shows the whole chain; never put secrets in
/// either.
#[derive(Debug, thiserror::Error)]
#[error("bridge handler failed: {reason}")]
pub struct HandlerError {
    reason: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A handler error with a reason and no underlying error.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            source: None,
        }
    }

    /// A handler error caused by `source`, with what the handler was doing.
    pub fn with_source(
        reason: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    /// What the handler was doing.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The error and every source under it, `: `-separated, for one log
    /// line.
    pub(crate) fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            out.push_str(": ");
            out.push_str(&e.to_string());
            next = e.source();
        }
        out
    }
}

/// The bridge's answer to `GET /users/{userId}` for a user in its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserDecision {
    /// The user does not exist on the remote side: 404 `M_NOT_FOUND`.
    Reject,
    /// The user exists. The handler has registered it with the homeserver
    /// (the spec asks that before the 200); the listener then creates the
    /// puppet device's Olm account with `device_id`, or the configured
    /// [`crate::AppserviceConfig::puppet_device_id`] if `None`.
    Accept {
        /// The puppet's device id, if the bridge chooses its own.
        device_id: Option<OwnedDeviceId>,
    },
}

/// What a bridge plugs into the listener.
///
/// Every method may be called concurrently. The listener has already
/// checked the homeserver token, the body shape and, for users, the
/// namespace.
pub trait BridgeHandler: Send + Sync + 'static {
    /// Process one transaction (events, ephemeral events, to-device
    /// messages with pre-key messages already decrypted, MSC3202 fields).
    ///
    /// Return `Ok` only once its effects are done: the transaction id is then
    /// recorded durably and never handed over again. An `Err` makes the
    /// homeserver retry the whole transaction later. A crash between `Ok`
    /// and the durable record also leads to a retry, so effects should be
    /// idempotent per event id (delivery is at least once, never zero).
    ///
    /// The transaction is lent, not given: if the handler fails, the
    /// listener keeps the decrypted to-device messages for the retry (their
    /// one-time keys are already consumed, so they could not be decrypted
    /// again). Copy out what you keep.
    fn transaction(
        &self,
        transaction: &Transaction,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Does this in-namespace user exist? Default: no.
    fn query_user(
        &self,
        user_id: &UserId,
    ) -> impl Future<Output = Result<UserDecision, HandlerError>> + Send {
        let _ = user_id;
        async { Ok(UserDecision::Reject) }
    }

    /// Does this room alias exist (the handler creates the room before
    /// answering `true`)? Default: no.
    fn query_room_alias(
        &self,
        alias: &RoomAliasId,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send {
        let _ = alias;
        async { Ok(false) }
    }

    /// Which puppet device asks `sender`'s devices for a room key of
    /// `room_id` that has not arrived (`m.room_key_request`, see
    /// [`crate::Limits::room_key_request_after`]): one of the bridge's
    /// puppets that was in the room when the session was shared (a client
    /// only answers devices it shared the session with), as (user, device).
    /// Held events are kept per room, not per puppet, so the bridge, which
    /// knows its puppets' rooms, names it. `None`: no request for this
    /// room. Default: `None`, the bridge never asks.
    fn room_key_requester(
        &self,
        room_id: &RoomId,
        sender: &UserId,
    ) -> impl Future<Output = Option<(OwnedUserId, OwnedDeviceId)>> + Send {
        let _ = (room_id, sender);
        async { None }
    }
}
