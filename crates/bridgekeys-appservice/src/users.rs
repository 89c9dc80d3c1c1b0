//! `GET /_matrix/app/v1/users/{userId}`: does this puppet exist?
//!
//! Wire shape: response `{}` (200) if it exists, 404 `M_NOT_FOUND` if not.
//!
//! Users outside the exclusive namespace are answered 404 without asking the
//! bridge. For an in-namespace user the bridge's
//! [`BridgeHandler::query_user`] decides; if it accepts, the puppet device is
//! provisioned before the 200, so key claims for it can be served from then
//! on. With a [`crate::Provisioner`] attached
//! ([`crate::Appservice::with_provisioner`]) that is the whole of
//! [`crate::Provisioner::ensure_device`]: the Olm account (durably), the
//! user registered, the device created (MSC4190) and its device keys and
//! fallback key uploaded. Without one, only the Olm account is created and
//! the rest is the bridge's part.

use std::sync::Arc;

use axum::{Json, extract::State};
use ruma::OwnedUserId;

use crate::{BridgeHandler, MatrixError, UserDecision, path::MatrixPath, server::Inner};

pub(crate) async fn query_user<H: BridgeHandler>(
    State(inner): State<Arc<Inner<H>>>,
    MatrixPath(user_id): MatrixPath<String>,
) -> Result<Json<serde_json::Map<String, serde_json::Value>>, MatrixError> {
    // ruma parses leniently; an id outside even the historical grammar
    // (a space, a control or non-ASCII character in the localpart) is no
    // one's, and never becomes a puppet.
    let user_id = OwnedUserId::try_from(user_id.as_str())
        .and_then(|u| u.validate_historical().map(|()| u))
        .map_err(|e| MatrixError::invalid_param(format!("invalid user id: {e}")))?;
    if !inner.config.namespace.contains(&user_id) {
        return Err(MatrixError::not_found(
            "user is not in this bridge's namespace",
        ));
    }
    let decision = inner.handler.query_user(&user_id).await.map_err(|e| {
        tracing::warn!(%user_id, error = %e.chain(), "user query handler failed");
        MatrixError::internal("the bridge could not answer the user query")
    })?;
    let UserDecision::Accept { device_id } = decision else {
        return Err(MatrixError::not_found("no such user"));
    };
    let device_id = device_id.unwrap_or_else(|| inner.config.puppet_device_id.clone());
    if let Some(provisioner) = inner.provisioner.get() {
        provisioner
            .ensure_device(&user_id, &device_id)
            .await
            .map_err(|e| {
                tracing::warn!(%user_id, %device_id, error = %e, "provisioning the puppet failed");
                MatrixError::internal("could not provision the puppet")
            })?;
        return Ok(Json(serde_json::Map::new()));
    }
    inner
        .manager
        .create_device(&user_id, &device_id)
        .await
        .map_err(|e| {
            tracing::warn!(%user_id, %device_id, error = %e, "creating the puppet device failed");
            MatrixError::internal("could not create the puppet device")
        })?;
    Ok(Json(serde_json::Map::new()))
}
