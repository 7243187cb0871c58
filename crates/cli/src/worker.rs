//! `eventplane worker`: runs a worker until interrupted. With `--engine
//! mock`, the simulated engine (`eventplane_worker::mock`).
//!
//! Prints one JSON line on stdout when serving, `{"type": "ready", "url",
//! "worker_id", "model"}`, so scripts and tests know where it listens.

use std::net::SocketAddr;
use std::time::Duration;

use eventplane::{EventPlane, PlaneError, Scope};
use eventplane_worker::mock::{self, EngineConfig, MockWorkerSettings, Timing};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::args::{EngineKind, WorkerArgs};

pub async fn run(a: WorkerArgs) -> anyhow::Result<()> {
    if a.engine != EngineKind::Mock {
        return Err(PlaneError::Unsupported(format!(
            "--engine {:?} (relaying a real engine's KV events) is not in this build yet; use --engine mock",
            a.engine
        ))
        .into());
    }
    let config = a.plane.config()?;
    let scope = Scope::new(&a.namespace, &a.component)?;
    let worker_id = a
        .worker_id
        .unwrap_or_else(|| eventplane::Identity::random().publisher_id);
    let settings = MockWorkerSettings {
        engine: EngineConfig {
            num_gpu_blocks: a.num_gpu_blocks as usize,
            block_size: a.block_size as usize,
            max_num_seqs: a.max_num_seqs as usize,
            max_num_batched_tokens: a.max_num_batched_tokens as usize,
            timing: Timing {
                speedup: a.speedup,
                ..Timing::default()
            },
        },
        worker_id,
        model: a.model.clone(),
        scope,
        http: SocketAddr::new(a.http_host, a.http_port),
        queue: a.queue as usize,
        load_debounce: Duration::from_millis(50),
        load_heartbeat: Duration::from_secs(1),
    };
    let plane = EventPlane::start(config).await?;
    let worker = mock::start(&plane, settings).await?;
    println!(
        "{}",
        json!({"type": "ready", "url": worker.url, "worker_id": worker_id, "model": a.model})
    );
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: withdrawing the registration");
    worker.stop();
    Ok(())
}
