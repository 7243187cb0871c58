//! # eventplane-nats
//!
//! The brokered transport: every channel is a NATS subject (its escaped
//! [`Channel::subject`], `ep.<namespace>.<component>[.<endpoint>].<topic>`),
//! carried by a NATS server or cluster through `async-nats`. Publishers need
//! no discovery registration: the server routes by subject. One client
//! connection per event plane carries all its publishers and subscribers.
//!
//! - [`publisher`]: the frame sink (publishes without waiting, holds its
//!   output while disconnected) and the per-publisher driver (welcomes,
//!   idle heartbeats, the hold's release after a reconnect).
//! - [`subscriber`]: the frame source read straight from the client's
//!   subscription, and the hello that announces a subscriber to publishers.
//!
//! ## Hello and welcome
//!
//! A NATS publisher cannot see its subscribers, so they announce themselves:
//! a subscriber publishes its id on `_ep_hello.<subject>` after subscribing
//! on the same connection (a server handles one connection's messages in
//! order, so the subscription is in place before anyone sees the hello),
//! again after every reconnect, and whenever a publisher calls the roll
//! (publishers do when they start and after they reconnect). Each publisher
//! of the subject answers a hello with a heartbeat on the data subject. The
//! subscriber thereby learns every live publisher and its last sequence
//! number at once, as over ZMQ, without sleeping; publishers learn how many
//! subscribers they have. Hello subjects start with `_ep_hello`, never `ep`,
//! so no channel can alias one.
//!
//! ## Disconnections: buffering and reconnection, chosen deliberately
//!
//! - **Reconnect delays**: the first retry is immediate, then
//!   [`NatsOptions::reconnect_min`] doubling up to
//!   [`NatsOptions::reconnect_max`] (25 ms to 2 s by default), each with up to
//!   25% random jitter so a fleet does not reconnect in lockstep. Reconnection
//!   never gives up: a worker outlives any outage of the broker.
//! - **Buffering**: while the client is disconnected a publisher keeps
//!   publishing into its own hold queue of [`NatsOptions::buffer_messages`]
//!   envelopes (32,768 by default: 0.6 s of a 50,000 msg/s stream, minutes
//!   of one worker's KV events). Past it, envelopes are dropped and counted;
//!   they had sequence numbers, so subscribers report them as a gap, exactly.
//! - **Release after a reconnect**: a publisher keeps holding until every
//!   subscriber it knew has said hello again (they reconnect on the same
//!   schedule) or [`NatsOptions::settle`] passes (1 s by default), then
//!   flushes the hold in order and sends a heartbeat. Without this, a
//!   publisher that reconnects a millisecond before its subscribers would
//!   flush its whole buffer to a server that has no one to give it to.
//! - **Resending what the server did not confirm**: every
//!   [`CONFIRM_INTERVAL`] (50 ms) the transport sends itself an echo through
//!   the server; what was sent before an echo that came back has reached the
//!   server (see [`Confirmations`]).
//!   Publishers keep what is not yet confirmed, and after a reconnect send
//!   it again ahead of the hold, so envelopes that died in the old
//!   connection's buffers arrive after all; subscribers drop the duplicates
//!   (and count them). Measured: a `nats-server` stopped and restarted in
//!   the middle of a 100,000-message stream at 25,000 msg/s lost nothing.
//! - **When the client's own queue is full** (a publisher outrunning the
//!   server), the envelope joins the publisher's hold, which the driver
//!   feeds to the client as it drains: the `publish` call never waits, and
//!   only when the hold is full too is an envelope dropped (counted, and
//!   reported by subscribers as a gap).
//!
//! ## Message size
//!
//! A publisher's limit is the smaller of the configured
//! `max_message_bytes` and the server's `max_payload` (1 MiB unless the
//! server says otherwise), read at connect. Larger envelopes are refused with
//! a clear, counted [`PublishError::TooLarge`](eventplane_core::PublishError)
//! instead of being sent to a server that would close the connection; callers
//! that batch (KV events) split below [`Publisher::max_message_bytes`].

pub mod publisher;
pub mod subscriber;

use async_nats::ConnectOptions;
use eventplane_core::{Channel, Identity, Publisher, RawSubscriber};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The default server, as in Dynamo.
pub const DEFAULT_SERVER: &str = "nats://localhost:4222";

/// How a client proves who it is. At most one of these is used; a user and
/// password in the server URL (`nats://user:pass@host`) also works.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// `NATS_USER` and `NATS_PASSWORD`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// `NATS_TOKEN`.
    Token(String),
    /// `NATS_CREDS`: a `.creds` file (JWT and NKey seed).
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
        }
    }
}

/// TLS settings. Using `tls://` in the server URL also requires TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// Require TLS even if the URL says `nats://` (`NATS_TLS_REQUIRED`).
    pub required: bool,
    /// A PEM file of CA certificates to trust (`NATS_CA`).
    pub ca: Option<PathBuf>,
    /// A client certificate (`NATS_CERT`), with its key (`NATS_KEY`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Options of the NATS transport. See the crate docs for the choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// Server URLs to try (`NATS_SERVER`, comma-separated).
    pub servers: Vec<String>,
    /// Credentials.
    pub auth: NatsAuth,
    /// TLS.
    pub tls: NatsTls,
    /// The connection's name, shown by the server's monitoring.
    pub name: Option<String>,
    /// How long the first connection may take.
    pub connect_timeout: Duration,
    /// Envelopes a publisher holds while disconnected, and the depth of the
    /// client's own outgoing queue.
    pub buffer_messages: usize,
    /// Messages a subscription buffers before the client drops for it
    /// (`DYN_EVENT_PLANE_HWM`, 100,000 by default as for ZMQ). A dropped
    /// message had a sequence number: subscribers report it as a gap.
    pub subscription_messages: usize,
    /// First reconnect delay after the immediate retry.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How long a reconnected publisher waits for its subscribers' hellos
    /// before releasing what it held.
    pub settle: Duration,
    /// A publisher idle this long sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// Largest envelope sent or accepted (further limited by the server).
    pub max_message_bytes: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            servers: vec![DEFAULT_SERVER.to_owned()],
            auth: NatsAuth::None,
            tls: NatsTls::default(),
            name: None,
            connect_timeout: Duration::from_secs(5),
            buffer_messages: 32_768,
            subscription_messages: 100_000,
            reconnect_min: Duration::from_millis(25),
            reconnect_max: Duration::from_secs(2),
            settle: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(1),
            max_message_bytes: eventplane_core::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why the NATS transport could not start or open a channel.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The first connection failed.
    #[error("cannot reach NATS at {servers}: {reason} (set NATS_SERVER to the server's address, or DYN_EVENT_PLANE=zmq for the serverless transport)")]
    Connect {
        /// The servers tried.
        servers: String,
        /// Why.
        reason: String,
    },
    /// A credentials file could not be read.
    #[error("cannot read the NATS credentials file {path} (NATS_CREDS): {source}")]
    Credentials {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Subscribing failed.
    #[error("cannot subscribe to {subject} on NATS: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
}

/// Totals of one NATS connection, for metrics.
#[derive(Debug, Default)]
pub struct NatsCounters {
    /// Connections established (the first one and every reconnect).
    pub connects: AtomicU64,
    /// Disconnections.
    pub disconnects: AtomicU64,
    /// Envelopes dropped because a publisher's hold queue was full (during
    /// an outage, or while the client's own queue was full too).
    pub hold_dropped: AtomicU64,
    /// Envelopes refused as larger than the server's `max_payload`.
    pub too_large: AtomicU64,
    /// Times the server or client reported a slow-consumer subscription
    /// (messages the client dropped for it; they show as gaps).
    pub slow_consumer_events: AtomicU64,
    /// Errors the server reported (authorization, parser, ...).
    pub server_errors: AtomicU64,
    /// Envelopes sent again after a reconnect because the server had not
    /// confirmed them before the old connection died.
    pub resent: AtomicU64,
}

/// A snapshot of [`NatsCounters`], plus the connection's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NatsStats {
    /// Connected now.
    pub connected: bool,
    /// The server connected to (its URL as advertised).
    pub server: String,
    /// See [`NatsCounters::connects`].
    pub connects: u64,
    /// See [`NatsCounters::disconnects`].
    pub disconnects: u64,
    /// See [`NatsCounters::hold_dropped`].
    pub hold_dropped: u64,
    /// See [`NatsCounters::too_large`].
    pub too_large: u64,
    /// See [`NatsCounters::slow_consumer_events`].
    pub slow_consumer_events: u64,
    /// See [`NatsCounters::server_errors`].
    pub server_errors: u64,
    /// See [`NatsCounters::resent`].
    pub resent: u64,
    /// Messages received by the client.
    pub in_messages: u64,
    /// Messages sent.
    pub out_messages: u64,
}

/// How often the transport confirms with the server (an echo round trip)
/// what its publishers have sent.
pub const CONFIRM_INTERVAL: Duration = Duration::from_millis(50);

/// What the server has been seen to receive. A confirmer task increments
/// the epoch, then publishes the new epoch on an echo subject of its own
/// (`_ep_confirm.<random>`) to which the same connection subscribes. The
/// server handles a connection's messages in order, so when the echo comes
/// back it has received everything sent before it: every envelope sent in
/// an earlier epoch is confirmed. (The client's `flush` is no such proof: it
/// only empties the client's buffer into the socket.) Publishers keep
/// unconfirmed envelopes to send again after a reconnect.
#[derive(Debug, Default)]
pub struct Confirmations {
    epoch: AtomicU64,
    confirmed: AtomicU64,
}

impl Confirmations {
    /// The epoch an envelope sent now belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Every envelope sent in an epoch below this has reached the server.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }
}

/// Aborts the confirmer when the last clone of the transport goes.
#[derive(Debug)]
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connected NATS transport: one client shared by every publisher and
/// subscriber of an event plane.
#[derive(Debug, Clone)]
pub struct NatsTransport {
    client: async_nats::Client,
    opts: Arc<NatsOptions>,
    counters: Arc<NatsCounters>,
    /// Connected now; every (re)connection and disconnection notifies, so a
    /// change seen while connected is a reconnection.
    link: watch::Receiver<bool>,
    server_max_payload: usize,
    confirmations: Arc<Confirmations>,
    _confirmer: Arc<TaskGuard>,
}

impl NatsTransport {
    /// Connects to the first reachable server of `opts.servers`. Fails with a
    /// clear [`NatsError::Connect`] naming the servers when none answers
    /// within `connect_timeout`; after that, outages are survived (see the
    /// crate docs).
    pub async fn connect(opts: NatsOptions) -> Result<Self, NatsError> {
        let servers = opts.servers.join(",");
        let counters = Arc::new(NatsCounters::default());
        let (link_tx, link) = watch::channel(false);
        let link_tx = Arc::new(link_tx);
        let last_log = Arc::new(Mutex::new(String::new()));
        let mut co = ConnectOptions::new()
            .connection_timeout(opts.connect_timeout)
            .client_capacity(opts.buffer_messages.max(16))
            .subscription_capacity(opts.subscription_messages.max(16))
            .ping_interval(Duration::from_secs(10))
            .reconnect_delay_callback({
                let (min, max) = (opts.reconnect_min, opts.reconnect_max);
                move |attempts| reconnect_delay(attempts, min, max, rand::random::<f64>())
            })
            .event_callback({
                let counters = counters.clone();
                let link_tx = link_tx.clone();
                let servers = servers.clone();
                move |event| {
                    on_event(event, &counters, &link_tx, &servers, &last_log);
                    async {}
                }
            });
        if let Some(name) = &opts.name {
            co = co.name(name);
        }
        co = match &opts.auth {
            NatsAuth::None => co,
            NatsAuth::UserPassword { user, password } => {
                co.user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(t) => co.token(t.clone()),
            NatsAuth::CredentialsFile(path) => {
                co.credentials_file(path)
                    .await
                    .map_err(|source| NatsError::Credentials {
                        path: path.display().to_string(),
                        source,
                    })?
            }
        };
        if opts.tls.required {
            co = co.require_tls(true);
        }
        if let Some(ca) = &opts.tls.ca {
            co = co.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &opts.tls.client_cert {
            co = co.add_client_certificate(cert.clone(), key.clone());
        }
        let addrs: Vec<async_nats::ServerAddr> = opts
            .servers
            .iter()
            .map(|s| {
                s.trim().parse().map_err(|e| NatsError::Connect {
                    servers: servers.clone(),
                    reason: format!("{s:?} is not a server address: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        let connect = co.connect(addrs);
        let client = match tokio::time::timeout(
            opts.connect_timeout + Duration::from_secs(1),
            connect,
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(NatsError::Connect {
                    servers,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(NatsError::Connect {
                    servers,
                    reason: format!("no answer within {:?}", opts.connect_timeout),
                })
            }
        };
        // The event for the first connection may still be in flight: the
        // client is connected now, whatever the callback has seen.
        link_tx.send_if_modified(|connected| !std::mem::replace(connected, true));
        let server_max_payload = client.max_payload();
        tracing::info!(servers = %servers, max_payload = server_max_payload, "connected to NATS");
        let confirmations = Arc::new(Confirmations::default());
        let echo_subject = format!("_ep_confirm.{:016x}", rand::random::<u64>());
        let mut echoes =
            client
                .subscribe(echo_subject.clone())
                .await
                .map_err(|e| NatsError::Subscribe {
                    subject: echo_subject.clone(),
                    reason: e.to_string(),
                })?;
        let confirmer = tokio::spawn({
            let client = client.clone();
            let c = confirmations.clone();
            async move {
                let mut tick = tokio::time::interval(CONFIRM_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let epoch = c.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                            let _ = client.publish(echo_subject.clone(), epoch.to_string().into()).await;
                        }
                        echo = futures::StreamExt::next(&mut echoes) => {
                            let Some(echo) = echo else { return };
                            if let Some(epoch) = std::str::from_utf8(&echo.payload).ok().and_then(|t| t.parse::<u64>().ok()) {
                                c.confirmed.fetch_max(epoch, Ordering::AcqRel);
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            client,
            opts: Arc::new(opts),
            counters,
            link,
            server_max_payload,
            confirmations,
            _confirmer: Arc::new(TaskGuard(confirmer.abort_handle())),
        })
    }

    /// The options it was started with.
    pub fn options(&self) -> &NatsOptions {
        &self.opts
    }

    /// The underlying client (for baselines and tools).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The largest envelope a publisher may send: the configured limit or
    /// the server's `max_payload`, whichever is smaller.
    pub fn max_message_bytes(&self) -> usize {
        self.opts.max_message_bytes.min(self.server_max_payload)
    }

    /// A publisher on `channel`. Must be called inside a tokio runtime (its
    /// driver is a task).
    pub async fn publisher(
        &self,
        channel: &Channel,
        identity: Identity,
    ) -> Result<Publisher, NatsError> {
        publisher::publish_on(self, channel, identity).await
    }

    /// A subscriber on `channel`. Its subscription reaches the server before
    /// its hello, so every publisher that welcomes it already delivers to it.
    pub async fn subscriber(&self, channel: &Channel) -> Result<RawSubscriber, NatsError> {
        subscriber::subscribe_to(self, channel).await
    }

    /// The connection's totals and state.
    pub fn stats(&self) -> NatsStats {
        let c = &*self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let client_stats = self.client.statistics();
        NatsStats {
            connected: self.client.connection_state() == async_nats::connection::State::Connected,
            server: self
                .client
                .try_server_info()
                .map(|i| format!("{}:{}", i.host, i.port))
                .unwrap_or_default(),
            connects: load(&c.connects),
            disconnects: load(&c.disconnects),
            hold_dropped: load(&c.hold_dropped),
            too_large: load(&c.too_large),
            slow_consumer_events: load(&c.slow_consumer_events),
            server_errors: load(&c.server_errors),
            resent: load(&c.resent),
            in_messages: client_stats.in_messages.load(Ordering::Relaxed),
            out_messages: client_stats.out_messages.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn counters(&self) -> &Arc<NatsCounters> {
        &self.counters
    }

    pub(crate) fn confirmations(&self) -> &Arc<Confirmations> {
        &self.confirmations
    }

    pub(crate) fn link(&self) -> watch::Receiver<bool> {
        self.link.clone()
    }
}

/// The subject on which subscribers of `channel` say hello (and goodbye).
pub fn hello_subject(channel: &Channel) -> String {
    format!("_ep_hello.{}", channel.subject())
}

/// The delay before reconnect attempt `attempts` (1-based): none for the
/// first, then `min` doubling up to `max`, stretched by up to 25% by `jitter`
/// (in `[0, 1)`).
pub fn reconnect_delay(attempts: usize, min: Duration, max: Duration, jitter: f64) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = (attempts - 2).min(20) as u32;
    let base = min.saturating_mul(1 << doublings).min(max);
    base.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0))
}

fn on_event(
    event: async_nats::Event,
    counters: &NatsCounters,
    link: &watch::Sender<bool>,
    servers: &str,
    last_log: &Mutex<String>,
) {
    use async_nats::Event as E;
    // Log a kind of event once per change of kind, not once per retry.
    let log_once = |text: String| {
        let mut last = last_log.lock().unwrap_or_else(|p| p.into_inner());
        if *last == text {
            return false;
        }
        *last = text;
        true
    };
    match event {
        E::Connected => {
            let first = counters.connects.fetch_add(1, Ordering::Relaxed) == 0;
            // The first connection is not a reconnection: `connect` may
            // already have marked it, and nobody must mistake it for one.
            link.send_if_modified(|connected| {
                let already = std::mem::replace(connected, true);
                !(first && already)
            });
            if !first && log_once("connected".into()) {
                tracing::info!(servers, "reconnected to NATS");
            }
        }
        E::Disconnected => {
            counters.disconnects.fetch_add(1, Ordering::Relaxed);
            link.send_modify(|connected| *connected = false);
            if log_once("disconnected".into()) {
                tracing::warn!(servers, "disconnected from NATS; publishers hold their output and the client reconnects");
            }
        }
        E::SlowConsumer(sid) => {
            counters
                .slow_consumer_events
                .fetch_add(1, Ordering::Relaxed);
            if log_once(format!("slow {sid}")) {
                tracing::warn!(servers, sid, "a subscription fell behind and the NATS client dropped messages for it (they show as gaps)");
            }
        }
        E::ServerError(e) => {
            counters.server_errors.fetch_add(1, Ordering::Relaxed);
            if log_once(format!("server {e}")) {
                tracing::warn!(servers, error = %e, "NATS server error");
            }
        }
        E::ClientError(e) => {
            if log_once(format!("client {e}")) {
                tracing::warn!(servers, error = %e, "NATS client error");
            }
        }
        E::LameDuckMode => {
            if log_once("lame duck".into()) {
                tracing::warn!(servers, "the NATS server is shutting down (lame duck mode)");
            }
        }
        E::Draining | E::Closed => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_double_and_stay_bounded() {
        let (min, max) = (Duration::from_millis(25), Duration::from_secs(2));
        let d = |a| reconnect_delay(a, min, max, 0.0);
        assert_eq!(d(1), Duration::ZERO);
        assert_eq!(d(2), min);
        assert_eq!(d(3), min * 2);
        assert_eq!(d(100), max);
        assert_eq!(reconnect_delay(2, min, max, 1.0), min.mul_f64(1.25));
    }

    #[test]
    fn hello_subjects_cannot_alias_channels() {
        let c = eventplane_core::Scope::new("n", "c")
            .unwrap()
            .channel("t")
            .unwrap();
        let h = hello_subject(&c);
        assert_eq!(h, "_ep_hello.ep.n.c.t");
        assert!(Channel::from_subject(&h).is_none());
    }

    #[test]
    fn secrets_are_not_printed() {
        let a = NatsAuth::UserPassword {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert!(!format!("{:?}", NatsAuth::Token("t0k".into())).contains("t0k"));
    }
}
