//! A device's account as it lives in memory and in the store.
//!
//! The stored form is the vodozemac account pickle with **no one-time keys**
//! in it: the manager moves each new private key out of the account into its
//! own store record right after generating it. The pickle therefore stays
//! small and constant-size (identity keys, fallback keys and the key-id
//! counter), and a claim never re-pickles outstanding keys.

use bridgekeys_store::{AccountRecord, Version};
use serde::{Deserialize, Serialize};
use vodozemac::{
    Curve25519SecretKey, KeyId,
    olm::{Account, AccountPickle},
};
use zeroize::Zeroizing;

use crate::{OlmError, fallback::FallbackState};

/// Format of [`StoredDevice`]; bump with a migration when it changes.
/// 2 added `fallback` (absent in format 1 records: no fallback state yet).
const FORMAT: u32 = 2;

#[derive(Serialize)]
struct StoredDeviceRef<'a> {
    format: u32,
    outstanding: u64,
    account: &'a AccountPickle,
    fallback: &'a FallbackState,
}

#[derive(Deserialize)]
struct StoredDevice {
    format: u32,
    outstanding: u64,
    account: AccountPickle,
    #[serde(default)]
    fallback: FallbackState,
}

/// A loaded device: its account (holding no one-time keys), the store
/// version it was read at, how many one-time keys it has outstanding and
/// the schedule of its fallback keys.
pub(crate) struct DeviceAccount {
    pub account: Account,
    pub version: Option<Version>,
    pub outstanding: u64,
    pub fallback: FallbackState,
}

impl DeviceAccount {
    pub(crate) fn new() -> Self {
        Self {
            account: Account::new(),
            version: None,
            outstanding: 0,
            fallback: FallbackState::default(),
        }
    }

    /// Serialise for [`bridgekeys_store::DeviceWrite::account`].
    pub(crate) fn encode(&self, outstanding: u64) -> Result<Zeroizing<Vec<u8>>, OlmError> {
        let pickle = self.account.pickle();
        let record = StoredDeviceRef {
            format: FORMAT,
            outstanding,
            account: &pickle,
            fallback: &self.fallback,
        };
        serde_json::to_vec(&record)
            .map(Zeroizing::new)
            .map_err(|e| OlmError::Corrupt(format!("cannot serialise account: {e}")))
    }

    pub(crate) fn decode(record: &AccountRecord) -> Result<Self, OlmError> {
        let stored: StoredDevice = serde_json::from_slice(&record.data)
            .map_err(|e| OlmError::Corrupt(format!("account record: {e}")))?;
        if !(1..=FORMAT).contains(&stored.format) {
            return Err(OlmError::Corrupt(format!(
                "unknown account format {}",
                stored.format
            )));
        }
        Ok(Self {
            account: Account::from_pickle(stored.account),
            version: Some(record.version),
            outstanding: stored.outstanding,
            fallback: stored.fallback,
        })
    }

    /// A throw-away copy of the account holding exactly one one-time key,
    /// ready to create the inbound session that uses it.
    ///
    /// vodozemac has no API to put a known secret key back into an account,
    /// so this goes through the account's serde pickle (a format vodozemac
    /// keeps stable for stored accounts): the key is inserted into
    /// `one_time_keys.private_keys` under its id.
    pub(crate) fn with_one_time_key(
        &self,
        key_id: u64,
        secret: &[u8; 32],
    ) -> Result<Account, OlmError> {
        let corrupt = |e: serde_json::Error| OlmError::Corrupt(format!("account pickle: {e}"));
        let mut pickle = serde_json::to_value(self.account.pickle()).map_err(corrupt)?;
        let secret =
            serde_json::to_value(Curve25519SecretKey::from_slice(secret)).map_err(corrupt)?;
        let keys = pickle
            .get_mut("one_time_keys")
            .and_then(|o| o.get_mut("private_keys"))
            .and_then(|k| k.as_object_mut())
            .ok_or_else(|| OlmError::Corrupt("account pickle has no one-time key map".into()))?;
        keys.insert(key_id.to_string(), secret);
        let pickle: AccountPickle = serde_json::from_value(pickle).map_err(corrupt)?;
        Ok(Account::from_pickle(pickle))
    }
}

/// vodozemac's key id as a number: its base64 form is the big-endian counter.
pub(crate) fn key_id_number(key_id: KeyId) -> Result<u64, OlmError> {
    let bytes = vodozemac::base64_decode(key_id.to_base64())
        .map_err(|e| OlmError::Corrupt(format!("key id: {e}")))?;
    let array = <[u8; 8]>::try_from(bytes.as_slice())
        .map_err(|_| OlmError::Corrupt("key id is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_1_record_without_fallback_state_still_loads() {
        let account = Account::new();
        let v1 = serde_json::json!({
            "format": 1,
            "outstanding": 3,
            "account": account.pickle(),
        });
        let record = AccountRecord {
            version: Version(4),
            data: Zeroizing::new(serde_json::to_vec(&v1).expect("json")),
        };
        let device = DeviceAccount::decode(&record).expect("decode");
        assert_eq!(device.outstanding, 3);
        assert_eq!(device.fallback, FallbackState::default());
        assert_eq!(
            device.account.identity_keys().ed25519,
            account.identity_keys().ed25519
        );
        // Written back, it is the current format.
        let encoded = device.encode(3).expect("encode");
        let value: serde_json::Value = serde_json::from_slice(&encoded).expect("json");
        assert_eq!(value["format"], FORMAT);
    }

    #[test]
    fn an_unknown_future_format_is_refused() {
        let v9 = serde_json::json!({
            "format": 9,
            "outstanding": 0,
            "account": Account::new().pickle(),
        });
        let record = AccountRecord {
            version: Version(1),
            data: Zeroizing::new(serde_json::to_vec(&v9).expect("json")),
        };
        assert!(matches!(
            DeviceAccount::decode(&record),
            Err(OlmError::Corrupt(_))
        ));
    }
}
