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

pub mod actor;
#[cfg(test)]
mod conformance;
pub mod contract;
pub mod memory;
pub mod redis;
pub mod store;

pub use self::redis::{RedisStore, RedisStoreConfig};
pub use actor::{Claimed, DedupActor, DedupHandle, DedupSettings, StoreFailed};
pub use contract::{
    key_for, Claim, ClaimToken, CommitOutcome, DedupError, DedupStore, MissingId,
    MissingIdRejected, DEFAULT_DONE_TTL, DEFAULT_LEASE, DEFAULT_REDIS_TIMEOUT,
};
pub use memory::MemoryStore;
