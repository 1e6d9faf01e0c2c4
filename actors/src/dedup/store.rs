//! The dedup stores, by their former path: the contract is in
//! [`super::contract`], the stores in [`super::memory`] and [`super::redis`].

pub use super::contract::*;
pub use super::memory::MemoryStore;
pub use super::redis::{RedisStore, RedisStoreConfig};
