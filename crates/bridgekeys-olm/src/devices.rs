//! Device tracking: the verified device keys of the users our puppets talk
//! to, kept durably.
//!
//! The keys come from a `keys/query` the bridge makes as a puppet (the
//! homeserver client lives in the appservice crate); this module decides
//! what to believe:
//!
//! * a device is accepted only if its `device_keys` object names the queried
//!   user and device and carries a valid self-signature by its own ed25519
//!   key;
//! * a device whose keys change under the same device id is **refused** and
//!   reported: a device id names one set of keys for life, so a change is a
//!   compromised or confused homeserver, never a normal event (the old keys
//!   stay tracked). That holds across omissions too: a device missing from
//!   a fresh answer is no longer listed but its keys are kept as a
//!   tombstone, as are those of a user no longer tracked, so a device id
//!   cannot come back with other keys after being left out once;
//! * `device_lists.changed` marks a user outdated (the bridge queries again
//!   before trusting the list) and moves the user's generation on, so an
//!   answer to a query sent before the change does not clear the mark;
//!   `device_lists.left` stops tracking the user.
//!
//! What is tracked feeds the payload checks ([`crate::payload`]): a message
//! from a tracked device must show that device's keys.

use std::collections::BTreeMap;

use ruma::{
    DeviceId, DeviceKeyAlgorithm, OwnedDeviceId, OwnedUserId, UserId, encryption::DeviceKeys,
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::{AccountManager, OlmError, signing::canonical_json_for_signing};

/// One device of a tracked user, with keys that passed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackedDevice {
    /// The device id.
    pub device_id: OwnedDeviceId,
    /// Its curve25519 identity key (the Olm channel key).
    pub curve25519: Curve25519PublicKey,
    /// Its ed25519 signing key.
    pub ed25519: Ed25519PublicKey,
}

/// The tracked devices of one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackedDevices {
    /// The user.
    pub user_id: OwnedUserId,
    /// Set by `device_lists.changed`: query again before relying on the list.
    pub outdated: bool,
    /// Moves on with every invalidation: pass it to
    /// [`AccountManager::update_tracked_devices_since`] with the answer of a
    /// query sent after reading it.
    pub generation: u64,
    /// Verified devices, by id.
    pub devices: BTreeMap<OwnedDeviceId, TrackedDevice>,
}

impl TrackedDevices {
    /// The device whose curve25519 key is `key`, if tracked.
    pub fn by_curve25519(&self, key: &Curve25519PublicKey) -> Option<&TrackedDevice> {
        self.devices.values().find(|d| &d.curve25519 == key)
    }
}

/// Why a queried device was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceRefusal {
    /// The object could not be read as `device_keys`.
    #[error("malformed device_keys")]
    Malformed,
    /// It names another user or device than the one it was listed under.
    #[error("device_keys names another user or device")]
    WrongIds,
    /// It lacks its curve25519 or ed25519 key, or one is malformed.
    #[error("device_keys lacks a valid curve25519 or ed25519 key")]
    MissingKeys,
    /// Its self-signature is missing or does not verify.
    #[error("device_keys self-signature missing or invalid")]
    BadSignature,
    /// The device id is tracked with other keys: refused, old keys kept.
    #[error("device keys changed under the same device id")]
    KeysChanged,
}

/// What a query result changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// Devices newly tracked.
    pub added: Vec<OwnedDeviceId>,
    /// Devices no longer listed (deleted), no longer tracked.
    pub removed: Vec<OwnedDeviceId>,
    /// Devices refused, with why.
    pub refused: Vec<(OwnedDeviceId, DeviceRefusal)>,
}

/// The stored record of one user (sealed by the store).
#[derive(Serialize, Deserialize, Default)]
struct Record {
    outdated: bool,
    /// device id -> (curve25519, ed25519), base64.
    devices: BTreeMap<String, (String, String)>,
    /// Keys of devices no longer listed: a device id never comes back with
    /// other keys.
    #[serde(default)]
    retired: BTreeMap<String, (String, String)>,
    /// The user is no longer tracked (`device_lists.left`); the record
    /// stays for its tombstones.
    #[serde(default)]
    untracked: bool,
    #[serde(default)]
    generation: u64,
}

impl Record {
    fn decode(bytes: &[u8]) -> Result<Self, OlmError> {
        serde_json::from_slice(bytes)
            .map_err(|_| OlmError::Corrupt("tracked devices record".into()))
    }

    fn encode(&self) -> Result<Vec<u8>, OlmError> {
        serde_json::to_vec(self)
            .map_err(|_| OlmError::Corrupt("cannot serialise tracked devices".into()))
    }

    /// The keys ever seen under `device_id`, listed or retired.
    fn known(&self, device_id: &str) -> Option<&(String, String)> {
        self.devices
            .get(device_id)
            .or_else(|| self.retired.get(device_id))
    }

    fn into_tracked(self, user_id: &UserId) -> Result<TrackedDevices, OlmError> {
        let corrupt = |_| OlmError::Corrupt("tracked device key".into());
        let mut devices = BTreeMap::new();
        for (id, (curve, ed)) in self.devices {
            let device_id: OwnedDeviceId = id.into();
            devices.insert(
                device_id.clone(),
                TrackedDevice {
                    device_id,
                    curve25519: Curve25519PublicKey::from_base64(&curve).map_err(corrupt)?,
                    ed25519: Ed25519PublicKey::from_base64(&ed).map_err(corrupt)?,
                },
            );
        }
        Ok(TrackedDevices {
            user_id: user_id.to_owned(),
            outdated: self.outdated,
            generation: self.generation,
            devices,
        })
    }
}

/// Verify one queried `device_keys` object listed under `user_id`/`device_id`.
pub fn verify_device_keys(
    user_id: &UserId,
    device_id: &DeviceId,
    raw: &Raw<DeviceKeys>,
) -> Result<TrackedDevice, DeviceRefusal> {
    let keys: DeviceKeys = raw.deserialize().map_err(|_| DeviceRefusal::Malformed)?;
    if keys.user_id != user_id || keys.device_id != device_id {
        return Err(DeviceRefusal::WrongIds);
    }
    let key = |algorithm: DeviceKeyAlgorithm| {
        keys.keys
            .get(&ruma::DeviceKeyId::from_parts(algorithm, device_id))
            .cloned()
            .ok_or(DeviceRefusal::MissingKeys)
    };
    let curve25519 = Curve25519PublicKey::from_base64(&key(DeviceKeyAlgorithm::Curve25519)?)
        .map_err(|_| DeviceRefusal::MissingKeys)?;
    let ed25519 = Ed25519PublicKey::from_base64(&key(DeviceKeyAlgorithm::Ed25519)?)
        .map_err(|_| DeviceRefusal::MissingKeys)?;
    // Verify over the object as received (unknown fields included), not as
    // ruma re-serialises it.
    let value: serde_json::Value =
        serde_json::from_str(raw.json().get()).map_err(|_| DeviceRefusal::Malformed)?;
    let signature = value
        .get("signatures")
        .and_then(|s| s.get(user_id.as_str()))
        .and_then(|s| s.get(format!("ed25519:{device_id}")))
        .and_then(|s| s.as_str())
        .ok_or(DeviceRefusal::BadSignature)?;
    let signature =
        Ed25519Signature::from_base64(signature).map_err(|_| DeviceRefusal::BadSignature)?;
    let signed = canonical_json_for_signing(&value).map_err(|_| DeviceRefusal::Malformed)?;
    ed25519
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| DeviceRefusal::BadSignature)?;
    Ok(TrackedDevice {
        device_id: device_id.to_owned(),
        curve25519,
        ed25519,
    })
}

impl AccountManager {
    /// Read `user_id`'s record, let `change` compute the new one from it
    /// (`None`: nothing to write), and write it only over what was read
    /// ([`Store::replace_tracked_user`](bridgekeys_store::Store::replace_tracked_user)).
    /// If another process wrote the record in between, read and change it
    /// again, up to [`ManagerConfig::session_write_attempts`](crate::ManagerConfig::session_write_attempts)
    /// times, then [`OlmError::Contended`]: without that, its write (a
    /// `device_lists.changed` invalidation, or another query's answer)
    /// would be lost. Callers hold `self.tracking`, which covers the
    /// writers of this process.
    fn change_tracked_user<T>(
        &self,
        user_id: &UserId,
        mut change: impl FnMut(Option<&[u8]>) -> Result<(T, Option<Record>), OlmError>,
    ) -> Result<(T, Option<bridgekeys_store::Pending>), OlmError> {
        let attempts = self.config().session_write_attempts.max(1);
        for attempt in 1..=attempts {
            let stored = self.store.load_tracked_user(user_id.as_str())?;
            let (out, record) = change(stored.as_deref().map(Vec::as_slice))?;
            let Some(record) = record else {
                return Ok((out, None));
            };
            let replaced = self.store.replace_tracked_user(
                user_id.as_str(),
                stored.as_deref().map(Vec::as_slice),
                Some(&record.encode()?),
            )?;
            if let Some(pending) = replaced {
                return Ok((out, Some(pending)));
            }
            tracing::debug!(%user_id, attempt, "a tracked user's record changed under us: reading it again");
        }
        tracing::warn!(%user_id, attempts, "a tracked user's record write lost every race to other processes");
        Err(OlmError::Contended {
            what: "tracked devices",
            attempts,
        })
    }

    /// The tracked devices of `user_id`, or `None` if the user is not
    /// tracked (never queried, or forgotten).
    pub fn tracked_devices(&self, user_id: &UserId) -> Result<Option<TrackedDevices>, OlmError> {
        match self.store.load_tracked_user(user_id.as_str())? {
            Some(bytes) => {
                let record = Record::decode(&bytes)?;
                if record.untracked {
                    return Ok(None);
                }
                record.into_tracked(user_id).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The user's generation (see [`TrackedDevices::generation`]), also
    /// for users not tracked: read it before sending a `keys/query`.
    pub fn tracked_generation(&self, user_id: &UserId) -> Result<u64, OlmError> {
        match self.store.load_tracked_user(user_id.as_str())? {
            Some(bytes) => Ok(Record::decode(&bytes)?.generation),
            None => Ok(0),
        }
    }

    /// Take in the result of a `keys/query` for `user_id` (its
    /// `device_keys` entry): verify every device, refuse changed keys, drop
    /// devices no longer listed, clear the outdated mark; durable before it
    /// returns.
    pub async fn update_tracked_devices(
        &self,
        user_id: &UserId,
        queried: &BTreeMap<OwnedDeviceId, Raw<DeviceKeys>>,
    ) -> Result<DeviceUpdate, OlmError> {
        self.update_tracked_devices_since(user_id, queried, None)
            .await
    }

    /// [`Self::update_tracked_devices`] for the answer to a query sent when
    /// the user's generation was `generation`: if an invalidation came in
    /// since, the list is stored but the user stays outdated.
    pub async fn update_tracked_devices_since(
        &self,
        user_id: &UserId,
        queried: &BTreeMap<OwnedDeviceId, Raw<DeviceKeys>>,
        generation: Option<u64>,
    ) -> Result<DeviceUpdate, OlmError> {
        let (update, pending) = {
            let _one_writer = self.tracking.lock();
            self.change_tracked_user(user_id, |stored| {
                let old = match stored {
                    Some(bytes) => Record::decode(bytes)?,
                    None => Record::default(),
                };
                let mut update = DeviceUpdate::default();
                let mut record = Record {
                    retired: old.retired.clone(),
                    generation: old.generation,
                    outdated: generation.is_some_and(|g| g != old.generation),
                    ..Record::default()
                };
                for (device_id, raw) in queried {
                    let keys = match verify_device_keys(user_id, device_id, raw) {
                        Ok(device) => (device.curve25519.to_base64(), device.ed25519.to_base64()),
                        Err(refusal) => {
                            // A device we knew stays as it was if its new
                            // listing is bad; a new one is simply not tracked.
                            if let Some(known) = old.devices.get(device_id.as_str()) {
                                record.devices.insert(device_id.to_string(), known.clone());
                                record.retired.remove(device_id.as_str());
                            }
                            update.refused.push((device_id.clone(), refusal));
                            continue;
                        }
                    };
                    match old.known(device_id.as_str()) {
                        Some(known) if *known != keys => {
                            // Listed or not, the id keeps its first keys.
                            if old.devices.contains_key(device_id.as_str()) {
                                record.devices.insert(device_id.to_string(), known.clone());
                            }
                            update
                                .refused
                                .push((device_id.clone(), DeviceRefusal::KeysChanged));
                        }
                        Some(_) if old.devices.contains_key(device_id.as_str()) => {
                            record.devices.insert(device_id.to_string(), keys);
                        }
                        _ => {
                            record.retired.remove(device_id.as_str());
                            record.devices.insert(device_id.to_string(), keys);
                            update.added.push(device_id.clone());
                        }
                    }
                }
                for (id, keys) in &old.devices {
                    if !queried.contains_key(<&DeviceId>::from(id.as_str())) {
                        record.retired.insert(id.clone(), keys.clone());
                        update.removed.push(OwnedDeviceId::from(id.as_str()));
                    }
                }
                Ok((update, Some(record)))
            })?
        };
        for (device_id, refusal) in &update.refused {
            self.counters.note_device_refused();
            tracing::warn!(%user_id, %device_id, reason = %refusal, "queried device refused");
        }
        if let Some(pending) = pending {
            pending.durable().await?;
        }
        Ok(update)
    }

    /// `device_lists.changed`: mark tracked users outdated, durably.
    /// Untracked users are ignored. Returns the users marked.
    pub async fn mark_devices_outdated<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
    ) -> Result<Vec<OwnedUserId>, OlmError> {
        let mut marked = Vec::new();
        {
            let _one_writer = self.tracking.lock();
            for user_id in users {
                // Made durable by the sync below, with the others.
                let (was_tracked, _applied) = self.change_tracked_user(user_id, |stored| {
                    let Some(bytes) = stored else {
                        return Ok((false, None));
                    };
                    let mut record = Record::decode(bytes)?;
                    if record.untracked {
                        return Ok((false, None));
                    }
                    // The generation moves on even if already outdated: a
                    // query in flight must not clear this invalidation.
                    record.outdated = true;
                    record.generation += 1;
                    Ok((true, Some(record)))
                })?;
                if was_tracked {
                    marked.push(user_id.to_owned());
                }
            }
        }
        self.store.sync().durable().await?;
        Ok(marked)
    }

    /// `device_lists.left`: stop tracking these users, durably.
    pub async fn forget_tracked_devices<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
    ) -> Result<(), OlmError> {
        {
            let _one_writer = self.tracking.lock();
            for user_id in users {
                // Made durable by the sync below, with the others.
                let ((), _applied) = self.change_tracked_user(user_id, |stored| {
                    let Some(bytes) = stored else {
                        return Ok(((), None));
                    };
                    // Not tracked any more, but its devices' keys stay as
                    // tombstones.
                    let mut record = Record::decode(bytes)?;
                    let devices = std::mem::take(&mut record.devices);
                    record.retired.extend(devices);
                    record.untracked = true;
                    record.outdated = true;
                    record.generation += 1;
                    Ok(((), Some(record)))
                })?;
            }
        }
        self.store.sync().durable().await?;
        Ok(())
    }
}
