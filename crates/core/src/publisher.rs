//! The publishing side: numbering, stamping and encoding messages, then
//! handing them to a transport's [`FrameSink`].
//!
//! A [`Publisher`] is a cheap handle (clone it freely). Each publish takes one
//! short lock that covers allocating the sequence number and handing the
//! encoded envelope to the sink, so that numbers leave in order even when
//! several threads publish, and a heartbeat can never announce a number whose
//! message has not been handed over yet. The sink lives inside that lock, so
//! a transport needs no lock of its own around its socket: its driver reaches
//! the socket through [`Publisher::drive`], under the same lock. (A second
//! lock in the ZMQ sink was a sixth of the publishing thread's own samples in
//! `perf`: each locked instruction waits for the frame just copied to leave
//! the store buffer.) Sinks never wait for subscribers:
//! when one cannot keep up the transport drops for it, and its sequence
//! tracking reports exactly what was lost.

use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::envelope::{unix_nanos, HeadTemplate, Kind};
use crate::name::Channel;

/// A publisher's identity on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Stable across restarts when the application chooses it (a worker id).
    pub publisher_id: u64,
    /// New at every start: the start time in nanoseconds, made strictly
    /// increasing within a process.
    pub incarnation: u64,
}

impl Identity {
    /// An identity for `publisher_id` with a fresh incarnation.
    pub fn new(publisher_id: u64) -> Self {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = unix_nanos();
        let mut prev = LAST.load(Ordering::Relaxed);
        let incarnation = loop {
            let next = now.max(prev + 1);
            match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(p) => prev = p,
            }
        };
        Self {
            publisher_id,
            incarnation,
        }
    }

    /// An identity with a random publisher id (restarts then look like new
    /// publishers, not new incarnations).
    pub fn random() -> Self {
        Self::new(rand::random())
    }
}

/// Why a transport refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The transport has been shut down.
    #[error("the transport is closed")]
    Closed,
    /// The transport failed; the message was not sent.
    #[error("transport error: {0}")]
    Transport(String),
}

/// Why a publish failed. The message was not sent and used no sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The encoded envelope is larger than the channel allows.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes on {subject}")]
    TooLarge {
        /// Encoded envelope size.
        size: usize,
        /// The configured limit.
        limit: usize,
        /// The channel.
        subject: String,
    },
    /// The value could not be serialized.
    #[error("cannot encode the message: {0}")]
    Encode(String),
    /// The transport refused it.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// What a transport provides to a publisher: somewhere to put encoded
/// envelopes for one channel.
///
/// The publisher owns its sink and calls it only under its send lock, one
/// call at a time: the sink needs no synchronisation of its own.
pub trait FrameSink: Send + 'static {
    /// Sends one frame, given in two parts to be sent back to back: `head`
    /// ([`frame_prefix`](Self::frame_prefix) and the envelope up to its
    /// payload) and `payload`. Two parts so that the payload is copied once,
    /// into the transport's own buffer. Must return promptly: it may drop for slow
    /// subscribers but must never wait for them.
    fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError>;

    /// Reads what subscribers have sent the transport and returns how many
    /// new subscriptions arrived since the last call (0 when the transport
    /// cannot tell). Called by [`Publisher::drive`], which welcomes them with
    /// a heartbeat at once. Must not wait.
    fn take_joined(&mut self) -> u64 {
        0
    }

    /// Bytes the transport wants in front of every envelope (the ZMQ
    /// transport puts the subject there, for subscribers' prefix filters), so the
    /// publisher can encode the whole frame in one buffer without a copy.
    /// Read once, when the publisher is created: it must not change.
    fn frame_prefix(&self) -> &[u8] {
        &[]
    }

    /// The number of subscriptions the transport has seen so far, as a value
    /// that changes when a subscriber joins; `None` if the transport cannot
    /// tell.
    fn subscriptions(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Totals kept by a publisher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublisherStats {
    /// Data messages handed to the transport.
    pub published: u64,
    /// Heartbeats handed to the transport.
    pub heartbeats: u64,
    /// Payload bytes published.
    pub bytes: u64,
    /// Publishes refused (too large, encode or transport error).
    pub errors: u64,
}

struct SendState {
    /// Last sequence number handed to the sink.
    seq: u64,
    last_send_ns: u64,
    buf: Vec<u8>,
    stats: PublisherStats,
    sink: Box<dyn FrameSink>,
}

struct Inner {
    channel: Channel,
    identity: Identity,
    /// The sink's frame prefix and this publisher's constant envelope fields,
    /// encoded once.
    head: HeadTemplate,
    /// Length of the sink's frame prefix, at the start of every frame.
    prefix_len: usize,
    max_message_bytes: usize,
    state: Mutex<SendState>,
    /// The sink's subscription count, if it keeps one.
    subscriptions: Option<tokio::sync::watch::Receiver<u64>>,
}

/// A publisher bound to one channel. See the module docs.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

/// A handle that does not keep the publisher alive (for heartbeat drivers).
#[derive(Clone)]
pub struct WeakPublisher(Weak<Inner>);

impl WeakPublisher {
    /// The publisher, if it still exists.
    pub fn upgrade(&self) -> Option<Publisher> {
        self.0.upgrade().map(|inner| Publisher { inner })
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.inner.channel)
            .field("identity", &self.inner.identity)
            .finish()
    }
}

impl Publisher {
    /// A publisher on `channel` writing to `sink`. Transports call this; users
    /// get publishers from the event plane.
    pub fn new(
        channel: Channel,
        identity: Identity,
        max_message_bytes: usize,
        sink: Box<dyn FrameSink>,
    ) -> Self {
        let head = HeadTemplate::new(
            sink.frame_prefix(),
            identity.publisher_id,
            identity.incarnation,
        );
        let prefix_len = sink.frame_prefix().len();
        let subscriptions = sink.subscriptions();
        let state = SendState {
            seq: 0,
            last_send_ns: 0,
            buf: Vec::with_capacity(256),
            stats: PublisherStats::default(),
            sink,
        };
        Self {
            inner: Arc::new(Inner {
                channel,
                identity,
                head,
                prefix_len,
                max_message_bytes,
                state: Mutex::new(state),
                subscriptions,
            }),
        }
    }

    /// Publishes a value, encoded as a MessagePack map (field names included,
    /// so readers in any language can ignore fields they do not know).
    /// Returns its sequence number.
    pub fn publish<T: Serialize + ?Sized>(&self, value: &T) -> Result<u64, PublishError> {
        let payload = rmp_serde::to_vec_named(value).map_err(|e| {
            self.count_error();
            PublishError::Encode(e.to_string())
        })?;
        self.publish_bytes(&payload)
    }

    /// Publishes raw bytes as the payload. Returns its sequence number.
    pub fn publish_bytes(&self, payload: &[u8]) -> Result<u64, PublishError> {
        self.send(Kind::Data, payload)
    }

    /// Sends a heartbeat announcing the last sequence number published.
    /// Transports call this when the publisher is idle and when a subscriber joins.
    pub fn heartbeat(&self) -> Result<(), PublishError> {
        self.send(Kind::Heartbeat, &[]).map(|_| ())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SendState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, kind: Kind, payload: &[u8]) -> Result<u64, PublishError> {
        self.send_locked(&mut self.lock(), kind, payload)
    }

    fn send_locked(
        &self,
        st: &mut SendState,
        kind: Kind,
        payload: &[u8],
    ) -> Result<u64, PublishError> {
        let inner = &*self.inner;
        let seq = match kind {
            Kind::Data => st.seq + 1,
            Kind::Heartbeat => st.seq,
        };
        let now = unix_nanos();
        let SendState { buf, sink, .. } = st;
        buf.clear();
        inner.head.encode(kind, seq, now, payload.len(), buf);
        let size = buf.len() + payload.len() - inner.prefix_len;
        if size > inner.max_message_bytes {
            st.stats.errors += 1;
            return Err(PublishError::TooLarge {
                size,
                limit: inner.max_message_bytes,
                subject: inner.channel.subject().to_owned(),
            });
        }
        if let Err(e) = sink.send(buf, payload) {
            st.stats.errors += 1;
            return Err(e.into());
        }
        st.last_send_ns = now;
        match kind {
            Kind::Data => {
                st.seq = seq;
                st.stats.published += 1;
                st.stats.bytes += payload.len() as u64;
            }
            Kind::Heartbeat => st.stats.heartbeats += 1,
        }
        Ok(seq)
    }

    fn count_error(&self) {
        self.lock().stats.errors += 1;
    }

    /// Waits until the transport has seen at least `n` subscriptions. Returns
    /// `false` at once if the transport cannot tell.
    pub async fn wait_for_subscriptions(&self, n: u64) -> bool {
        let Some(mut rx) = self.inner.subscriptions.clone() else {
            return false;
        };
        let reached = rx.wait_for(|&count| count >= n).await.is_ok();
        reached
    }

    /// The largest encoded envelope this publisher sends; larger publishes
    /// are refused with [`PublishError::TooLarge`]. Callers that batch (KV
    /// events) split below it.
    pub fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }

    /// The channel.
    pub fn channel(&self) -> &Channel {
        &self.inner.channel
    }

    /// The identity on the wire.
    pub fn identity(&self) -> Identity {
        self.inner.identity
    }

    /// The last sequence number published (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().seq
    }

    /// Sends a heartbeat if nothing has been sent for `interval_ns` before
    /// `now_ns`; returns whether it did. Transports call it periodically so
    /// that silence is never mistaken for idleness, and so that a subscriber
    /// learns of loss at the tail of a stream.
    pub fn heartbeat_if_idle(&self, now_ns: u64, interval_ns: u64) -> bool {
        self.heartbeat_locked_if_idle(&mut self.lock(), now_ns, interval_ns)
    }

    fn heartbeat_locked_if_idle(&self, st: &mut SendState, now_ns: u64, interval_ns: u64) -> bool {
        now_ns.saturating_sub(st.last_send_ns) >= interval_ns
            && self.send_locked(st, Kind::Heartbeat, &[]).is_ok()
    }

    /// What a transport's driver calls periodically, under the publisher's
    /// lock (no publish runs meanwhile): the sink reads what subscribers
    /// sent ([`FrameSink::take_joined`]); a heartbeat goes out at once if a
    /// subscriber joined (its welcome), else if nothing was sent for
    /// `idle_interval_ns` before `now_ns`. Returns how many joined.
    pub fn drive(&self, now_ns: u64, idle_interval_ns: u64) -> u64 {
        let mut st = self.lock();
        let joined = st.sink.take_joined();
        let interval_ns = if joined > 0 { 0 } else { idle_interval_ns };
        self.heartbeat_locked_if_idle(&mut st, now_ns, interval_ns);
        joined
    }

    /// Nanoseconds since anything (data or heartbeat) was sent, at `now_ns`.
    pub fn idle_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.lock().last_send_ns)
    }

    /// Totals so far.
    pub fn stats(&self) -> PublisherStats {
        self.lock().stats
    }

    /// A handle that does not keep the publisher alive.
    pub fn downgrade(&self) -> WeakPublisher {
        WeakPublisher(Arc::downgrade(&self.inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::Scope;

    #[derive(Default, Clone)]
    struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Capture {
        fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
            self.0.lock().unwrap().push([head, payload].concat());
            Ok(())
        }
    }

    fn channel() -> Channel {
        Scope::new("n", "c").unwrap().channel("t").unwrap()
    }

    #[test]
    fn numbers_are_contiguous_and_heartbeats_announce_the_last() {
        let cap = Capture::default();
        let p = Publisher::new(channel(), Identity::new(5), 1 << 20, Box::new(cap.clone()));
        p.heartbeat().unwrap();
        assert_eq!(p.publish(&"a").unwrap(), 1);
        assert_eq!(p.publish_bytes(b"b").unwrap(), 2);
        p.heartbeat().unwrap();
        let frames = cap.0.lock().unwrap();
        let seqs: Vec<(Kind, u64)> = frames
            .iter()
            .map(|f| {
                let e = crate::envelope::decode(f).unwrap();
                (e.header.kind, e.header.seq)
            })
            .collect();
        assert_eq!(
            seqs,
            vec![
                (Kind::Heartbeat, 0),
                (Kind::Data, 1),
                (Kind::Data, 2),
                (Kind::Heartbeat, 2)
            ]
        );
        let e = crate::envelope::decode(&frames[1]).unwrap();
        assert_eq!(rmp_serde::from_slice::<String>(e.payload).unwrap(), "a");
    }

    #[test]
    fn too_large_uses_no_sequence_number() {
        let cap = Capture::default();
        let p = Publisher::new(channel(), Identity::new(5), 100, Box::new(cap.clone()));
        assert!(matches!(
            p.publish_bytes(&[0; 200]),
            Err(PublishError::TooLarge { .. })
        ));
        assert_eq!(p.publish_bytes(b"ok").unwrap(), 1);
        assert_eq!(p.stats().errors, 1);
    }

    /// A sink that records frames and reports the subscriptions it is told of.
    struct Joining {
        frames: Capture,
        joined: Arc<AtomicU64>,
    }
    impl FrameSink for Joining {
        fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
            self.frames.send(head, payload)
        }
        fn take_joined(&mut self) -> u64 {
            self.joined.swap(0, Ordering::Relaxed)
        }
    }

    #[test]
    fn drive_welcomes_at_once_and_otherwise_heartbeats_only_when_idle() {
        let frames = Capture::default();
        let joined = Arc::new(AtomicU64::new(0));
        let sink = Joining {
            frames: frames.clone(),
            joined: joined.clone(),
        };
        let p = Publisher::new(channel(), Identity::new(5), 1 << 20, Box::new(sink));
        let kinds = || -> Vec<(Kind, u64)> {
            frames
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|f| {
                    let h = crate::envelope::decode(f).unwrap().header;
                    (h.kind, h.seq)
                })
                .collect()
        };
        p.publish_bytes(b"a").unwrap();
        let sent_ns = unix_nanos();
        let second = 1_000_000_000;
        // Busy, nobody new: nothing.
        assert_eq!(p.drive(sent_ns, second), 0);
        assert_eq!(kinds(), vec![(Kind::Data, 1)]);
        // Busy, but two subscribers joined: welcomed at once.
        joined.store(2, Ordering::Relaxed);
        assert_eq!(p.drive(sent_ns, second), 2);
        assert_eq!(kinds(), vec![(Kind::Data, 1), (Kind::Heartbeat, 1)]);
        // Idle for the interval: a heartbeat announcing the last number.
        assert_eq!(p.drive(unix_nanos() + second, second), 0);
        assert_eq!(kinds().len(), 3);
        assert_eq!(kinds()[2], (Kind::Heartbeat, 1));
    }

    #[test]
    fn incarnations_increase() {
        let a = Identity::new(1);
        let b = Identity::new(1);
        assert!(b.incarnation > a.incarnation);
    }
}
