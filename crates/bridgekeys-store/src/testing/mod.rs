//! Test support for backends and for the crates built on the store
//! (feature `testing`, off by default).
//!
//! * [`MemoryStore`]: a [`Backend`](crate::Backend) that keeps everything in
//!   memory, with the same semantics as [`SledStore`](crate::SledStore), so
//!   a test of the account manager or the appservice needs no temporary
//!   directory and no `fsync`, and can make the store fail on demand
//!   ([`MemoryStore::fail_writes`], [`MemoryStore::fail_durability`]). Its
//!   leases are real, so one `MemoryStore` shared by two listeners stands in
//!   for two processes sharing one database.
//! * [`Intercepted`]: any backend, wrapped so a test can act or fail right
//!   before a write reaches it ([`Write`]): hold a claim in flight, let
//!   another "process" write between this one's load and its write, break
//!   the disk for one kind of write.
//! * [`legacy`]: a store in an older build's layout, written in bulk, to
//!   test and time the upgrade at open on a bridge-sized store.
//! * [`conformance`]: the [`Store`](crate::Store) contract in executable
//!   form: one check per guarantee, run against any backend with
//!   [`conformance_tests!`](crate::conformance_tests) (and
//!   [`lease_conformance_tests!`](crate::lease_conformance_tests) for a
//!   backend several processes share).

pub mod conformance;
mod intercept;
pub mod legacy;
mod memory;

pub use intercept::{Intercepted, Write};
pub use memory::MemoryStore;
