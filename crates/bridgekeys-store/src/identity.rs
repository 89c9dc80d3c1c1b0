//! The identity of a store: who it is, so that a bridge notices when the
//! store at its configured path is not the one it created.

use std::{fmt, str::FromStr};

/// A random identifier minted when a store is created and never changed.
///
/// A bridge records it next to its configuration at `init`
/// ([`crate::SledStoreConfig::expect_id`]) and opening a store with another
/// id fails with [`crate::StoreError::Foreign`]: a store swapped for another
/// one, or a new one created where the old one was lost, would otherwise give
/// every puppet new identity keys and start key ids again. It is not secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoreId([u8; 16]);

impl StoreId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for StoreId {
    /// 32 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreId({self})")
    }
}

/// A text that is not 32 hex digits, given as a [`StoreId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a store id is 32 hex digits, got {len} characters or a non-hex digit")]
pub struct InvalidStoreId {
    /// Length of the text given.
    pub len: usize,
}

impl FromStr for StoreId {
    type Err = InvalidStoreId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = InvalidStoreId { len: s.len() };
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err);
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err.clone())?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_id_round_trips_through_text_and_refuses_garbage() {
        let id = StoreId::generate();
        assert_eq!(id.to_string().parse::<StoreId>(), Ok(id));
        assert!("".parse::<StoreId>().is_err());
        assert!("+0".repeat(16).parse::<StoreId>().is_err());
        assert!("zz".repeat(16).parse::<StoreId>().is_err());
        assert!("ab".repeat(17).parse::<StoreId>().is_err());
    }
}
