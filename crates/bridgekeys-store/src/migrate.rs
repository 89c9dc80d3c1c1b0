//! Moving a bridge's records from one backend to another (say, from the
//! embedded sled store to PostgreSQL when the bridge outgrows one process).
//!
//! A source backend lists every record it holds, opened
//! ([`Export::records`]); [`copy`] writes each one into the target through
//! the ordinary [`Backend`] methods, so the target seals them under its own
//! slots and the copy works between any two backends. What must hold:
//!
//! * **No key id is ever issued twice.** The source's key-id floor (every
//!   id it ever handed out is below it) moves the target's sequence past
//!   it before anything else, so a key the source published and the target
//!   mints later can never share an id.
//! * **Nothing is lost or duplicated.** Every account (with its version
//!   restarting at 1: versions only order writes within one store),
//!   one-time key, Olm session, delivery record, tracked user, Megolm
//!   session, replay index, held event, room state, cross-signing identity,
//!   completed transaction and puppet record is copied once. The copy is
//!   durable before [`copy`] returns.
//! * **The target is new.** A target that already holds an account, an Olm
//!   or outbound Megolm session or a cross-signing identity the source also
//!   has is refused
//!   ([`MigrateError::TargetNotEmpty`]): merging two bridges' keys is not a
//!   migration. Create the target fresh (its backend's `create` refuses a
//!   database that already holds a store).
//!
//! The source must not be in use while it is copied: stop the bridge first
//! (sled's lock enforces that for a sled source).
//!
//! Two records are not carried over as they were: a completed
//! transaction's record is dated at the copy (it is kept a little longer
//! before pruning), and sessions stored by schema 1 (under their id alone,
//! without the peer's key) cannot be placed in a newer store: a source
//! holding any is refused ([`MigrateError::LegacySessions`]) instead of
//! dropping them.

use zeroize::Zeroizing;

use crate::{
    Backend, Delivery, DeviceKey, DeviceWrite, HeldEvent, KeyAppend, OneTimeKeyRecord, Pending,
    SessionRecord, SessionWrite, StoreError,
};

/// One record of a store, opened, as [`Export::records`] lists it.
#[non_exhaustive]
pub enum Record {
    /// Every one-time key id the store ever handed out is below this.
    KeyIdFloor(u64),
    /// A device's account (its version is not carried: it only orders
    /// writes within one store).
    Account {
        /// The device.
        device: DeviceKey,
        /// The serialised account.
        data: Zeroizing<Vec<u8>>,
    },
    /// A stored (outstanding) one-time key.
    OneTimeKey {
        /// Its device.
        device: DeviceKey,
        /// The key.
        key: OneTimeKeyRecord,
    },
    /// An Olm session of a device.
    Session {
        /// Its device.
        device: DeviceKey,
        /// The session.
        session: SessionRecord,
    },
    /// A session stored by schema 1 (no peer key).
    LegacySession {
        /// Its device.
        device: DeviceKey,
        /// Its session id.
        session_id: String,
    },
    /// A delivery record kept until its delivery is acknowledged.
    Delivery {
        /// The device it was delivered to.
        device: DeviceKey,
        /// The delivery.
        delivery: Delivery,
    },
    /// The record of a user's tracked devices.
    TrackedUser {
        /// The user.
        user_id: String,
        /// The record.
        data: Zeroizing<Vec<u8>>,
    },
    /// A puppet device's outbound Megolm session in a room.
    OutboundGroupSession {
        /// The device.
        device: DeviceKey,
        /// The room.
        room_id: String,
        /// The record.
        data: Zeroizing<Vec<u8>>,
    },
    /// A Megolm inbound group session.
    GroupSession {
        /// Its room.
        room_id: String,
        /// Its session id.
        session_id: String,
        /// The record.
        data: Zeroizing<Vec<u8>>,
    },
    /// The event that first decrypted at a Megolm message index.
    MessageIndex {
        /// The room.
        room_id: String,
        /// The group session.
        session_id: String,
        /// The message index.
        index: u32,
        /// The event.
        event_id: String,
    },
    /// A room event held for its room key.
    HeldEvent(HeldEvent),
    /// What the bridge knows about a room.
    RoomState {
        /// The room.
        room_id: String,
        /// The record.
        data: Zeroizing<Vec<u8>>,
    },
    /// A puppet user's cross-signing identity.
    CrossSigning {
        /// The user.
        user_id: String,
        /// The record.
        data: Zeroizing<Vec<u8>>,
    },
    /// A completed homeserver transaction.
    Transaction {
        /// Its namespace.
        namespace: String,
        /// Its id.
        txn_id: String,
    },
    /// A provisioned puppet device.
    Puppet {
        /// The device.
        device: DeviceKey,
        /// Whether it was recorded as cross-signed.
        cross_signed: bool,
        /// When its next rotation step is due (Unix ms), once scheduled.
        due_ms: Option<u64>,
    },
}

/// A backend that can list everything it holds, for [`copy`].
pub trait Export {
    /// Every record, opened, one at a time (a store of a million devices
    /// is never held in memory whole). Stops being useful at the first
    /// error.
    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_>;
}

/// Why a migration stopped. Whatever was copied before stays in the
/// target: start again from a fresh target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Reading the source or writing the target failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target already holds a record the source also has.
    #[error("the target store is not empty: it already holds {what}")]
    TargetNotEmpty {
        /// Which record.
        what: String,
    },
    /// The source holds sessions stored by schema 1, which name no peer
    /// key and cannot be placed in a newer store.
    #[error(
        "the source store holds Olm sessions stored by schema 1 (of {device}, maybe others); \
         they are re-stored when the bridge next uses that device: run the bridge on the old \
         store until they are gone, then migrate to a fresh target"
    )]
    LegacySessions {
        /// The first device found with one.
        device: String,
    },
}

/// How many records of each kind [`copy`] carried over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The key-id floor carried over.
    pub key_id_floor: u64,
    /// Accounts.
    pub accounts: usize,
    /// Outstanding one-time keys.
    pub one_time_keys: usize,
    /// Olm sessions.
    pub sessions: usize,
    /// Delivery records.
    pub deliveries: usize,
    /// Tracked users.
    pub tracked_users: usize,
    /// Outbound Megolm sessions.
    pub outbound_group_sessions: usize,
    /// Inbound Megolm sessions.
    pub group_sessions: usize,
    /// Replay-protection entries.
    pub message_indexes: usize,
    /// Held room events.
    pub held_events: usize,
    /// Room states.
    pub room_states: usize,
    /// Cross-signing identities.
    pub cross_signing: usize,
    /// Completed transactions.
    pub transactions: usize,
    /// Puppet devices.
    pub puppets: usize,
}

/// How many writes are awaited together: enough for a group commit to
/// gather them, few enough to bound what is held in memory.
const AWAIT_EVERY: usize = 512;

/// Copy every record of `from` into `to` (see the module docs), durably.
pub async fn copy(from: &dyn Export, to: &dyn Backend) -> Result<MigrationReport, MigrateError> {
    let mut report = MigrationReport::default();
    let mut chunk: Vec<Pending> = Vec::with_capacity(AWAIT_EVERY);
    for record in from.records() {
        if let Some(p) = put(to, record?, &mut report)? {
            chunk.push(p);
        }
        if chunk.len() == AWAIT_EVERY {
            for p in chunk.drain(..) {
                p.durable().await?;
            }
        }
    }
    for p in chunk {
        p.durable().await?;
    }
    to.sync().durable().await?;
    Ok(report)
}

/// Write one record into `to`.
fn put(
    to: &dyn Backend,
    record: Record,
    report: &mut MigrationReport,
) -> Result<Option<Pending>, MigrateError> {
    let pending = match record {
        Record::KeyIdFloor(floor) => {
            let next = to.reserve_key_ids(1)?;
            if floor > next {
                to.reserve_key_ids(floor - next)?;
            }
            report.key_id_floor = floor;
            return Ok(None);
        }
        Record::Account { device, data } => {
            let write = DeviceWrite {
                account: data,
                ..DeviceWrite::default()
            };
            report.accounts += 1;
            match to.write_device(&device, None, write) {
                Err(StoreError::Conflict { .. }) => {
                    return Err(MigrateError::TargetNotEmpty {
                        what: format!("the account of {device:?}"),
                    });
                }
                other => other?,
            }
        }
        Record::OneTimeKey { device, key } => {
            report.one_time_keys += 1;
            let append = KeyAppend {
                add_keys: vec![key],
                ..KeyAppend::default()
            };
            to.append_keys(&device, append)?
        }
        Record::Session {
            device,
            mut session,
        } => {
            report.sessions += 1;
            // A new record in the target: created, at the target's first
            // version (the source's versions mean nothing there).
            session.version = None;
            let what = format!("the Olm session {} of {device:?}", session.session_id);
            let write = SessionWrite {
                put: vec![session],
                ..SessionWrite::default()
            };
            match to.write_sessions(&device, write) {
                Err(StoreError::Conflict { .. }) => {
                    return Err(MigrateError::TargetNotEmpty { what });
                }
                other => other?,
            }
        }
        Record::LegacySession { device, .. } => {
            return Err(MigrateError::LegacySessions {
                device: format!("{device:?}"),
            });
        }
        Record::Delivery { device, delivery } => {
            report.deliveries += 1;
            let write = SessionWrite {
                delivery: Some(delivery),
                ..SessionWrite::default()
            };
            to.write_sessions(&device, write)?
        }
        Record::TrackedUser { user_id, data } => {
            report.tracked_users += 1;
            to.write_tracked_user(&user_id, Some(&data))?
        }
        Record::OutboundGroupSession {
            device,
            room_id,
            data,
        } => {
            report.outbound_group_sessions += 1;
            match to.write_outbound_group_session(&device, &room_id, None, Some(&data)) {
                Err(StoreError::Conflict { .. }) => {
                    return Err(MigrateError::TargetNotEmpty {
                        what: format!("the outbound group session of {device:?} in {room_id}"),
                    });
                }
                other => other?,
            }
        }
        Record::GroupSession {
            room_id,
            session_id,
            data,
        } => {
            report.group_sessions += 1;
            to.write_group_session(&room_id, &session_id, &data)?
        }
        Record::MessageIndex {
            room_id,
            session_id,
            index,
            event_id,
        } => {
            report.message_indexes += 1;
            // Applied now, durable with the final sync.
            let _use = to.record_message_index(&room_id, &session_id, index, &event_id)?;
            return Ok(None);
        }
        Record::HeldEvent(held) => {
            report.held_events += 1;
            to.hold_event(
                &held.room_id,
                &held.session_id,
                &held.event_id,
                Some(&held.record),
            )?
        }
        Record::RoomState { room_id, data } => {
            report.room_states += 1;
            to.write_room_state(&room_id, Some(&data))?
        }
        Record::CrossSigning { user_id, data } => {
            report.cross_signing += 1;
            match to.create_cross_signing(&user_id, &data)? {
                Some(p) => p,
                None => {
                    return Err(MigrateError::TargetNotEmpty {
                        what: format!("the cross-signing identity of {user_id}"),
                    });
                }
            }
        }
        Record::Transaction { namespace, txn_id } => {
            report.transactions += 1;
            to.record_transaction(&namespace, &txn_id)?
        }
        Record::Puppet {
            device,
            cross_signed,
            due_ms,
        } => {
            report.puppets += 1;
            let mut last = to.record_puppet(&device)?;
            if cross_signed {
                last = to.record_cross_signed(&device)?;
            }
            if let Some(due) = due_ms {
                last = to.schedule_rotation(&device, due, None)?;
            }
            last
        }
    };
    Ok(Some(pending))
}
