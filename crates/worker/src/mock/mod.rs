//! The mock engine's core: [`pool`] (blocks, prefix caching, eviction, KV
//! events) and [`engine`] (requests, scheduling, timing).

pub mod engine;
pub mod pool;

pub use engine::{
    Engine, EngineConfig, Load, NewRequest, Output, Rejected, RequestId, Step, Timing, Usage,
};
pub use pool::BlockPool;
