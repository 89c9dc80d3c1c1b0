//! Listing every record of a [`PgStore`] for a migration
//! ([`crate::migrate::Export`]), so a PostgreSQL store can be copied into
//! another backend (or another database).
//!
//! The listing reads one snapshot (`REPEATABLE READ`, read-only) through
//! server-side cursors, one table after the other, a page at a time: a
//! store of a million devices is never held in memory whole, and records
//! written meanwhile by other processes are not half seen. Records are
//! opened on the caller's thread.

use std::collections::VecDeque;

use deadpool_postgres::Object;
use tokio_postgres::Row;
use zeroize::Zeroizing;

use super::{Pg, PgStore, unbits, unord};
use crate::{
    Delivery, DeviceKey, HeldEvent, OneTimeKeyRecord, SessionRecord, StoreError, layout,
    migrate::{Export, Record},
};

/// Rows fetched per round trip.
const PAGE: usize = 512;

/// What to list, in order: accounts before their keys (the key-id floor is
/// listed before all of them).
const TABLES: &[&str] = &[
    "SELECT device, version, sealed FROM bk_accounts ORDER BY device",
    "SELECT device, key_id, public_key, sealed FROM bk_one_time_keys ORDER BY device, key_id",
    "SELECT device, peer_key, session_id, last_used, sealed FROM bk_olm_sessions \
     ORDER BY device, peer_key, session_id",
    "SELECT tag, device, message, sealed FROM bk_deliveries ORDER BY tag, device, message_hash",
    "SELECT user_id, sealed FROM bk_tracked_users ORDER BY user_id",
    "SELECT device, room_id, sealed FROM bk_outbound_group_sessions ORDER BY device, room_id",
    "SELECT room_id, session_id, sealed FROM bk_group_sessions ORDER BY room_id, session_id",
    "SELECT room_id, session_id, message_index, event_id FROM bk_message_indexes \
     ORDER BY room_id, session_id, message_index",
    "SELECT room_id, session_id, event_id, sealed FROM bk_held_events \
     ORDER BY room_id, session_id, event_id",
    "SELECT room_id, sealed FROM bk_room_states ORDER BY room_id",
    "SELECT user_id, sealed FROM bk_cross_signing ORDER BY user_id",
    "SELECT namespace, txn_id FROM bk_transactions WHERE completed_at IS NOT NULL \
     ORDER BY namespace, txn_id",
    "SELECT device, cross_signed, due_ms FROM bk_puppets ORDER BY device",
];

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("{what} (while exporting)"),
    }
}

impl Export for PgStore {
    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        Box::new(Listing {
            store: self,
            conn: None,
            table: 0,
            declared: false,
            buffer: VecDeque::new(),
            done: false,
        })
    }
}

/// The export in progress: its connection holds the snapshot.
struct Listing<'a> {
    store: &'a PgStore,
    conn: Option<Object>,
    /// Index into [`TABLES`] of the cursor being read.
    table: usize,
    declared: bool,
    buffer: VecDeque<Record>,
    done: bool,
}

impl Listing<'_> {
    /// Run `sql` (simple query protocol, no parameters) on the listing's
    /// connection, returning its rows. On failure the connection leaves
    /// the pool (it may be inside a transaction).
    fn run(&mut self, sql: String) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn.take();
        let (conn, rows) = self.store.engine.call(move |pool| async move {
            let conn = match conn {
                Some(conn) => conn,
                None => pool.get().await.pg()?,
            };
            match conn.query(sql.as_str(), &[]).await {
                Ok(rows) => Ok((conn, rows)),
                Err(e) => {
                    drop(Object::take(conn));
                    Err(StoreError::engine(e))
                }
            }
        })?;
        self.conn = Some(conn);
        Ok(rows)
    }

    /// Start the snapshot; the key-id floor.
    fn begin(&mut self) -> Result<Record, StoreError> {
        self.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".into())?;
        let rows = self.run("SELECT next_id FROM bk_key_ids".into())?;
        let next: i64 = rows
            .first()
            .ok_or_else(|| corrupt("key id counter"))?
            .try_get(0)
            .pg()?;
        Ok(Record::KeyIdFloor(
            u64::try_from(next).map_err(|_| corrupt("key id counter"))?,
        ))
    }

    /// The next page of records, or `false` once every table is listed.
    fn fill(&mut self) -> Result<bool, StoreError> {
        while self.table < TABLES.len() {
            if !self.declared {
                self.run(format!(
                    "DECLARE bk_export_{} NO SCROLL CURSOR FOR {}",
                    self.table, TABLES[self.table]
                ))?;
                self.declared = true;
            }
            let rows = self.run(format!("FETCH {PAGE} FROM bk_export_{}", self.table))?;
            if rows.is_empty() {
                self.run(format!("CLOSE bk_export_{}", self.table))?;
                self.table += 1;
                self.declared = false;
                continue;
            }
            for row in &rows {
                self.buffer.push_back(self.decode(row)?);
            }
            return Ok(true);
        }
        self.run("COMMIT".into())?;
        Ok(false)
    }

    fn decode(&self, row: &Row) -> Result<Record, StoreError> {
        let sealer = &self.store.sealer;
        let device = |at: usize| -> Result<DeviceKey, StoreError> {
            let raw: Vec<u8> = row.try_get(at).pg()?;
            DeviceKey::from_bytes(&raw).ok_or_else(|| corrupt("device key"))
        };
        let open = |slot: &[u8], at: usize, what: &str| -> Result<Zeroizing<Vec<u8>>, StoreError> {
            let sealed: Vec<u8> = row.try_get(at).pg()?;
            sealer.open(slot, &sealed).ok_or_else(|| corrupt(what))
        };
        let text = |at: usize| -> Result<String, StoreError> { row.try_get(at).pg() };
        Ok(match self.table {
            0 => {
                let device = device(0)?;
                let version: i64 = row.try_get(1).pg()?;
                let version = u64::try_from(version).map_err(|_| corrupt("account version"))?;
                let data = open(&layout::account_slot(&device, version), 2, "account")?;
                Record::Account { device, data }
            }
            1 => {
                let device = device(0)?;
                let key_id = unord(row.try_get(1).pg()?);
                let public: Vec<u8> = row.try_get(2).pg()?;
                let public_key =
                    <[u8; 32]>::try_from(public.as_slice()).map_err(|_| corrupt("one-time key"))?;
                let secret = open(&layout::otk_by_id(&device, key_id), 3, "one-time key")?;
                let secret_key = Zeroizing::new(
                    <[u8; 32]>::try_from(secret.as_slice())
                        .map_err(|_| corrupt("one-time key length"))?,
                );
                Record::OneTimeKey {
                    device,
                    key: OneTimeKeyRecord {
                        key_id,
                        public_key,
                        secret_key,
                    },
                }
            }
            2 => {
                let device = device(0)?;
                let peer: Vec<u8> = row.try_get(1).pg()?;
                let peer_key =
                    <[u8; 32]>::try_from(peer.as_slice()).map_err(|_| corrupt("session"))?;
                let session_id = text(2)?;
                let last_used = unbits(row.try_get(3).pg()?);
                let pickle = open(
                    &layout::olm_session(&device, &peer_key, &session_id),
                    4,
                    "session",
                )?;
                Record::Session {
                    device,
                    session: SessionRecord {
                        peer_key,
                        session_id,
                        last_used,
                        pickle,
                        // A copy is a new record in the target.
                        version: None,
                    },
                }
            }
            3 => {
                let tag = text(0)?;
                let device = device(1)?;
                let message: Vec<u8> = row.try_get(2).pg()?;
                let record = open(&layout::delivery(&tag, &device, &message), 3, "delivery")?;
                Record::Delivery {
                    device,
                    delivery: Delivery {
                        tag,
                        message,
                        record,
                    },
                }
            }
            4 => {
                let user_id = text(0)?;
                let data = open(&layout::tracked_user(&user_id), 1, "tracked user")?;
                Record::TrackedUser { user_id, data }
            }
            5 => {
                let device = device(0)?;
                let room_id = text(1)?;
                let data = open(
                    &layout::outbound_group_session(&device, &room_id),
                    2,
                    "outbound group session",
                )?;
                Record::OutboundGroupSession {
                    device,
                    room_id,
                    data,
                }
            }
            6 => {
                let (room_id, session_id) = (text(0)?, text(1)?);
                let data = open(
                    &layout::group_session(&room_id, &session_id),
                    2,
                    "group session",
                )?;
                Record::GroupSession {
                    room_id,
                    session_id,
                    data,
                }
            }
            7 => {
                let index: i64 = row.try_get(2).pg()?;
                Record::MessageIndex {
                    room_id: text(0)?,
                    session_id: text(1)?,
                    index: u32::try_from(index).map_err(|_| corrupt("message index"))?,
                    event_id: text(3)?,
                }
            }
            8 => {
                let (room_id, session_id, event_id) = (text(0)?, text(1)?, text(2)?);
                let record = open(
                    &layout::held_event(&room_id, &session_id, &event_id),
                    3,
                    "held event",
                )?;
                Record::HeldEvent(HeldEvent {
                    room_id,
                    session_id,
                    event_id,
                    record,
                })
            }
            9 => {
                let room_id = text(0)?;
                let data = open(&layout::room_state(&room_id), 1, "room state")?;
                Record::RoomState { room_id, data }
            }
            10 => {
                let user_id = text(0)?;
                let data = open(&layout::cross_signing(&user_id), 1, "cross-signing")?;
                Record::CrossSigning { user_id, data }
            }
            11 => Record::Transaction {
                namespace: text(0)?,
                txn_id: text(1)?,
            },
            _ => {
                let due: Option<i64> = row.try_get(2).pg()?;
                Record::Puppet {
                    device: device(0)?,
                    cross_signed: row.try_get(1).pg()?,
                    due_ms: due.map(unord),
                }
            }
        })
    }
}

impl Iterator for Listing<'_> {
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(record) = self.buffer.pop_front() {
            return Some(Ok(record));
        }
        if self.done {
            return None;
        }
        let step = if self.conn.is_none() && self.table == 0 && !self.declared {
            self.begin().map(Some)
        } else {
            self.fill().map(|_| None)
        };
        match step {
            Ok(Some(floor)) => Some(Ok(floor)),
            Ok(None) => {
                if self.buffer.is_empty() {
                    self.done = true;
                    self.conn = None;
                }
                self.buffer.pop_front().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Drop for Listing<'_> {
    fn drop(&mut self) {
        // Stopped before the end: the connection is inside the snapshot's
        // transaction, so it leaves the pool instead of going back to it.
        if !self.done
            && let Some(conn) = self.conn.take()
        {
            drop(Object::take(conn));
        }
    }
}
