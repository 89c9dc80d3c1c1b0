//! The listener itself: the router (to mount in your own server) and a ready
//! `serve` with graceful shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Extension, Router,
    extract::{DefaultBodyLimit, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use bridgekeys_olm::AccountManager;
use bridgekeys_store::TransactionLog;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::{
    AppserviceConfig, AppserviceError, BridgeHandler, MatrixError, auth, body::BodyLimit, claim,
    error::ErrCode, health, metrics::Metrics, ping, provision::Provisioner, query, rooms,
    transactions, txn_locks::KeyedLocks, users,
};

/// Shared state of every request.
pub(crate) struct Inner<H> {
    pub config: AppserviceConfig,
    pub manager: Arc<AccountManager>,
    pub txn_log: Arc<dyn TransactionLog>,
    pub handler: Arc<H>,
    pub metrics: Metrics,
    pub txn_locks: KeyedLocks,
    /// This listener's name in transaction leases
    /// ([`TransactionLog::claim_transaction`]): unique per running listener.
    pub txn_owner: String,
    pub retry_cache: transactions::RetryCache,
    pub draining: AtomicBool,
    /// Set by [`Appservice::with_provisioner`].
    pub provisioner: OnceLock<Arc<Provisioner>>,
    /// Set by [`Appservice::with_fallback_in_claims`].
    pub fallback_in_claims: AtomicBool,
    /// Set by [`Appservice::with_olm`].
    pub olm: OnceLock<Arc<crate::PuppetOlm>>,
    /// Key-request checks, one at a time ([`crate::room_events`]).
    pub key_requests: crate::room_events::KeyRequests,
    /// Set by [`Appservice::with_room_states`].
    pub rooms: OnceLock<Arc<crate::RoomStates>>,
    /// Set by [`Appservice::with_key_pool`].
    pub pool: OnceLock<Arc<crate::KeyPool>>,
}

/// The appservice listener of a bridge.
///
/// Cheap to clone: clones share state (metrics, in-flight transactions).
/// Use [`Appservice::router`] to mount it in your own axum/hyper server, or
/// [`Appservice::serve`] to run it.
pub struct Appservice<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for Appservice<H> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<H> std::fmt::Debug for Appservice<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appservice")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The paths of each endpoint: the spec's, the unstable ones Synapse and
/// older homeservers call, and the legacy unprefixed ones.
pub mod paths {
    /// Key claim paths: stable (MSC3983 as proposed), the unstable path
    /// Synapse calls, and a variant seen in the field.
    pub const CLAIM: [&str; 3] = [
        "/_matrix/app/v1/keys/claim",
        "/_matrix/app/unstable/org.matrix.msc3983/keys/claim",
        "/_matrix/app/v1/unstable/org.matrix.msc3983/keys/claim",
    ];
    /// Key query paths (MSC3984): the unstable path Synapse calls, and the
    /// stable form.
    pub const QUERY: [&str; 2] = [
        "/_matrix/app/unstable/org.matrix.msc3984/keys/query",
        "/_matrix/app/v1/keys/query",
    ];
    /// Transaction paths (the second is the legacy one).
    pub const TRANSACTION: [&str; 2] = [
        "/_matrix/app/v1/transactions/{txn_id}",
        "/transactions/{txn_id}",
    ];
    /// User query paths.
    pub const USER: [&str; 2] = ["/_matrix/app/v1/users/{user_id}", "/users/{user_id}"];
    /// Room alias query paths.
    pub const ROOM: [&str; 2] = ["/_matrix/app/v1/rooms/{alias}", "/rooms/{alias}"];
    /// Ping.
    pub const PING: &str = "/_matrix/app/v1/ping";
    /// Liveness (no token).
    pub const LIVE: &str = "/_bridgekeys/live";
    /// Readiness (no token): 503 while draining.
    pub const READY: &str = "/_bridgekeys/ready";
    /// Prometheus metrics (no token).
    pub const METRICS: &str = "/metrics";
}

async fn unrecognized() -> MatrixError {
    MatrixError::unrecognized()
}

pub(crate) async fn method_not_allowed() -> MatrixError {
    MatrixError::method_not_allowed()
}

/// What the outermost middleware needs: the request timeout and the error
/// counts.
#[derive(Clone)]
pub(crate) struct Observer {
    pub timeout: std::time::Duration,
    pub errors: prometheus::IntCounterVec,
}

/// Whether a request's body is being read, so a timeout can tell a client
/// that never finished sending (408) from work of ours that ran too long
/// (503). Set by the JSON body extractor.
#[derive(Clone, Default)]
pub(crate) struct BodyProgress(Arc<std::sync::atomic::AtomicBool>);

impl BodyProgress {
    pub(crate) fn reading(&self, reading: bool) {
        self.0.store(reading, std::sync::atomic::Ordering::Release);
    }

    fn is_reading(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Outermost middleware: a tracing span per request (method and path only:
/// the query may carry the token), the request timeout, and error counts.
pub(crate) async fn observe(
    State(observer): State<Arc<Observer>>,
    req: Request,
    next: Next,
) -> Response {
    let span = tracing::info_span!(
        "appservice_request",
        method = %req.method(),
        path = %req.uri().path(),
        status = tracing::field::Empty,
    );
    let mut req = req;
    let body = BodyProgress::default();
    req.extensions_mut().insert(body.clone());
    async move {
        let timeout = observer.timeout;
        let response = match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) if body.is_reading() => {
                // The client's fault, not ours: it never finished its body.
                tracing::debug!(?timeout, "the request body did not arrive in time");
                MatrixError::body_timeout().into_response()
            }
            Err(_) => {
                tracing::warn!(?timeout, "request timed out; its work was abandoned");
                MatrixError::timeout().into_response()
            }
        };
        if let Some(ErrCode(code)) = response.extensions().get::<ErrCode>() {
            observer.errors.with_label_values(&[code]).inc();
        }
        tracing::Span::current().record("status", response.status().as_u16());
        tracing::debug!("answered");
        response
    }
    .instrument(span)
    .await
}

impl<H: BridgeHandler> Appservice<H> {
    /// A listener over an account manager (claims, pre-key decryption,
    /// puppet devices), a transaction log (dedup) and the bridge's handler.
    ///
    /// `txn_log` is usually the same `SledStore` the manager writes to.
    pub fn new(
        config: AppserviceConfig,
        manager: Arc<AccountManager>,
        txn_log: Arc<dyn TransactionLog>,
        handler: Arc<H>,
    ) -> Result<Self, AppserviceError> {
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                manager,
                txn_log,
                handler,
                metrics: Metrics::new()?,
                txn_locks: KeyedLocks::default(),
                txn_owner: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
                retry_cache: transactions::RetryCache::default(),
                draining: AtomicBool::new(false),
                provisioner: OnceLock::new(),
                fallback_in_claims: AtomicBool::new(false),
                olm: OnceLock::new(),
                key_requests: Default::default(),
                rooms: OnceLock::new(),
                pool: OnceLock::new(),
            }),
        })
    }

    /// Provision puppets through `provisioner`: a user query the bridge
    /// accepts then registers the puppet, creates its device and uploads its
    /// keys before the 200 ([`Provisioner::ensure_device`]), and MSC3202
    /// unused-fallback reports in transactions feed its rotation. Without a
    /// provisioner only the local Olm account is created. Set once; a second
    /// call is ignored (with a warning).
    pub fn with_provisioner(self, provisioner: Arc<Provisioner>) -> Self {
        if self.inner.provisioner.set(provisioner).is_err() {
            tracing::warn!("a provisioner was already set; keeping the first");
        }
        self
    }

    /// Track devices through `olm`: each transaction's `device_lists`
    /// (stable and MSC3202 names) marks changed users outdated, so their
    /// devices are queried again before a puppet next encrypts to them,
    /// and forgets users that left. Set once; a second call is ignored
    /// (with a warning).
    pub fn with_olm(self, olm: Arc<crate::PuppetOlm>) -> Self {
        if self.inner.olm.set(olm).is_err() {
            tracing::warn!("a PuppetOlm was already set; keeping the first");
        }
        self
    }

    /// Keep `rooms` up to date: the state events of every transaction
    /// (`m.room.encryption`, `m.room.member`, `m.room.history_visibility`)
    /// are applied, durably, before the handler runs, so the handler
    /// (and a puppet encrypting from it) sees the room as the transaction
    /// left it. A store failure fails the transaction (the homeserver
    /// retries it).
    pub fn with_room_states(self, rooms: Arc<crate::RoomStates>) -> Self {
        if self.inner.rooms.set(rooms).is_err() {
            tracing::warn!("room states were already set; keeping the first");
        }
        self
    }

    /// Keep uploaded one-time key pools where the homeserver does not
    /// proxy claims ([`crate::pool`]): the claim handler answers `pool`'s
    /// probe (so its detection works), and each transaction's one-time key
    /// counts, to-device messages and invites of puppets feed it. The mode
    /// shows in `/metrics` and `/_bridgekeys/ready`. Start its background
    /// task with [`crate::KeyPool::start`] once the listener serves. Set
    /// once; a second call is ignored (with a warning).
    pub fn with_key_pool(self, pool: Arc<crate::KeyPool>) -> Self {
        if self.inner.pool.set(pool).is_err() {
            tracing::warn!("a key pool was already set; keeping the first");
        }
        self
    }

    /// Remove transaction dedup records older than
    /// [`crate::Limits::transaction_record_max_age`], so the log does not
    /// grow with every transaction ever received; returns how many went.
    /// Call it from a timer (hourly is plenty) and at start. Durable before
    /// it returns.
    pub async fn prune_transactions(&self) -> Result<usize, AppserviceError> {
        let max_age = self.inner.config.limits.transaction_record_max_age;
        let before = bridgekeys_store::unix_millis()
            .saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
        let (pruned, pending) = self.inner.txn_log.prune_transactions(before)?;
        pending.durable().await?;
        if pruned > 0 {
            tracing::info!(pruned, "old transaction dedup records removed");
        }
        Ok(pruned)
    }

    /// Send the `m.room_key_request`s now due: one per session of the
    /// held events whose room key has not come within
    /// [`crate::Limits::room_key_request_after`], from the puppet device
    /// [`BridgeHandler::room_key_requester`] names, unless asked already
    /// (see [`crate::room_events`]). The listener does this after every
    /// transaction; call it from a timer as well if transactions can be
    /// rare. Does nothing without [`Appservice::with_olm`]; failures are
    /// logged and tried again at the next check.
    pub async fn request_room_keys(&self) {
        crate::room_events::request_due(&self.inner).await;
    }

    /// Also return each device's published fallback key (`fallback: true`)
    /// in `keys/claim` answers, next to the fresh one-time keys (MSC3983
    /// "returning extra keys"). **Off by default**: the homeserver already
    /// serves the fallback key itself when no one-time key is available,
    /// and a fallback key in every answer makes every claimer that prefers
    /// it share one key (weaker forward secrecy, replays only stopped by
    /// the session store) and marks it used on the homeserver side, which
    /// triggers needless rotations. OTK and fallback key ids come from
    /// separate counters and can be equal: on a collision the one-time key
    /// wins and the fallback key is left out, so one answer never carries
    /// two keys under one id.
    pub fn with_fallback_in_claims(self, on: bool) -> Self {
        self.inner.fallback_in_claims.store(on, Ordering::SeqCst);
        self
    }

    /// The whole listener as an axum [`Router`] (a tower service), to mount
    /// in your own server: serve it as the whole app, or put your routes
    /// first and hand the rest to it with
    /// `Router::new().route(...).fallback_service(appservice.router())`
    /// (it has its own fallback, so `merge` would conflict). Unknown paths answer 404
    /// `M_UNRECOGNIZED` and wrong methods 405 `M_UNRECOGNIZED`, after the
    /// token check; the operations endpoints ([`paths::LIVE`],
    /// [`paths::READY`], [`paths::METRICS`]) need no token.
    ///
    /// To leave the operations endpoints out (your server has its own
    /// health checks and metrics), mount
    /// [`Appservice::router_without_operations`] instead; for the key
    /// claims alone, [`crate::ClaimService`].
    pub fn router(&self) -> Router {
        let inner = Arc::clone(&self.inner);
        Router::new()
            .route(paths::LIVE, get(health::live))
            .route(paths::READY, get(health::ready::<H>))
            .route(paths::METRICS, get(health::metrics::<H>))
            .with_state(Arc::clone(&inner))
            .method_not_allowed_fallback(method_not_allowed)
            .fallback_service(self.matrix_routes())
            .layer(middleware::from_fn_with_state(self.observer(), observe))
            .layer(Extension(BodyLimit(inner.config.limits.max_body_bytes)))
    }

    /// The Matrix API of the listener only, without the operations
    /// endpoints: [`paths::LIVE`], [`paths::READY`] and [`paths::METRICS`]
    /// are not served (they get the token check and 404 `M_UNRECOGNIZED`
    /// like any unknown path). Everything else is as
    /// [`Appservice::router`]: auth, limits, timeout, error counts, and a
    /// fallback of its own (mount it with `fallback_service` or
    /// `nest_service`, not `merge`). Serve your own probes, and the
    /// listener's metrics with [`Appservice::metrics_text`] if you like.
    pub fn router_without_operations(&self) -> Router {
        self.matrix_routes()
            .layer(middleware::from_fn_with_state(self.observer(), observe))
            .layer(Extension(BodyLimit(
                self.inner.config.limits.max_body_bytes,
            )))
    }

    /// The Prometheus text exposition of the listener's metrics (what
    /// [`paths::METRICS`] serves), for a server that exposes them itself.
    pub fn metrics_text(&self) -> Result<String, AppserviceError> {
        health::refresh_metrics(&self.inner);
        Ok(self.inner.metrics.render()?)
    }

    fn observer(&self) -> Arc<Observer> {
        Arc::new(Observer {
            timeout: self.inner.config.limits.request_timeout,
            errors: self.inner.metrics.claim.errors.clone(),
        })
    }

    /// The Matrix routes behind the token check, with their fallbacks.
    fn matrix_routes(&self) -> Router {
        let inner = Arc::clone(&self.inner);
        let limit = inner.config.limits.max_body_bytes;
        let token = Arc::new(inner.config.hs_token.clone());
        let mut matrix = Router::new();
        for path in paths::CLAIM {
            matrix = matrix.route(path, post(claim::claim::<H>));
        }
        for path in paths::QUERY {
            matrix = matrix.route(path, post(query::query::<H>));
        }
        for path in paths::TRANSACTION {
            matrix = matrix.route(path, put(transactions::put_transaction::<H>));
        }
        for path in paths::USER {
            matrix = matrix.route(path, get(users::query_user::<H>));
        }
        for path in paths::ROOM {
            matrix = matrix.route(path, get(rooms::query_room::<H>));
        }
        matrix
            .route(paths::PING, post(ping::ping))
            .fallback(unrecognized)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(limit))
            .layer(middleware::from_fn_with_state(
                token,
                auth::require_hs_token,
            ))
            .with_state(inner)
    }

    /// Bind `addr` and serve until `shutdown` resolves, then shut down
    /// gracefully (see [`Appservice::serve_on`]).
    pub async fn serve(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppserviceError> {
        let listener = TcpListener::bind(addr).await?;
        self.serve_on(listener, shutdown).await
    }

    /// Serve on a bound listener until `shutdown` resolves.
    ///
    /// On shutdown: readiness turns 503, no new connection is accepted,
    /// every request in flight runs to its end (a claim answers once its keys
    /// are durable), then this returns. Nothing is ever answered 200 before
    /// its durable write, shutdown or not.
    pub async fn serve_on(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppserviceError> {
        let inner = Arc::clone(&self.inner);
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "appservice listener serving");
        }
        let signal = async move {
            shutdown.await;
            inner.draining.store(true, Ordering::SeqCst);
            tracing::info!("graceful shutdown: finishing requests in flight");
        };
        axum::serve(listener, self.router())
            .with_graceful_shutdown(signal)
            .await?;
        tracing::info!("appservice listener stopped");
        Ok(())
    }
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM: a ready `shutdown` argument for
/// [`Appservice::serve`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
