//! Deduplication, cut by concept:
//!
//! * [`contract`] — the [`DedupStore`] trait, its answers and errors, and
//!   [`key_for`];
//! * [`memory`] — [`MemoryStore`], in-process and capacity-bounded;
//! * [`redis`] — [`RedisStore`], shared between processes;
//! * [`actor`] — the DedupActor that owns a store's health and the
//!   [`DedupHandle`] message tasks claim through;
//! * one conformance suite (tests only) that both stores pass.
//!
//! [`store`] keeps the former paths.

pub(crate) mod actor;
#[cfg(test)]
mod conformance;
pub(crate) mod contract;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod store;

pub use self::redis::{RedisStore, RedisStoreConfig};
pub use actor::{Claimed, DedupActor, DedupHandle, DedupSettings};
pub(crate) use contract::key_for;
pub use contract::{
    Claim, ClaimToken, CommitOutcome, DedupError, DedupStore, MissingId, DEFAULT_DONE_TTL,
    DEFAULT_LEASE,
};
pub use memory::MemoryStore;
