//! Starting a mock worker: the engine task, its publishers, the HTTP API,
//! and its registration in discovery (so frontends find it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eventplane::{EventPlane, Identity, Scope};
use eventplane_discovery::Registration;
use eventplane_kv::event::{KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC};
use serde::{Deserialize, Serialize};

use super::engine::{Engine, EngineConfig};
use super::http::{router, ApiState};
use super::service::{spawn, EngineHandle, Publishers, ServiceSettings};
use super::vllm_mirror::VllmMirror;

/// What a worker registers in discovery, under [`registration_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerAdvert {
    /// The worker's id (as in its KV events and load metrics).
    pub worker_id: u64,
    /// Base URL of its OpenAI-compatible API, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// The model it serves.
    pub model: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks in its pool.
    pub kv_blocks_total: u64,
    /// Data-parallel ranks.
    #[serde(default = "one")]
    pub data_parallel_size: u32,
    /// Its process id (for operators).
    #[serde(default)]
    pub pid: u32,
}

fn one() -> u32 {
    1
}

/// The discovery prefix under which the workers of `scope` register.
pub fn registration_prefix(scope: &Scope) -> String {
    format!(
        "eventplane/workers/{}.{}/",
        eventplane_core::name::escape(scope.namespace()),
        eventplane_core::name::escape(scope.component())
    )
}

/// The discovery key of worker `worker_id` of `scope`.
pub fn registration_key(scope: &Scope, worker_id: u64) -> String {
    format!("{}{worker_id:016x}", registration_prefix(scope))
}

/// Registers `advert` in `plane`'s discovery, under [`registration_key`],
/// for as long as the returned registration lives.
pub async fn register(
    plane: &EventPlane,
    scope: &Scope,
    advert: &WorkerAdvert,
) -> anyhow::Result<Registration> {
    let key = registration_key(scope, advert.worker_id);
    plane
        .discovery()
        .register(
            &key,
            serde_json::to_value(advert)?,
            plane.config().lease_ttl,
        )
        .await
        .with_context(|| format!("registering {key} in discovery"))
}

/// How to run a mock worker.
#[derive(Debug, Clone)]
pub struct MockWorkerSettings {
    /// The simulated engine.
    pub engine: EngineConfig,
    /// Its id.
    pub worker_id: u64,
    /// The model name it answers to.
    pub model: String,
    /// Where it publishes and registers.
    pub scope: Scope,
    /// Address the HTTP API binds (port 0: any free port).
    pub http: SocketAddr,
    /// Submissions that may wait to be admitted.
    pub queue: usize,
    /// See [`ServiceSettings::load_debounce`].
    pub load_debounce: Duration,
    /// See [`ServiceSettings::load_heartbeat`].
    pub load_heartbeat: Duration,
    /// Also publish KV events in vLLM's own format on this port (0: any),
    /// with the replay socket on the next one.
    pub vllm_events_port: Option<u16>,
}

/// A running mock worker. Dropping it withdraws its registration; the tasks
/// stop with the runtime.
pub struct RunningWorker {
    /// Base URL of its API.
    pub url: String,
    /// Submits requests directly (tests, embedding).
    pub engine: EngineHandle,
    /// The vLLM-format sockets `(events, replay)`, when asked for.
    pub vllm_endpoints: Option<(String, String)>,
    registration: Registration,
    server: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    /// Withdraws the registration and stops serving HTTP.
    pub fn stop(self) {
        self.registration.withdraw();
        self.server.abort();
    }
}

/// Starts a mock worker on `plane`.
pub async fn start(plane: &EventPlane, s: MockWorkerSettings) -> anyhow::Result<RunningWorker> {
    let identity = Identity::new(s.worker_id);
    let kv_channel = s.scope.channel(KV_EVENTS_TOPIC)?;
    let load_channel = s.scope.channel(LOAD_METRICS_TOPIC)?;
    let publishers = Publishers {
        kv_events: plane
            .publisher(&kv_channel, identity)
            .await
            .with_context(|| format!("publishing on {kv_channel}"))?,
        load: plane
            .publisher(&load_channel, identity)
            .await
            .with_context(|| format!("publishing on {load_channel}"))?,
    };
    let mirror = s
        .vllm_events_port
        .map(|port| VllmMirror::start(&plane.config().host, port))
        .transpose()?;
    let vllm_endpoints = mirror
        .as_ref()
        .map(|m| (m.events_endpoint.clone(), m.replay_endpoint.clone()));
    let (engine, _task) = spawn(
        Engine::new(s.engine),
        Some(publishers),
        mirror,
        ServiceSettings {
            worker_id: s.worker_id,
            dp_rank: 0,
            queue: s.queue,
            load_debounce: s.load_debounce,
            load_heartbeat: s.load_heartbeat,
        },
    );

    let mut registry = prometheus_client::registry::Registry::default();
    engine
        .stats()
        .register(&mut registry, s.engine.block_size, s.engine.num_gpu_blocks);
    super::http::register_transport_metrics(
        registry.sub_registry_with_prefix("eventplane_worker"),
        plane.transport_probe(),
    );
    let app = router(ApiState {
        engine: engine.clone(),
        model: s.model.clone(),
        metrics: Arc::new(registry),
    });
    let listener = tokio::net::TcpListener::bind(s.http)
        .await
        .with_context(|| format!("binding the HTTP API on {}", s.http))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    // Streamed answers are many small writes: without TCP_NODELAY, Nagle's
    // algorithm and delayed ACKs hold them back ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP API stopped");
        }
    });

    let advert = WorkerAdvert {
        worker_id: s.worker_id,
        url: url.clone(),
        model: s.model,
        block_size: s.engine.block_size as u32,
        kv_blocks_total: s.engine.num_gpu_blocks as u64,
        data_parallel_size: 1,
        pid: std::process::id(),
    };
    let registration = register(plane, &s.scope, &advert).await?;
    tracing::info!(%url, worker_id = format!("{:016x}", s.worker_id), "mock worker serving");
    Ok(RunningWorker {
        url,
        engine,
        vllm_endpoints,
        registration,
        server,
    })
}
