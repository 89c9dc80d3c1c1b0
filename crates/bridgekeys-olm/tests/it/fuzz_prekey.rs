//! Property tests (fuzzing) of `AccountManager::decrypt_prekey` on untrusted
//! pre-key message bytes: arbitrary bytes, arbitrary base64, mutated valid
//! messages, wrong sender keys. None may panic, and no failed attempt may
//! consume the one-time key: after it, the original valid message still
//! decrypts (checked literally, per case, with a fresh key).
//!
//! Default case counts keep `cargo test --workspace` fast. Longer run:
//!
//! ```sh
//! PROPTEST_CASES=10000 cargo test -p bridgekeys-olm --test it fuzz_prekey::
//! ```

use crate::{
    common::{DecryptPrekey, alice, manager, prekey_message},
    fuzzing,
};
use bridgekeys_olm::{AccountManager, ManagerConfig};
use bridgekeys_store::{DeviceKey, StoreKey};
use proptest::{prelude::*, test_runner::TestRunner};
use ruma::OneTimeKeyAlgorithm;
use vodozemac::{Curve25519PublicKey, olm::PreKeyMessage};

const SC: OneTimeKeyAlgorithm = OneTimeKeyAlgorithm::SignedCurve25519;
const PLAINTEXT: &str = "the original, valid message";

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 128;

/// One puppet device over a temp store, and a runtime to drive it.
struct Rig {
    rt: tokio::runtime::Runtime,
    m: AccountManager,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (user, device) = alice();
        rt.block_on(m.create_device(&user, &device)).unwrap();
        Self { rt, m, _dir: dir }
    }

    /// A fresh claimed key and a peer's valid pre-key message on it.
    fn fresh_message(&self) -> (Curve25519PublicKey, PreKeyMessage) {
        let (user, device) = alice();
        let key = self
            .rt
            .block_on(self.m.claim(&user, &device, &SC, 1))
            .unwrap()
            .remove(0);
        prekey_message(&self.m, &user, &device, &key, PLAINTEXT)
    }

    fn outstanding(&self) -> usize {
        let (user, device) = alice();
        self.m
            .store()
            .count_one_time_keys(&DeviceKey::new(user.as_str(), device.as_str()))
            .unwrap()
    }

    /// Try `attempt` (from `sender`). If it was refused, nothing may have
    /// changed and `original` must still decrypt; if it was accepted, it
    /// must have been the original message in all but encoding.
    fn attempt_then_original(
        &self,
        sender: Curve25519PublicKey,
        original: &PreKeyMessage,
        attempt_sender: Curve25519PublicKey,
        attempt: &PreKeyMessage,
    ) {
        let (user, device) = alice();
        let before = (self.outstanding(), self.m.stats().prekeys_decrypted);
        let result =
            self.rt.block_on(
                self.m
                    .decrypt_prekey(&user, &device, attempt_sender, attempt),
            );
        match result {
            Err(_) => {
                assert_eq!(
                    (self.outstanding(), self.m.stats().prekeys_decrypted),
                    before,
                    "a refused pre-key message changed state"
                );
                let inbound = self
                    .rt
                    .block_on(self.m.decrypt_prekey(&user, &device, sender, original))
                    .expect("the original message still decrypts after a refused attempt");
                assert_eq!(inbound.plaintext.as_slice(), PLAINTEXT.as_bytes());
            }
            Ok(inbound) => {
                // Only an equivalent encoding of the original may succeed.
                assert_eq!(attempt_sender, sender, "decrypted under a forged sender");
                assert_eq!(
                    inbound.plaintext.as_slice(),
                    PLAINTEXT.as_bytes(),
                    "a mutated message decrypted to a different plaintext"
                );
            }
        }
        assert_eq!(
            self.outstanding(),
            before.0 - 1,
            "the key was not consumed once"
        );
    }
}

/// Protobuf-encode a pre-key message from its parts (version 3), so that
/// structurally valid messages with arbitrary keys and payloads reach the
/// session-creation code, not just the decoder.
fn encode_prekey(otk: &[u8], base: &[u8], identity: &[u8], inner: &[u8]) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
        out.push(tag);
        let mut len = value.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(value);
    }
    let mut out = vec![3u8];
    field(&mut out, 0x0a, otk);
    field(&mut out, 0x12, base);
    field(&mut out, 0x1a, identity);
    field(&mut out, 0x22, inner);
    out
}

/// Run `check` on `CASES` cases of `strategy` against one rig (a store
/// and device shared by the property's cases; each case claims a fresh key).
fn run<S: Strategy>(strategy: S, check: impl Fn(&Rig, S::Value)) {
    let rig = Rig::new();
    let mut runner = TestRunner::new(fuzzing::config(CASES));
    runner
        .run(&strategy, |value| {
            check(&rig, value);
            Ok(())
        })
        .unwrap();
}

/// Decode `bytes` and try them; bytes that do not decode never reach the
/// manager, so the original must simply still decrypt.
fn try_bytes(rig: &Rig, bytes: &[u8], sender: Curve25519PublicKey, original: &PreKeyMessage) {
    let attempt = PreKeyMessage::from_bytes(bytes).unwrap_or_else(|_| original.clone());
    rig.attempt_then_original(sender, original, sender, &attempt);
}

#[test]
fn arbitrary_bytes_never_panic_decrypt_prekey_nor_consume_the_key() {
    run(
        proptest::collection::vec(any::<u8>(), 0..512),
        |rig, bytes| {
            let (sender, original) = rig.fresh_message();
            try_bytes(rig, &bytes, sender, &original);
        },
    );
}

#[test]
fn arbitrary_base64_never_panics_decrypt_prekey_nor_consumes_the_key() {
    run("[A-Za-z0-9+/=]{0,400}|\\PC{0,200}", |rig, text| {
        let (sender, original) = rig.fresh_message();
        let attempt = PreKeyMessage::from_base64(&text).unwrap_or_else(|_| original.clone());
        rig.attempt_then_original(sender, &original, sender, &attempt);
    });
}

#[test]
fn mutated_valid_messages_never_panic_decrypt_prekey_nor_consume_the_key() {
    run(
        proptest::collection::vec(fuzzing::mutation(), 1..6),
        |rig, mutations| {
            let (sender, original) = rig.fresh_message();
            let mut bytes = original.to_bytes();
            fuzzing::apply(&mut bytes, &mutations);
            try_bytes(rig, &bytes, sender, &original);
        },
    );
}

#[test]
fn well_formed_messages_on_the_real_key_with_arbitrary_parts_never_consume_it() {
    run(
        (
            proptest::array::uniform32(any::<u8>()),
            proptest::array::uniform32(any::<u8>()),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
        ),
        |rig, (base, identity, inner, keep_original_inner)| {
            let (sender, original) = rig.fresh_message();
            let inner = if keep_original_inner {
                original.message().to_bytes()
            } else {
                inner
            };
            let bytes = encode_prekey(original.one_time_key().as_bytes(), &base, &identity, &inner);
            try_bytes(rig, &bytes, sender, &original);
        },
    );
}

#[test]
fn a_valid_message_under_a_wrong_sender_key_is_refused_and_keeps_the_key() {
    run(
        proptest::array::uniform32(any::<u8>()),
        |rig, sender_bytes| {
            let (sender, original) = rig.fresh_message();
            let wrong = Curve25519PublicKey::from_bytes(sender_bytes);
            if wrong != sender {
                rig.attempt_then_original(sender, &original, wrong, &original);
            }
        },
    );
}
