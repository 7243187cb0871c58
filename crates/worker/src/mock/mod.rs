//! The mock engine's core: [`pool`] (blocks, prefix caching, eviction, KV
//! events) and [`engine`] (requests, scheduling, timing), sans-IO; around
//! them [`service`] (the engine task), [`http`] (the OpenAI API),
//! [`vllm_mirror`] (vLLM's own event protocol) and [`run`] (starting it all).

pub mod engine;
pub mod http;
pub mod pool;
pub mod run;
pub mod service;
pub mod vllm_mirror;

pub use engine::{
    Engine, EngineConfig, Load, NewRequest, Output, Rejected, RequestId, Step, Timing, Usage,
};
pub use pool::BlockPool;
pub use run::{
    register, registration_key, registration_prefix, start, MockWorkerSettings, RunningWorker,
    WorkerAdvert,
};
