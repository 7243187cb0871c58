//! Running the relay: one thread per engine rank reads the engine's PUB
//! socket (frames `[topic, seq as 8 bytes big-endian, payload]`), asks the
//! replay socket when messages are missing, and publishes our KV events.
//!
//! Threads, not tasks: libzmq sockets are blocking and not `Send` across
//! awaits, and a thread per rank keeps a slow router from ever reaching
//! back to the engine: the engine's PUB drops (and we detect and replay)
//! rather than blocks.
//!
//! Replay (vLLM's protocol): a DEALER sends `["", start_seq (8 bytes BE)]`;
//! the ROUTER answers `["", seq, payload]` for every buffered batch from
//! there, then `["", -1 (8 bytes), ""]`. The live socket keeps queueing
//! meanwhile; what replay already delivered is skipped as it comes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use eventplane::{EventPlane, Identity, Publisher, Scope};
use eventplane_discovery::Registration;
use eventplane_kv::event::{KvEventBatch, EVENT_VERSION, KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC};
use eventplane_kv::KvEvent;

use super::load;
use super::state::{Live, RankRelay, RelayStats};
use crate::mock::{register, WorkerAdvert};

/// The engine sockets of one data-parallel rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEndpoints {
    /// The engine's PUB socket, e.g. `tcp://127.0.0.1:5557`.
    pub events: String,
    /// Its ROUTER replay socket, if it has one.
    pub replay: Option<String>,
}

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Our id for the engine (its KV events and its registration).
    pub worker_id: u64,
    /// Where we publish and register.
    pub scope: Scope,
    /// One entry per data-parallel rank, rank 0 first.
    pub ranks: Vec<RankEndpoints>,
    /// The engine's topic filter (vLLM's default is empty: everything).
    pub topic: String,
    /// The engine's OpenAI API, registered for frontends.
    pub engine_url: String,
    /// The model it serves.
    pub model: String,
    /// Its tokens per block (for the registration).
    pub block_size: u32,
    /// Engine blocks tracked per rank, at most.
    pub max_tracked: usize,
    /// How long a replay may take before what is missing counts as lost.
    pub replay_timeout: Duration,
    /// Read the engine's load from `{engine_url}/metrics` this often and
    /// publish it (`None`: do not).
    pub load_interval: Option<Duration>,
    /// The engine's KV blocks, when its metrics do not say.
    pub num_gpu_blocks: u64,
}

/// A running relay. Dropping it stops the threads and withdraws the
/// registration.
pub struct RunningRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Arc<Mutex<Vec<RelayStats>>>,
    registration: Option<Registration>,
}

impl RunningRelay {
    /// Per-rank counters, rank 0 first.
    pub fn stats(&self) -> Vec<RelayStats> {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the threads (within their poll interval) and withdraws the
    /// registration.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(r) = self.registration.take() {
            r.withdraw();
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How often a rank thread checks for shutdown while the engine is quiet.
const POLL: Duration = Duration::from_millis(100);

/// Starts relaying.
pub async fn start(plane: &EventPlane, s: RelaySettings) -> anyhow::Result<RunningRelay> {
    anyhow::ensure!(
        !s.ranks.is_empty(),
        "the relay needs at least one engine endpoint"
    );
    let channel = s.scope.channel(KV_EVENTS_TOPIC)?;
    let publisher = plane
        .publisher(&channel, Identity::new(s.worker_id))
        .await
        .with_context(|| format!("publishing on {channel}"))?;
    let ctx = zmq::Context::new();
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(interval) = s.load_interval {
        let load_channel = s.scope.channel(LOAD_METRICS_TOPIC)?;
        let load_publisher = plane
            .publisher(&load_channel, Identity::new(s.worker_id))
            .await
            .with_context(|| format!("publishing on {load_channel}"))?;
        tokio::spawn(load::scrape_loop(
            s.engine_url.clone(),
            s.worker_id,
            s.num_gpu_blocks,
            load_publisher,
            interval,
            Arc::clone(&stop),
            Arc::new(load::ScrapeStats::default()),
        ));
    }
    let stats = Arc::new(Mutex::new(vec![RelayStats::default(); s.ranks.len()]));
    let mut threads = Vec::new();
    for (rank, endpoints) in s.ranks.iter().enumerate() {
        let sub = ctx.socket(zmq::SUB)?;
        // Enough for bursts while a replay runs; past it libzmq drops, which
        // the sequence numbers reveal and replay repairs.
        sub.set_rcvhwm(100_000)?;
        sub.set_subscribe(s.topic.as_bytes())?;
        sub.connect(&endpoints.events).with_context(|| {
            format!(
                "connecting to the engine's KV events at {}",
                endpoints.events
            )
        })?;
        let dealer = match &endpoints.replay {
            Some(ep) => {
                let d = ctx.socket(zmq::DEALER)?;
                d.set_linger(0)?;
                d.connect(ep)
                    .with_context(|| format!("connecting to the engine's replay socket at {ep}"))?;
                Some(d)
            }
            None => None,
        };
        let worker = RankWorker {
            rank: rank as u32,
            worker_id: s.worker_id,
            sub,
            dealer,
            relay: RankRelay::new(s.max_tracked),
            publisher: publisher.clone(),
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
            replay_timeout: s.replay_timeout,
            bad_frames: 0,
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("relay-rank{rank}"))
                .spawn(move || worker.run())?,
        );
    }
    let advert = WorkerAdvert {
        worker_id: s.worker_id,
        url: s.engine_url.clone(),
        model: s.model.clone(),
        block_size: s.block_size,
        kv_blocks_total: s.num_gpu_blocks,
        data_parallel_size: s.ranks.len() as u32,
        pid: std::process::id(),
    };
    let registration = register(plane, &s.scope, &advert).await?;
    Ok(RunningRelay {
        stop,
        threads,
        stats,
        registration: Some(registration),
    })
}

struct RankWorker {
    rank: u32,
    worker_id: u64,
    sub: zmq::Socket,
    dealer: Option<zmq::Socket>,
    relay: RankRelay,
    publisher: Publisher,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Vec<RelayStats>>>,
    replay_timeout: Duration,
    bad_frames: u64,
}

/// A message's `(seq, payload)`, if its frames have the expected shape.
fn parse_frames(frames: &[Vec<u8>]) -> Option<(u64, &[u8])> {
    let [_topic, seq, payload] = frames else {
        return None;
    };
    let seq: [u8; 8] = seq.as_slice().try_into().ok()?;
    Some((u64::from_be_bytes(seq), payload))
}

impl RankWorker {
    fn run(mut self) {
        let mut last_report = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            match self.sub.poll(zmq::POLLIN, POLL.as_millis() as i64) {
                Ok(0) => {}
                Ok(_) => {
                    // Drain what is queued before looking at the clock.
                    while let Ok(frames) = self.sub.recv_multipart(zmq::DONTWAIT) {
                        self.on_frames(&frames);
                    }
                }
                Err(e) => {
                    tracing::error!(rank = self.rank, error = %e, "engine socket failed; relay thread stops");
                    break;
                }
            }
            if last_report.elapsed() >= Duration::from_millis(200) {
                self.report();
                last_report = Instant::now();
            }
        }
        self.report();
    }

    fn on_frames(&mut self, frames: &[Vec<u8>]) {
        let Some((seq, payload)) = parse_frames(frames) else {
            self.bad_frames += 1;
            if self.bad_frames == 1 {
                tracing::warn!(rank = self.rank, frames = frames.len(), "engine message without the [topic, seq, payload] frames; skipped (counted, logged once)");
            }
            return;
        };
        match self.relay.on_live(seq, payload) {
            Live::Publish(events) => self.publish(events),
            Live::Replay { from } => {
                tracing::info!(
                    rank = self.rank,
                    from,
                    upto = seq,
                    "engine messages missing: asking the replay socket"
                );
                self.replay(from);
                let events = self.relay.after_replay(seq, payload);
                self.publish(events);
            }
        }
        if let Some(e) = self.relay.take_error() {
            let s = self.relay.stats();
            if s.decode_errors + s.invalid_events == 1 {
                tracing::warn!(rank = self.rank, error = %e, "undecodable engine input skipped (counted in the relay's decode_errors / invalid_events; logged once)");
            }
        }
    }

    /// Asks for everything from `from`; applies what comes back until the
    /// end marker or the timeout.
    fn replay(&mut self, from: u64) {
        let Some(dealer) = &self.dealer else {
            return;
        };
        if let Err(e) = dealer.send_multipart([&b""[..], &from.to_be_bytes()[..]], 0) {
            tracing::warn!(rank = self.rank, error = %e, "replay request failed");
            return;
        }
        let deadline = Instant::now() + self.replay_timeout;
        let mut pending: Vec<KvEvent> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    rank = self.rank,
                    "replay timed out; what is still missing counts as lost"
                );
                break;
            }
            match dealer.poll(zmq::POLLIN, left.as_millis().max(1) as i64) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(_) => break,
            }
            let Ok(frames) = dealer.recv_multipart(0) else {
                break;
            };
            let Some((seq, payload)) = parse_frames(&frames) else {
                self.bad_frames += 1;
                continue;
            };
            if seq == u64::MAX {
                break; // -1: the end of the replay
            }
            pending.extend(self.relay.on_replayed(seq, payload));
        }
        self.publish(pending);
    }

    fn publish(&mut self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        let batch = KvEventBatch {
            version: EVENT_VERSION,
            worker_id: self.worker_id,
            dp_rank: self.rank,
            events,
        };
        if let Err(e) = crate::kv_publish::publish_kv_batch(&self.publisher, batch) {
            tracing::warn!(rank = self.rank, error = %e, "publishing relayed KV events failed");
        }
    }

    fn report(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s[self.rank as usize] = self.relay.stats();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_must_be_topic_seq_payload() {
        let ok = vec![b"".to_vec(), 7u64.to_be_bytes().to_vec(), b"p".to_vec()];
        assert_eq!(parse_frames(&ok), Some((7, &b"p"[..])));
        assert_eq!(parse_frames(&ok[..2]), None);
        let short_seq = vec![b"".to_vec(), vec![0; 4], b"p".to_vec()];
        assert_eq!(parse_frames(&short_seq), None);
    }
}
