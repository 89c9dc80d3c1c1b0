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

/// How many characters of a ping's transaction id are logged.
const MAX_LOGGED_ID: usize = 128;

pub(crate) async fn ping(
    MatrixJson(request): MatrixJson<PingRequest>,
) -> Result<Json<serde_json::Map<String, serde_json::Value>>, MatrixError> {
    // Escaped (Debug) and cut short: the id is the caller's text, and one
    // log line should not grow with the body limit.
    let transaction_id = request
        .transaction_id
        .as_deref()
        .map(|id| id.chars().take(MAX_LOGGED_ID).collect::<String>());
    tracing::info!(?transaction_id, "pinged by the homeserver");
    Ok(Json(serde_json::Map::new()))
}
