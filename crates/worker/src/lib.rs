//! Workers: the processes that publish what is in their KV cache.
//!
//! - [`mock`]: the mock engine, a simulation of a vLLM-style paged KV cache
//!   and scheduler (sans-IO: time is an argument), so the whole system can
//!   run and be tested without a GPU.
//! - [`relay`]: republishes a real engine's KV events as ours.
//! - [`kv_publish`]: publishing KV event batches within a transport's
//!   message size limit.

pub mod kv_publish;
pub mod mock;
pub mod relay;
