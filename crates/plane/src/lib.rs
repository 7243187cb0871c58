//! # eventplane
//!
//! The facade applications use: build an [`EventPlane`] from a [`Config`]
//! (defaults, environment, flags), then ask it for publishers and
//! subscribers of channels. It picks the transport and the discovery backend;
//! the rest of the code never names either.
//!
//! Latency: a ZMQ subscriber reads its socket from the task that awaits
//! `recv`, woken by the runtime's reactor. On the 2-core reference machine a
//! current-thread runtime (or one dedicated to the subscriber) woke it
//! 10-40 µs sooner per message than a multi-threaded one, whose wake-ups cross
//! threads; latency-sensitive routers should receive on one. Better still
//! over ZMQ, a subscriber on a thread of its own can call
//! [`Subscriber::recv_blocking`]: it then waits in the socket itself, as a
//! raw libzmq subscriber does, with no reactor between the network and the
//! application (the discovery watcher keeps running on the runtime that
//! made the subscriber). Over NATS the client's messages come from the
//! runtime anyway, and `recv().await` measured better.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use eventplane::{Config, EventPlane, Event, Identity, Scope};
//! let plane = EventPlane::start(Config::from_env()?).await?;
//! let channel = Scope::new("dynamo", "backend")?.channel("kv-metrics")?;
//! let publisher = plane.publisher(&channel, Identity::new(7)).await?;
//! publisher.publish(&("kv_used", 42u32))?;
//! let mut sub = plane.subscriber::<(String, u32)>(&channel).await?;
//! while let Some(Event::Message(m)) = sub.recv().await {
//!     println!("{} from {}#{}", m.value.1, m.meta.publisher_id, m.meta.seq);
//! }
//! # Ok(()) }
//! ```

mod config;

use serde::de::DeserializeOwned;
use std::sync::Arc;

pub use config::{Config, ConfigError, DiscoveryKind, TransportKind, ENV_VARS};
pub use eventplane_core::{
    Channel, Event, Identity, Message, Meta, Notice, PublishError, Publisher, PublisherChange,
    QueueLimits, RawMessage, RawSubscriber, Scope, Subscriber, SubscriberStats,
};
pub use eventplane_discovery::{Discovery, FileDiscovery, MemDiscovery};
pub use eventplane_nats::{NatsAuth, NatsOptions, NatsStats, NatsTls, NatsTransport};
use eventplane_zmq::ZmqOptions;

/// Why an event plane could not be started or could not open a channel.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// The configuration asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Discovery failed.
    #[error(transparent)]
    Discovery(#[from] eventplane_discovery::DiscoveryError),
    /// The ZMQ transport failed.
    #[error(transparent)]
    Zmq(#[from] eventplane_zmq::ZmqError),
    /// The NATS transport failed.
    #[error(transparent)]
    Nats(#[from] eventplane_nats::NatsError),
}

enum Transport {
    Zmq { ctx: zmq::Context, opts: ZmqOptions },
    Nats(NatsTransport),
    Mem(eventplane_core::MemBus),
}

/// The state of the transport's connection, for health checks and metrics.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum TransportStats {
    /// Peer to peer: no connection to report (per-subscriber counters are in
    /// each subscriber's stats).
    Zmq,
    /// The NATS client's connection.
    Nats(NatsStats),
    /// In-process.
    Mem,
}

/// Reads a transport's [`TransportStats`] and the discovery backend's
/// metrics on demand. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TransportProbe(ProbeKind, Arc<dyn Discovery>);

#[derive(Debug, Clone)]
enum ProbeKind {
    Zmq,
    Nats(Box<NatsTransport>),
    Mem,
}

impl TransportProbe {
    /// The discovery backend's name and health figures now.
    pub fn discovery_metrics(&self) -> (&'static str, Vec<eventplane_discovery::DiscoveryMetric>) {
        (self.1.name(), self.1.metrics())
    }

    /// The transport's state and totals now.
    pub fn stats(&self) -> TransportStats {
        match &self.0 {
            ProbeKind::Zmq => TransportStats::Zmq,
            ProbeKind::Nats(n) => TransportStats::Nats(n.stats()),
            ProbeKind::Mem => TransportStats::Mem,
        }
    }
}

/// A running event plane. Cheap to share behind an `Arc`.
pub struct EventPlane {
    transport: Transport,
    discovery: Arc<dyn Discovery>,
    config: Config,
}

impl std::fmt::Debug for EventPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPlane")
            .field("config", &self.config)
            .finish()
    }
}

impl EventPlane {
    /// Starts the transport and discovery backend that `config` names.
    pub async fn start(mut config: Config) -> Result<Self, PlaneError> {
        let discovery: Arc<dyn Discovery> = match config.discovery {
            DiscoveryKind::File => {
                let dir = config
                    .discovery_dir
                    .clone()
                    .unwrap_or_else(FileDiscovery::default_dir);
                Arc::new(FileDiscovery::new(dir)?)
            }
            DiscoveryKind::Mem => Arc::new(MemDiscovery::new()),
            DiscoveryKind::Etcd => {
                config.lease_ttl = config.etcd_lease_ttl;
                etcd_discovery(&config).await?
            }
        };
        Self::connect(config, discovery).await
    }

    /// Starts the transport `config` names over a discovery backend given by
    /// the caller (tests share one [`MemDiscovery`] between planes). For the
    /// NATS transport use [`connect`](Self::connect), which can wait for the
    /// server.
    pub fn with_discovery(
        config: Config,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Self, PlaneError> {
        let transport = match config.transport {
            TransportKind::Nats => {
                return Err(PlaneError::Unsupported(
                    "the NATS transport connects asynchronously: use EventPlane::connect".into(),
                ))
            }
            TransportKind::Zmq => Self::zmq_transport(&config),
        };
        Ok(Self::assemble(config, transport, discovery))
    }

    /// Starts the transport `config` names (connecting to NATS if it is the
    /// one) over a discovery backend given by the caller.
    pub async fn connect(
        config: Config,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Self, PlaneError> {
        let transport = match config.transport {
            TransportKind::Nats => {
                Transport::Nats(NatsTransport::connect(config.nats.clone()).await?)
            }
            TransportKind::Zmq => Self::zmq_transport(&config),
        };
        Ok(Self::assemble(config, transport, discovery))
    }

    fn assemble(config: Config, transport: Transport, discovery: Arc<dyn Discovery>) -> Self {
        tracing::debug!(transport = %config.transport, discovery = discovery.name(), "event plane started");
        Self {
            transport,
            discovery,
            config,
        }
    }

    fn zmq_transport(config: &Config) -> Transport {
        Transport::Zmq {
            ctx: zmq::Context::new(),
            opts: ZmqOptions {
                host: config.host.clone(),
                sndhwm: config.hwm,
                rcvhwm: config.hwm,
                heartbeat_interval: config.heartbeat_interval,
                lease_ttl: config.lease_ttl,
                max_message_bytes: config.max_message_bytes,
                ..ZmqOptions::default()
            },
        }
    }

    /// The transport's connection state and totals.
    pub fn transport_stats(&self) -> TransportStats {
        self.transport_probe().stats()
    }

    /// A handle that reads [`transport_stats`](Self::transport_stats) later
    /// (for a metrics endpoint), without keeping the plane borrowed.
    pub fn transport_probe(&self) -> TransportProbe {
        let kind = match &self.transport {
            Transport::Zmq { .. } => ProbeKind::Zmq,
            Transport::Nats(n) => ProbeKind::Nats(Box::new(n.clone())),
            Transport::Mem(_) => ProbeKind::Mem,
        };
        TransportProbe(kind, self.discovery.clone())
    }

    /// An event plane entirely inside this process: the in-process transport
    /// and discovery. For tests, benchmarks and single-process embedding.
    pub fn in_process() -> Self {
        Self {
            transport: Transport::Mem(eventplane_core::MemBus::new()),
            discovery: Arc::new(MemDiscovery::new()),
            config: Config {
                discovery: DiscoveryKind::Mem,
                ..Config::default()
            },
        }
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The discovery backend.
    pub fn discovery(&self) -> &Arc<dyn Discovery> {
        &self.discovery
    }

    /// A publisher on `channel` with `identity`. Give a stable
    /// `publisher_id` (a worker id) so subscribers recognise restarts.
    pub async fn publisher(
        &self,
        channel: &Channel,
        identity: Identity,
    ) -> Result<Publisher, PlaneError> {
        match &self.transport {
            Transport::Zmq { ctx, opts } => {
                Ok(
                    eventplane_zmq::publish_on(ctx, &*self.discovery, channel, identity, opts)
                        .await?,
                )
            }
            Transport::Nats(n) => Ok(n.publisher(channel, identity).await?),
            Transport::Mem(bus) => {
                Ok(bus.publisher(channel, identity, self.config.max_message_bytes))
            }
        }
    }

    /// A subscriber on `channel` whose payloads stay bytes.
    pub async fn raw_subscriber(&self, channel: &Channel) -> Result<RawSubscriber, PlaneError> {
        match &self.transport {
            Transport::Zmq { ctx, opts } => {
                Ok(eventplane_zmq::subscribe_to(ctx, &self.discovery, channel, opts).await?)
            }
            Transport::Nats(n) => Ok(n.subscriber(channel).await?),
            Transport::Mem(bus) => Ok(bus.subscriber(channel, self.config.queue)),
        }
    }

    /// A subscriber on `channel` decoding payloads into `T`.
    pub async fn subscriber<T: DeserializeOwned>(
        &self,
        channel: &Channel,
    ) -> Result<Subscriber<T>, PlaneError> {
        Ok(Subscriber::new(self.raw_subscriber(channel).await?))
    }
}

#[cfg(feature = "etcd")]
async fn etcd_discovery(config: &Config) -> Result<Arc<dyn Discovery>, PlaneError> {
    let opts = eventplane_discovery::EtcdOptions {
        endpoints: config.etcd_endpoints.clone(),
        ..eventplane_discovery::EtcdOptions::default()
    };
    Ok(Arc::new(
        eventplane_discovery::EtcdDiscovery::connect(opts).await?,
    ))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_discovery(_config: &Config) -> Result<Arc<dyn Discovery>, PlaneError> {
    Err(PlaneError::Unsupported(
        "this eventplane was built without etcd support (it needs protoc to build): rebuild with `cargo build --release --features etcd` (scripts/test.sh installs protoc), or use DYN_DISCOVERY_BACKEND=file on one machine".into(),
    ))
}
