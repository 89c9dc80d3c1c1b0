//! Homeserver authentication on every Matrix route.
//!
//! The homeserver presents `Authorization: Bearer <hs_token>`; with legacy
//! authorization it may use `?access_token=<hs_token>` instead or as well.
//! Both are accepted, compared in constant time, and must both match when
//! both are present. Per the Application Service API:
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

/// What a request presents: the Bearer header's token and the
/// `access_token` query parameter, each if present. A header with another
/// scheme, or an empty token, counts as absent.
fn presented_tokens(req: &Request) -> (Option<String>, Option<String>) {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned())
        .filter(|t| !t.is_empty());
    let query = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(params)| {
            params
                .into_iter()
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v)
        })
        .filter(|t| !t.is_empty());
    (header, query)
}

/// Whether `presented` is the token, in time independent of where they
/// differ (only the length may leak, which a random token makes harmless).
pub(crate) fn token_matches(expected: &HsToken, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// Middleware: refuse requests without the right homeserver token. When
/// both the header and the query carry one, both must match (the spec asks
/// appservices to check that).
pub(crate) async fn require_hs_token(
    State(token): State<Arc<HsToken>>,
    req: Request,
    next: Next,
) -> Response {
    let (header, query) = presented_tokens(&req);
    if header.is_none() && query.is_none() {
        return MatrixError::missing_token().into_response();
    }
    let all_match = [header, query]
        .iter()
        .flatten()
        .all(|t| token_matches(&token, t));
    if !all_match {
        tracing::warn!("refused a request with a wrong homeserver token");
        return MatrixError::forbidden().into_response();
    }
    next.run(req).await
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
