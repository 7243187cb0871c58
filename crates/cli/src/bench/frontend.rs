//! `eventplane bench frontend`: the frontend's routing overhead.
//!
//! Mock workers whose simulated GPU takes no time (speedup 10^9) serve one
//! token per request; a KV-routing frontend sits in front of them, fed by
//! their KV events over ZMQ; all in this process. Requests arrive at a fixed
//! rate (open loop: each is sent at its time, whether earlier ones have
//! finished or not), with prompts of `--prompt-blocks` blocks drawn from 64
//! conversations that share prefixes, so lookups find real matches. The
//! time from sending a request to the first byte of its answer is HTTP in,
//! tokenizing and hashing, the index lookup and choice, the proxied request
//! to the worker and its (instant) answer, and the first byte back: an upper
//! bound of what routing adds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventplane::{Config, DiscoveryKind, EventPlane, MemDiscovery, Scope, TransportKind};
use eventplane_frontend::{FleetChange, FrontendSettings, Mode, RouterSettings};
use eventplane_kv::router::Weights;
use eventplane_worker::mock::{self, EngineConfig, MockWorkerSettings, Timing};
use serde_json::json;

use crate::args::FrontendBenchArgs;

pub async fn run(a: FrontendBenchArgs) -> anyhow::Result<()> {
    let discovery = Arc::new(MemDiscovery::new());
    let plane = || {
        EventPlane::with_discovery(
            Config {
                transport: TransportKind::Zmq,
                discovery: DiscoveryKind::Mem,
                ..Config::default()
            },
            discovery.clone(),
        )
    };
    let scope = Scope::new("bench", "frontend")?;
    let mut workers = Vec::new();
    for id in 1..=a.workers {
        let p = plane()?;
        let w = mock::start(
            &p,
            MockWorkerSettings {
                engine: EngineConfig {
                    num_gpu_blocks: 100_000,
                    block_size: 16,
                    timing: Timing {
                        speedup: 1e9,
                        ..Timing::default()
                    },
                    ..EngineConfig::default()
                },
                worker_id: id,
                model: "bench".into(),
                scope: scope.clone(),
                http: SocketAddr::from(([127, 0, 0, 1], 0)),
                queue: 65_536,
                load_debounce: Duration::from_millis(50),
                load_heartbeat: Duration::from_secs(1),
                vllm_events_port: None,
            },
        )
        .await?;
        workers.push((p, w));
    }
    let (tx, mut changes) = tokio::sync::mpsc::channel(1024);
    let frontend_plane = plane()?;
    let frontend = eventplane_frontend::start(
        &frontend_plane,
        FrontendSettings {
            router: RouterSettings {
                mode: Mode::Kv,
                weights: Weights::default(),
                block_size: Some(16),
                router_id: 1,
                booking_ttl: Duration::from_secs(600),
            },
            no_kv_events: false,
            replica_sync: false,
            tokenizer: None,
            scope,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            fleet_changes: Some(tx),
        },
    )
    .await?;
    let (mut joined, mut heard) = (0, 0);
    tokio::time::timeout(Duration::from_secs(30), async {
        while joined < a.workers || heard < a.workers {
            match changes.recv().await {
                Some(FleetChange::Joined(_)) => joined += 1,
                Some(FleetChange::KvJoined { .. }) => heard += 1,
                _ => {}
            }
        }
    })
    .await?;

    // 64 conversations: a shared system prompt, then their own turns.
    let prompts: Vec<Vec<u32>> = (0..64u32)
        .map(|c| {
            (0..a.prompt_blocks as u32 * 16)
                .map(|t| {
                    if t < 64 {
                        t + 1
                    } else {
                        1000 + c * 100_000 + t
                    }
                })
                .collect()
        })
        .collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .build()?;
    let url = format!("{}/v1/completions", frontend.url);
    let total = (a.rate * a.seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let body =
            json!({"prompt": prompts[(i * 7 % 64) as usize], "max_tokens": 1, "stream": true});
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let mut r = client.post(&url).json(&body).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.chunk().await.ok()??;
            let first = sent.elapsed();
            while let Ok(Some(_)) = r.chunk().await {}
            Some(first)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut failed = 0u64;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => latencies.push(d.as_nanos() as u64),
            None => failed += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let q = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        (latencies[i] as f64 / 1000.0).round() / 1000.0
    };
    let hits = frontend.router.lock().map(|r| r.stats()).ok();
    println!(
        "{}",
        json!({
            "offered_rate": a.rate,
            "achieved_rate": ((total - failed) as f64 / elapsed.as_secs_f64()).round(),
            "requests": total,
            "failed": failed,
            "workers": a.workers,
            "prompt_blocks": a.prompt_blocks,
            "first_byte_p50_ms": q(0.5),
            "first_byte_p99_ms": q(0.99),
            "first_byte_max_ms": q(1.0),
            "expected_cached_block_share": hits.map(|h| h.expected_cached_blocks as f64 / h.prompt_blocks.max(1) as f64),
        })
    );
    frontend.stop();
    for (_, w) in workers {
        w.stop();
    }
    Ok(())
}
