//! The publishing side of the ZMQ transport: an XPUB socket, its registration,
//! and the driver thread that welcomes subscribers and sends heartbeats.

use eventplane_core::envelope::unix_nanos;
use eventplane_core::publisher::{FrameSink, SendError, WeakPublisher};
use eventplane_core::{Channel, Identity, Publisher};
use eventplane_discovery::{Discovery, Registration};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use crate::{discovery_prefix, zmq_err, Advertisement, ZmqError, ZmqOptions};

struct Shared {
    socket: Mutex<zmq::Socket>,
    stop: AtomicBool,
}

struct ZmqSink {
    shared: Arc<Shared>,
    /// The subject and a NUL byte: the start of every frame.
    prefix: Vec<u8>,
    subscriptions: watch::Receiver<u64>,
    _registration: Registration,
}

impl FrameSink for ZmqSink {
    fn send(&self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
        // Assemble the frame in libzmq's own buffer: one copy of the payload.
        let mut msg = zmq::Message::with_size(head.len() + payload.len());
        msg[..head.len()].copy_from_slice(head);
        msg[head.len()..].copy_from_slice(payload);
        let socket = self.shared.socket.lock().unwrap_or_else(|p| p.into_inner());
        socket
            .send(msg, zmq::DONTWAIT)
            .map_err(|e| SendError::Transport(e.to_string()))
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
        self.shared.stop.store(true, Ordering::Relaxed);
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

    let shared = Arc::new(Shared {
        socket: Mutex::new(socket),
        stop: AtomicBool::new(false),
    });
    let (subs_tx, subs_rx) = watch::channel(0u64);
    let sink = ZmqSink {
        shared: shared.clone(),
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
        .spawn(move || drive(shared, fd, weak, interval, subs_tx))?;
    tracing::info!(channel = %channel, endpoint, publisher_id = identity.publisher_id, incarnation = identity.incarnation, "publishing");
    Ok(publisher)
}

/// The driver loop: wait for the socket's signal fd (or a timeout), read
/// subscriptions, welcome new subscribers, heartbeat when idle.
fn drive(
    shared: Arc<Shared>,
    fd: std::os::fd::RawFd,
    publisher: WeakPublisher,
    interval: Duration,
    subs: watch::Sender<u64>,
) {
    let tick = interval.min(Duration::from_millis(100));
    let mut subscribed: u64 = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the fd is owned by the socket, which
        // `shared` keeps open for as long as this thread runs.
        unsafe { libc::poll(&mut pfd, 1, tick.as_millis() as libc::c_int) };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let mut joined = 0u64;
        {
            let socket = shared.socket.lock().unwrap_or_else(|p| p.into_inner());
            // Reading ZMQ_EVENTS also re-arms the signal fd.
            while socket
                .get_events()
                .map(|e| e.contains(zmq::POLLIN))
                .unwrap_or(false)
            {
                match socket.recv_bytes(zmq::DONTWAIT) {
                    Ok(msg) if msg.first() == Some(&1) => joined += 1,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        let Some(publisher) = publisher.upgrade() else {
            return;
        };
        if joined > 0 {
            subscribed += joined;
            subs.send_replace(subscribed);
            tracing::debug!(channel = %publisher.channel(), joined, "subscriber joined; sending a welcome heartbeat");
        }
        // A new subscriber is welcomed at once; otherwise only when idle.
        let interval_ns = if joined > 0 {
            0
        } else {
            interval.as_nanos() as u64
        };
        publisher.heartbeat_if_idle(unix_nanos(), interval_ns);
    }
}
