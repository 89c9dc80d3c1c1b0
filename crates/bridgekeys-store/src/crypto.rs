//! Sealing of secret values: XChaCha20-Poly1305 with a random nonce and the
//! record's slot (its key in the tree) as associated data, so a sealed value
//! moved to another slot fails to open.

use std::fmt;

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadInPlace, KeyInit, Payload},
};
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

const NONCE_LEN: usize = 24;

/// Bytes a sealed value adds to its plaintext: the nonce and the tag.
pub(crate) const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// The 32-byte key that encrypts a store at rest. Comes from the bridge's
/// configuration; never logged (its `Debug` is redacted).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// Wrap 32 key bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key (for new deployments and tests).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The key bytes, for writing a new configuration file.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn cipher(&self) -> Sealer {
        Sealer(XChaCha20Poly1305::new((&self.0).into()))
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

/// A ready cipher for one store.
pub(crate) struct Sealer(XChaCha20Poly1305);

impl Sealer {
    /// `nonce || ciphertext+tag`, bound to `slot`.
    pub(crate) fn seal(&self, slot: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        self.seal_into(&mut out, slot, plaintext);
        out
    }

    /// Append `nonce || ciphertext+tag`, bound to `slot`, to `out`: the
    /// plaintext is encrypted in place in `out`, so a caller that sized
    /// `out` for its whole record (prefix, [`SEAL_OVERHEAD`] and plaintext)
    /// makes no other allocation. If the AEAD fails (it cannot with a valid
    /// key and in-memory buffers), `out` is left as it was given, never
    /// holding plaintext.
    pub(crate) fn seal_into(&self, out: &mut Vec<u8>, slot: &[u8], plaintext: &[u8]) {
        // A random 192-bit nonce never repeats in practice; the thread-local
        // CSPRNG (seeded from the OS) saves a syscall per sealed value.
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let start = out.len();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        match self.0.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            slot,
            &mut out[start + NONCE_LEN..],
        ) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => {
                out[start..].zeroize();
                out.truncate(start);
            }
        }
    }

    /// Open a sealed value; `None` if it was not sealed with this key for this slot.
    pub(crate) fn open(&self, slot: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: slot })
            .ok()
            .map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_value_opens_only_in_its_slot_with_its_key() {
        let key = StoreKey::generate();
        let sealer = key.cipher();
        let sealed = sealer.seal(b"slot-a", b"secret");
        assert_eq!(
            sealer
                .open(b"slot-a", &sealed)
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"secret"[..])
        );
        assert!(
            sealer.open(b"slot-b", &sealed).is_none(),
            "moved to another slot"
        );
        assert!(
            StoreKey::generate()
                .cipher()
                .open(b"slot-a", &sealed)
                .is_none(),
            "wrong key"
        );
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "plaintext visible"
        );
    }
}
