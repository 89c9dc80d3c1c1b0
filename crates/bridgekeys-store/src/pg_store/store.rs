//! [`Store`] for [`PgStore`]: the account records, keys, sessions and the
//! other sealed records, one table each (see `0001_initial.sql`).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use zeroize::Zeroizing;

use super::{Pg, PgStore, bits, key_id_sql, ord, params, unbits, unord};
use crate::{
    AccountRecord, CommitStats, DeviceKey, DeviceWrite, Fetch, HeldEvent, IndexUse, KeyAppend,
    OneTimeKeyRecord, OutboundSessionRecord, Pending, SessionRecord, SessionWrite, Store,
    StoreError, Version, crypto::Sealer, layout,
};

/// Session rows of a write as column arrays, split by what each must find:
/// `(updates, creates)`.
type SessionColumns = (SessionRows, SessionRows);

/// Session rows as column arrays: peer keys, session ids, last used,
/// sealed pickles, and the versions: for an update the one the stored row
/// must be at, for a create the one it is stored at.
#[derive(Default)]
struct SessionRows {
    peers: Vec<Vec<u8>>,
    ids: Vec<String>,
    used: Vec<i64>,
    sealed: Vec<Vec<u8>>,
    versions: Vec<i64>,
}

impl SessionRows {
    fn push(&mut self, r: &SessionRecord, sealed: Vec<u8>, version: u64) {
        self.peers.push(r.peer_key.to_vec());
        self.ids.push(r.session_id.clone());
        self.used.push(bits(r.last_used));
        self.sealed.push(sealed);
        self.versions.push(bits(version));
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt { what: what.into() }
}

fn key32(raw: &[u8], what: &str) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(raw).map_err(|_| corrupt(what))
}

impl PgStore {
    /// The sealed value of a one-column lookup, opened against `slot`.
    fn get_sealed(
        &self,
        sql: &'static str,
        params: super::Params,
        slot: &[u8],
        what: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let rows = self.engine.query(sql, params)?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let raw: Vec<u8> = row.try_get(0).pg()?;
        self.sealer
            .open(slot, &raw)
            .map(Some)
            .ok_or_else(|| corrupt(what))
    }

    /// One statement that changes a record, durable when it returns.
    fn write(&self, sql: &'static str, params: super::Params) -> Result<Pending, StoreError> {
        self.engine.execute(sql, params)?;
        Ok(Pending::ready())
    }

    /// Seal keys for a write: `(order-preserving id, public, sealed)`, the
    /// last of any duplicate id winning (as a later insert would in sled).
    fn seal_keys(
        &self,
        device: &DeviceKey,
        keys: &[OneTimeKeyRecord],
    ) -> Vec<(u64, [u8; 32], Vec<u8>)> {
        let mut by_id: HashMap<u64, usize> = HashMap::new();
        let mut out: Vec<(u64, [u8; 32], Vec<u8>)> = Vec::with_capacity(keys.len());
        for k in keys {
            let sealed = self.sealer.seal(
                &layout::otk_by_id(device, k.key_id),
                k.secret_key.as_slice(),
            );
            match by_id.get(&k.key_id) {
                Some(&at) => out[at] = (k.key_id, k.public_key, sealed),
                None => {
                    by_id.insert(k.key_id, out.len());
                    out.push((k.key_id, k.public_key, sealed));
                }
            }
        }
        out
    }

    /// Seal sessions: the updates (compare-and-swap on their version) and
    /// the creates (the session must not exist), the last of any duplicate
    /// session winning.
    fn seal_sessions(&self, device: &DeviceKey, sessions: &[SessionRecord]) -> SessionColumns {
        let mut last: HashMap<([u8; 32], &str), usize> = HashMap::new();
        for (at, r) in sessions.iter().enumerate() {
            last.insert((r.peer_key, r.session_id.as_str()), at);
        }
        let (mut updates, mut creates) = (SessionRows::default(), SessionRows::default());
        for (at, r) in sessions.iter().enumerate() {
            if last.get(&(r.peer_key, r.session_id.as_str())) != Some(&at) {
                continue;
            }
            let slot = layout::olm_session(device, &r.peer_key, &r.session_id);
            let sealed = self.sealer.seal(&slot, &r.pickle);
            match r.version {
                Some(expected) => updates.push(r, sealed, expected.0),
                None => creates.push(r, sealed, Version::next(None).0),
            }
        }
        (updates, creates)
    }

    /// A delivery record sealed: `(tag, message, sealed)`.
    fn seal_delivery(
        &self,
        device: &DeviceKey,
        delivery: Option<&crate::Delivery>,
    ) -> Option<(String, Vec<u8>, Vec<u8>)> {
        delivery.map(|d| {
            let slot = layout::delivery(&d.tag, device, &d.message);
            (
                d.tag.clone(),
                d.message.clone(),
                self.sealer.seal(&slot, &d.record),
            )
        })
    }

    /// Open a session row: `(peer_key, session_id, last_used, sealed,
    /// version)`.
    fn open_session(
        &self,
        device: &DeviceKey,
        row: &tokio_postgres::Row,
    ) -> Result<SessionRecord, StoreError> {
        let peer: Vec<u8> = row.try_get(0).pg()?;
        let peer_key = key32(&peer, "session peer key")?;
        let session_id: String = row.try_get(1).pg()?;
        let last_used = unbits(row.try_get(2).pg()?);
        let sealed: Vec<u8> = row.try_get(3).pg()?;
        let version = unbits(row.try_get(4).pg()?);
        let slot = layout::olm_session(device, &peer_key, &session_id);
        let pickle = self
            .sealer
            .open(&slot, &sealed)
            .ok_or_else(|| corrupt("session record"))?;
        Ok(SessionRecord {
            peer_key,
            session_id,
            last_used,
            pickle,
            version: Some(Version(version)),
        })
    }
}

/// The compare-and-swap of session updates: a row matches only at the
/// version the writer read (of two racing writers, the second's statement
/// waits for the first to commit, then matches nothing); it is stored one
/// version further.
const UPDATE_SESSIONS: &str = "UPDATE bk_olm_sessions s \
     SET last_used = u.last_used, sealed = u.sealed, version = u.expected + 1 \
     FROM unnest($2::bytea[], $3::text[], $4::int8[], $5::bytea[], $6::int8[]) \
     AS u(peer_key, session_id, last_used, sealed, expected) \
     WHERE s.device = $1 AND s.peer_key = u.peer_key AND s.session_id = u.session_id \
     AND s.version = u.expected \
     RETURNING s.peer_key, s.session_id";

/// New sessions: none may exist yet (a racing creator's row makes this one
/// insert nothing).
const CREATE_SESSIONS: &str = "INSERT INTO bk_olm_sessions \
     (device, peer_key, session_id, last_used, sealed, version) \
     SELECT $1, * FROM unnest($2::bytea[], $3::text[], $4::int8[], $5::bytea[], $6::int8[]) \
     ON CONFLICT (device, peer_key, session_id) DO NOTHING \
     RETURNING peer_key, session_id";

/// Apply the session puts of a write in its transaction, or fail with
/// [`StoreError::Conflict`] naming the first session not at the version
/// its writer read (the caller then drops the transaction: nothing of the
/// write is applied).
async fn put_sessions(
    tx: &tokio_postgres::Transaction<'_>,
    dev: &Vec<u8>,
    (updates, creates): &SessionColumns,
) -> Result<(), StoreError> {
    for (sql, rows, create) in [
        (UPDATE_SESSIONS, updates, false),
        (CREATE_SESSIONS, creates, true),
    ] {
        if rows.peers.is_empty() {
            continue;
        }
        let done = tx
            .query(
                sql,
                &[
                    dev,
                    &rows.peers,
                    &rows.ids,
                    &rows.used,
                    &rows.sealed,
                    &rows.versions,
                ],
            )
            .await
            .pg()?;
        if done.len() == rows.peers.len() {
            continue;
        }
        let mut applied = std::collections::HashSet::new();
        for row in &done {
            let peer: Vec<u8> = row.try_get(0).pg()?;
            let id: String = row.try_get(1).pg()?;
            applied.insert((peer, id));
        }
        let Some(at) = (0..rows.peers.len())
            .find(|&i| !applied.contains(&(rows.peers[i].clone(), rows.ids[i].clone())))
        else {
            continue;
        };
        let found = tx
            .query_opt(
                "SELECT version FROM bk_olm_sessions \
                 WHERE device = $1 AND peer_key = $2 AND session_id = $3",
                &[dev, &rows.peers[at], &rows.ids[at]],
            )
            .await
            .pg()?
            .map(|row| row.try_get::<_, i64>(0))
            .transpose()
            .pg()?
            .map(|v| Version(unbits(v)));
        let expected = (!create).then(|| Version(unbits(rows.versions[at])));
        return Err(StoreError::Conflict { expected, found });
    }
    Ok(())
}

const REMOVE_SESSIONS: &str = "DELETE FROM bk_olm_sessions WHERE device = $1 AND (peer_key, session_id) IN \
     (SELECT * FROM unnest($2::bytea[], $3::text[]))";

const UPSERT_DELIVERY: &str = "INSERT INTO bk_deliveries (tag, device, message_hash, message, sealed) \
     VALUES ($1, $2, sha256($3), $3, $4) \
     ON CONFLICT (tag, device, message_hash) DO UPDATE SET message = excluded.message, sealed = excluded.sealed";

/// The statements of [`PgStore::replace_sealed`] for one table of sealed
/// records by a text key: the key's columns are `$1`.. in order, and the
/// sealed record the parameter after them.
struct SealedTable {
    select: &'static str,
    insert: &'static str,
    update: &'static str,
    delete: &'static str,
    what: &'static str,
}

const TRACKED_USERS: SealedTable = SealedTable {
    select: "SELECT sealed FROM bk_tracked_users WHERE user_id = $1 FOR UPDATE",
    insert: "INSERT INTO bk_tracked_users (user_id, sealed) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO NOTHING",
    update: "UPDATE bk_tracked_users SET sealed = $2 WHERE user_id = $1",
    delete: "DELETE FROM bk_tracked_users WHERE user_id = $1",
    what: "tracked devices record",
};

const ROOM_STATES: SealedTable = SealedTable {
    select: "SELECT sealed FROM bk_room_states WHERE room_id = $1 FOR UPDATE",
    insert: "INSERT INTO bk_room_states (room_id, sealed) VALUES ($1, $2) \
             ON CONFLICT (room_id) DO NOTHING",
    update: "UPDATE bk_room_states SET sealed = $2 WHERE room_id = $1",
    delete: "DELETE FROM bk_room_states WHERE room_id = $1",
    what: "room state record",
};

const HELD_EVENTS: SealedTable = SealedTable {
    select: "SELECT sealed FROM bk_held_events \
             WHERE room_id = $1 AND session_id = $2 AND event_id = $3 FOR UPDATE",
    insert: "INSERT INTO bk_held_events (room_id, session_id, event_id, sealed) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (room_id, session_id, event_id) DO NOTHING",
    update: "UPDATE bk_held_events SET sealed = $4 \
             WHERE room_id = $1 AND session_id = $2 AND event_id = $3",
    delete: "DELETE FROM bk_held_events \
             WHERE room_id = $1 AND session_id = $2 AND event_id = $3",
    what: "held event record",
};

const GROUP_SESSIONS: SealedTable = SealedTable {
    select: "SELECT sealed FROM bk_group_sessions WHERE room_id = $1 AND session_id = $2 \
             FOR UPDATE",
    insert: "INSERT INTO bk_group_sessions (room_id, session_id, sealed) VALUES ($1, $2, $3) \
             ON CONFLICT (room_id, session_id) DO NOTHING",
    update: "UPDATE bk_group_sessions SET sealed = $3 WHERE room_id = $1 AND session_id = $2",
    delete: "DELETE FROM bk_group_sessions WHERE room_id = $1 AND session_id = $2",
    what: "group session record",
};

/// A device's account row.
const LOAD_ACCOUNT: &str = "SELECT version, sealed FROM bk_accounts WHERE device = $1";

/// A device's account row and the count of its one-time keys, in one
/// statement ([`Store::load_account_counted`]).
const LOAD_COUNTED: &str = "SELECT a.version, a.sealed, \
     (SELECT count(*) FROM bk_one_time_keys k WHERE k.device = a.device) \
     FROM bk_accounts a WHERE a.device = $1";

/// The account record of `device` in a row whose first two columns are its
/// version and sealed record.
fn open_account_row(
    sealer: &Sealer,
    device: &DeviceKey,
    row: &tokio_postgres::Row,
) -> Result<AccountRecord, StoreError> {
    let version: i64 = row.try_get(0).pg()?;
    let version = u64::try_from(version).map_err(|_| corrupt("account version"))?;
    let sealed: Vec<u8> = row.try_get(1).pg()?;
    let data = sealer
        .open(&layout::account_slot(device, version), &sealed)
        .ok_or_else(|| corrupt("account record"))?;
    Ok(AccountRecord {
        version: Version(version),
        data,
    })
}

/// The answer of [`LOAD_COUNTED`]: nothing, or the record and key count.
fn open_counted(
    sealer: &Sealer,
    device: &DeviceKey,
    rows: &[tokio_postgres::Row],
) -> Result<Option<(AccountRecord, usize)>, StoreError> {
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let record = open_account_row(sealer, device, row)?;
    let keys: i64 = row.try_get(2).pg()?;
    let keys = usize::try_from(keys).map_err(|_| corrupt("key count"))?;
    Ok(Some((record, keys)))
}

impl PgStore {
    /// Whether this process has appends for `device` not yet committed. The
    /// one-statement load counts only committed keys, so then the device is
    /// loaded by [`PgStore::load_then_count`], whose count reads the
    /// overlay as `count_one_time_keys` does (an append leaves the overlay
    /// only once committed, so one that commits after this check is counted
    /// by the statement).
    fn appends_in_flight(&self, device: &DeviceKey) -> bool {
        let overlay = self.engine.appender.overlay(device.as_bytes());
        !(overlay.added.is_empty() && overlay.evicted.is_empty())
    }

    /// The record, then its key count, in two calls (the trait's default
    /// `load_account_counted`, which an override cannot call).
    fn load_then_count(
        &self,
        device: &DeviceKey,
    ) -> Result<Option<(AccountRecord, usize)>, StoreError> {
        let Some(record) = self.load_account(device)? else {
            return Ok(None);
        };
        Ok(Some((record, self.count_one_time_keys(device)?)))
    }

    /// The account record of `device` in a row whose first two columns are
    /// its version and sealed record.
    fn open_account(
        &self,
        device: &DeviceKey,
        row: &tokio_postgres::Row,
    ) -> Result<AccountRecord, StoreError> {
        open_account_row(&self.sealer, device, row)
    }

    /// Write the record under `key` only if it is still `expected` (its
    /// plaintext; `None`: no record), in one transaction: the row stays
    /// locked while it is opened and compared, so of two processes
    /// replacing the same record from the same read, the second finds the
    /// first one's record and writes nothing. A first record inserted by two
    /// at once: the second's insert finds the row and changes nothing.
    fn replace_sealed(
        &self,
        table: &'static SealedTable,
        key: &[&str],
        slot: Vec<u8>,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        let sealed = record.map(|r| self.sealer.seal(&slot, r));
        let expected = expected.map(|e| Zeroizing::new(e.to_vec()));
        // Shared, not copied: no copy of the key goes into the task.
        let sealer = Arc::clone(&self.sealer);
        let key: Vec<String> = key.iter().map(|k| (*k).to_owned()).collect();
        let replaced = self.engine.call(move |pool| async move {
            let mut client = pool.get().await.pg()?;
            let tx = client.transaction().await.pg()?;
            let key: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = key
                .iter()
                .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let select = tx.prepare_cached(table.select).await.pg()?;
            let row = tx.query_opt(&select, &key).await.pg()?;
            let stored = match row {
                Some(row) => {
                    let raw: Vec<u8> = row.try_get(0).pg()?;
                    let opened = sealer
                        .open(&slot, &raw)
                        .ok_or_else(|| corrupt(table.what))?;
                    Some(opened)
                }
                None => None,
            };
            if stored.as_deref().map(Vec::as_slice) != expected.as_deref().map(Vec::as_slice) {
                // Dropping the transaction rolls it back.
                return Ok(false);
            }
            let statement = match (&stored, &sealed) {
                (None, Some(_)) => Some(table.insert),
                (Some(_), Some(_)) => Some(table.update),
                (Some(_), None) => Some(table.delete),
                (None, None) => None,
            };
            if let Some(sql) = statement {
                let statement = tx.prepare_cached(sql).await.pg()?;
                let mut params = key.clone();
                if let Some(new) = &sealed {
                    params.push(new);
                }
                let changed = tx.execute(&statement, &params).await.pg()?;
                if changed != 1 {
                    return Ok(false);
                }
            }
            tx.commit().await.pg()?;
            Ok(true)
        })?;
        if !replaced {
            return Ok(None);
        }
        self.engine.committed();
        Ok(Some(Pending::ready()))
    }
}

impl Store for PgStore {
    /// The version column alone: nothing to open.
    fn account_version(&self, device: &DeviceKey) -> Result<Option<Version>, StoreError> {
        let rows = self.engine.query(
            "SELECT version FROM bk_accounts WHERE device = $1",
            params![device.as_bytes().to_vec()],
        )?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let version: i64 = row.try_get(0).pg()?;
        u64::try_from(version)
            .map(|v| Some(Version(v)))
            .map_err(|_| corrupt("account version"))
    }

    fn load_account(&self, device: &DeviceKey) -> Result<Option<AccountRecord>, StoreError> {
        let rows = self
            .engine
            .query(LOAD_ACCOUNT, params![device.as_bytes().to_vec()])?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        self.open_account(device, row).map(Some)
    }

    /// The same statement, queued on the store's runtime as
    /// `load_account_counted_later`'s is (and bounded with it), the record
    /// opened on the caller's thread. An account row does not depend on
    /// this process's queued appends, so there is no blocking fallback.
    fn load_account_later(&self, device: &DeviceKey) -> Fetch<Option<AccountRecord>> {
        let rows = self
            .engine
            .query_later(LOAD_ACCOUNT, params![device.as_bytes().to_vec()]);
        let sealer = Arc::clone(&self.sealer);
        let device = device.clone();
        Fetch::from_future(async move {
            let rows = rows.await?;
            rows.first()
                .map(|row| open_account_row(&sealer, &device, row))
                .transpose()
        })
    }

    fn load_account_counted(
        &self,
        device: &DeviceKey,
    ) -> Result<Option<(AccountRecord, usize)>, StoreError> {
        if self.appends_in_flight(device) {
            return self.load_then_count(device);
        }
        // One statement, one snapshot, one round trip.
        let rows = self
            .engine
            .query(LOAD_COUNTED, params![device.as_bytes().to_vec()])?;
        open_counted(&self.sealer, device, &rows)
    }

    /// The same statement, queued on the store's runtime before this
    /// returns; the caller's thread is free while the server answers, and
    /// the record is opened on it once the row is back (not on the store's
    /// own runtime thread, which all of this process's database work
    /// shares). With appends of this process in flight for the device, the
    /// blocking two-call load runs instead and its answer is returned ready.
    fn load_account_counted_later(
        &self,
        device: &DeviceKey,
    ) -> Fetch<Option<(AccountRecord, usize)>> {
        if self.appends_in_flight(device) {
            return Fetch::ready(self.load_then_count(device));
        }
        let rows = self
            .engine
            .query_later(LOAD_COUNTED, params![device.as_bytes().to_vec()]);
        let sealer = Arc::clone(&self.sealer);
        let device = device.clone();
        Fetch::from_future(async move { open_counted(&sealer, &device, &rows.await?) })
    }

    fn write_device(
        &self,
        device: &DeviceKey,
        expected: Option<Version>,
        write: DeviceWrite,
    ) -> Result<Pending, StoreError> {
        let new_version = Version::next(expected);
        let new = i64::try_from(new_version.0).map_err(|_| corrupt("account version"))?;
        let expected_sql = match expected {
            Some(v) => Some(i64::try_from(v.0).map_err(|_| corrupt("account version"))?),
            None => None,
        };
        let account = self
            .sealer
            .seal(&layout::account_slot(device, new_version.0), &write.account);
        let added = self.seal_keys(device, &write.add_keys);
        let (add_ids, add_publics, add_sealed) = split_keys(added);
        let remove_ids: Vec<i64> = write.remove_keys.iter().map(|(id, _)| ord(*id)).collect();
        let sessions = self.seal_sessions(device, &write.sessions);
        let (rm_peers, rm_ids): (Vec<Vec<u8>>, Vec<String>) = write
            .remove_sessions
            .iter()
            .map(|(p, id)| (p.to_vec(), id.clone()))
            .unzip();
        let delivery = self.seal_delivery(device, write.delivery.as_ref());
        // The puppet mark: the row `record_puppet` inserts, with the due
        // time `schedule_rotation` sets, when given (a row already there
        // keeps its cross-signed flag, and its due time if none is given).
        let puppet_due = write.puppet.map(|mark| mark.due_ms.map(ord));
        let dev = device.as_bytes().to_vec();
        // After this device's queued appends: a key removed here must not
        // be inserted again by a batch behind it.
        if !remove_ids.is_empty() {
            self.engine.appender.settle(&dev)?;
        }
        self.engine.call(move |pool| async move {
            let mut client = pool.get().await.pg()?;
            let tx = client.transaction().await.pg()?;
            // The compare-and-swap: of two racing writers with the same
            // expected version, the second's statement waits for the first
            // to commit, then matches no row.
            let changed = match expected_sql {
                Some(v) => tx
                    .execute(
                        "UPDATE bk_accounts SET version = $2, sealed = $3 \
                         WHERE device = $1 AND version = $4",
                        &[&dev, &new, &account, &v],
                    )
                    .await
                    .pg()?,
                None => tx
                    .execute(
                        "INSERT INTO bk_accounts (device, version, sealed) VALUES ($1, $2, $3) \
                         ON CONFLICT (device) DO NOTHING",
                        &[&dev, &new, &account],
                    )
                    .await
                    .pg()?,
            };
            if changed != 1 {
                let found = tx
                    .query_opt("SELECT version FROM bk_accounts WHERE device = $1", &[&dev])
                    .await
                    .pg()?
                    .map(|row| row.try_get::<_, i64>(0))
                    .transpose()
                    .pg()?
                    .map(|v| Version(u64::try_from(v).unwrap_or_default()));
                // Dropping the transaction rolls it back.
                return Err(StoreError::Conflict { expected, found });
            }
            if !add_ids.is_empty() {
                tx.execute(
                    "INSERT INTO bk_one_time_keys (device, key_id, public_key, sealed) \
                     SELECT $1, * FROM unnest($2::int8[], $3::bytea[], $4::bytea[]) \
                     ON CONFLICT (device, key_id) DO UPDATE \
                     SET public_key = excluded.public_key, sealed = excluded.sealed",
                    &[&dev, &add_ids, &add_publics, &add_sealed],
                )
                .await
                .pg()?;
            }
            if !remove_ids.is_empty() {
                tx.execute(
                    "DELETE FROM bk_one_time_keys WHERE device = $1 AND key_id = ANY($2)",
                    &[&dev, &remove_ids],
                )
                .await
                .pg()?;
            }
            if !rm_peers.is_empty() {
                tx.execute(REMOVE_SESSIONS, &[&dev, &rm_peers, &rm_ids])
                    .await
                    .pg()?;
            }
            put_sessions(&tx, &dev, &sessions).await?;
            if let Some((tag, message, sealed)) = &delivery {
                tx.execute(UPSERT_DELIVERY, &[tag, &dev, message, sealed])
                    .await
                    .pg()?;
            }
            if let Some(due) = &puppet_due {
                tx.execute(
                    "INSERT INTO bk_puppets (device, due_ms) VALUES ($1, $2) \
                     ON CONFLICT (device) DO UPDATE \
                     SET due_ms = COALESCE(excluded.due_ms, bk_puppets.due_ms)",
                    &[&dev, due],
                )
                .await
                .pg()?;
            }
            tx.commit().await.pg()
        })?;
        self.engine.committed();
        Ok(Pending::ready())
    }

    fn append_keys(&self, device: &DeviceKey, append: KeyAppend) -> Result<Pending, StoreError> {
        // No round trip here: the writer commits it with the other appends
        // queued meanwhile, and this process's readers see it at once (see
        // appender.rs).
        let evict: Vec<i64> = append.evict_keys.iter().map(|(id, _)| ord(*id)).collect();
        let added = self
            .seal_keys(device, &append.add_keys)
            .into_iter()
            .map(|(id, public, sealed)| (ord(id), public, sealed))
            .collect();
        Ok(self.engine.appender.append(device.as_bytes(), added, evict))
    }

    fn reserve_key_ids(&self, count: u64) -> Result<u64, StoreError> {
        let mut ids = self.key_ids.lock();
        let end = ids
            .next
            .checked_add(count)
            .ok_or(StoreError::KeyIdsExhausted)?;
        if ids.next != 0 && end <= ids.end {
            let first = ids.next;
            ids.next = end;
            return Ok(first);
        }
        // A new block from the counter row, committed before any id of it
        // is used: no other process, and no later run, gets these ids. The
        // rest of the old block is skipped (ids must be contiguous).
        let take = count.max(self.key_id_block);
        let take_sql = key_id_sql(take)?;
        let rows = self.engine.call(move |pool| async move {
            let client = pool.get().await.pg()?;
            client
                .query(
                    "UPDATE bk_key_ids SET next_id = next_id + $1 \
                     WHERE next_id <= 9223372036854775807 - $1 RETURNING next_id - $1",
                    &[&take_sql],
                )
                .await
                .pg()
        })?;
        let row = rows.first().ok_or(StoreError::KeyIdsExhausted)?;
        let first: i64 = row.try_get(0).pg()?;
        let first = u64::try_from(first).map_err(|_| corrupt("key id counter"))?;
        ids.next = first + count;
        ids.end = first + take;
        Ok(first)
    }

    fn one_time_key(
        &self,
        device: &DeviceKey,
        public_key: &[u8; 32],
    ) -> Result<Option<OneTimeKeyRecord>, StoreError> {
        // The overlay first, then the database (see appender.rs).
        let overlay = self.engine.appender.overlay(device.as_bytes());
        let found = match overlay.added.iter().find(|(_, p, _)| p == public_key) {
            Some((id, _, sealed)) => Some((unord(*id), sealed.clone())),
            None => {
                let rows = self.engine.query(
                    "SELECT key_id, sealed FROM bk_one_time_keys \
                     WHERE device = $1 AND public_key = $2 ORDER BY key_id",
                    params![device.as_bytes().to_vec(), public_key.to_vec()],
                )?;
                let mut found = None;
                for row in &rows {
                    let id: i64 = row.try_get(0).pg()?;
                    if !overlay.evicted.contains(&id) {
                        found = Some((unord(id), row.try_get::<_, Vec<u8>>(1).pg()?));
                        break;
                    }
                }
                found
            }
        };
        let Some((key_id, sealed)) = found else {
            return Ok(None);
        };
        let secret = self
            .sealer
            .open(&layout::otk_by_id(device, key_id), &sealed)
            .ok_or_else(|| corrupt("one-time key secret"))?;
        let secret_key = Zeroizing::new(
            <[u8; 32]>::try_from(secret.as_slice()).map_err(|_| corrupt("one-time key length"))?,
        );
        Ok(Some(OneTimeKeyRecord {
            key_id,
            public_key: *public_key,
            secret_key,
        }))
    }

    fn oldest_one_time_keys(
        &self,
        device: &DeviceKey,
        limit: usize,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        let overlay = self.engine.appender.overlay(device.as_bytes());
        // Enough rows that the ones evicted meanwhile can be skipped.
        let want = limit.saturating_add(overlay.evicted.len());
        let rows = self.engine.query(
            "SELECT key_id, public_key FROM bk_one_time_keys WHERE device = $1 \
             ORDER BY seq LIMIT $2",
            params![
                device.as_bytes().to_vec(),
                i64::try_from(want).unwrap_or(i64::MAX)
            ],
        )?;
        let mut oldest = Vec::with_capacity(limit.min(rows.len() + overlay.added.len()));
        let mut seen = HashSet::new();
        for row in &rows {
            let id: i64 = row.try_get(0).pg()?;
            if overlay.evicted.contains(&id) {
                continue;
            }
            let public: Vec<u8> = row.try_get(1).pg()?;
            seen.insert(id);
            oldest.push((unord(id), key32(&public, "one-time key record")?));
        }
        // Appended in this process and not committed: the newest.
        for (id, public, _) in &overlay.added {
            if !seen.contains(id) {
                oldest.push((unord(*id), *public));
            }
        }
        oldest.truncate(limit);
        Ok(oldest)
    }

    fn count_one_time_keys(&self, device: &DeviceKey) -> Result<usize, StoreError> {
        let overlay = self.engine.appender.overlay(device.as_bytes());
        if overlay.added.is_empty() && overlay.evicted.is_empty() {
            let rows = self.engine.query(
                "SELECT count(*) FROM bk_one_time_keys WHERE device = $1",
                params![device.as_bytes().to_vec()],
            )?;
            let stored: i64 = rows
                .first()
                .ok_or_else(|| corrupt("key count"))?
                .try_get(0)
                .pg()?;
            return usize::try_from(stored).map_err(|_| corrupt("key count"));
        }
        let rows = self.engine.query(
            "SELECT key_id FROM bk_one_time_keys WHERE device = $1",
            params![device.as_bytes().to_vec()],
        )?;
        let mut ids = HashSet::with_capacity(rows.len() + overlay.added.len());
        for row in &rows {
            ids.insert(row.try_get::<_, i64>(0).pg()?);
        }
        ids.extend(overlay.added.iter().map(|(id, _, _)| *id));
        Ok(ids
            .iter()
            .filter(|id| !overlay.evicted.contains(id))
            .count())
    }

    fn load_session(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
        session_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let rows = self.engine.query(
            "SELECT peer_key, session_id, last_used, sealed, version FROM bk_olm_sessions \
             WHERE device = $1 AND peer_key = $2 AND session_id = $3",
            params![
                device.as_bytes().to_vec(),
                peer_key.to_vec(),
                session_id.to_owned()
            ],
        )?;
        rows.first()
            .map(|row| self.open_session(device, row))
            .transpose()
    }

    fn sessions(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = self.engine.query(
            "SELECT peer_key, session_id, last_used, sealed, version FROM bk_olm_sessions \
             WHERE device = $1 AND peer_key = $2 ORDER BY session_id",
            params![device.as_bytes().to_vec(), peer_key.to_vec()],
        )?;
        rows.iter()
            .map(|row| self.open_session(device, row))
            .collect()
    }

    fn session_stamps(&self, device: &DeviceKey) -> Result<Vec<crate::SessionStamp>, StoreError> {
        let rows = self.engine.query(
            "SELECT peer_key, session_id, last_used FROM bk_olm_sessions \
             WHERE device = $1 ORDER BY peer_key, session_id",
            params![device.as_bytes().to_vec()],
        )?;
        rows.iter()
            .map(|row| {
                let peer: Vec<u8> = row.try_get(0).pg()?;
                Ok((
                    key32(&peer, "session peer key")?,
                    row.try_get(1).pg()?,
                    unbits(row.try_get(2).pg()?),
                ))
            })
            .collect()
    }

    fn legacy_sessions(
        &self,
        _device: &DeviceKey,
    ) -> Result<Vec<crate::LegacySession>, StoreError> {
        // Schema 1 sessions exist only in sled stores written before
        // schema 2; a PostgreSQL store never holds any.
        Ok(Vec::new())
    }

    fn write_sessions(
        &self,
        device: &DeviceKey,
        write: SessionWrite,
    ) -> Result<Pending, StoreError> {
        let sessions = self.seal_sessions(device, &write.put);
        let (rm_peers, rm_ids): (Vec<Vec<u8>>, Vec<String>) = write
            .remove
            .iter()
            .map(|(p, id)| (p.to_vec(), id.clone()))
            .unzip();
        let delivery = self.seal_delivery(device, write.delivery.as_ref());
        let dev = device.as_bytes().to_vec();
        self.engine.call(move |pool| async move {
            let mut client = pool.get().await.pg()?;
            let tx = client.transaction().await.pg()?;
            if !rm_peers.is_empty() {
                tx.execute(REMOVE_SESSIONS, &[&dev, &rm_peers, &rm_ids])
                    .await
                    .pg()?;
            }
            put_sessions(&tx, &dev, &sessions).await?;
            if let Some((tag, message, sealed)) = &delivery {
                tx.execute(UPSERT_DELIVERY, &[tag, &dev, message, sealed])
                    .await
                    .pg()?;
            }
            tx.commit().await.pg()
        })?;
        self.engine.committed();
        Ok(Pending::ready())
    }

    fn load_tracked_user(&self, user_id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(
            "SELECT sealed FROM bk_tracked_users WHERE user_id = $1",
            params![user_id.to_owned()],
            &layout::tracked_user(user_id),
            "tracked devices record",
        )
    }

    fn write_tracked_user(
        &self,
        user_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        match record {
            Some(record) => self.write(
                "INSERT INTO bk_tracked_users (user_id, sealed) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed",
                params![
                    user_id.to_owned(),
                    self.sealer.seal(&layout::tracked_user(user_id), record)
                ],
            ),
            None => self.write(
                "DELETE FROM bk_tracked_users WHERE user_id = $1",
                params![user_id.to_owned()],
            ),
        }
    }

    /// One transaction that holds the row while it compares (see
    /// `PgStore::replace_sealed`).
    fn replace_tracked_user(
        &self,
        user_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.replace_sealed(
            &TRACKED_USERS,
            &[user_id],
            layout::tracked_user(user_id),
            expected,
            record,
        )
    }

    fn load_delivery(
        &self,
        device: &DeviceKey,
        tag: &str,
        message: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(
            "SELECT sealed FROM bk_deliveries \
             WHERE tag = $1 AND device = $2 AND message_hash = sha256($3) AND message = $3",
            params![tag.to_owned(), device.as_bytes().to_vec(), message.to_vec()],
            &layout::delivery(tag, device, message),
            "delivery record",
        )
    }

    fn forget_deliveries(&self, tag: &str) -> Result<Pending, StoreError> {
        self.write(
            "DELETE FROM bk_deliveries WHERE tag = $1",
            params![tag.to_owned()],
        )
    }

    fn load_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
    ) -> Result<Option<OutboundSessionRecord>, StoreError> {
        let rows = self.engine.query(
            "SELECT version, sealed FROM bk_outbound_group_sessions \
             WHERE device = $1 AND room_id = $2",
            params![device.as_bytes().to_vec(), room_id.to_owned()],
        )?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let version = Version(unbits(row.try_get(0).pg()?));
        let sealed: Vec<u8> = row.try_get(1).pg()?;
        let data = self
            .sealer
            .open(&layout::outbound_group_session(device, room_id), &sealed)
            .ok_or_else(|| corrupt("outbound group session record"))?;
        Ok(Some(OutboundSessionRecord { version, data }))
    }

    fn write_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
        expected: Option<Version>,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        let dev = device.as_bytes().to_vec();
        let room = room_id.to_owned();
        let sealed = record.map(|r| {
            self.sealer
                .seal(&layout::outbound_group_session(device, room_id), r)
        });
        let next = bits(Version::next(expected).0);
        let expected_sql = expected.map(|v| bits(v.0));
        // One statement per case, each a compare-and-swap: it changes a
        // row only at the version the writer read (a racing writer's
        // statement waits for the first to commit, then matches nothing).
        let changed = match (expected_sql, &sealed) {
            (Some(v), Some(sealed)) => self.engine.execute(
                "UPDATE bk_outbound_group_sessions SET sealed = $3, version = $4 \
                 WHERE device = $1 AND room_id = $2 AND version = $5",
                params![dev.clone(), room.clone(), sealed.clone(), next, v],
            )?,
            (None, Some(sealed)) => self.engine.execute(
                "INSERT INTO bk_outbound_group_sessions (device, room_id, sealed, version) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (device, room_id) DO NOTHING",
                params![dev.clone(), room.clone(), sealed.clone(), next],
            )?,
            (Some(v), None) => self.engine.execute(
                "DELETE FROM bk_outbound_group_sessions \
                 WHERE device = $1 AND room_id = $2 AND version = $3",
                params![dev.clone(), room.clone(), v],
            )?,
            // Discarding what must not exist: nothing to change (a stored
            // session is a conflict all the same, found below).
            (None, None) => 0,
        };
        if changed == 1 {
            return Ok(Pending::ready());
        }
        let found = self
            .engine
            .query(
                "SELECT version FROM bk_outbound_group_sessions \
                 WHERE device = $1 AND room_id = $2",
                params![dev, room],
            )?
            .first()
            .map(|row| row.try_get::<_, i64>(0))
            .transpose()
            .pg()?
            .map(|v| Version(unbits(v)));
        match found {
            None if expected.is_none() && sealed.is_none() => Ok(Pending::ready()),
            found => Err(StoreError::Conflict { expected, found }),
        }
    }

    fn load_group_session(
        &self,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(
            "SELECT sealed FROM bk_group_sessions WHERE room_id = $1 AND session_id = $2",
            params![room_id.to_owned(), session_id.to_owned()],
            &layout::group_session(room_id, session_id),
            "group session record",
        )
    }

    fn write_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        record: &[u8],
    ) -> Result<Pending, StoreError> {
        self.write(
            "INSERT INTO bk_group_sessions (room_id, session_id, sealed) VALUES ($1, $2, $3) \
             ON CONFLICT (room_id, session_id) DO UPDATE SET sealed = excluded.sealed",
            params![
                room_id.to_owned(),
                session_id.to_owned(),
                self.sealer
                    .seal(&layout::group_session(room_id, session_id), record)
            ],
        )
    }

    /// One transaction that holds the row while it compares (see
    /// `PgStore::replace_sealed`).
    fn replace_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        expected: Option<&[u8]>,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        self.replace_sealed(
            &GROUP_SESSIONS,
            &[room_id, session_id],
            layout::group_session(room_id, session_id),
            expected,
            Some(record),
        )
    }

    fn record_message_index(
        &self,
        room_id: &str,
        session_id: &str,
        index: u32,
        event_id: &str,
    ) -> Result<IndexUse, StoreError> {
        let inserted = self.engine.execute(
            "INSERT INTO bk_message_indexes (room_id, session_id, message_index, event_id) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            params![
                room_id.to_owned(),
                session_id.to_owned(),
                i64::from(index),
                event_id.to_owned()
            ],
        )?;
        if inserted == 1 {
            return Ok(IndexUse::First);
        }
        // Index records are never removed: the committed one is there.
        let rows = self.engine.query(
            "SELECT event_id FROM bk_message_indexes \
             WHERE room_id = $1 AND session_id = $2 AND message_index = $3",
            params![room_id.to_owned(), session_id.to_owned(), i64::from(index)],
        )?;
        let first: String = rows
            .first()
            .ok_or_else(|| corrupt("message index record"))?
            .try_get(0)
            .pg()?;
        Ok(if first == event_id {
            IndexUse::SameEvent
        } else {
            IndexUse::OtherEvent
        })
    }

    fn hold_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        match record {
            Some(record) => self.write(
                "INSERT INTO bk_held_events (room_id, session_id, event_id, sealed) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (room_id, session_id, event_id) DO UPDATE SET sealed = excluded.sealed",
                params![
                    room_id.to_owned(),
                    session_id.to_owned(),
                    event_id.to_owned(),
                    self.sealer.seal(
                        &layout::held_event(room_id, session_id, event_id),
                        record
                    )
                ],
            ),
            None => self.write(
                "DELETE FROM bk_held_events \
                 WHERE room_id = $1 AND session_id = $2 AND event_id = $3",
                params![
                    room_id.to_owned(),
                    session_id.to_owned(),
                    event_id.to_owned()
                ],
            ),
        }
    }

    /// One transaction that holds the row while it compares (see
    /// `PgStore::replace_sealed`).
    fn replace_held_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.replace_sealed(
            &HELD_EVENTS,
            &[room_id, session_id, event_id],
            layout::held_event(room_id, session_id, event_id),
            expected,
            record,
        )
    }

    /// Ordered by room, session and event id (bytewise), not by sled's
    /// length-prefixed key order.
    fn held_events(&self, session: Option<(&str, &str)>) -> Result<Vec<HeldEvent>, StoreError> {
        let rows = match session {
            Some((room, session)) => self.engine.query(
                "SELECT room_id, session_id, event_id, sealed FROM bk_held_events \
                 WHERE room_id = $1 AND session_id = $2 ORDER BY event_id",
                params![room.to_owned(), session.to_owned()],
            )?,
            None => self.engine.query(
                "SELECT room_id, session_id, event_id, sealed FROM bk_held_events \
                 ORDER BY room_id, session_id, event_id",
                Vec::new(),
            )?,
        };
        rows.iter()
            .map(|row| {
                let room_id: String = row.try_get(0).pg()?;
                let session_id: String = row.try_get(1).pg()?;
                let event_id: String = row.try_get(2).pg()?;
                let sealed: Vec<u8> = row.try_get(3).pg()?;
                let record = self
                    .sealer
                    .open(
                        &layout::held_event(&room_id, &session_id, &event_id),
                        &sealed,
                    )
                    .ok_or_else(|| corrupt("held event"))?;
                Ok(HeldEvent {
                    room_id,
                    session_id,
                    event_id,
                    record,
                })
            })
            .collect()
    }

    fn load_room_state(&self, room_id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(
            "SELECT sealed FROM bk_room_states WHERE room_id = $1",
            params![room_id.to_owned()],
            &layout::room_state(room_id),
            "room state record",
        )
    }

    fn write_room_state(
        &self,
        room_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        match record {
            Some(record) => self.write(
                "INSERT INTO bk_room_states (room_id, sealed) VALUES ($1, $2) \
                 ON CONFLICT (room_id) DO UPDATE SET sealed = excluded.sealed",
                params![
                    room_id.to_owned(),
                    self.sealer.seal(&layout::room_state(room_id), record)
                ],
            ),
            None => self.write(
                "DELETE FROM bk_room_states WHERE room_id = $1",
                params![room_id.to_owned()],
            ),
        }
    }

    /// One transaction that holds the row while it compares (see
    /// `PgStore::replace_sealed`).
    fn replace_room_state(
        &self,
        room_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.replace_sealed(
            &ROOM_STATES,
            &[room_id],
            layout::room_state(room_id),
            expected,
            record,
        )
    }

    fn room_state_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = self.engine.query(
            "SELECT room_id FROM bk_room_states ORDER BY room_id",
            Vec::new(),
        )?;
        rows.iter().map(|row| row.try_get(0).pg()).collect()
    }

    fn load_cross_signing(&self, user_id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_sealed(
            "SELECT sealed FROM bk_cross_signing WHERE user_id = $1",
            params![user_id.to_owned()],
            &layout::cross_signing(user_id),
            "cross-signing record",
        )
    }

    fn create_cross_signing(
        &self,
        user_id: &str,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        let inserted = self.engine.execute(
            "INSERT INTO bk_cross_signing (user_id, sealed) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO NOTHING",
            params![
                user_id.to_owned(),
                self.sealer.seal(&layout::cross_signing(user_id), record)
            ],
        )?;
        Ok((inserted == 1).then(Pending::ready))
    }

    fn sync(&self) -> Pending {
        // Every write but the appended keys committed synchronously before
        // it returned; the appends queued so far are committed (or failed,
        // as their own Pending says) when this resolves.
        self.engine.appender.barrier()
    }

    fn commit_stats(&self) -> CommitStats {
        self.engine.stats()
    }
}

/// Column arrays of sealed keys: order-preserving ids, publics, sealed.
fn split_keys(keys: Vec<(u64, [u8; 32], Vec<u8>)>) -> (Vec<i64>, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut ids = Vec::with_capacity(keys.len());
    let mut publics = Vec::with_capacity(keys.len());
    let mut sealed = Vec::with_capacity(keys.len());
    for (id, public, value) in keys {
        ids.push(ord(id));
        publics.push(public.to_vec());
        sealed.push(value);
    }
    (ids, publics, sealed)
}
