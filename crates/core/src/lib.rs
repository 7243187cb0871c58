//! # eventplane-core
//!
//! The transport-neutral heart of eventplane: how channels are named, what
//! every message carries on the wire, how subscribers account for every
//! publisher's stream, and the publisher/subscriber API that transports plug
//! into.
//!
//! - [`name`]: [`Scope`] + topic = [`Channel`], escaped into a wire subject.
//! - [`envelope`]: the MessagePack envelope (publisher id, incarnation,
//!   sequence, timestamp, payload; the subject travels in the transport's
//!   framing) and its codec.
//! - [`sequence`]: [`SequenceTracker`], a sans-IO state machine that detects
//!   gaps, restarts, duplicates and reordering per publisher.
//! - [`publisher`]: [`Publisher`], numbering and encoding messages into a
//!   transport's [`FrameSink`].
//! - [`queue`]: the bounded (in bytes and batches) queue from a transport's
//!   receiving side to a subscriber; every drop is counted.
//! - [`subscriber`]: [`RawSubscriber`] and typed [`Subscriber`], yielding
//!   messages, sequence notices and discovery changes.
//! - [`mem`]: the in-process transport.
//!
//! The envelope codec and the sequence tracker do no I/O and read no clock:
//! time is an argument. Transports (ZMQ, later NATS) live in their own crates
//! and depend on this one, never the reverse.

pub mod envelope;
pub mod mem;
pub mod name;
pub mod publisher;
pub mod queue;
pub mod sequence;
pub mod subscriber;

pub use envelope::{Header, Kind};
pub use mem::MemBus;
pub use name::{Channel, NameError, Scope};
pub use publisher::{FrameSink, Identity, PublishError, Publisher, PublisherStats, SendError};
pub use queue::{
    source_queue, Deadline, FrameSource, PublisherChange, QueueLimits, Source, SourceItem,
    SourceTx, TimedOut,
};
pub use sequence::{Notice, SequenceCounters, SequenceTracker};
pub use subscriber::{
    Event, Message, Meta, RawMessage, RawSubscriber, Subscriber, SubscriberStats,
};

/// Default limit on one encoded envelope, in bytes (4 MiB). Larger publishes
/// are refused with [`PublishError::TooLarge`]; larger received messages are
/// counted as oversized and dropped.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;
