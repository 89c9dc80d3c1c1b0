//! `POST /_matrix/app/v1/ping`: the homeserver checks that it can reach us
//! (triggered by a client's `POST /_matrix/client/v1/appservice/{id}/ping`).
//!
//! Wire shape: request `{"transaction_id": "optional string"}`, response `{}`.

use axum::Json;
use serde::Deserialize;

use crate::{MatrixError, body::MatrixJson};

/// The ping body.
#[derive(Debug, Deserialize)]
pub(crate) struct PingRequest {
    /// Echoed into our logs to correlate with the client's ping.
    #[serde(default)]
    transaction_id: Option<String>,
}

pub(crate) async fn ping(
    MatrixJson(request): MatrixJson<PingRequest>,
) -> Result<Json<serde_json::Map<String, serde_json::Value>>, MatrixError> {
    tracing::info!(transaction_id = ?request.transaction_id, "pinged by the homeserver");
    Ok(Json(serde_json::Map::new()))
}
