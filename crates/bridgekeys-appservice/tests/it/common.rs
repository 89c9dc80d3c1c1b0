//! Shared fixtures of the listener tests: a real sled store and account
//! manager, a recording bridge handler, a store wrapper with a hook on
//! writes (to force interleavings without sleeping), and request helpers.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use axum::{
    Router,
    body::{Body, to_bytes},
    http::{Method, Request, StatusCode},
};
use bridgekeys_appservice::{
    Appservice, AppserviceConfig, BridgeHandler, HandlerError, HsToken, Limits, ToDevice,
    Transaction, UserDecision, UserNamespace,
};
use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{
    DeviceKey, SledStore, SledStoreConfig, Store, StoreError, StoreKey, TransactionLog,
    testing::{Intercepted, Write},
};
use ruma::{OwnedDeviceId, OwnedUserId, RoomAliasId, UserId};
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt;

pub const TOKEN: &str = "hs-token-for-tests-0123456789";
pub const TXN_NS: &str = "echo";

pub fn puppet(n: usize) -> OwnedUserId {
    format!("@echo_{n}:localhost").try_into().unwrap()
}

pub fn device() -> OwnedDeviceId {
    "PUPPETDEV".into()
}

pub fn store_key() -> StoreKey {
    StoreKey::new([42; 32])
}

type Hook = Arc<dyn Fn(&DeviceKey) + Send + Sync>;

/// What the fixture's store (a sled store behind an [`Intercepted`]) does
/// before a write: run a hook at the start of every device write (so a test
/// can hold a claim in flight or prove two claims overlap), and fail device
/// writes or transaction records on demand (a broken disk).
#[derive(Default)]
pub struct Faults {
    hook: Mutex<Option<Hook>>,
    /// Make `record_transaction` fail (a broken disk for the txn log).
    pub fail_txn_record: AtomicBool,
    /// Make device writes fail (`write_device`, `append_keys`, session
    /// writes: a broken disk for device state).
    pub fail_device_writes: AtomicBool,
}

impl Faults {
    pub fn set_hook(&self, hook: impl Fn(&DeviceKey) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Arc::new(hook));
    }
    pub fn clear_hook(&self) {
        *self.hook.lock().unwrap() = None;
    }
    fn before(&self, write: &Write<'_>) -> Result<(), StoreError> {
        let injected = |fail: &AtomicBool| {
            if fail.load(Ordering::SeqCst) {
                Err(StoreError::Durability {
                    reason: "injected: disk full".into(),
                })
            } else {
                Ok(())
            }
        };
        match write {
            Write::Transaction(..) => injected(&self.fail_txn_record),
            Write::Device(device)
            | Write::AppendKeys(device)
            | Write::Sessions(device)
            | Write::OutboundGroupSession(device, _) => {
                let hook = self.hook.lock().unwrap().clone();
                if let Some(hook) = hook {
                    hook(device);
                }
                injected(&self.fail_device_writes)
            }
            _ => Ok(()),
        }
    }
}

/// What the recording handler saw of a transaction (no secrets kept beyond
/// the test's own plaintext).
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub txn_id: String,
    pub events: usize,
    pub ephemeral: usize,
    pub decrypted: Vec<(String, String, Vec<u8>)>,
    pub other_to_device: Vec<(String, Option<String>)>,
    pub otk_counts: Value,
    pub fallback_types: Value,
    pub device_lists: (Vec<String>, Vec<String>),
    /// Encrypted room events: (event id, inner content or why not).
    pub room_events: Vec<(String, Result<String, String>)>,
}

/// A transaction's encrypted room events: (event id, inner content or why
/// not).
pub fn room_events(t: &Transaction) -> Vec<(String, Result<String, String>)> {
    t.decrypted_events
        .iter()
        .map(|e| {
            (
                e.event_id.to_string(),
                e.decrypted
                    .as_ref()
                    .map(|d| d.content.get().to_owned())
                    .map_err(|why| why.to_string()),
            )
        })
        .collect()
}

/// A bridge handler that records what it is given, and can be told to fail
/// or to block inside a transaction until released.
#[derive(Default)]
pub struct Recorder {
    pub calls: AtomicUsize,
    pub seen: Mutex<Vec<Seen>>,
    pub fail: AtomicBool,
    /// When set, `transaction` reports entry on `entered` and waits for
    /// `release` before returning.
    pub gate: Mutex<Option<(mpsc::UnboundedSender<()>, Arc<Notify>)>>,
    pub accept_users: AtomicBool,
    pub user_queries: AtomicUsize,
}

impl BridgeHandler for Recorder {
    async fn transaction(&self, t: &Transaction) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.lock().unwrap().clone();
        if let Some((entered, release)) = gate {
            let released = release.notified();
            let _ = entered.send(());
            released.await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(HandlerError::new("injected failure"));
        }
        let mut seen = Seen {
            txn_id: t.txn_id.to_string(),
            events: t.events.len(),
            ephemeral: t.ephemeral.len(),
            otk_counts: serde_json::to_value(&t.device_one_time_keys_count).unwrap(),
            fallback_types: serde_json::to_value(&t.device_unused_fallback_key_types).unwrap(),
            device_lists: (
                t.device_lists
                    .changed
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                t.device_lists
                    .left
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            room_events: room_events(t),
            ..Seen::default()
        };
        for m in &t.to_device {
            match m {
                ToDevice::Decrypted(d) => seen.decrypted.push((
                    d.to_user_id.to_string(),
                    d.sender.to_string(),
                    d.olm.payload.content.get().as_bytes().to_vec(),
                )),
                ToDevice::Other(o) => seen
                    .other_to_device
                    .push((o.event_type.to_string(), o.undecryptable.clone())),
            }
        }
        self.seen.lock().unwrap().push(seen);
        Ok(())
    }

    async fn query_user(&self, _user_id: &UserId) -> Result<UserDecision, HandlerError> {
        self.user_queries.fetch_add(1, Ordering::SeqCst);
        Ok(if self.accept_users.load(Ordering::SeqCst) {
            UserDecision::Accept { device_id: None }
        } else {
            UserDecision::Reject
        })
    }

    async fn query_room_alias(&self, alias: &RoomAliasId) -> Result<bool, HandlerError> {
        Ok(alias.alias().starts_with("echo_"))
    }
}

/// One listener over a fresh (or reopened) store.
pub struct Fixture {
    pub store: Arc<Intercepted>,
    pub faults: Arc<Faults>,
    pub manager: Arc<AccountManager>,
    pub handler: Arc<Recorder>,
    pub appservice: Appservice<Recorder>,
    pub router: Router,
}

pub fn config(limits: Limits) -> AppserviceConfig {
    {
        let mut c = AppserviceConfig::new(
            HsToken::new(TOKEN),
            UserNamespace::new(
                ["@echo_.*:localhost"],
                Some("@echo_bot:localhost".try_into().unwrap()),
            )
            .unwrap(),
            TXN_NS,
        );
        c.puppet_device_id = device();
        c.limits = limits;
        c
    }
}

impl Fixture {
    pub fn open(dir: &Path, limits: Limits) -> Self {
        Self::open_with(dir, limits, ManagerConfig::default())
    }

    pub fn open_with(dir: &Path, limits: Limits, manager_config: ManagerConfig) -> Self {
        let sled = SledStore::open_or_create(SledStoreConfig::new(dir.join("store"), store_key()))
            .unwrap();
        let store = Arc::new(Intercepted::new(Arc::new(sled)));
        let faults = Arc::new(Faults::default());
        let hooked = Arc::clone(&faults);
        store.intercept(move |write| hooked.before(write));
        let manager = Arc::new(AccountManager::new(
            Arc::clone(&store) as Arc<dyn Store>,
            manager_config,
        ));
        let handler = Arc::new(Recorder::default());
        let appservice = Appservice::new(
            config(limits),
            Arc::clone(&manager),
            Arc::clone(&store) as Arc<dyn TransactionLog>,
            Arc::clone(&handler),
        )
        .unwrap();
        let router = appservice.router();
        Self {
            store,
            faults,
            manager,
            handler,
            appservice,
            router,
        }
    }

    /// The same fixture with device tracking through `olm` attached.
    pub fn with_olm(mut self, olm: Arc<bridgekeys_appservice::PuppetOlm>) -> Self {
        self.appservice = self.appservice.clone().with_olm(olm);
        self.router = self.appservice.router();
        self
    }

    /// Provision puppets `0..n` with the test device.
    pub async fn provision(&self, n: usize) {
        for i in 0..n {
            self.manager
                .create_device(&puppet(i), &device())
                .await
                .unwrap();
        }
    }

    /// PUT transaction `id` with `body`, on the current path.
    pub async fn put_transaction(&self, id: &str, body: &Value) -> (StatusCode, Value) {
        let path = format!("/_matrix/app/v1/transactions/{id}");
        self.call(authed(Method::PUT, &path, json_body(body))).await
    }

    pub async fn call(&self, req: Request<Body>) -> (StatusCode, Value) {
        call(&self.router, req).await
    }

    /// Everything a request could have changed: durable writes, keys
    /// issued, devices created, handler calls, user queries.
    pub fn state(&self) -> (u64, u64, u64, usize, usize) {
        let stats = self.manager.stats();
        (
            self.store.commit_stats().writes,
            stats.keys_issued,
            stats.devices_created,
            self.handler.calls.load(Ordering::SeqCst),
            self.handler.user_queries.load(Ordering::SeqCst),
        )
    }

    pub async fn metrics(&self) -> String {
        let resp = self
            .router
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        String::from_utf8(
            to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics().await, name)
    }
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The one public key of a published key object (`{"keys": {id: key}}`).
pub fn public_of(key: &Value) -> String {
    key["keys"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// The public key of the one key a claim answer holds for `@echo_0`'s
/// `PUPPETDEV`.
pub fn claimed_public_key(answer: &Value) -> &str {
    let (_, key) = answer["@echo_0:localhost"]["PUPPETDEV"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    key["key"].as_str().unwrap()
}

pub async fn call(router: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, json)
}

/// A request with the right Bearer token.
pub fn authed(method: Method, uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

pub fn json_body(v: &Value) -> Body {
    Body::from(serde_json::to_vec(v).unwrap())
}

/// Check a claimed key object: `signed_curve25519:` id prefix and a valid
/// ed25519 signature by the device, over canonical JSON.
pub fn assert_signed_key(
    manager: &AccountManager,
    user: &UserId,
    device: &ruma::DeviceId,
    key_id: &str,
    key: &Value,
) {
    assert!(key_id.starts_with("signed_curve25519:"), "{key_id}");
    let identity = manager.identity_keys(user, device).unwrap();
    let signature = key["signatures"][user.as_str()][format!("ed25519:{device}")]
        .as_str()
        .unwrap();
    let signed = bridgekeys_olm::canonical_json_for_signing(key).unwrap();
    let signature = bridgekeys_olm::vodozemac::Ed25519Signature::from_base64(signature).unwrap();
    identity
        .ed25519
        .verify(signed.as_bytes(), &signature)
        .expect("the key is signed by the puppet device");
    assert!(key["key"].is_string());
}

/// A log writer that keeps everything written to it, for the tests that
/// read the logs.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
