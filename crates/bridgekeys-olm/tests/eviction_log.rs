//! A claim flood at the outstanding-key bound writes one warning, not one
//! per claim (issue 14, item 5): every claim there evicts a key.
//!
//! Alone in its own test binary: tracing caches per-callsite interest
//! process-wide, so a thread-local subscriber only sees everything when no
//! other test thread hits the same callsites first.
#![allow(clippy::unwrap_used)]

#[path = "it/common.rs"]
mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use bridgekeys_olm::ManagerConfig;
use bridgekeys_store::StoreKey;
use common::{alice, manager};
use ruma::OneTimeKeyAlgorithm;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn fifty_evicting_claims_write_one_warning_and_count_every_eviction() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = ManagerConfig::default();
        c.max_outstanding_keys = 2;
        c
    };
    let m = manager(dir.path(), &StoreKey::generate(), config);
    let (user, device) = alice();
    m.create_device(&user, &device).await.unwrap();
    for _ in 0..52 {
        m.claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
            .await
            .unwrap();
    }
    assert_eq!(m.stats().evicted_keys, 50, "every eviction is counted");
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = logs.matches("evicted the oldest").count();
    assert_eq!(
        lines, 1,
        "one line for 50 evictions within a minute:\n{logs}"
    );
}
