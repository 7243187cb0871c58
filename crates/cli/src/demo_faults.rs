//! `eventplane demo-faults`: the event plane under faults, on one machine.
//!
//! Worker processes (`eventplane publish` children) publish load metrics over
//! the configured transport (ZMQ by default) and register through discovery
//! (a fresh file-discovery directory unless one is given); this process
//! subscribes and narrates what it sees while the demo kills a worker with
//! SIGKILL, starts a new one, and restarts another under the same id. It ends
//! with a table of what the subscriber received, per worker.

use anyhow::{bail, Context};
use eventplane::{DiscoveryKind, Event, EventPlane, Notice, PublisherChange, Scope};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::args::DemoFaultsArgs;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Worker {
    messages: u64,
    last_seq: u64,
    gaps: u64,
    lost: u64,
    restarts: u64,
}

struct Children(BTreeMap<u64, Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.0.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn run(a: DemoFaultsArgs) -> anyhow::Result<()> {
    let mut config = a.plane.config()?;
    let tmp = tempfile::tempdir()?;
    if config.discovery == DiscoveryKind::File && a.plane.discovery_dir.is_none() {
        config.discovery_dir = Some(tmp.path().to_owned());
    }
    if config.discovery == DiscoveryKind::Mem {
        bail!("the demo runs workers as separate processes; in-process (mem) discovery cannot reach them: use --discovery file");
    }
    let plane = EventPlane::start(config.clone()).await?;
    let channel = Scope::new("demo", "workers")?.channel("load")?;
    let mut sub = plane.subscriber::<serde_json::Value>(&channel).await?;
    let per_worker = (a.rate * a.phase_s).round().max(1.0) as u64;
    println!(
        "eventplane demo: {} workers, each publishing {per_worker} load reports at {} msg/s over {} with {} discovery{}",
        a.publishers,
        a.rate,
        config.transport,
        config.discovery,
        config.discovery_dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default()
    );

    let spawn = |id: u64, count: u64| -> anyhow::Result<Child> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["publish", "-n", "demo", "-c", "workers", "-t", "load", "--hold", "--wait-subscribers", "1"])
            .args(["--publisher-id", &id.to_string(), "--count", &count.to_string(), "--rate", &a.rate.to_string()])
            .args(["--value", &format!(r#"{{"worker":{id},"kv_blocks_used":128,"kv_blocks_total":4096,"active_requests":3}}"#)])
            .args(["--event-plane", config.transport.as_str(), "--discovery", config.discovery.as_str(), "--host", &config.host])
            .env("EVENTPLANE_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(dir) = &config.discovery_dir {
            cmd.arg("--discovery-dir").arg(dir);
        }
        cmd.spawn().context("starting a worker process")
    };
    let mut children = Children(BTreeMap::new());
    let mut workers: BTreeMap<u64, Worker> = BTreeMap::new();
    for id in 1..=a.publishers {
        children.0.insert(id, spawn(id, per_worker)?);
    }

    let t0 = Instant::now();
    let mut phase = 0;
    let mut killed_at = None;
    let deadline = Instant::now() + WAIT * 2;
    while phase < 4 {
        let ev = match tokio::time::timeout_at(deadline.into(), sub.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => bail!("the subscriber stopped"),
            Err(_) => bail!(
                "the demo did not complete within {:?} (phase {phase})",
                WAIT * 2
            ),
        };
        let at = t0.elapsed().as_secs_f64();
        match &ev {
            Event::Message(m) => {
                let w = workers.entry(m.meta.publisher_id).or_default();
                w.messages += 1;
                w.last_seq = m.meta.seq;
            }
            Event::Notice(n) => {
                let w = workers.entry(n.publisher_id()).or_default();
                match n {
                    Notice::Joined { publisher_id, seq, .. } => println!("{at:7.3}s  worker {publisher_id} joined (connected; its stream starts after seq {seq})"),
                    Notice::Gap { publisher_id, first, last, .. } => {
                        w.gaps += 1;
                        w.lost += last - first + 1;
                        println!("{at:7.3}s  worker {publisher_id}: messages {first}..={last} lost");
                    }
                    Notice::Restarted { publisher_id, last_seq, .. } => {
                        w.restarts += 1;
                        println!("{at:7.3}s  worker {publisher_id} restarted: new incarnation (the old one ended at seq {last_seq})");
                    }
                    Notice::Silent { .. } => {}
                    other => println!("{at:7.3}s  worker {}: {}", other.publisher_id(), other.name()),
                }
            }
            Event::Discovery(PublisherChange::Added {
                endpoint,
                publisher_id,
                ..
            }) => {
                println!(
                    "{at:7.3}s  discovery: worker {} at {endpoint}",
                    publisher_id.unwrap_or_default()
                )
            }
            Event::Discovery(PublisherChange::Removed { publisher_id, .. }) => {
                let after = killed_at
                    .map(|k: Instant| format!(" ({} ms after SIGKILL)", k.elapsed().as_millis()))
                    .unwrap_or_default();
                println!(
                    "{at:7.3}s  discovery: worker {} gone{after}",
                    publisher_id.unwrap_or_default()
                );
                killed_at = None;
            }
        }
        let all_in = |ids: &[u64], w: &BTreeMap<u64, Worker>| {
            ids.iter()
                .all(|id| w.get(id).is_some_and(|w| w.last_seq >= per_worker))
        };
        match phase {
            0 if all_in(&(1..=a.publishers).collect::<Vec<_>>(), &workers) => {
                println!("{at:7.3}s  every worker's {per_worker} reports received; killing worker 1 with SIGKILL");
                if let Some(mut c) = children.0.remove(&1) {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                killed_at = Some(Instant::now());
                phase = 1;
            }
            1 if matches!(
                ev,
                Event::Discovery(PublisherChange::Removed {
                    publisher_id: Some(1),
                    ..
                })
            ) =>
            {
                let id = a.publishers + 1;
                println!("{at:7.3}s  starting a new worker {id}");
                children.0.insert(id, spawn(id, per_worker)?);
                phase = 2;
            }
            2 if all_in(&[a.publishers + 1], &workers) => {
                println!("{at:7.3}s  restarting worker 2 under the same id");
                if let Some(mut c) = children.0.remove(&2) {
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
                    let _ = c.wait();
                }
                children.0.insert(2, spawn(2, per_worker)?);
                phase = 3;
            }
            3 if matches!(
                ev,
                Event::Notice(Notice::Restarted {
                    publisher_id: 2,
                    ..
                })
            ) =>
            {
                phase = 4
            }
            _ => {}
        }
    }
    drop(children);

    println!();
    println!("| worker | messages | last seq | gaps | lost | restarts |");
    println!("|---|---|---|---|---|---|");
    for (id, w) in &workers {
        println!(
            "| {id} | {} | {} | {} | {} | {} |",
            w.messages, w.last_seq, w.gaps, w.lost, w.restarts
        );
    }
    let st = sub.stats();
    println!();
    println!(
        "subscriber: {} messages received, {} lost (all reported above), {} malformed, {} dropped by its queue",
        st.sequence.delivered, st.sequence.lost, st.malformed(), st.queue_dropped
    );
    Ok(())
}
