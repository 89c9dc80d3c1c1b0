//! What the bridge knows about its rooms: whether a room is encrypted
//! (and how often its Megolm session must rotate), who may read it
//! (`m.room.history_visibility`), and its members, kept durably.
//!
//! A puppet that encrypts into a room needs all three: never plaintext into
//! an encrypted room, the room key to every member who should read the
//! message, and a new session once someone left. Asking the homeserver on
//! every message costs a round trip per send; remembering in memory only
//! forgets after a restart (and a forgotten `m.room.encryption` would mean
//! a message sent in the clear). [`RoomStates`] keeps one sealed record per
//! room in the store (`w/<room id>`), updated:
//!
//! * **from transactions**, before the bridge's handler runs
//!   ([`crate::Appservice::with_room_states`]): every `m.room.encryption`,
//!   `m.room.member` and `m.room.history_visibility` state event is applied
//!   in order and durable before the handler sees the transaction (a retry
//!   of the transaction applies the same events again: idempotent);
//! * **from the homeserver's room state** ([`RoomStates::refresh`], as a
//!   puppet in the room), when a room is first seen or after a restart of
//!   a bridge whose store predates the record ([`RoomStates::ensure`]).
//!
//! **Encryption is one-way.** Once a room is known to be encrypted it stays
//! so (the spec forbids turning it off, and a state reset or a forged
//! event must not make a puppet send in the clear); a later
//! `m.room.encryption` only updates the rotation settings.
//!
//! **Bounded memory.** Records are read through an LRU cache of
//! [`RoomStates::new`]'s `cache_rooms` rooms; the rest stays on disk.
//!
//! **Several processes.** On a store that other processes share (not its
//! [sole writer](bridgekeys_store::Store::sole_writer): PostgreSQL), the
//! homeserver hands each transaction to one process, so the cache is not
//! trusted: each read fetches the record again (parsing it only if it
//! changed), and each write goes only over the record it was made from
//! ([`Store::replace_room_state`]), made again from a fresh read if another
//! process wrote in between. A refresh reads the record before it asks the
//! homeserver, so a change stored meanwhile is not overwritten by the older
//! snapshot. [`RoomStates::forget`] removes the record whatever it holds.

use std::{collections::BTreeMap, hash::BuildHasher, num::NonZeroUsize, sync::Arc};

use bridgekeys_olm::{MEGOLM_ALGORITHM, RotationSettings};
use bridgekeys_store::{Store, StoreError};
use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UserId,
    events::{
        AnyTimelineEvent,
        room::{history_visibility::HistoryVisibility, member::MembershipState},
    },
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{HomeserverClient, HomeserverError, txn_locks::KeyedLocks};

/// Default number of rooms whose state [`RoomStates`] keeps in memory.
pub const DEFAULT_CACHED_ROOMS: usize = 10_000;

/// Why room state could not be read or updated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoomStateError {
    /// The store failed (nothing was changed, or the write was not durable).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A stored record does not parse (written by a newer build, or damaged).
    #[error("the stored state of {room} does not parse")]
    Corrupt {
        /// The room.
        room: OwnedRoomId,
    },
    /// The homeserver could not be asked for the room's state.
    #[error("asking the homeserver for the room state: {0}")]
    Homeserver(#[from] HomeserverError),
    /// [`RoomStates::refresh`] needs a homeserver client
    /// ([`RoomStates::with_homeserver`]).
    #[error("no homeserver client to read the room state with")]
    NoHomeserver,
    /// Another process sharing the store changed the room's record between
    /// this one's read and write on every attempt ([`WRITE_ATTEMPTS`]);
    /// nothing was written. The transaction fails and the homeserver
    /// retries it.
    #[error("the state of {room} kept changing under us in another process")]
    Contended {
        /// The room.
        room: OwnedRoomId,
    },
}

/// How often a room's state is read, changed and written again when
/// another process sharing the store wrote it in between.
pub const WRITE_ATTEMPTS: usize = 16;

/// A room's `m.room.encryption`, as far as a puppet needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEncryption {
    /// The algorithm the room asks for (`m.megolm.v1.aes-sha2`; anything
    /// else still marks the room encrypted, and sending fails rather than
    /// going out in the clear).
    pub algorithm: String,
    /// `rotation_period_ms` (absent: one week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period_ms: Option<u64>,
    /// `rotation_period_msgs` (absent: 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period_msgs: Option<u64>,
}

impl RoomEncryption {
    /// From an `m.room.encryption` content; `None` without an algorithm.
    fn from_content(content: &serde_json::Value) -> Option<Self> {
        Some(Self {
            algorithm: content.get("algorithm")?.as_str()?.to_owned(),
            rotation_period_ms: content
                .get("rotation_period_ms")
                .and_then(serde_json::Value::as_u64),
            rotation_period_msgs: content
                .get("rotation_period_msgs")
                .and_then(serde_json::Value::as_u64),
        })
    }

    /// Whether the room uses the one algorithm puppets speak.
    pub fn is_megolm(&self) -> bool {
        self.algorithm == MEGOLM_ALGORITHM
    }

    /// The rotation settings for the room's outbound sessions.
    pub fn rotation(&self) -> RotationSettings {
        let mut content = serde_json::Map::new();
        if let Some(ms) = self.rotation_period_ms {
            content.insert("rotation_period_ms".into(), ms.into());
        }
        if let Some(msgs) = self.rotation_period_msgs {
            content.insert("rotation_period_msgs".into(), msgs.into());
        }
        RotationSettings::from_encryption_content(&serde_json::Value::Object(content))
    }
}

/// What the bridge knows about one room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomState {
    /// The room's encryption, once it has any (never removed again).
    #[serde(default)]
    pub encryption: Option<RoomEncryption>,
    /// `m.room.history_visibility` (absent: `shared`, the spec's default).
    #[serde(default)]
    pub history_visibility: Option<HistoryVisibility>,
    /// Every member whose membership the bridge saw, with it (`leave` and
    /// `ban` are dropped: a departed user is simply not a member).
    #[serde(default)]
    pub members: BTreeMap<OwnedUserId, MembershipState>,
    /// Whether the record was built from the homeserver's full room state
    /// (else only from the state events seen in transactions, which may
    /// miss what happened before the bridge was in the room).
    #[serde(default)]
    pub complete: bool,
}

impl RoomState {
    /// Whether the room is encrypted: nothing may be sent in it in the clear.
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// The joined members.
    pub fn joined(&self) -> impl Iterator<Item = &UserId> {
        self.members
            .iter()
            .filter(|(_, m)| **m == MembershipState::Join)
            .map(|(u, _)| u.as_ref())
    }

    /// Whose devices get the room's session key: every joined member, and
    /// invited members too unless the history is visible to joined members
    /// only (they will read what is sent now once they join).
    pub fn recipients(&self) -> Vec<OwnedUserId> {
        let with_invited = !matches!(self.history_visibility, Some(HistoryVisibility::Joined));
        self.members
            .iter()
            .filter(|(_, m)| {
                **m == MembershipState::Join || (with_invited && **m == MembershipState::Invite)
            })
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Apply one state event (`event_type`, `state_key`, `content`); whether
    /// anything changed.
    fn apply(&mut self, event_type: &str, state_key: &str, content: &serde_json::Value) -> bool {
        match event_type {
            "m.room.encryption" if state_key.is_empty() => {
                // Never back to unencrypted: a content without an
                // algorithm changes nothing.
                match RoomEncryption::from_content(content) {
                    Some(encryption) if self.encryption.as_ref() != Some(&encryption) => {
                        self.encryption = Some(encryption);
                        true
                    }
                    _ => false,
                }
            }
            "m.room.history_visibility" if state_key.is_empty() => {
                let Some(visibility) = content
                    .get("history_visibility")
                    .and_then(|v| v.as_str())
                    .map(HistoryVisibility::from)
                else {
                    return false;
                };
                let changed = self.history_visibility.as_ref() != Some(&visibility);
                self.history_visibility = Some(visibility);
                changed
            }
            "m.room.member" => {
                let Ok(user) = UserId::parse(state_key) else {
                    return false;
                };
                let Some(membership) = content
                    .get("membership")
                    .and_then(|m| m.as_str())
                    .map(MembershipState::from)
                else {
                    return false;
                };
                if matches!(membership, MembershipState::Leave | MembershipState::Ban) {
                    self.members.remove(&user).is_some()
                } else {
                    self.members.insert(user, membership.clone()) != Some(membership)
                }
            }
            _ => false,
        }
    }
}

/// The fields of a room event this module reads.
#[derive(Deserialize)]
struct StateEvent<'a> {
    #[serde(rename = "type")]
    event_type: String,
    room_id: Option<OwnedRoomId>,
    state_key: Option<String>,
    /// Left raw: only the few tracked state events are parsed further (a
    /// transaction is mostly messages, whose content this never needs).
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

impl StateEvent<'_> {
    /// The content, parsed (`null` when absent or not JSON).
    fn content(&self) -> serde_json::Value {
        self.content
            .and_then(|c| serde_json::from_str(c.get()).ok())
            .unwrap_or_default()
    }
}

fn is_tracked(event_type: &str) -> bool {
    matches!(
        event_type,
        "m.room.encryption" | "m.room.member" | "m.room.history_visibility"
    )
}

/// The durable room-state tracker (see the module docs).
pub struct RoomStates {
    store: Arc<dyn Store>,
    client: Option<HomeserverClient>,
    cache: parking_lot::Mutex<lru::LruCache<OwnedRoomId, Cached>>,
    /// Keys of the records' hashes (random per process, so no record can
    /// be made to collide with another on purpose).
    hashes: std::hash::RandomState,
    /// One writer per room at a time in this process (transactions and
    /// refreshes); other processes are kept apart by the store's
    /// compare-and-write.
    locks: KeyedLocks,
}

impl std::fmt::Debug for RoomStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomStates")
            .field("cached", &self.cache.lock().len())
            .finish_non_exhaustive()
    }
}

/// A room's record as read from the store, and its state.
type Read = (zeroize::Zeroizing<Vec<u8>>, Arc<RoomState>);

/// A room's state in memory. On a store that other processes share, with a
/// keyed hash of the record it was read from: each use reads the record
/// again, and only a record that changed is parsed again.
struct Cached {
    state: Arc<RoomState>,
    record: Option<u64>,
}

impl RoomStates {
    /// A tracker over `store` (the bridge's store), keeping at most
    /// `cache_rooms` rooms in memory ([`DEFAULT_CACHED_ROOMS`] is a good
    /// start).
    pub fn new(store: Arc<dyn Store>, cache_rooms: NonZeroUsize) -> Self {
        Self {
            store,
            client: None,
            cache: parking_lot::Mutex::new(lru::LruCache::new(cache_rooms)),
            hashes: std::hash::RandomState::new(),
            locks: KeyedLocks::default(),
        }
    }

    /// Read rooms' full state from the homeserver with `client`
    /// ([`RoomStates::refresh`]).
    pub fn with_homeserver(mut self, client: HomeserverClient) -> Self {
        self.client = Some(client);
        self
    }

    /// What is known about `room`, or `None` if nothing is.
    ///
    /// On a store that other processes share (not its [sole
    /// writer](Store::sole_writer): PostgreSQL), the record is read again
    /// every time: another process may have applied a member's join or the
    /// room turning encrypted, and a copy kept here would send in the clear
    /// or share the room key with the wrong members. Only a record that
    /// changed is parsed again.
    pub fn get(&self, room: &RoomId) -> Result<Option<Arc<RoomState>>, RoomStateError> {
        if self.store.sole_writer()
            && let Some(cached) = self.cache.lock().get(room)
        {
            return Ok(Some(Arc::clone(&cached.state)));
        }
        Ok(self.read(room)?.map(|(_, state)| state))
    }

    /// `room`'s record from the store and its state (parsed, or the cached
    /// parse of the same record).
    fn read(&self, room: &RoomId) -> Result<Option<Read>, RoomStateError> {
        let Some(record) = self.store.load_room_state(room.as_str())? else {
            self.cache.lock().pop(room);
            return Ok(None);
        };
        if let Some(cached) = self.cache.lock().get(room)
            && cached.record == Some(self.hashes.hash_one(record.as_slice()))
        {
            return Ok(Some((record, Arc::clone(&cached.state))));
        }
        let state: RoomState =
            serde_json::from_slice(&record).map_err(|_| RoomStateError::Corrupt {
                room: room.to_owned(),
            })?;
        let state = Arc::new(state);
        self.remember(room, &state, &record);
        Ok(Some((record, state)))
    }

    /// Cache `state`, with its record's hash where other processes share
    /// the store.
    fn remember(&self, room: &RoomId, state: &Arc<RoomState>, record: &[u8]) {
        let record = (!self.store.sole_writer()).then(|| self.hashes.hash_one(record));
        self.cache.lock().put(
            room.to_owned(),
            Cached {
                state: Arc::clone(state),
                record,
            },
        );
    }

    /// How many rooms are in memory now (at most `cache_rooms`).
    pub fn cached_rooms(&self) -> usize {
        self.cache.lock().len()
    }

    /// The rooms with a record.
    pub fn rooms(&self) -> Result<Vec<OwnedRoomId>, RoomStateError> {
        Ok(self
            .store
            .room_state_ids()?
            .into_iter()
            .filter_map(|id| OwnedRoomId::try_from(id).ok())
            .collect())
    }

    /// Apply the state events among `events` (room events of a
    /// transaction, in order), durably. Returns how many changed a record.
    pub async fn apply_events(
        &self,
        events: &[Raw<AnyTimelineEvent>],
    ) -> Result<usize, RoomStateError> {
        // Group by room, keeping each room's order.
        let mut by_room: BTreeMap<OwnedRoomId, Vec<StateEvent<'_>>> = BTreeMap::new();
        for raw in events {
            let Ok(event) = serde_json::from_str::<StateEvent>(raw.json().get()) else {
                continue;
            };
            if event.state_key.is_none() || !is_tracked(&event.event_type) {
                continue;
            }
            let Some(room) = event.room_id.clone() else {
                continue;
            };
            by_room.entry(room).or_default().push(event);
        }
        let mut changed = 0;
        for (room, events) in by_room {
            let (_guard, _) = self.locks.lock(room.as_str(), || {}).await;
            let (count, _) = self
                .update(&room, |current| {
                    let mut state = current.cloned().unwrap_or_default();
                    let mut count = 0;
                    for event in &events {
                        if state.apply(
                            &event.event_type,
                            event.state_key.as_deref().unwrap_or_default(),
                            &event.content(),
                        ) {
                            count += 1;
                        }
                    }
                    (count, (count > 0).then_some(state))
                })
                .await?;
            changed += count;
        }
        Ok(changed)
    }

    /// Read `room`'s full state from the homeserver as `as_user` (a puppet
    /// in the room) and store it, replacing what was known. The room's
    /// encryption is kept even if the answer lacks it (one-way).
    pub async fn refresh(
        &self,
        room: &RoomId,
        as_user: &UserId,
    ) -> Result<Arc<RoomState>, RoomStateError> {
        let client = self.client.as_ref().ok_or(RoomStateError::NoHomeserver)?;
        // Held across the request, so a transaction's state event for this
        // room (in this process) is applied after the snapshot, not lost
        // under it.
        let (_guard, _) = self.locks.lock(room.as_str(), || {}).await;
        for attempt in 1..=WRITE_ATTEMPTS {
            // Read before asking: the snapshot is written only over this
            // record, so a change another process stores meanwhile (a
            // member who left) makes the write fail and the homeserver is
            // asked again, instead of the older snapshot undoing it.
            let before = if self.store.sole_writer() {
                self.get(room)?.map(|state| (None, state))
            } else {
                self.read(room)?
                    .map(|(record, state)| (Some(record), state))
            };
            let events = client.room_state(room, as_user).await?;
            let mut state = RoomState {
                encryption: before.as_ref().and_then(|(_, p)| p.encryption.clone()),
                complete: true,
                ..RoomState::default()
            };
            for raw in &events {
                let Ok(event) = serde_json::from_str::<StateEvent>(raw.get()) else {
                    continue;
                };
                if let Some(key) = event.state_key.as_deref() {
                    state.apply(&event.event_type, key, &event.content());
                }
            }
            let expected = before
                .as_ref()
                .and_then(|(record, _)| record.as_deref())
                .map(Vec::as_slice);
            if let Some(stored) = self.store_state(room, expected, state).await? {
                return Ok(stored);
            }
            tracing::debug!(%room, attempt, "another process changed the room's state during a refresh: asking again");
        }
        Err(RoomStateError::Contended {
            room: room.to_owned(),
        })
    }

    /// What is known about `room`, read from the homeserver as `as_user`
    /// first if the record is missing or was not built from the full state.
    /// Without a homeserver client ([`RoomStates::with_homeserver`]) a
    /// record built from transactions is all there is, and is returned.
    pub async fn ensure(
        &self,
        room: &RoomId,
        as_user: &UserId,
    ) -> Result<Arc<RoomState>, RoomStateError> {
        match self.get(room)? {
            Some(state) if state.complete || self.client.is_none() => Ok(state),
            _ => self.refresh(room, as_user).await,
        }
    }

    /// Forget everything about `room` (the bridge left it for good).
    pub async fn forget(&self, room: &RoomId) -> Result<(), RoomStateError> {
        let (_guard, _) = self.locks.lock(room.as_str(), || {}).await;
        self.store
            .write_room_state(room.as_str(), None)?
            .durable()
            .await?;
        self.cache.lock().pop(room);
        Ok(())
    }

    /// Read `room`'s state, let `change` compute the new one from it
    /// (`None`: nothing to write), and store it durably, then cache it.
    /// Returns `change`'s answer and the state now stored.
    ///
    /// On a store that other processes share, the new record is written
    /// only over the one read; if another process wrote in between, the
    /// state is read and changed again, up to [`WRITE_ATTEMPTS`] times, so
    /// neither write is lost. On a sole writer the room's lock (held by the
    /// caller) covers every writer.
    async fn update<T>(
        &self,
        room: &RoomId,
        change: impl Fn(Option<&RoomState>) -> (T, Option<RoomState>),
    ) -> Result<(T, Option<Arc<RoomState>>), RoomStateError> {
        for attempt in 1..=WRITE_ATTEMPTS {
            let (record, current) = if self.store.sole_writer() {
                (None, self.get(room)?)
            } else {
                match self.read(room)? {
                    Some((record, state)) => (Some(record), Some(state)),
                    None => (None, None),
                }
            };
            let (out, new) = change(current.as_deref());
            let Some(new) = new else {
                return Ok((out, current));
            };
            if let Some(stored) = self
                .store_state(room, record.as_deref().map(|r| r.as_slice()), new)
                .await?
            {
                return Ok((out, Some(stored)));
            }
            tracing::debug!(%room, attempt, "another process changed the room's state: reading it again");
        }
        Err(RoomStateError::Contended {
            room: room.to_owned(),
        })
    }

    /// Store `state` for `room` durably, then cache it. On a store that
    /// other processes share, only over the record `expected` (`None`: no
    /// record), answering `None` (nothing written) if it changed since; on
    /// a sole writer, whatever is stored (the caller holds the room's
    /// lock).
    async fn store_state(
        &self,
        room: &RoomId,
        expected: Option<&[u8]>,
        state: RoomState,
    ) -> Result<Option<Arc<RoomState>>, RoomStateError> {
        let record = serde_json::to_vec(&state).map_err(|_| RoomStateError::Corrupt {
            room: room.to_owned(),
        })?;
        // The cache entry goes first: if the write fails, the next read
        // comes from the store (unchanged) instead of a state never stored.
        self.cache.lock().pop(room);
        let pending = if self.store.sole_writer() {
            self.store.write_room_state(room.as_str(), Some(&record))?
        } else {
            match self
                .store
                .replace_room_state(room.as_str(), expected, Some(&record))?
            {
                Some(pending) => pending,
                None => return Ok(None),
            }
        };
        pending.durable().await?;
        let state = Arc::new(state);
        self.remember(room, &state, &record);
        Ok(Some(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encryption_is_one_way_and_settings_update() {
        let mut state = RoomState::default();
        assert!(state.apply(
            "m.room.encryption",
            "",
            &json!({"algorithm": MEGOLM_ALGORITHM, "rotation_period_msgs": 5})
        ));
        assert_eq!(
            state.encryption.as_ref().map(|e| e.rotation().period_msgs),
            Some(5)
        );
        // A content without an algorithm (a redacted or forged event) does
        // not turn encryption off.
        assert!(!state.apply("m.room.encryption", "", &json!({})));
        assert!(state.is_encrypted());
        assert!(state.apply(
            "m.room.encryption",
            "",
            &json!({"algorithm": MEGOLM_ALGORITHM})
        ));
        assert_eq!(
            state.encryption.as_ref().map(RoomEncryption::rotation),
            Some(RotationSettings::default())
        );
        // A non-empty state key is not the room's encryption.
        let mut other = RoomState::default();
        assert!(!other.apply("m.room.encryption", "x", &json!({"algorithm": "a"})));
        assert!(!other.is_encrypted());
    }

    #[test]
    fn recipients_follow_membership_and_history_visibility() {
        let mut state = RoomState::default();
        state.apply("m.room.member", "@a:hs", &json!({"membership": "join"}));
        state.apply("m.room.member", "@b:hs", &json!({"membership": "invite"}));
        state.apply("m.room.member", "@c:hs", &json!({"membership": "join"}));
        assert!(state.apply("m.room.member", "@c:hs", &json!({"membership": "leave"})));
        state.apply(
            "m.room.member",
            "not a user",
            &json!({"membership": "join"}),
        );
        let names = |s: &RoomState| {
            s.recipients()
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&state), ["@a:hs", "@b:hs"]);
        state.apply(
            "m.room.history_visibility",
            "",
            &json!({"history_visibility": "joined"}),
        );
        assert_eq!(names(&state), ["@a:hs"]);
        assert_eq!(state.joined().count(), 1);
    }
}
