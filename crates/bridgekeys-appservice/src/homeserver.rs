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
//! The transport is one [`reqwest::Client`] per [`HomeserverClient`]
//! (clones share it, and with it its pool of kept-alive connections):
//! `http://` or `https://` homeservers, host names, IPv4 or IPv6 literals
//! (`http://[::1]:8008`), HTTP/1.1. TLS is rustls; the roots trusted are
//! the Mozilla set built in (webpki-roots), not the system's store, plus any
//! given with [`HomeserverClient::with_root_certificate`] (a homeserver
//! behind a private CA, or a test's self-signed certificate). No proxy from
//! the environment and no redirects are followed: the appservice talks to
//! its own homeserver directly, and the `as_token` goes nowhere else.
//!
//! Each call gives up after its timeout ([`HomeserverClient::with_timeout`])
//! and retries transient failures (network errors, 5xx, 429) a bounded
//! number of times with exponential backoff and jitter, waiting at least
//! what a 429 asks for (`retry_after_ms`, or a `Retry-After` header in
//! seconds): see [`RetryPolicy`]. Exactly one layer retries a call: the
//! [`Provisioner`](crate::Provisioner) and [`PuppetOlm`](crate::PuppetOlm)
//! run their own retry loops (with their own bounds, counters and logs, and
//! also honouring `retry_after`), so they switch the retries of the client
//! they are given off; everything else that calls the client directly
//! (room state reads, the appservice ping, a bridge's own calls) gets the
//! client's retries.
//!
//! The token never appears in logs, errors or `Debug` output (it is sent as
//! a header marked sensitive, and only to the configured homeserver).

use std::{collections::BTreeMap, time::Duration};

use bridgekeys_olm::FallbackKey;
use bytes::{Bytes, BytesMut};
use rand::Rng;
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
#[non_exhaustive]
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
        /// How long the homeserver asked us to wait before asking again (a
        /// 429's `retry_after_ms`, or its `Retry-After` header).
        retry_after: Option<Duration>,
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

    /// How long the homeserver asked us to wait before the next attempt,
    /// if it said (rate limiting).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Matrix { retry_after, .. } => *retry_after,
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

/// A `keys/claim` for one `signed_curve25519` key of each listed device.
fn claim_request(devices: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>) -> claim_keys::v3::Request {
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
    request
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
    retry_after_ms: Option<u64>,
}

/// How a [`HomeserverClient`] retries a call that failed transiently
/// ([`HomeserverError::is_transient`]: network errors, 5xx, 429).
///
/// Retry `n` (from 0) waits a random time between half and all of
/// `base_delay * 2^n`, at most `max_delay` (jitter, so that many puppets
/// throttled together do not come back together), and at least what the
/// homeserver asked for with a 429. A homeserver asking for more than
/// `max_delay` is not waited for: the error (with its
/// [`retry_after`](HomeserverError::retry_after)) goes to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: one attempt only).
    pub max_retries: u32,
    /// Backoff before the first retry; doubles with each retry.
    pub base_delay: Duration,
    /// Longest wait before any retry.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 3 retries from 200 ms, waits of at most 10 s: a call gives up within
    /// a few seconds unless the homeserver asked for longer waits.
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries: every failure goes straight to the caller (for callers
    /// that run their own retry loop).
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The wait before retry number `retry` (from 0) after `error`, or
    /// `None` if the error is not retried (not transient, retries used up,
    /// or the homeserver asked for a longer wait than `max_delay`).
    pub fn delay(&self, retry: u32, error: &HomeserverError) -> Option<Duration> {
        if !error.is_transient() || retry >= self.max_retries {
            return None;
        }
        let asked = error.retry_after().unwrap_or_default();
        if asked > self.max_delay {
            return None;
        }
        let backoff = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        let jittered = backoff / 2 + rand::thread_rng().gen_range(Duration::ZERO..=backoff / 2);
        Some(jittered.max(asked))
    }
}

/// A client for the homeserver, acting as the appservice. Cheap to clone
/// (clones share one connection pool).
#[derive(Clone)]
pub struct HomeserverClient {
    base_url: String,
    http: reqwest::Client,
    extra_roots: Vec<reqwest::Certificate>,
    as_token: AsToken,
    timeout: Duration,
    retry: RetryPolicy,
    versions: SupportedVersions,
}

impl std::fmt::Debug for HomeserverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeserverClient")
            .field("base_url", &self.base_url)
            .field("as_token", &self.as_token)
            .field("extra_roots", &self.extra_roots.len())
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The transport: rustls (Mozilla roots plus `extra_roots`), HTTP/1.1 with
/// kept-alive connections, no proxy from the environment, no redirects.
fn build_transport(
    extra_roots: &[reqwest::Certificate],
) -> Result<reqwest::Client, HomeserverError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("bridgekeys/", env!("CARGO_PKG_VERSION")));
    for root in extra_roots {
        builder = builder.add_root_certificate(root.clone());
    }
    builder
        .build()
        .map_err(|e| HomeserverError::Protocol(format!("building the http client: {}", chain(&e))))
}

/// An error and its causes, `: `-separated (reqwest's own message names
/// the step; the cause says what went wrong, such as an unknown issuer).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

impl HomeserverClient {
    /// A client for the homeserver at `base_url` (`http://` or `https://`,
    /// host name or IP literal, IPv6 in brackets: `http://[::1]:8008`).
    pub fn new(base_url: &str, as_token: AsToken) -> Result<Self, HomeserverError> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base_url)
            .map_err(|e| HomeserverError::Protocol(format!("homeserver url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HomeserverError::Protocol(format!(
                "homeserver url must be http:// or https://, not {}://",
                url.scheme()
            )));
        }
        if url.host().is_none() {
            return Err(HomeserverError::Protocol(
                "homeserver url has no host".into(),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
            return Err(HomeserverError::Protocol(
                "homeserver url must not carry credentials or a query".into(),
            ));
        }
        Ok(Self {
            base_url,
            http: build_transport(&[])?,
            extra_roots: Vec::new(),
            as_token,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            // v1.1 for the v3 endpoints; v1.7 for the appservice ping.
            versions: SupportedVersions {
                versions: [MatrixVersion::V1_1, MatrixVersion::V1_7].into(),
                features: Default::default(),
            },
        })
    }

    /// Also trust the root certificate(s) in `pem` (one or more PEM
    /// `CERTIFICATE` blocks) for `https://` homeservers. For a homeserver
    /// whose certificate comes from a private CA (common for an appservice
    /// on an internal network) or is self-signed (tests): the built-in
    /// roots stay trusted too. Builds a new connection pool; this client's
    /// clones made before keep the old one.
    pub fn with_root_certificate(mut self, pem: &[u8]) -> Result<Self, HomeserverError> {
        let roots = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| HomeserverError::Protocol(format!("root certificate: {}", chain(&e))))?;
        if roots.is_empty() {
            return Err(HomeserverError::Protocol(
                "root certificate: no PEM CERTIFICATE block found".into(),
            ));
        }
        self.extra_roots.extend(roots);
        self.http = build_transport(&self.extra_roots)?;
        Ok(self)
    }

    /// Give up on a single attempt of a request after `timeout` (default
    /// 30 s; connecting, sending and reading the answer included).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Retry transient failures as `policy` says (default:
    /// [`RetryPolicy::default`]; [`RetryPolicy::none`] for callers with a
    /// retry loop of their own).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
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
                retry_after: None,
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
        let request = claim_request(devices);
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
        Ok(self
            .call(claim_request(devices), None, None)
            .await?
            .one_time_keys)
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

    /// Send any client-server request (a ruma request type) as the
    /// appservice, asserting `user_id` (and `device_id`), with this
    /// client's transport, timeout and retries ([`RetryPolicy`]): for a
    /// bridge's own calls (join a room, send an event) beside the ones
    /// above. Retries re-send the same request: use it for idempotent
    /// calls (a send with its transaction id, a join).
    pub async fn call<R>(
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
        let mut http_request: http::Request<Vec<u8>> = request
            .try_into_http_request_with_identity(
                &self.base_url,
                SendAccessToken::Appservice(&self.as_token.0),
                identity,
                std::borrow::Cow::Borrowed(&self.versions),
            )
            .map_err(|e| HomeserverError::Protocol(format!("building the request: {e}")))?;
        if let Some(auth) = http_request
            .headers_mut()
            .get_mut(http::header::AUTHORIZATION)
        {
            auth.set_sensitive(true);
        }
        let mut request = reqwest::Request::try_from(http_request)
            .map_err(|e| HomeserverError::Protocol(format!("building the request: {e}")))?;
        *request.timeout_mut() = Some(self.timeout);
        let mut retry = 0;
        let answer = loop {
            let attempt = request.try_clone().ok_or_else(|| {
                HomeserverError::Protocol("the request body cannot be sent again".into())
            })?;
            let error = match self.send(attempt).await {
                Ok(answer) if answer.status.as_u16() < 400 => break answer,
                Ok(answer) => matrix_error(answer.status, &answer.body, answer.retry_after),
                Err(e) => e,
            };
            match self.retry.delay(retry, &error) {
                Some(wait) => {
                    tracing::debug!(
                        method = %request.method(),
                        path = request.url().path(),
                        retry = retry + 1,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        error = %error,
                        "homeserver call failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                None => return Err(error),
            }
        };
        let response = http::Response::builder()
            .status(answer.status)
            .body(answer.body.as_ref())
            .map_err(|e| HomeserverError::Protocol(e.to_string()))?;
        R::IncomingResponse::try_from_http_response(response)
            .map_err(|e| HomeserverError::Protocol(format!("unexpected answer: {e}")))
    }

    /// One attempt.
    async fn send(&self, request: reqwest::Request) -> Result<Answer, HomeserverError> {
        let net = |e: &reqwest::Error| {
            if e.is_timeout() {
                HomeserverError::Network(format!("request timed out: {}", chain(e)))
            } else {
                HomeserverError::Network(chain(e))
            }
        };
        let mut response = self.http.execute(request).await.map_err(|e| net(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The answers we expect are small; a runaway body is cut off rather
        // than buffered whole.
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| net(&e))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(HomeserverError::Protocol(format!(
                    "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            body: body.freeze(),
            retry_after,
        })
    }
}

/// A homeserver's answer to one attempt.
struct Answer {
    status: http::StatusCode,
    body: Bytes,
    /// Its `Retry-After` header, if it had one in seconds (the HTTP-date
    /// form is not read: the backoff applies then).
    retry_after: Option<Duration>,
}

/// The Matrix error of an error answer; `retry_after_ms` in the body wins
/// over a `Retry-After` header.
fn matrix_error(
    status: http::StatusCode,
    body: &[u8],
    retry_after_header: Option<Duration>,
) -> HomeserverError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (errcode, error, retry_after_ms) = parsed
        .map(|b| (b.errcode, b.error, b.retry_after_ms))
        .unwrap_or((None, None, None));
    HomeserverError::Matrix {
        status: status.as_u16(),
        errcode: errcode.unwrap_or_else(|| "M_UNKNOWN".into()),
        error: error.unwrap_or_default(),
        retry_after: retry_after_ms
            .map(Duration::from_millis)
            .or(retry_after_header),
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
            retry_after: None,
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
    fn http_https_and_ipv6_urls_are_accepted_and_the_token_is_not_printed() {
        for url in [
            "http://127.0.0.1:8008/",
            "https://hs.example",
            "http://[::1]:8008",
            "https://[2001:db8::1]",
        ] {
            HomeserverClient::new(url, AsToken::new("t")).expect(url);
        }
        for url in [
            "not a url",
            "ftp://hs.example",
            "http://user:pw@hs.example",
            "http://hs.example?x=1",
        ] {
            assert!(
                HomeserverClient::new(url, AsToken::new("t")).is_err(),
                "{url}"
            );
        }
        let client = HomeserverClient::new("http://127.0.0.1:8008/", AsToken::new("secret-token"))
            .expect("client");
        let printed = format!("{client:?}");
        assert!(!printed.contains("secret-token"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn a_root_certificate_must_be_pem() {
        let client =
            HomeserverClient::new("https://hs.example", AsToken::new("t")).expect("client");
        assert!(
            client
                .clone()
                .with_root_certificate(b"not a certificate")
                .is_err()
        );
        assert!(client.with_root_certificate(b"").is_err());
    }

    #[test]
    fn retry_waits_back_off_with_jitter_honour_retry_after_and_stop_at_the_bound() {
        let policy = RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let unavailable = matrix(503, "M_UNKNOWN", "");
        for retry in 0..3 {
            let full = Duration::from_millis(100 * 2u64.pow(retry));
            for _ in 0..50 {
                let wait = policy.delay(retry, &unavailable).expect("retried");
                assert!(wait >= full / 2 && wait <= full, "{retry}: {wait:?}");
            }
        }
        assert_eq!(policy.delay(3, &unavailable), None, "bounded");
        assert_eq!(policy.delay(0, &matrix(400, "M_BAD_JSON", "")), None);
        let limited = |ms| HomeserverError::Matrix {
            status: 429,
            errcode: "M_LIMIT_EXCEEDED".into(),
            error: String::new(),
            retry_after: Some(Duration::from_millis(ms)),
        };
        assert_eq!(
            policy.delay(0, &limited(700)),
            Some(Duration::from_millis(700)),
            "at least what the homeserver asked for"
        );
        assert_eq!(
            policy.delay(0, &limited(5000)),
            None,
            "longer than max_delay"
        );
        assert_eq!(RetryPolicy::none().delay(0, &unavailable), None);
    }

    #[test]
    fn retry_after_ms_in_the_body_wins_over_the_header() {
        let body = br#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":1500}"#;
        let e = matrix_error(
            http::StatusCode::TOO_MANY_REQUESTS,
            body,
            Some(Duration::from_secs(9)),
        );
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(e.errcode(), Some("M_LIMIT_EXCEEDED"));
        let e = matrix_error(
            http::StatusCode::TOO_MANY_REQUESTS,
            b"",
            Some(Duration::from_secs(2)),
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(e.errcode(), Some("M_UNKNOWN"));
    }
}
