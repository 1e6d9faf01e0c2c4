//! Deduplication: the store backends and the DedupActor in front of them.

pub mod store;

pub use store::{
    key_for, Claim, ClaimToken, CommitOutcome, DedupError, DedupStore, MemoryStore, MissingId,
    RedisStore,
};
