//! Fallback key (MSC2732) operations of the [`AccountManager`].
//!
//! Every change is written into the device's account record (the vodozemac
//! pickle that holds the private fallback keys, and the [`FallbackState`]
//! beside it) in one atomic, versioned write, and is durable before the call
//! returns. So a key is always on disk before anybody can upload it, and the
//! schedule (times, published, used) survives restarts.

use bridgekeys_store::{DeviceKey, DeviceWrite, Pending, PuppetMark, Version};
use ruma::{
    DeviceId, DeviceSignatures, DeviceSigningKeyId, OwnedOneTimeKeyId, SigningKeyAlgorithm, UserId,
    encryption::SignedKey, serde::Base64,
};
use vodozemac::Curve25519PublicKey;

use crate::{
    AccountManager, OlmError,
    account::{DeviceAccount, key_id_number, key_id_string},
    fallback::{CurrentFallback, FallbackAction, FallbackPolicy, FallbackState, UnixMillis, due},
    stats::Counters,
};

/// A signed fallback key: `signed_curve25519:<id>` and
/// `{"key", "fallback": true, "signatures"}`, for `/keys/upload`'s
/// `fallback_keys` (or, optionally, a `keys/claim` answer).
#[derive(Clone, Debug)]
pub struct FallbackKey {
    /// `signed_curve25519:<base64 key id>`. The id comes from vodozemac's
    /// fallback counter, separate from the one-time keys': it can equal a
    /// one-time key's id.
    pub key_id: OwnedOneTimeKeyId,
    /// The signed key object, `fallback: true` included in what is signed.
    pub key: SignedKey,
}

/// Mark fallback key `key_id` published at `now` if it is the current key
/// and not published yet; returns whether it did (the account changed).
fn publish(
    device: &mut DeviceAccount,
    key_id: &OwnedOneTimeKeyId,
    now: UnixMillis,
) -> Result<bool, OlmError> {
    let Some(current) = device.fallback.current.as_ref() else {
        return Ok(false);
    };
    if current.published || key_id_string(current.key_id)? != *key_id {
        return Ok(false);
    }
    // The account holds no one-time keys, so this publishes exactly the
    // fallback key.
    device.account()?.mark_keys_as_published();
    if let Some(c) = device.fallback.current.as_mut() {
        c.published = true;
        c.published_ms = Some(now);
    }
    Ok(true)
}

/// The key to upload for a device: its unpublished current fallback key,
/// generated first if it has none (`None`: the current key is published),
/// and whether one was generated (the account changed).
fn key_to_upload(
    device: &mut DeviceAccount,
    now: UnixMillis,
    user_id: &UserId,
    device_id: &DeviceId,
) -> Result<(Option<FallbackKey>, bool), OlmError> {
    let generated = device.fallback.current.is_none();
    if generated {
        generate(device, now)?;
    }
    let upload = match &device.fallback.current {
        Some(c) if !c.published => {
            let current = c.clone();
            Some(sign_fallback(device, &current, user_id, device_id)?)
        }
        _ => None,
    };
    Ok((upload, generated))
}

/// Generate a fallback key in the account; the current one (if any) becomes
/// the previous one (and an older previous one is dropped by vodozemac).
fn generate(device: &mut DeviceAccount, now: UnixMillis) -> Result<(), OlmError> {
    let had_current =
        device.fallback.current.is_some() || !device.account()?.fallback_key().is_empty();
    device.account()?.generate_fallback_key();
    let (key_id, public) = device
        .account()?
        .fallback_key()
        .into_iter()
        .next()
        .ok_or_else(|| OlmError::Corrupt("generated fallback key vanished".into()))?;
    device.fallback.current = Some(CurrentFallback {
        key_id: key_id_number(key_id)?,
        public_key: public.to_base64(),
        created_ms: now,
        published: false,
        published_ms: None,
        used: false,
    });
    device.fallback.previous_since_ms = had_current.then_some(now);
    Ok(())
}

/// A fallback key object, signed. The same object is signed again for
/// every upload and every claim that hands it out, so with the whole
/// account ([`DeviceAccount::sign_json`]), never the cold signer.
fn sign_fallback(
    device: &mut DeviceAccount,
    current: &CurrentFallback,
    user_id: &UserId,
    device_id: &DeviceId,
) -> Result<FallbackKey, OlmError> {
    let public = Curve25519PublicKey::from_base64(&current.public_key)
        .map_err(|e| OlmError::Corrupt(format!("fallback public key: {e}")))?;
    let mut signed = SignedKey::new_fallback(Base64::new(public.to_vec()), DeviceSignatures::new());
    // ed25519 signatures are deterministic: the same key signs to the same
    // object every time, so a re-upload is byte-identical.
    let signature = device.sign_json(&signed)?;
    signed.signatures.insert_signature(
        user_id.to_owned(),
        DeviceSigningKeyId::from_parts(SigningKeyAlgorithm::Ed25519, device_id),
        signature,
    );
    Ok(FallbackKey {
        key_id: key_id_string(current.key_id)?,
        key: signed,
    })
}

impl AccountManager {
    /// The device's fallback key schedule, as stored (read again from the
    /// store first where other processes share it).
    pub fn fallback_state(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<FallbackState, OlmError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot(&key, user_id, device_id)?;
        let mut device = slot.lock();
        self.refresh(&mut device, &key)?;
        Ok(device.fallback.clone())
    }

    /// The fallback key to upload, if the device has one that the homeserver
    /// has not acknowledged yet.
    ///
    /// A device without a fallback key gets one, generated and written
    /// **durably before it is returned**. Every later call returns the very
    /// same signed key (byte-identical) until
    /// [`AccountManager::mark_fallback_published`] records the upload's 200,
    /// so a retry after a network error or a crash re-sends the same key and
    /// never a new one. `None`: the current key is published already.
    pub async fn fallback_key_for_upload(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> Result<Option<FallbackKey>, OlmError> {
        self.update_device(user_id, device_id, true, |device| {
            let (upload, generated) = key_to_upload(device, now, user_id, device_id)?;
            Ok((upload, generated))
        })
        .await
        .map(|(upload, generated)| {
            if generated {
                Counters::add(&self.counters.fallback_keys_generated, 1);
            }
            upload
        })
    }

    /// Record that the homeserver acknowledged the upload of fallback key
    /// `key_id` at `now` (the previous key's grace period starts then).
    /// Ignored (returns `false`) if that is no longer the current key (a
    /// rotation happened meanwhile) or it was recorded already.
    pub async fn mark_fallback_published(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        key_id: &OwnedOneTimeKeyId,
        now: UnixMillis,
    ) -> Result<bool, OlmError> {
        self.update_device(user_id, device_id, false, |device| {
            let marked = publish(device, key_id, now)?;
            Ok((marked, marked))
        })
        .await
        .map(|(marked, _)| marked)
    }

    /// [`AccountManager::mark_fallback_published`] and, in the same write,
    /// the device's next fallback step scheduled in the puppet registry at
    /// the time `policy` gives for it once published (as a rotation pass
    /// would schedule it; at once if a step is due already). Returns that
    /// time, or `None` if nothing was marked (nothing written).
    ///
    /// Why: a new puppet device is recorded due at once before its first
    /// upload, so that a failed upload is retried by the rotation pass.
    /// After the upload, the pass would only rewrite the account record to
    /// set the real time (on sled the registry entry is the account
    /// record's header); the publish write sets it instead.
    pub async fn mark_fallback_published_and_schedule(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        key_id: &OwnedOneTimeKeyId,
        now: UnixMillis,
        policy: &FallbackPolicy,
    ) -> Result<Option<UnixMillis>, OlmError> {
        let next = |device: &DeviceAccount| due(&device.fallback, policy, now).next_due(now);
        let mark = |device: &DeviceAccount| {
            Some(PuppetMark {
                due_ms: Some(next(device)),
            })
        };
        self.update_device_marking(user_id, device_id, false, mark, |device| {
            let marked = publish(device, key_id, now)?;
            Ok((marked.then(|| next(device)), marked))
        })
        .await
        .map(|(scheduled, _)| scheduled)
    }

    /// [`AccountManager::fallback_key_for_upload`] and, in the same atomic
    /// write of the account record, record the device in the puppet
    /// registry ([`bridgekeys_store::PuppetRegistry::record_puppet`]: a
    /// device recorded already keeps its flags, such as cross-signed) with
    /// its next rotation step due at `due` (as
    /// [`bridgekeys_store::PuppetRegistry::schedule_rotation`] would).
    ///
    /// Why: provisioning a new puppet device generates its fallback key and
    /// records the device as soon as the homeserver created it, before the
    /// upload (so that a failed upload is retried by the rotation pass).
    /// On sled the registry entry of a device lives in its account record's
    /// header, so separate calls rewrite the whole account record once per
    /// step (and sled keeps each dead version until it cleans the segment)
    /// and wait for a flush each. One write does them all.
    ///
    /// The account is written in every case, so the mark always lands:
    /// with a new key, with the unpublished key it has (unchanged), or with
    /// nothing to upload (`None`: its key is published already). Durable
    /// when this returns.
    pub async fn fallback_key_for_upload_and_record_puppet(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        now: UnixMillis,
        due: UnixMillis,
    ) -> Result<Option<FallbackKey>, OlmError> {
        let mark = PuppetMark { due_ms: Some(due) };
        let (upload, generated) = self
            .update_device_marking(
                user_id,
                device_id,
                true,
                |_| Some(mark),
                |device| {
                    // Written in every case (`true`): the mark must land.
                    Ok((key_to_upload(device, now, user_id, device_id)?, true))
                },
            )
            .await?
            .0;
        if generated {
            Counters::add(&self.counters.fallback_keys_generated, 1);
        }
        Ok(upload)
    }

    /// Record that the homeserver reports the device's fallback key used
    /// (MSC3202 `device_unused_fallback_key_types` without
    /// `signed_curve25519`), so the policy rotates it.
    ///
    /// Only a published current key can be used; for an unpublished one (a
    /// rotation waiting for its upload) the report is stale and ignored.
    /// Returns whether the report changed anything.
    pub async fn mark_fallback_used(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<bool, OlmError> {
        self.update_device(user_id, device_id, false, |device| {
            match device.fallback.current.as_mut() {
                Some(c) if c.published && !c.used => {
                    c.used = true;
                    Ok((true, true))
                }
                _ => Ok((false, false)),
            }
        })
        .await
        .map(|(changed, _)| changed)
    }

    /// Take the next step of the device's fallback life cycle at `now`
    /// ([`crate::fallback::due`]): generate, rotate or forget, durably. The
    /// returned action says what was due; for [`FallbackAction::Upload`]
    /// the caller uploads [`AccountManager::fallback_key_for_upload`]'s key,
    /// for [`FallbackAction::Wait`] nothing is due before its time.
    pub async fn apply_fallback_policy(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        policy: &FallbackPolicy,
        now: UnixMillis,
    ) -> Result<FallbackAction, OlmError> {
        // A device not in the cache is judged from its stored record without
        // caching it: a pass over thousands of idle puppets must not load
        // them all into memory. Only a device with something due is loaded.
        // The read is awaited: on PostgreSQL a full pass makes one per
        // puppet, and must not hold a runtime worker for each round trip.
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        if !self.is_loaded(&key)
            && let Some(record) = self.store.load_account_later(&key).answer().await?
        {
            // Only its fallback schedule is read: no key count, no signer.
            let action = due(&DeviceAccount::stored_fallback(&record)?, policy, now);
            if let FallbackAction::Wait { .. } = action {
                return Ok(action);
            }
        }
        let action = self
            // A `Wait` or `Upload` answer sends nothing anywhere (the upload
            // itself goes through `fallback_key_for_upload`): no flush needed
            // when nothing changed, so a pass over idle devices is cheap.
            .update_device(user_id, device_id, false, |device| {
                let action = due(&device.fallback, policy, now);
                let changed = match action {
                    FallbackAction::Generate | FallbackAction::Rotate(_) => {
                        generate(device, now)?;
                        true
                    }
                    FallbackAction::ForgetPrevious => {
                        device.account()?.forget_fallback_key();
                        device.fallback.previous_since_ms = None;
                        true
                    }
                    FallbackAction::Upload | FallbackAction::Wait { .. } => false,
                };
                Ok((action, changed))
            })
            .await?
            .0;
        match action {
            FallbackAction::Generate => {
                Counters::add(&self.counters.fallback_keys_generated, 1);
            }
            FallbackAction::Rotate(reason) => {
                Counters::add(&self.counters.fallback_rotations, 1);
                tracing::info!(%user_id, %device_id, ?reason, "rotated the fallback key");
            }
            FallbackAction::ForgetPrevious => {
                Counters::add(&self.counters.fallback_forgets, 1);
                tracing::info!(%user_id, %device_id, "forgot the previous fallback key");
            }
            FallbackAction::Upload | FallbackAction::Wait { .. } => {}
        }
        Ok(action)
    }

    /// Replace the device's fallback key now, whatever the policy says (for
    /// an operator who suspects a leak). The current key becomes the
    /// previous one (forgotten after the grace period by
    /// [`AccountManager::apply_fallback_policy`]); a previous key still held
    /// is dropped at once, which is why the policy itself never rotates
    /// within a grace period. The new key needs an upload
    /// ([`AccountManager::fallback_key_for_upload`]).
    pub async fn rotate_fallback_key(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> Result<(), OlmError> {
        self.update_device(user_id, device_id, false, |device| {
            generate(device, now)?;
            Ok(((), true))
        })
        .await?;
        Counters::add(&self.counters.fallback_rotations, 1);
        tracing::info!(%user_id, %device_id, "rotated the fallback key on request");
        Ok(())
    }

    /// Forget the device's previous fallback key now, grace period or not.
    /// Messages still in flight that used it can no longer be decrypted.
    /// Returns whether there was one.
    pub async fn forget_previous_fallback_key(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<bool, OlmError> {
        let (forgot, _) = self
            .update_device(user_id, device_id, false, |device| {
                let forgot = device.account()?.forget_fallback_key();
                let changed = forgot || device.fallback.previous_since_ms.is_some();
                device.fallback.previous_since_ms = None;
                Ok((forgot, changed))
            })
            .await?;
        if forgot {
            Counters::add(&self.counters.fallback_forgets, 1);
        }
        Ok(forgot)
    }

    /// The device's current fallback key, signed, if it is published: what
    /// the homeserver itself would return once the one-time keys are gone.
    /// For answering `keys/claim` with "extra keys" (MSC3983); see the
    /// appservice's `include_fallback_in_claims` for why that is off by
    /// default.
    pub fn published_fallback_key(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Option<FallbackKey>, OlmError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot(&key, user_id, device_id)?;
        let mut device = slot.lock();
        self.refresh(&mut device, &key)?;
        match &device.fallback.current {
            Some(c) if c.published => {
                let current = c.clone();
                Ok(Some(sign_fallback(
                    &mut device,
                    &current,
                    user_id,
                    device_id,
                )?))
            }
            _ => Ok(None),
        }
    }

    /// Run `change` on the device under its lock; if it reports a change,
    /// write the account record (versioned, atomic) and wait until it is
    /// durable. If it changed nothing and `leaves_process` (the result is
    /// about to be sent somewhere), still wait for everything written so far
    /// to be durable: a concurrent caller may have just generated the key
    /// this call returns, and nothing may leave before it is on disk.
    /// Any error puts the stored truth back into the cache.
    async fn update_device<T>(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        leaves_process: bool,
        change: impl FnOnce(&mut DeviceAccount) -> Result<(T, bool), OlmError>,
    ) -> Result<(T, bool), OlmError> {
        self.update_device_marking(user_id, device_id, leaves_process, |_| None, change)
            .await
    }

    /// [`AccountManager::update_device`], whose write (if `change` reports
    /// one) also carries the puppet-registry mark `puppet` gives for the
    /// changed device ([`DeviceWrite::puppet`]).
    async fn update_device_marking<T>(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        leaves_process: bool,
        puppet: impl FnOnce(&DeviceAccount) -> Option<PuppetMark>,
        change: impl FnOnce(&mut DeviceAccount) -> Result<(T, bool), OlmError>,
    ) -> Result<(T, bool), OlmError> {
        let key = DeviceKey::new(user_id.as_str(), device_id.as_str());
        let slot = self.existing_slot_later(&key, user_id, device_id).await?;
        let (out, changed, pending): (T, bool, Option<Pending>) = {
            let mut device = slot.lock();
            // Judged on what is stored, where other processes write too.
            let result = self
                .refresh(&mut device, &key)
                .and_then(|()| change(&mut device))
                .and_then(|(out, changed)| {
                    if !changed {
                        return Ok((out, false, None));
                    }
                    let write = DeviceWrite {
                        account: device.encode()?,
                        puppet: puppet(&device),
                        ..DeviceWrite::default()
                    };
                    let pending = self.store.write_device(&key, device.version, write)?;
                    device.version = Some(Version::next(device.version));
                    Ok((out, true, Some(pending)))
                });
            match result {
                Ok(done) => done,
                Err(e) => {
                    self.reload(&mut device, &key);
                    return Err(e);
                }
            }
        };
        match pending {
            Some(p) => p.durable().await?,
            None if leaves_process => self.store.sync().durable().await?,
            None => {}
        }
        Ok((out, changed))
    }
}
