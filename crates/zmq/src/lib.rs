//! # eventplane-zmq
//!
//! The peer-to-peer transport: no broker. Each publisher binds its own socket
//! on an ephemeral TCP port and registers `tcp://host:port` in discovery;
//! each subscriber watches discovery and connects to and disconnects from
//! publishers as they come and go, without a restart.
//!
//! Why libzmq (through the `zmq` crate) and not the pure-Rust `zeromq`: on
//! this project's 2-core reference machine libzmq moved 1.3-2.0 M msg/s with
//! a p50 of 21 µs, against 1.1 M msg/s and 63-87 µs for `zeromq`, which also
//! drops silently at a fixed 100,000-message queue (`../shared/BRIEF.md`).
//!
//! ## Sockets and threads
//!
//! - Publisher: an **XPUB** socket (a PUB that also reports subscriptions).
//!   Publishing takes the socket's lock and sends with `DONTWAIT` from the
//!   caller's thread: no hop through a queue. A small driver thread per
//!   publisher reads the subscriptions and sends a **welcome heartbeat** the
//!   moment a subscriber joins (so subscribers learn they are connected
//!   without sleeping: the slow-joiner problem), plus a heartbeat whenever
//!   the publisher has been idle for the heartbeat interval.
//! - Subscriber: a **SUB** socket read by the subscriber itself when the
//!   application asks for the next event (waiting on the socket's signal fd
//!   in the async reactor: no reader thread, one wake-up per message burst).
//!   A discovery watcher task sends it connect / disconnect commands over a
//!   bounded channel; they are carried out at the next receive.
//!
//! ## Frames
//!
//! Each message is **one** ZMQ frame: the channel subject, a NUL byte, then
//! the envelope (see `docs/wire-format.md`). Subscribers subscribe to the
//! subject followed by the NUL, so ZMQ's prefix filter matches channels
//! exactly (`kv` does not match `kv-events`). One frame rather than a
//! `[subject, envelope]` multipart pair for two reasons: libzmq asserts
//! (`!_more` in `fq.cpp`, libzmq issue 2163) when a SUB socket disconnects a
//! publisher while a multipart message from it is half read, which our
//! subscribers do whenever discovery says a publisher left; and one frame
//! halves the per-message work of libzmq.
//!
//! ## High-water marks
//!
//! libzmq's default of 1,000 messages dropped 87% of a burst here. We set
//! send and receive high-water marks explicitly, by default to
//! [`DEFAULT_HWM`] messages each: deep enough that bursts of KV events
//! (thousands of blocks a second per worker) ride through a subscriber's
//! brief stall, bounded so that a dead or stuck subscriber costs at most
//! `2 × HWM × message size` of memory per connection. Past the mark, PUB
//! drops for that subscriber only; sequence tracking reports every such
//! loss as a gap, so nothing is lost silently.

mod publisher;
mod subscriber;

use eventplane_core::Channel;
use std::time::Duration;

pub use publisher::publish_on;
pub use subscriber::{subscribe_to, DISCONNECT_GRACE};

/// Default send and receive high-water mark, in messages. See the crate docs.
pub const DEFAULT_HWM: i32 = 100_000;

/// Options of the ZMQ transport.
#[derive(Debug, Clone)]
pub struct ZmqOptions {
    /// The address publishers bind and advertise (an IP or host name
    /// reachable by subscribers).
    pub host: String,
    /// Send high-water mark of publisher sockets, in messages per subscriber.
    pub sndhwm: i32,
    /// Receive high-water mark of subscriber sockets, in messages per publisher.
    pub rcvhwm: i32,
    /// A publisher idle this long sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// Discovery lease of publisher registrations.
    pub lease_ttl: Duration,
    /// Largest envelope accepted (sent or received).
    pub max_message_bytes: usize,
    /// How long a closing publisher keeps trying to deliver what it queued.
    pub linger: Duration,
}

impl Default for ZmqOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            sndhwm: DEFAULT_HWM,
            rcvhwm: DEFAULT_HWM,
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: eventplane_discovery::DEFAULT_TTL,
            max_message_bytes: eventplane_core::DEFAULT_MAX_MESSAGE_BYTES,
            linger: Duration::from_secs(2),
        }
    }
}

/// Why the ZMQ transport could not set up a publisher or subscriber.
#[derive(Debug, thiserror::Error)]
pub enum ZmqError {
    /// A libzmq call failed.
    #[error("zmq: {what}: {source}")]
    Zmq {
        /// What was being done.
        what: String,
        /// libzmq's error.
        #[source]
        source: zmq::Error,
    },
    /// Discovery failed.
    #[error(transparent)]
    Discovery(#[from] eventplane_discovery::DiscoveryError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The socket could not be registered with the async runtime's reactor
    /// (called outside a tokio runtime?).
    #[error("cannot register the socket with the async runtime: {0}")]
    Reactor(#[source] std::io::Error),
}

pub(crate) fn zmq_err(what: impl Into<String>) -> impl FnOnce(zmq::Error) -> ZmqError {
    let what = what.into();
    move |source| ZmqError::Zmq { what, source }
}

/// The discovery prefix under which the publishers of `channel` register.
/// The trailing `/` keeps one subject from matching another that extends it.
pub fn discovery_prefix(channel: &Channel) -> String {
    format!("eventplane/zmq/{}/", channel.subject())
}

/// The start of every frame on `channel`: its subject and a NUL byte. It is
/// also the subscription prefix.
pub fn frame_prefix(channel: &Channel) -> Vec<u8> {
    let mut p = Vec::with_capacity(channel.subject().len() + 1);
    p.extend_from_slice(channel.subject().as_bytes());
    p.push(0);
    p
}

/// What a publisher registers in discovery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Advertisement {
    /// `tcp://host:port`.
    pub endpoint: String,
    /// The publisher's id.
    pub publisher_id: u64,
    /// The publisher's incarnation.
    pub incarnation: u64,
    /// The channel subject it publishes.
    pub subject: String,
    /// Its process id, for operators.
    pub pid: u32,
}
