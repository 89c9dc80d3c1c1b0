//! The JSON body extractor: size limit and Matrix errors for bad bodies.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::StatusCode,
};
use serde::de::DeserializeOwned;

use crate::{MatrixError, server::BodyProgress};

/// A JSON body, refused with the Matrix errcode of its fault:
/// over the size limit 413 `M_TOO_LARGE`, not JSON 400 `M_NOT_JSON`, JSON of
/// the wrong shape 400 `M_BAD_JSON`. Nothing is processed before the whole
/// body has parsed, so a refused request changes no state.
///
/// A `Content-Length` over the limit is refused before a byte of the body
/// is read: the client is not kept waiting (nor told `100 Continue`) for a
/// body that would be refused anyway. A body that stops arriving is
/// answered 408 `M_UNKNOWN` at the request timeout (not the 503 of a
/// request whose work ran too long).
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
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(limit), Some(declared)) = (limit, declared)
            && declared > u64::try_from(limit).unwrap_or(u64::MAX)
        {
            return Err(MatrixError::too_large(limit));
        }
        let limit = limit.unwrap_or(0);
        let progress = req.extensions().get::<BodyProgress>().cloned();
        if let Some(p) = &progress {
            p.reading(true);
        }
        let bytes = Bytes::from_request(req, state).await;
        if let Some(p) = &progress {
            p.reading(false);
        }
        let bytes = bytes.map_err(|rejection| {
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

/// `deserialize_with` helper for an optional struct field: accept only a
/// JSON object (serde alone would also read a struct from an array), and
/// read `null` as absent.
pub(crate) fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::Deserialize;
    match Option::<serde_json::Map<String, serde_json::Value>>::deserialize(deserializer)? {
        None => Ok(None),
        Some(map) => serde_json::from_value(serde_json::Value::Object(map))
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// `deserialize_with` helper for an optional list: `null` reads as absent
/// (empty), as it does for every other optional member.
pub(crate) fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}
