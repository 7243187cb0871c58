//! The subscribing side: decoding envelopes from a transport's
//! [`FrameSource`], tracking every publisher's sequence, and yielding
//! messages and notices.
//!
//! Sequence tracking runs here, after the transport's queue, so that a message
//! lost anywhere upstream (the sender's buffer, the network, the receiver's
//! buffer, this subscriber's own bounded queue) shows as a gap.
//!
//! Input from the network is never trusted: a malformed or oversized
//! envelope, or a payload that does not decode into the expected type, is
//! counted by kind, logged once with context, and skipped.

use bytes::{Buf, Bytes};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::Ordering;

use crate::envelope::{self, unix_nanos, DecodeError};
use crate::name::Channel;
use crate::queue::{Deadline, FrameSource, PublisherChange, SourceCounters, SourceItem, TimedOut};
use crate::sequence::{Notice, SequenceCounters, SequenceTracker, Verdict};
use std::time::Duration;

/// Where a message came from and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The publisher's id.
    pub publisher_id: u64,
    /// The publisher's incarnation.
    pub incarnation: u64,
    /// The message's sequence number.
    pub seq: u64,
    /// When it was published (ns since the Unix epoch, publisher's clock).
    pub timestamp_ns: u64,
    /// When this subscriber received it (ns since the Unix epoch), from the
    /// coarse clock ([`envelope::coarse_unix_nanos`]: 1–4 ms resolution;
    /// precise clock reads were 10.8 % of the ZMQ receiving threads'
    /// samples in `perf`, this one among them). Measure a message's latency
    /// with a precise clock.
    pub received_ns: u64,
    /// It arrived after a gap that skipped it had been reported.
    pub late: bool,
}

/// A message whose payload is left as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// Envelope fields.
    pub meta: Meta,
    /// The payload, sharing the received buffer.
    pub payload: Bytes,
}

/// A message decoded into `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<T> {
    /// Envelope fields.
    pub meta: Meta,
    /// The decoded payload.
    pub value: T,
}

/// What a subscriber yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<M> {
    /// A message, in arrival order.
    Message(M),
    /// Something sequence tracking learnt (gap, restart, ...).
    Notice(Notice),
    /// A publisher came or went in discovery.
    Discovery(PublisherChange),
}

/// A subscriber's totals: transport, decoding and sequence tracking.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberStats {
    /// Messages received by the transport.
    pub received: u64,
    /// Bytes received by the transport.
    pub received_bytes: u64,
    /// Messages dropped because this subscriber's queue was full.
    pub queue_dropped: u64,
    /// Messages with bad framing (wrong frame count or foreign topic).
    pub bad_framing: u64,
    /// Messages over the size limit.
    pub oversized: u64,
    /// Discovery changes dropped because their channel was full.
    pub changes_dropped: u64,
    /// Envelopes that failed to decode, by [`DecodeError::label`].
    pub decode_errors: BTreeMap<&'static str, u64>,
    /// Payloads that did not decode into the subscriber's type.
    pub payload_errors: u64,
    /// Sequence tracking totals.
    pub sequence: SequenceCounters,
}

impl SubscriberStats {
    /// All malformed input: bad framing, oversized, undecodable, bad
    /// payloads.
    pub fn malformed(&self) -> u64 {
        self.bad_framing
            + self.oversized
            + self.decode_errors.values().sum::<u64>()
            + self.payload_errors
    }
}

/// Logs a problem the first time it happens for a given kind, and counts
/// every occurrence. Later occurrences are only counted (visible in stats).
#[derive(Debug, Default)]
pub struct LogOnce {
    seen: std::collections::HashSet<&'static str>,
}

impl LogOnce {
    /// True the first time `kind` is seen.
    pub fn first(&mut self, kind: &'static str) -> bool {
        self.seen.insert(kind)
    }
}

/// A subscriber whose payloads are left as bytes.
pub struct RawSubscriber {
    channel: Channel,
    source: Box<dyn FrameSource>,
    tracker: SequenceTracker,
    pending: VecDeque<Event<RawMessage>>,
    /// Envelopes of the current batch not yet decoded, and when the batch
    /// arrived. Decoding one at a time, as the application asks, keeps the
    /// first (oldest) message of a burst from waiting for the whole burst's
    /// decoding: that wait landed on exactly the messages that were already
    /// the latest, so it showed in the tail of the latency.
    frames: VecDeque<Bytes>,
    frames_received_ns: u64,
    notices: Vec<Notice>,
    decode_errors: BTreeMap<&'static str, u64>,
    payload_errors: u64,
    log: LogOnce,
    _guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for RawSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSubscriber")
            .field("channel", &self.channel)
            .finish()
    }
}

impl RawSubscriber {
    /// A subscriber for `channel` reading `source`. `guard` keeps the
    /// transport's resources (threads, sockets, watchers) alive; dropping the
    /// subscriber drops it. Transports call this.
    pub fn new(
        channel: Channel,
        source: Box<dyn FrameSource>,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        Self {
            channel,
            source,
            tracker: SequenceTracker::default(),
            pending: VecDeque::new(),
            frames: VecDeque::new(),
            frames_received_ns: 0,
            notices: Vec::new(),
            decode_errors: BTreeMap::new(),
            payload_errors: 0,
            log: LogOnce::default(),
            _guard: guard,
        }
    }

    /// The channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The next event; `None` once the transport has shut down.
    pub async fn recv(&mut self) -> Option<Event<RawMessage>> {
        loop {
            if let Some(ev) = self.next_buffered() {
                return Some(ev);
            }
            let item = std::future::poll_fn(|cx| self.source.poll_next(cx)).await?;
            if let Some(ev) = self.absorb(item) {
                return Some(ev);
            }
        }
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Event<RawMessage>> {
        loop {
            if let Some(ev) = self.next_buffered() {
                return Some(ev);
            }
            let item = self.source.try_next()?;
            if let Some(ev) = self.absorb(item) {
                return Some(ev);
            }
        }
    }

    /// The next event, blocking this thread for at most `timeout`: for a
    /// subscriber that has a thread of its own (a KV indexer, say). `Ok(None)`
    /// once the transport has shut down.
    ///
    /// Over ZMQ this waits in the socket itself, as a raw libzmq subscriber
    /// does: the message is read by the thread that the network wakes, with
    /// no async reactor in between, which measured p99 publish → receive
    /// 1.0-1.1× raw libzmq's at 50,000 msg/s where [`recv`](Self::recv) on
    /// a current-thread runtime measured 1.3× (`eventplane bench transport`).
    /// The discovery watcher still runs on the async runtime that created
    /// the subscriber, so that runtime must keep running.
    ///
    /// Do not call it from an async task: it blocks the task's thread.
    pub fn recv_blocking(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Event<RawMessage>>, TimedOut> {
        self.recv_before(&mut Deadline::after(timeout))
    }

    /// [`recv_blocking`](Self::recv_blocking) with a deadline whose clock
    /// starts only if something must be waited for: while messages stream
    /// in, no call reads the clock (one read per message was ~20 ns of the
    /// receiving thread's time at millions of messages a second).
    fn recv_before(
        &mut self,
        deadline: &mut Deadline,
    ) -> Result<Option<Event<RawMessage>>, TimedOut> {
        loop {
            if let Some(ev) = self.next_buffered() {
                return Ok(Some(ev));
            }
            match self.source.wait_next(deadline)? {
                Some(item) => {
                    if let Some(ev) = self.absorb(item) {
                        return Ok(Some(ev));
                    }
                }
                None => return Ok(None),
            }
        }
    }

    /// An event from what has been taken from the source already: pending
    /// events first, then the next undecoded envelope. `None` when both are
    /// empty (only then is the source read, so order is kept).
    fn next_buffered(&mut self) -> Option<Event<RawMessage>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            let frame = self.frames.pop_front()?;
            if let Some(ev) = self.absorb_frame(frame, self.frames_received_ns) {
                return Some(ev);
            }
        }
    }

    /// Reports publishers silent for `timeout_ns` as [`Notice::Silent`] events.
    pub fn check_silence(&mut self, timeout_ns: u64) {
        self.tracker
            .poll_silence(unix_nanos(), timeout_ns, &mut self.notices);
        self.pending
            .extend(self.notices.drain(..).map(Event::Notice));
    }

    /// The publisher's (incarnation, highest sequence) as tracked.
    pub fn position(&self, publisher_id: u64) -> Option<(u64, u64)> {
        self.tracker.position(publisher_id)
    }

    /// Totals so far.
    pub fn stats(&self) -> SubscriberStats {
        let c: &SourceCounters = self.source.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        SubscriberStats {
            received: get(&c.frames),
            received_bytes: get(&c.bytes),
            queue_dropped: get(&c.queue_dropped),
            bad_framing: get(&c.bad_framing),
            oversized: get(&c.oversized),
            changes_dropped: get(&c.changes_dropped),
            decode_errors: self.decode_errors.clone(),
            payload_errors: self.payload_errors,
            sequence: self.tracker.counters(),
        }
    }

    /// Takes an item from the source, called only when nothing is buffered:
    /// returns the event to hand over now, if there is one (a lone envelope
    /// is decoded at once, without a round through `frames`), and buffers
    /// the rest.
    fn absorb(&mut self, item: SourceItem) -> Option<Event<RawMessage>> {
        match item {
            SourceItem::Change(c) => Some(Event::Discovery(c)),
            SourceItem::Batch(batch) => {
                self.frames_received_ns = envelope::coarse_unix_nanos();
                self.frames.extend(batch);
                None
            }
            SourceItem::Frame(frame) => self.absorb_frame(frame, envelope::coarse_unix_nanos()),
        }
    }

    /// Decodes and tracks one envelope; called only when `pending` is empty.
    /// Returns the event to hand over now: the message, unless notices about
    /// it (a gap, a restart) came first, in which case they and the message
    /// after them join `pending` and the first of them is returned.
    fn absorb_frame(&mut self, frame: Bytes, now: u64) -> Option<Event<RawMessage>> {
        // The transport has checked the frame's subject (docs/wire-format.md
        // §2): the envelope no longer repeats it.
        let env = match envelope::decode(&frame) {
            Ok(env) => env,
            Err(e) => {
                self.decode_failed(e, &frame);
                return None;
            }
        };
        let header = env.header;
        let payload_range = offset_of(&frame, env.payload);
        let verdict = self.tracker.observe(&header, now, &mut self.notices);
        if !self.notices.is_empty() {
            self.pending
                .extend(self.notices.drain(..).map(Event::Notice));
        }
        let Verdict::Deliver { late } = verdict else {
            return self.pending.pop_front();
        };
        let meta = Meta {
            publisher_id: header.publisher_id,
            incarnation: header.incarnation,
            seq: header.seq,
            timestamp_ns: header.timestamp_ns,
            received_ns: now,
            late,
        };
        // The frame becomes the payload by moving its bounds: a slice would
        // count a reference up, and dropping the frame count it down again,
        // two atomic operations per message. (The payload is the last field;
        // `truncate` only acts on envelopes with fields from a later version
        // after it.)
        let mut payload = frame;
        payload.advance(payload_range.start);
        payload.truncate(payload_range.len());
        let message = Event::Message(RawMessage { meta, payload });
        if self.pending.is_empty() {
            return Some(message);
        }
        self.pending.push_back(message);
        self.pending.pop_front()
    }

    fn decode_failed(&mut self, e: DecodeError, frame: &[u8]) {
        *self.decode_errors.entry(e.label()).or_default() += 1;
        if self.log.first(e.label()) {
            let head: String = frame.iter().take(16).map(|b| format!("{b:02x}")).collect();
            tracing::warn!(
                channel = %self.channel, error = %e, len = frame.len(), head = %head,
                "malformed envelope dropped (further ones of this kind are counted, not logged)"
            );
        }
    }

    fn payload_failed(
        &mut self,
        meta: &Meta,
        type_name: &'static str,
        e: &rmp_serde::decode::Error,
    ) {
        self.payload_errors += 1;
        if self.log.first("payload") {
            tracing::warn!(
                channel = %self.channel, publisher_id = meta.publisher_id, seq = meta.seq, expected = type_name, error = %e,
                "payload does not decode into the expected type; dropped (further ones are counted, not logged)"
            );
        }
    }
}

fn offset_of(outer: &[u8], inner: &[u8]) -> std::ops::Range<usize> {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

/// A subscriber that decodes payloads (MessagePack, as [`crate::Publisher::publish`]
/// writes them) into `T`. Payloads that do not decode are counted and skipped.
pub struct Subscriber<T> {
    raw: RawSubscriber,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscriber<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.raw.fmt(f)
    }
}

impl<T: DeserializeOwned> Subscriber<T> {
    /// Wraps a raw subscriber.
    pub fn new(raw: RawSubscriber) -> Self {
        Self {
            raw,
            _type: PhantomData,
        }
    }

    /// The next event; `None` once the transport has shut down.
    pub async fn recv(&mut self) -> Option<Event<Message<T>>> {
        loop {
            let ev = self.raw.recv().await?;
            if let Some(ev) = self.typed(ev) {
                return Some(ev);
            }
        }
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Event<Message<T>>> {
        loop {
            let ev = self.raw.try_recv()?;
            if let Some(ev) = self.typed(ev) {
                return Some(ev);
            }
        }
    }

    /// The next event, blocking this thread for at most `timeout`; see
    /// [`RawSubscriber::recv_blocking`].
    pub fn recv_blocking(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Event<Message<T>>>, TimedOut> {
        let mut deadline = Deadline::after(timeout);
        loop {
            let Some(ev) = self.raw.recv_before(&mut deadline)? else {
                return Ok(None);
            };
            if let Some(ev) = self.typed(ev) {
                return Ok(Some(ev));
            }
        }
    }

    fn typed(&mut self, ev: Event<RawMessage>) -> Option<Event<Message<T>>> {
        Some(match ev {
            Event::Message(m) => match rmp_serde::from_slice::<T>(&m.payload) {
                Ok(value) => Event::Message(Message {
                    meta: m.meta,
                    value,
                }),
                Err(e) => {
                    self.raw
                        .payload_failed(&m.meta, std::any::type_name::<T>(), &e);
                    return None;
                }
            },
            Event::Notice(n) => Event::Notice(n),
            Event::Discovery(c) => Event::Discovery(c),
        })
    }

    /// The underlying raw subscriber.
    pub fn raw(&mut self) -> &mut RawSubscriber {
        &mut self.raw
    }

    /// Totals so far.
    pub fn stats(&self) -> SubscriberStats {
        self.raw.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{encode, Header, Kind};
    use crate::name::Scope;
    use crate::queue::{source_queue, QueueLimits};

    fn frame(seq: u64) -> Vec<u8> {
        let header = Header {
            kind: Kind::Data,
            publisher_id: 5,
            incarnation: 1,
            seq,
            timestamp_ns: 1,
        };
        let mut buf = Vec::new();
        encode(&header, b"p", &mut buf);
        buf
    }

    /// Hands envelopes over one at a time, as the ZMQ transport's blocking
    /// receive and a NATS subscriber at moderate rates do.
    struct OneByOne(VecDeque<Bytes>, SourceCounters);

    impl FrameSource for OneByOne {
        fn poll_next(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<SourceItem>> {
            std::task::Poll::Ready(self.try_next())
        }
        fn try_next(&mut self) -> Option<SourceItem> {
            self.0.pop_front().map(SourceItem::Frame)
        }
        fn counters(&self) -> &SourceCounters {
            &self.1
        }
    }

    /// Messages taken one by one and from a batch alike: a notice about a
    /// message (here the gap that dropped envelopes left) comes right before
    /// it, and envelopes that do not decode (one cut short, one of another
    /// wire version) are counted by reason and not delivered.
    #[test]
    fn notices_precede_their_message_and_undecodable_envelopes_are_counted() {
        let ch = Scope::new("n", "c").unwrap().channel("t").unwrap();
        let mut cut_short = frame(2);
        cut_short.pop();
        let mut other_version = frame(3);
        other_version[1] = 1;
        let frames = vec![
            Bytes::from(frame(1)),
            Bytes::from(cut_short),
            Bytes::from(other_version),
            Bytes::from(frame(4)),
        ];
        let (tx, batched) = source_queue(QueueLimits::default());
        assert!(tx.push(frames.clone(), 1));
        let one_by_one = OneByOne(frames.into(), SourceCounters::default());
        let sources: [Box<dyn FrameSource>; 2] = [Box::new(batched), Box::new(one_by_one)];
        for source in sources {
            let mut sub = RawSubscriber::new(ch.clone(), source, Box::new(()));
            let mut events = Vec::new();
            while let Some(ev) = sub.try_recv() {
                events.push(match ev {
                    Event::Message(m) => format!("message {}", m.meta.seq),
                    Event::Notice(Notice::Joined { .. }) => "joined".into(),
                    Event::Notice(Notice::Gap { first, last, .. }) => format!("gap {first}-{last}"),
                    other => format!("{other:?}"),
                });
            }
            assert_eq!(events, ["joined", "message 1", "gap 2-3", "message 4"]);
            let st = sub.stats();
            assert_eq!(st.decode_errors.get("truncated"), Some(&1), "{st:?}");
            assert_eq!(
                st.decode_errors.get("unsupported_version"),
                Some(&1),
                "{st:?}"
            );
            assert_eq!(st.malformed(), 2, "{st:?}");
        }
    }
}
