//! `eventplane bench`: measurements reproducible from one command.
//!
//! - [`transport`]: publisher → subscriber throughput, loss and latency.
//! - [`frontend`]: the frontend's routing overhead.
//! - [`index`]: replaying a KV workload through the prefix index.
//! - [`relay`]: engine KV events through the relay.

pub mod frontend;
pub mod index;
pub mod relay;
pub mod transport;
