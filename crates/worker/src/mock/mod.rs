//! The mock engine's core: [`pool`] (blocks, prefix caching, eviction, KV
//! events) and [`engine`] (requests, scheduling, timing).

pub mod engine;
pub mod http;
pub mod pool;
pub mod run;
pub mod service;

pub use engine::{
    Engine, EngineConfig, Load, NewRequest, Output, Rejected, RequestId, Step, Timing, Usage,
};
pub use pool::BlockPool;
pub use run::{
    registration_key, registration_prefix, start, MockWorkerSettings, RunningWorker, WorkerAdvert,
};
