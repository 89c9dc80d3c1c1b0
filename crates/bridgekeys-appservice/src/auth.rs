//! Homeserver authentication on every Matrix route.
//!
//! The homeserver presents `Authorization: Bearer <hs_token>`; with legacy
//! authorization it may use `?access_token=<hs_token>` instead or as well.
//! Both are accepted, compared in constant time, and every token presented
//! must match (both kinds, and every copy of a repeated one). Per the
//! Application Service API: no token is 401 `M_MISSING_TOKEN`, a wrong one
//! 403 `M_FORBIDDEN`.
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

/// Every token a request presents: each `Authorization: Bearer` header's
/// and each `access_token` query parameter. A header with another scheme,
/// or an empty token, counts as absent; a header that is not visible ASCII
/// is `None`, which matches no token. All of them are returned, not the
/// first of each kind: a request that repeats a credential must be right in
/// every copy, or a wrong one could hide behind a right one.
fn presented_tokens(req: &Request) -> Vec<Option<String>> {
    let headers = req
        .headers()
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| match v.to_str() {
            Ok(v) => v
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| Some(token.trim().to_owned())),
            // Bytes that are not visible ASCII: a credential presented all
            // the same, which no token can match (`None`), rather than one
            // overlooked.
            Err(_) => Some(None),
        });
    let query = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|Query(params)| params)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == "access_token")
        .map(|(_, v)| Some(v));
    headers
        .chain(query)
        .filter(|t| t.as_deref() != Some(""))
        .collect()
}

/// Whether `presented` is the token, in time independent of where they
/// differ (only the length may leak, which a random token makes harmless).
pub(crate) fn token_matches(expected: &HsToken, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// Middleware: refuse requests without the right homeserver token. Every
/// token presented must match: the header and the query when both carry
/// one (the spec asks appservices to check that), and every copy of a
/// repeated header or parameter.
pub(crate) async fn require_hs_token(
    State(token): State<Arc<HsToken>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = presented_tokens(&req);
    if presented.is_empty() {
        return MatrixError::missing_token().into_response();
    }
    let all_match = presented
        .iter()
        .all(|t| t.as_deref().is_some_and(|t| token_matches(&token, t)));
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
