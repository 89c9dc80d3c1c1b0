//! The puppet registry: which puppet devices the bridge has provisioned on
//! the homeserver.
//!
//! The fallback key rotation task walks this list (the homeserver knows
//! these devices, so their keys can be uploaded), and it survives restarts
//! so rotation resumes where it was. Records are `r/<device>` keys whose
//! value is empty, or one flag byte once the device is signed by its user's
//! published cross-signing identity: user and device ids are public data,
//! nothing is sealed.

use crate::{DeviceKey, Pending, SledStore, StoreError, layout};

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
}

/// The flag byte of a cross-signed puppet device.
const CROSS_SIGNED: u8 = 1;

impl PuppetRegistry for SledStore {
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        // Only if absent: recording again keeps the cross-signed flag.
        let _already = self.db.compare_and_swap(
            layout::puppet(device),
            None as Option<&[u8]>,
            Some(&[][..]),
        )?;
        Ok(self.commit.pending())
    }

    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self.db.contains_key(layout::puppet(device))?)
    }

    fn record_cross_signed(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        self.db
            .insert(layout::puppet(device), &[CROSS_SIGNED][..])?;
        Ok(self.commit.pending())
    }

    fn is_cross_signed(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get(layout::puppet(device))?
            .is_some_and(|v| v.first() == Some(&CROSS_SIGNED)))
    }

    fn puppets(&self) -> Result<Vec<DeviceKey>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(layout::PUPPET_PREFIX).keys() {
            let key = item?;
            let device =
                DeviceKey::from_bytes(&key[layout::PUPPET_PREFIX.len()..]).ok_or_else(|| {
                    StoreError::Corrupt {
                        what: "puppet registry entry".into(),
                    }
                })?;
            out.push(device);
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
}
