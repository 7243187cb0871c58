//! The bounded hand-off between a transport's receiving side and a subscriber.
//!
//! A transport pushes batches of encoded envelopes with [`SourceTx::push`];
//! the subscriber pulls them through [`Source`]'s [`FrameSource`] methods.
//! The queue is bounded twice: in batches (the channel's capacity) and in
//! bytes (the sum of the envelopes waiting). A push that would exceed either
//! bound is refused, never waited for, and the refused messages are counted:
//! a slow consumer costs messages (which its sequence tracking then reports
//! as gaps), never memory and never the transport's progress.
//!
//! Discovery changes travel beside the data on a small channel of their own,
//! so a full data queue cannot hide that a publisher came or went.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Bounds of a subscriber's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most bytes of envelopes waiting at once.
    pub max_bytes: usize,
    /// Most batches waiting at once.
    pub max_batches: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_batches: 4096,
        }
    }
}

/// A publisher appeared in or vanished from discovery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PublisherChange {
    /// A publisher registered; the transport is connecting to it.
    #[serde(rename = "publisher_added")]
    Added {
        /// Where it is (for ZMQ, `tcp://host:port`).
        endpoint: String,
        /// Its publisher id, if the registration says.
        publisher_id: Option<u64>,
        /// Its incarnation, if the registration says.
        incarnation: Option<u64>,
    },
    /// A publisher's registration is gone (withdrawn, or its lease expired);
    /// the transport has disconnected from it.
    #[serde(rename = "publisher_removed")]
    Removed {
        /// Where it was.
        endpoint: String,
        /// Its publisher id, if known.
        publisher_id: Option<u64>,
    },
}

/// One item taken from a [`Source`].
#[derive(Debug)]
pub enum SourceItem {
    /// Encoded envelopes, in arrival order.
    Batch(Vec<Bytes>),
    /// One encoded envelope: what a blocking receive hands over as soon as
    /// it has it, without a batch to allocate.
    Frame(Bytes),
    /// A discovery change.
    Change(PublisherChange),
}

/// Counters a transport keeps about what it received, shared with the
/// subscriber so they show in its stats.
#[derive(Debug, Default)]
pub struct SourceCounters {
    /// Messages received from the network (well-framed or not).
    pub frames: AtomicU64,
    /// Bytes of those messages.
    pub bytes: AtomicU64,
    /// Messages refused because the queue was full (in bytes or batches).
    pub queue_dropped: AtomicU64,
    /// Bytes of those messages.
    pub queue_dropped_bytes: AtomicU64,
    /// Messages with the wrong number of frames or a foreign topic frame.
    pub bad_framing: AtomicU64,
    /// Messages larger than the subscriber's size limit.
    pub oversized: AtomicU64,
    /// Discovery changes refused because their channel was full.
    pub changes_dropped: AtomicU64,
}

impl SourceCounters {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one frame of `bytes` bytes received, for a transport whose
    /// receiving side is the only writer of [`frames`](Self::frames) and
    /// [`bytes`](Self::bytes) (readers only load them). A load and a store
    /// instead of two locked read-modify-writes per message: with one
    /// writer no increment can be lost, and readers still see whole values.
    pub fn count_frame_single_writer(&self, bytes: usize) {
        let add = |counter: &AtomicU64, n: u64| {
            counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed)
        };
        add(&self.frames, 1);
        add(&self.bytes, bytes as u64);
    }
}

/// Where a subscriber's input comes from. The in-process transport uses the
/// bounded queue of this module ([`Source`]); a transport may instead read its
/// socket directly when the subscriber polls (the ZMQ transport does, so a
/// message reaches the application with one thread wake-up, not two).
pub trait FrameSource: Send + 'static {
    /// Polls for the next item; `None` once the transport has shut down.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<SourceItem>>;
    /// The next item if one is ready now.
    fn try_next(&mut self) -> Option<SourceItem>;
    /// The transport's counters.
    fn counters(&self) -> &SourceCounters;

    /// Blocks the calling thread until the next item, at the latest until
    /// `deadline`: `Ok(None)` once the transport has shut down,
    /// `Err(TimedOut)` if nothing came in time. For a subscriber that has a
    /// thread of its own. The deadline is passed unstarted when nothing has
    /// been waited for yet: an item that is ready must be returned without
    /// reading the clock (see [`Deadline`]).
    ///
    /// The default polls [`poll_next`](Self::poll_next) with a waker that
    /// unparks this thread. A transport whose input is a socket overrides it
    /// to block in the socket's own wait (the ZMQ transport does): one
    /// wake-up per message, with no reactor in between.
    fn wait_next(&mut self, deadline: &mut Deadline) -> Result<Option<SourceItem>, TimedOut> {
        // What is ready needs no waker (an allocation) and no clock.
        if let Some(item) = self.try_next() {
            return Ok(Some(item));
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(item) = self.poll_next(&mut cx) {
                return Ok(item);
            }
            let left = deadline.left();
            if left.is_zero() {
                return Err(TimedOut);
            }
            std::thread::park_timeout(left);
        }
    }
}

/// The time left of a blocking receive's timeout, with the clock started
/// only when something must be waited for: a receive served from what is
/// already buffered reads no clock at all. (A clock read is 20–50 ns here;
/// taken once per message, it was the subscriber thread's largest single
/// cost at a million messages a second.)
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    timeout: Duration,
    at: Option<Instant>,
}

impl Deadline {
    /// A deadline `timeout` after the first call to [`left`](Self::left).
    pub fn after(timeout: Duration) -> Self {
        Deadline { timeout, at: None }
    }

    /// The time left: the whole timeout on the first call (which starts the
    /// clock), then what remains of it; zero once it has passed.
    pub fn left(&mut self) -> Duration {
        match self.at {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => {
                self.at = Some(Instant::now() + self.timeout);
                self.timeout
            }
        }
    }
}

/// Nothing arrived within the time given to a blocking receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nothing arrived in time")]
pub struct TimedOut;

/// Wakes a thread parked in [`FrameSource::wait_next`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl FrameSource for Source {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<SourceItem>> {
        Source::poll_next(self, cx)
    }
    fn try_next(&mut self) -> Option<SourceItem> {
        Source::try_next(self)
    }
    fn counters(&self) -> &SourceCounters {
        &self.counters
    }
}

/// The transport's end of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SourceTx {
    batches: mpsc::Sender<(Vec<Bytes>, usize)>,
    changes: mpsc::Sender<PublisherChange>,
    in_flight: Arc<AtomicUsize>,
    max_bytes: usize,
    counters: Arc<SourceCounters>,
}

/// The subscriber's end of the queue.
#[derive(Debug)]
pub struct Source {
    batches: mpsc::Receiver<(Vec<Bytes>, usize)>,
    changes: mpsc::Receiver<PublisherChange>,
    in_flight: Arc<AtomicUsize>,
    counters: Arc<SourceCounters>,
}

/// A new bounded queue.
pub fn source_queue(limits: QueueLimits) -> (SourceTx, Source) {
    let (btx, brx) = mpsc::channel(limits.max_batches.max(1));
    let (ctx, crx) = mpsc::channel(1024);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counters = Arc::new(SourceCounters::default());
    (
        SourceTx {
            batches: btx,
            changes: ctx,
            in_flight: in_flight.clone(),
            max_bytes: limits.max_bytes,
            counters: counters.clone(),
        },
        Source {
            batches: brx,
            changes: crx,
            in_flight,
            counters,
        },
    )
}

impl SourceTx {
    /// Offers a batch of envelopes totalling `bytes`. Returns `false` (and
    /// counts the messages as dropped) when the queue is full; never waits.
    pub fn push(&self, batch: Vec<Bytes>, bytes: usize) -> bool {
        if batch.is_empty() {
            return true;
        }
        let n = batch.len() as u64;
        let prior = self.in_flight.fetch_add(bytes, Ordering::AcqRel);
        if prior + bytes > self.max_bytes && prior > 0 {
            self.in_flight.fetch_sub(bytes, Ordering::AcqRel);
            self.count_dropped(n, bytes);
            return false;
        }
        if self.batches.try_send((batch, bytes)).is_err() {
            self.in_flight.fetch_sub(bytes, Ordering::AcqRel);
            self.count_dropped(n, bytes);
            return false;
        }
        true
    }

    fn count_dropped(&self, n: u64, bytes: usize) {
        self.counters.queue_dropped.fetch_add(n, Ordering::Relaxed);
        self.counters
            .queue_dropped_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Reports a discovery change; counted as dropped if that channel is full.
    pub fn change(&self, change: PublisherChange) {
        if self.changes.try_send(change).is_err() {
            SourceCounters::bump(&self.counters.changes_dropped);
        }
    }

    /// The counters shared with the subscriber.
    pub fn counters(&self) -> &Arc<SourceCounters> {
        &self.counters
    }

    /// True once the subscriber has gone away.
    pub fn is_closed(&self) -> bool {
        self.batches.is_closed()
    }
}

impl Source {
    /// Polls for the next item: discovery changes first, then data. `None`
    /// when every sender is gone.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<SourceItem>> {
        if let Poll::Ready(Some(c)) = self.changes.poll_recv(cx) {
            return Poll::Ready(Some(SourceItem::Change(c)));
        }
        match self.batches.poll_recv(cx) {
            Poll::Ready(Some((batch, bytes))) => {
                self.in_flight.fetch_sub(bytes, Ordering::AcqRel);
                Poll::Ready(Some(SourceItem::Batch(batch)))
            }
            // Data closed: whatever changes remain were drained above.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The next item if one is ready now.
    pub fn try_next(&mut self) -> Option<SourceItem> {
        if let Ok(c) = self.changes.try_recv() {
            return Some(SourceItem::Change(c));
        }
        let (batch, bytes) = self.batches.try_recv().ok()?;
        self.in_flight.fetch_sub(bytes, Ordering::AcqRel);
        Some(SourceItem::Batch(batch))
    }

    /// The counters shared with the transport.
    pub fn counters(&self) -> &Arc<SourceCounters> {
        &self.counters
    }

    /// Bytes waiting in the queue now.
    pub fn queued_bytes(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_starts_at_its_first_use_and_runs_out() {
        let mut d = Deadline::after(Duration::from_secs(3600));
        // The whole timeout at first use, however long after creation.
        assert_eq!(d.left(), Duration::from_secs(3600));
        let second = d.left();
        assert!(second <= Duration::from_secs(3600) && second > Duration::from_secs(3590));
        let mut gone = Deadline::after(Duration::ZERO);
        assert_eq!(gone.left(), Duration::ZERO);
        assert_eq!(gone.left(), Duration::ZERO);
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let (tx, mut rx) = source_queue(QueueLimits {
            max_bytes: 10,
            max_batches: 8,
        });
        assert!(tx.push(vec![Bytes::from_static(b"123456")], 6));
        assert!(!tx.push(vec![Bytes::from_static(b"123456")], 6));
        assert_eq!(tx.counters().queue_dropped.load(Ordering::Relaxed), 1);
        assert!(
            matches!(std::future::poll_fn(|cx| rx.poll_next(cx)).await, Some(SourceItem::Batch(b)) if b.len() == 1)
        );
        assert_eq!(rx.queued_bytes(), 0);
        assert!(tx.push(vec![Bytes::from_static(b"123456")], 6));
    }

    #[tokio::test]
    async fn an_oversized_batch_passes_an_empty_queue() {
        // Otherwise one batch larger than the bound could never be delivered.
        let (tx, _rx) = source_queue(QueueLimits {
            max_bytes: 4,
            max_batches: 8,
        });
        assert!(tx.push(vec![Bytes::from_static(b"123456")], 6));
    }

    #[tokio::test]
    async fn changes_come_first() {
        let (tx, mut rx) = source_queue(QueueLimits::default());
        tx.push(vec![Bytes::from_static(b"x")], 1);
        tx.change(PublisherChange::Removed {
            endpoint: "e".into(),
            publisher_id: None,
        });
        assert!(matches!(
            std::future::poll_fn(|cx| rx.poll_next(cx)).await,
            Some(SourceItem::Change(_))
        ));
        assert!(matches!(
            std::future::poll_fn(|cx| rx.poll_next(cx)).await,
            Some(SourceItem::Batch(_))
        ));
    }
}
