//! Prometheus metrics, served on `GET /metrics` (text format 0.0.4).
//!
//! Each [`crate::Appservice`] owns its registry, so two listeners in one
//! process (or tests) never share counters.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::AppserviceError;

/// The counters of the claim paths, and the error counts by errcode: what
/// the whole listener and the claim-only service ([`crate::ClaimService`])
/// both keep.
pub(crate) struct ClaimMetrics {
    pub claims: IntCounter,
    pub claim_devices_refused: IntCounter,
    pub keys_issued: IntCounter,
    evicted_keys: IntCounter,
    evicted_seen: AtomicU64,
    pub errors: IntCounterVec,
    pub claim_seconds: Histogram,
    fallback_claimed: IntCounter,
}

impl ClaimMetrics {
    /// The claim counters, registered in `registry`.
    pub(crate) fn register(registry: &Registry) -> Result<Self, AppserviceError> {
        let errors = IntCounterVec::new(
            Opts::new("errors_total", "Error responses, by Matrix errcode.").namespace(NAMESPACE),
            &["errcode"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        let claim_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "claim_duration_seconds",
                "Time to answer a keys/claim request, durable write included.",
            )
            .namespace(NAMESPACE)
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(claim_seconds.clone()))?;
        Ok(Self {
            claims: counter(registry, "claims_total", "keys/claim requests answered.")?,
            claim_devices_refused: counter(
                registry,
                "claim_devices_skipped_total",
                "Devices of claims left out (outside the namespace, unknown, failed).",
            )?,
            keys_issued: counter(registry, "keys_issued_total", "One-time keys handed out.")?,
            evicted_keys: counter(
                registry,
                "evicted_keys_total",
                "Outstanding one-time keys evicted at the per-device bound.",
            )?,
            evicted_seen: AtomicU64::new(0),
            errors,
            claim_seconds,
            fallback_claimed: counter(
                registry,
                "fallback_keys_in_claims_total",
                "Fallback keys included in keys/claim answers (MSC3983 extra keys; off by default).",
            )?,
        })
    }

    /// Register the same counters (they share their values) in `registry`
    /// too, under the same names.
    pub(crate) fn register_in(&self, registry: &Registry) -> Result<(), AppserviceError> {
        registry.register(Box::new(self.errors.clone()))?;
        registry.register(Box::new(self.claim_seconds.clone()))?;
        for c in [
            &self.claims,
            &self.claim_devices_refused,
            &self.keys_issued,
            &self.evicted_keys,
            &self.fallback_claimed,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        Ok(())
    }

    /// Bring the eviction counter up to the account manager's figure.
    pub(crate) fn observe_evictions(&self, total: u64) {
        let seen = self.evicted_seen.fetch_max(total, Ordering::Relaxed);
        if total > seen {
            self.evicted_keys.inc_by(total - seen);
        }
    }

    /// Count fallback keys put into claim answers.
    pub(crate) fn fallback_in_claim(&self, n: u64) {
        self.fallback_claimed.inc_by(n);
    }
}

/// Every metric name starts with `bridgekeys_appservice_`. The prefix is
/// part of each metric (not of a registry), so the names stay the same in
/// any registry the metrics are registered into.
pub(crate) const NAMESPACE: &str = "bridgekeys_appservice";

/// A fresh registry for the listener's own `/metrics`.
pub(crate) fn new_registry() -> Result<Registry, AppserviceError> {
    Ok(Registry::new())
}

/// The text exposition of every metric of `registry`.
pub(crate) fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The listener's counters.
pub(crate) struct Metrics {
    registry: Registry,
    /// Claims and errors (shared with the claim-only service's code).
    pub claim: ClaimMetrics,
    pub key_queries: IntCounter,
    pub transactions: IntCounter,
    pub duplicates: IntCounter,
    pub in_flight_duplicates: IntCounter,
    pub held_elsewhere: IntCounter,
    pub prekeys_decrypted: IntCounter,
    pub olm_decrypted: IntCounter,
    pub olm_payloads_refused: IntCounter,
    pub olm_undecryptable: IntCounter,
    pub room_keys: IntCounter,
    pub room_events_decrypted: IntCounter,
    pub room_events_undecryptable: IntCounter,
    pub held_events: IntCounter,
    pub held_events_released: IntCounter,
    pub held_events_expired: IntCounter,
    pub room_key_requests: IntCounter,
    pub room_key_request_failures: IntCounter,
    pub room_key_request_cancellations: IntCounter,
    sessions_evicted: Mirrored,
    devices_refused: Mirrored,
    fallback_rotations: Mirrored,
    fallback_forgets: Mirrored,
    fallback_uploads: Mirrored,
    fallback_upload_retries: Mirrored,
    claim_mode: IntGaugeVec,
    pool_uploads: Mirrored,
    pool_keys_uploaded: Mirrored,
    pool_failures: Mirrored,
    pool_probes: Mirrored,
    pool_contacted: IntGauge,
}

/// A Prometheus counter that mirrors a running total kept elsewhere (the
/// account manager's or the provisioner's counters), brought up to date at
/// scrape time.
struct Mirrored {
    counter: IntCounter,
    seen: AtomicU64,
}

impl Mirrored {
    fn new(registry: &Registry, name: &str, help: &str) -> Result<Self, AppserviceError> {
        Ok(Self {
            counter: counter(registry, name, help)?,
            seen: AtomicU64::new(0),
        })
    }

    fn observe(&self, total: u64) {
        let seen = self.seen.fetch_max(total, Ordering::Relaxed);
        if total > seen {
            self.counter.inc_by(total - seen);
        }
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, AppserviceError> {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace(NAMESPACE))?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub(crate) fn new() -> Result<Self, AppserviceError> {
        let registry = new_registry()?;
        let claim = ClaimMetrics::register(&registry)?;
        let claim_mode = IntGaugeVec::new(
            Opts::new(
                "claim_mode",
                "1 for the one-time key claim mode in force (proxied, pool, unknown), 0 for the others.",
            )
            .namespace(NAMESPACE),
            &["mode"],
        )?;
        registry.register(Box::new(claim_mode.clone()))?;
        let pool_contacted = IntGauge::with_opts(
            Opts::new(
                "pool_contacted_devices",
                "Puppet devices contacted since start (those that keep an uploaded pool in pool mode).",
            )
            .namespace(NAMESPACE),
        )?;
        registry.register(Box::new(pool_contacted.clone()))?;
        Ok(Self {
            claim,
            key_queries: counter(
                &registry,
                "key_queries_total",
                "MSC3984 keys/query requests answered from the store.",
            )?,
            claim_mode,
            pool_contacted,
            pool_uploads: Mirrored::new(
                &registry,
                "pool_uploads_total",
                "Uploads of one-time keys to a puppet device's pool (pool mode).",
            )?,
            pool_keys_uploaded: Mirrored::new(
                &registry,
                "pool_keys_uploaded_total",
                "One-time keys uploaded to pools (each durable before its upload).",
            )?,
            pool_failures: Mirrored::new(
                &registry,
                "pool_top_up_failures_total",
                "Pool top-ups that failed (retried at the next count or check).",
            )?,
            pool_probes: Mirrored::new(
                &registry,
                "claim_mode_probes_total",
                "Claim-mode detections run.",
            )?,
            transactions: counter(
                &registry,
                "transactions_total",
                "Transactions processed and durably recorded.",
            )?,
            duplicates: counter(
                &registry,
                "transactions_duplicate_total",
                "Transactions acknowledged without processing (already recorded).",
            )?,
            in_flight_duplicates: counter(
                &registry,
                "transactions_in_flight_duplicate_total",
                "Transactions that arrived while the same id was being processed, and waited.",
            )?,
            held_elsewhere: counter(
                &registry,
                "transactions_held_elsewhere_total",
                "Transactions that arrived while another process sharing the store processed the same id, and waited for it.",
            )?,
            prekeys_decrypted: counter(
                &registry,
                "prekey_messages_decrypted_total",
                "Olm pre-key to-device messages that started a session of a puppet device.",
            )?,
            olm_decrypted: counter(
                &registry,
                "olm_messages_decrypted_total",
                "Olm to-device messages (both types) decrypted and verified for puppet devices.",
            )?,
            olm_payloads_refused: counter(
                &registry,
                "olm_payloads_refused_total",
                "Olm messages that decrypted but whose payload failed its checks (wrong recipient, sender or keys); never handed to the bridge.",
            )?,
            olm_undecryptable: counter(
                &registry,
                "olm_messages_undecryptable_total",
                "Olm messages to puppet devices that could not be decrypted (no session, replay, unknown key, malformed).",
            )?,
            room_keys: counter(
                &registry,
                "room_keys_received_total",
                "Megolm room keys taken in from verified Olm messages (new, improved or already known).",
            )?,
            room_events_decrypted: counter(
                &registry,
                "room_events_decrypted_total",
                "Megolm room events decrypted.",
            )?,
            room_events_undecryptable: counter(
                &registry,
                "room_events_undecryptable_total",
                "Megolm room events that could not be decrypted (unknown session, mismatch, replay).",
            )?,
            held_events: counter(
                &registry,
                "room_events_held_total",
                "Encrypted room events held because their room key had not arrived.",
            )?,
            held_events_released: counter(
                &registry,
                "room_events_held_released_total",
                "Held room events decrypted when their room key arrived.",
            )?,
            held_events_expired: counter(
                &registry,
                "room_events_held_given_up_total",
                "Held room events given up (too old, or pushed out by the bound) and handed over as undecryptable.",
            )?,
            room_key_requests: counter(
                &registry,
                "room_key_requests_total",
                "m.room_key_request messages sent for held room events whose key had not arrived (one per room and session).",
            )?,
            room_key_request_failures: counter(
                &registry,
                "room_key_requests_failed_total",
                "Room key requests the homeserver did not take (tried again at the next check).",
            )?,
            room_key_request_cancellations: counter(
                &registry,
                "room_key_request_cancellations_total",
                "Room key requests cancelled once their key arrived or their held events were given up.",
            )?,
            sessions_evicted: Mirrored::new(
                &registry,
                "olm_sessions_evicted_total",
                "Olm sessions removed past the per-peer bound.",
            )?,
            devices_refused: Mirrored::new(
                &registry,
                "tracked_devices_refused_total",
                "Queried devices refused (bad self-signature, keys changed under the same id).",
            )?,
            fallback_rotations: Mirrored::new(
                &registry,
                "fallback_rotations_total",
                "Fallback keys replaced by a new one (reported used, or older than the maximum age).",
            )?,
            fallback_forgets: Mirrored::new(
                &registry,
                "fallback_forgets_total",
                "Previous fallback keys forgotten after their grace period.",
            )?,
            fallback_uploads: Mirrored::new(
                &registry,
                "fallback_uploads_total",
                "Key uploads (device keys and fallback key) acknowledged by the homeserver.",
            )?,
            fallback_upload_retries: Mirrored::new(
                &registry,
                "fallback_upload_retries_total",
                "Key uploads retried after a transient failure (the same keys re-sent).",
            )?,
            registry,
        })
    }

    /// Bring the fallback counters up to the account manager's and the
    /// provisioner's figures.
    pub(crate) fn observe_fallback(
        &self,
        manager: &bridgekeys_olm::ManagerStats,
        provision: Option<&crate::ProvisionStats>,
    ) {
        self.fallback_rotations.observe(manager.fallback_rotations);
        self.fallback_forgets.observe(manager.fallback_forgets);
        self.sessions_evicted.observe(manager.sessions_evicted);
        self.devices_refused.observe(manager.devices_refused);
        if let Some(p) = provision {
            self.fallback_uploads.observe(p.uploads);
            self.fallback_upload_retries.observe(p.upload_retries);
        }
    }

    /// Bring the claim mode and pool figures up to date.
    pub(crate) fn observe_pool(&self, mode: crate::ClaimMode, stats: &crate::PoolStats) {
        for m in crate::ClaimMode::ALL {
            self.claim_mode
                .with_label_values(&[m.as_str()])
                .set(i64::from(m == mode));
        }
        self.pool_uploads.observe(stats.uploads);
        self.pool_keys_uploaded.observe(stats.keys_uploaded);
        self.pool_failures.observe(stats.failures);
        self.pool_probes.observe(stats.probes);
        self.pool_contacted
            .set(i64::try_from(stats.contacted_devices).unwrap_or(i64::MAX));
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> Result<String, prometheus::Error> {
        render(&self.registry)
    }
}
