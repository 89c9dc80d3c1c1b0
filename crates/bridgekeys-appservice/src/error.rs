//! Errors: the Matrix JSON errors the listener answers with, and the typed
//! errors of setting it up.
//!
//! Wire shape of every error response (Client-Server and Application Service
//! API conventions):
//!
//! ```json
//! {"errcode": "M_FORBIDDEN", "error": "human readable text"}
//! ```

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

/// An error answered to the homeserver as `{"errcode", "error"}` JSON.
///
/// The homeserver reads the status and errcode: `M_UNRECOGNIZED` (404/405)
/// means "not supported", any other error means "retry later" for a
/// transaction and "use the fallback key" for a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The Matrix errcode, e.g. `M_FORBIDDEN`.
    pub errcode: &'static str,
    /// Human-readable text. Never carries tokens, keys or plaintext.
    pub error: String,
}

/// Marker put into a response's extensions by [`MatrixError`], so the
/// metrics middleware can count errors by errcode without reading bodies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrCode(pub &'static str);

#[derive(Serialize)]
struct ErrorBody<'a> {
    errcode: &'a str,
    error: &'a str,
}

impl MatrixError {
    /// A new error.
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            error: error.into(),
        }
    }

    /// 401 `M_MISSING_TOKEN`: no `Authorization: Bearer` header nor
    /// `access_token` query parameter.
    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "missing homeserver token",
        )
    }

    /// 403 `M_FORBIDDEN`: a token that is not this appservice's `hs_token`.
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "invalid homeserver token",
        )
    }

    /// 400 `M_NOT_JSON`: the body is not JSON at all.
    pub fn not_json() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "request body is not valid JSON",
        )
    }

    /// 400 `M_BAD_JSON`: JSON of the wrong shape. `why` names the field
    /// (serde's message), never a value.
    pub fn bad_json(why: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", why)
    }

    /// 400 `M_INVALID_PARAM`: well-formed but out of bounds or invalid.
    pub fn invalid_param(why: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", why)
    }

    /// 413 `M_TOO_LARGE`: the body is over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// 404 `M_UNRECOGNIZED`: a route this appservice does not serve.
    pub fn unrecognized() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
            "unrecognized request",
        )
    }

    /// 405 `M_UNRECOGNIZED`: a known path with a method it does not serve.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
            "method not allowed on this path",
        )
    }

    /// 404 `M_NOT_FOUND`: the user or room alias does not exist here.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", what)
    }

    /// 500 `M_UNKNOWN`: something failed on our side; the homeserver retries.
    pub fn internal(why: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", why)
    }

    /// 408 `M_UNKNOWN`: the client did not finish sending the request body
    /// within the request timeout.
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "M_UNKNOWN",
            "the request body did not arrive within the request timeout",
        )
    }

    /// 503 `M_UNKNOWN`: the request ran past the configured timeout.
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            "request timed out",
        )
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                errcode: self.errcode,
                error: &self.error,
            }),
        )
            .into_response();
        response.extensions_mut().insert(ErrCode(self.errcode));
        response
    }
}

/// Why the listener could not be set up or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppserviceError {
    /// A namespace regex in the registration does not compile.
    #[error("namespace regex {regex:?} is invalid: {source}")]
    BadNamespaceRegex {
        /// The regex as written in the registration.
        regex: String,
        /// The compile error.
        source: regex::Error,
    },
    /// The registration's sender or a configured id is not a valid Matrix id.
    #[error("invalid identifier {value:?}: {reason}")]
    BadIdentifier {
        /// The offending value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The registration file could not be read or written.
    #[error("registration file {path}: {source}")]
    RegistrationIo {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The registration file is not valid YAML of the expected shape.
    #[error("registration YAML: {0}")]
    RegistrationYaml(#[from] serde_yaml_ng::Error),
    /// A metric could not be registered (duplicate name).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Binding or serving the socket failed.
    #[error("listener I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The store failed (pruning the transaction log).
    #[error("store: {0}")]
    Store(#[from] bridgekeys_store::StoreError),
}
