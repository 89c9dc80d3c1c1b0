//! [`Fetch`]: a read whose answer may come later.
//!
//! The [`Store`](crate::Store) methods are synchronous: sled answers from
//! its own pages at once, and a backend behind a network blocks its caller
//! for the round trip. On a tokio runtime that caller is a worker thread,
//! so while it waits for the server it runs no other task; with two
//! workers, two such reads at once stop everything else. A read on the
//! path of many concurrent callers (loading a device that is not cached,
//! which nearly every claim does in a bridge with a million puppets) can
//! instead be returned as a `Fetch`: the backend starts the request and the
//! caller awaits the answer, and the worker serves other tasks meanwhile.

use std::{future::Future, pin::Pin};

use crate::StoreError;

/// A backend's own wait for an answer.
type Later<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// The answer of a read, now or later: await [`Fetch::answer`].
///
/// A backend that answers at once (sled, memory) returns
/// [`Fetch::ready`]; one behind a network returns [`Fetch::from_future`]
/// with its request already under way, so that awaiting it holds no thread.
#[must_use = "the answer of a Fetch is lost unless it is awaited"]
pub struct Fetch<T>(FetchInner<T>);

enum FetchInner<T> {
    Ready(Result<T, StoreError>),
    Later(Later<T>),
}

impl<T> Fetch<T> {
    /// An answer the backend already has.
    pub fn ready(answer: Result<T, StoreError>) -> Self {
        Self(FetchInner::Ready(answer))
    }

    /// An answer that `answer` resolves to. The request should be under
    /// way before this returns (spawned on the backend's own runtime, say),
    /// so that callers who start several reads wait for them together.
    pub fn from_future(answer: impl Future<Output = Result<T, StoreError>> + Send + 'static) -> Self
    where
        T: 'static,
    {
        Self(FetchInner::Later(Box::pin(answer)))
    }

    /// The answer, once the backend has it.
    pub async fn answer(self) -> Result<T, StoreError> {
        match self.0 {
            FetchInner::Ready(answer) => answer,
            FetchInner::Later(later) => later.await,
        }
    }
}

impl<T> std::fmt::Debug for Fetch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            FetchInner::Ready(_) => "Fetch::Ready",
            FetchInner::Later(_) => "Fetch::Later",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_fetch_gives_its_answer_and_a_later_one_the_futures() {
        assert_eq!(Fetch::ready(Ok(3)).answer().await.expect("ready"), 3);
        assert!(matches!(
            Fetch::<u8>::ready(Err(StoreError::Closed)).answer().await,
            Err(StoreError::Closed)
        ));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let later = Fetch::from_future(async move { rx.await.map_err(|_| StoreError::Closed) });
        assert_eq!(format!("{later:?}"), "Fetch::Later");
        tx.send(7).expect("receiver alive");
        assert_eq!(later.answer().await.expect("sent"), 7);
    }
}
