//! Wire a whole bridge from its registration in a few lines.
//!
//! [`Bridgekeys::builder`] takes the registration and the server name, the
//! homeserver URL and an open store (any [`Backend`]: the embedded
//! [`SledStore`](bridgekeys_store::SledStore), or a PostgreSQL store shared
//! by several processes), and builds every piece on them, the way a bridge
//! wires them by hand:
//!
//! store → [`AccountManager`] → [`HomeserverClient`] → [`RoomStates`] →
//! [`PuppetOlm`] → [`Provisioner`] → [`KeyPool`] → your handler →
//! [`Appservice`] (with provisioner, Olm, room states and key pool
//! attached).
//!
//! Your [`BridgeHandler`] is made last, from the [`Parts`], so it can hold
//! what it needs (the provisioner to create puppets, the room encryption,
//! the homeserver client). [`Bridge::serve_on`] then serves the listener
//! with the background tasks a bridge runs beside it: fallback key
//! rotation ([`Provisioner::start_rotation`]), claim-mode detection and
//! uploaded pools ([`KeyPool::start`]), a ping from the homeserver once
//! serving ([`HomeserverClient::ping_appservice`]), and every
//! [`ROOM_KEY_CHECK`] the room-key requests
//! ([`Appservice::request_room_keys`]), with the transaction dedup log
//! pruned at start and hourly ([`Appservice::prune_transactions`]). All of
//! them are stopped before `serve_on` returns: nothing of the bridge
//! outlives it, so a restart can reopen the store at once.
//!
//! ```
//! use std::sync::Arc;
//! use bridgekeys::{
//!     Bridgekeys, Parts,
//!     appservice::{BridgeHandler, HandlerError, Registration, Transaction},
//!     store::{SledStore, SledStoreConfig, StoreKey},
//! };
//!
//! struct MyHandler {
//!     parts: Parts,
//! }
//!
//! impl BridgeHandler for MyHandler {
//!     async fn transaction(&self, _t: &Transaction) -> Result<(), HandlerError> {
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let registration = Registration::generate("my-bridge", "http://localhost:29300", "bridgebot", "@my_.*");
//! let store = Arc::new(SledStore::create(SledStoreConfig::new(dir.path().join("store"), StoreKey::generate()))?);
//!
//! let bridge = Bridgekeys::builder(registration, "example.org".try_into()?)
//!     .homeserver_url("http://localhost:8008")
//!     .store(store)
//!     .handler(|parts: &Parts| MyHandler { parts: parts.clone() })
//!     .build()?;
//!
//! assert_eq!(bridge.parts().bot.as_str(), "@bridgebot:example.org");
//! assert!(bridge.handler().parts.puppets.contains("@my_alice:example.org".try_into()?));
//! // Then: bridge.serve_on(listener, shutdown_signal()).await?
//! # Ok(())
//! # }
//! ```

use std::{future::Future, net::SocketAddr, num::NonZeroUsize, sync::Arc, time::Duration};

use bridgekeys_appservice::{
    Appservice, AppserviceConfig, AppserviceError, AsToken, BridgeHandler, HomeserverClient,
    HomeserverError, KeyPool, Limits, PoolConfig, ProvisionConfig, Provisioner, PuppetOlm,
    Registration, RoomStates, UserNamespace, room_state::DEFAULT_CACHED_ROOMS,
};
use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::Backend;
use ruma::{OwnedServerName, OwnedUserId, UserId};
use tokio::net::TcpListener;

use crate::PuppetRooms;

/// How often [`Bridge::serve_on`] sends the room-key requests now due
/// (they are also sent after every transaction; this covers quiet times).
pub const ROOM_KEY_CHECK: Duration = Duration::from_secs(30);

/// The transaction dedup log is pruned every this many
/// [`ROOM_KEY_CHECK`]s (hourly), and at start.
const PRUNE_EVERY_CHECKS: u64 = 3600 / ROOM_KEY_CHECK.as_secs();

/// Why a bridge could not be built or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// A required builder setting was not given.
    #[error("the bridge builder needs {0}")]
    Missing(&'static str),
    /// The homeserver client could not be made (bad URL, bad root
    /// certificate).
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
    /// The listener could not be configured or served (bad namespace
    /// regex, metrics, bind or I/O failure).
    #[error(transparent)]
    Appservice(#[from] AppserviceError),
    /// The registration's `sender_localpart` does not make a user id on
    /// this server.
    #[error("invalid bot user id @{localpart}:{server_name}: {source}")]
    BotUserId {
        /// The registration's `sender_localpart`.
        localpart: String,
        /// The server name given to the builder.
        server_name: OwnedServerName,
        /// Why it is not a user id.
        source: ruma::IdParseError,
    },
    /// Binding the listen address failed ([`Bridge::serve`]).
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// Entry point of the builder: `Bridgekeys::builder(registration, server_name)`.
#[derive(Debug)]
pub struct Bridgekeys(());

impl Bridgekeys {
    /// A builder for the bridge of `registration` on the homeserver
    /// `server_name` (the part after the colon in its user ids). Set the
    /// homeserver URL, the store and the handler, then
    /// [`BridgeBuilder::build`].
    pub fn builder(registration: Registration, server_name: OwnedServerName) -> BridgeBuilder {
        BridgeBuilder {
            registration,
            server_name,
            homeserver_url: None,
            store: None,
            root_certificate_pem: None,
            manager_config: ManagerConfig::default(),
            pool_config: PoolConfig::default(),
            provision_config: None,
            limits: None,
            cached_rooms: None,
            fallback_in_claims: false,
            handler: (),
        }
    }
}

/// What the builder made, handed to the handler factory
/// ([`BridgeBuilder::handler`]) and kept by the [`Bridge`]. Every piece is
/// shared (`Arc` or a cheap clone): clone what your handler keeps.
#[derive(Clone)]
#[non_exhaustive]
pub struct Parts {
    /// The registration the bridge was built from.
    pub registration: Registration,
    /// The homeserver's server name.
    pub server_name: OwnedServerName,
    /// The store (puppet accounts, sessions, room state, transaction log).
    pub store: Arc<dyn Backend>,
    /// The account manager: puppet devices, their keys, Olm sessions.
    pub manager: Arc<AccountManager>,
    /// The homeserver client as the appservice (one connection pool; every
    /// piece below uses a clone of it).
    pub homeserver: HomeserverClient,
    /// Room encryption state and members, kept from every transaction.
    pub rooms: Arc<RoomStates>,
    /// Olm for the puppets through the homeserver (device tracking,
    /// to-device encryption).
    pub olm: Arc<PuppetOlm>,
    /// Registers puppets, creates their devices, uploads and rotates keys.
    pub provisioner: Arc<Provisioner>,
    /// Claim-mode detection and uploaded one-time key pools.
    pub key_pool: Arc<KeyPool>,
    /// Megolm room events for puppets, with ruma types.
    pub puppet_rooms: PuppetRooms,
    /// The puppets: the registration's exclusive user namespaces, without
    /// the bot (test the bot with [`Parts::bot`]).
    pub puppets: UserNamespace,
    /// The bridge bot, `@<sender_localpart>:<server_name>`.
    pub bot: OwnedUserId,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store is any backend (no Debug bound); the rest tells which
        // bridge this is.
        f.debug_struct("Parts")
            .field("server_name", &self.server_name)
            .field("bot", &self.bot)
            .field("puppets", &self.puppets)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Bridge`]; see [`Bridgekeys::builder`]. `F` is the handler
/// factory once [`BridgeBuilder::handler`] has set it.
#[must_use = "a builder does nothing until built"]
pub struct BridgeBuilder<F = ()> {
    registration: Registration,
    server_name: OwnedServerName,
    homeserver_url: Option<String>,
    store: Option<Arc<dyn Backend>>,
    root_certificate_pem: Option<Vec<u8>>,
    manager_config: ManagerConfig,
    pool_config: PoolConfig,
    provision_config: Option<ProvisionConfig>,
    limits: Option<Limits>,
    cached_rooms: Option<NonZeroUsize>,
    fallback_in_claims: bool,
    handler: F,
}

impl<F> std::fmt::Debug for BridgeBuilder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeBuilder")
            .field("registration", &self.registration)
            .field("server_name", &self.server_name)
            .field("homeserver_url", &self.homeserver_url)
            .finish_non_exhaustive()
    }
}

impl<F> BridgeBuilder<F> {
    /// The homeserver's client-server API base URL, e.g.
    /// `https://matrix.example.org` (required).
    pub fn homeserver_url(mut self, url: impl Into<String>) -> Self {
        self.homeserver_url = Some(url.into());
        self
    }

    /// The open store (required). Create it once at install time and open
    /// it with its expected id afterwards (see `SledStore::open`).
    pub fn store(mut self, store: Arc<dyn Backend>) -> Self {
        self.store = Some(store);
        self
    }

    /// Also trust the certificate(s) of this PEM for the homeserver's TLS
    /// (a private CA), besides the system roots.
    pub fn root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate_pem = Some(pem.into());
        self
    }

    /// The account manager's limits (default: [`ManagerConfig::default`]).
    pub fn manager_config(mut self, config: ManagerConfig) -> Self {
        self.manager_config = config;
        self
    }

    /// How uploaded one-time key pools are kept and the claim mode found
    /// (default: detected, [`PoolConfig::default`]). Its
    /// `puppet_device_id` is replaced by the provisioner's device id.
    pub fn pool_config(mut self, config: PoolConfig) -> Self {
        self.pool_config = config;
        self
    }

    /// How puppets are provisioned (default:
    /// [`ProvisionConfig::from_registration`]). Its `device_id` is the
    /// puppet device id of every piece: the listener's
    /// ([`AppserviceConfig::puppet_device_id`]) and the key pool's
    /// ([`PoolConfig::puppet_device_id`]) are set to it.
    pub fn provision_config(mut self, config: ProvisionConfig) -> Self {
        self.provision_config = Some(config);
        self
    }

    /// The listener's request bounds (default: [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Rooms whose state is kept in memory (default:
    /// [`DEFAULT_CACHED_ROOMS`]); the rest is read from the store.
    pub fn cached_rooms(mut self, rooms: NonZeroUsize) -> Self {
        self.cached_rooms = Some(rooms);
        self
    }

    /// Return each device's fallback key in key-claim answers too (off by
    /// default; see [`Appservice::with_fallback_in_claims`] for why).
    pub fn fallback_in_claims(mut self, on: bool) -> Self {
        self.fallback_in_claims = on;
        self
    }

    /// How to make the bridge's handler from the built [`Parts`] (required).
    pub fn handler<H, G>(self, factory: G) -> BridgeBuilder<G>
    where
        H: BridgeHandler,
        G: FnOnce(&Parts) -> H,
    {
        BridgeBuilder {
            registration: self.registration,
            server_name: self.server_name,
            homeserver_url: self.homeserver_url,
            store: self.store,
            root_certificate_pem: self.root_certificate_pem,
            manager_config: self.manager_config,
            pool_config: self.pool_config,
            provision_config: self.provision_config,
            limits: self.limits,
            cached_rooms: self.cached_rooms,
            fallback_in_claims: self.fallback_in_claims,
            handler: factory,
        }
    }
}

impl<H, F> BridgeBuilder<F>
where
    H: BridgeHandler,
    F: FnOnce(&Parts) -> H,
{
    /// Make every piece and the listener. Nothing is sent to the homeserver
    /// yet: that starts with [`Bridge::serve_on`].
    pub fn build(self) -> Result<Bridge<H>, BridgeError> {
        let registration = self.registration;
        let server_name = self.server_name;
        let store = self.store.ok_or(BridgeError::Missing("a store"))?;
        let url = self
            .homeserver_url
            .ok_or(BridgeError::Missing("a homeserver URL"))?;
        let bot =
            UserId::parse_with_server_name(registration.sender_localpart.as_str(), &server_name)
                .map_err(|source| BridgeError::BotUserId {
                    localpart: registration.sender_localpart.clone(),
                    server_name: server_name.clone(),
                    source,
                })?;
        let provision_config = self
            .provision_config
            .unwrap_or_else(|| ProvisionConfig::from_registration(&registration));
        // One puppet device id for every piece: the provisioner's.
        let mut config = AppserviceConfig::from_registration(&registration, &server_name)?;
        config.puppet_device_id = provision_config.device_id.clone();
        if let Some(limits) = self.limits {
            config.limits = limits;
        }
        let mut pool_config = self.pool_config;
        pool_config.puppet_device_id = provision_config.device_id.clone();
        let puppets = UserNamespace::new(
            registration
                .namespaces
                .users
                .iter()
                .filter(|n| n.exclusive)
                .map(|n| n.regex.as_str()),
            None,
        )?;

        let manager = Arc::new(AccountManager::new(store.clone(), self.manager_config));
        let mut homeserver =
            HomeserverClient::new(&url, AsToken::new(registration.as_token.clone()))?;
        if let Some(pem) = &self.root_certificate_pem {
            homeserver = homeserver.with_root_certificate(pem)?;
        }
        let cached = self
            .cached_rooms
            .or(NonZeroUsize::new(DEFAULT_CACHED_ROOMS))
            .unwrap_or(NonZeroUsize::MIN);
        let rooms =
            Arc::new(RoomStates::new(store.clone(), cached).with_homeserver(homeserver.clone()));
        let olm = Arc::new(PuppetOlm::new(manager.clone(), homeserver.clone()));
        let provisioner = Arc::new(Provisioner::new(
            homeserver.clone(),
            manager.clone(),
            store.clone(),
            provision_config,
        ));
        let key_pool = Arc::new(
            KeyPool::new(
                manager.clone(),
                homeserver.clone(),
                registration.id.clone(),
                bot.clone(),
                pool_config,
            )
            .with_provisioner(provisioner.clone()),
        );
        let parts = Parts {
            puppet_rooms: PuppetRooms::new(olm.clone(), rooms.clone(), provisioner.clone()),
            registration,
            server_name,
            store,
            manager,
            homeserver,
            rooms,
            olm,
            provisioner,
            key_pool,
            puppets,
            bot,
        };
        let handler = Arc::new((self.handler)(&parts));
        let appservice = Appservice::new(
            config,
            parts.manager.clone(),
            parts.store.clone(),
            handler.clone(),
        )?
        .with_provisioner(parts.provisioner.clone())
        .with_olm(parts.olm.clone())
        .with_room_states(parts.rooms.clone())
        .with_key_pool(parts.key_pool.clone())
        .with_fallback_in_claims(self.fallback_in_claims);
        Ok(Bridge {
            parts,
            handler,
            appservice,
        })
    }
}

/// A built bridge: every piece wired, the listener ready.
/// [`Bridge::serve_on`] runs it.
pub struct Bridge<H> {
    parts: Parts,
    handler: Arc<H>,
    appservice: Appservice<H>,
}

impl<H> std::fmt::Debug for Bridge<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

impl<H: BridgeHandler> Bridge<H> {
    /// Everything the builder made.
    pub fn parts(&self) -> &Parts {
        &self.parts
    }

    /// The bridge's handler.
    pub fn handler(&self) -> &Arc<H> {
        &self.handler
    }

    /// The listener (e.g. to mount [`Appservice::router`] in your own
    /// server instead of [`Bridge::serve_on`]; then run the background
    /// tasks yourself).
    pub fn appservice(&self) -> &Appservice<H> {
        &self.appservice
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Backend> {
        &self.parts.store
    }

    /// The account manager.
    pub fn manager(&self) -> &Arc<AccountManager> {
        &self.parts.manager
    }

    /// Olm for the puppets.
    pub fn olm(&self) -> &Arc<PuppetOlm> {
        &self.parts.olm
    }

    /// The provisioner.
    pub fn provisioner(&self) -> &Arc<Provisioner> {
        &self.parts.provisioner
    }

    /// Claim-mode detection and the uploaded pools.
    pub fn key_pool(&self) -> &Arc<KeyPool> {
        &self.parts.key_pool
    }

    /// The room states.
    pub fn rooms(&self) -> &Arc<RoomStates> {
        &self.parts.rooms
    }

    /// Bind `addr` and [`Bridge::serve_on`] it.
    pub async fn serve(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BridgeError::Bind { addr, source })?;
        self.serve_on(listener, shutdown).await
    }

    /// Serve on `listener` until `shutdown` resolves, with the background
    /// tasks alongside (see the [module docs](self)); then finish the
    /// requests in flight, stop every task and wait for it. Once this
    /// returns nothing of the bridge runs any more.
    pub async fn serve_on(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        let rotation = self.parts.provisioner.start_rotation();
        // Detects the claim mode once the listener below serves (it is
        // bound, so the homeserver's probe waits for it).
        let pool = self.parts.key_pool.start();
        // Once the listener serves: the homeserver delivers what it held
        // back (and stops dropping to-device messages) now, not at its
        // next retry.
        let ping = {
            let homeserver = self.parts.homeserver.clone();
            let id = self.parts.registration.id.clone();
            tokio::spawn(async move {
                match homeserver.ping_appservice(&id).await {
                    Ok(rtt) => tracing::info!(?rtt, "the homeserver reached the bridge"),
                    Err(e) => {
                        tracing::warn!(error = %e, "the homeserver could not ping the bridge");
                    }
                }
            })
        };
        // Room keys that never came are asked for after every transaction;
        // this timer also asks while none arrives, and prunes old
        // transaction dedup records at start and hourly.
        let timer = {
            let appservice = self.appservice.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(ROOM_KEY_CHECK);
                let mut checks: u64 = 0;
                loop {
                    every.tick().await;
                    appservice.request_room_keys().await;
                    if checks.is_multiple_of(PRUNE_EVERY_CHECKS)
                        && let Err(e) = appservice.prune_transactions().await
                    {
                        tracing::warn!(error = %e, "could not prune old transaction records");
                    }
                    checks += 1;
                }
            })
        };
        let served = self.appservice.serve_on(listener, shutdown).await;
        timer.abort();
        let _ = timer.await;
        ping.abort();
        let _ = ping.await;
        rotation.stop().await;
        pool.stop().await;
        served?;
        Ok(())
    }
}
