//! The key-claim service alone ([`ClaimService`]): the MSC3983 claim paths
//! for a bridge that already has its own appservice framework.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, State},
    middleware,
    routing::post,
};
use bridgekeys_olm::AccountManager;
use prometheus::Registry;

use crate::{
    AppserviceConfig, AppserviceError, HsToken, Limits, MatrixError, UserNamespace, auth,
    body::{BodyLimit, MatrixJson},
    claim::{self, ClaimContext, ClaimRequest, ClaimResponse},
    metrics::{self, ClaimMetrics},
    server::{Observer, method_not_allowed, observe, paths},
};

struct ClaimState {
    hs_token: HsToken,
    namespace: UserNamespace,
    limits: Limits,
    manager: Arc<AccountManager>,
    registry: Registry,
    metrics: ClaimMetrics,
    fallback_in_claims: AtomicBool,
}

/// The MSC3983 key-claim endpoint alone: the claim paths
/// ([`paths::CLAIM`]) as a router to mount next to the routes of a bridge
/// that already has its own appservice framework (transactions, queries,
/// health checks), with no [`crate::BridgeHandler`] to write.
///
/// It is the same code as the whole listener's claim endpoint
/// ([`crate::claim`]): the homeserver token on every request (401
/// `M_MISSING_TOKEN`, 403 `M_FORBIDDEN`), the body limit (413
/// `M_TOO_LARGE`), the per-request caps, the request timeout, Matrix JSON
/// errors, and keys durable before the 200. It answers nothing but the
/// claim paths: every other request goes to the rest of your app. Key pools
/// ([`crate::KeyPool`]) need the whole listener: their probe is answered
/// there.
///
/// Cheap to clone: clones share the metrics.
///
/// ```
/// # use std::sync::Arc;
/// # use bridgekeys_appservice::{ClaimService, HsToken, Limits, UserNamespace};
/// # use bridgekeys_olm::{AccountManager, ManagerConfig};
/// # use bridgekeys_store::{SledStore, SledStoreConfig, StoreKey};
/// use axum::{Router, body::Body, http::Request, routing::get};
/// use tower::ServiceExt as _;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let store = SledStore::create(SledStoreConfig::new(dir.path().join("s"), StoreKey::generate()))?;
/// let manager = Arc::new(AccountManager::new(Arc::new(store), ManagerConfig::default()));
/// let puppet = ruma::UserId::parse("@echo_bob:example.org")?;
/// manager.create_device(&puppet, &ruma::OwnedDeviceId::from("PUPPET")).await?;
///
/// let claims = ClaimService::new(
///     HsToken::new("hs-secret"),
///     UserNamespace::new(["@echo_.*:example.org"], None)?,
///     Limits::default(),
///     manager,
/// )?;
/// // The bridge's own app, with the claim paths merged into it.
/// let app = Router::new()
///     .route("/health", get(|| async { "ok" }))
///     .merge(claims.router());
///
/// let request = Request::post("/_matrix/app/v1/keys/claim")
///     .header("authorization", "Bearer hs-secret")
///     .body(Body::from(r#"{"@echo_bob:example.org": {"PUPPET": ["signed_curve25519"]}}"#))?;
/// let response = app.oneshot(request).await?;
/// assert_eq!(response.status(), 200);
/// let body = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
/// let answer: serde_json::Value = serde_json::from_slice(&body)?;
/// assert_eq!(answer["@echo_bob:example.org"]["PUPPET"].as_object().map(|k| k.len()), Some(1));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClaimService {
    state: Arc<ClaimState>,
}

impl std::fmt::Debug for ClaimService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimService")
            .field("namespace", &self.state.namespace)
            .field("limits", &self.state.limits)
            .field("fallback_in_claims", &self.state.fallback_in_claims)
            .finish_non_exhaustive()
    }
}

impl ClaimService {
    /// Claims for the users of `namespace` (the bridge's exclusive one:
    /// [`UserNamespace::from_registration`]), authenticated by `hs_token`,
    /// bounded by `limits` (body size, keys per device, devices per claim,
    /// concurrency, timeout), answered from `manager`'s puppet devices.
    pub fn new(
        hs_token: HsToken,
        namespace: UserNamespace,
        limits: Limits,
        manager: Arc<AccountManager>,
    ) -> Result<Self, AppserviceError> {
        let registry = metrics::new_registry()?;
        let metrics = ClaimMetrics::register(&registry)?;
        Ok(Self {
            state: Arc::new(ClaimState {
                hs_token,
                namespace,
                limits,
                manager,
                registry,
                metrics,
                fallback_in_claims: AtomicBool::new(false),
            }),
        })
    }

    /// The token, namespace and limits of a listener configuration
    /// ([`AppserviceConfig::from_registration`]).
    pub fn from_config(
        config: &AppserviceConfig,
        manager: Arc<AccountManager>,
    ) -> Result<Self, AppserviceError> {
        Self::new(
            config.hs_token.clone(),
            config.namespace.clone(),
            config.limits.clone(),
            manager,
        )
    }

    /// Also return each device's published fallback key, as
    /// [`crate::Appservice::with_fallback_in_claims`] does (off by default;
    /// read its caveats first). Applies to every router of this service and
    /// its clones.
    pub fn with_fallback_in_claims(self, on: bool) -> Self {
        self.state.fallback_in_claims.store(on, Ordering::SeqCst);
        self
    }

    /// The claim paths ([`paths::CLAIM`], `POST` only) as an axum
    /// [`Router`], hence a tower service. It has no fallback of its own, so
    /// `your_app.merge(claims.router())` works; the token check, body limit
    /// and timeout apply to the claim paths only, never to your routes. A
    /// wrong method on a claim path is 405 `M_UNRECOGNIZED`; any other path
    /// is not its business (your app's fallback answers it).
    pub fn router(&self) -> Router {
        let limit = self.state.limits.max_body_bytes;
        let observer = Arc::new(Observer {
            timeout: self.state.limits.request_timeout,
            errors: self.state.metrics.errors.clone(),
        });
        let mut router = Router::new();
        for path in paths::CLAIM {
            router = router.route(path, post(claim_handler));
        }
        router
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(Arc::clone(&self.state))
            .route_layer(DefaultBodyLimit::max(limit))
            .route_layer(middleware::from_fn_with_state(
                Arc::new(self.state.hs_token.clone()),
                auth::require_hs_token,
            ))
            .route_layer(middleware::from_fn_with_state(observer, observe))
            .route_layer(Extension(BodyLimit(limit)))
    }

    /// Register the claim counters in your own Prometheus registry as
    /// well, so your `/metrics` serves them (names prefixed
    /// `bridgekeys_appservice_`, values shared with
    /// [`ClaimService::registry`]). Refused if the registry already holds
    /// metrics of these names.
    pub fn register_metrics(&self, registry: &Registry) -> Result<(), AppserviceError> {
        self.state.metrics.register_in(registry)
    }

    /// The claim counters (claims answered, keys issued, devices left out,
    /// evictions, errors by errcode, answer times), in a registry of their
    /// own: gather it next to your own registry's metrics, or use
    /// [`ClaimService::register_metrics`].
    pub fn registry(&self) -> &Registry {
        &self.state.registry
    }

    /// The Prometheus text exposition of [`ClaimService::registry`].
    pub fn metrics_text(&self) -> Result<String, AppserviceError> {
        self.state
            .metrics
            .observe_evictions(self.state.manager.stats().evicted_keys);
        Ok(metrics::render(&self.state.registry)?)
    }
}

async fn claim_handler(
    State(state): State<Arc<ClaimState>>,
    MatrixJson(request): MatrixJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, MatrixError> {
    let cx = ClaimContext {
        limits: &state.limits,
        namespace: &state.namespace,
        manager: &state.manager,
        metrics: &state.metrics,
        pool: None,
        fallback_in_claims: state.fallback_in_claims.load(Ordering::SeqCst),
    };
    // `answer` also brings the eviction counter up to date, so an author's
    // registry, gathered without asking us, stays current.
    claim::answer(&cx, request).await.map(Json)
}
