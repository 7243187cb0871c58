//! Two frontends with replica sync, over ZMQ, share one view of load: a
//! request booked through one shows on the other, and its end too. The
//! time each change took to reach the other replica is printed (measured,
//! not asserted: timing belongs to benchmarks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventplane::{Config, DiscoveryKind, EventPlane, MemDiscovery, Scope, TransportKind};
use eventplane_frontend::{FleetChange, FrontendSettings, Mode, RouterSettings, RunningFrontend};
use eventplane_kv::router::Weights;
use eventplane_kv::WorkerKey;
use eventplane_worker::mock::{self, EngineConfig, MockWorkerSettings, Timing};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn plane(discovery: &Arc<MemDiscovery>) -> EventPlane {
    EventPlane::with_discovery(
        Config {
            transport: TransportKind::Zmq,
            discovery: DiscoveryKind::Mem,
            ..Config::default()
        },
        discovery.clone(),
    )
    .unwrap()
}

async fn frontend(plane: &EventPlane, scope: &Scope, router_id: u64) -> RunningFrontend {
    let (tx, mut changes) = tokio::sync::mpsc::channel(64);
    let f = eventplane_frontend::start(
        plane,
        FrontendSettings {
            router: RouterSettings {
                mode: Mode::Kv,
                weights: Weights::default(),
                block_size: None,
                router_id,
                booking_ttl: Duration::from_secs(600),
            },
            no_kv_events: false,
            replica_sync: true,
            tokenizer: None,
            scope: scope.clone(),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            fleet_changes: Some(tx),
        },
    )
    .await
    .unwrap();
    tokio::time::timeout(WAIT, async {
        while !matches!(changes.recv().await, Some(FleetChange::Joined(_)) | None) {}
    })
    .await
    .expect("the frontend found the worker");
    f
}

/// Waits until both replicas book the same load on `w`, equal to
/// `requests` requests; returns how long that took.
async fn agree(a: &RunningFrontend, b: &RunningFrontend, w: WorkerKey, requests: u32) -> Duration {
    let since = Instant::now();
    tokio::time::timeout(WAIT, async {
        loop {
            let la = a.router.lock().unwrap().booked(w);
            let lb = b.router.lock().unwrap().booked(w);
            if la == lb && la.requests == requests {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the replicas never agreed on {requests} request(s)"));
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_every_workers_load() {
    let discovery = Arc::new(MemDiscovery::new());
    let scope = Scope::new("test", "replicas").unwrap();
    let worker_plane = plane(&discovery);
    let worker = mock::start(
        &worker_plane,
        MockWorkerSettings {
            engine: EngineConfig {
                num_gpu_blocks: 1024,
                block_size: 4,
                timing: Timing::default(), // real time: the request lasts
                ..EngineConfig::default()
            },
            worker_id: 5,
            model: "m".into(),
            scope: scope.clone(),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            queue: 64,
            load_debounce: Duration::from_millis(10),
            load_heartbeat: Duration::from_secs(1),
            vllm_events_port: None,
        },
    )
    .await
    .unwrap();
    let (pa, pb) = (plane(&discovery), plane(&discovery));
    let a = frontend(&pa, &scope, 1).await;
    let b = frontend(&pb, &scope, 2).await;
    let w = WorkerKey::new(5);
    // The replicas hear each other once their re-announcements flow.
    agree(&a, &b, w, 0).await;

    // A long streaming request through A.
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/completions", a.url))
        .json(&json!({"prompt": "a b c d e f g h", "max_tokens": 2000, "stream": true}))
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap().expect("first token");
    let booked = agree(&a, &b, w, 1).await;
    assert_eq!(b.router.lock().unwrap().booked(w).blocks, 2);
    drop(response);
    let freed = agree(&a, &b, w, 0).await;
    eprintln!("replica view converged {booked:?} after the booking, {freed:?} after the end");
    worker.stop();
}
