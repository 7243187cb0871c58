//! `eventplane bench`: measurements reproducible from one command.
//!
//! - [`transport`]: publisher → subscriber throughput, loss and latency.
//! - [`index`]: replaying a KV workload through the prefix index.

pub mod index;
pub mod transport;
