//! Buffers that hold secrets: sized once, zeroed when dropped.
//!
//! A `Vec` that grows reallocates, and the old allocation is freed with its
//! bytes still in it, where no `Zeroizing` can reach them. So JSON that
//! holds a secret (an account pickle, a remembered plaintext) is written
//! into a buffer of exactly its size, measured by a first pass.

use serde::Serialize;
use zeroize::Zeroizing;

/// `value` as JSON in a buffer of exactly its size, zeroed when dropped.
pub(crate) fn json_zeroizing<T: Serialize>(
    value: &T,
) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
    /// Counts what would be written.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *out, value)?;
    Ok(out)
}
