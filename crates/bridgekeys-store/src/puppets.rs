//! The puppet registry: which puppet devices the bridge has provisioned on
//! the homeserver.
//!
//! The fallback key rotation task walks this list (the homeserver knows
//! these devices, so their keys can be uploaded), and it survives restarts
//! so rotation resumes where it was. Records are `r/<device>` keys with an
//! empty value: user and device ids are public data, nothing is sealed.

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
}

impl PuppetRegistry for SledStore {
    fn record_puppet(&self, device: &DeviceKey) -> Result<Pending, StoreError> {
        self.db.insert(layout::puppet(device), &[][..])?;
        Ok(self.commit.pending())
    }

    fn contains_puppet(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self.db.contains_key(layout::puppet(device))?)
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
