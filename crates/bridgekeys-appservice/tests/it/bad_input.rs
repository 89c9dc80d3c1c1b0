//! Every bad-input class on every route: the status and errcode the spec
//! names, and no state changed (no durable write, no key issued, no device
//! created, no handler call, no transaction recorded).

use crate::common::*;
use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use bridgekeys_appservice::Limits;
use bridgekeys_store::TransactionLog;
use serde_json::{Value, json};

const LIMIT: usize = 64 * 1024;

fn limits() -> Limits {
    {
        let mut c = Limits::default();
        c.max_body_bytes = LIMIT;
        c.max_keys_per_device = 20;
        c.max_devices_per_claim = 2000;
        c
    }
}

/// One route of the listener and a body it accepts.
struct Route {
    method: Method,
    path: &'static str,
    /// A body the route accepts; `None` for GET routes.
    good: Option<Value>,
    /// Valid JSON of the wrong shape for this route.
    wrong_shape: Option<Value>,
    /// What the route answers a good, authenticated request.
    ok: StatusCode,
}

fn routes() -> Vec<Route> {
    let claim = |path| Route {
        method: Method::POST,
        path,
        good: Some(json!({"@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]}})),
        wrong_shape: Some(json!({"@echo_0:localhost": ["signed_curve25519"]})),
        ok: StatusCode::OK,
    };
    let query = |path| Route {
        method: Method::POST,
        path,
        good: Some(json!({"@echo_0:localhost": ["PUPPETDEV"]})),
        wrong_shape: Some(json!({"@echo_0:localhost": "PUPPETDEV"})),
        ok: StatusCode::OK,
    };
    let txn = |path| Route {
        method: Method::PUT,
        path,
        good: Some(json!({"events": []})),
        wrong_shape: Some(json!({"events": {"not": "a list"}})),
        ok: StatusCode::OK,
    };
    vec![
        claim("/_matrix/app/v1/keys/claim"),
        claim("/_matrix/app/unstable/org.matrix.msc3983/keys/claim"),
        claim("/_matrix/app/v1/unstable/org.matrix.msc3983/keys/claim"),
        query("/_matrix/app/unstable/org.matrix.msc3984/keys/query"),
        query("/_matrix/app/v1/keys/query"),
        txn("/_matrix/app/v1/transactions/txn-1"),
        txn("/transactions/txn-1"),
        Route {
            method: Method::POST,
            path: "/_matrix/app/v1/ping",
            good: Some(json!({"transaction_id": "ping-1"})),
            wrong_shape: Some(json!({"transaction_id": 5})),
            ok: StatusCode::OK,
        },
        // The handler rejects users by default: 404 M_NOT_FOUND is the
        // route's own answer.
        Route {
            method: Method::GET,
            path: "/_matrix/app/v1/users/@echo_77:localhost",
            good: None,
            wrong_shape: None,
            ok: StatusCode::NOT_FOUND,
        },
        Route {
            method: Method::GET,
            path: "/users/@echo_77:localhost",
            good: None,
            wrong_shape: None,
            ok: StatusCode::NOT_FOUND,
        },
        Route {
            method: Method::GET,
            path: "/_matrix/app/v1/rooms/%23echo_room:localhost",
            good: None,
            wrong_shape: None,
            ok: StatusCode::OK,
        },
        Route {
            method: Method::GET,
            path: "/rooms/%23echo_room:localhost",
            good: None,
            wrong_shape: None,
            ok: StatusCode::OK,
        },
    ]
}

fn request(route: &Route, auth: Option<&str>, query: Option<&str>, body: Body) -> Request<Body> {
    let uri = match query {
        Some(q) => format!("{}?{q}", route.path),
        None => route.path.to_owned(),
    };
    let mut b = Request::builder().method(route.method.clone()).uri(uri);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.header("content-type", "application/json")
        .body(body)
        .unwrap()
}

fn good_body(route: &Route) -> Body {
    route.good.as_ref().map_or_else(Body::empty, json_body)
}

async fn assert_refused(
    fx: &Fixture,
    what: &str,
    req: Request<Body>,
    status: StatusCode,
    errcode: &str,
) {
    let before = fx.state();
    let (got, body) = fx.call(req).await;
    assert_eq!(got, status, "{what}: status (body {body})");
    assert_eq!(body["errcode"], errcode, "{what}: errcode (body {body})");
    assert!(body["error"].is_string(), "{what}: a human-readable error");
    assert_eq!(fx.state(), before, "{what}: state changed");
    assert!(
        !fx.store.transaction_completed(TXN_NS, "txn-1").unwrap(),
        "{what}: a refused transaction was recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_body_faults_are_refused_on_every_route_with_the_spec_errcode_and_no_state_change()
{
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    fx.provision(1).await;
    let bearer = format!("Bearer {TOKEN}");
    for route in routes() {
        let name = format!("{} {}", route.method, route.path);
        assert_refused(
            &fx,
            &format!("{name}: missing token"),
            request(&route, None, None, good_body(&route)),
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: non-Bearer scheme"),
            request(
                &route,
                Some(&format!("Basic {TOKEN}")),
                None,
                good_body(&route),
            ),
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: wrong token"),
            request(
                &route,
                Some("Bearer not-the-token"),
                None,
                good_body(&route),
            ),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: token one character short"),
            request(
                &route,
                Some(&bearer[..bearer.len() - 1]),
                None,
                good_body(&route),
            ),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: wrong token in query"),
            request(&route, None, Some("access_token=nope"), good_body(&route)),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: right header, wrong token in query"),
            request(
                &route,
                Some(&bearer),
                Some("access_token=nope"),
                good_body(&route),
            ),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: wrong header, right token in query"),
            request(
                &route,
                Some("Bearer nope"),
                Some(&format!("access_token={TOKEN}")),
                good_body(&route),
            ),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        let mut twice = request(&route, Some(&bearer), None, good_body(&route));
        twice.headers_mut().append(
            "authorization",
            axum::http::HeaderValue::from_static("Bearer nope"),
        );
        assert_refused(
            &fx,
            &format!("{name}: right header, then a second, wrong one"),
            twice,
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        let mut unreadable = request(
            &route,
            None,
            Some(&format!("access_token={TOKEN}")),
            good_body(&route),
        );
        unreadable.headers_mut().insert(
            "authorization",
            axum::http::HeaderValue::from_bytes(b"Bearer nope\xff").unwrap(),
        );
        assert_refused(
            &fx,
            &format!("{name}: right token in query, a header that is not ASCII"),
            unreadable,
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: right token in query, then a second, wrong one"),
            request(
                &route,
                None,
                Some(&format!("access_token={TOKEN}&access_token=nope")),
                good_body(&route),
            ),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        )
        .await;
        assert_refused(
            &fx,
            &format!("{name}: wrong method"),
            Request::builder()
                .method(Method::DELETE)
                .uri(route.path)
                .header("authorization", &bearer)
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
        )
        .await;
        if let Some(wrong) = &route.wrong_shape {
            assert_refused(
                &fx,
                &format!("{name}: not JSON"),
                request(&route, Some(&bearer), None, Body::from("{not json")),
                StatusCode::BAD_REQUEST,
                "M_NOT_JSON",
            )
            .await;
            assert_refused(
                &fx,
                &format!("{name}: empty body"),
                request(&route, Some(&bearer), None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "M_NOT_JSON",
            )
            .await;
            assert_refused(
                &fx,
                &format!("{name}: wrong JSON shape"),
                request(&route, Some(&bearer), None, json_body(wrong)),
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
            )
            .await;
            assert_refused(
                &fx,
                &format!("{name}: JSON array instead of object"),
                request(&route, Some(&bearer), None, Body::from("[]")),
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
            )
            .await;
            // Declared over the limit, with (here) no body at all: refused
            // from the header alone, so a client is not kept waiting for a
            // body that would be refused (without the check this reads the
            // empty body and answers M_NOT_JSON).
            let mut declared = request(&route, Some(&bearer), None, Body::empty());
            declared.headers_mut().insert(
                "content-length",
                axum::http::HeaderValue::from(LIMIT as u64 + 1),
            );
            assert_refused(
                &fx,
                &format!("{name}: Content-Length over the limit"),
                declared,
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
            )
            .await;
            let filler = "x".repeat(LIMIT + 1);
            let mut big = wrong.clone();
            big["pad"] = Value::String(filler);
            assert_refused(
                &fx,
                &format!("{name}: oversized body"),
                request(&route, Some(&bearer), None, json_body(&big)),
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_accepted_in_the_header_or_the_access_token_query_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    fx.provision(1).await;
    for (i, route) in routes().into_iter().enumerate() {
        // Fresh transaction ids, so each one is really processed.
        let path = route.path.replace("txn-1", &format!("q-{i}"));
        let route = Route {
            path: Box::leak(path.into_boxed_str()),
            ..route
        };
        let name = format!("{} {}", route.method, route.path);
        let (status, body) = fx
            .call(request(
                &route,
                None,
                Some(&format!("access_token={TOKEN}")),
                good_body(&route),
            ))
            .await;
        assert_eq!(status, route.ok, "{name} with ?access_token=: {body}");
        let (status, body) = fx
            .call(request(
                &route,
                Some(&format!("Bearer {TOKEN}")),
                None,
                good_body(&route),
            ))
            .await;
        assert_eq!(status, route.ok, "{name} with Bearer: {body}");
        let (status, body) = fx
            .call(request(
                &route,
                Some(&format!("Bearer {TOKEN}")),
                Some(&format!("access_token={TOKEN}")),
                good_body(&route),
            ))
            .await;
        assert_eq!(status, route.ok, "{name} with both: {body}");
    }
}

#[tokio::test]
async fn unknown_routes_answer_m_unrecognized_so_synapse_reads_not_supported() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    for (method, path) in [
        (Method::GET, "/_matrix/app/v1/thirdparty/protocol/irc"),
        (
            Method::POST,
            "/_matrix/app/unstable/org.matrix.msc9999/keys/query",
        ),
        (Method::POST, "/_matrix/app/v2/keys/claim"),
        (Method::GET, "/_matrix/app/v1/keys/claim/extra"),
        (Method::GET, "/nonsense"),
    ] {
        let before = fx.state();
        let (status, body) = fx.call(authed(method.clone(), path, Body::empty())).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["errcode"], "M_UNRECOGNIZED", "{method} {path}");
        assert_eq!(fx.state(), before);
    }
    // Unknown routes are behind the token too: nothing is answered to a
    // caller that is not the homeserver beyond "missing token".
    let (status, body) = fx
        .call(Request::get("/nonsense").body(Body::empty()).unwrap())
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_for_foreign_users_unknown_devices_and_algorithms_get_no_keys_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    fx.provision(1).await;
    let cases = [
        (
            "user outside the namespace",
            json!({"@alice:localhost": {"PUPPETDEV": ["signed_curve25519"]}}),
        ),
        (
            "namespace-looking user on a non-matching server part",
            json!({"@x_echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]}}),
        ),
        (
            "invalid user id",
            json!({"not a user id": {"PUPPETDEV": ["signed_curve25519"]}}),
        ),
        (
            "unknown device of a puppet",
            json!({"@echo_0:localhost": {"NOSUCHDEV": ["signed_curve25519"]}}),
        ),
        (
            "never-provisioned puppet",
            json!({"@echo_5:localhost": {"PUPPETDEV": ["signed_curve25519"]}}),
        ),
        (
            "unknown algorithm",
            json!({"@echo_0:localhost": {"PUPPETDEV": ["curve25519", "org.example.pq_kem"]}}),
        ),
        (
            "no algorithm",
            json!({"@echo_0:localhost": {"PUPPETDEV": []}}),
        ),
        (
            "empty device id",
            json!({"@echo_0:localhost": {"": ["signed_curve25519"]}}),
        ),
        ("empty request", json!({})),
    ];
    for (what, req) in cases {
        for path in bridgekeys_appservice::paths::CLAIM {
            let before = fx.state();
            let (status, body) = fx.call(authed(Method::POST, path, json_body(&req))).await;
            assert_eq!(status, StatusCode::OK, "{what} on {path}: {body}");
            assert_eq!(body, json!({}), "{what} on {path}: nothing is served");
            assert_eq!(fx.state(), before, "{what} on {path}: state changed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_key_and_device_counts_are_refused_whole_before_any_key_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), {
        let mut c = limits();
        c.max_body_bytes = 1024 * 1024;
        c
    });
    fx.provision(1).await;
    let many_keys = vec!["signed_curve25519"; 21];
    let mut many_devices = serde_json::Map::new();
    for i in 0..2001 {
        many_devices.insert(
            format!("@echo_{i}:localhost"),
            json!({"PUPPETDEV": ["signed_curve25519"]}),
        );
    }
    let cases = [
        // One served device next to the absurd one: nothing at all is issued.
        (
            "21 keys for one device",
            json!({
                "@echo_0:localhost": {"PUPPETDEV": many_keys},
            }),
        ),
        (
            "21 keys on a foreign device next to a good one",
            json!({
                "@echo_0:localhost": {"PUPPETDEV": ["signed_curve25519"]},
                "@alice:localhost": {"X": many_keys},
            }),
        ),
        ("2001 devices", Value::Object(many_devices)),
    ];
    for (what, req) in cases {
        for path in bridgekeys_appservice::paths::CLAIM {
            let before = fx.state();
            let (status, body) = fx.call(authed(Method::POST, path, json_body(&req))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{what} on {path}: {body}");
            assert_eq!(body["errcode"], "M_INVALID_PARAM", "{what} on {path}");
            assert_eq!(fx.state(), before, "{what} on {path}: state changed");
        }
    }
}

#[tokio::test]
async fn bad_ids_and_foreign_users_in_queries_are_refused_without_asking_the_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    fx.handler
        .accept_users
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let cases = [
        (
            "/_matrix/app/v1/users/@alice:localhost",
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            "/users/@alice:localhost",
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            "/_matrix/app/v1/users/not-a-user-id",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            "/_matrix/app/v1/rooms/not-an-alias",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        // ruma would parse these; they are outside even the historical
        // user-id grammar, so no puppet is made for them.
        (
            "/_matrix/app/v1/users/@echo_%20x:localhost",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            "/_matrix/app/v1/users/@echo_%C3%A9:localhost",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        // Parameters that percent-decode to bytes that are not UTF-8: axum
        // alone answers these in plain text.
        (
            "/_matrix/app/v1/users/@echo_%FF:localhost",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        ("/users/%FF", StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
        (
            "/_matrix/app/v1/rooms/%23echo_%FF:localhost",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            "/_matrix/app/v1/rooms/%23other:localhost",
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
    ];
    for (path, status, errcode) in cases {
        assert_refused(
            &fx,
            path,
            authed(Method::GET, path, Body::empty()),
            status,
            errcode,
        )
        .await;
    }
}

#[tokio::test]
async fn transactions_with_malformed_members_are_refused_and_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    let cases = [
        ("no events", json!({"ephemeral": []})),
        (
            "to_device entry missing its fields",
            json!({
                "events": [], "de.sorunome.msc2409.to_device": [{"type": "m.x"}]
            }),
        ),
        (
            "otk counts of the wrong type",
            json!({
                "events": [], "org.matrix.msc3202.device_one_time_keys_count": {"@echo_0:localhost": {"D": {"signed_curve25519": "five"}}}
            }),
        ),
        (
            "device lists not an object",
            json!({"events": [], "org.matrix.msc3202.device_lists": []}),
        ),
    ];
    for (what, body) in cases {
        assert_refused(
            &fx,
            what,
            authed(
                Method::PUT,
                "/_matrix/app/v1/transactions/txn-1",
                json_body(&body),
            ),
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
        )
        .await;
    }
    for path in ["/_matrix/app/v1/transactions/a%FFb", "/transactions/a%FFb"] {
        assert_refused(
            &fx,
            path,
            authed(Method::PUT, path, json_body(&json!({"events": []}))),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        )
        .await;
    }
}

#[tokio::test]
async fn a_null_optional_transaction_member_reads_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::open(dir.path(), limits());
    let body = json!({
        "events": [],
        "ephemeral": null,
        "de.sorunome.msc2409.ephemeral": null,
        "to_device": null,
        "de.sorunome.msc2409.to_device": null,
        "device_lists": {"changed": null, "left": null},
        "org.matrix.msc3202.device_lists": null,
        "device_one_time_keys_count": null,
        "device_unused_fallback_key_types": null,
    });
    let (status, answer) = fx.put_transaction("txn-null", &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        fx.store.transaction_completed(TXN_NS, "txn-null").unwrap(),
        "the transaction was handled and recorded"
    );
}
