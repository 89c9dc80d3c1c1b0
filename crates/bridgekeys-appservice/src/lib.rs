//! The appservice listener of a Matrix bridge: the only door the homeserver
//! has into the bridge.
//!
//! It answers exactly what Synapse sends and refuses everything else with a
//! Matrix error:
//!
//! * **Key claims** (MSC3983) on `/_matrix/app/v1/keys/claim` and the
//!   unstable paths ([`paths::CLAIM`]): fresh signed one-time keys for puppet
//!   devices the bridge provisioned, in its exclusive namespace, durably
//!   stored before the answer ([`claim`]).
//! * **Transactions** ([`transactions`]): events, ephemeral events,
//!   to-device messages (Olm messages to puppets decrypted and their
//!   payloads verified first) and MSC3202 device data, processed once, with
//!   the id recorded durably.
//! * **Olm for puppets** ([`olm`]): device tracking (`keys/query` as the
//!   puppet, verified, durable, invalidated by `device_lists`) and
//!   outbound to-device encryption ([`PuppetOlm::encrypt_to_device`]).
//! * **Key queries** (MSC3984, [`paths::QUERY`]): provisioned puppets'
//!   device keys from the store, cross-signature included ([`query`]).
//! * **Ping and queries** ([`paths::PING`], [`paths::USER`], [`paths::ROOM`]).
//! * **Auth** on every Matrix route (Bearer or `access_token`, constant-time),
//!   a body size limit, a request timeout, Matrix JSON errors, and
//!   `M_UNRECOGNIZED` for unknown routes.
//! * **Operations**: liveness, readiness and Prometheus metrics.
//! * **Registration**: the registration file type and a generator
//!   ([`Registration`]).
//! * **Provisioning** ([`provision`], [`homeserver`]): register puppets,
//!   create their devices (MSC4190), upload device keys and fallback keys
//!   (persisted first, re-sent identically on retry), and rotate fallback
//!   keys in a background task. Attach with [`Appservice::with_provisioner`]
//!   and the user query provisions accepted puppets.
//!
//! Use it three ways: [`Appservice::serve`] with graceful shutdown,
//! [`Appservice::router`] mounted in your own server (or
//! [`Appservice::router_without_operations`], without the health and
//! metrics endpoints), or only the key claims with [`ClaimService`] when
//! your bridge already has an appservice framework.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bridgekeys_appservice::*;
//! # struct Bridge;
//! # impl BridgeHandler for Bridge {
//! #     async fn transaction(&self, _t: &Transaction) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! # async fn run(manager: Arc<bridgekeys_olm::AccountManager>, store: Arc<bridgekeys_store::SledStore>)
//! # -> Result<(), AppserviceError> {
//! let registration = Registration::load("registration.yaml".as_ref())?;
//! let server_name: &ruma::ServerName = "localhost".try_into().expect("server name");
//! let config = AppserviceConfig::from_registration(&registration, server_name)?;
//! let appservice = Appservice::new(config, manager, store, Arc::new(Bridge))?;
//! appservice.serve("127.0.0.1:29300".parse().expect("addr"), shutdown_signal()).await
//! # }
//! ```
#![deny(missing_docs)]

mod auth;
mod body;
pub mod claim;
mod claim_service;
mod config;
mod error;
mod handler;
mod health;
pub mod homeserver;
mod metrics;
mod namespace;
pub mod olm;
mod path;
mod ping;
pub mod pool;
pub mod provision;
pub mod query;
mod registration;
pub mod room_events;
pub mod room_state;
mod rooms;
mod server;
pub mod transactions;
mod txn_locks;
mod users;

pub use claim_service::ClaimService;
pub use config::{AppserviceConfig, DEFAULT_PUPPET_DEVICE_ID, HsToken, Limits};
pub use error::{AppserviceError, MatrixError};
pub use handler::{BridgeHandler, HandlerError, UserDecision};
pub use homeserver::{AsToken, HomeserverClient, HomeserverError, RetryPolicy};
pub use namespace::UserNamespace;
pub use olm::{
    DeviceFailure, Devices, PuppetOlm, PuppetOlmError, RoomKeyRequest, RoomSend, SendReport,
};
pub use pool::{ClaimMode, KeyPool, ModeSetting, PoolConfig, PoolError, PoolStats, PoolTask};
pub use provision::{
    Clock, ManualClock, ProvisionConfig, ProvisionError, ProvisionStats, Provisioner, RotationTask,
    SystemClock,
};
pub use registration::{NamespaceEntry, Namespaces, Registration, random_token};
pub use room_events::EncryptedRoomEvent;
pub use room_state::{RoomEncryption, RoomState, RoomStateError, RoomStates};
pub use server::{Appservice, paths, shutdown_signal};
pub use transactions::{DecryptedToDevice, DeviceLists, RawToDevice, ToDevice, Transaction};
