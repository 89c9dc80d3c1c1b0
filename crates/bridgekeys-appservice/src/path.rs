//! The path-parameter extractor: Matrix errors for parameters that cannot
//! be read.
//!
//! axum's own `Path` answers a parameter that percent-decodes to bytes that
//! are not UTF-8 (`/users/%FF`) with a plain-text 400; every answer of this
//! API is Matrix JSON, so [`MatrixPath`] turns that into 400
//! `M_INVALID_PARAM`.

use axum::{
    extract::{FromRequestParts, Path},
    http::request::Parts,
};
use serde::de::DeserializeOwned;

use crate::MatrixError;

/// Path parameters, refused with 400 `M_INVALID_PARAM` when they cannot be
/// read (a server-side routing fault stays a 500 `M_UNKNOWN`).
pub(crate) struct MatrixPath<T>(pub T);

impl<S, T> FromRequestParts<S> for MatrixPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) if rejection.status().is_server_error() => Err(MatrixError::internal(
                "the route's path parameters could not be read",
            )),
            // axum's text names the parameter and the fault, never the bytes.
            Err(rejection) => Err(MatrixError::invalid_param(rejection.body_text())),
        }
    }
}
