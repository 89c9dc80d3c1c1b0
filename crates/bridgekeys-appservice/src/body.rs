//! The JSON body extractor: size limit and Matrix errors for bad bodies.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::StatusCode,
};
use serde::de::DeserializeOwned;

use crate::MatrixError;

/// A JSON body, refused with the Matrix errcode of its fault:
/// over the size limit 413 `M_TOO_LARGE`, not JSON 400 `M_NOT_JSON`, JSON of
/// the wrong shape 400 `M_BAD_JSON`. Nothing is processed before the whole
/// body has parsed, so a refused request changes no state.
pub(crate) struct MatrixJson<T>(pub T);

/// The body limit in force, stored in the router's extensions for messages.
#[derive(Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);

impl<S, T> FromRequest<S> for MatrixJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = MatrixError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                MatrixError::too_large(limit)
            } else {
                MatrixError::bad_json("could not read the request body")
            }
        })?;
        parse(&bytes).map(MatrixJson)
    }
}

/// Parse a body, telling "not JSON" from "wrong shape". Every body of this
/// API is a JSON object; serde would also read a struct from an array, so
/// anything else is refused first.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MatrixError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => MatrixError::bad_json("the request body must be a JSON object"),
                Err(_) => MatrixError::not_json(),
            },
        );
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        // serde's message may quote a value: report the position only.
        serde_json::error::Category::Data => MatrixError::bad_json(format!(
            "request JSON has the wrong shape (line {}, column {})",
            e.line(),
            e.column()
        )),
        _ => MatrixError::not_json(),
    })
}

/// `deserialize_with` helper: accept only a JSON object for a struct field
/// (serde alone would also read a struct from an array).
pub(crate) fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::{Deserialize, de::Error};
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
    serde_json::from_value(serde_json::Value::Object(map)).map_err(D::Error::custom)
}

/// The same for an optional field.
pub(crate) fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    object(deserializer).map(Some)
}
