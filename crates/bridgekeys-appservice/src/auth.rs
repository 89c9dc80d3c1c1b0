//! Homeserver authentication on every Matrix route.
//!
//! The homeserver presents `Authorization: Bearer <hs_token>`; with legacy
//! authorization it may use `?access_token=<hs_token>` instead. Both are
//! accepted and compared in constant time. Per the Application Service API:
//! no token is 401 `M_MISSING_TOKEN`, a wrong one 403 `M_FORBIDDEN`.
//! The token is never logged; request spans record the path only, never the
//! query string that may carry it.

use std::sync::Arc;

use axum::{
    extract::{Query, Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;

use crate::{MatrixError, config::HsToken};

/// The token a request carries, if any: the Bearer header first, then the
/// `access_token` query parameter.
fn presented_token(req: &Request) -> Option<String> {
    if let Some(value) = req.headers().get(AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
            .filter(|t| !t.is_empty());
    }
    let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(req.uri()).ok()?;
    params
        .into_iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
        .filter(|t| !t.is_empty())
}

/// Whether `presented` is the token, in time independent of where they
/// differ (only the length may leak, which a random token makes harmless).
pub(crate) fn token_matches(expected: &HsToken, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// Middleware: refuse requests without the right homeserver token.
pub(crate) async fn require_hs_token(
    State(token): State<Arc<HsToken>>,
    req: Request,
    next: Next,
) -> Response {
    match presented_token(&req) {
        None => MatrixError::missing_token().into_response(),
        Some(t) if !token_matches(&token, &t) => {
            tracing::warn!("refused a request with a wrong homeserver token");
            MatrixError::forbidden().into_response()
        }
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        let t = HsToken::new("secret-token");
        assert!(token_matches(&t, "secret-token"));
        assert!(!token_matches(&t, "secret-tokeN"));
        assert!(!token_matches(&t, "secret-token2"));
        assert!(!token_matches(&t, ""));
    }
}
