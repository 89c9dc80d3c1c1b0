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

/// Zero the stack below the caller's frame (32 KiB of it), where the
/// functions it called left their locals.
///
/// Deserializing an account pickle with a secret key in it leaves copies of
/// the key in the dead stack frames of serde and vodozemac. A later call
/// that builds a value on the stack with uninitialised room in it (an
/// `ArrayVec`'s free slots, say) and moves it into a `Box` copies those dead
/// bytes to the heap, and vodozemac frees such a box during decryption
/// without zeroing it. Wiping the region first keeps the key out of it.
#[inline(never)]
pub(crate) fn scrub_stack() {
    let mut region = [0u8; 32 * 1024];
    zeroize::Zeroize::zeroize(&mut region[..]);
    std::hint::black_box(&region);
}
