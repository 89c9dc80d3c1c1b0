//! The puppet registry: which puppet devices the bridge has provisioned on
//! the homeserver.
//!
//! The fallback key rotation task walks this list (the homeserver knows
//! these devices, so their keys can be uploaded), and it survives restarts
//! so rotation resumes where it was. On sled (schema 4) a device's entry
//! is the header of its account record (`a/<device>`: a flag byte saying
//! provisioned, and cross-signed once the device is signed by its user's
//! published cross-signing identity, then, once the device is scheduled,
//! the due time of its next rotation step), so an idle provisioned device
//! is one entry in the tree. A device recorded before it has an account
//! (the trait allows it) gets an `r/<device>` record instead, whose value
//! is empty, or one flag byte (cross-signed) followed by the due time, and
//! which its account takes over when it is created.
//!
//! The schedule is an index, `n/<due><device>`, so a rotation pass reads
//! only the devices that are due ([`PuppetRegistry::due_rotations`]) instead
//! of every device: with a million idle puppets, a pass every few minutes
//! would otherwise read a million records each time. User and device ids
//! and times are public data: nothing here is sealed.

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::{
    DeviceKey, Pending, SledStore, StoreError,
    layout::{self, PuppetHeader},
};

/// The durable list of provisioned puppet devices.
pub trait PuppetRegistry: Send + Sync + 'static {
    /// Record `device` as provisioned. Applied when this returns; await
    /// [`Pending::durable`] before relying on it. Recording twice is harmless.
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError>;

    /// Whether `device` was recorded (one point read, for the hot check of
    /// "provisioned already?").
    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError>;

    /// Every recorded device, in a stable order.
    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError>;

    /// Record that `device` (already recorded) is signed by its user's
    /// cross-signing keys on the homeserver, keys and signature uploaded.
    fn record_cross_signed(&self, device: &DeviceKey) -> Result<Pending, StoreError>;

    /// Whether [`PuppetRegistry::record_cross_signed`] was recorded for
    /// `device` (puppets provisioned before cross-signing are not, and
    /// are signed at their next use).
    fn is_cross_signed(&self, device: &DeviceKey) -> Result<bool, StoreError>;

    /// Schedule the next rotation step of `device` (recorded) at `due_ms`,
    /// replacing its earlier schedule and, when given, the entry `found_at`
    /// it was found under by [`PuppetRegistry::due_rotations`]. A device not
    /// recorded is left alone. A device already scheduled at `due_ms` should
    /// not be written again: a full pass reschedules every idle device at
    /// the time it has (sled skips a write of an identical value itself;
    /// PostgreSQL's update is conditional). Applied when this returns;
    /// await [`Pending::durable`] before relying on it.
    fn schedule_rotation(
        &self,
        device: &DeviceKey,
        due_ms: u64,
        found_at: Option<u64>,
    ) -> Result<Pending, StoreError>;

    /// The devices whose next rotation step is due at `now_ms` (scheduled at
    /// or before it), earliest first, each with the time it was scheduled
    /// at, at most `limit` of them, starting strictly after the entry
    /// `after` (a cursor: the last entry of the previous batch). Devices
    /// never scheduled are not listed: a full pass over
    /// [`PuppetRegistry::puppets`] schedules them.
    fn due_rotations(
        &self,
        now_ms: u64,
        after: Option<&(DeviceKey, u64)>,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError>;
}

/// The flag byte of a cross-signed puppet device in an `r/` record.
const CROSS_SIGNED: u8 = 1;

/// The `r/` value standing for `header` (a device without an account).
fn registry_value(header: PuppetHeader) -> Vec<u8> {
    let flag = u8::from(header.flags & layout::CROSS_SIGNED != 0) * CROSS_SIGNED;
    match header.due {
        None if flag == 0 => Vec::new(),
        None => vec![flag],
        Some(due) => {
            let mut v = Vec::with_capacity(9);
            v.push(flag);
            v.extend_from_slice(&due.to_be_bytes());
            v
        }
    }
}

/// Where a device's registry entry lives: in its account's header, or in
/// an `r/` record for a device without an account.
enum Entry {
    /// The account record (raw) and its header.
    Account(sled::IVec, PuppetHeader),
    /// An `r/` record's header (`None`: none).
    Registry(Option<PuppetHeader>),
}

impl Entry {
    /// The device's registry header, if it is recorded.
    fn recorded(&self) -> Option<PuppetHeader> {
        match self {
            Entry::Account(_, h) if h.flags & layout::PUPPET != 0 => Some(*h),
            Entry::Account(..) => None,
            Entry::Registry(h) => *h,
        }
    }
}

/// Move a recorded device's `n/` schedule entry to `due_ms`: the entry its
/// `header` names and the one it was `found_at` (if other) go, the new one
/// is inserted, and the header says `due_ms` (the caller stores it). Shared
/// by `schedule_rotation` and an account write carrying a puppet mark
/// (`SledStore::write_device`), so both keep the index the same way.
pub(crate) fn reschedule(
    tx: &TransactionalTree,
    device: &DeviceKey,
    header: &mut PuppetHeader,
    due_ms: u64,
    found_at: Option<u64>,
) -> Result<(), UnabortableTransactionError> {
    for old in [header.due, found_at].into_iter().flatten() {
        if old != due_ms {
            tx.remove(layout::rotation(old, device))?;
        }
    }
    tx.insert(layout::rotation(due_ms, device), &[][..])?;
    header.due = Some(due_ms);
    Ok(())
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

/// In a transaction: read a device's registry entry.
fn read_entry(
    tx: &TransactionalTree,
    device: &DeviceKey,
) -> Result<Entry, ConflictableTransactionError<StoreError>> {
    if let Some(raw) = tx.get(layout::account(device))? {
        let (header, _, _) = layout::parse_account(&raw).ok_or_else(|| {
            abort(StoreError::Corrupt {
                what: "account record header".into(),
            })
        })?;
        return Ok(Entry::Account(raw, header));
    }
    Ok(Entry::Registry(
        tx.get(layout::puppet(device))?
            .map(|v| PuppetHeader::from_registry_value(&v)),
    ))
}

/// In a transaction: store a device's registry header where its entry
/// lives.
fn write_entry(
    tx: &TransactionalTree,
    device: &DeviceKey,
    entry: &Entry,
    header: PuppetHeader,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    match entry {
        Entry::Account(raw, _) => {
            let updated = layout::with_header(raw, header).ok_or_else(|| {
                abort(StoreError::Corrupt {
                    what: "account record header".into(),
                })
            })?;
            tx.insert(layout::account(device), updated)?;
        }
        Entry::Registry(_) => {
            tx.insert(layout::puppet(device), registry_value(header))?;
        }
    }
    Ok(())
}

impl SledStore {
    /// Run `f` in a transaction on the tree, mapping sled's errors.
    fn registry_transaction<T>(
        &self,
        f: impl Fn(&TransactionalTree) -> Result<T, ConflictableTransactionError<StoreError>>,
    ) -> Result<T, StoreError> {
        match self.db.transaction(f) {
            Ok(v) => Ok(v),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// A device's registry header, if recorded (one read for a device
    /// with an account record, two for one without).
    fn registry_header(&self, device: &DeviceKey) -> Result<Option<PuppetHeader>, StoreError> {
        if let Some(raw) = self.db.get(layout::account(device))? {
            let (header, _, _) =
                layout::parse_account(&raw).ok_or_else(|| StoreError::Corrupt {
                    what: "account record header".into(),
                })?;
            if header.flags & layout::PUPPET != 0 {
                return Ok(Some(header));
            }
        }
        Ok(self
            .db
            .get(layout::puppet(device))?
            .map(|v| PuppetHeader::from_registry_value(&v)))
    }
}

impl PuppetRegistry for SledStore {
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        // Only if not recorded yet: recording again keeps the flags and the
        // schedule.
        self.registry_transaction(|tx| {
            let entry = read_entry(tx, device)?;
            if entry.recorded().is_none() {
                let header = PuppetHeader {
                    flags: layout::PUPPET,
                    due: None,
                };
                write_entry(tx, device, &entry, header)?;
            }
            Ok(())
        })?;
        Ok(self.commit.pending())
    }

    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self.registry_header(device)?.is_some())
    }

    fn record_cross_signed(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        // The flag only: a scheduled due time stays. (A device not recorded
        // yet is recorded by it, as before schema 4.)
        self.registry_transaction(|tx| {
            let entry = read_entry(tx, device)?;
            let mut header = entry.recorded().unwrap_or_default();
            header.flags |= layout::PUPPET | layout::CROSS_SIGNED;
            write_entry(tx, device, &entry, header)
        })?;
        Ok(self.commit.pending())
    }

    fn schedule_rotation(
        &self,
        device: &DeviceKey,
        due_ms: u64,
        found_at: Option<u64>,
    ) -> Result<Pending, StoreError> {
        self.registry_transaction(|tx| {
            let entry = read_entry(tx, device)?;
            let Some(mut header) = entry.recorded() else {
                // Not (or no longer) recorded: its entry, if it was found
                // under one, goes rather than being found again and again.
                if let Some(old) = found_at {
                    tx.remove(layout::rotation(old, device))?;
                }
                return Ok(());
            };
            reschedule(tx, device, &mut header, due_ms, found_at)?;
            write_entry(tx, device, &entry, header)
        })?;
        Ok(self.commit.pending())
    }

    fn due_rotations(
        &self,
        now_ms: u64,
        after: Option<&(DeviceKey, u64)>,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some((device, due)) => Bound::Excluded(layout::rotation(*due, device)),
            None => Bound::Included(layout::ROTATION_PREFIX.to_vec()),
        };
        let mut end = layout::ROTATION_PREFIX.to_vec();
        // Everything scheduled at or before now: up to (now + 1), exclusive
        // (at u64::MAX, up to the end of the prefix).
        match now_ms.checked_add(1) {
            Some(next) => end.extend_from_slice(&next.to_be_bytes()),
            None => end = vec![layout::ROTATION_PREFIX[0], layout::ROTATION_PREFIX[1] + 1],
        }
        let corrupt = || StoreError::Corrupt {
            what: "rotation schedule entry".into(),
        };
        let mut out = Vec::new();
        for item in self
            .db
            .range::<Vec<u8>, _>((start, Bound::Excluded(end)))
            .keys()
            .take(limit)
        {
            let key = item?;
            let rest = &key[layout::ROTATION_PREFIX.len()..];
            let due = rest
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(corrupt)?;
            let device = DeviceKey::from_bytes(&rest[8..]).ok_or_else(corrupt)?;
            out.push((device, due));
        }
        Ok(out)
    }

    fn is_cross_signed(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self
            .registry_header(device)?
            .is_some_and(|h| h.flags & layout::CROSS_SIGNED != 0))
    }

    /// In device byte order: the `r/` records and the accounts flagged in
    /// their header, merged. The `r/` records are read first: creating an
    /// account moves a device's `r/` record into the account's header, and
    /// a move between the two scans then shows the device twice (dropped
    /// by the merge), where the other order would miss it.
    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt { what: what.into() };
        let mut out = Vec::new();
        for item in self.db.scan_prefix(layout::PUPPET_PREFIX).keys() {
            let key = item?;
            out.push(
                DeviceKey::from_bytes(&key[layout::PUPPET_PREFIX.len()..])
                    .ok_or_else(|| corrupt("puppet registry entry"))?,
            );
        }
        let from_registry = out.len();
        for item in self.db.scan_prefix(layout::ACCOUNT_PREFIX) {
            let (key, value) = item?;
            let (header, _, _) =
                layout::parse_account(&value).ok_or_else(|| corrupt("account record header"))?;
            if header.flags & layout::PUPPET != 0 {
                out.push(
                    DeviceKey::from_bytes(&key[layout::ACCOUNT_PREFIX.len()..])
                        .ok_or_else(|| corrupt("account key"))?,
                );
            }
        }
        if from_registry > 0 && out.len() > from_registry {
            out.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.dedup();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SledStoreConfig, StoreKey};

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open_or_create(SledStoreConfig::new(dir, StoreKey::new([7; 32]))).expect("open")
    }

    #[tokio::test]
    async fn recorded_puppets_survive_a_restart_once_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = DeviceKey::new("@echo_a:hs", "DEV");
        let b = DeviceKey::new("@echo_b:hs", "DEV");
        {
            let store = open(dir.path());
            assert!(store.puppets().expect("list").is_empty());
            assert!(!store.contains_puppet(&a).expect("read"));
            for d in [&a, &b, &a] {
                store
                    .record_puppet(d)
                    .expect("record")
                    .durable()
                    .await
                    .expect("durable");
            }
        }
        let store = open(dir.path());
        assert!(store.contains_puppet(&a).expect("read"));
        assert_eq!(store.puppets().expect("list"), vec![a, b]);
    }

    #[tokio::test]
    async fn the_schedule_lists_only_due_devices_keeps_one_entry_each_and_the_cross_signed_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let devices: Vec<DeviceKey> = (0..5)
            .map(|i| DeviceKey::new(&format!("@echo_{i}:hs"), "DEV"))
            .collect();
        for (i, d) in devices.iter().enumerate() {
            store
                .record_puppet(d)
                .expect("record")
                .durable()
                .await
                .expect("durable");
            store
                .schedule_rotation(d, 1_000 * (i as u64 + 1), None)
                .expect("schedule")
                .durable()
                .await
                .expect("durable");
        }
        store
            .record_cross_signed(&devices[1])
            .expect("flag")
            .durable()
            .await
            .expect("durable");
        // Not recorded: not scheduled either.
        let stranger = DeviceKey::new("@stranger:hs", "DEV");
        store
            .schedule_rotation(&stranger, 0, None)
            .expect("no-op")
            .durable()
            .await
            .expect("durable");
        let due = store.due_rotations(2_000, None, 100).expect("due");
        assert_eq!(
            due,
            vec![(devices[0].clone(), 1_000), (devices[1].clone(), 2_000)]
        );
        assert_eq!(store.due_rotations(2_000, None, 1).expect("due").len(), 1);
        // Rescheduled: its old entry goes, its flag stays.
        store
            .schedule_rotation(&devices[1], 9_000, Some(2_000))
            .expect("reschedule")
            .durable()
            .await
            .expect("durable");
        assert!(store.is_cross_signed(&devices[1]).expect("flag"));
        let all: Vec<u64> = store
            .due_rotations(u64::MAX, None, 100)
            .expect("all")
            .into_iter()
            .map(|(_, due)| due)
            .collect();
        assert_eq!(all, vec![1_000, 3_000, 4_000, 5_000, 9_000]);
        // Scheduled before being flagged: the flag keeps the schedule.
        store
            .record_cross_signed(&devices[4])
            .expect("flag")
            .durable()
            .await
            .expect("durable");
        assert_eq!(
            store.due_rotations(u64::MAX, None, 100).expect("all").len(),
            5
        );
        assert!(store.is_cross_signed(&devices[4]).expect("flag"));
        assert!(!store.is_cross_signed(&devices[3]).expect("flag"));
        // A cursor continues strictly after the entry it names.
        let first = store.due_rotations(u64::MAX, None, 2).expect("first");
        let rest = store
            .due_rotations(u64::MAX, first.last(), 100)
            .expect("rest");
        assert_eq!(first.len() + rest.len(), 5);
        assert!(!rest.contains(&first[1]));
        // An entry found for a device no longer recorded is removed.
        let ghost = DeviceKey::new("@ghost:hs", "DEV");
        store
            .db
            .insert(layout::rotation(500, &ghost), &[][..])
            .expect("orphan");
        assert_eq!(store.due_rotations(500, None, 100).expect("due").len(), 1);
        store
            .schedule_rotation(&ghost, 9_999, Some(500))
            .expect("drop it")
            .durable()
            .await
            .expect("durable");
        assert!(store.due_rotations(500, None, 100).expect("due").is_empty());
        // Recording again keeps the schedule.
        store
            .record_puppet(&devices[3])
            .expect("record again")
            .durable()
            .await
            .expect("durable");
        assert_eq!(store.due_rotations(4_000, None, 100).expect("due").len(), 3);
    }

    /// On sled an idle provisioned device is one entry: recording a device
    /// that has an account puts the flags in its header (no `r/` record),
    /// and a device recorded before its account exists has its `r/`
    /// record (flag and schedule) taken over when the account is created.
    #[tokio::test]
    async fn a_provisioned_device_is_one_entry_and_an_account_takes_over_an_earlier_record() {
        use crate::{DeviceWrite, Store};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let create = |store: &SledStore, d: &DeviceKey| {
            store
                .write_device(
                    d,
                    None,
                    DeviceWrite {
                        account: zeroize::Zeroizing::new(b"account".to_vec()),
                        ..DeviceWrite::default()
                    },
                )
                .expect("create")
        };
        let entries = |store: &SledStore, d: &DeviceKey| {
            [layout::account(d), layout::puppet(d)]
                .iter()
                .filter(|k| store.db.contains_key(k).expect("read"))
                .count()
        };
        let first = DeviceKey::new("@echo_a:hs", "DEV");
        create(&store, &first).durable().await.expect("durable");
        drop(store.record_puppet(&first).expect("record"));
        drop(store.record_cross_signed(&first).expect("flag"));
        drop(
            store
                .schedule_rotation(&first, 1_000, None)
                .expect("schedule"),
        );
        assert_eq!(
            entries(&store, &first),
            1,
            "account and registry in one entry"
        );

        let early = DeviceKey::new("@echo_b:hs", "DEV");
        drop(store.record_puppet(&early).expect("record"));
        drop(store.record_cross_signed(&early).expect("flag"));
        drop(
            store
                .schedule_rotation(&early, 2_000, None)
                .expect("schedule"),
        );
        assert!(store.db.contains_key(layout::puppet(&early)).expect("read"));
        create(&store, &early).durable().await.expect("durable");
        assert_eq!(
            entries(&store, &early),
            1,
            "the account took the record over"
        );
        assert!(!store.db.contains_key(layout::puppet(&early)).expect("read"));

        for d in [&first, &early] {
            assert!(store.contains_puppet(d).expect("read"));
            assert!(store.is_cross_signed(d).expect("read"));
            let account = store.load_account(d).expect("load").expect("account");
            assert_eq!(account.data.as_slice(), b"account");
        }
        assert_eq!(
            store.puppets().expect("list"),
            vec![first.clone(), early.clone()]
        );
        assert_eq!(
            store.due_rotations(u64::MAX, None, 10).expect("due"),
            vec![(first, 1_000), (early, 2_000)]
        );
    }
}
