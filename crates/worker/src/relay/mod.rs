//! The relay: in front of a real engine (vLLM, SGLang), it subscribes to the
//! engine's KV-event socket(s), re-hashes what the engine caches with our
//! block hashing, and republishes it as our KV events.
//!
//! - [`decode`]: the engines' MessagePack formats, both encodings.
//! - [`state`]: per-rank sequence tracking, replay, restarts and the
//!   engine-hash → our-hash map (sans-IO).
//! - [`load`]: the engine's load, read from its Prometheus metrics.
//! - [`run`]: the sockets: a thread per rank, replay requests, publishing.

pub mod decode;
pub mod load;
pub mod run;
pub mod state;

pub use decode::{decode_batch, DecodeError, EngineBatch, EngineEvent, EngineHash};
pub use run::{start, RankEndpoints, RelaySettings, RunningRelay};
pub use state::{lora_salt, Live, RankRelay, RelayStats};
