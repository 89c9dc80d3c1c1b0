//! The few client-server calls the echo bridge makes as its puppets (join,
//! send, list joined rooms), masquerading with the `as_token` and
//! `?user_id=`.
//!
//! The requests are ruma's client-api types, sent through
//! `bridgekeys_appservice::HomeserverClient::call`: the same transport as
//! provisioning and Olm (`http://` or `https://`, pooled connections,
//! timeout, retries of transient failures with backoff and `retry_after`).

use anyhow::Context;
use bridgekeys::appservice::{HomeserverClient, HomeserverError};
use ruma::{
    OwnedRoomId, OwnedTransactionId, RoomId, UserId,
    api::client::{
        membership::{join_room_by_id, joined_rooms},
        message::send_message_event,
    },
    events::{AnyMessageLikeEventContent, MessageLikeEventType},
    serde::Raw,
};
use serde_json::{Value, json};

/// Will the homeserver give the same refusal whatever we do? A Matrix
/// error with a 4xx status other than 429.
pub fn is_permanent(error: &HomeserverError) -> bool {
    matches!(error, HomeserverError::Matrix { status, .. } if (400..500).contains(status) && !error.is_transient())
}

/// Percent-encode everything but RFC 3986 unreserved characters (the
/// demo's raw calls; the bridge itself builds its calls from ruma types).
#[cfg(any(feature = "demo", test))]
pub fn encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Acts as the appservice's users on the homeserver.
#[derive(Clone, Debug)]
pub struct PuppetClient {
    homeserver: HomeserverClient,
}

impl PuppetClient {
    /// Puppet calls through `homeserver` (a clone shares its connections).
    pub fn new(homeserver: HomeserverClient) -> Self {
        Self { homeserver }
    }

    /// `POST /rooms/{roomId}/join` as `user`.
    pub async fn join(&self, room: &RoomId, user: &UserId) -> anyhow::Result<()> {
        let request = join_room_by_id::v3::Request::new(room.to_owned());
        self.homeserver
            .call(request, Some(user), None)
            .await
            .with_context(|| format!("{user} joining {room}"))?;
        Ok(())
    }

    /// Send an `m.text` message as `user`. `txn_id` makes retries
    /// idempotent: the homeserver returns the first event for a repeated one.
    pub async fn send_text(
        &self,
        room: &RoomId,
        user: &UserId,
        txn_id: &str,
        body: &str,
    ) -> anyhow::Result<String> {
        let content = json!({ "msgtype": "m.text", "body": body });
        self.send_event(room, user, "m.room.message", txn_id, &content)
            .await
    }

    /// Send an event of any type as `user` (for example an
    /// `m.room.encrypted` content). `txn_id` makes retries idempotent.
    pub async fn send_event(
        &self,
        room: &RoomId,
        user: &UserId,
        event_type: &str,
        txn_id: &str,
        content: &Value,
    ) -> anyhow::Result<String> {
        let raw: Raw<AnyMessageLikeEventContent> =
            Raw::new(content).context("event content")?.cast_unchecked();
        let request = send_message_event::v3::Request::new_raw(
            room.to_owned(),
            OwnedTransactionId::from(txn_id),
            MessageLikeEventType::from(event_type),
            raw,
        );
        let answer = self
            .homeserver
            .call(request, Some(user), None)
            .await
            .with_context(|| format!("{user} sending to {room}"))?;
        Ok(answer.event_id.to_string())
    }

    /// The rooms `user` has joined (`GET /joined_rooms` as `user`).
    pub async fn joined_rooms(&self, user: &UserId) -> anyhow::Result<Vec<OwnedRoomId>> {
        let answer = self
            .homeserver
            .call(joined_rooms::v3::Request::new(), Some(user), None)
            .await
            .with_context(|| format!("listing the rooms of {user}"))?;
        Ok(answer.joined_rooms)
    }
}

#[cfg(test)]
mod tests {
    use bridgekeys::appservice::AsToken;

    use super::*;

    #[test]
    fn ids_are_percent_encoded_and_the_token_is_not_printed() {
        assert_eq!(encode("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(encode("@echo_bob:hs"), "%40echo_bob%3Ahs");
        let hs = HomeserverClient::new("https://127.0.0.1:8448", AsToken::new("secret-token"))
            .expect("client");
        let client = PuppetClient::new(hs);
        assert!(!format!("{client:?}").contains("secret-token"));
    }

    #[test]
    fn only_a_4xx_other_than_429_is_permanent() {
        let matrix = |status| HomeserverError::Matrix {
            status,
            errcode: "M_X".into(),
            error: String::new(),
            retry_after: None,
        };
        assert!(is_permanent(&matrix(403)));
        assert!(!is_permanent(&matrix(429)));
        assert!(!is_permanent(&matrix(502)));
        assert!(!is_permanent(&HomeserverError::Network("reset".into())));
    }
}
