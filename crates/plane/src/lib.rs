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
//! threads; latency-sensitive routers should receive on one.
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
}

enum Transport {
    Zmq { ctx: zmq::Context, opts: ZmqOptions },
    Mem(eventplane_core::MemBus),
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
    pub async fn start(config: Config) -> Result<Self, PlaneError> {
        let discovery: Arc<dyn Discovery> = match config.discovery {
            DiscoveryKind::File => {
                let dir = config.discovery_dir.clone().unwrap_or_else(FileDiscovery::default_dir);
                Arc::new(FileDiscovery::new(dir)?)
            }
            DiscoveryKind::Mem => Arc::new(MemDiscovery::new()),
            DiscoveryKind::Etcd => {
                return Err(PlaneError::Unsupported(
                    "the etcd discovery backend is not available in this build yet; use DYN_DISCOVERY_BACKEND=file (one machine) or mem (one process)".into(),
                ))
            }
        };
        Self::with_discovery(config, discovery)
    }

    /// Starts the transport `config` names over a discovery backend given by
    /// the caller (tests share one [`MemDiscovery`] between planes).
    pub fn with_discovery(
        config: Config,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Self, PlaneError> {
        let transport = match config.transport {
            TransportKind::Zmq => Transport::Zmq {
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
            },
            TransportKind::Nats => {
                return Err(PlaneError::Unsupported(
                    "the NATS transport is not available in this build yet; use DYN_EVENT_PLANE=zmq (or --event-plane zmq), which needs no server".into(),
                ))
            }
        };
        tracing::debug!(transport = %config.transport, discovery = discovery.name(), "event plane started");
        Ok(Self {
            transport,
            discovery,
            config,
        })
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
