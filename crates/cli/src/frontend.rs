//! `eventplane frontend`: the OpenAI-compatible router in front of the
//! workers (`eventplane_frontend`), until interrupted.
//!
//! Prints JSON lines on stdout: `{"type": "ready", "url"}` when serving,
//! then `worker_joined` / `worker_left` as discovery changes, so scripts
//! and tests can follow the fleet without polling.

use std::net::SocketAddr;
use std::time::Duration;

use eventplane::{EventPlane, Scope};
use eventplane_frontend::{FleetChange, FrontendSettings, Mode, RouterSettings};
use eventplane_kv::router::Weights;
use serde_json::json;

use crate::args::{FrontendArgs, RouterMode};

pub async fn run(a: FrontendArgs) -> anyhow::Result<()> {
    let config = a.plane.config()?;
    let scope = Scope::new(&a.namespace, &a.component)?;
    let (changes_tx, mut changes) = tokio::sync::mpsc::channel(1024);
    let settings = FrontendSettings {
        router: RouterSettings {
            mode: match a.router_mode {
                RouterMode::Kv => Mode::Kv,
                RouterMode::RoundRobin => Mode::RoundRobin,
                RouterMode::Random => Mode::Random,
            },
            weights: Weights {
                overlap: a.overlap_weight,
                temperature: a.router_temperature,
            },
            block_size: a.block_size,
            router_id: a
                .router_id
                .unwrap_or_else(|| eventplane::Identity::random().publisher_id),
            booking_ttl: Duration::from_secs(600),
        },
        no_kv_events: a.no_kv_events,
        replica_sync: a.router_replica_sync,
        tokenizer: a.tokenizer.clone(),
        scope: scope.clone(),
        http: SocketAddr::new(a.http_host, a.http_port),
        fleet_changes: Some(changes_tx),
    };
    let plane = EventPlane::start(config).await?;
    let frontend = eventplane_frontend::start(&plane, settings).await?;
    println!("{}", json!({"type": "ready", "url": frontend.url}));

    // The fleet as the router sees it, on stdout.
    let follow = tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            let line = match change {
                FleetChange::Joined(w) => {
                    json!({"type": "worker_joined", "worker_id": w.worker_id, "url": w.url})
                }
                FleetChange::Left { worker_id } => {
                    json!({"type": "worker_left", "worker_id": worker_id})
                }
                FleetChange::KvJoined { worker_id } => {
                    json!({"type": "kv_events_joined", "worker_id": worker_id})
                }
            };
            println!("{line}");
        }
    });
    crate::interrupted().await?;
    follow.abort();
    frontend.stop();
    Ok(())
}
