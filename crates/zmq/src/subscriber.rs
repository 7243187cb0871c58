//! The subscribing side of the ZMQ transport: a SUB socket read directly by
//! the subscriber's task, steered by a discovery watcher.
//!
//! There is no reader thread: [`ZmqSource::poll_next`] reads the socket when
//! the application asks for the next message, and otherwise waits on the
//! socket's signal file descriptor in the async runtime's reactor. A message
//! therefore reaches the application with one thread wake-up (as with a raw
//! SUB socket), and a slow application leaves its backlog in the socket's
//! receive buffer, bounded by the receive high-water mark, from where it
//! backs up to the publisher, which drops for this subscriber alone; sequence
//! tracking reports each such loss as a gap.
//!
//! Connects and disconnects ordered by discovery are carried out when the
//! subscriber is next polled, so a subscriber joins its publishers once the
//! application starts receiving (a `recv` that is waiting counts).

use bytes::Bytes;
use eventplane_core::queue::{
    Deadline, FrameSource, PublisherChange, SourceCounters, SourceItem, TimedOut,
};
use eventplane_core::subscriber::LogOnce;
use eventplane_core::{Channel, RawSubscriber};
use eventplane_discovery::{Discovery, WatchEvent};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use crate::{discovery_prefix, zmq_err, Advertisement, ZmqError, ZmqOptions};

/// How long after a publisher leaves discovery its connection is closed: a
/// little longer than a closing publisher lingers to deliver what it queued
/// ([`crate::ZmqOptions::linger`], 2 s by default).
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(3);

/// Most messages handed to the subscriber in one batch.
const BATCH_MESSAGES: usize = 1024;

/// Envelopes up to this size are copied into a shared buffer
/// ([`ZmqSource::arena`]); larger ones keep libzmq's buffer (no copy).
const COPY_BELOW: usize = 1024;

/// Bound on connect / disconnect commands waiting for the subscriber.
const COMMANDS: usize = 4096;

/// What the discovery watcher asks of the socket.
#[derive(Debug)]
enum Command {
    /// Connect to `endpoint` and report `change`.
    Connect {
        endpoint: String,
        change: PublisherChange,
    },
    /// Report `change` (the publisher left; the disconnect comes later).
    Report(PublisherChange),
    /// Disconnect from `endpoint` (after the grace period).
    Disconnect { endpoint: String },
}

/// The socket's signal descriptor, borrowed: the socket owns and closes it.
struct SignalFd(RawFd);

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A received ZMQ message, kept as the owner of the bytes handed out.
struct Frame(zmq::Message);

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The subscriber's input: the SUB socket and the watcher's commands.
pub struct ZmqSource {
    // Declared before `sub`, so it is deregistered before the socket closes.
    /// The socket's signal fd in the async reactor, while receiving async.
    /// A blocking receive takes it out: registered (edge-triggered), every
    /// message would also wake the runtime's thread for nothing, a second
    /// wake-up per message that measured +20 µs at p50 on 2 cores.
    signal: Option<AsyncFd<SignalFd>>,
    sub: zmq::Socket,
    commands: mpsc::Receiver<Command>,
    connected: HashSet<String>,
    /// The last read ended with an empty socket: wait for its signal before
    /// reading again.
    drained: bool,
    prefix: Vec<u8>,
    max_bytes: usize,
    counters: Arc<SourceCounters>,
    log: LogOnce,
    channel: Channel,
    /// For blocking waits ([`FrameSource::wait_next`]): the waker the
    /// watcher's commands ring, which sends [`WAKE`] into the socket itself
    /// (see [`ControlWaker`]). Made on first use.
    wake: Option<Waker>,
    /// The context `sub` belongs to: the wake-up socket must share it.
    ctx: zmq::Context,
    /// Blocking receives: the command queue was found empty with the
    /// blocking waker registered since the last [`WAKE`], so it need not be
    /// looked at again until the next one arrives. (Looking at it for every
    /// message, with a waker clone and registration each time, was about a
    /// fifth of what eventplane adds to the receiving thread in `perf` of a
    /// one-process 100 B bench.)
    commands_armed: bool,
    /// The socket's `ZMQ_RCVTIMEO` as last set, in ms (-1: forever).
    rcvtimeo: i32,
    /// Where small envelopes are copied: a chunk of [`ARENA_CHUNK`] bytes
    /// shared by the envelopes cut from it (reused from its start once the
    /// last of them is dropped, else freed then), instead of an allocation
    /// each. In `perf` of a 100 B bench, `malloc` and `free` were ~5 % of
    /// the receiving threads' samples (libzmq's own included).
    arena: bytes::BytesMut,
    /// The message each receive fills: reused (libzmq releases what it held
    /// first), so a message costs no `zmq_msg_init` and no separate close.
    /// [`accept`](Self::accept) takes it over only for envelopes it keeps
    /// without a copy.
    received: zmq::Message,
}

/// Size of the chunks [`ZmqSource::arena`] cuts small envelopes from.
const ARENA_CHUNK: usize = 32 << 10;

/// The whole frame of a wake-up: it starts with a NUL, which no channel's
/// subject does, so it cannot be mistaken for an envelope.
const WAKE: &[u8] = b"\0eventplane-wake";

/// Wakes a thread blocked in the SUB socket's own `recv` when a discovery
/// command is waiting: it sends [`WAKE`] from a PUB socket bound on
/// `inproc://` to which the SUB socket is connected.
///
/// Why a message and not an eventfd beside the socket: waiting on two
/// descriptors needs `zmq_poll`, which costs three to four system calls per
/// message more than a blocking `recv` (a `poll(0)` first pass, a
/// `ZMQ_EVENTS` check before and after, and the failing `recv` that finds
/// the socket empty). A blocking `recv` is exactly what a raw libzmq
/// subscriber does, wake-ups included. The waker may be called from any
/// thread: the mutex gives the socket the full barrier libzmq asks for
/// between threads.
struct ControlWaker(Mutex<zmq::Socket>);

impl Wake for ControlWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let socket = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A full pipe means wake-ups are already waiting: nothing is lost.
        let _ = socket.send(WAKE, zmq::DONTWAIT);
    }
}

/// Names of the wake-up endpoints, unique in the process (and so in any
/// context).
static WAKE_ENDPOINTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Stops the discovery watcher when the subscriber is dropped.
struct Guard(tokio::task::JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Subscribes to `channel`: a SUB socket connected to every publisher of the
/// channel that `discovery` knows of, now and later.
pub async fn subscribe_to(
    ctx: &zmq::Context,
    discovery: &Arc<dyn Discovery>,
    channel: &Channel,
    opts: &ZmqOptions,
) -> Result<RawSubscriber, ZmqError> {
    let sub = ctx.socket(zmq::SUB).map_err(zmq_err("create SUB socket"))?;
    sub.set_rcvhwm(opts.rcvhwm).map_err(zmq_err("set RCVHWM"))?;
    // libzmq's own hard cap protects memory from a hostile peer; messages
    // between our limit and this cap are counted as oversized.
    let hard_cap = (opts.max_message_bytes as i64)
        .saturating_mul(4)
        .max(1 << 20);
    sub.set_maxmsgsize(hard_cap)
        .map_err(zmq_err("set MAXMSGSIZE"))?;
    sub.set_linger(0).map_err(zmq_err("set LINGER"))?;
    // Everything: each publisher's socket carries this one channel only
    // (docs/wire-format.md §5.1), and `accept` checks every frame's prefix
    // itself, counting foreign ones. Subscribing to the subject instead would
    // have libzmq match it byte by byte in a trie on both sides for every
    // message: ~4 % of the publishing and of the receiving thread's samples
    // in `perf` of a one-process 100 B bench.
    sub.set_subscribe(b"").map_err(zmq_err("subscribe"))?;
    let signal = register_signal(&sub)?;

    let counters = Arc::new(SourceCounters::default());
    let (tx, commands) = mpsc::channel(COMMANDS);
    let watch = discovery.watch(&discovery_prefix(channel)).await?;
    let watcher = tokio::spawn(follow(watch, tx, counters.clone(), channel.clone()));
    let source = ZmqSource {
        signal: Some(signal),
        sub,
        commands,
        connected: HashSet::new(),
        drained: false,
        prefix: crate::frame_prefix(channel),
        max_bytes: opts.max_message_bytes,
        counters,
        log: LogOnce::default(),
        channel: channel.clone(),
        wake: None,
        commands_armed: false,
        ctx: ctx.clone(),
        rcvtimeo: -1,
        arena: bytes::BytesMut::new(),
        received: zmq::Message::new(),
    };
    Ok(RawSubscriber::new(
        channel.clone(),
        Box::new(source),
        Box::new(Guard(watcher)),
    ))
}

/// The socket's signal descriptor, registered in the current async runtime.
fn register_signal(sub: &zmq::Socket) -> Result<AsyncFd<SignalFd>, ZmqError> {
    let fd = sub.get_fd().map_err(zmq_err("read ZMQ_FD"))?;
    // SAFETY: the descriptor belongs to `sub`, which `ZmqSource` keeps open
    // for longer than the `AsyncFd` (it is declared, so dropped, after it).
    unsafe { AsyncFd::register_with_interest(SignalFd(fd), Interest::READABLE) }
        .map_err(|e| ZmqError::Reactor(e.into_parts().1))
}

/// Turns discovery events into socket commands.
async fn follow(
    mut watch: eventplane_discovery::Watch,
    tx: mpsc::Sender<Command>,
    counters: Arc<SourceCounters>,
    channel: Channel,
) {
    let send = |cmd: Command| {
        if tx.try_send(cmd).is_err() {
            SourceCounters::bump(&counters.changes_dropped);
        }
    };
    let mut by_key: HashMap<String, Advertisement> = HashMap::new();
    // Registrations per endpoint, shared with the delayed disconnects: a
    // publisher that re-registered on the same endpoint keeps its connection.
    let by_endpoint: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    while let Some(ev) = watch.next().await {
        match ev {
            WatchEvent::Added(entry) => {
                match serde_json::from_value::<Advertisement>(entry.value) {
                    Ok(ad) => {
                        tracing::info!(channel = %channel, endpoint = %ad.endpoint, publisher_id = ad.publisher_id, "publisher found; connecting");
                        *by_endpoint
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(ad.endpoint.clone())
                            .or_default() += 1;
                        let change = PublisherChange::Added {
                            endpoint: ad.endpoint.clone(),
                            publisher_id: Some(ad.publisher_id),
                            incarnation: Some(ad.incarnation),
                        };
                        send(Command::Connect {
                            endpoint: ad.endpoint.clone(),
                            change,
                        });
                        by_key.insert(entry.key, ad);
                    }
                    Err(e) => {
                        tracing::warn!(channel = %channel, key = %entry.key, error = %e, "unusable publisher registration ignored")
                    }
                }
            }
            WatchEvent::Removed { key } => {
                let Some(ad) = by_key.remove(&key) else {
                    continue;
                };
                tracing::info!(channel = %channel, endpoint = %ad.endpoint, publisher_id = ad.publisher_id, "publisher gone; disconnecting");
                {
                    let mut counts = by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = counts.get_mut(&ad.endpoint) {
                        *n -= 1;
                        if *n == 0 {
                            counts.remove(&ad.endpoint);
                        }
                    }
                }
                send(Command::Report(PublisherChange::Removed {
                    endpoint: ad.endpoint.clone(),
                    publisher_id: Some(ad.publisher_id),
                }));
                // Disconnect after a grace period: what the publisher sent just
                // before leaving may still be in flight, and disconnecting
                // discards it. Reconnect attempts are cheap to stop late; lost
                // messages cannot be had back.
                let (tx, watched, endpoint) = (tx.clone(), by_endpoint.clone(), ad.endpoint);
                tokio::spawn(async move {
                    tokio::time::sleep(DISCONNECT_GRACE).await;
                    if !watched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&endpoint)
                    {
                        let _ = tx.try_send(Command::Disconnect { endpoint });
                    }
                });
            }
        }
    }
}

impl ZmqSource {
    /// Carries out a command; returns the change to report, if any.
    fn apply(&mut self, cmd: Command) -> Option<PublisherChange> {
        match cmd {
            Command::Connect { endpoint, change } => {
                if self.connected.insert(endpoint.clone()) {
                    if let Err(e) = self.sub.connect(&endpoint) {
                        self.connected.remove(&endpoint);
                        tracing::warn!(channel = %self.channel, endpoint, error = %e, "cannot connect to publisher");
                    }
                }
                Some(change)
            }
            Command::Report(change) => Some(change),
            Command::Disconnect { endpoint } => {
                if self.connected.remove(&endpoint) {
                    if let Err(e) = self.sub.disconnect(&endpoint) {
                        tracing::debug!(channel = %self.channel, endpoint, error = %e, "disconnect failed");
                    }
                }
                None
            }
        }
    }

    /// Reads what the socket holds now, up to a batch.
    fn read_batch(&mut self) -> Option<Vec<Bytes>> {
        let mut batch = Vec::new();
        self.drained = false;
        while batch.len() < BATCH_MESSAGES {
            if self.sub.recv(&mut self.received, zmq::DONTWAIT).is_err() {
                self.drained = true;
                break;
            }
            if let Some(envelope) = self.accept() {
                batch.push(envelope);
            }
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Checks the message just received into [`received`](Self::received)
    /// (reading the rest of it if it has more frames), counts it, and
    /// returns its envelope: `None` if it was dropped (counted, logged once)
    /// or was a [`WAKE`].
    ///
    /// Large envelopes keep libzmq's buffer (no copy); small ones are copied
    /// into [`ZmqSource::arena`], one allocation shared by many messages
    /// instead of one each. The message's bytes are looked up once: each
    /// `Deref` of a `zmq::Message` is two calls into libzmq (data and size,
    /// each checking the message), ~75 instructions, and doing it once per
    /// use cost ~300 instructions a message in callgrind of the bench.
    fn accept(&mut self) -> Option<Bytes> {
        let more = self.received.get_more();
        let frame: &[u8] = &self.received;
        if frame == WAKE {
            self.commands_armed = false;
            return None;
        }
        let mut size = frame.len();
        let mut frames = 1;
        // Ours are single frames; read and discard the rest of anything else.
        let mut more = more;
        while more {
            let mut part = zmq::Message::new();
            if self.sub.recv(&mut part, 0).is_err() {
                break;
            }
            size += part.len();
            frames += 1;
            more = part.get_more();
        }
        self.counters.count_frame_single_writer(size);
        if frames != 1 || !frame.starts_with(&self.prefix) {
            SourceCounters::bump(&self.counters.bad_framing);
            if self.log.first("bad_framing") {
                let head = String::from_utf8_lossy(&frame[..frame.len().min(64)]).into_owned();
                tracing::warn!(
                    channel = %self.channel, frames, head, bytes = size,
                    "message with bad framing dropped: expected one frame, subject NUL envelope (further ones are counted, not logged)"
                );
            }
            return None;
        }
        let envelope = &frame[self.prefix.len()..];
        if envelope.len() > self.max_bytes {
            SourceCounters::bump(&self.counters.oversized);
            if self.log.first("oversized") {
                tracing::warn!(
                    channel = %self.channel, bytes = envelope.len(), limit = self.max_bytes,
                    "oversized message dropped (further ones are counted, not logged)"
                );
            }
            return None;
        }
        if envelope.len() > COPY_BELOW {
            let msg = std::mem::replace(&mut self.received, zmq::Message::new());
            return Some(Bytes::from_owner(Frame(msg)).slice(self.prefix.len()..));
        }
        // When the chunk is used up and every envelope cut from it has been
        // dropped (the usual case: ~180 envelopes of 100 B later), start
        // over at its beginning: memory still in cache, no allocation, no
        // page faults. Otherwise a new chunk; the old one lives as long as
        // its envelopes do.
        if self.arena.capacity() < envelope.len() && !self.arena.try_reclaim(ARENA_CHUNK) {
            self.arena = bytes::BytesMut::with_capacity(ARENA_CHUNK);
        }
        self.arena.extend_from_slice(envelope);
        Some(self.arena.split().freeze())
    }

    /// The waker of blocking receives, made on first use: a PUB socket
    /// bound on a fresh `inproc://` endpoint, which the SUB socket
    /// connects to (its subscription to everything takes [`WAKE`] in).
    fn blocking_waker(&mut self) -> Result<Waker, zmq::Error> {
        if let Some(waker) = &self.wake {
            return Ok(waker.clone());
        }
        let n = WAKE_ENDPOINTS.fetch_add(1, Ordering::Relaxed);
        let endpoint = format!("inproc://eventplane-wake-{}-{n}", std::process::id());
        let control = self.ctx.socket(zmq::PUB)?;
        control.set_linger(0)?;
        // Wake-ups beyond a few are redundant; a full pipe drops them.
        control.set_sndhwm(16)?;
        control.bind(&endpoint)?;
        // The socket's subscription to everything, made before this
        // connection, travels with it: the first wake-up is not filtered out.
        self.sub.connect(&endpoint)?;
        let waker = Waker::from(Arc::new(ControlWaker(Mutex::new(control))));
        self.wake = Some(waker.clone());
        Ok(waker)
    }
}

impl FrameSource for ZmqSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<SourceItem>> {
        // The runtime's waker replaces the blocking one in the queue.
        self.commands_armed = false;
        while let Poll::Ready(Some(cmd)) = self.commands.poll_recv(cx) {
            if let Some(change) = self.apply(cmd) {
                return Poll::Ready(Some(SourceItem::Change(change)));
            }
        }
        loop {
            if !self.drained {
                if let Some(batch) = self.read_batch() {
                    return Poll::Ready(Some(SourceItem::Batch(batch)));
                }
            }
            if self.signal.is_none() {
                // Back from blocking receives: register again, and read
                // before waiting (a blocking `recv` may have consumed the signal).
                match register_signal(&self.sub) {
                    Ok(signal) => {
                        self.signal = Some(signal);
                        self.drained = false;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(channel = %self.channel, error = %e, "zmq subscriber cannot wait on its socket; it stops");
                        return Poll::Ready(None);
                    }
                }
            }
            let signal = self.signal.as_ref().expect("registered above");
            match signal.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    tracing::error!(channel = %self.channel, error = %e, "zmq subscriber cannot wait on its socket; it stops");
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(mut ready)) => {
                    // The signal fd is edge-like: clear our readiness, then
                    // read ZMQ_EVENTS (which re-arms it). Only when it says a
                    // message is waiting do we call recv again: every empty
                    // recv costs libzmq a system call.
                    ready.clear_ready();
                    match self.sub.get_events() {
                        Ok(events) if !events.contains(zmq::POLLIN) => {}
                        _ => self.drained = false,
                    }
                }
            }
        }
    }

    fn try_next(&mut self) -> Option<SourceItem> {
        while let Ok(cmd) = self.commands.try_recv() {
            if let Some(change) = self.apply(cmd) {
                return Some(SourceItem::Change(change));
            }
        }
        self.read_batch().map(SourceItem::Batch)
    }

    fn counters(&self) -> &SourceCounters {
        &self.counters
    }

    /// Blocks in the SUB socket's own `recv`, as a raw libzmq subscriber
    /// does, and hands over each envelope as soon as it has it (the next
    /// call takes the next one without a system call while the socket holds
    /// more). Discovery commands wake it with a message on the socket itself
    /// ([`ControlWaker`]), so a publisher found in discovery is connected at
    /// once, without periodic wake-ups.
    fn wait_next(&mut self, deadline: &mut Deadline) -> Result<Option<SourceItem>, TimedOut> {
        self.signal = None;
        // First a look without waiting: while messages stream in, each call
        // takes one without starting the deadline's clock (a precise clock
        // read per message was a visible share of this thread).
        let mut looked = false;
        loop {
            if !self.commands_armed {
                let waker = match self.blocking_waker() {
                    Ok(waker) => waker,
                    Err(e) => {
                        tracing::error!(channel = %self.channel, error = %e, "cannot set up blocking receives on the zmq socket; the subscriber stops");
                        return Ok(None);
                    }
                };
                let mut cx = Context::from_waker(&waker);
                while let Poll::Ready(Some(cmd)) = self.commands.poll_recv(&mut cx) {
                    if let Some(change) = self.apply(cmd) {
                        return Ok(Some(SourceItem::Change(change)));
                    }
                }
                // The queue is empty and our waker registered: the next
                // command rings it, and its WAKE comes through the socket.
                self.commands_armed = true;
            }
            // `None`: the first look, not waiting.
            let wait_ms = if looked {
                // Round up, so a sub-millisecond remainder waits instead of
                // spinning; 0 only when the time is up (one last look).
                let ms = deadline
                    .left()
                    .as_micros()
                    .div_ceil(1000)
                    .min(i32::MAX as u128) as i32;
                if ms != self.rcvtimeo {
                    if let Err(e) = self.sub.set_rcvtimeo(ms) {
                        tracing::error!(channel = %self.channel, error = %e, "cannot set the zmq socket's receive timeout; the subscriber stops");
                        return Ok(None);
                    }
                    self.rcvtimeo = ms;
                }
                Some(ms)
            } else {
                None
            };
            let flags = if wait_ms.is_some() { 0 } else { zmq::DONTWAIT };
            match self.sub.recv(&mut self.received, flags) {
                Ok(()) => {
                    if let Some(envelope) = self.accept() {
                        return Ok(Some(SourceItem::Frame(envelope)));
                    }
                }
                Err(zmq::Error::EAGAIN) if wait_ms.is_none() => looked = true,
                Err(zmq::Error::EAGAIN) if wait_ms == Some(0) => return Err(TimedOut),
                Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => {}
                Err(e) => {
                    tracing::error!(channel = %self.channel, error = %e, "zmq subscriber cannot receive; it stops");
                    return Ok(None);
                }
            }
        }
    }
}
