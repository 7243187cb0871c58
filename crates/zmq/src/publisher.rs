//! The publishing side of the ZMQ transport: an XPUB socket, its registration,
//! and the driver thread that welcomes subscribers and sends heartbeats.

use eventplane_core::envelope::unix_nanos;
use eventplane_core::publisher::{FrameSink, SendError, WeakPublisher};
use eventplane_core::{Channel, Identity, Publisher};
use eventplane_discovery::{Discovery, Registration};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::{discovery_prefix, zmq_err, Advertisement, ZmqError, ZmqOptions};

/// The publisher's end of the XPUB socket. The core publisher owns it and
/// calls it under its send lock, so the socket needs no lock of its own: the
/// driver thread reaches it through [`Publisher::drive`], under that lock.
struct ZmqSink {
    socket: zmq::Socket,
    /// Set when the sink is dropped: the driver thread stops.
    stop: Arc<AtomicBool>,
    /// The subject and a NUL byte: the start of every frame.
    prefix: Vec<u8>,
    subscriptions: watch::Receiver<u64>,
    _registration: Registration,
}

impl FrameSink for ZmqSink {
    fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
        // Assemble the frame in libzmq's own buffer: one copy of the payload.
        // `with_size` zero-fills the buffer first (the crate keeps its
        // uninitialised constructor private): ~30 – 50 ns at 4 KiB. Handing
        // over a `Vec` instead (`zmq_msg_init_data`) skips that but costs a
        // second allocation, freed on libzmq's thread; in a C loop on the
        // bench host that saved only 20 – 30 ns at 4 KiB, so it is not done.
        let mut msg = zmq::Message::with_size(head.len() + payload.len());
        // One `DerefMut`: each is two calls into libzmq (~80 instructions).
        let frame: &mut [u8] = &mut msg;
        frame[..head.len()].copy_from_slice(head);
        frame[head.len()..].copy_from_slice(payload);
        self.socket
            .send(msg, zmq::DONTWAIT)
            .map_err(|e| SendError::Transport(e.to_string()))
    }

    /// Reads the subscription messages the XPUB socket holds (`0x01` then
    /// the prefix: a subscriber joined; `0x00`: it left).
    fn take_joined(&mut self) -> u64 {
        let mut joined = 0;
        // Reading ZMQ_EVENTS also re-arms the signal fd the driver polls.
        while self
            .socket
            .get_events()
            .map(|e| e.contains(zmq::POLLIN))
            .unwrap_or(false)
        {
            match self.socket.recv_bytes(zmq::DONTWAIT) {
                Ok(msg) if msg.first() == Some(&1) => joined += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        joined
    }

    fn frame_prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn subscriptions(&self) -> Option<watch::Receiver<u64>> {
        Some(self.subscriptions.clone())
    }
}

impl Drop for ZmqSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Binds an XPUB socket for `channel`, registers it in `discovery`, and
/// returns the publisher. The registration is withdrawn when the last clone
/// of the publisher is dropped.
pub async fn publish_on(
    ctx: &zmq::Context,
    discovery: &dyn Discovery,
    channel: &Channel,
    identity: Identity,
    opts: &ZmqOptions,
) -> Result<Publisher, ZmqError> {
    let socket = ctx
        .socket(zmq::XPUB)
        .map_err(zmq_err("create XPUB socket"))?;
    socket
        .set_sndhwm(opts.sndhwm)
        .map_err(zmq_err("set SNDHWM"))?;
    socket
        .set_xpub_verbose(true)
        .map_err(zmq_err("set XPUB_VERBOSE"))?;
    socket
        .set_linger(opts.linger.as_millis().min(i32::MAX as u128) as i32)
        .map_err(zmq_err("set LINGER"))?;
    let bind = format!("tcp://{}:*", opts.host);
    socket.bind(&bind).map_err(zmq_err(format!(
        "bind {bind} (set DYN_EVENT_PLANE_HOST to an address of this machine)"
    )))?;
    let endpoint = socket
        .get_last_endpoint()
        .map_err(zmq_err("read the bound endpoint"))?
        .map_err(|_| ZmqError::Zmq {
            what: "bound endpoint is not UTF-8".into(),
            source: zmq::Error::EINVAL,
        })?;
    let fd = socket.get_fd().map_err(zmq_err("read ZMQ_FD"))?;

    let ad = Advertisement {
        endpoint: endpoint.clone(),
        publisher_id: identity.publisher_id,
        incarnation: identity.incarnation,
        subject: channel.subject().to_owned(),
        pid: std::process::id(),
    };
    let key = format!(
        "{}{:016x}-{:016x}",
        discovery_prefix(channel),
        identity.publisher_id,
        identity.incarnation
    );
    let value = serde_json::to_value(&ad).expect("an advertisement serializes");
    let registration = discovery.register(&key, value, opts.lease_ttl).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let (subs_tx, subs_rx) = watch::channel(0u64);
    let sink = ZmqSink {
        socket,
        stop: stop.clone(),
        prefix: crate::frame_prefix(channel),
        subscriptions: subs_rx,
        _registration: registration,
    };
    let publisher = Publisher::new(
        channel.clone(),
        identity,
        opts.max_message_bytes,
        Box::new(sink),
    );
    let weak = publisher.downgrade();
    let interval = opts.heartbeat_interval;
    std::thread::Builder::new()
        .name("ep-zmq-pub".into())
        .spawn(move || drive(&stop, fd, weak, interval, subs_tx))?;
    tracing::info!(channel = %channel, endpoint, publisher_id = identity.publisher_id, incarnation = identity.incarnation, "publishing");
    Ok(publisher)
}

/// The driver loop: wait for the socket's signal fd (or a tick), then let
/// the publisher read subscriptions, welcome new subscribers and heartbeat
/// when idle ([`Publisher::drive`]).
fn drive(
    stop: &AtomicBool,
    fd: std::os::fd::RawFd,
    publisher: WeakPublisher,
    interval: Duration,
    subs: watch::Sender<u64>,
) {
    let tick = interval.min(Duration::from_millis(100));
    let interval_ns = interval.as_nanos() as u64;
    let mut subscribed: u64 = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll` only reads the one pollfd given. The descriptor
        // belongs to the socket, which closes when the last publisher handle
        // is dropped, possibly while this waits: a closed descriptor makes
        // `poll` return at once (POLLNVAL), a reused one at worst waits a
        // tick; nothing is read from it, and `stop` ends the loop next.
        unsafe { libc::poll(&mut pfd, 1, tick.as_millis() as libc::c_int) };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(publisher) = publisher.upgrade() else {
            return;
        };
        let joined = publisher.drive(unix_nanos(), interval_ns);
        if joined > 0 {
            subscribed += joined;
            subs.send_replace(subscribed);
            tracing::debug!(channel = %publisher.channel(), joined, "subscriber joined; sent a welcome heartbeat");
        }
    }
}
