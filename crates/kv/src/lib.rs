//! The router's KV logic, sans-IO: plain deterministic data structures with
//! no sockets and no clocks (time is an argument where it matters).
//!
//! - [`hash`]: block hashing, the one function routers and workers share.
//! - [`event`]: the KV-event, load-metric and active-sequence messages.
//! - [`index`]: the prefix index (fed by KV events; one writer, lock-free
//!   readers) and the approximate index (fed by routing decisions).
//! - [`router`]: active-sequence tracking and the worker choice.
//! - [`tokenize`]: the built-in deterministic tokenizer.
//! - [`workload`]: reading `*.kvops.jsonl` replay files for benchmarks.
//!
//! This crate knows nothing of transports: the router feeds it what it
//! receives and asks it questions.

pub mod event;
pub mod hash;
pub mod index;
pub mod router;
pub mod tokenize;
pub mod workload;

pub use event::{KvEvent, KvEventBatch, WorkerKey};
pub use hash::{block_hashes, BlockHash, LocalHash, Salt, SeqHash, SeqHashes};
pub use index::{ApproxConfig, ApproxIndex, IndexReader, IndexStats, Matches, PrefixIndex};
