//! The bridge itself: the handler that joins puppets to rooms and echoes
//! messages, and the wiring of store, account manager, provisioner and
//! listener.

use std::{collections::BTreeSet, future::Future, sync::Arc};

use anyhow::Context;
use bridgekeys::{
    Bridge, Bridgekeys, Parts, PuppetRooms,
    appservice::{
        BridgeHandler, HandlerError, HomeserverError, KeyPool, ProvisionError, Provisioner,
        PuppetOlm, Registration, RoomStates, Transaction, UserDecision, UserNamespace,
    },
    olm::AccountManager,
    store::{Backend, PuppetRegistry},
};
use ruma::{
    OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, ServerName, UserId,
    events::room::message::RoomMessageEventContent,
};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::{
    Config,
    client::{self, PuppetClient},
};

/// The part of a room event the bridge looks at.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    event_id: String,
    room_id: OwnedRoomId,
    sender: OwnedUserId,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    content: serde_json::Value,
}

/// The echo bridge's [`BridgeHandler`].
pub struct EchoHandler {
    puppets: UserNamespace,
    bot: OwnedUserId,
    provisioner: Arc<Provisioner>,
    olm: Arc<PuppetOlm>,
    client: PuppetClient,
    /// Which rooms are encrypted and who is in them: kept durably by the
    /// listener from every transaction's state events (before this handler
    /// runs), and read from the homeserver when a puppet joins a room.
    rooms: Arc<RoomStates>,
    /// Room encryption for the puppets (the bridgekeys facade).
    crypto: PuppetRooms,
    /// Encrypted messages that could not be decrypted (logged, counted).
    undecryptable: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EchoHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoHandler")
            .field("bot", &self.bot)
            .finish_non_exhaustive()
    }
}

impl EchoHandler {
    /// A user the bridge speaks for: in the namespace, not the bot.
    fn is_puppet(&self, user: &UserId) -> bool {
        user != self.bot && self.puppets.contains(user)
    }

    /// The puppets joined to `room`, as the room state says.
    fn joined(&self, room: &RoomId) -> anyhow::Result<Vec<OwnedUserId>> {
        let Some(state) = self.rooms.get(room)? else {
            return Ok(Vec::new());
        };
        Ok(state
            .joined()
            .filter(|u| self.is_puppet(u))
            .map(ToOwned::to_owned)
            .collect())
    }

    /// Make sure the rooms the provisioned puppets are in have their full
    /// state on record (a store written before room state was kept, or a
    /// puppet whose join was never followed by a state read). Best effort:
    /// a puppet that cannot be asked is logged, and its rooms are read at
    /// their next echo instead.
    async fn rebuild_rooms(&self, registry: &dyn PuppetRegistry) -> anyhow::Result<usize> {
        let mut known = 0;
        let puppets: BTreeSet<String> = registry
            .puppets()?
            .iter()
            .map(|d| d.user_id().to_owned())
            .collect();
        for puppet in puppets {
            let Ok(puppet) = OwnedUserId::try_from(puppet) else {
                continue;
            };
            if !self.is_puppet(&puppet) {
                continue;
            }
            match self.client.joined_rooms(&puppet).await {
                Ok(rooms) => {
                    for room in rooms {
                        match self.rooms.ensure(&room, &puppet).await {
                            Ok(_) => known += 1,
                            Err(e) => {
                                tracing::warn!(%puppet, %room, error = %e, "could not read the room state");
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%puppet, error = %format!("{e:#}"), "could not list the puppet's rooms");
                }
            }
        }
        Ok(known)
    }

    /// Discard every joined puppet's outbound session in `room` (the next
    /// message starts a new one).
    async fn forget_room_sessions(&self, room: &RoomId) -> anyhow::Result<()> {
        for puppet in self.joined(room)? {
            let device = self
                .provisioner
                .ensure_puppet(&puppet)
                .await
                .context("the puppet's device")?;
            self.olm
                .manager()
                .discard_group_session((&puppet, &device), room)
                .await
                .context("discarding the room session")?;
            tracing::info!(%puppet, %room, "a member left: the room session will rotate");
        }
        Ok(())
    }

    /// Echo `body` into `room` from every joined puppet: encrypted in an
    /// encrypted room (never in the clear there), plain otherwise.
    async fn echo(&self, room: &RoomId, of: &str, body: &str) -> anyhow::Result<()> {
        for puppet in self.joined(room)? {
            // One transaction id per (event, puppet): a retried
            // transaction sends nothing twice.
            let txn_id = format!("echo-{of}-{}", puppet.localpart());
            let text = format!("echo: {body}");
            // The full room state, read once as this puppet if the record
            // was only built from transactions.
            let state = self
                .rooms
                .ensure(room, &puppet)
                .await
                .context("the room state")?;
            let echoed = if state.is_encrypted() {
                // Never in the clear here: any failure fails the echo.
                let sent = self
                    .crypto
                    .encrypt_room_event(&puppet, room, &RoomMessageEventContent::text_plain(text))
                    .await
                    .context("encrypting the echo")?;
                if !sent.key_failed.is_empty() {
                    tracing::warn!(%puppet, %room, devices = sent.key_failed.len(), "some devices could not be sent the room key");
                }
                let content = serde_json::to_value(&sent.content)?;
                self.client
                    .send_event(room, &puppet, "m.room.encrypted", &txn_id, &content)
                    .await?
            } else {
                self.client.send_text(room, &puppet, &txn_id, &text).await?
            };
            tracing::info!(%puppet, %room, %of, echo = %echoed, "echoed a message");
        }
        Ok(())
    }

    /// The transaction's unencrypted events, in order.
    async fn plain_events(&self, transaction: &Transaction) -> Result<(), HandlerError> {
        for raw in &transaction.events {
            let Ok(event) = serde_json::from_str::<Event>(raw.json().get()) else {
                continue;
            };
            // A failure that a retry may cure (network, 5xx, 429, our
            // store) fails the transaction, and the homeserver retries it
            // whole (our effects are idempotent). One the homeserver will
            // refuse every time (4xx: the room is gone, the puppet was
            // kicked) is logged and skipped: retrying it would hold up every
            // later transaction for good.
            outcome(&event.event_id, self.handle(&event).await)?;
        }
        Ok(())
    }

    async fn handle(&self, event: &Event) -> anyhow::Result<()> {
        // Room state (encryption, members) was recorded by the listener
        // before this handler ran.
        match event.event_type.as_str() {
            "m.room.member" => {
                let Some(target) = event
                    .state_key
                    .as_deref()
                    .and_then(|s| UserId::parse(s).ok())
                else {
                    return Ok(());
                };
                if !self.is_puppet(&target) {
                    // A member who leaves must not read what comes next:
                    // the puppets' room sessions are replaced.
                    if matches!(event.content["membership"].as_str(), Some("leave" | "ban")) {
                        self.forget_room_sessions(&event.room_id).await?;
                    }
                    return Ok(());
                }
                if event.content["membership"].as_str() == Some("invite") {
                    self.provisioner
                        .ensure_puppet(&target)
                        .await
                        .context("provisioning the invited puppet")?;
                    self.client.join(&event.room_id, &target).await?;
                    tracing::info!(puppet = %target, room = %event.room_id, inviter = %event.sender, "puppet joined on invite");
                    // What happened in the room before the puppet was
                    // in it (its encryption, the members) is read now;
                    // if that fails, the first echo reads it.
                    if let Err(e) = self.rooms.refresh(&event.room_id, &target).await {
                        tracing::warn!(puppet = %target, room = %event.room_id, error = %e, "could not read the room state after joining");
                    }
                }
            }
            "m.room.message" => {
                if self.is_puppet(&event.sender) || event.sender == self.bot {
                    return Ok(());
                }
                if event.content["msgtype"].as_str() != Some("m.text") {
                    return Ok(());
                }
                // An edit repeats the message as "* <new text>": not echoed.
                if event.content["m.relates_to"]["rel_type"] == "m.replace" {
                    return Ok(());
                }
                let Some(body) = event.content["body"].as_str() else {
                    return Ok(());
                };
                self.echo(&event.room_id, &event.event_id, body).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Will the homeserver refuse this again, whatever we do?
fn is_permanent(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<HomeserverError>() {
            return client::is_permanent(e);
        }
        if let Some(ProvisionError::Homeserver(e)) = cause.downcast_ref::<ProvisionError>() {
            return matches!(e, HomeserverError::Matrix { status, .. } if !e.is_transient() && *status < 500);
        }
        false
    })
}

/// What a failed event means for the transaction: skip it (the homeserver
/// will refuse it every time) or fail the transaction (a retry may cure it).
fn outcome(event_id: &str, result: anyhow::Result<()>) -> Result<(), HandlerError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if is_permanent(&e) => {
            tracing::warn!(%event_id, error = %format!("{e:#}"), "event refused by the homeserver; skipped");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(%event_id, error = %format!("{e:#}"), "event failed; the transaction will be retried");
            Err(HandlerError::with_source(format!("event {event_id}"), e))
        }
    }
}

impl BridgeHandler for EchoHandler {
    async fn transaction(&self, transaction: &Transaction) -> Result<(), HandlerError> {
        self.plain_events(transaction).await?;
        // Encrypted messages, decrypted by the listener.
        for encrypted in &transaction.decrypted_events {
            let event = match &encrypted.decrypted {
                Ok(event) => event,
                Err(why) => {
                    // In an encrypted room nothing is sent in the clear,
                    // not even a notice: log and count.
                    self.undecryptable
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(event_id = %encrypted.event_id, room = %encrypted.room_id, reason = %why, "could not decrypt a message");
                    continue;
                }
            };
            if event.event_type != "m.room.message"
                || self.is_puppet(&encrypted.sender)
                || encrypted.sender == self.bot
            {
                continue;
            }
            let Ok(content) = serde_json::from_str::<serde_json::Value>(event.content.get()) else {
                continue;
            };
            if content["msgtype"].as_str() != Some("m.text")
                || content["m.relates_to"]["rel_type"] == "m.replace"
            {
                continue;
            }
            let Some(body) = content["body"].as_str() else {
                continue;
            };
            outcome(
                encrypted.event_id.as_str(),
                self.echo(&encrypted.room_id, encrypted.event_id.as_str(), body)
                    .await,
            )?;
        }
        Ok(())
    }

    async fn room_key_requester(
        &self,
        room_id: &RoomId,
        _sender: &UserId,
    ) -> Option<(OwnedUserId, OwnedDeviceId)> {
        // A puppet in the room asks: the sender's client only answers a
        // device it shared the session with.
        let puppet = self.joined(room_id).ok()?.into_iter().next()?;
        let device = self.provisioner.ensure_puppet(&puppet).await.ok()?;
        Some((puppet, device))
    }

    async fn query_user(&self, user_id: &UserId) -> Result<UserDecision, HandlerError> {
        if !self.is_puppet(user_id) {
            return Ok(UserDecision::Reject);
        }
        // Every @echo_* exists; the listener provisions it (register,
        // device, device keys, fallback key) before answering 200.
        tracing::info!(puppet = %user_id, "homeserver asked about a puppet: accepting");
        Ok(UserDecision::Accept { device_id: None })
    }
}

/// A ready bridge: store open, listener built. [`EchoBridge::serve_on`] runs it.
pub struct EchoBridge {
    bridge: Bridge<EchoHandler>,
    config: Config,
}

impl std::fmt::Debug for EchoBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoBridge")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EchoHandler {
    /// The handler over the pieces the bridgekeys builder made.
    fn new(parts: &Parts) -> Self {
        Self {
            puppets: parts.puppets.clone(),
            bot: parts.bot.clone(),
            provisioner: parts.provisioner.clone(),
            olm: parts.olm.clone(),
            client: PuppetClient::new(parts.homeserver.clone()),
            rooms: parts.rooms.clone(),
            crypto: parts.puppet_rooms.clone(),
            undecryptable: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl EchoBridge {
    /// Open the store and wire everything with the bridgekeys builder
    /// (store, account manager, homeserver client, room states, Olm,
    /// provisioner, key pool, listener).
    pub fn open(config: Config) -> anyhow::Result<Self> {
        let registration = Registration::load(&config.registration)
            .with_context(|| format!("loading {}", config.registration.display()))?;
        let server_name = ServerName::parse(&config.server_name)
            .with_context(|| format!("invalid server name {:?}", config.server_name))?;
        // Every setting is checked before the store is touched.
        let provision = config.fallback.provision_config(&registration)?;
        let (keys, limits) = (config.keys.manager_config()?, config.limits.limits()?);
        let (pool, cached_rooms) = (
            config.one_time_keys.pool_config()?,
            config.rooms.cached_rooms()?,
        );
        let expected = config.store_id()?;
        // Never creates a store: `init` (or `migrate`) did. A missing store
        // is an error that says what to do, not a silent new set of puppet
        // identities.
        let opened = crate::storage::open(&config)?;
        let store = opened.store;
        if expected.is_none() {
            tracing::warn!(
                store_id = %opened.id,
                "the configuration does not name its store: add store_id = \"{}\" to it so that \
                 a swapped or re-created store is refused",
                opened.id
            );
        }
        let mut builder = Bridgekeys::builder(registration, server_name)
            .homeserver_url(&config.homeserver_url)
            .store(store)
            .pool_config(pool)
            .manager_config(keys)
            .provision_config(provision)
            .limits(limits)
            .cached_rooms(cached_rooms);
        if let Some(ca) = &config.homeserver_ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            builder = builder.root_certificate_pem(pem);
        }
        let bridge = builder
            .handler(EchoHandler::new)
            .build()
            .context("wiring the bridge")?;
        Ok(Self { bridge, config })
    }

    /// Olm for the puppets through the homeserver (device tracking,
    /// to-device encryption).
    pub fn olm(&self) -> &Arc<PuppetOlm> {
        self.bridge.olm()
    }

    /// The account manager (puppet devices, their keys).
    pub fn manager(&self) -> &Arc<AccountManager> {
        self.bridge.manager()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Backend> {
        self.bridge.store()
    }

    /// Claim-mode detection and the uploaded pools.
    pub fn key_pool(&self) -> &Arc<KeyPool> {
        self.bridge.key_pool()
    }

    /// The provisioner.
    pub fn provisioner(&self) -> &Arc<Provisioner> {
        self.bridge.provisioner()
    }

    /// Serve on `listener` until `shutdown` resolves, with the bridge's
    /// background tasks alongside (fallback key rotation, key pools, the
    /// ping, room key requests, transaction pruning: [`Bridge::serve_on`])
    /// and, from the start, the puppets' rooms relearnt from the homeserver
    /// (serving does not wait for it); then finish the requests in flight
    /// and stop every task.
    pub async fn serve_on(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Relearnt beside serving, not before: it asks the homeserver once
        // per puppet, one after another, and a process that held its socket
        // open without answering meanwhile would stall the homeserver's
        // transactions (behind a load balancer, for every process) and the
        // claims sent to it. Room state records are compared before they
        // are written, so a transaction handled meanwhile is not undone.
        let relearn = tokio::spawn({
            let (handler, store) = (
                Arc::clone(self.bridge.handler()),
                Arc::clone(self.bridge.store()),
            );
            async move {
                match handler.rebuild_rooms(store.as_ref()).await {
                    Ok(n) => {
                        tracing::info!(
                            memberships = n,
                            "puppet rooms relearnt from the homeserver"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "could not relearn the puppets' rooms");
                    }
                }
            }
        });
        let served = self.bridge.serve_on(listener, shutdown).await;
        // Ended before returning, so its share of the store is let go (a
        // restart in the same process opens the store again at once).
        relearn.abort();
        let _ = relearn.await;
        served?;
        Ok(())
    }
}

/// Run the bridge of `config` on its listen address until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = config.listen;
    let bridge = EchoBridge::open(config)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(%listen, "echo-bridge serving the appservice API");
    bridge.serve_on(listener, shutdown).await
}
