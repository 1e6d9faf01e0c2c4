//! The dedup stores, by their former path: the contract is in
//! [`super::contract`], the stores in [`super::memory`] and [`super::redis`].
