//! `eventplane worker`: runs a worker until interrupted. With `--engine
//! mock`, the simulated engine (`eventplane_worker::mock`); with `--engine
//! vllm|sglang`, the relay in front of a real engine
//! (`eventplane_worker::relay`).
//!
//! Prints one JSON line on stdout when serving, `{"type": "ready", "url",
//! "worker_id", "model"}`, so scripts and tests know where it listens.

use std::net::SocketAddr;
use std::time::Duration;

use eventplane::{EventPlane, PlaneError, Scope};
use eventplane_worker::mock::{self, EngineConfig, MockWorkerSettings, Timing};
use eventplane_worker::relay;
use serde_json::json;

use crate::args::{EngineKind, WorkerArgs};

pub async fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let config = a.plane.config()?;
    let scope = Scope::new(&a.namespace, &a.component)?;
    let worker_id = a
        .worker_id
        .unwrap_or_else(|| eventplane::Identity::random().publisher_id);
    if a.engine != EngineKind::Mock {
        return run_relay(a, config, scope, worker_id).await;
    }
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
        vllm_events_port: a.zmq_kv_events_port,
    };
    let plane = EventPlane::start(config).await?;
    let worker = mock::start(&plane, settings).await?;
    let (vllm_events, vllm_replay) = worker.vllm_endpoints.clone().unzip();
    println!(
        "{}",
        json!({"type": "ready", "url": worker.url, "worker_id": worker_id, "model": a.model,
               "vllm_kv_events": vllm_events, "vllm_replay": vllm_replay})
    );
    crate::interrupted().await?;
    tracing::info!("stopping: withdrawing the registration");
    worker.stop();
    Ok(())
}

/// `--engine vllm|sglang`: relay a real engine's KV events.
async fn run_relay(
    a: WorkerArgs,
    config: eventplane::Config,
    scope: Scope,
    worker_id: u64,
) -> anyhow::Result<()> {
    let base = a.kv_events_endpoint.as_deref().ok_or_else(|| {
        PlaneError::Unsupported("--kv-events-endpoint is required with --engine vllm|sglang".into())
    })?;
    let mut ranks = Vec::new();
    for rank in 0..a.data_parallel_size {
        ranks.push(relay::RankEndpoints {
            events: offset_port(base, rank)?,
            replay: a
                .replay_endpoint
                .as_deref()
                .map(|r| offset_port(r, rank))
                .transpose()?,
        });
    }
    let settings = relay::RelaySettings {
        worker_id,
        scope,
        ranks: ranks.clone(),
        topic: a.kv_events_topic.clone(),
        engine_url: a.engine_url.clone(),
        model: a.model.clone(),
        block_size: a.block_size as u32,
        max_tracked: a.max_tracked_blocks as usize,
        replay_timeout: Duration::from_secs(5),
        load_interval: Some(Duration::from_secs(1)),
        num_gpu_blocks: a.num_gpu_blocks,
    };
    let plane = EventPlane::start(config).await?;
    let running = relay::start(&plane, settings).await?;
    println!(
        "{}",
        json!({"type": "ready", "relaying": ranks.iter().map(|r| &r.events).collect::<Vec<_>>(), "worker_id": worker_id, "url": a.engine_url})
    );
    crate::interrupted().await?;
    for (rank, s) in running.stats().iter().enumerate() {
        tracing::info!(rank, ?s, "relay totals");
    }
    running.stop();
    Ok(())
}

/// `tcp://host:port` with `port + offset`.
fn offset_port(endpoint: &str, offset: u32) -> anyhow::Result<String> {
    let bad = || PlaneError::Unsupported(format!("{endpoint:?} is not a tcp://HOST:PORT endpoint"));
    let (head, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port: u32 = port.parse().map_err(|_| bad())?;
    if !head.starts_with("tcp://") || port + offset > u32::from(u16::MAX) {
        return Err(bad().into());
    }
    Ok(format!("{head}:{}", port + offset))
}

#[cfg(test)]
mod tests {
    use super::offset_port;

    #[test]
    fn rank_endpoints_offset_the_port() {
        assert_eq!(
            offset_port("tcp://10.0.0.1:5557", 2).unwrap(),
            "tcp://10.0.0.1:5559"
        );
        assert_eq!(
            offset_port("tcp://[::1]:5557", 0).unwrap(),
            "tcp://[::1]:5557"
        );
        for bad in [
            "ipc:///tmp/x:1",
            "tcp://host",
            "tcp://host:65535x",
            "tcp://h:65535",
        ] {
            let offset = if bad == "tcp://h:65535" { 1 } else { 0 };
            assert!(offset_port(bad, offset).is_err(), "{bad} accepted");
        }
    }
}
