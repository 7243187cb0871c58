//! The mock engine's I/O loop: one task owns the [`Engine`], takes requests
//! from a bounded queue, runs steps and lets each step's simulated duration
//! pass, hands tokens to each request's own bounded channel, and publishes
//! KV events and load metrics on the event plane.
//!
//! Queues: submissions wait in a queue of `queue` entries (a full queue is
//! refused at once, as HTTP 503); each request's tokens go through a channel
//! sized to hold all of them, so delivering never blocks the engine. A
//! request whose receiver is gone (the client disconnected) is aborted and
//! its blocks released at the next step.
//!
//! Load metrics go out when they change, at most every `load_debounce`, and
//! at least every `load_heartbeat` even when nothing changes, so a router
//! never mistakes silence for idleness.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eventplane::Publisher;
use eventplane_kv::event::{KvEventBatch, LoadMetrics, EVENT_VERSION};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::engine::{Engine, Load, NewRequest, Output, Rejected, RequestId, Usage};
use super::vllm_mirror::{self, VllmMirror};

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What a request receives, in order: tokens, then one `Finished` (or one
/// `Rejected` instead of everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// A generated token.
    Token(u32),
    /// The last token was sent; the counts.
    Finished(Usage),
    /// The engine refused the request.
    Rejected(Rejected),
}

/// Why a submission was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The submission queue is full.
    #[error("the engine's queue is full ({0} requests waiting to be admitted)")]
    QueueFull(usize),
    /// The engine task has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters and gauges of the engine task, served by `/metrics`.
#[derive(Debug, Default)]
pub struct ServiceStats {
    requests: Counter,
    finished: Counter,
    aborted: Counter,
    rejected: Counter,
    queue_full: Counter,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    generated_tokens: Counter,
    steps: Counter,
    preemptions: Counter,
    kv_batches: Counter,
    load_messages: Counter,
    publish_errors: Counter,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ServiceStats {
    /// Adds every metric to `registry`: ours as `eventplane_worker_*`, and
    /// the load gauges also under vLLM's names (`vllm:num_requests_running`,
    /// `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
    /// `vllm:cache_config_info`), so tools that read vLLM, our relay
    /// included, read the mock engine the same way.
    pub fn register(&self, root: &mut Registry, block_size: usize, num_gpu_blocks: usize) {
        root.register(
            "vllm:num_requests_running",
            "Requests running (vLLM's name)",
            self.running.clone(),
        );
        root.register(
            "vllm:num_requests_waiting",
            "Requests waiting (vLLM's name)",
            self.waiting.clone(),
        );
        root.register(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV blocks in use (vLLM's name)",
            self.kv_usage.clone(),
        );
        let info = Family::<Vec<(String, String)>, Gauge>::default();
        info.get_or_create(&vec![
            ("block_size".to_owned(), block_size.to_string()),
            ("num_gpu_blocks".to_owned(), num_gpu_blocks.to_string()),
        ])
        .set(1);
        root.register(
            "vllm:cache_config_info",
            "KV cache configuration (vLLM's name)",
            info,
        );
        let registry = root.sub_registry_with_prefix("eventplane_worker");
        let counters = [
            (
                "requests",
                "Requests accepted by the engine",
                &self.requests,
            ),
            ("finished", "Requests finished", &self.finished),
            (
                "aborted",
                "Requests aborted because their client went away",
                &self.aborted,
            ),
            ("rejected", "Requests the engine refused", &self.rejected),
            (
                "queue_full",
                "Requests refused because the engine's queue was full",
                &self.queue_full,
            ),
            (
                "prompt_tokens",
                "Prompt tokens of finished requests",
                &self.prompt_tokens,
            ),
            (
                "cached_tokens",
                "Prompt tokens of finished requests found in the prefix cache",
                &self.cached_tokens,
            ),
            (
                "generated_tokens",
                "Tokens generated",
                &self.generated_tokens,
            ),
            ("steps", "Engine steps run", &self.steps),
            (
                "preemptions",
                "Requests preempted for lack of KV blocks",
                &self.preemptions,
            ),
            (
                "kv_event_batches",
                "KV event batches published",
                &self.kv_batches,
            ),
            (
                "load_messages",
                "Load metric messages published",
                &self.load_messages,
            ),
            (
                "publish_errors",
                "Publishes on the event plane that failed",
                &self.publish_errors,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        let gauges = [
            (
                "kv_blocks_used",
                "KV blocks referenced by requests",
                &self.kv_blocks_used,
            ),
            (
                "kv_blocks_total",
                "KV blocks in the pool",
                &self.kv_blocks_total,
            ),
            ("running_requests", "Requests running", &self.running),
            (
                "waiting_requests",
                "Requests waiting to be scheduled",
                &self.waiting,
            ),
        ];
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
    }

    /// Requests finished so far.
    pub fn finished(&self) -> u64 {
        self.finished.get()
    }

    /// Requests aborted so far because their client went away.
    pub fn aborted(&self) -> u64 {
        self.aborted.get()
    }
}

struct Submission {
    prompt: Vec<u32>,
    max_tokens: u32,
    reply: mpsc::Sender<Delta>,
}

/// Submits requests to the engine task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    capacity: usize,
    stats: Arc<ServiceStats>,
}

impl EngineHandle {
    /// Queues a request; its tokens arrive on the returned receiver.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        max_tokens: u32,
    ) -> Result<mpsc::Receiver<Delta>, SubmitError> {
        // Room for every token, the end, and nothing else: never full.
        let (reply, rx) = mpsc::channel(max_tokens.max(1) as usize + 1);
        let sub = Submission {
            prompt,
            max_tokens,
            reply,
        };
        match self.tx.try_send(sub) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.queue_full.inc();
                Err(SubmitError::QueueFull(self.capacity))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Stopped),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ServiceStats> {
        &self.stats
    }
}

/// Where the engine task publishes.
pub struct Publishers {
    /// KV event batches.
    pub kv_events: Publisher,
    /// Load metrics.
    pub load: Publisher,
}

/// Settings of the engine task.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSettings {
    /// The worker's id in KV events and load metrics.
    pub worker_id: u64,
    /// Its data-parallel rank.
    pub dp_rank: u32,
    /// Submissions that may wait to be admitted.
    pub queue: usize,
    /// Least time between two load messages caused by changes.
    pub load_debounce: Duration,
    /// Most time between two load messages.
    pub load_heartbeat: Duration,
}

/// Starts the engine task; it runs until every handle is dropped. With a
/// `mirror`, KV events also go out in vLLM's format.
pub fn spawn(
    mut engine: Engine,
    publishers: Option<Publishers>,
    mirror: Option<VllmMirror>,
    settings: ServiceSettings,
) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    if mirror.is_some() {
        engine.record_tokens();
    }
    let (tx, rx) = mpsc::channel(settings.queue.max(1));
    let stats = Arc::new(ServiceStats::default());
    let handle = EngineHandle {
        tx,
        capacity: settings.queue,
        stats: Arc::clone(&stats),
    };
    let task = tokio::spawn(
        Service {
            engine_clock: Instant::now(),
            engine,
            rx,
            publishers,
            mirror,
            settings,
            stats,
            requests: HashMap::new(),
            next_id: 0,
            last_load: None,
            last_load_at: None,
        }
        .run(),
    );
    (handle, task)
}

/// The timer's resolution: shorter waits are not worth a sleep.
const TIMER_TICK: Duration = Duration::from_millis(1);

struct Service {
    /// Simulated time: when the last step's work ends.
    engine_clock: Instant,
    engine: Engine,
    rx: mpsc::Receiver<Submission>,
    publishers: Option<Publishers>,
    mirror: Option<VllmMirror>,
    settings: ServiceSettings,
    stats: Arc<ServiceStats>,
    requests: HashMap<RequestId, mpsc::Sender<Delta>>,
    next_id: RequestId,
    last_load: Option<Load>,
    last_load_at: Option<Instant>,
}

impl Service {
    async fn run(mut self) {
        self.publish_load(Instant::now(), true);
        loop {
            while let Ok(sub) = self.rx.try_recv() {
                self.admit(sub);
            }
            if !self.engine.has_work() {
                let heartbeat = self.next_heartbeat();
                tokio::select! {
                    sub = self.rx.recv() => match sub {
                        Some(sub) => self.admit(sub),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(heartbeat) => {}
                }
                self.publish_load(Instant::now(), false);
                continue;
            }
            let started = Instant::now();
            self.drop_abandoned();
            let step = self.engine.step();
            self.stats.steps.inc();
            self.stats.preemptions.inc_by(step.preempted as u64);
            for output in step.outputs {
                self.deliver(output);
            }
            self.publish_events();
            self.publish_load(started, false);
            // The simulated GPU is busy for the step's duration. Engine time
            // may run ahead of the wall clock by up to a timer tick (1 ms)
            // before we sleep: sleeping for each sub-millisecond step would
            // round every one up to a whole tick.
            let engine_now = self.engine_clock.max(started) + step.duration;
            self.engine_clock = engine_now;
            if engine_now > Instant::now() + TIMER_TICK {
                tokio::time::sleep_until(engine_now).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        tracing::debug!("engine task stopped: no handle left");
    }

    fn admit(&mut self, sub: Submission) {
        let id = self.next_id;
        self.next_id += 1;
        let request = NewRequest {
            id,
            prompt: sub.prompt,
            max_tokens: sub.max_tokens,
            salt: None,
        };
        match self.engine.add(request) {
            Ok(()) => {
                self.stats.requests.inc();
                self.requests.insert(id, sub.reply);
            }
            Err(e) => {
                self.stats.rejected.inc();
                let _ = sub.reply.try_send(Delta::Rejected(e));
            }
        }
    }

    /// Aborts requests whose client went away.
    fn drop_abandoned(&mut self) {
        let engine = &mut self.engine;
        let stats = &self.stats;
        self.requests.retain(|id, reply| {
            if reply.is_closed() {
                engine.abort(*id);
                stats.aborted.inc();
                false
            } else {
                true
            }
        });
    }

    fn deliver(&mut self, output: Output) {
        match output {
            Output::Token { id, token, .. } => {
                self.stats.generated_tokens.inc();
                if let Some(reply) = self.requests.get(&id) {
                    // Sized for every token: only a closed receiver fails.
                    if reply.try_send(Delta::Token(token)).is_err() {
                        self.engine.abort(id);
                        self.requests.remove(&id);
                        self.stats.aborted.inc();
                    }
                }
            }
            Output::Finished { id, usage } => {
                self.stats.finished.inc();
                self.stats
                    .prompt_tokens
                    .inc_by(u64::from(usage.prompt_tokens));
                self.stats
                    .cached_tokens
                    .inc_by(u64::from(usage.cached_tokens));
                if let Some(reply) = self.requests.remove(&id) {
                    let _ = reply.try_send(Delta::Finished(usage));
                }
            }
        }
    }

    fn publish_events(&mut self) {
        let events = match &mut self.mirror {
            Some(mirror) => {
                let with_tokens = self.engine.take_events_with_tokens();
                if with_tokens.is_empty() {
                    return;
                }
                let block_size = self.engine.config().block_size as u32;
                mirror.publish(vllm_mirror::encode_batch(
                    &with_tokens,
                    block_size,
                    unix_seconds(),
                ));
                with_tokens.into_iter().map(|(e, _)| e).collect()
            }
            None => self.engine.take_events(),
        };
        if events.is_empty() {
            return;
        }
        let Some(p) = &self.publishers else {
            return;
        };
        let batch = KvEventBatch {
            version: EVENT_VERSION,
            worker_id: self.settings.worker_id,
            dp_rank: self.settings.dp_rank,
            events,
        };
        let result = crate::kv_publish::publish_kv_batch(&p.kv_events, batch);
        self.count_publish(result, "KV events", &self.stats.kv_batches);
    }

    fn next_heartbeat(&self) -> Instant {
        self.last_load_at
            .map_or_else(Instant::now, |t| t + self.settings.load_heartbeat)
    }

    fn publish_load(&mut self, now: Instant, force: bool) {
        let load = self.engine.load();
        self.stats.kv_blocks_used.set(load.kv_blocks_used as i64);
        self.stats.kv_blocks_total.set(load.kv_blocks_total as i64);
        self.stats.running.set(i64::from(load.active_requests));
        self.stats.waiting.set(i64::from(load.waiting_requests));
        self.stats
            .kv_usage
            .set(load.kv_blocks_used as f64 / load.kv_blocks_total.max(1) as f64);
        let since = self.last_load_at.map(|t| now.saturating_duration_since(t));
        let changed = self.last_load != Some(load);
        let due = force
            || since.is_none_or(|s| {
                s >= self.settings.load_heartbeat || (changed && s >= self.settings.load_debounce)
            });
        if !due {
            return;
        }
        self.last_load = Some(load);
        self.last_load_at = Some(now);
        let Some(p) = &self.publishers else {
            return;
        };
        let message = LoadMetrics {
            version: EVENT_VERSION,
            worker_id: self.settings.worker_id,
            dp_rank: self.settings.dp_rank,
            kv_blocks_used: load.kv_blocks_used,
            kv_blocks_total: load.kv_blocks_total,
            active_requests: load.active_requests,
            waiting_requests: load.waiting_requests,
            active_prefill_tokens: load.active_prefill_tokens,
        };
        let result = p.load.publish(&message);
        self.count_publish(result, "load metrics", &self.stats.load_messages);
    }

    fn count_publish(
        &self,
        result: Result<u64, eventplane::PublishError>,
        what: &str,
        counter: &Counter,
    ) {
        match result {
            Ok(_) => {
                counter.inc();
            }
            Err(e) => {
                if self.stats.publish_errors.inc() == 0 {
                    tracing::warn!(error = %e, "publishing {what} failed (counted in eventplane_worker_publish_errors_total; logged once)");
                }
            }
        }
    }
}
