//! The subscribing side of the ZMQ transport: a SUB socket owned by one
//! thread, steered by a discovery watcher.

use bytes::Bytes;
use eventplane_core::queue::{source_queue, PublisherChange, SourceCounters, SourceTx};
use eventplane_core::subscriber::LogOnce;
use eventplane_core::{Channel, RawSubscriber};
use eventplane_discovery::{Discovery, WatchEvent};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{discovery_prefix, zmq_err, Advertisement, ZmqError, ZmqOptions};

/// How long after a publisher leaves discovery its connection is closed.
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// Bound on queued control commands (connects and disconnects).
const CONTROL_HWM: i32 = 100_000;

/// Most messages moved from the socket to the queue in one batch.
const BATCH_MESSAGES: usize = 1024;
/// Most bytes moved from the socket to the queue in one batch.
const BATCH_BYTES: usize = 1 << 20;

/// Commands from the watcher to the socket thread, one frame each: `+endpoint`
/// connects, `-endpoint` disconnects, an empty frame stops the thread.
struct Control {
    socket: Mutex<zmq::Socket>,
}

impl Control {
    fn send(&self, cmd: &str) {
        let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        // Never block: a PAIR socket whose reader has exited would block a
        // sender for ever. EAGAIN means the socket thread is gone (or a
        // hundred thousand commands behind), and the command is moot.
        if let Err(e) = socket.send(cmd, zmq::DONTWAIT) {
            tracing::debug!(error = %e, cmd, "zmq subscriber control command not delivered");
        }
    }
}

/// Stops the watcher and the socket thread when the subscriber is dropped.
struct Guard {
    control: Arc<Control>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.watcher.abort();
        self.control.send("");
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
    sub.set_subscribe(&crate::frame_prefix(channel)).map_err(zmq_err("subscribe"))?;

    let ctl_addr = format!("inproc://ep-sub-ctl-{:016x}", rand_u64());
    let ctl_rx = ctx
        .socket(zmq::PAIR)
        .map_err(zmq_err("create control socket"))?;
    ctl_rx
        .bind(&ctl_addr)
        .map_err(zmq_err("bind control socket"))?;
    let ctl_tx = ctx
        .socket(zmq::PAIR)
        .map_err(zmq_err("create control socket"))?;
    ctl_rx.set_rcvhwm(CONTROL_HWM).map_err(zmq_err("set control RCVHWM"))?;
    ctl_tx.set_sndhwm(CONTROL_HWM).map_err(zmq_err("set control SNDHWM"))?;
    ctl_tx
        .connect(&ctl_addr)
        .map_err(zmq_err("connect control socket"))?;
    let control = Arc::new(Control {
        socket: Mutex::new(ctl_tx),
    });

    let (tx, source) = source_queue(opts.queue);
    let reader = Reader {
        sub,
        ctl: ctl_rx,
        tx: tx.clone(),
        prefix: crate::frame_prefix(channel),
        max_bytes: opts.max_message_bytes,
        log: LogOnce::default(),
        channel: channel.clone(),
    };
    std::thread::Builder::new()
        .name("ep-zmq-sub".into())
        .spawn(move || reader.run())?;

    let mut watch = discovery.watch(&discovery_prefix(channel)).await?;
    let (wctl, wchannel) = (control.clone(), channel.clone());
    let watcher = tokio::spawn(async move {
        let mut by_key: HashMap<String, Advertisement> = HashMap::new();
        // Registrations per endpoint, shared with the delayed disconnects.
        let by_endpoint: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        while let Some(ev) = watch.next().await {
            match ev {
                WatchEvent::Added(entry) => {
                    match serde_json::from_value::<Advertisement>(entry.value) {
                        Ok(ad) => {
                            tracing::info!(channel = %wchannel, endpoint = %ad.endpoint, publisher_id = ad.publisher_id, "publisher found; connecting");
                            *by_endpoint.lock().unwrap_or_else(|p| p.into_inner()).entry(ad.endpoint.clone()).or_default() += 1;
                        wctl.send(&format!("+{}", ad.endpoint));
                            tx.change(PublisherChange::Added {
                                endpoint: ad.endpoint.clone(),
                                publisher_id: Some(ad.publisher_id),
                                incarnation: Some(ad.incarnation),
                            });
                            by_key.insert(entry.key, ad);
                        }
                        Err(e) => {
                            tracing::warn!(channel = %wchannel, key = %entry.key, error = %e, "unusable publisher registration ignored")
                        }
                    }
                }
                WatchEvent::Removed { key } => {
                    if let Some(ad) = by_key.remove(&key) {
                        {
                            let mut counts = by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(n) = counts.get_mut(&ad.endpoint) {
                                *n -= 1;
                                if *n == 0 {
                                    counts.remove(&ad.endpoint);
                                }
                            }
                        }
                        tracing::info!(channel = %wchannel, endpoint = %ad.endpoint, publisher_id = ad.publisher_id, "publisher gone; disconnecting");
                        // Disconnect after a grace period: what the publisher
                        // sent just before leaving may still be in flight, and
                        // disconnecting discards it. Reconnects are cheap to
                        // stop late; lost messages cannot be had back.
                        let (ctl, endpoint) = (wctl.clone(), ad.endpoint.clone());
                        let watched = by_endpoint.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(DISCONNECT_GRACE).await;
                            // Another registration may share the endpoint (a
                            // publisher re-registered): keep the connection then.
                            if !watched.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&endpoint) {
                                ctl.send(&format!("-{endpoint}"));
                            }
                        });
                        tx.change(PublisherChange::Removed {
                            endpoint: ad.endpoint,
                            publisher_id: Some(ad.publisher_id),
                        });
                    }
                }
            }
        }
    });
    Ok(RawSubscriber::new(
        channel.clone(),
        source,
        Box::new(Guard { control, watcher }),
    ))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(eventplane_core::envelope::unix_nanos());
    h.finish()
}

struct Reader {
    sub: zmq::Socket,
    ctl: zmq::Socket,
    tx: SourceTx,
    prefix: Vec<u8>,
    max_bytes: usize,
    log: LogOnce,
    channel: Channel,
}

impl Reader {
    fn run(mut self) {
        let mut connected: HashMap<String, ()> = HashMap::new();
        loop {
            let (sub_ready, ctl_ready) = {
                let mut items = [
                    self.sub.as_poll_item(zmq::POLLIN),
                    self.ctl.as_poll_item(zmq::POLLIN),
                ];
                if let Err(e) = zmq::poll(&mut items, -1) {
                    if e == zmq::Error::EINTR {
                        continue;
                    }
                    tracing::error!(error = %e, "zmq subscriber poll failed; subscriber stops");
                    return;
                }
                (items[0].is_readable(), items[1].is_readable())
            };
            if ctl_ready {
                while let Ok(cmd) = self.ctl.recv_bytes(zmq::DONTWAIT) {
                    let cmd = String::from_utf8_lossy(&cmd).into_owned();
                    let (op, endpoint) = cmd.split_at(cmd.len().min(1));
                    match op {
                        "+" if !connected.contains_key(endpoint) => {
                            match self.sub.connect(endpoint) {
                                Ok(()) => {
                                    connected.insert(endpoint.to_owned(), ());
                                }
                                Err(e) => {
                                    tracing::warn!(endpoint, error = %e, "cannot connect to publisher")
                                }
                            }
                        }
                        "-" if connected.remove(endpoint).is_some() => {
                            if let Err(e) = self.sub.disconnect(endpoint) {
                                tracing::debug!(endpoint, error = %e, "disconnect failed");
                            }
                        }
                        "" => return,
                        _ => {}
                    }
                }
            }
            if sub_ready {
                self.drain();
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// Moves what the socket holds into the queue, in batches.
    fn drain(&mut self) {
        let counters = self.tx.counters().clone();
        let mut batch = Vec::with_capacity(64);
        let mut batch_bytes = 0usize;
        loop {
            let mut msg = zmq::Message::new();
            if self.sub.recv(&mut msg, zmq::DONTWAIT).is_err() {
                break;
            }
            let mut size = msg.len();
            let mut frames = 1;
            // Ours are single frames; read and discard the rest of anything else.
            while msg.get_more() {
                let mut part = zmq::Message::new();
                if self.sub.recv(&mut part, 0).is_err() {
                    break;
                }
                size += part.len();
                frames += 1;
                if !part.get_more() {
                    break;
                }
            }
            SourceCounters::bump(&counters.frames);
            counters.bytes.fetch_add(size as u64, Ordering::Relaxed);
            if frames != 1 || !msg.starts_with(&self.prefix) {
                SourceCounters::bump(&counters.bad_framing);
                if self.log.first("bad_framing") {
                    let head = String::from_utf8_lossy(&msg[..msg.len().min(64)]).into_owned();
                    tracing::warn!(
                        channel = %self.channel, frames, head, bytes = size,
                        "message with bad framing dropped: expected one frame, subject NUL envelope (further ones are counted, not logged)"
                    );
                }
                continue;
            }
            let envelope = &msg[self.prefix.len()..];
            if envelope.len() > self.max_bytes {
                SourceCounters::bump(&counters.oversized);
                if self.log.first("oversized") {
                    tracing::warn!(
                        channel = %self.channel, bytes = envelope.len(), limit = self.max_bytes,
                        "oversized message dropped (further ones are counted, not logged)"
                    );
                }
                continue;
            }
            batch_bytes += envelope.len();
            batch.push(Bytes::copy_from_slice(envelope));
            if batch.len() >= BATCH_MESSAGES || batch_bytes >= BATCH_BYTES {
                self.tx.push(std::mem::take(&mut batch), std::mem::take(&mut batch_bytes));
            }
        }
        self.tx.push(batch, batch_bytes);
    }
}
