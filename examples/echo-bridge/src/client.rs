//! The few client-server calls the echo bridge makes as its puppets (join,
//! send), masquerading with the `as_token` and `?user_id=`.
//!
//! `bridgekeys_appservice::HomeserverClient` covers provisioning only
//! (register, devices, key uploads), so this small client lives here.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// Largest answer read (join and send answers are tiny).
const MAX_ANSWER: usize = 64 * 1024;

/// The homeserver answered a call with an error status.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// The Matrix error body.
    pub answer: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "homeserver answered {}: {}", self.status, self.answer)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// A 4xx other than 429: asking again will get the same answer.
    pub fn is_permanent(&self) -> bool {
        (400..500).contains(&self.status) && self.status != 429
    }
}

/// Acts as the appservice's users on the homeserver.
#[derive(Clone)]
pub struct PuppetClient {
    authority: http::uri::Authority,
    as_token: Zeroizing<String>,
    timeout: Duration,
}

impl std::fmt::Debug for PuppetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PuppetClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// Percent-encode everything but RFC 3986 unreserved characters.
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

impl PuppetClient {
    /// A client for `homeserver_url` (`http://host:port`).
    pub fn new(homeserver_url: &str, as_token: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = homeserver_url
            .trim_end_matches('/')
            .parse()
            .context("homeserver url")?;
        if uri.scheme_str() != Some("http") {
            bail!("the homeserver url must be http:// (as bridgekeys' own client)");
        }
        let authority = uri
            .authority()
            .cloned()
            .context("the homeserver url has no host")?;
        Ok(Self {
            authority,
            as_token: Zeroizing::new(as_token.to_owned()),
            timeout: Duration::from_secs(30),
        })
    }

    /// `POST /rooms/{roomId}/join` as `user`.
    pub async fn join(&self, room: &RoomId, user: &UserId) -> anyhow::Result<()> {
        let path = format!("/_matrix/client/v3/rooms/{}/join", encode(room.as_str()));
        self.call(http::Method::POST, &path, user, Some(&json!({})))
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
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            encode(room.as_str()),
            encode(txn_id)
        );
        let answer = self
            .call(
                http::Method::PUT,
                &path,
                user,
                Some(&json!({ "msgtype": "m.text", "body": body })),
            )
            .await
            .with_context(|| format!("{user} sending to {room}"))?;
        Ok(answer["event_id"].as_str().unwrap_or_default().to_owned())
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
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            encode(room.as_str()),
            encode(event_type),
            encode(txn_id)
        );
        let answer = self
            .call(http::Method::PUT, &path, user, Some(content))
            .await
            .with_context(|| format!("{user} sending to {room}"))?;
        Ok(answer["event_id"].as_str().unwrap_or_default().to_owned())
    }

    /// The rooms `user` has joined (`GET /joined_rooms` as `user`).
    pub async fn joined_rooms(&self, user: &UserId) -> anyhow::Result<Vec<OwnedRoomId>> {
        let answer = self
            .call(
                http::Method::GET,
                "/_matrix/client/v3/joined_rooms",
                user,
                None,
            )
            .await
            .with_context(|| format!("listing the rooms of {user}"))?;
        let rooms = answer["joined_rooms"]
            .as_array()
            .context("the answer has no joined_rooms")?
            .iter()
            .filter_map(|r| r.as_str().and_then(|r| OwnedRoomId::try_from(r).ok()))
            .collect();
        Ok(rooms)
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        user: &UserId,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let uri = format!("{path}?user_id={}", encode(user.as_str()));
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.as_token.as_str()),
            )
            .body(Full::new(
                body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
            ))
            .context("building the request")?;
        let (status, answer) = tokio::time::timeout(self.timeout, self.send(request))
            .await
            .context("the homeserver did not answer in time")??;
        if !status.is_success() {
            // The answer is a Matrix error: errcode and message, no secrets.
            return Err(Refused {
                status: status.as_u16(),
                answer: answer.to_string(),
            }
            .into());
        }
        Ok(answer)
    }

    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> anyhow::Result<(http::StatusCode, Value)> {
        let host = self.authority.host();
        let port = self.authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .context("connecting to the homeserver")?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "homeserver connection closed with an error");
            }
        });
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_percent_encoded_and_the_token_is_not_printed() {
        assert_eq!(encode("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(encode("@echo_bob:hs"), "%40echo_bob%3Ahs");
        let client = PuppetClient::new("http://127.0.0.1:8008", "secret-token").expect("client");
        assert!(!format!("{client:?}").contains("secret-token"));
        assert!(PuppetClient::new("https://hs", "t").is_err());
    }
}
