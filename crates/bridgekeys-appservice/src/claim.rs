//! `POST /_matrix/app/v1/keys/claim` (MSC3983) and its unstable paths: hand
//! out fresh signed one-time keys of puppet devices.
//!
//! Wire shape:
//!
//! ```jsonc
//! // request: the algorithm repeated once per key wanted
//! {"@alice:hs": {"DEVICE": ["signed_curve25519", "signed_curve25519"]}}
//! // response: only the devices served
//! {"@alice:hs": {"DEVICE": {"signed_curve25519:AAAAHg": {"key": "...", "signatures": {...}}}}}
//! ```
//!
//! Served: users in the exclusive namespace, devices the bridge provisioned
//! (the account manager knows them), algorithm `signed_curve25519`.
//! Everything else is left out of the response, never created on the fly:
//! the homeserver fills the gap with the device's fallback key. A request
//! over the per-device or per-request cap is refused whole (400
//! `M_INVALID_PARAM`) before any key is generated. One exception, on the
//! whole listener with a [`crate::KeyPool`] attached: the claim-mode probe
//! (the sender's probe device) is answered with a marker that is no key and
//! was never stored (see [`crate::pool`]).
//!
//! The same code answers for the whole listener ([`crate::Appservice`]) and
//! for the claim paths mounted alone ([`crate::ClaimService`]).
//!
//! With [`crate::Appservice::with_fallback_in_claims`] (off by default) each
//! served device's published fallback key (`fallback: true`) is added to its
//! one-time keys, unless a one-time key in the same answer has the same id.
//!
//! Every key in a 200 (the probe's marker aside) was durably stored first:
//! the account manager returns keys only after its write is flushed; a
//! device whose claim failed is left out. Devices are claimed in parallel (bounded by
//! [`crate::Limits::claim_concurrency`]) on the runtime's worker threads.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use axum::{Json, extract::State};
use bridgekeys_olm::{AccountManager, ClaimedKey, OlmError};
use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedOneTimeKeyId, OwnedUserId, encryption::SignedKey,
};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    BridgeHandler, KeyPool, Limits, MatrixError, UserNamespace, body::MatrixJson,
    metrics::ClaimMetrics, server::Inner,
};

/// The request: user id -> device id -> one algorithm name per key.
///
/// Ids stay strings here so that one malformed id cannot fail the whole
/// claim: it is simply not ours and is left out.
pub type ClaimRequest = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// The response: user id -> device id -> `signed_curve25519:<id>` -> key.
pub type ClaimResponse =
    BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OwnedOneTimeKeyId, SignedKey>>>;

/// What answering a claim needs, borrowed from whichever service serves it
/// (the whole [`crate::Appservice`] or the claim-only
/// [`crate::ClaimService`]).
pub(crate) struct ClaimContext<'a> {
    pub limits: &'a Limits,
    pub namespace: &'a UserNamespace,
    pub manager: &'a Arc<AccountManager>,
    pub metrics: &'a ClaimMetrics,
    pub pool: Option<&'a Arc<KeyPool>>,
    pub fallback_in_claims: bool,
}

struct Job {
    user_id: OwnedUserId,
    device_id: OwnedDeviceId,
    count: usize,
}

/// Check the caps and pick the devices to serve. Pure: nothing is touched
/// before every cap has passed.
fn plan(request: ClaimRequest, cx: &ClaimContext<'_>) -> Result<(Vec<Job>, u64), MatrixError> {
    let limits = cx.limits;
    let devices: usize = request.values().map(BTreeMap::len).sum();
    if devices > limits.max_devices_per_claim {
        return Err(MatrixError::invalid_param(format!(
            "a claim may name at most {} devices, not {devices}",
            limits.max_devices_per_claim
        )));
    }
    if let Some(n) = request
        .values()
        .flat_map(BTreeMap::values)
        .map(Vec::len)
        .find(|&n| n > limits.max_keys_per_device)
    {
        return Err(MatrixError::invalid_param(format!(
            "a claim may ask for at most {} keys per device, not {n}",
            limits.max_keys_per_device
        )));
    }
    let wanted = OneTimeKeyAlgorithm::SignedCurve25519.to_string();
    let mut jobs = Vec::new();
    let mut skipped = 0u64;
    for (user, device_map) in request {
        let user_id = match OwnedUserId::try_from(user.as_str()) {
            Ok(u) if cx.namespace.contains(&u) => u,
            _ => {
                skipped += device_map.len() as u64;
                continue;
            }
        };
        for (device, algorithms) in device_map {
            let count = algorithms.iter().filter(|a| **a == wanted).count();
            if count == 0 || device.is_empty() {
                skipped += 1;
                continue;
            }
            jobs.push(Job {
                user_id: user_id.clone(),
                device_id: device.into(),
                count,
            });
        }
    }
    Ok((jobs, skipped))
}

/// Add the device's published fallback key to its claimed one-time keys
/// (MSC3983 extra keys; see [`crate::Appservice::with_fallback_in_claims`]).
/// One-time key ids come from the store's sequence, which starts above any
/// id vodozemac gives a fallback key ([`bridgekeys_store::FIRST_KEY_ID`]),
/// so the two cannot share an id; should they ever (a store written before
/// that sequence), the one-time key wins and the fallback key is left out,
/// never overwriting a key. Returns whether it was added.
fn add_fallback(
    manager: &AccountManager,
    job: &Job,
    keys: &mut BTreeMap<OwnedOneTimeKeyId, SignedKey>,
) -> bool {
    let fallback = match manager.published_fallback_key(&job.user_id, &job.device_id) {
        Ok(Some(f)) => f,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(user_id = %job.user_id, device_id = %job.device_id, error = %e,
                "could not read the fallback key; answering one-time keys only");
            return false;
        }
    };
    if keys.contains_key(&fallback.key_id) {
        tracing::debug!(user_id = %job.user_id, device_id = %job.device_id, key_id = %fallback.key_id,
            "fallback key id equals a one-time key id in this answer; left out");
        return false;
    }
    keys.insert(fallback.key_id, fallback.key);
    true
}

/// One device's share of a claim.
async fn claim_device(
    manager: Arc<AccountManager>,
    job: Job,
) -> (Job, Result<Vec<ClaimedKey>, OlmError>) {
    let result = manager
        .claim(
            &job.user_id,
            &job.device_id,
            &OneTimeKeyAlgorithm::SignedCurve25519,
            job.count,
        )
        .await;
    (job, result)
}

/// The handler of all three claim paths in the whole listener.
pub(crate) async fn claim<H: BridgeHandler>(
    State(inner): State<Arc<Inner<H>>>,
    MatrixJson(request): MatrixJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, MatrixError> {
    let cx = ClaimContext {
        limits: &inner.config.limits,
        namespace: &inner.config.namespace,
        manager: &inner.manager,
        metrics: &inner.metrics.claim,
        pool: inner.pool.get(),
        fallback_in_claims: inner.fallback_in_claims.load(Ordering::SeqCst),
    };
    answer(&cx, request).await.map(Json)
}

/// Answer one claim: the one function behind every claim path, whichever
/// service mounts it.
pub(crate) async fn answer(
    cx: &ClaimContext<'_>,
    mut request: ClaimRequest,
) -> Result<ClaimResponse, MatrixError> {
    let started = Instant::now();
    // The claim-mode probe is noted and answered with a marker, no key.
    let probed = match cx.pool {
        Some(pool) if pool.take_probe(&mut request) => Some(pool),
        _ => None,
    };
    let (mut jobs, mut skipped) = plan(request, cx)?;
    // The usual request (a homeserver asking for one device) is served
    // right here; only a request for several devices pays for tasks.
    let results = if jobs.len() == 1 {
        let job = jobs.remove(0);
        vec![claim_device(Arc::clone(cx.manager), job).await]
    } else {
        let permits = Arc::new(Semaphore::new(cx.limits.claim_concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for job in jobs {
            let manager = Arc::clone(cx.manager);
            let permits = Arc::clone(&permits);
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                claim_device(manager, job).await
            });
        }
        let mut results = Vec::with_capacity(tasks.len());
        while let Some(joined) = tasks.join_next().await {
            results.push(
                joined.map_err(|e| MatrixError::internal(format!("claim task failed: {e}")))?,
            );
        }
        results
    };
    let mut response = ClaimResponse::new();
    if let Some(pool) = probed {
        pool.mark_probe(&mut response);
    }
    let mut issued = 0u64;
    let with_fallback = cx.fallback_in_claims;
    let mut fallbacks = 0u64;
    for (job, result) in results {
        match result {
            Ok(keys) => {
                issued += keys.len() as u64;
                let mut device_keys: BTreeMap<OwnedOneTimeKeyId, SignedKey> =
                    keys.into_iter().map(|k| (k.key_id, k.key)).collect();
                if with_fallback && add_fallback(cx.manager, &job, &mut device_keys) {
                    fallbacks += 1;
                }
                response
                    .entry(job.user_id)
                    .or_default()
                    .insert(job.device_id, device_keys);
            }
            Err(OlmError::UnknownDevice { .. }) => skipped += 1,
            Err(e) => {
                skipped += 1;
                cx.metrics.errors.with_label_values(&["claim_device"]).inc();
                tracing::warn!(user_id = %job.user_id, device_id = %job.device_id, error = %e,
                    "claim for a device failed; left out (the homeserver uses the fallback key)");
            }
        }
    }
    cx.metrics.claims.inc();
    cx.metrics.keys_issued.inc_by(issued);
    cx.metrics.fallback_in_claim(fallbacks);
    cx.metrics.claim_devices_refused.inc_by(skipped);
    cx.metrics
        .observe_evictions(cx.manager.stats().evicted_keys);
    cx.metrics
        .claim_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(issued, skipped, "claim answered");
    Ok(response)
}
