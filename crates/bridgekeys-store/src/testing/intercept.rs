//! [`Intercepted`]: a backend wrapped so a test can act, or fail, right
//! before a write reaches it.
//!
//! Tests of the crates built on the store need that often: hold a claim in
//! flight, make another "process" act between this one's load and its
//! write, or make the disk fail for one kind of write. Every such wrapper
//! would otherwise repeat the whole trait, and every change to the trait
//! would have to be made in each.

use std::sync::{Arc, Mutex};

use crate::{
    AccountRecord, Backend, CommitStats, DeviceKey, DeviceWrite, OneTimeKeyRecord, Pending,
    PuppetRegistry, Store, StoreError, TransactionClaim, TransactionLog,
};

/// A write about to reach the wrapped backend: what the hook is shown.
#[derive(Debug)]
#[non_exhaustive]
pub enum Write<'a> {
    /// [`Store::write_device`] of this device.
    Device(&'a DeviceKey),
    /// [`Store::append_keys`] of this device (a claim).
    AppendKeys(&'a DeviceKey),
    /// [`Store::write_sessions`] of this device.
    Sessions(&'a DeviceKey),
    /// [`Store::write_outbound_group_session`] of this device, in this room.
    OutboundGroupSession(&'a DeviceKey, &'a str),
    /// [`TransactionLog::record_transaction`]: namespace, transaction id.
    Transaction(&'a str, &'a str),
    /// [`Store::write_tracked_user`] or [`Store::replace_tracked_user`] of
    /// this user.
    TrackedUser(&'a str),
    /// [`Store::write_room_state`] or [`Store::replace_room_state`] of this
    /// room.
    RoomState(&'a str),
    /// [`Store::write_group_session`] or [`Store::replace_group_session`]:
    /// room, session id.
    GroupSession(&'a str, &'a str),
    /// [`Store::hold_event`] or [`Store::replace_held_event`]: room,
    /// session id, event id.
    HeldEvent(&'a str, &'a str, &'a str),
}

/// What runs before each [`Write`]: an error stops the write (nothing
/// reaches the backend) and is the call's answer.
type Hook = Arc<dyn Fn(&Write<'_>) -> Result<(), StoreError> + Send + Sync>;

/// A [`Backend`] that passes every call to the one it wraps, after running
/// the test's hook on each [`Write`]. Reads and other writes pass
/// untouched.
pub struct Intercepted {
    inner: Arc<dyn Backend>,
    hook: Mutex<Option<Hook>>,
    /// What [`Store::sole_writer`] answers instead of the wrapped backend.
    sole_writer: Option<bool>,
}

impl std::fmt::Debug for Intercepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercepted")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Intercepted {
    /// Wrap `inner`, with no hook yet.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Self {
            inner,
            hook: Mutex::new(None),
            sole_writer: None,
        }
    }

    /// Answer [`Store::sole_writer`] with `sole` instead of asking the
    /// wrapped backend: for a test that opens a shared backend (PostgreSQL)
    /// from one process only and needs the manager to rely on its own
    /// count of outstanding keys and its cached devices, as it does on
    /// sled (with `true` it neither counts nor reads a device again).
    #[must_use]
    pub fn with_sole_writer(mut self, sole: bool) -> Self {
        self.sole_writer = Some(sole);
        self
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// Run `hook` before every [`Write`] from now on (replacing any
    /// earlier hook). It runs on the writer's thread, outside any lock of
    /// this wrapper, so it may block or call the store itself.
    pub fn intercept(
        &self,
        hook: impl Fn(&Write<'_>) -> Result<(), StoreError> + Send + Sync + 'static,
    ) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(hook));
    }

    /// Stop intercepting.
    pub fn clear(&self) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn before(&self, write: &Write<'_>) -> Result<(), StoreError> {
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match hook {
            Some(hook) => hook(write),
            None => Ok(()),
        }
    }
}

impl Store for Intercepted {
    fn load_account(&self, device: &DeviceKey) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.load_account(device)
    }
    fn account_version(&self, device: &DeviceKey) -> Result<Option<crate::Version>, StoreError> {
        self.inner.account_version(device)
    }
    fn write_device(
        &self,
        device: &DeviceKey,
        expected: Option<crate::Version>,
        write: DeviceWrite,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::Device(device))?;
        self.inner.write_device(device, expected, write)
    }
    fn append_keys(
        &self,
        device: &DeviceKey,
        append: crate::KeyAppend,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::AppendKeys(device))?;
        self.inner.append_keys(device, append)
    }
    fn reserve_key_ids(&self, count: u64) -> Result<u64, StoreError> {
        self.inner.reserve_key_ids(count)
    }
    fn one_time_key(
        &self,
        device: &DeviceKey,
        public_key: &[u8; 32],
    ) -> Result<Option<OneTimeKeyRecord>, StoreError> {
        self.inner.one_time_key(device, public_key)
    }
    fn oldest_one_time_keys(
        &self,
        device: &DeviceKey,
        limit: usize,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        self.inner.oldest_one_time_keys(device, limit)
    }
    fn count_one_time_keys(&self, device: &DeviceKey) -> Result<usize, StoreError> {
        self.inner.count_one_time_keys(device)
    }
    fn load_account_counted(
        &self,
        device: &DeviceKey,
    ) -> Result<Option<(AccountRecord, usize)>, StoreError> {
        self.inner.load_account_counted(device)
    }
    fn load_account_counted_later(
        &self,
        device: &DeviceKey,
    ) -> crate::Fetch<Option<(AccountRecord, usize)>> {
        self.inner.load_account_counted_later(device)
    }
    fn load_account_later(&self, device: &DeviceKey) -> crate::Fetch<Option<AccountRecord>> {
        self.inner.load_account_later(device)
    }
    fn load_session(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
        session_id: &str,
    ) -> Result<Option<crate::SessionRecord>, StoreError> {
        self.inner.load_session(device, peer_key, session_id)
    }
    fn sessions(
        &self,
        device: &DeviceKey,
        peer_key: &[u8; 32],
    ) -> Result<Vec<crate::SessionRecord>, StoreError> {
        self.inner.sessions(device, peer_key)
    }
    fn session_stamps(&self, device: &DeviceKey) -> Result<Vec<crate::SessionStamp>, StoreError> {
        self.inner.session_stamps(device)
    }
    fn legacy_sessions(&self, device: &DeviceKey) -> Result<Vec<crate::LegacySession>, StoreError> {
        self.inner.legacy_sessions(device)
    }
    fn write_sessions(
        &self,
        device: &DeviceKey,
        write: crate::SessionWrite,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::Sessions(device))?;
        self.inner.write_sessions(device, write)
    }
    fn load_tracked_user(
        &self,
        user_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.load_tracked_user(user_id)
    }
    fn write_tracked_user(
        &self,
        user_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::TrackedUser(user_id))?;
        self.inner.write_tracked_user(user_id, record)
    }
    fn replace_tracked_user(
        &self,
        user_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.before(&Write::TrackedUser(user_id))?;
        self.inner.replace_tracked_user(user_id, expected, record)
    }
    fn load_delivery(
        &self,
        device: &DeviceKey,
        tag: &str,
        message: &[u8],
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.load_delivery(device, tag, message)
    }
    fn forget_deliveries(&self, tag: &str) -> Result<Pending, StoreError> {
        self.inner.forget_deliveries(tag)
    }
    fn load_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
    ) -> Result<Option<crate::OutboundSessionRecord>, StoreError> {
        self.inner.load_outbound_group_session(device, room_id)
    }
    fn write_outbound_group_session(
        &self,
        device: &DeviceKey,
        room_id: &str,
        expected: Option<crate::Version>,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::OutboundGroupSession(device, room_id))?;
        self.inner
            .write_outbound_group_session(device, room_id, expected, record)
    }
    fn load_group_session(
        &self,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.load_group_session(room_id, session_id)
    }
    fn write_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        record: &[u8],
    ) -> Result<Pending, StoreError> {
        self.before(&Write::GroupSession(room_id, session_id))?;
        self.inner.write_group_session(room_id, session_id, record)
    }
    fn replace_group_session(
        &self,
        room_id: &str,
        session_id: &str,
        expected: Option<&[u8]>,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        self.before(&Write::GroupSession(room_id, session_id))?;
        self.inner
            .replace_group_session(room_id, session_id, expected, record)
    }
    fn record_message_index(
        &self,
        room_id: &str,
        session_id: &str,
        index: u32,
        event_id: &str,
    ) -> Result<crate::IndexUse, StoreError> {
        self.inner
            .record_message_index(room_id, session_id, index, event_id)
    }
    fn hold_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::HeldEvent(room_id, session_id, event_id))?;
        self.inner.hold_event(room_id, session_id, event_id, record)
    }
    fn replace_held_event(
        &self,
        room_id: &str,
        session_id: &str,
        event_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.before(&Write::HeldEvent(room_id, session_id, event_id))?;
        self.inner
            .replace_held_event(room_id, session_id, event_id, expected, record)
    }
    fn held_events(
        &self,
        session: Option<(&str, &str)>,
    ) -> Result<Vec<crate::HeldEvent>, StoreError> {
        self.inner.held_events(session)
    }
    fn load_room_state(
        &self,
        room_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.load_room_state(room_id)
    }
    fn write_room_state(
        &self,
        room_id: &str,
        record: Option<&[u8]>,
    ) -> Result<Pending, StoreError> {
        self.before(&Write::RoomState(room_id))?;
        self.inner.write_room_state(room_id, record)
    }
    fn replace_room_state(
        &self,
        room_id: &str,
        expected: Option<&[u8]>,
        record: Option<&[u8]>,
    ) -> Result<Option<Pending>, StoreError> {
        self.before(&Write::RoomState(room_id))?;
        self.inner.replace_room_state(room_id, expected, record)
    }
    fn room_state_ids(&self) -> Result<Vec<String>, StoreError> {
        self.inner.room_state_ids()
    }
    fn load_cross_signing(
        &self,
        user_id: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.load_cross_signing(user_id)
    }
    fn create_cross_signing(
        &self,
        user_id: &str,
        record: &[u8],
    ) -> Result<Option<Pending>, StoreError> {
        self.inner.create_cross_signing(user_id, record)
    }
    fn sync(&self) -> Pending {
        self.inner.sync()
    }
    fn commit_stats(&self) -> CommitStats {
        self.inner.commit_stats()
    }
    fn sole_writer(&self) -> bool {
        self.sole_writer.unwrap_or_else(|| self.inner.sole_writer())
    }
}

impl TransactionLog for Intercepted {
    fn transaction_completed(&self, namespace: &str, txn_id: &str) -> Result<bool, StoreError> {
        self.inner.transaction_completed(namespace, txn_id)
    }
    fn record_transaction(&self, namespace: &str, txn_id: &str) -> Result<Pending, StoreError> {
        self.before(&Write::Transaction(namespace, txn_id))?;
        self.inner.record_transaction(namespace, txn_id)
    }
    fn prune_transactions(&self, before: u64) -> Result<(usize, Pending), StoreError> {
        self.inner.prune_transactions(before)
    }
    fn claim_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<TransactionClaim, StoreError> {
        self.inner
            .claim_transaction(namespace, txn_id, owner, lease_ms)
    }
    fn release_transaction(
        &self,
        namespace: &str,
        txn_id: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.inner.release_transaction(namespace, txn_id, owner)
    }
}

impl PuppetRegistry for Intercepted {
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        self.inner.record_puppet(device)
    }
    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        self.inner.contains_puppet(device)
    }
    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError> {
        self.inner.puppets()
    }
    fn record_cross_signed(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        self.inner.record_cross_signed(device)
    }
    fn is_cross_signed(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        self.inner.is_cross_signed(device)
    }
    fn schedule_rotation(
        &self,
        device: &DeviceKey,
        due_ms: u64,
        found_at: Option<u64>,
    ) -> Result<Pending, StoreError> {
        self.inner.schedule_rotation(device, due_ms, found_at)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{KeyAppend, testing::MemoryStore};

    #[tokio::test]
    async fn a_hook_sees_each_write_and_its_error_keeps_the_write_from_the_backend() {
        let store = Intercepted::new(Arc::new(MemoryStore::new()));
        let dev = DeviceKey::new("@a:x", "D");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        store.intercept(move |write| {
            log.lock().unwrap().push(format!("{write:?}"));
            match write {
                Write::AppendKeys(_) => Err(StoreError::engine("refused by the test")),
                _ => Ok(()),
            }
        });
        let account = DeviceWrite {
            account: zeroize::Zeroizing::new(b"a".to_vec()),
            ..DeviceWrite::default()
        };
        store
            .write_device(&dev, None, account)
            .unwrap()
            .durable()
            .await
            .unwrap();
        let key = OneTimeKeyRecord {
            key_id: store.reserve_key_ids(1).unwrap(),
            public_key: [1; 32],
            secret_key: zeroize::Zeroizing::new([2; 32]),
        };
        let append = KeyAppend {
            add_keys: vec![key],
            evict_keys: Vec::new(),
        };
        assert!(store.append_keys(&dev, append).is_err());
        assert_eq!(store.inner().count_one_time_keys(&dev).unwrap(), 0);
        assert!(store.inner().load_account(&dev).unwrap().is_some());
        assert_eq!(seen.lock().unwrap().len(), 2);
        store.clear();
        assert!(
            store
                .append_keys(&dev, KeyAppend::default())
                .unwrap()
                .durable()
                .await
                .is_ok()
        );
        assert_eq!(seen.lock().unwrap().len(), 2, "no hook after clear");
    }
}
