//! `GET /_matrix/app/v1/rooms/{roomAlias}`: does this alias exist?
//!
//! Wire shape: response `{}` (200) once the bridge has created the room,
//! 404 `M_NOT_FOUND` if it does not exist. The bridge's
//! [`BridgeHandler::query_room_alias`] decides.

use std::sync::Arc;

use axum::{Json, extract::State};
use ruma::OwnedRoomAliasId;

use crate::{BridgeHandler, MatrixError, path::MatrixPath, server::Inner};

pub(crate) async fn query_room<H: BridgeHandler>(
    State(inner): State<Arc<Inner<H>>>,
    MatrixPath(alias): MatrixPath<String>,
) -> Result<Json<serde_json::Map<String, serde_json::Value>>, MatrixError> {
    let alias = OwnedRoomAliasId::try_from(alias.as_str())
        .map_err(|e| MatrixError::invalid_param(format!("invalid room alias: {e}")))?;
    match inner.handler.query_room_alias(&alias).await {
        Ok(true) => Ok(Json(serde_json::Map::new())),
        Ok(false) => Err(MatrixError::not_found("no such room alias")),
        Err(e) => {
            tracing::warn!(?alias, error = %e.chain(), "room query handler failed");
            Err(MatrixError::internal(
                "the bridge could not answer the room query",
            ))
        }
    }
}
