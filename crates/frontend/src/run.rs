//! Starting a frontend: the tasks that feed the router, and the HTTP API.
//!
//! - **Discovery**: watches the workers' registrations. A worker that
//!   appears is routable at once; one that vanishes gets no more traffic
//!   and is purged from the index, the bookings and the load table.
//! - **KV events** (not with `--no-kv-events`): one task owns the prefix
//!   index and applies every batch. A gap or a restart in a worker's stream
//!   means its cache is no longer known: its entries are dropped (a router
//!   that under-estimates a cache routes a little worse; one that
//!   over-estimates it routes to blocks that are gone).
//! - **Load metrics** (not with `--no-kv-events`): the latest report per
//!   worker.
//! - Every second, bookings whose end was lost expire.
//!
//! - **Replica sync** (`--router-replica-sync`): our booking changes go out
//!   on `active-sequences` as they happen, and every second all our live
//!   bookings are re-announced; peers' bookings are applied to our load
//!   view, and dropped when a peer restarts, loses messages or leaves.
//!
//! With `--no-kv-events` the frontend opens no event-plane socket, except
//! the active-sequences channel if replica sync is asked for: discovery is
//! its only input, and the approximate index stands in.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use eventplane::{Event, EventPlane, Notice, PublisherChange, Scope};
use eventplane_discovery::WatchEvent;
use eventplane_kv::event::{
    ActiveSequenceEvent, KvEventBatch, LoadMetrics, ACTIVE_SEQUENCES_TOPIC, KV_EVENTS_TOPIC,
    LOAD_METRICS_TOPIC,
};
use eventplane_kv::{PrefixIndex, WorkerKey};
use eventplane_worker::mock::{registration_prefix, WorkerAdvert};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::http::{routes, ApiState, ApiStats};
use crate::router::{approx_view, CacheView, Router, RouterSettings};
use crate::tokenizer::PromptTokenizer;

/// How to run a frontend.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// Routing.
    pub router: RouterSettings,
    /// Route without KV events (approximate index, no event-plane socket).
    pub no_kv_events: bool,
    /// Share bookings with the other frontends of the same scope over the
    /// event plane (`active-sequences`), so all see one load.
    pub replica_sync: bool,
    /// Where the workers publish and register.
    pub scope: Scope,
    /// Address of the HTTP API (port 0: any free port).
    pub http: SocketAddr,
    /// A Hugging Face `tokenizer.json` for prompts (`None`: the built-in
    /// tokenizer).
    pub tokenizer: Option<std::path::PathBuf>,
    /// Told of every fleet change once the router has applied it (a full
    /// channel drops the notice, never blocks routing).
    pub fleet_changes: Option<mpsc::Sender<FleetChange>>,
}

/// A change of the fleet, as the router applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetChange {
    /// A worker is routable.
    Joined(WorkerAdvert),
    /// A worker gets no more traffic.
    Left {
        /// Its id.
        worker_id: u64,
    },
    /// The KV-event subscriber is connected to a worker's publisher (its
    /// events from now on reach the index).
    KvJoined {
        /// The worker (its publisher id).
        worker_id: u64,
    },
}

/// A running frontend. Dropping it (or [`RunningFrontend::stop`]) stops
/// its tasks and its HTTP API.
pub struct RunningFrontend {
    /// Base URL of its API.
    pub url: String,
    /// The router (for tests and embedding).
    pub router: Arc<Mutex<Router>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningFrontend {
    /// Stops serving.
    pub fn stop(self) {}
}

impl Drop for RunningFrontend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts a frontend on `plane`.
pub async fn start(plane: &EventPlane, s: FrontendSettings) -> anyhow::Result<RunningFrontend> {
    let tokenizer = Arc::new(match &s.tokenizer {
        Some(path) => PromptTokenizer::from_file(path)?,
        None => PromptTokenizer::BuiltIn,
    });
    let (purge_tx, purge_rx) = mpsc::channel::<Vec<WorkerKey>>(1024);
    let mut tasks = Vec::new();
    let view = if s.no_kv_events {
        approx_view()
    } else {
        let index = PrefixIndex::new();
        let view = CacheView::Events(index.reader());
        let channel = s.scope.channel(KV_EVENTS_TOPIC)?;
        let sub = plane
            .subscriber::<KvEventBatch>(&channel)
            .await
            .with_context(|| format!("subscribing to {channel}"))?;
        tasks.push(tokio::spawn(index_task(
            index,
            sub,
            purge_rx,
            s.fleet_changes.clone(),
        )));
        view
    };
    let router = Arc::new(Mutex::new(Router::new(s.router, view)));

    let sync = if s.replica_sync {
        if s.no_kv_events {
            tracing::info!("--no-kv-events with replica sync: the active-sequences channel is this frontend's one event-plane socket");
        }
        let channel = s.scope.channel(ACTIVE_SEQUENCES_TOPIC)?;
        let sub = plane
            .subscriber::<ActiveSequenceEvent>(&channel)
            .await
            .with_context(|| format!("subscribing to {channel}"))?;
        let publisher = plane
            .publisher(&channel, eventplane::Identity::new(s.router.router_id))
            .await
            .with_context(|| format!("publishing on {channel}"))?;
        if let Ok(mut r) = router.lock() {
            r.enable_replica_sync();
        }
        tasks.push(tokio::spawn(sync_task(Arc::clone(&router), sub)));
        tasks.push(tokio::spawn(reannounce_task(
            Arc::clone(&router),
            publisher.clone(),
        )));
        Some(publisher)
    } else {
        None
    };

    if !s.no_kv_events {
        let channel = s.scope.channel(LOAD_METRICS_TOPIC)?;
        let sub = plane
            .subscriber::<LoadMetrics>(&channel)
            .await
            .with_context(|| format!("subscribing to {channel}"))?;
        tasks.push(tokio::spawn(load_task(Arc::clone(&router), sub)));
    }

    let prefix = registration_prefix(&s.scope);
    let watch = plane
        .discovery()
        .watch(&prefix)
        .await
        .with_context(|| format!("watching {prefix} in discovery"))?;
    tasks.push(tokio::spawn(discovery_task(
        Arc::clone(&router),
        watch,
        purge_tx,
        s.fleet_changes.clone(),
    )));
    tasks.push(tokio::spawn(expiry_task(Arc::clone(&router))));

    let stats = ApiStats::default();
    let mut registry = Registry::with_prefix("eventplane_frontend");
    stats.register(&mut registry);
    eventplane_worker::mock::http::register_transport_metrics(
        &mut registry,
        plane.transport_probe(),
    );
    let app = routes(ApiState {
        router: Arc::clone(&router),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .context("building the HTTP client")?,
        stats,
        metrics: Arc::new(registry),
        sync,
        tokenizer,
    });
    let listener = tokio::net::TcpListener::bind(s.http)
        .await
        .with_context(|| format!("binding the HTTP API on {}", s.http))?;
    let url = format!("http://{}", listener.local_addr()?);
    // Streamed answers are many small writes: without TCP_NODELAY, Nagle's
    // algorithm and delayed ACKs hold them back ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP API stopped");
        }
    }));
    tracing::info!(%url, no_kv_events = s.no_kv_events, mode = ?s.router.mode, "frontend serving");
    Ok(RunningFrontend { url, router, tasks })
}

async fn discovery_task(
    router: Arc<Mutex<Router>>,
    mut watch: eventplane_discovery::Watch,
    purge: mpsc::Sender<Vec<WorkerKey>>,
    changes: Option<mpsc::Sender<FleetChange>>,
) {
    let tell = |c: FleetChange| {
        if let Some(tx) = &changes {
            let _ = tx.try_send(c);
        }
    };
    while let Some(event) = watch.next().await {
        match event {
            WatchEvent::Added(entry) => match serde_json::from_value::<WorkerAdvert>(entry.value) {
                Ok(advert) => {
                    tracing::info!(worker = format!("{:016x}", advert.worker_id), url = %advert.url, "worker joined");
                    if let Ok(mut r) = router.lock() {
                        r.add_worker(advert.clone());
                    }
                    tell(FleetChange::Joined(advert));
                }
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "unreadable worker registration; ignored")
                }
            },
            WatchEvent::Removed { key } => {
                let Some(id) = key
                    .rsplit('/')
                    .next()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                else {
                    continue;
                };
                let ranks = router
                    .lock()
                    .map(|mut r| r.remove_worker(id))
                    .unwrap_or_default();
                if !ranks.is_empty() {
                    tracing::info!(
                        worker = format!("{id:016x}"),
                        "worker left: no more traffic, state purged"
                    );
                    let _ = purge.send(ranks).await;
                    tell(FleetChange::Left { worker_id: id });
                }
            }
        }
    }
}

async fn index_task(
    mut index: PrefixIndex,
    mut sub: eventplane::Subscriber<KvEventBatch>,
    mut purge: mpsc::Receiver<Vec<WorkerKey>>,
    changes: Option<mpsc::Sender<FleetChange>>,
) {
    let mut unsupported = 0u64;
    loop {
        tokio::select! {
            ranks = purge.recv() => match ranks {
                Some(ranks) => for w in ranks { index.remove_worker(w); },
                None => return,
            },
            event = sub.recv() => match event {
                Some(Event::Message(m)) => {
                    if let Err(e) = index.apply_batch(&m.value) {
                        unsupported += 1;
                        if unsupported == 1 {
                            tracing::warn!(error = %e, "KV event batch of an unknown version dropped (counted; logged once)");
                        }
                    }
                }
                Some(Event::Notice(n)) => {
                    if let (Notice::Joined { publisher_id, .. }, Some(tx)) = (&n, &changes) {
                        let _ = tx.try_send(FleetChange::KvJoined { worker_id: *publisher_id });
                    }
                    if let Notice::Gap { publisher_id, .. } | Notice::Restarted { publisher_id, .. } = n {
                        // Its cache is no longer known: forget it.
                        let ranks: Vec<WorkerKey> = index.workers().filter(|w| w.worker_id == publisher_id).collect();
                        for w in ranks {
                            index.clear(w);
                        }
                        tracing::info!(worker = format!("{publisher_id:016x}"), notice = ?n, "KV events lost or worker restarted: its cache entries were dropped");
                    }
                }
                Some(Event::Discovery(_)) => {}
                None => return,
            },
        }
    }
}

async fn sync_task(
    router: Arc<Mutex<Router>>,
    mut sub: eventplane::Subscriber<ActiveSequenceEvent>,
) {
    while let Some(event) = sub.recv().await {
        let Ok(mut r) = router.lock() else { return };
        match event {
            Event::Message(m) => r.apply_peer(&m.value, Instant::now()),
            // A peer that restarted, lost messages or left: drop its
            // bookings; a live one re-announces what it has within a second.
            Event::Notice(
                Notice::Gap { publisher_id, .. } | Notice::Restarted { publisher_id, .. },
            ) => {
                r.forget_peer(publisher_id);
            }
            Event::Discovery(PublisherChange::Removed {
                publisher_id: Some(id),
                ..
            }) => r.forget_peer(id),
            _ => {}
        }
    }
}

/// Re-announces our live bookings every second, so a replica that starts
/// late, or forgot us after a gap, converges.
async fn reannounce_task(router: Arc<Mutex<Router>>, publisher: eventplane::Publisher) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok(mut r) = router.lock() {
            r.reannounce();
            crate::http::publish_outbox(&mut r, &Some(publisher.clone()));
        }
    }
}

async fn load_task(router: Arc<Mutex<Router>>, mut sub: eventplane::Subscriber<LoadMetrics>) {
    while let Some(event) = sub.recv().await {
        if let Event::Message(m) = event {
            if let Ok(mut r) = router.lock() {
                r.update_load(m.value);
            }
        }
    }
}

async fn expiry_task(router: Arc<Mutex<Router>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let expired = router
            .lock()
            .map(|mut r| r.expire(Instant::now()))
            .unwrap_or(0);
        if expired > 0 {
            tracing::warn!(expired, "bookings whose end was never seen expired");
        }
    }
}
