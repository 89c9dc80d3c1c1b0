//! Secrets do not outlive their use in freed memory (issue 14, item 9):
//! the pre-key path puts a one-time key back into a copy of the account
//! through its pickle, and a delivery remembers the plaintext for retries;
//! neither may leave a copy behind in a buffer freed without being zeroed.
//! Nor in the stack: dead stack bytes get copied into heap blocks when a
//! value with uninitialised room is moved into a `Box` (vodozemac does so
//! while decrypting), which made this test fail in a build with line-table
//! debug info only, until the pre-key path wiped its stack
//! (`wipe::scrub_stack`).
//!
//! The test binary's allocator scans every block freed on the test's thread
//! ([`bridgekeys_leakcheck`]).
#![allow(clippy::unwrap_used)]

#[path = "it/common.rs"]
mod common;

use bridgekeys_leakcheck::{LeakCheck, Pattern, freed_blocks_holding};
use bridgekeys_olm::ManagerConfig;
use bridgekeys_store::{DeviceKey, StoreKey};
use common::{Peer, alice, decrypt, manager, payload_for};
use ruma::OneTimeKeyAlgorithm;
use vodozemac::olm::OlmMessage;

#[global_allocator]
static ALLOC: LeakCheck = LeakCheck;

#[test]
fn a_pre_key_message_with_a_delivery_leaves_neither_the_key_nor_the_plaintext_in_freed_memory() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), &StoreKey::generate(), ManagerConfig::default());
    let (user, device) = alice();
    let claimed = runtime.block_on(async {
        m.create_device(&user, &device).await.unwrap();
        m.claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await
            .unwrap()
            .remove(0)
    });
    let public = claimed.key.key.as_bytes().to_vec();
    let record = m
        .store()
        .one_time_key(
            &DeviceKey::new(user.as_str(), device.as_str()),
            &<[u8; 32]>::try_from(public.as_slice()).unwrap(),
        )
        .unwrap()
        .expect("the claimed key is stored");
    let mut peer = Peer::new(&m, &user, &device, &public);
    let payload = payload_for(&m, &user, &device, &peer.account, "a secret sentence");
    let message = peer.session.encrypt(&payload).unwrap();
    assert!(matches!(message, OlmMessage::PreKey(_)));

    let stride = std::mem::size_of::<serde_json::Value>();
    let mut patterns = Pattern::all_forms(&record.secret_key[..], stride);
    // The form a delivery record keeps the plaintext in.
    patterns.push(Pattern::Bytes(
        vodozemac::base64_encode(payload.as_bytes()).into_bytes(),
    ));
    let ((first, retry), leaks) = freed_blocks_holding(patterns, || {
        runtime.block_on(async {
            let sender_key = peer.curve25519();
            let first = decrypt(&m, &user, &device, sender_key, &message, Some("txn-1")).await;
            // The homeserver retries the delivery: answered from its record.
            let retry = decrypt(&m, &user, &device, sender_key, &message, Some("txn-1")).await;
            (first, retry)
        })
    });
    let (first, retry) = (first.unwrap(), retry.unwrap());
    assert_eq!(first.plaintext, b"a secret sentence");
    assert!(first.new_session);
    assert_eq!(retry.plaintext, first.plaintext);
    assert_eq!(leaks, 0, "freed blocks still held the key or the plaintext");
}
