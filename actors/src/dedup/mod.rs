//! Deduplication: the store backends and the DedupActor in front of them.

pub mod actor;
pub mod store;

pub use actor::{Claimed, DedupActor, DedupHandle, DedupSettings, StoreFailed};
pub use store::{
    key_for, Claim, ClaimToken, CommitOutcome, DedupError, DedupStore, MemoryStore, MissingId,
    RedisStore,
};
