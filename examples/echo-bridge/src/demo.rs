//! `echo-bridge demo`: a local Synapse (bridgekeys-testkit), the bridge in
//! this process, and a user who invites a puppet, claims a key for its
//! device and gets an echo. [`Local`] is the same setup for tests.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bridgekeys::{
    appservice::{DEFAULT_PUPPET_DEVICE_ID, KeyPool, Registration},
    olm::AccountManager,
    store::{Backend, DeviceKey},
};
use bridgekeys_testkit::{Method, StatusCode, Synapse, SynapseOptions, TestUser};
use ruma::serde::Base64;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{Config, EchoBridge, InitOptions, client::encode, init};

/// How [`Local::start_with`] sets things up.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Synapse proxies key claims to the bridge (MSC3983; default on).
    pub proxy_key_claims: bool,
    /// Synapse asks the bridge for its puppets' device keys (MSC3984;
    /// default on).
    pub proxy_key_queries: bool,
    /// The bridge's `[one_time_keys]` settings.
    pub one_time_keys: crate::PoolSettings,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            proxy_key_claims: true,
            proxy_key_queries: true,
            one_time_keys: crate::PoolSettings::default(),
        }
    }
}

/// The running bridge's manager, store and key pool.
type RunningParts = (Arc<AccountManager>, Arc<dyn Backend>, Arc<KeyPool>);

/// Synapse and the echo bridge, both running on loopback, set up exactly as
/// a deployment would be: `init` writes the files, Synapse loads the
/// registration, the bridge runs from the config.
#[derive(Debug)]
pub struct Local {
    /// The homeserver (stopped on drop).
    pub synapse: Synapse,
    /// The configuration the bridge runs with.
    pub config: Config,
    /// The registration Synapse loaded.
    pub registration: Registration,
    /// The bridge's account manager and store (`None` only while a restart
    /// failed half-way).
    parts: Option<RunningParts>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Local {
    /// `init` into `dir`, start Synapse with the registration, then the
    /// bridge in this process.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, LocalOptions::default()).await
    }

    /// [`Local::start`] with a choice of homeserver behaviour and bridge
    /// settings.
    pub async fn start_with(dir: &Path, options: LocalOptions) -> anyhow::Result<Self> {
        // The bridge's port must be in the registration before Synapse
        // starts: bind it first, serve it once the bridge is built.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let done = init(&InitOptions {
            dir: dir.to_owned(),
            // Not known before Synapse starts; set below.
            homeserver_url: "http://127.0.0.1:8008".into(),
            server_name: "localhost".into(),
            listen,
            database: None,
        })?;
        let synapse = Synapse::start(SynapseOptions {
            appservice_registrations: vec![done.registration.clone()],
            proxy_key_claims: options.proxy_key_claims,
            proxy_key_queries: options.proxy_key_queries,
            ..SynapseOptions::default()
        })
        .await
        .context("starting Synapse")?;
        let mut config = Config::load(&done.config)?;
        config.homeserver_url = synapse.url();
        config.one_time_keys = options.one_time_keys;
        let registration = Registration::load(&done.registration)?;
        let bridge = EchoBridge::open(config.clone())?;
        let manager = bridge.manager().clone();
        let store = bridge.store().clone();
        let pool = bridge.key_pool().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(bridge.serve_on(listener, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            synapse,
            config,
            registration,
            parts: Some((manager, store, pool)),
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// The running bridge's account manager.
    pub fn manager(&self) -> Option<&Arc<AccountManager>> {
        self.parts.as_ref().map(|(m, _, _)| m)
    }

    /// The running bridge's claim-mode detector and pools.
    pub fn key_pool(&self) -> Option<&Arc<KeyPool>> {
        self.parts.as_ref().map(|(_, _, p)| p)
    }

    /// The running bridge's store.
    pub fn store(&self) -> Option<&Arc<dyn Backend>> {
        self.parts.as_ref().map(|(_, s, _)| s)
    }

    /// A client-server request as `user`; fails on a non-200 answer.
    pub async fn call(
        &self,
        user: &TestUser,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, answer) = self
            .synapse
            .request(method.clone(), path, Some(&user.access_token), body)
            .await?;
        ensure!(
            status == StatusCode::OK,
            "{method} {path} answered {status}: {answer}"
        );
        Ok(answer)
    }

    /// Create a direct-message room with `invitee` invited; its room id.
    pub async fn create_dm(&self, user: &TestUser, invitee: &str) -> anyhow::Result<String> {
        let room = self
            .call(
                user,
                Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&json!({
                    "preset": "private_chat",
                    "is_direct": true,
                    "invite": [invitee],
                    "name": "echo demo"
                })),
            )
            .await?;
        room["room_id"]
            .as_str()
            .map(str::to_owned)
            .context("createRoom answered no room_id")
    }

    /// Poll until `member` has joined `room` (as seen by `user`).
    pub async fn wait_for_join(
        &self,
        user: &TestUser,
        room: &str,
        member: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let path = format!("/_matrix/client/v3/rooms/{}/joined_members", encode(room));
        poll(timeout, || async {
            let members = self.call(user, Method::GET, &path, None).await?;
            Ok(members["joined"].get(member).map(|_| ()))
        })
        .await
        .with_context(|| format!("{member} did not join {room}"))
    }

    /// Send an `m.text` message as `user`; its event id.
    pub async fn send_text(
        &self,
        user: &TestUser,
        room: &str,
        txn_id: &str,
        body: &str,
    ) -> anyhow::Result<String> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            encode(room),
            encode(txn_id)
        );
        let sent = self
            .call(
                user,
                Method::PUT,
                &path,
                Some(&json!({ "msgtype": "m.text", "body": body })),
            )
            .await?;
        sent["event_id"]
            .as_str()
            .map(str::to_owned)
            .context("send answered no event_id")
    }

    /// The `m.room.message` events of `room` (newest first, up to 50).
    pub async fn messages(&self, user: &TestUser, room: &str) -> anyhow::Result<Vec<Value>> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
            encode(room)
        );
        let page = self.call(user, Method::GET, &path, None).await?;
        Ok(page["chunk"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|e| e["type"] == "m.room.message")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Poll until `sender` has sent `body` in `room`; that event.
    pub async fn wait_for_message(
        &self,
        user: &TestUser,
        room: &str,
        sender: &str,
        body: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        poll(timeout, || async {
            let messages = self.messages(user, room).await?;
            Ok(messages
                .into_iter()
                .find(|e| e["sender"] == sender && e["content"]["body"] == body))
        })
        .await
        .with_context(|| format!("no message {body:?} from {sender} in {room}"))
    }

    /// Stop the bridge gracefully and start it again from its config and
    /// store, on the same address (Synapse keeps running).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop_bridge().await?;
        // Let go of the store: only one bridge may hold it open.
        self.parts = None;
        let listener = TcpListener::bind(self.config.listen).await?;
        let bridge = EchoBridge::open(self.config.clone())?;
        self.parts = Some((
            bridge.manager().clone(),
            bridge.store().clone(),
            bridge.key_pool().clone(),
        ));
        let (stop, stopped) = oneshot::channel::<()>();
        self.server = Some(tokio::spawn(bridge.serve_on(listener, async {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
        Ok(())
    }

    async fn stop_bridge(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.context("the bridge task panicked")??;
        }
        Ok(())
    }

    /// Stop the bridge gracefully (Synapse stops when dropped).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_bridge().await
    }
}

/// Call `check` until it returns `Some`, at most `timeout`; errors count as
/// "not yet" until the deadline, then the last one is returned.
pub async fn poll<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("still failing after {timeout:?}")),
                None => anyhow::anyhow!("not done after {timeout:?}"),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Run the demo, printing each step.
pub async fn demo() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("echo-bridge-demo-")
        .tempdir()?;
    println!(
        "1. starting Synapse {} (first run installs it into {}, about a minute) and the bridge",
        bridgekeys_testkit::SYNAPSE_VERSION,
        bridgekeys_testkit::default_venv_dir().display()
    );
    let local = Local::start(dir.path()).await?;
    println!(
        "   Synapse at {}, bridge at http://{}, files in {} ({:.1?})",
        local.synapse.url(),
        local.config.listen,
        dir.path().display(),
        started.elapsed()
    );
    let result = story(&local).await;
    local.stop().await?;
    result?;
    println!("done in {:.1?}", started.elapsed());
    Ok(())
}

async fn story(local: &Local) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(30);
    let server = local.synapse.server_name().to_owned();
    let alice = local
        .synapse
        .register_user("alice", "demo password alice")
        .await?;
    println!("2. registered {}", alice.user_id);

    let bob = format!("@echo_bob:{server}");
    let room = local.create_dm(&alice, &bob).await?;
    println!(
        "3. {} created the DM room {room} and invited {bob}",
        alice.user_id
    );

    local.wait_for_join(&alice, &room, &bob, timeout).await?;
    println!(
        "4. {bob} joined (the bridge provisioned its device, device keys and fallback key first)"
    );

    let device = DEFAULT_PUPPET_DEVICE_ID;
    let claim = local
        .call(
            &alice,
            Method::POST,
            "/_matrix/client/v3/keys/claim",
            Some(&json!({ "one_time_keys": { bob.as_str(): { device: "signed_curve25519" } } })),
        )
        .await?;
    let keys = claim["one_time_keys"][bob.as_str()][device]
        .as_object()
        .context("the claim returned no key for the puppet")?;
    let (key_id, key) = keys.iter().next().context("the claim returned no key")?;
    let public = Base64::<ruma::serde::base64::Standard>::parse(
        key["key"].as_str().context("the key has no `key`")?,
    )?;
    let public: [u8; 32] = public
        .as_bytes()
        .try_into()
        .context("the key is not 32 bytes")?;
    let store = local.store().context("the bridge is not running")?;
    let manager = local.manager().context("the bridge is not running")?;
    let ours = store
        .one_time_key(&DeviceKey::new(bob.as_str(), device), &public)?
        .is_some();
    if !ours {
        bail!("the claimed key {key_id} is not one the bridge generated");
    }
    println!(
        "5. {} claimed {key_id} for {bob}/{device} through Synapse: generated on demand by the bridge \
         (it is in the bridge's store; fallback: {}; keys issued so far: {})",
        alice.user_id,
        key.get("fallback").is_some(),
        manager.stats().keys_issued
    );

    let body = "hello, echo";
    local.send_text(&alice, &room, "demo-1", body).await?;
    println!("6. {} said {body:?}", alice.user_id);

    let echo = format!("echo: {body}");
    let reply = local
        .wait_for_message(&alice, &room, &bob, &echo, timeout)
        .await?;
    println!(
        "7. {bob} answered {echo:?} (event {})",
        reply["event_id"].as_str().unwrap_or("?")
    );
    encrypted_story(local, &bob, "demo password alice", timeout).await
}

/// The same conversation in an encrypted DM, with a real client (matrix-nio
/// on libolm, from the testkit) doing its own Olm and Megolm.
async fn encrypted_story(
    local: &Local,
    bob: &str,
    password: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use bridgekeys_testkit::{NewRoom, OlmPeer, PeerLogin, RoomMessageQuery};
    println!(
        "8. starting a real client with end-to-end encryption: matrix-nio {} on libolm (first run installs it, about half a minute)",
        bridgekeys_testkit::MATRIX_NIO_VERSION
    );
    let mut client = OlmPeer::start().await?;
    let server = local.synapse.server_name().to_owned();
    let me = client
        .login(&PeerLogin::new(
            local.synapse.url(),
            format!("@alice:{server}"),
            password,
        ))
        .await?;
    let room = client.create_room(&NewRoom::encrypted_dm(bob)).await?;
    println!(
        "9. {} (device {}) created the encrypted DM {room} and invited {bob}",
        me.user_id, me.device_id
    );
    if !client.wait_joined(&room, bob, timeout).await? {
        bail!("{bob} did not join the encrypted room");
    }
    let body = "hello, encrypted echo";
    let sent = client.room_send(&room, body).await?;
    println!(
        "10. the client said {body:?}, encrypted (Megolm session {}, its key sent to {bob}'s device over Olm)",
        sent.session_id.as_deref().unwrap_or("?")
    );
    let echo = client
        .wait_room_message(
            &RoomMessageQuery::in_room(&room)
                .sent_by(bob)
                .body_prefix(format!("echo: {body}")),
            timeout,
        )
        .await?
        .context("no encrypted echo arrived")?;
    if !echo.decrypted {
        bail!("the echo arrived in the clear");
    }
    let manager = local.manager().context("the bridge is not running")?;
    println!(
        "11. {bob} answered {:?}, encrypted (Megolm session {}), and the client decrypted it (bridge: {} room events decrypted, {} encrypted)",
        echo.body,
        echo.session_id.as_deref().unwrap_or("?"),
        manager.stats().room_events_decrypted,
        manager.stats().room_events_encrypted
    );
    client.quit().await?;
    Ok(())
}
