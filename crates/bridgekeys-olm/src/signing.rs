//! Matrix JSON signing: the signed bytes are the canonical JSON of the object
//! without its `signatures` and `unsigned` members.

use ruma::{CanonicalJsonValue, canonical_json::to_canonical_value};
use serde::Serialize;
use vodozemac::olm::Account;

use crate::OlmError;

/// The exact bytes a Matrix signature covers: canonical JSON of `value`
/// with `signatures` and `unsigned` removed.
pub fn canonical_json_for_signing<T: Serialize>(value: &T) -> Result<String, OlmError> {
    let mut canonical = to_canonical_value(value)?;
    if let CanonicalJsonValue::Object(object) = &mut canonical {
        object.remove("signatures");
        object.remove("unsigned");
    }
    Ok(canonical.to_string())
}

/// Sign `value` with the account's ed25519 key; returns the base64 signature.
pub fn sign_json<T: Serialize>(account: &Account, value: &T) -> Result<String, OlmError> {
    Ok(account.sign(canonical_json_for_signing(value)?).to_base64())
}
