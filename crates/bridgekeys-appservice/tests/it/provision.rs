//! Puppet provisioning and fallback key rotation against an in-process fake
//! homeserver (axum on 127.0.0.1) that records every request and can fail
//! uploads on demand.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::common::public_of;
use axum::{
    Json, Router,
    body::{Body, to_bytes},
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, Method, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::{post, put},
};
use bridgekeys_appservice::{
    Appservice, AppserviceConfig, AsToken, BridgeHandler, Clock, HandlerError, HomeserverClient,
    HsToken, Limits, ManualClock, ProvisionConfig, Provisioner, ToDevice, Transaction,
    UserDecision, UserNamespace,
};
use bridgekeys_olm::{AccountManager, ManagerConfig, fallback::FallbackPolicy};
use bridgekeys_store::{
    DeviceKey, Pending, PuppetRegistry, SledStore, SledStoreConfig, StoreError, StoreKey,
    TransactionLog,
};
use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde_json::{Value, json};
use tower::ServiceExt;

const AS_TOKEN: &str = "as-token-for-provisioning-tests";
const HS_TOKEN: &str = "hs-token-for-provisioning-tests";
const T0: u64 = 1_700_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);

fn puppet(n: usize) -> OwnedUserId {
    format!("@echo_{n}:localhost").try_into().unwrap()
}

fn device() -> OwnedDeviceId {
    "BRIDGEKEYS".into()
}

// ---------------------------------------------------------------------------
// The fake homeserver.

#[derive(Clone, Debug)]
struct Recorded {
    query: HashMap<String, String>,
    body: Value,
}

#[derive(Default)]
struct HsState {
    registered: HashSet<String>,
    registrations: Vec<Value>,
    logins: Vec<Value>,
    devices: Vec<Recorded>,
    uploads: Vec<Recorded>,
    /// Answer this many upcoming uploads with 502 (nothing stored).
    fail_uploads: usize,
    /// Store this many upcoming uploads, then answer 502 anyway (the 200
    /// was lost on the way back).
    lose_answers: usize,
    /// Answer a re-upload of a stored fallback key id 400 "already exists"
    /// even when the content is identical (a stricter homeserver).
    strict_repeats: bool,
    /// (user, device, key id) -> fallback key content, as Synapse keeps it.
    fallback: HashMap<(String, String, String), Value>,
    /// `keys/device_signing/upload` bodies.
    cross_signing_uploads: Vec<Recorded>,
    /// `keys/signatures/upload` bodies.
    signature_uploads: Vec<Recorded>,
    /// Answer this many upcoming cross-signing uploads with 502.
    fail_cross_signing: usize,
    /// Hold the next upload before it is applied: tell the first `Notify`
    /// it arrived, wait for the second.
    hold_upload: Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>,
}

#[derive(Clone, Default)]
struct FakeHomeserver(Arc<Mutex<HsState>>);

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    (status, Json(json!({"errcode": errcode, "error": error}))).into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {AS_TOKEN}"))
}

async fn register(
    State(hs): State<FakeHomeserver>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad token");
    }
    let mut s = hs.0.lock().unwrap();
    s.registrations.push(body.clone());
    let localpart = body["username"].as_str().unwrap_or_default().to_owned();
    if !s.registered.insert(localpart.clone()) {
        return matrix_error(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "taken");
    }
    Json(json!({"user_id": format!("@{localpart}:localhost")})).into_response()
}

async fn login(
    State(hs): State<FakeHomeserver>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad token");
    }
    let user = body["identifier"]["user"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    hs.0.lock().unwrap().logins.push(body.clone());
    Json(json!({
        "user_id": user,
        "access_token": "device-token-from-login",
        "device_id": body["device_id"],
    }))
    .into_response()
}

async fn put_device(
    State(hs): State<FakeHomeserver>,
    headers: HeaderMap,
    UrlPath(device_id): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad token");
    }
    let mut query = query;
    query.insert("path_device_id".into(), device_id);
    hs.0.lock().unwrap().devices.push(Recorded { query, body });
    Json(json!({})).into_response()
}

async fn upload(
    State(hs): State<FakeHomeserver>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad token");
    }
    let held = hs.0.lock().unwrap().hold_upload.take();
    if let Some((arrived, release)) = held {
        arrived.notify_one();
        release.notified().await;
    }
    // Recorded when applied: `uploads` is in the order the keys landed.
    let mut s = hs.0.lock().unwrap();
    s.uploads.push(Recorded {
        query: query.clone(),
        body: body.clone(),
    });
    if s.fail_uploads > 0 {
        s.fail_uploads -= 1;
        return matrix_error(StatusCode::BAD_GATEWAY, "M_UNKNOWN", "injected failure");
    }
    let (Some(user), Some(dev)) = (query.get("user_id"), query.get("device_id")) else {
        return matrix_error(StatusCode::BAD_REQUEST, "M_UNKNOWN_DEVICE", "no device");
    };
    if let Some(keys) = body.get("fallback_keys").and_then(Value::as_object) {
        for (id, key) in keys {
            let slot = (user.clone(), dev.clone(), id.clone());
            match s.fallback.get(&slot) {
                Some(old) if old != key || s.strict_repeats => {
                    // Synapse: an existing key id with different content.
                    return matrix_error(
                        StatusCode::BAD_REQUEST,
                        "M_INVALID_PARAM",
                        "One time key already exists",
                    );
                }
                _ => {
                    s.fallback.insert(slot, key.clone());
                }
            }
        }
    }
    if s.lose_answers > 0 {
        s.lose_answers -= 1;
        return matrix_error(StatusCode::BAD_GATEWAY, "M_UNKNOWN", "answer lost");
    }
    Json(json!({"one_time_key_counts": {}})).into_response()
}

async fn upload_cross_signing(
    State(hs): State<FakeHomeserver>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad token");
    }
    let mut s = hs.0.lock().unwrap();
    s.cross_signing_uploads.push(Recorded { query, body });
    if s.fail_cross_signing > 0 {
        s.fail_cross_signing -= 1;
        return matrix_error(StatusCode::BAD_GATEWAY, "M_UNKNOWN", "injected failure");
    }
    Json(json!({})).into_response()
}

async fn upload_signatures(
    State(hs): State<FakeHomeserver>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad token");
    }
    hs.0.lock()
        .unwrap()
        .signature_uploads
        .push(Recorded { query, body });
    Json(json!({"failures": {}})).into_response()
}

impl FakeHomeserver {
    async fn start() -> (Self, String) {
        let hs = Self::default();
        let app = Router::new()
            .route("/_matrix/client/v3/register", post(register))
            .route("/_matrix/client/v3/login", post(login))
            .route("/_matrix/client/v3/devices/{device_id}", put(put_device))
            .route("/_matrix/client/v3/keys/upload", post(upload))
            .route(
                "/_matrix/client/v3/keys/device_signing/upload",
                post(upload_cross_signing),
            )
            .route(
                "/_matrix/client/v3/keys/signatures/upload",
                post(upload_signatures),
            )
            .with_state(hs.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (hs, url)
    }

    fn fail_next_uploads(&self, n: usize) {
        self.0.lock().unwrap().fail_uploads = n;
    }

    /// Hold the next upload until the second `Notify` is told; the first
    /// is told when it arrives.
    fn hold_next_upload(&self) -> (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
        let gate = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        self.0.lock().unwrap().hold_upload = Some(gate.clone());
        gate
    }

    fn uploads(&self) -> Vec<Recorded> {
        self.0.lock().unwrap().uploads.clone()
    }

    fn registrations(&self) -> Vec<Value> {
        self.0.lock().unwrap().registrations.clone()
    }

    fn logins(&self) -> Vec<Value> {
        self.0.lock().unwrap().logins.clone()
    }

    fn devices(&self) -> Vec<Recorded> {
        self.0.lock().unwrap().devices.clone()
    }
}

// ---------------------------------------------------------------------------
// The bridge side.

struct Bridge {
    store: Arc<SledStore>,
    manager: Arc<AccountManager>,
    provisioner: Arc<Provisioner>,
    clock: Arc<ManualClock>,
}

fn open_bridge(dir: &Path, url: &str, config: ProvisionConfig) -> Bridge {
    let store = Arc::new(
        SledStore::open_or_create(SledStoreConfig::new(
            dir.join("store"),
            StoreKey::new([9; 32]),
        ))
        .unwrap(),
    );
    let manager = Arc::new(AccountManager::new(
        Arc::clone(&store) as _,
        ManagerConfig::default(),
    ));
    let client = HomeserverClient::new(url, AsToken::new(AS_TOKEN)).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let provisioner = Arc::new(
        Provisioner::new(
            client,
            Arc::clone(&manager),
            Arc::clone(&store) as Arc<dyn PuppetRegistry>,
            config,
        )
        .with_clock(Arc::clone(&clock) as _),
    );
    Bridge {
        store,
        manager,
        provisioner,
        clock,
    }
}

fn fast_retries() -> ProvisionConfig {
    {
        let mut c = ProvisionConfig::default();
        c.retry_delay = Duration::ZERO;
        c
    }
}

/// [`fast_retries`] that gives up after `attempts` tries of a call.
fn giving_up_after(attempts: u32) -> ProvisionConfig {
    let mut c = fast_retries();
    c.max_attempts = attempts;
    c
}

fn fallback_of(upload: &Recorded) -> (String, Value) {
    let keys = upload.body["fallback_keys"].as_object().unwrap();
    assert_eq!(keys.len(), 1, "one fallback key per upload");
    let (id, key) = keys.iter().next().unwrap();
    (id.clone(), key.clone())
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn ensure_puppet_registers_creates_the_device_and_uploads_persisted_keys() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let user = puppet(1);

    let device_id = b.provisioner.ensure_puppet(&user).await.unwrap();
    assert_eq!(device_id, device());

    assert_eq!(
        hs.registrations(),
        vec![json!({
            "type": "m.login.application_service",
            "username": "echo_1",
            "inhibit_login": true,
        })]
    );
    let devices = hs.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].query["user_id"], user.as_str());
    assert_eq!(devices[0].query["path_device_id"], "BRIDGEKEYS");

    let uploads = hs.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].query["user_id"], user.as_str());
    assert_eq!(uploads[0].query["device_id"], "BRIDGEKEYS");
    let device_keys = b.manager.device_keys(&user, &device()).unwrap();
    assert_eq!(
        uploads[0].body["device_keys"],
        serde_json::to_value(&device_keys).unwrap()
    );
    let (_, fallback) = fallback_of(&uploads[0]);
    assert_eq!(fallback["fallback"], json!(true));
    let state = b.manager.fallback_state(&user, &device()).unwrap();
    let current = state.current.unwrap();
    assert_eq!(fallback["key"], json!(current.public_key));
    assert!(current.published, "a 200 marks the key published");
    assert!(
        b.store
            .contains_puppet(&bridgekeys_store::DeviceKey::new(
                user.as_str(),
                "BRIDGEKEYS"
            ))
            .unwrap()
    );

    // Done once: a second call asks the homeserver nothing.
    b.provisioner.ensure_puppet(&user).await.unwrap();
    assert_eq!(hs.registrations().len(), 1);
    assert_eq!(hs.devices().len(), 1);
    assert_eq!(hs.uploads().len(), 1);
    let stats = b.provisioner.stats();
    assert_eq!((stats.devices_provisioned, stats.uploads), (1, 1));
}

/// The puppet registry as the provisioner sees it, counting its writes: on
/// sled each one rewrites the device's account record (the registry entry
/// is its header).
struct CountingRegistry {
    inner: Arc<dyn PuppetRegistry>,
    writes: std::sync::atomic::AtomicUsize,
    /// Run once, right before the next `schedule_rotation` reaches `inner`.
    before_schedule: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl CountingRegistry {
    fn count(&self) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl PuppetRegistry for CountingRegistry {
    fn record_puppet(&self, d: &DeviceKey) -> Result<Pending, StoreError> {
        self.count();
        self.inner.record_puppet(d)
    }
    fn contains_puppet(&self, d: &DeviceKey) -> Result<bool, StoreError> {
        self.inner.contains_puppet(d)
    }
    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError> {
        self.inner.puppets()
    }
    fn record_cross_signed(&self, d: &DeviceKey) -> Result<Pending, StoreError> {
        self.count();
        self.inner.record_cross_signed(d)
    }
    fn is_cross_signed(&self, d: &DeviceKey) -> Result<bool, StoreError> {
        self.inner.is_cross_signed(d)
    }
    fn schedule_rotation(
        &self,
        d: &DeviceKey,
        due_ms: u64,
        found_at: Option<u64>,
    ) -> Result<Pending, StoreError> {
        self.count();
        let before = self.before_schedule.lock().unwrap().take();
        if let Some(before) = before {
            before();
        }
        self.inner.schedule_rotation(d, due_ms, found_at)
    }
    fn due_rotations(
        &self,
        now_ms: u64,
        after: Option<&(DeviceKey, u64)>,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        self.inner.due_rotations(now_ms, after, limit)
    }
}

/// Provisioning a new device records it in the puppet registry, due at
/// once, in the write that persists its fallback key, and the publish write
/// sets its real next step: its account record is written four times
/// (create, fallback key generated and recorded, published and scheduled,
/// cross-signed) where it was six (record and schedule apart), the device
/// is already scheduled at the policy's time (which the first rotation
/// pass used to rewrite it for), and the registry is right afterwards.
#[tokio::test]
async fn provisioning_records_the_puppet_in_the_write_that_persists_its_fallback_key() {
    use bridgekeys_store::{
        Backend,
        testing::{Intercepted, Write},
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (_hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open_or_create(SledStoreConfig::new(
        dir.path().join("store"),
        StoreKey::new([9; 32]),
    ))
    .unwrap();
    let store = Arc::new(Intercepted::new(Arc::new(sled) as Arc<dyn Backend>));
    let device_writes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&device_writes);
    let (user, probe) = (puppet(60), Arc::clone(&store));
    let recorded_before = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&recorded_before);
    let key_of_user = DeviceKey::new(user.as_str(), "BRIDGEKEYS");
    store.intercept(move |w| {
        if matches!(w, Write::Device(_)) {
            counted.fetch_add(1, Ordering::SeqCst);
            // Whether the device was recorded before this write.
            seen.lock()
                .unwrap()
                .push(probe.contains_puppet(&key_of_user).unwrap());
        }
        Ok(())
    });
    let registry = Arc::new(CountingRegistry {
        inner: Arc::clone(&store) as Arc<dyn PuppetRegistry>,
        writes: AtomicUsize::new(0),
        before_schedule: Mutex::new(None),
    });
    let manager = Arc::new(AccountManager::new(
        Arc::clone(&store) as _,
        ManagerConfig::default(),
    ));
    let provisioner = Provisioner::new(
        HomeserverClient::new(&url, AsToken::new(AS_TOKEN)).unwrap(),
        Arc::clone(&manager),
        Arc::clone(&registry) as Arc<dyn PuppetRegistry>,
        fast_retries(),
    )
    .with_clock(Arc::new(ManualClock::new(T0)) as _);
    provisioner.ensure_puppet(&user).await.unwrap();

    let (device_writes, registry_writes) = (
        device_writes.load(Ordering::SeqCst),
        registry.writes.load(Ordering::SeqCst),
    );
    assert_eq!(
        (device_writes, registry_writes),
        (3, 1),
        "create, generate + record, publish; then only the cross-signed flag"
    );
    assert_eq!(
        *recorded_before.lock().unwrap(),
        vec![false, false, true],
        "recorded by the second write (the key's), before the publish write"
    );
    let key = DeviceKey::new(user.as_str(), "BRIDGEKEYS");
    assert!(store.contains_puppet(&key).unwrap());
    assert_eq!(store.puppets().unwrap(), vec![key.clone()]);
    assert!(store.is_cross_signed(&key).unwrap());
    // Due at once until the upload; the publish write set the policy's
    // time (the key's maximum age), so the first pass need not rewrite it.
    let max_age = u64::try_from(FallbackPolicy::default().max_age.as_millis()).unwrap();
    assert_eq!(store.due_rotations(T0, None, 10).unwrap(), vec![]);
    assert_eq!(
        store.due_rotations(u64::MAX, None, 10).unwrap(),
        vec![(key, T0 + max_age)],
        "scheduled at the key's maximum age by the publish write"
    );
    let state = manager.fallback_state(&user, &device()).unwrap();
    assert!(state.current.unwrap().published);
    let stats = provisioner.stats();
    assert_eq!((stats.devices_provisioned, stats.uploads), (1, 1));
}

/// A used report that lands between a rotation step's read of the device
/// and the step's schedule write (another task here; another process the
/// same) must not be put back to the policy's time by that write: the used
/// fallback key would be handed out until the next full pass, up to a day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_report_between_a_step_and_its_schedule_write_leaves_the_device_due_now() {
    use std::sync::atomic::AtomicUsize;
    let (_hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SledStore::open_or_create(SledStoreConfig::new(
            dir.path().join("store"),
            StoreKey::new([9; 32]),
        ))
        .unwrap(),
    );
    let registry = Arc::new(CountingRegistry {
        inner: Arc::clone(&store) as Arc<dyn PuppetRegistry>,
        writes: AtomicUsize::new(0),
        before_schedule: Mutex::new(None),
    });
    let manager = Arc::new(AccountManager::new(
        Arc::clone(&store) as _,
        ManagerConfig::default(),
    ));
    let provisioner = Arc::new(
        Provisioner::new(
            HomeserverClient::new(&url, AsToken::new(AS_TOKEN)).unwrap(),
            Arc::clone(&manager),
            Arc::clone(&registry) as Arc<dyn PuppetRegistry>,
            fast_retries(),
        )
        .with_clock(Arc::new(ManualClock::new(T0)) as _),
    );
    let user = puppet(61);
    provisioner.ensure_puppet(&user).await.unwrap();
    let key = DeviceKey::new(user.as_str(), "BRIDGEKEYS");
    assert_eq!(store.due_rotations(T0, None, 10).unwrap(), vec![]);

    // The step finds the key unused and will schedule it at its maximum
    // age; right before that write, the homeserver reports it used.
    let (reporter, who) = (Arc::clone(&provisioner), user.clone());
    let handle = tokio::runtime::Handle::current();
    *registry.before_schedule.lock().unwrap() = Some(Box::new(move || {
        let marked = std::thread::spawn(move || {
            handle.block_on(reporter.note_unused_fallback_key_types(&who, &device(), &[]))
        })
        .join()
        .unwrap()
        .unwrap();
        assert!(marked, "the report marked the key used");
    }));
    provisioner.rotate_device(&user, &device()).await.unwrap();
    assert!(
        registry.before_schedule.lock().unwrap().is_none(),
        "the step scheduled nothing"
    );
    assert_eq!(
        store.due_rotations(T0, None, 10).unwrap(),
        vec![(key, T0)],
        "the step's schedule write put the used key's rotation back"
    );
}

/// A device the registry does not know but whose fallback key was
/// published before (the registry is another store, and lost it) is new to
/// the homeserver as far as the provisioner can tell: it is created there
/// again, and its device keys go up with that same published key, not
/// nothing. It is recorded only once that upload succeeded: after a failed
/// one, the next `ensure_puppet` uploads again.
#[tokio::test]
async fn a_device_unknown_to_the_registry_with_a_published_key_uploads_its_device_keys_again() {
    use bridgekeys_store::testing::MemoryStore;
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let user = puppet(61);
    b.provisioner.ensure_puppet(&user).await.unwrap();
    let first = hs.uploads();
    assert_eq!((first.len(), hs.devices().len()), (1, 1));

    let registry = Arc::new(MemoryStore::new());
    let provisioner = Provisioner::new(
        HomeserverClient::new(&url, AsToken::new(AS_TOKEN)).unwrap(),
        Arc::clone(&b.manager),
        Arc::clone(&registry) as Arc<dyn PuppetRegistry>,
        giving_up_after(1),
    )
    .with_clock(Arc::clone(&b.clock) as _);
    let key = DeviceKey::new(user.as_str(), "BRIDGEKEYS");
    hs.fail_next_uploads(1);
    provisioner
        .ensure_puppet(&user)
        .await
        .expect_err("the upload failed");
    assert!(
        !registry.contains_puppet(&key).unwrap(),
        "not recorded before its keys are up"
    );
    provisioner.ensure_puppet(&user).await.unwrap();

    let uploads = hs.uploads();
    assert_eq!(uploads.len(), 3, "the device keys went up again, twice");
    assert_eq!(
        hs.devices().len(),
        3,
        "the device was created again each time"
    );
    assert_eq!(uploads[2].query["device_id"], "BRIDGEKEYS");
    assert_eq!(uploads[2].body["device_keys"], first[0].body["device_keys"]);
    assert!(!uploads[2].body["device_keys"].is_null());
    assert_eq!(
        fallback_of(&uploads[2]),
        fallback_of(&first[0]),
        "the same published fallback key, not a new one"
    );
    assert!(registry.contains_puppet(&key).unwrap());
    assert_eq!(
        registry.due_rotations(T0, None, 10).unwrap(),
        vec![(key, T0)]
    );
    let state = b.manager.fallback_state(&user, &device()).unwrap();
    assert_eq!(
        fallback_of(&uploads[2]).1["key"],
        json!(state.current.unwrap().public_key),
        "still the device's current key"
    );
}

#[tokio::test]
async fn a_failed_upload_is_retried_with_identical_keys() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    hs.fail_next_uploads(2);

    b.provisioner.ensure_puppet(&puppet(2)).await.unwrap();

    let uploads = hs.uploads();
    assert_eq!(uploads.len(), 3, "two failures, then success");
    assert!(
        uploads.iter().all(|u| u.body == uploads[0].body),
        "every retry re-sends the very same keys"
    );
    let stats = b.provisioner.stats();
    assert_eq!((stats.upload_retries, stats.uploads), (2, 1));
    assert_eq!(b.manager.stats().fallback_keys_generated, 1);
}

/// A first upload that fails for good leaves the device recorded and due,
/// so the next rotation pass uploads its persisted key, without a call to
/// `ensure_device` and without registering or creating it again.
#[tokio::test]
async fn a_failed_first_upload_is_taken_up_by_the_rotation_pass() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, giving_up_after(2));
    let user = puppet(4);
    hs.fail_next_uploads(100);
    b.provisioner.ensure_puppet(&user).await.unwrap_err();
    hs.fail_next_uploads(0);

    let report = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((report.devices, report.failures), (1, 0));
    let uploads = hs.uploads();
    assert_eq!(
        uploads.len(),
        3,
        "two failed attempts, then the pass's upload"
    );
    assert!(
        uploads.iter().all(|u| u.body == uploads[0].body),
        "the pass uploads the persisted key"
    );
    assert!(
        b.manager
            .fallback_state(&user, &device())
            .unwrap()
            .current
            .unwrap()
            .published
    );
    assert_eq!(hs.registrations().len(), 1, "registered once");
    assert_eq!(hs.devices().len(), 1, "created once");
    assert_eq!(b.manager.stats().fallback_keys_generated, 1);
}

#[tokio::test]
async fn after_a_crash_with_the_upload_unacknowledged_the_same_keys_are_sent_again() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let user = puppet(3);
    {
        let b = open_bridge(dir.path(), &url, giving_up_after(2));
        hs.fail_next_uploads(100);
        let err = b.provisioner.ensure_puppet(&user).await.unwrap_err();
        assert!(err.to_string().contains("502"), "{err}");
        // Recorded and due at once before the upload: the rotation pass
        // would take the unpublished key up again too.
        let key = bridgekeys_store::DeviceKey::new(user.as_str(), "BRIDGEKEYS");
        assert!(b.store.contains_puppet(&key).unwrap());
        assert_eq!(
            b.store.due_rotations(T0, None, 10).unwrap(),
            vec![(key, T0)]
        );
        // The bridge goes down here (everything dropped, store closed).
    }
    hs.fail_next_uploads(0);
    let b = open_bridge(dir.path(), &url, fast_retries());
    b.provisioner.ensure_puppet(&user).await.unwrap();

    let uploads = hs.uploads();
    assert_eq!(uploads.len(), 3);
    assert!(
        uploads.iter().all(|u| u.body == uploads[0].body),
        "the restarted bridge re-sends the persisted keys, not new ones"
    );
    // The device was recorded before the upload (with the write that
    // persisted its key), so the restarted bridge did not register it again.
    assert_eq!(hs.registrations().len(), 1, "registered once");
    assert_eq!(b.manager.stats().fallback_keys_generated, 0);
    assert!(
        b.manager
            .fallback_state(&user, &device())
            .unwrap()
            .current
            .unwrap()
            .published
    );
}

#[tokio::test]
async fn a_lost_200_then_already_exists_for_the_same_key_counts_as_uploaded() {
    let (hs, url) = FakeHomeserver::start().await;
    {
        let mut s = hs.0.lock().unwrap();
        s.lose_answers = 1;
        s.strict_repeats = true;
    }
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let user = puppet(12);
    b.provisioner.ensure_puppet(&user).await.unwrap();
    let uploads = hs.uploads();
    assert_eq!(uploads.len(), 2);
    assert_eq!(uploads[0].body, uploads[1].body);
    assert!(
        b.manager
            .fallback_state(&user, &device())
            .unwrap()
            .current
            .unwrap()
            .published,
        "\"already exists\" for our own persisted key is success"
    );
}

#[tokio::test]
async fn an_existing_user_counts_as_registered() {
    let (hs, url) = FakeHomeserver::start().await;
    hs.0.lock().unwrap().registered.insert("echo_4".into());
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    b.provisioner.ensure_puppet(&puppet(4)).await.unwrap();
    assert_eq!(hs.devices().len(), 1);
    assert_eq!(hs.uploads().len(), 1);
}

#[tokio::test]
async fn without_msc4190_registration_creates_the_device_and_an_existing_user_logs_in() {
    let (hs, url) = FakeHomeserver::start().await;
    hs.0.lock().unwrap().registered.insert("echo_15".into());
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = fast_retries();
        c.msc4190 = false;
        c
    };
    let b = open_bridge(dir.path(), &url, config);

    b.provisioner.ensure_puppet(&puppet(14)).await.unwrap();
    assert_eq!(
        hs.registrations()[0],
        json!({
            "type": "m.login.application_service",
            "username": "echo_14",
            "device_id": "BRIDGEKEYS",
        }),
        "a new user gets its device with the registration"
    );
    assert!(hs.logins().is_empty());

    b.provisioner.ensure_puppet(&puppet(15)).await.unwrap();
    assert_eq!(
        hs.logins(),
        vec![json!({
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": "@echo_15:localhost"},
            "device_id": "BRIDGEKEYS",
        })],
        "an existing user gets its device by an appservice login"
    );
    assert!(hs.devices().is_empty(), "no MSC4190 device requests");
    assert_eq!(hs.uploads().len(), 2);
}

#[tokio::test]
async fn an_unreachable_homeserver_fails_provisioning_without_recording_the_puppet() {
    // A port nobody listens on: connection refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let config = giving_up_after(3);
    let b = open_bridge(dir.path(), &url, config);
    let user = puppet(17);
    let err = b.provisioner.ensure_puppet(&user).await.unwrap_err();
    assert!(
        matches!(
            err,
            bridgekeys_appservice::ProvisionError::Homeserver(
                bridgekeys_appservice::HomeserverError::Network(_)
            )
        ),
        "{err}"
    );
    assert!(
        b.store.puppets().unwrap().is_empty(),
        "not recorded as provisioned"
    );
    assert!(
        b.manager
            .fallback_state(&user, &device())
            .unwrap()
            .current
            .is_none(),
        "no fallback key generated before the device exists on the homeserver"
    );
}

#[tokio::test]
async fn a_wrong_as_token_is_a_permanent_error_and_not_retried() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = open_bridge(dir.path(), &url, fast_retries());
    let client = HomeserverClient::new(&url, AsToken::new("wrong")).unwrap();
    b.provisioner = Arc::new(Provisioner::new(
        client,
        Arc::clone(&b.manager),
        Arc::clone(&b.store) as _,
        fast_retries(),
    ));
    let err = b.provisioner.ensure_puppet(&puppet(5)).await.unwrap_err();
    assert!(err.to_string().contains("M_UNKNOWN_TOKEN"), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "the token is never in errors"
    );
    assert!(hs.registrations().is_empty());
}

#[tokio::test]
async fn a_used_report_rotates_uploads_the_new_key_and_forgets_the_old_one_after_grace() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let user = puppet(6);
    b.provisioner.ensure_puppet(&user).await.unwrap();
    let (first_id, first_key) = fallback_of(&hs.uploads()[0]);

    // A report that still lists signed_curve25519 is no news.
    assert!(
        !b.provisioner
            .note_unused_fallback_key_types(&user, &device(), &["signed_curve25519".into()])
            .await
            .unwrap()
    );
    assert!(
        b.provisioner
            .note_unused_fallback_key_types(&user, &device(), &[])
            .await
            .unwrap()
    );
    b.clock.advance(Duration::from_secs(60));
    let report = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((report.devices, report.failures), (1, 0));

    let uploads = hs.uploads();
    assert_eq!(uploads.len(), 2);
    let (second_id, second_key) = fallback_of(&uploads[1]);
    assert_ne!(second_id, first_id);
    assert_ne!(second_key["key"], first_key["key"]);
    assert_eq!(b.manager.stats().fallback_rotations, 1);
    let state = b.manager.fallback_state(&user, &device()).unwrap();
    assert!(state.previous_since_ms.is_some(), "previous key kept");

    // Not before the grace period ...
    b.clock.advance(HOUR - Duration::from_secs(1));
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_forgets, 0);
    // ... but after it.
    b.clock.advance(Duration::from_secs(1));
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_forgets, 1);
    assert!(
        b.manager
            .fallback_state(&user, &device())
            .unwrap()
            .previous_since_ms
            .is_none()
    );
    assert_eq!(hs.uploads().len(), 2, "forgetting uploads nothing");
}

/// Two processes on one store (two managers and provisioners over a
/// shared `MemoryStore`). Process `a` provisions a puppet, and its upload of
/// the first fallback key is slow. Meanwhile `b`'s rotation pass uploads
/// that key, a used report rotates it, and `b` uploads the new key. Then
/// `a`'s upload of the old key lands, last: the homeserver now holds the
/// old key, which the store forgets after the grace period. `a` must see
/// that the current key changed and upload it again, so the homeserver's
/// last fallback key is the stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_upload_of_a_rotated_fallback_key_is_followed_by_the_current_one() {
    let (hs, url) = FakeHomeserver::start().await;
    let store = Arc::new(bridgekeys_store::testing::MemoryStore::new());
    let process = || {
        let manager = Arc::new(AccountManager::new(
            Arc::clone(&store) as _,
            ManagerConfig::default(),
        ));
        let clock = Arc::new(ManualClock::new(T0));
        let provisioner = Arc::new(
            Provisioner::new(
                HomeserverClient::new(&url, AsToken::new(AS_TOKEN)).unwrap(),
                Arc::clone(&manager),
                Arc::clone(&store) as Arc<dyn PuppetRegistry>,
                fast_retries(),
            )
            .with_clock(Arc::clone(&clock) as _),
        );
        (manager, provisioner, clock)
    };
    let (_, a, _) = process();
    let (b_manager, b, b_clock) = process();
    let user = puppet(41);

    let (arrived, release) = hs.hold_next_upload();
    let provisioning = tokio::spawn({
        let (a, user) = (Arc::clone(&a), user.clone());
        async move { a.ensure_puppet(&user).await }
    });
    arrived.notified().await;
    // `a`'s upload of the first key is held. `b` uploads it (the device is
    // due at once), then rotates it after a used report.
    b.rotate_once().await.unwrap();
    let first = b_manager
        .published_fallback_key(&user, &device())
        .unwrap()
        .expect("b published the first key");
    assert!(
        b.note_unused_fallback_key_types(&user, &device(), &[])
            .await
            .unwrap()
    );
    b_clock.advance(Duration::from_secs(60));
    b.rotate_once().await.unwrap();
    let second = b_manager
        .published_fallback_key(&user, &device())
        .unwrap()
        .expect("b published the second key");
    assert_ne!(second.key_id, first.key_id);
    assert_eq!(
        fallback_of(hs.uploads().last().unwrap()).0,
        second.key_id.to_string()
    );

    // Now `a`'s upload of the first key lands.
    release.notify_one();
    provisioning.await.unwrap().unwrap();
    let landed: Vec<String> = hs
        .uploads()
        .iter()
        .filter(|u| u.body.get("fallback_keys").is_some())
        .map(|u| fallback_of(u).0)
        .collect();
    assert!(
        landed.contains(&first.key_id.to_string()),
        "a's upload of the first key landed: {landed:?}"
    );
    let current = b_manager
        .published_fallback_key(&user, &device())
        .unwrap()
        .unwrap();
    assert_eq!(
        current.key_id, second.key_id,
        "the stored key did not change"
    );
    assert_eq!(
        landed.last(),
        Some(&current.key_id.to_string()),
        "the homeserver was left holding a key the store is about to forget: {landed:?}"
    );
}

#[tokio::test]
async fn a_rotation_interrupted_by_a_restart_uploads_the_same_new_key_and_keeps_the_old_one_until_grace_after_upload()
 {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let user = puppet(16);
    let rotated_at;
    {
        let b = open_bridge(dir.path(), &url, giving_up_after(1));
        b.provisioner.ensure_puppet(&user).await.unwrap();
        b.provisioner
            .note_unused_fallback_key_types(&user, &device(), &[])
            .await
            .unwrap();
        hs.fail_next_uploads(1);
        b.clock.advance(Duration::from_secs(10));
        rotated_at = b.clock.now();
        let report = b.provisioner.rotate_once().await.unwrap();
        assert_eq!(report.failures, 1, "the new key's upload failed");
        assert_eq!(b.manager.stats().fallback_rotations, 1);
    }
    let b = open_bridge(dir.path(), &url, fast_retries());
    b.clock.set(rotated_at + 60_000);
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(
        b.manager.stats().fallback_rotations,
        0,
        "no second rotation after the restart"
    );
    let uploads = hs.uploads();
    assert_eq!(
        uploads.len(),
        3,
        "first key, failed new key, retried new key"
    );
    assert_eq!(
        uploads[1].body, uploads[2].body,
        "the restarted bridge uploads the key it rotated to, not another"
    );
    assert_ne!(fallback_of(&uploads[0]).0, fallback_of(&uploads[2]).0);
    // The grace period counts from the new key's upload (until then the
    // homeserver still handed out the old key), across the restart.
    let published_at = rotated_at + 60_000;
    b.clock.set(published_at + 3_600_000 - 1);
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_forgets, 0);
    b.clock.set(published_at + 3_600_000);
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_forgets, 1);
}

#[tokio::test]
async fn while_the_new_key_cannot_be_uploaded_the_previous_key_is_kept_past_the_grace_period() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, giving_up_after(1));
    let user = puppet(18);
    b.provisioner.ensure_puppet(&user).await.unwrap();
    let (_, old) = fallback_of(&hs.uploads()[0]);
    b.provisioner
        .note_unused_fallback_key_types(&user, &device(), &[])
        .await
        .unwrap();
    hs.fail_next_uploads(1000);
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_rotations, 1);
    // The homeserver is unreachable for hours: it still hands out the old
    // key, so the old key must stay.
    b.clock.advance(5 * HOUR);
    let report = b.provisioner.rotate_once().await.unwrap();
    assert_eq!(report.failures, 1);
    assert_eq!(b.manager.stats().fallback_forgets, 0);
    let identity = b.manager.identity_keys(&user, &device()).unwrap();
    let peer = bridgekeys_olm::vodozemac::olm::Account::new();
    let old_key =
        bridgekeys_olm::vodozemac::Curve25519PublicKey::from_base64(old["key"].as_str().unwrap())
            .unwrap();
    let mut session = peer
        .create_outbound_session(
            bridgekeys_olm::vodozemac::olm::SessionConfig::version_1(),
            identity.curve25519,
            old_key,
        )
        .unwrap();
    let alice = ruma::user_id!("@alice:localhost");
    let message = session
        .encrypt(olm_payload(alice, &user, &identity, &peer, "still served").to_string())
        .unwrap();
    let inbound = b
        .manager
        .decrypt_olm(
            (&user, &device()),
            alice,
            peer.curve25519_key(),
            &message,
            None,
        )
        .await
        .unwrap();
    assert!(inbound.used_fallback_key);

    // Back up: the new key is uploaded, and the old one goes a grace period later.
    hs.fail_next_uploads(0);
    b.provisioner.rotate_once().await.unwrap();
    b.clock.advance(HOUR - Duration::from_millis(1));
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_forgets, 0);
    b.clock.advance(Duration::from_millis(1));
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(b.manager.stats().fallback_forgets, 1);
}

#[tokio::test]
async fn an_old_fallback_key_is_rotated_at_the_configured_age() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = fast_retries();
        c.policy = {
            let mut c = FallbackPolicy::default();
            c.max_age = Duration::from_secs(24 * 3600);
            c.grace = HOUR;
            c
        };
        c
    };
    let b = open_bridge(dir.path(), &url, config);
    b.provisioner.ensure_puppet(&puppet(7)).await.unwrap();
    b.clock.advance(Duration::from_secs(24 * 3600 - 1));
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(hs.uploads().len(), 1);
    b.clock.advance(Duration::from_secs(1));
    b.provisioner.rotate_once().await.unwrap();
    assert_eq!(hs.uploads().len(), 2);
    assert_eq!(b.manager.stats().fallback_rotations, 1);
}

#[tokio::test]
async fn the_background_task_wakes_on_a_used_report_and_stops_on_request() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = fast_retries();
        c.rotation_interval = Duration::from_secs(24 * 3600);
        c
    };
    let b = open_bridge(dir.path(), &url, config);
    let user = puppet(8);
    b.provisioner.ensure_puppet(&user).await.unwrap();

    let task = b.provisioner.start_rotation();
    let mut passes = task.passes();
    passes.wait_for(|n| *n >= 1).await.unwrap();
    assert_eq!(hs.uploads().len(), 1, "nothing due in the first pass");

    b.provisioner
        .note_unused_fallback_key_types(&user, &device(), &[])
        .await
        .unwrap();
    // Woken by the report, long before the 24 h interval.
    passes.wait_for(|n| *n >= 2).await.unwrap();
    assert_eq!(hs.uploads().len(), 2, "rotated and uploaded");
    task.stop().await;
}

// ---------------------------------------------------------------------------
// Through the listener.

struct Accepting;

impl BridgeHandler for Accepting {
    async fn transaction(&self, _t: &Transaction) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn query_user(&self, _user_id: &UserId) -> Result<UserDecision, HandlerError> {
        Ok(UserDecision::Accept { device_id: None })
    }
}

fn listener(b: &Bridge, fallback_in_claims: bool) -> Router {
    listener_with(b, fallback_in_claims, Arc::new(Accepting))
}

fn listener_with<H: BridgeHandler>(
    b: &Bridge,
    fallback_in_claims: bool,
    handler: Arc<H>,
) -> Router {
    let config = {
        let mut c = AppserviceConfig::new(
            HsToken::new(HS_TOKEN),
            UserNamespace::new(
                ["@echo_.*:localhost"],
                Some("@echo_bot:localhost".try_into().unwrap()),
            )
            .unwrap(),
            "echo",
        );
        c.puppet_device_id = device();
        c.limits = Limits::default();
        c
    };
    Appservice::new(
        config,
        Arc::clone(&b.manager),
        Arc::clone(&b.store) as Arc<dyn TransactionLog>,
        handler,
    )
    .unwrap()
    .with_provisioner(Arc::clone(&b.provisioner))
    .with_fallback_in_claims(fallback_in_claims)
    .router()
}

async fn call(
    router: &Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {HS_TOKEN}"))
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn the_user_query_provisions_and_a_transaction_report_drives_rotation_into_the_metrics() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let router = listener(&b, false);
    let user = puppet(9);

    let (status, _) = call(
        &router,
        Method::GET,
        &format!("/_matrix/app/v1/users/{user}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hs.registrations().len(), 1);
    assert_eq!(hs.uploads().len(), 1, "provisioned before the 200");

    let txn = json!({
        "events": [],
        "org.matrix.msc3202.device_unused_fallback_key_types": {
            user.as_str(): {"BRIDGEKEYS": []},
            "@someone_else:localhost": {"DEV": []},
        },
    });
    let (status, _) = call(
        &router,
        Method::PUT,
        "/_matrix/app/v1/transactions/t1",
        Some(txn),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let current = b
        .manager
        .fallback_state(&user, &device())
        .unwrap()
        .current
        .unwrap();
    assert!(current.used, "the report was recorded");

    // Rotation 1 (reported used) and its upload.
    b.provisioner.rotate_once().await.unwrap();
    // After the grace period the previous key is forgotten; then the new
    // key is reported used too, and that rotation's upload fails once.
    hs.fail_next_uploads(1);
    b.clock.advance(HOUR);
    b.provisioner.rotate_once().await.unwrap();
    b.provisioner
        .note_unused_fallback_key_types(&user, &device(), &[])
        .await
        .unwrap();
    b.provisioner.rotate_once().await.unwrap();

    let (status, metrics) = call(&router, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "bridgekeys_appservice_fallback_rotations_total 2",
        "bridgekeys_appservice_fallback_forgets_total 1",
        "bridgekeys_appservice_fallback_upload_retries_total 1",
        "bridgekeys_appservice_fallback_uploads_total 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
}

#[tokio::test]
async fn claims_carry_the_fallback_key_only_when_enabled_under_its_own_id() {
    let (_hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let user = puppet(10);
    b.provisioner.ensure_puppet(&user).await.unwrap();
    let fallback = b
        .manager
        .published_fallback_key(&user, &device())
        .unwrap()
        .unwrap();
    let claim = json!({ user.as_str(): {"BRIDGEKEYS": ["signed_curve25519"]} });
    let keys_of = |body: &str| -> BTreeMap<String, Value> {
        let v: Value = serde_json::from_str(body).unwrap();
        serde_json::from_value(v[user.as_str()]["BRIDGEKEYS"].clone()).unwrap()
    };

    // Off (the default): one-time keys only.
    let off = listener(&b, false);
    let (status, body) = call(
        &off,
        Method::POST,
        "/_matrix/app/v1/keys/claim",
        Some(claim.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let keys = keys_of(&body);
    assert_eq!(keys.len(), 1);
    assert!(keys.values().all(|k| k.get("fallback").is_none()));
    let first_otk_id = keys.keys().next().unwrap().clone();
    assert_ne!(
        first_otk_id,
        fallback.key_id.to_string(),
        "one-time key ids are above every fallback key id"
    );

    // On: the fallback key joins.
    let on = listener(&b, true);
    let (_, body) = call(&on, Method::POST, "/_matrix/app/v1/keys/claim", Some(claim)).await;
    let keys = keys_of(&body);
    assert_eq!(keys.len(), 2, "{body}");
    assert_eq!(
        keys[fallback.key_id.as_str()],
        serde_json::to_value(&fallback.key).unwrap()
    );
    assert_eq!(
        keys.values()
            .filter(|k| k["fallback"] == json!(true))
            .count(),
        1
    );

    // A fresh device's first claim: its first one-time key and its first
    // fallback key do not share an id either (they did when both came from
    // vodozemac's counters, and the fallback key had to be left out).
    let other = puppet(11);
    b.provisioner.ensure_puppet(&other).await.unwrap();
    let claim = json!({ other.as_str(): {"BRIDGEKEYS": ["signed_curve25519"]} });
    let (_, body) = call(&on, Method::POST, "/_matrix/app/v1/keys/claim", Some(claim)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let keys = v[other.as_str()]["BRIDGEKEYS"].as_object().unwrap();
    assert_eq!(keys.len(), 2, "one-time key and fallback key: {body}");
    assert_eq!(
        keys.values()
            .filter(|k| k["fallback"] == json!(true))
            .count(),
        1
    );
}

/// A spec Olm payload from `sender` to `recipient`'s device, carrying
/// `body`.
fn olm_payload(
    sender: &ruma::UserId,
    recipient: &ruma::UserId,
    identity: &bridgekeys_olm::vodozemac::olm::IdentityKeys,
    peer: &bridgekeys_olm::vodozemac::olm::Account,
    body: &str,
) -> Value {
    json!({
        "type": "m.test", "content": {"body": body},
        "sender": sender, "recipient": recipient,
        "recipient_keys": {"ed25519": identity.ed25519.to_base64()},
        "keys": {"ed25519": peer.ed25519_key().to_base64()},
    })
}

/// What a transaction's to-device messages became, in order:
/// `Ok((content body, used_fallback_key))` or `Err(why undecryptable)`.
#[derive(Default)]
struct ToDeviceLog(Mutex<Vec<Result<(String, bool), String>>>);

impl BridgeHandler for ToDeviceLog {
    async fn transaction(&self, t: &Transaction) -> Result<(), HandlerError> {
        let mut log = self.0.lock().unwrap();
        for m in &t.to_device {
            log.push(match m {
                ToDevice::Decrypted(d) => {
                    let content: Value = serde_json::from_str(d.olm.payload.content.get()).unwrap();
                    Ok((
                        content["body"].as_str().unwrap().to_owned(),
                        d.olm.used_fallback_key,
                    ))
                }
                ToDevice::Other(o) => Err(o.undecryptable.clone().unwrap_or_default()),
            });
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_fallback_prekey_message_decrypts_once_its_replay_is_refused_and_the_key_is_rotated_at_once()
 {
    use bridgekeys_olm::vodozemac::{
        Curve25519PublicKey,
        olm::{Account, OlmMessage, SessionConfig},
    };
    let (_hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, fast_retries());
    let user = puppet(13);
    b.provisioner.ensure_puppet(&user).await.unwrap();
    // What a peer gets from the homeserver once the one-time keys are gone.
    let fallback = b
        .manager
        .published_fallback_key(&user, &device())
        .unwrap()
        .unwrap();
    let identity = b.manager.identity_keys(&user, &device()).unwrap();
    let peer = Account::new();
    let mut session = peer
        .create_outbound_session(
            SessionConfig::version_1(),
            identity.curve25519,
            Curve25519PublicKey::from_slice(fallback.key.key.as_bytes()).unwrap(),
        )
        .unwrap();
    let payload = olm_payload(
        ruma::user_id!("@alice:localhost"),
        &user,
        &identity,
        &peer,
        "via the fallback key",
    );
    let OlmMessage::PreKey(message) = session.encrypt(payload.to_string()).unwrap() else {
        panic!("first message must be a pre-key message");
    };
    let uploads_before = _hs.uploads().len();
    let to_device = json!({
        "to_user_id": user.as_str(),
        "to_device_id": "BRIDGEKEYS",
        "type": "m.room.encrypted",
        "sender": "@alice:localhost",
        "content": {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": peer.curve25519_key().to_base64(),
            "ciphertext": {
                identity.curve25519.to_base64(): {"type": 0, "body": message.to_base64()}
            }
        }
    });
    let log = Arc::new(ToDeviceLog::default());
    let router = listener_with(&b, false, Arc::clone(&log));
    for txn in ["f1", "f2"] {
        // The same message again, in a new transaction: a replay.
        let body = json!({"events": [], "de.sorunome.msc2409.to_device": [to_device.clone()]});
        let (status, _) = call(
            &router,
            Method::PUT,
            &format!("/_matrix/app/v1/transactions/{txn}"),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let seen = log.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], Ok(("via the fallback key".to_owned(), true)));
    let why = seen[1].clone().unwrap_err();
    assert!(why.contains("replay"), "{why}");
    // The used fallback key is replaced right away, not at the next pass
    // (no pass runs in this test): a new one is generated and uploaded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let new_key = loop {
        let state = b.manager.fallback_state(&user, &device()).unwrap();
        let current = state.current.unwrap();
        if current.published && current.public_key != fallback.key.key.encode() {
            break current.public_key;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the used fallback key was not rotated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let uploads = _hs.uploads();
    assert_eq!(uploads.len(), uploads_before + 1);
    let uploaded = uploads.last().unwrap().body["fallback_keys"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["key"]
        .clone();
    assert_eq!(uploaded, json!(new_key));
    assert_eq!(b.provisioner.stats().urgent_rotations, 1);
}

/// The verify-key map ruma-signatures wants: one ed25519 key of `user`.
fn one_key(user: &str, public: &str) -> BTreeMap<String, BTreeMap<String, ruma::serde::Base64>> {
    BTreeMap::from([(
        user.to_owned(),
        BTreeMap::from([(
            format!("ed25519:{public}"),
            ruma::serde::Base64::parse(public).unwrap(),
        )]),
    )])
}

#[tokio::test]
async fn a_puppet_is_cross_signed_once_with_the_same_keys_on_every_attempt_and_restart() {
    let (hs, url) = FakeHomeserver::start().await;
    hs.0.lock().unwrap().fail_cross_signing = 1;
    let dir = tempfile::tempdir().unwrap();
    let user = puppet(7);
    {
        let b = open_bridge(dir.path(), &url, fast_retries());
        b.provisioner.ensure_puppet(&user).await.unwrap();
        b.provisioner.ensure_puppet(&user).await.unwrap();
        assert_eq!(b.provisioner.stats().devices_cross_signed, 1);
    }
    // A restart: the device is marked cross-signed, nothing is sent again.
    let b = open_bridge(dir.path(), &url, fast_retries());
    b.provisioner.ensure_puppet(&user).await.unwrap();
    assert_eq!(b.provisioner.stats().devices_cross_signed, 0);

    let s = hs.0.lock().unwrap();
    // One failed attempt, retried with identical keys; then never again.
    assert_eq!(s.cross_signing_uploads.len(), 2);
    assert_eq!(
        s.cross_signing_uploads[0].body,
        s.cross_signing_uploads[1].body
    );
    assert_eq!(
        s.cross_signing_uploads[0]
            .query
            .get("user_id")
            .map(String::as_str),
        Some(user.as_str())
    );
    assert_eq!(s.signature_uploads.len(), 1);

    let keys = &s.cross_signing_uploads[0].body;
    let master = public_of(&keys["master_key"]);
    let ssk = public_of(&keys["self_signing_key"]);
    let object =
        |v: &Value| -> ruma::CanonicalJsonObject { serde_json::from_value(v.clone()).unwrap() };
    let by_master = one_key(user.as_str(), &master);
    ruma::signatures::verify_json(&by_master, &object(&keys["self_signing_key"])).unwrap();
    ruma::signatures::verify_json(&by_master, &object(&keys["user_signing_key"])).unwrap();
    // The signed device is this puppet's device, signed by the self-signing key.
    let signed = &s.signature_uploads[0].body[user.as_str()][device().as_str()];
    assert_eq!(signed["device_id"], device().as_str());
    let device_keys = b.manager.device_keys(&user, &device()).unwrap();
    assert_eq!(
        signed["keys"],
        serde_json::to_value(&device_keys.keys).unwrap()
    );
    ruma::signatures::verify_json(&one_key(user.as_str(), &ssk), &object(signed)).unwrap();
}

#[tokio::test]
async fn a_puppet_provisioned_before_cross_signing_is_signed_at_its_next_use() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let user = puppet(8);
    {
        let old = {
            let mut c = fast_retries();
            c.cross_signing = false;
            c
        };
        let b = open_bridge(dir.path(), &url, old);
        b.provisioner.ensure_puppet(&user).await.unwrap();
    }
    assert!(hs.0.lock().unwrap().cross_signing_uploads.is_empty());
    let b = open_bridge(dir.path(), &url, fast_retries());
    b.provisioner.ensure_puppet(&user).await.unwrap();
    assert_eq!(b.provisioner.stats().devices_cross_signed, 1);
    assert_eq!(
        b.provisioner.stats().devices_provisioned,
        0,
        "not provisioned again"
    );
    let s = hs.0.lock().unwrap();
    assert_eq!(s.cross_signing_uploads.len(), 1);
    assert_eq!(s.signature_uploads.len(), 1);
}

/// Issue 14, item 10: after the first (full) pass, a pass reads only the
/// devices its schedule says are due, not every device; a reported use
/// makes one device due at once; a full pass comes back after its interval.
#[tokio::test]
async fn after_the_first_pass_a_rotation_pass_visits_only_the_devices_that_are_due() {
    let (hs, url) = FakeHomeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = open_bridge(dir.path(), &url, {
        let mut c = fast_retries();
        c.full_rotation_pass_interval = Duration::from_secs(30 * 24 * 3600);
        c
    });
    let users: Vec<_> = (40..50).map(puppet).collect();
    for user in &users {
        b.provisioner.ensure_puppet(user).await.unwrap();
    }
    let first = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((first.devices, first.full), (10, true));
    // Nothing is due for a week: a pass reads no device.
    b.clock.advance(Duration::from_secs(3600));
    let idle = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((idle.devices, idle.full, idle.failures), (0, false, 0));
    // One device's fallback key is reported used: only it is due.
    assert!(
        b.provisioner
            .note_unused_fallback_key_types(&users[3], &device(), &[])
            .await
            .unwrap()
    );
    let uploads = hs.uploads().len();
    let one = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((one.devices, one.full), (1, false));
    assert_eq!(b.manager.stats().fallback_rotations, 1);
    assert_eq!(hs.uploads().len(), uploads + 1, "its new key was uploaded");
    // Its previous key is forgotten after the grace period, by a pass that
    // reads it alone.
    b.clock.advance(HOUR);
    let grace = b.provisioner.rotate_once().await.unwrap();
    assert_eq!(grace.devices, 1);
    assert_eq!(b.manager.stats().fallback_forgets, 1);
    // A week on, every original key is too old: all ten are due.
    b.clock.advance(Duration::from_secs(7 * 24 * 3600));
    let expired = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((expired.devices, expired.failures), (10, 0));
    assert!(b.manager.stats().fallback_rotations >= 10);
    // Past the full-pass interval: every device again, due or not.
    b.clock.advance(Duration::from_secs(30 * 24 * 3600));
    let full = b.provisioner.rotate_once().await.unwrap();
    assert_eq!((full.devices, full.full), (10, true));
}
