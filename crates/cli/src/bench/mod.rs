//! `eventplane bench`: measurements reproducible from one command.
//!
//! - [`transport`]: publisher → subscriber throughput, loss and latency.
//! - [`frontend`]: the frontend's routing overhead.
//! - [`index`]: replaying a KV workload through the prefix index.
//! - [`relay`]: engine KV events through the relay.
//! - [`host`]: how busy the (virtual) host was meanwhile.

pub mod frontend;
pub mod host;
pub mod index;
pub mod relay;
pub mod transport;

/// The middle value of `v` (the upper middle of an even count): what every
/// bench reports of repeated runs or rounds. `v` must not be empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
