//! The bridge's client towards its homeserver: the client-server calls
//! that give a puppet a device the homeserver knows, with keys, and the
//! ones a puppet device needs to talk Olm (query devices, claim their keys,
//! send to-device messages).
//!
//! Every request carries the `as_token` (Bearer) and asserts the puppet's
//! identity with the `user_id` (and for key uploads `device_id`) query
//! parameters (appservice identity assertion, device masquerading). Request
//! bodies and paths come from ruma's client-api types:
//!
//! | step | request |
//! |---|---|
//! | register | `POST /_matrix/client/v3/register` `{"type": "m.login.application_service", "username", "inhibit_login"}` |
//! | device (MSC4190) | `PUT /_matrix/client/v3/devices/{deviceId}?user_id=<puppet>` |
//! | keys | `POST /_matrix/client/v3/keys/upload?user_id=<puppet>&device_id=<device>` `{"device_keys", "fallback_keys"}` |
//! | query | `POST /_matrix/client/v3/keys/query?user_id=<puppet>&device_id=<device>` `{"device_keys": {user: []}}` |
//! | claim | `POST /_matrix/client/v3/keys/claim?user_id=<puppet>&device_id=<device>` `{"one_time_keys": {user: {device: "signed_curve25519"}}}` |
//! | to-device | `PUT /_matrix/client/v3/sendToDevice/{type}/{txnId}?user_id=<puppet>&device_id=<device>` `{"messages": {user: {device: content}}}` (or `{user: {"*": content}}`: all of a user's devices) |
//! | ping | `POST /_matrix/client/v1/appservice/{appserviceId}/ping` `{}` (the homeserver then calls our `/ping`) |
//!
//! Plain `http://` only (an appservice usually reaches its homeserver on a
//! local or private address); HTTP/1.1, one connection per request, which is
//! plenty for provisioning and rotation traffic. The token never appears in
//! logs or errors.

use std::{collections::BTreeMap, time::Duration};

use bridgekeys_olm::FallbackKey;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ruma::{
    DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedOneTimeKeyId, OwnedTransactionId,
    OwnedUserId, RoomId, UInt, UserId,
    api::{
        IncomingResponseExt, MatrixVersion, OutgoingRequest, OutgoingRequestAppserviceExt,
        SupportedVersions,
        auth_scheme::SendAccessToken,
        client::{
            account::register,
            appservice::request_ping,
            device::update_device,
            keys::{claim_keys, get_keys, upload_keys, upload_signatures, upload_signing_keys},
            session::login,
            state::get_state_events,
            to_device::send_event_to_device,
            uiaa::{MatrixUserIdentifier, UserIdentifier},
        },
    },
    encryption::{CrossSigningKey, DeviceKeys, OneTimeKey},
    events::{AnyToDeviceEventContent, ToDeviceEventType},
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
};
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

/// Largest homeserver answer read (register, device, keys/upload answers
/// are a few hundred bytes; a keys/query for a batch of users with many
/// devices can be a few hundred kilobytes).
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Device keys per user per device, as `keys/query` returns them.
pub type QueriedDevices =
    BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Raw<ruma::encryption::DeviceKeys>>>;

/// Claimed one-time keys per user per device, as `keys/claim` returns them
/// (at most one per device: we ask for one).
pub type ClaimedKeys =
    BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>>>;

/// Why a homeserver call failed.
#[derive(Debug, thiserror::Error)]
pub enum HomeserverError {
    /// The homeserver could not be reached or the exchange broke off
    /// (connect, I/O, timeout). Transient: retry.
    #[error("homeserver unreachable: {0}")]
    Network(String),
    /// The homeserver answered with a Matrix error.
    #[error("homeserver answered {status} {errcode}: {error}")]
    Matrix {
        /// HTTP status.
        status: u16,
        /// Matrix `errcode` (`M_UNKNOWN` if the body had none).
        errcode: String,
        /// Matrix `error` message.
        error: String,
    },
    /// A request could not be built or an answer not understood.
    #[error("homeserver protocol error: {0}")]
    Protocol(String),
}

impl HomeserverError {
    /// Worth retrying: network failures, 5xx and 429 (rate limited).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network(_) => true,
            Self::Matrix { status, .. } => *status >= 500 || *status == 429,
            Self::Protocol(_) => false,
        }
    }

    /// The Matrix errcode, if the homeserver sent one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Self::Matrix { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    fn matrix_error(&self) -> Option<&str> {
        match self {
            Self::Matrix { error, .. } => Some(error),
            _ => None,
        }
    }

    /// A 400 saying a key "already exists". We only ever send one content
    /// per key id (keys are persisted before their first upload), so this
    /// means the homeserver has our upload from an earlier attempt.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Self::Matrix { status: 400, .. })
            && self
                .matrix_error()
                .is_some_and(|e| e.to_ascii_lowercase().contains("already exists"))
    }
}

/// The appservice's `as_token`. Zeroized, never printed.
#[derive(Clone)]
pub struct AsToken(Zeroizing<String>);

impl AsToken {
    /// Wrap a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Zeroizing::new(token.into()))
    }
}

impl std::fmt::Debug for AsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsToken(<redacted>)")
    }
}

/// Outcome of a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// The user was created now.
    Created,
    /// The user existed already (`M_USER_IN_USE`): also success.
    AlreadyExisted,
}

#[derive(Deserialize)]
struct ErrorBody {
    errcode: Option<String>,
    error: Option<String>,
}

/// A client for the homeserver, acting as the appservice.
#[derive(Clone, Debug)]
pub struct HomeserverClient {
    base_url: String,
    authority: http::uri::Authority,
    as_token: AsToken,
    timeout: Duration,
    versions: SupportedVersions,
}

impl HomeserverClient {
    /// A client for the homeserver at `base_url` (`http://host:port`).
    pub fn new(base_url: &str, as_token: AsToken) -> Result<Self, HomeserverError> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base_url
            .parse()
            .map_err(|e| HomeserverError::Protocol(format!("homeserver url: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(HomeserverError::Protocol(
                "homeserver url must be http:// (TLS is not supported yet)".into(),
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| HomeserverError::Protocol("homeserver url has no host".into()))?;
        Ok(Self {
            base_url,
            authority,
            as_token,
            timeout: Duration::from_secs(30),
            // v1.1 for the v3 endpoints; v1.7 for the appservice ping.
            versions: SupportedVersions {
                versions: [MatrixVersion::V1_1, MatrixVersion::V1_7].into(),
                features: Default::default(),
            },
        })
    }

    /// Give up on a single request after `timeout` (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Register a puppet as the appservice (`m.login.application_service`).
    /// `inhibit_login` (MSC4190 registrations) creates no device; without it
    /// the homeserver creates `device_id` along with the user.
    /// `M_USER_IN_USE` is success ([`Registered::AlreadyExisted`]).
    pub async fn register(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        inhibit_login: bool,
    ) -> Result<Registered, HomeserverError> {
        let mut request = register::v3::Request::new();
        request.username = Some(user_id.localpart().to_owned());
        request.login_type = Some(register::LoginType::ApplicationService);
        request.inhibit_login = inhibit_login;
        if !inhibit_login {
            request.device_id = Some(device_id.to_owned());
        }
        match self.call(request, None, None).await {
            // The answer may carry an access token for the new device: it is
            // wiped unread (the appservice acts through its as_token).
            Ok(mut response) => {
                if let Some(token) = response.access_token.as_mut() {
                    token.zeroize();
                }
                Ok(Registered::Created)
            }
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(Registered::AlreadyExisted),
            Err(e) => Err(e),
        }
    }

    /// Create the device of an existing puppet without MSC4190: an
    /// `m.login.application_service` login naming `device_id` (the
    /// homeserver creates the device, or reuses it if it exists). The
    /// returned access token is wiped unread: logging it out would delete
    /// the device again, and the appservice acts through its `as_token`.
    pub async fn login_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), HomeserverError> {
        let identifier =
            UserIdentifier::Matrix(MatrixUserIdentifier::new(user_id.as_str().to_owned()));
        let mut request = login::v3::Request::new(login::v3::LoginInfo::ApplicationService(
            login::v3::ApplicationService::new(identifier),
        ));
        request.device_id = Some(device_id.to_owned());
        let mut response = self.call(request, None, None).await?;
        response.access_token.zeroize();
        Ok(())
    }

    /// Create (or touch) the puppet's device with MSC4190's
    /// `PUT /devices/{deviceId}` as that puppet. Idempotent on the homeserver.
    pub async fn create_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<(), HomeserverError> {
        let request = update_device::v3::Request::new(device_id.to_owned());
        self.call(request, Some(user_id), None).await.map(|_| ())
    }

    /// Upload the device's `device_keys` and/or its fallback key as that
    /// device. A 400 "already exists" is success: this client only ever
    /// sends one content per key id. Returns the one-time key counts.
    pub async fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: Option<&DeviceKeys>,
        fallback: Option<&FallbackKey>,
    ) -> Result<BTreeMap<OneTimeKeyAlgorithm, UInt>, HomeserverError> {
        let mut request = upload_keys::v3::Request::new();
        request.device_keys = device_keys
            .map(Raw::new)
            .transpose()
            .map_err(|e| HomeserverError::Protocol(format!("device keys: {e}")))?;
        if let Some(f) = fallback {
            let raw: Raw<OneTimeKey> = Raw::new(&f.key)
                .map_err(|e| HomeserverError::Protocol(format!("fallback key: {e}")))?
                .cast_unchecked();
            request.fallback_keys = BTreeMap::from([(f.key_id.clone(), raw)]);
        }
        match self.call(request, Some(user_id), Some(device_id)).await {
            Ok(response) => Ok(response.one_time_key_counts),
            Err(e) if e.is_already_exists() => {
                tracing::warn!(%user_id, %device_id, "homeserver already holds these keys; treating the upload as done");
                Ok(BTreeMap::new())
            }
            Err(e) => Err(e),
        }
    }

    /// `keys/device_signing/upload` as `user_id`: its master, self-signing
    /// and user-signing keys. Without interactive auth, as homeservers
    /// allow for a user's first upload and for a repeat of the same keys
    /// (MSC3967), so a retry is safe; anything else is refused (401).
    pub async fn upload_cross_signing_keys(
        &self,
        user_id: &UserId,
        master: &CrossSigningKey,
        self_signing: &CrossSigningKey,
        user_signing: &CrossSigningKey,
    ) -> Result<(), HomeserverError> {
        let raw = |key: &CrossSigningKey| {
            Raw::new(key).map_err(|e| HomeserverError::Protocol(format!("cross-signing key: {e}")))
        };
        let mut request = upload_signing_keys::v3::Request::new();
        request.master_key = Some(raw(master)?);
        request.self_signing_key = Some(raw(self_signing)?);
        request.user_signing_key = Some(raw(user_signing)?);
        self.call(request, Some(user_id), None).await.map(|_| ())
    }

    /// `keys/signatures/upload` as `user_id`: its device `signed` (device
    /// keys carrying the self-signing key's signature). A signature the
    /// homeserver refuses is an error naming why.
    pub async fn upload_device_signature(
        &self,
        user_id: &UserId,
        signed: &DeviceKeys,
    ) -> Result<(), HomeserverError> {
        let mut keys = upload_signatures::v3::SignedKeys::new();
        keys.add_device_keys(
            signed.device_id.clone(),
            Raw::new(signed).map_err(|e| HomeserverError::Protocol(format!("device keys: {e}")))?,
        );
        let request =
            upload_signatures::v3::Request::new(BTreeMap::from([(user_id.to_owned(), keys)]));
        let response = self.call(request, Some(user_id), None).await?;
        if let Some(failure) = response.failures.values().flat_map(|f| f.values()).next() {
            // ruma keeps the failure's fields private: read its wire form.
            let wire = serde_json::to_value(failure).unwrap_or_default();
            let text = |field: &str| wire[field].as_str().unwrap_or_default().to_owned();
            return Err(HomeserverError::Matrix {
                status: 400,
                errcode: text("errcode"),
                error: text("error"),
            });
        }
        Ok(())
    }

    /// `keys/query` as a puppet device: the device keys of `users` (all
    /// their devices). Users the homeserver could not answer for are
    /// simply absent (their servers are listed in its `failures`).
    pub async fn query_keys(
        &self,
        as_user: &UserId,
        as_device: &DeviceId,
        users: impl IntoIterator<Item = OwnedUserId>,
    ) -> Result<QueriedDevices, HomeserverError> {
        let mut request = get_keys::v3::Request::new();
        request.device_keys = users.into_iter().map(|u| (u, Vec::new())).collect();
        request.timeout = Some(Duration::from_secs(10));
        let response = self.call(request, Some(as_user), Some(as_device)).await?;
        if !response.failures.is_empty() {
            tracing::debug!(failures = ?response.failures.keys().collect::<Vec<_>>(), "keys/query could not reach some servers");
        }
        Ok(response.device_keys)
    }

    /// `keys/query` as the appservice's sender (no identity asserted): the
    /// devices of `users` as the homeserver knows them now. Used to notice
    /// a puppet device the homeserver lost.
    pub async fn query_keys_as_appservice(
        &self,
        users: impl IntoIterator<Item = OwnedUserId>,
    ) -> Result<QueriedDevices, HomeserverError> {
        let mut request = get_keys::v3::Request::new();
        request.device_keys = users.into_iter().map(|u| (u, Vec::new())).collect();
        request.timeout = Some(Duration::from_secs(10));
        Ok(self.call(request, None, None).await?.device_keys)
    }

    /// `keys/claim` as a puppet device: one `signed_curve25519` one-time
    /// key of each listed device. Devices without a key to hand out are
    /// absent from the answer.
    pub async fn claim_keys(
        &self,
        as_user: &UserId,
        as_device: &DeviceId,
        devices: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    ) -> Result<ClaimedKeys, HomeserverError> {
        let one_time_keys = devices
            .into_iter()
            .map(|(user, devices)| {
                let wanted = devices
                    .into_iter()
                    .map(|d| (d, OneTimeKeyAlgorithm::SignedCurve25519))
                    .collect();
                (user, wanted)
            })
            .collect();
        let mut request = claim_keys::v3::Request::new(one_time_keys);
        request.timeout = Some(Duration::from_secs(10));
        let response = self.call(request, Some(as_user), Some(as_device)).await?;
        Ok(response.one_time_keys)
    }

    /// `keys/claim` as the appservice's sender itself (no identity
    /// asserted): one `signed_curve25519` key of each listed device. Used
    /// by the claim-mode probe ([`crate::pool`]).
    pub async fn claim_keys_as_appservice(
        &self,
        devices: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    ) -> Result<ClaimedKeys, HomeserverError> {
        let one_time_keys = devices
            .into_iter()
            .map(|(user, devices)| {
                let wanted = devices
                    .into_iter()
                    .map(|d| (d, OneTimeKeyAlgorithm::SignedCurve25519))
                    .collect();
                (user, wanted)
            })
            .collect();
        let mut request = claim_keys::v3::Request::new(one_time_keys);
        request.timeout = Some(Duration::from_secs(10));
        Ok(self.call(request, None, None).await?.one_time_keys)
    }

    /// Upload one-time keys of a puppet device as that device (an uploaded
    /// pool, [`crate::pool`]); with no keys, an empty body that only reads
    /// the device's counts. Empty fields are left out of the body (some
    /// homeservers refuse `null`). Returns the counts after the upload.
    pub async fn upload_one_time_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        keys: &[bridgekeys_olm::ClaimedKey],
    ) -> Result<BTreeMap<OneTimeKeyAlgorithm, UInt>, HomeserverError> {
        let mut request = upload_keys::v3::Request::new();
        for key in keys {
            let raw: Raw<OneTimeKey> = Raw::new(&key.key)
                .map_err(|e| HomeserverError::Protocol(format!("one-time key: {e}")))?
                .cast_unchecked();
            request.one_time_keys.insert(key.key_id.clone(), raw);
        }
        Ok(self
            .call(request, Some(user_id), Some(device_id))
            .await?
            .one_time_key_counts)
    }

    /// `sendToDevice` as a puppet device. `txn_id` makes a retry
    /// idempotent: the homeserver delivers each (device, txn id) once.
    pub async fn send_to_device(
        &self,
        as_user: &UserId,
        as_device: &DeviceId,
        event_type: &str,
        txn_id: &str,
        messages: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, serde_json::Value>>,
    ) -> Result<(), HomeserverError> {
        let mut wire: send_event_to_device::v3::Messages = BTreeMap::new();
        for (user, devices) in messages {
            let mut per_device = BTreeMap::new();
            for (device, content) in devices {
                let raw: Raw<AnyToDeviceEventContent> = Raw::new(&content)
                    .map_err(|e| HomeserverError::Protocol(format!("to-device content: {e}")))?
                    .cast_unchecked();
                per_device.insert(DeviceIdOrAllDevices::DeviceId(device), raw);
            }
            wire.insert(user, per_device);
        }
        let request = send_event_to_device::v3::Request::new_raw(
            ToDeviceEventType::from(event_type),
            OwnedTransactionId::from(txn_id),
            wire,
        );
        self.call(request, Some(as_user), Some(as_device))
            .await
            .map(|_| ())
    }

    /// The current state events of `room` (`GET /rooms/{room}/state`), as
    /// `as_user` (who must be in the room), as raw JSON.
    pub async fn room_state(
        &self,
        room: &RoomId,
        as_user: &UserId,
    ) -> Result<Vec<Box<serde_json::value::RawValue>>, HomeserverError> {
        let request = get_state_events::v3::Request::new(room.to_owned());
        let response = self.call(request, Some(as_user), None).await?;
        Ok(response
            .room_state
            .into_iter()
            .map(|event| event.into_json())
            .collect())
    }

    /// Send the same unencrypted to-device message of `event_type` to every
    /// device of each listed user (device id `*`), as the puppet device, in
    /// one `sendToDevice` under `txn_id` (reuse it on a retry: the
    /// homeserver then delivers it once).
    pub async fn send_to_all_devices(
        &self,
        as_user: &UserId,
        as_device: &DeviceId,
        event_type: &str,
        txn_id: &str,
        messages: BTreeMap<OwnedUserId, serde_json::Value>,
    ) -> Result<(), HomeserverError> {
        let mut wire: send_event_to_device::v3::Messages = BTreeMap::new();
        for (user, content) in messages {
            let raw: Raw<AnyToDeviceEventContent> = Raw::new(&content)
                .map_err(|e| HomeserverError::Protocol(format!("to-device content: {e}")))?
                .cast_unchecked();
            wire.insert(
                user,
                BTreeMap::from([(DeviceIdOrAllDevices::AllDevices, raw)]),
            );
        }
        let request = send_event_to_device::v3::Request::new_raw(
            ToDeviceEventType::from(event_type),
            OwnedTransactionId::from(txn_id),
            wire,
        );
        self.call(request, Some(as_user), Some(as_device))
            .await
            .map(|_| ())
    }

    /// Ask the homeserver to ping this appservice (`POST
    /// /_matrix/client/v1/appservice/{id}/ping`): it calls our `/ping` and
    /// answers with the round trip. Do it once the listener serves, at
    /// start: Synapse then also retries at once what it held back while it
    /// counted the appservice as down (until then it drops to-device
    /// messages that come without room events).
    pub async fn ping_appservice(&self, appservice_id: &str) -> Result<Duration, HomeserverError> {
        let request = request_ping::v1::Request::new(appservice_id.to_owned());
        self.call(request, None, None)
            .await
            .map(|answer| answer.duration)
    }

    /// Send one request as the appservice, asserting `user_id`/`device_id`.
    async fn call<R>(
        &self,
        request: R,
        user_id: Option<&UserId>,
        device_id: Option<&DeviceId>,
    ) -> Result<R::IncomingResponse, HomeserverError>
    where
        R: OutgoingRequest
            + OutgoingRequestAppserviceExt
            + ruma::api::Metadata<PathBuilder = ruma::api::path_builder::VersionHistory>,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let mut identity = ruma::api::AppserviceUserIdentity::default();
        identity.user_id = user_id;
        identity.device_id = device_id;
        let http_request: http::Request<Vec<u8>> = request
            .try_into_http_request_with_identity(
                &self.base_url,
                SendAccessToken::Appservice(&self.as_token.0),
                identity,
                std::borrow::Cow::Borrowed(&self.versions),
            )
            .map_err(|e| HomeserverError::Protocol(format!("building the request: {e}")))?;
        let (status, body) = tokio::time::timeout(self.timeout, self.send(http_request))
            .await
            .map_err(|_| HomeserverError::Network("request timed out".into()))??;
        if status.as_u16() >= 400 {
            let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
            let (errcode, error) = parsed.map(|b| (b.errcode, b.error)).unwrap_or((None, None));
            return Err(HomeserverError::Matrix {
                status: status.as_u16(),
                errcode: errcode.unwrap_or_else(|| "M_UNKNOWN".into()),
                error: error.unwrap_or_default(),
            });
        }
        let response = http::Response::builder()
            .status(status)
            .body(body.as_ref())
            .map_err(|e| HomeserverError::Protocol(e.to_string()))?;
        R::IncomingResponse::try_from_http_response(response)
            .map_err(|e| HomeserverError::Protocol(format!("unexpected answer: {e}")))
    }

    async fn send(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<(http::StatusCode, Bytes), HomeserverError> {
        let net = |e: &dyn std::fmt::Display| HomeserverError::Network(e.to_string());
        let host = self.authority.host();
        let port = self.authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| net(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| net(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "homeserver connection closed with an error");
            }
        });
        let (mut parts, body) = request.into_parts();
        // HTTP/1.1 origin form plus Host (the URI ruma built is absolute).
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        parts.uri = path
            .parse()
            .map_err(|e| HomeserverError::Protocol(format!("request path: {e}")))?;
        let host_header = http::HeaderValue::from_str(self.authority.as_str())
            .map_err(|e| HomeserverError::Protocol(format!("host header: {e}")))?;
        parts.headers.insert(http::header::HOST, host_header);
        let request = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let response = sender.send_request(request).await.map_err(|e| net(&e))?;
        let status = response.status();
        // The answers we expect are small; a runaway body is cut off rather
        // than buffered whole.
        let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| HomeserverError::Network(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(status: u16, errcode: &str, error: &str) -> HomeserverError {
        HomeserverError::Matrix {
            status,
            errcode: errcode.into(),
            error: error.into(),
        }
    }

    #[test]
    fn only_network_failures_5xx_and_429_are_retried() {
        assert!(HomeserverError::Network("reset".into()).is_transient());
        assert!(matrix(502, "M_UNKNOWN", "").is_transient());
        assert!(matrix(429, "M_LIMIT_EXCEEDED", "").is_transient());
        assert!(!matrix(400, "M_INVALID_PARAM", "").is_transient());
        assert!(!matrix(401, "M_UNKNOWN_TOKEN", "").is_transient());
        assert!(!HomeserverError::Protocol("bad".into()).is_transient());
    }

    #[test]
    fn already_exists_is_recognised_only_on_a_400() {
        assert!(
            matrix(
                400,
                "M_INVALID_PARAM",
                "One time key signed_curve25519:AAAAAA already exists. Old key: ..."
            )
            .is_already_exists()
        );
        assert!(!matrix(500, "M_UNKNOWN", "already exists").is_already_exists());
        assert!(!matrix(400, "M_INVALID_PARAM", "bad json").is_already_exists());
    }

    #[test]
    fn only_plain_http_urls_are_accepted_and_the_token_is_not_printed() {
        assert!(HomeserverClient::new("https://hs.example", AsToken::new("t")).is_err());
        assert!(HomeserverClient::new("not a url", AsToken::new("t")).is_err());
        let client = HomeserverClient::new("http://127.0.0.1:8008/", AsToken::new("secret-token"))
            .expect("client");
        assert!(!format!("{client:?}").contains("secret-token"));
    }
}
