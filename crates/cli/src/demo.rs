//! `eventplane demo`: KV-aware routing end to end, on one machine, nothing
//! to install.
//!
//! For each routing mode (`kv`, `kv-no-events`, `round-robin`, `random`),
//! from a clean slate: `--workers` mock engines and a frontend start in this
//! process, each with its own event plane (ZMQ sockets on loopback, file
//! discovery in a fresh directory): every KV event crosses a real ZMQ
//! socket and every worker is found through discovery. A load generator
//! replays the Mooncake conversation trace against the frontend over HTTP
//! (streaming), compressed in time by `--speedup`: each trace `hash_id`
//! becomes one block of `--block-size` deterministic token ids (the trace's
//! blocks are 512 tokens; 16 keeps the demo fast with the same prefix
//! structure), and output lengths shrink by the same factor.
//!
//! The table compares, per mode: the prefix-cache hit rate (cached prompt
//! tokens / prompt tokens, as the workers report them), time to first token
//! and end-to-end latency (p50/p99, wall time at the compressed speed), and
//! how requests spread over the workers. The **oracle** row is what a
//! router with perfect global cache knowledge could reach: the same trace
//! through one pooled LRU cache of all workers' capacity, counting hits the
//! way the engines do (a fully cached prompt still computes its last block),
//! where a request's blocks are cached from its first token on (on the KV
//! run's clock), as in an engine. The **instant oracle** caches them the
//! moment a request arrives: a looser bound no engine can reach when
//! requests sharing a prefix overlap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use eventplane::{Config, DiscoveryKind, EventPlane, Scope, TransportKind};
use eventplane_frontend::{FleetChange, FrontendSettings, Mode, RouterSettings};
use eventplane_kv::hash::{next_seq, LocalHash};
use eventplane_kv::router::Weights;
use eventplane_kv::tokenize::VOCAB;
use eventplane_worker::mock::{self, EngineConfig, MockWorkerSettings, Timing};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::args::{DemoArgs, DemoMode};

/// Tokens per block in the trace.
const TRACE_BLOCK: u64 = 512;

#[derive(Debug, Clone, Deserialize)]
struct TraceRequest {
    timestamp: u64,
    output_length: u64,
    hash_ids: Vec<u64>,
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
struct Outcome {
    ok: bool,
    /// When it was sent, from the start of the replay.
    sent: Duration,
    /// Leading blocks the router expected the worker to have cached.
    expected_blocks: u64,
    worker: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    ttft: Duration,
    e2e: Duration,
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    mode: String,
    requests: usize,
    failed: usize,
    hit_rate: f64,
    /// What the router expected, from its index (cached blocks it counted
    /// on / prompt blocks).
    expected_hit_rate: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    requests_per_worker: Vec<usize>,
    wall_s: f64,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let path = find_trace(a.trace.as_deref())?;
    let trace = read_trace(&path, a.requests as usize)?;
    eprintln!(
        "replaying {} requests of {} with {} workers × {} blocks of {} tokens, {}× faster than real time",
        trace.len(),
        path.display(),
        a.workers,
        a.num_gpu_blocks,
        a.block_size,
        a.speedup
    );
    let mut rows = Vec::new();
    let mut timeline: Option<Vec<Outcome>> = None;
    for &mode in &a.modes {
        let (row, outcomes) = run_mode(&a, mode, &trace).await?;
        // The oracle lives on the KV run's clock (else the first run's).
        if timeline.is_none() || mode == DemoMode::Kv {
            timeline = Some(outcomes);
        }
        rows.push(row);
    }
    let capacity = (a.workers * a.num_gpu_blocks) as usize;
    let oracle = oracle_hit_rate(&trace, capacity, timeline.as_deref());
    let instant_oracle = oracle_hit_rate(&trace, capacity, None);
    if a.json {
        println!(
            "{}",
            json!({"trace": path.display().to_string(), "rows": rows, "oracle_hit_rate": oracle,
                   "instant_oracle_hit_rate": instant_oracle})
        );
    } else {
        print_table(&rows, oracle, instant_oracle);
    }
    if let Some(svg) = &a.plot {
        std::fs::write(svg, plot(&rows, oracle))
            .with_context(|| format!("writing {}", svg.display()))?;
        eprintln!("chart written to {}", svg.display());
    }
    Ok(())
}

/// The trace: `--trace`, else the shared copy beside the project or the
/// working directory.
fn find_trace(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let rel = Path::new("shared/data/mooncake/conversation_trace.jsonl");
    let mut candidates = vec![
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../..")
            .join(rel),
        Path::new("..").join(rel),
        rel.to_path_buf(),
    ];
    if let Ok(exe) = std::env::current_exe() {
        // target/release/eventplane → the project's parent.
        if let Some(root) = exe.ancestors().nth(4) {
            candidates.push(root.join(rel));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("the Mooncake trace was not found beside the project (shared/data/mooncake/conversation_trace.jsonl); pass --trace PATH")
}

fn read_trace(path: &Path, limit: usize) -> anyhow::Result<Vec<TraceRequest>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if out.len() == limit {
            break;
        }
        let r: TraceRequest = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a trace request", path.display(), i + 1))?;
        if !r.hash_ids.is_empty() {
            out.push(r);
        }
    }
    if out.is_empty() {
        bail!("{} holds no requests", path.display());
    }
    Ok(out)
}

/// The token ids of one trace block (deterministic in its hash id).
fn block_tokens(hash_id: u64, block_size: u64, out: &mut Vec<u32>) {
    for j in 0..block_size {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&hash_id.to_le_bytes());
        buf[8..].copy_from_slice(&j.to_le_bytes());
        out.push(1 + (xxh3_64_with_seed(&buf, 99) % u64::from(VOCAB - 1)) as u32);
    }
}

async fn run_mode(
    a: &DemoArgs,
    mode: DemoMode,
    trace: &[TraceRequest],
) -> anyhow::Result<(Row, Vec<Outcome>)> {
    let name = match mode {
        DemoMode::Kv => "kv",
        DemoMode::KvNoEvents => "kv --no-kv-events",
        DemoMode::RoundRobin => "round-robin",
        DemoMode::Random => "random",
    };
    let dir = tempfile::tempdir()?;
    let plane = || {
        EventPlane::start(Config {
            transport: TransportKind::Zmq,
            discovery: DiscoveryKind::File,
            discovery_dir: Some(dir.path().to_path_buf()),
            ..Config::default()
        })
    };
    let scope = Scope::new("demo", "backend")?;
    // Workers first: each its own event plane, as separate processes would.
    let mut workers = Vec::new();
    for id in 1..=a.workers {
        let p = plane().await?;
        let w = mock::start(
            &p,
            MockWorkerSettings {
                engine: EngineConfig {
                    num_gpu_blocks: a.num_gpu_blocks as usize,
                    block_size: a.block_size as usize,
                    max_num_seqs: 256,
                    max_num_batched_tokens: 8192,
                    timing: Timing {
                        speedup: a.speedup,
                        ..Timing::default()
                    },
                },
                worker_id: id,
                model: "mock-model".into(),
                scope: scope.clone(),
                http: SocketAddr::from(([127, 0, 0, 1], 0)),
                queue: 8192,
                load_debounce: Duration::from_millis(20),
                load_heartbeat: Duration::from_secs(1),
                vllm_events_port: None,
            },
        )
        .await?;
        workers.push((p, w));
    }
    let (changes_tx, mut changes) = tokio::sync::mpsc::channel(1024);
    let frontend_plane = plane().await?;
    let no_kv_events = mode == DemoMode::KvNoEvents;
    let frontend = eventplane_frontend::start(
        &frontend_plane,
        FrontendSettings {
            router: RouterSettings {
                mode: match mode {
                    DemoMode::Kv | DemoMode::KvNoEvents => Mode::Kv,
                    DemoMode::RoundRobin => Mode::RoundRobin,
                    DemoMode::Random => Mode::Random,
                },
                weights: Weights {
                    overlap: a.overlap_weight,
                    ..Weights::default()
                },
                block_size: Some(a.block_size as u32),
                router_id: 1,
                booking_ttl: Duration::from_secs(600),
            },
            no_kv_events,
            replica_sync: false,
            tokenizer: None,
            scope,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            fleet_changes: Some(changes_tx),
        },
    )
    .await?;
    // Every worker routable, and (with events) every KV stream connected.
    let (mut joined, mut heard) = (0, 0);
    let need_heard = if no_kv_events { 0 } else { a.workers };
    tokio::time::timeout(Duration::from_secs(30), async {
        while joined < a.workers || heard < need_heard {
            match changes.recv().await {
                Some(FleetChange::Joined(_)) => joined += 1,
                Some(FleetChange::KvJoined { .. }) => heard += 1,
                Some(FleetChange::Left { .. }) | None => {}
            }
        }
    })
    .await
    .context("the frontend did not find the workers within 30 s")?;

    let outcomes = replay(a, &frontend.url, trace, name).await;
    let wall = outcomes.1;
    let outcomes = outcomes.0;
    frontend.stop();
    for (_, w) in workers {
        w.stop();
    }
    let row = summarise(name, &outcomes, a.workers as usize, a.block_size, wall);
    Ok((row, outcomes))
}

async fn replay(
    a: &DemoArgs,
    url: &str,
    trace: &[TraceRequest],
    name: &str,
) -> (Vec<Outcome>, Duration) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("HTTP client");
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(1024));
    let mut tasks = Vec::with_capacity(trace.len());
    let progress = Progress::new(name, trace.len());
    let first_ts = trace[0].timestamp;
    for r in trace {
        let due =
            started + Duration::from_secs_f64((r.timestamp - first_ts) as f64 / 1000.0 / a.speedup);
        tokio::time::sleep_until(due.into()).await;
        let mut prompt = Vec::with_capacity(r.hash_ids.len() * a.block_size as usize);
        for &h in &r.hash_ids {
            block_tokens(h, a.block_size, &mut prompt);
        }
        let max_tokens = (r.output_length * a.block_size / TRACE_BLOCK).max(1);
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "stream": true,
                          "stream_options": {"include_usage": true}});
        let (client, url, permit, progress) = (
            client.clone(),
            format!("{url}/v1/completions"),
            Arc::clone(&limit),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permit.acquire_owned().await;
            let mut o = one_request(&client, &url, body).await;
            o.sent = due.saturating_duration_since(started);
            progress.tick();
            o
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.unwrap_or_default());
    }
    progress.done();
    (outcomes, started.elapsed())
}

async fn one_request(client: &reqwest::Client, url: &str, body: Value) -> Outcome {
    let sent = Instant::now();
    let Ok(response) = client.post(url).json(&body).send().await else {
        return Outcome::default();
    };
    if !response.status().is_success() {
        return Outcome::default();
    }
    let worker = response
        .headers()
        .get("x-eventplane-worker")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let expected_blocks = response
        .headers()
        .get("x-eventplane-cached-blocks")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut o = Outcome {
        worker,
        expected_blocks,
        ..Outcome::default()
    };
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut first = true;
    while let Some(Ok(chunk)) = stream.next().await {
        if first {
            o.ttft = sent.elapsed();
            first = false;
        }
        buffer.extend_from_slice(&chunk);
    }
    o.e2e = sent.elapsed();
    for line in String::from_utf8_lossy(&buffer).lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            o.ok = true;
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(data) {
            if let Some(u) = v.get("usage") {
                o.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                o.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
        }
    }
    o
}

fn summarise(
    name: &str,
    outcomes: &[Outcome],
    workers: usize,
    block_size: u64,
    wall: Duration,
) -> Row {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let prompt: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let cached: u64 = ok.iter().map(|o| o.cached_tokens).sum();
    let ms = |mut v: Vec<Duration>, q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        v.sort();
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        (v[i].as_secs_f64() * 1e4).round() / 10.0
    };
    let ttft: Vec<Duration> = ok.iter().map(|o| o.ttft).collect();
    let e2e: Vec<Duration> = ok.iter().map(|o| o.e2e).collect();
    let mut per_worker: BTreeMap<u64, usize> = (1..=workers as u64).map(|w| (w, 0)).collect();
    for o in &ok {
        *per_worker.entry(o.worker).or_default() += 1;
    }
    Row {
        mode: name.into(),
        requests: ok.len(),
        failed: outcomes.len() - ok.len(),
        hit_rate: if prompt == 0 {
            0.0
        } else {
            cached as f64 / prompt as f64
        },
        expected_hit_rate: if prompt == 0 {
            0.0
        } else {
            ok.iter().map(|o| o.expected_blocks).sum::<u64>() as f64 * block_size as f64
                / prompt as f64
        },
        ttft_p50_ms: ms(ttft.clone(), 0.5),
        ttft_p99_ms: ms(ttft, 0.99),
        e2e_p50_ms: ms(e2e.clone(), 0.5),
        e2e_p99_ms: ms(e2e, 0.99),
        requests_per_worker: per_worker.into_values().collect(),
        wall_s: (wall.as_secs_f64() * 10.0).round() / 10.0,
    }
}

/// The hit rate of one pooled LRU cache of `capacity` blocks seeing every
/// request: what perfect global cache knowledge could reach.
///
/// With a `timeline` (a run's outcomes, in trace order), a request's blocks
/// count as cached for later requests only from its first token on (when
/// it was sent, plus its time to first token, on that run's clock), as in a
/// real engine; without, the moment it arrives, which no engine can do for
/// requests that overlap.
fn oracle_hit_rate(trace: &[TraceRequest], capacity: usize, timeline: Option<&[Outcome]>) -> f64 {
    // Block (identified by its prefix) → (last use, cached from).
    let mut blocks: HashMap<u64, (u64, Duration)> = HashMap::new();
    let mut order: VecDeque<(u64, u64)> = VecDeque::new();
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, r) in trace.iter().enumerate() {
        let t = i as u64;
        let (arrival, ready) = match timeline.and_then(|tl| tl.get(i)) {
            Some(o) if o.ok => (o.sent, o.sent + o.ttft),
            Some(o) => (o.sent, o.sent),
            None => (Duration::ZERO, Duration::ZERO),
        };
        // Prefix identity: the ids chained as sequence hashes are.
        let mut keys: Vec<u64> = Vec::with_capacity(r.hash_ids.len());
        let mut prev = None;
        for &h in &r.hash_ids {
            let seq = next_seq(prev, None, LocalHash(h));
            keys.push(seq.0);
            prev = Some(seq);
        }
        let cached = keys
            .iter()
            .take_while(|k| blocks.get(k).is_some_and(|(_, from)| *from <= arrival))
            .count();
        hits += cached.min(keys.len() - 1) as u64;
        total += keys.len() as u64;
        for k in keys {
            let from = blocks.get(&k).map_or(ready, |(_, f)| (*f).min(ready));
            blocks.insert(k, (t, from));
            order.push_back((t, k));
        }
        while blocks.len() > capacity {
            let Some((when, k)) = order.pop_front() else {
                break;
            };
            if blocks.get(&k).map(|(u, _)| *u) == Some(when) {
                blocks.remove(&k);
            }
        }
    }
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

fn print_table(rows: &[Row], oracle: f64, instant_oracle: f64) {
    println!();
    println!(
        "{:<18} {:>8} {:>9} {:>12} {:>12} {:>12} {:>12}  requests per worker",
        "mode", "requests", "hit rate", "TTFT p50 ms", "TTFT p99 ms", "e2e p50 ms", "e2e p99 ms"
    );
    for r in rows {
        let failed = if r.failed > 0 {
            format!(" ({} failed)", r.failed)
        } else {
            String::new()
        };
        println!(
            "{:<18} {:>8} {:>8.1}% {:>12.1} {:>12.1} {:>12.1} {:>12.1}  {:?}{failed}",
            r.mode,
            r.requests,
            r.hit_rate * 100.0,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.e2e_p50_ms,
            r.e2e_p99_ms,
            r.requests_per_worker
        );
    }
    println!(
        "{:<18} {:>8} {:>8.1}%   (one pooled cache of all workers' blocks, cached from each request's first token)",
        "oracle",
        "",
        oracle * 100.0
    );
    if (instant_oracle - oracle).abs() >= 0.0005 {
        println!(
            "{:<18} {:>8} {:>8.1}%   (the same, cached the moment a request arrives: beyond any engine)",
            "instant oracle",
            "",
            instant_oracle * 100.0
        );
    }
    if let (Some(kv), Some(rr)) = (
        rows.iter().find(|r| r.mode == "kv"),
        rows.iter().find(|r| r.mode == "round-robin"),
    ) {
        println!(
            "\nkv vs round-robin: {:.2}× the hit rate; kv reaches {:.0}% of the oracle.",
            kv.hit_rate / rr.hit_rate.max(f64::MIN_POSITIVE),
            kv.hit_rate / oracle.max(f64::MIN_POSITIVE) * 100.0
        );
    }
}

/// A bar chart of hit rates (with the oracle) and TTFT p50 per mode.
fn plot(rows: &[Row], oracle: f64) -> String {
    let bar_w = 90.0;
    let gap = 40.0;
    let h = 240.0;
    let width = 80.0 + (rows.len() as f64 + 1.0) * (bar_w + gap);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{}' font-family='sans-serif' font-size='12'>\n<text x='20' y='20' font-size='14'>Prefix-cache hit rate by routing mode (TTFT p50 under each bar)</text>\n",
        h + 90.0
    );
    let mut x = 60.0;
    let mut bar = |label: &str, rate: f64, sub: String, color: &str, svg: &mut String| {
        let bh = rate * h;
        svg.push_str(&format!(
            "<rect x='{x}' y='{}' width='{bar_w}' height='{bh}' fill='{color}'/>\n<text x='{}' y='{}' text-anchor='middle'>{:.1}%</text>\n<text x='{}' y='{}' text-anchor='middle'>{label}</text>\n<text x='{}' y='{}' text-anchor='middle' fill='#555'>{sub}</text>\n",
            40.0 + h - bh,
            x + bar_w / 2.0,
            35.0 + h - bh,
            rate * 100.0,
            x + bar_w / 2.0,
            h + 58.0,
            x + bar_w / 2.0,
            h + 74.0
        ));
        x += bar_w + gap;
    };
    for r in rows {
        bar(
            &r.mode,
            r.hit_rate,
            format!("TTFT {:.1} ms", r.ttft_p50_ms),
            "#3b7dd8",
            &mut svg,
        );
    }
    bar("oracle", oracle, String::new(), "#999", &mut svg);
    svg.push_str(&format!(
        "<line x1='50' y1='{}' x2='{}' y2='{}' stroke='black'/>\n</svg>\n",
        40.0 + h,
        width - 20.0,
        40.0 + h
    ));
    svg
}

/// A progress line on stderr, redrawn at most ten times a second.
#[derive(Clone)]
struct Progress {
    inner: Arc<std::sync::Mutex<(usize, Instant)>>,
    total: usize,
    name: String,
}

impl Progress {
    fn new(name: &str, total: usize) -> Self {
        Progress {
            inner: Arc::new(std::sync::Mutex::new((0, Instant::now()))),
            total,
            name: name.into(),
        }
    }

    fn tick(&self) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.0 += 1;
        // On a terminal, redraw ten times a second; in a log, a line per 10%.
        let due = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            g.1.elapsed() >= Duration::from_millis(100)
        } else {
            g.0 % (self.total / 10).max(1) == 0
        };
        if due || g.0 == self.total {
            let lf = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                "\r"
            } else {
                "\n"
            };
            g.1 = Instant::now();
            let width = 30;
            let filled = g.0 * width / self.total.max(1);
            eprint!(
                "{lf}{:<18} [{}{}] {}/{}",
                self.name,
                "#".repeat(filled),
                " ".repeat(width - filled),
                g.0,
                self.total
            );
        }
    }

    fn done(&self) {
        eprintln!();
    }
}
