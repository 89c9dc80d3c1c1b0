//! Operations endpoints, outside the Matrix API and without the homeserver
//! token (mount the listener where only the homeserver and your monitoring
//! reach it):
//!
//! * `GET /_bridgekeys/live`: 200 `{"status":"ok"}` while the process serves.
//! * `GET /_bridgekeys/ready`: 200 while accepting work, 503 once graceful
//!   shutdown has begun (so a load balancer stops sending). With a key pool
//!   attached the body also names the claim mode:
//!   `{"status":"ready","claim_mode":"pool"}` ([`crate::pool`]).
//! * `GET /metrics`: Prometheus text format.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{BridgeHandler, MatrixError, server::Inner};

pub(crate) async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn ready<H: BridgeHandler>(State(inner): State<Arc<Inner<H>>>) -> Response {
    if inner.draining.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        let mut body = json!({"status": "ready"});
        if let Some(pool) = inner.pool.get() {
            body["claim_mode"] = json!(pool.mode().as_str());
        }
        Json(body).into_response()
    }
}

/// Bring the mirrored counters up to the figures kept elsewhere.
pub(crate) fn refresh_metrics<H>(inner: &Inner<H>) {
    let stats = inner.manager.stats();
    inner.metrics.claim.observe_evictions(stats.evicted_keys);
    let provision = inner.provisioner.get().map(|p| p.stats());
    inner.metrics.observe_fallback(&stats, provision.as_ref());
    if let Some(pool) = inner.pool.get() {
        inner.metrics.observe_pool(pool.mode(), &pool.stats());
    }
}

pub(crate) async fn metrics<H: BridgeHandler>(State(inner): State<Arc<Inner<H>>>) -> Response {
    refresh_metrics(&inner);
    match inner.metrics.render() {
        Ok(text) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => MatrixError::internal(format!("metrics: {e}")).into_response(),
    }
}
