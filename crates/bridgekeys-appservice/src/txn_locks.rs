//! Per-transaction-id async locks, so that a duplicate transaction arriving
//! while the first is still running waits for it instead of running twice.
//! Entries are removed when nobody holds or waits for them, so the map stays
//! as small as the number of transactions in flight.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub(crate) struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

pub(crate) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Lock `key`. If somebody else holds it (an in-flight duplicate),
    /// `on_contended` runs before waiting; the bool says whether it ran.
    pub(crate) async fn lock(
        &self,
        key: &str,
        on_contended: impl FnOnce(),
    ) -> (KeyedGuard<'_>, bool) {
        let entry = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(key.to_owned()).or_default())
        };
        let (guard, contended) = match Arc::clone(&entry).try_lock_owned() {
            Ok(g) => (g, false),
            Err(_) => {
                on_contended();
                (entry.lock_owned().await, true)
            }
        };
        (
            KeyedGuard {
                locks: self,
                key: key.to_owned(),
                guard: Some(guard),
            },
            contended,
        )
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        self.guard.take();
        // Only the map holds it now: nobody holds or waits for the lock.
        if map
            .get(&self.key)
            .is_some_and(|e| Arc::strong_count(e) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KeyedLocks;

    #[tokio::test]
    async fn keyed_locks_report_contention_and_clean_up() {
        let locks = KeyedLocks::default();
        let (g1, contended) = locks.lock("a", || {}).await;
        assert!(!contended);
        let (g2, contended) = locks.lock("b", || {}).await;
        assert!(!contended, "different ids never wait for each other");
        drop(g2);
        assert_eq!(locks.len(), 1);
        drop(g1);
        assert_eq!(locks.len(), 0, "no entry is left behind");
    }
}
