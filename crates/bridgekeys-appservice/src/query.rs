//! `POST /_matrix/app/unstable/org.matrix.msc3984/keys/query` (MSC3984):
//! the device keys of provisioned puppet devices, answered from the store.
//!
//! Wire shape:
//!
//! ```jsonc
//! // request: user id -> device ids (an empty list: all of the user's devices)
//! {"@alice:hs": ["DEVICE"], "@bob:hs": []}
//! // response: only the devices this bridge holds; the homeserver keeps its
//! // own copy of every other device
//! {"device_keys": {"@alice:hs": {"DEVICE": {"algorithms": [...], "keys": {...}, "signatures": {...}}}}}
//! ```
//!
//! A homeserver with MSC3984 on asks this for users in the exclusive
//! namespace whenever a client queries their keys, and an answer replaces
//! its stored copy device by device. So the answer carries exactly what is
//! published: the device's own signature and, when its user has a
//! cross-signing identity, the self-signing key's signature (without it a
//! strict client would see the device as not cross-signed). Bounded and
//! cheap: at most [`crate::Limits::max_devices_per_claim`] devices named
//! (else 400 `M_INVALID_PARAM`, nothing read), one account read and one
//! signature per device, nothing written. An empty device list means the
//! puppet's device ([`crate::AppserviceConfig::puppet_device_id`]). With a
//! key pool attached, a queried device counts as contacted
//! ([`crate::KeyPool::touch`]).

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, extract::State};
use bridgekeys_olm::OlmError;
use ruma::{OwnedDeviceId, OwnedUserId, encryption::DeviceKeys};
use serde::Serialize;

use crate::{BridgeHandler, MatrixError, body::MatrixJson, server::Inner};

/// The request: user id -> device ids (empty: the puppet's device).
pub type QueryRequest = BTreeMap<String, Vec<String>>;

/// The response.
#[derive(Debug, Default, Serialize)]
pub struct QueryResponse {
    /// User id -> device id -> published device keys.
    pub device_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, DeviceKeys>>,
}

/// The handler of the key query paths.
pub(crate) async fn query<H: BridgeHandler>(
    State(inner): State<Arc<Inner<H>>>,
    MatrixJson(request): MatrixJson<QueryRequest>,
) -> Result<Json<QueryResponse>, MatrixError> {
    let limit = inner.config.limits.max_devices_per_claim;
    let named: usize = request.values().map(|d| d.len().max(1)).sum();
    if named > limit {
        return Err(MatrixError::invalid_param(format!(
            "a key query may name at most {limit} devices, not {named}"
        )));
    }
    let mut response = QueryResponse::default();
    for (user, devices) in request {
        let Ok(user_id) = OwnedUserId::try_from(user.as_str()) else {
            continue;
        };
        if !inner.config.namespace.contains(&user_id) {
            continue;
        }
        let devices: Vec<OwnedDeviceId> = if devices.is_empty() {
            vec![inner.config.puppet_device_id.clone()]
        } else {
            devices.into_iter().map(OwnedDeviceId::from).collect()
        };
        for device_id in devices {
            match inner.manager.published_device_keys(&user_id, &device_id) {
                Ok(keys) => {
                    if let Some(pool) = inner.pool.get() {
                        // Someone looks the puppet up: it may be claimed
                        // from soon (in pool mode its pool is filled now).
                        pool.touch(&user_id, &device_id);
                    }
                    response
                        .device_keys
                        .entry(user_id.clone())
                        .or_default()
                        .insert(device_id, keys);
                }
                Err(OlmError::UnknownDevice { .. }) => {}
                Err(e) => {
                    // Left out: the homeserver serves its stored copy.
                    tracing::warn!(%user_id, %device_id, error = %e, "could not read a puppet device's keys for a key query");
                }
            }
        }
    }
    inner.metrics.key_queries.inc();
    Ok(Json(response))
}
