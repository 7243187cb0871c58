//! `eventplane bench index --workload FILE`: replays a `*.kvops.jsonl(.gz)`
//! workload through the prefix index, in order, the way a router sees it
//! (events and lookups interleaved), and prints one JSON object.
//!
//! - `block_ops_per_s`: blocks stored plus blocks removed, divided by the
//!   time spent applying events (the replay's wall time less the time inside
//!   lookups).
//! - `query_*_us`: each lookup timed on its own, through an [`IndexReader`]
//!   (the handle routing tasks use), including chaining the query's local
//!   hashes into sequence hashes (done lazily, so a lookup that stops after
//!   three blocks hashes three blocks). The clock reads (~20 ns) are inside
//!   the timings.
//! - `index_bytes`: bytes held by allocations made while building the index
//!   and still live at the end, counted by the process's allocator (the
//!   `cap` crate wraps the system allocator in `main.rs`): measured, not
//!   computed from sizes. `bytes_per_cached_block` divides it by the live
//!   (worker, block) pairs.
//! - `fingerprint`: the sum over all lookups of the longest match, which
//!   two correct indexes must agree on; `fingerprint_ok` compares it with
//!   the header's.
//!
//! With `--concurrent-queries`, a second thread runs the workload's lookups
//! in a loop, without pause, through its own reader, for the whole replay;
//! its latencies are `concurrent_query_*`. The in-order figures are then
//! measured under that load.
//!
//! Each figure is the median over `--runs` replays, each on a fresh index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventplane_kv::workload::{Workload, WorkloadOp};
use eventplane_kv::{IndexReader, LocalHash, Matches, PrefixIndex, SeqHash, SeqHashes};
use serde::Serialize;

use super::median;
use crate::args::IndexBenchArgs;

/// What a timed lookup is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Sequence hashes, as the router's hashing step produces them from the
    /// prompt's tokens (the chaining is done before the replay).
    Hashed,
    /// The workload's local hashes, chained into sequence hashes inside the
    /// timed lookup.
    Chained,
}

/// The figures of one replay.
#[derive(Debug, Clone)]
struct Run {
    input: Input,
    block_ops_per_s: f64,
    latency: Latency,
    cached_blocks: u64,
    index_bytes: u64,
    fingerprint: u64,
    inconsistencies: u64,
    concurrent: Option<(u64, Latency)>,
}

/// Lookup latency percentiles, in µs.
#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    /// From nanoseconds, sorted here.
    fn of(ns: &mut [u64]) -> Self {
        ns.sort_unstable();
        Latency {
            p50: percentile_us(ns, 0.50),
            p99: percentile_us(ns, 0.99),
            max: percentile_us(ns, 1.0),
        }
    }
}

/// The printed result.
#[derive(Debug, Serialize)]
struct Report {
    workload: String,
    mode: &'static str,
    runs: u32,
    ops: usize,
    events: usize,
    queries: usize,
    block_ops: usize,
    block_ops_per_s: f64,
    query_p50_us: f64,
    query_p99_us: f64,
    query_max_us: f64,
    query_chained_p50_us: f64,
    query_chained_p99_us: f64,
    query_chained_max_us: f64,
    concurrent_queries: Option<u64>,
    concurrent_query_p50_us: Option<f64>,
    concurrent_query_p99_us: Option<f64>,
    concurrent_query_max_us: Option<f64>,
    cached_blocks: u64,
    index_bytes: u64,
    bytes_per_cached_block: f64,
    inconsistencies: u64,
    fingerprint: u64,
    fingerprint_expected: Option<u64>,
    fingerprint_ok: Option<bool>,
}

/// The workload with its queries prepared both ways.
struct Prepared<'a> {
    workload: &'a Workload,
    locals: Vec<&'a [LocalHash]>,
    hashed: Vec<Vec<SeqHash>>,
}

pub fn run(a: IndexBenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let workload = Workload::read(&a.workload)
        .with_context(|| format!("reading the workload {}", a.workload.display()))?;
    let locals: Vec<&[LocalHash]> = workload
        .ops
        .iter()
        .filter_map(|op| match op {
            WorkloadOp::Query { blocks } => Some(blocks.as_slice()),
            _ => None,
        })
        .collect();
    let hashed = locals
        .iter()
        .map(|l| SeqHashes::new(l, None).collect())
        .collect();
    let prepared = Prepared {
        workload: &workload,
        locals,
        hashed,
    };
    tracing::info!(
        ops = workload.ops.len(),
        queries = prepared.locals.len(),
        "read {} in {:.1} s",
        a.workload.display(),
        started.elapsed().as_secs_f64()
    );

    let mut runs = Vec::new();
    for i in 0..a.runs {
        let input = if i % 2 == 0 {
            Input::Hashed
        } else {
            Input::Chained
        };
        let r = replay(&prepared, input, a.concurrent_queries);
        tracing::info!(
            run = i + 1,
            input = ?input,
            block_ops_per_s = format!("{:.3e}", r.block_ops_per_s),
            query_p99_us = r.latency.p99,
            "replayed"
        );
        runs.push(r);
    }
    if runs
        .windows(2)
        .any(|w| w[0].fingerprint != w[1].fingerprint)
    {
        anyhow::bail!("replays disagreed on the fingerprint: the index is not deterministic");
    }

    let med = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let latency = |input: Input| {
        let of = |f: &dyn Fn(&Latency) -> f64| {
            median(
                runs.iter()
                    .filter(|r| r.input == input)
                    .map(|r| f(&r.latency))
                    .collect(),
            )
        };
        Latency {
            p50: of(&|l| l.p50),
            p99: of(&|l| l.p99),
            max: of(&|l| l.max),
        }
    };
    let (hashed, chained) = (latency(Input::Hashed), latency(Input::Chained));
    let conc = |f: &dyn Fn(&(u64, Latency)) -> f64| {
        a.concurrent_queries
            .then(|| med(&|r: &Run| r.concurrent.as_ref().map_or(0.0, f)))
    };
    let first = &runs[0];
    let cached_blocks = first.cached_blocks;
    let index_bytes = med(&|r| r.index_bytes as f64) as u64;
    let expected = workload.expected_fingerprint();
    let report = Report {
        workload: a.workload.display().to_string(),
        mode: if a.concurrent_queries {
            "concurrent-queries"
        } else {
            "in-order"
        },
        runs: a.runs,
        ops: workload.ops.len(),
        events: workload.ops.len() - prepared.locals.len(),
        queries: prepared.locals.len(),
        block_ops: workload.block_ops(),
        block_ops_per_s: med(&|r| r.block_ops_per_s).round(),
        query_p50_us: hashed.p50,
        query_p99_us: hashed.p99,
        query_max_us: hashed.max,
        query_chained_p50_us: chained.p50,
        query_chained_p99_us: chained.p99,
        query_chained_max_us: chained.max,
        concurrent_queries: conc(&|c| c.0 as f64).map(|q| q as u64),
        concurrent_query_p50_us: conc(&|c| c.1.p50),
        concurrent_query_p99_us: conc(&|c| c.1.p99),
        concurrent_query_max_us: conc(&|c| c.1.max),
        cached_blocks,
        index_bytes,
        bytes_per_cached_block: round3(index_bytes as f64 / cached_blocks.max(1) as f64),
        inconsistencies: first.inconsistencies,
        fingerprint: first.fingerprint,
        fingerprint_expected: expected,
        fingerprint_ok: expected.map(|e| e == first.fingerprint),
    };
    println!("{}", serde_json::to_string(&report)?);
    if report.fingerprint_ok == Some(false) {
        anyhow::bail!(
            "fingerprint {} differs from the workload's {}: the index answered wrongly",
            report.fingerprint,
            expected.unwrap_or_default()
        );
    }
    Ok(())
}

/// One replay on a fresh index.
fn replay(prepared: &Prepared<'_>, input: Input, concurrent: bool) -> Run {
    // Everything the bench itself needs is allocated before the baseline,
    // so the allocator's count at the end is the index's alone.
    let mut latencies: Vec<u64> = Vec::with_capacity(prepared.locals.len());
    let stop = Arc::new(AtomicBool::new(false));
    let (reader_tx, reader_rx) = std::sync::mpsc::sync_channel::<IndexReader>(1);
    let load = concurrent.then(|| {
        let stop = Arc::clone(&stop);
        let queries = prepared.hashed.clone();
        let latencies = Vec::with_capacity(1 << 22);
        std::thread::spawn(move || concurrent_lookups(reader_rx, queries, &stop, latencies))
    });

    let baseline = crate::ALLOCATOR.allocated();
    let mut index = PrefixIndex::new();
    let reader = index.reader();
    let mut matches = Matches::new();
    if load.is_some() {
        let _ = reader_tx.send(index.reader());
    }

    let mut fingerprint = 0u64;
    let mut in_queries = Duration::ZERO;
    let mut query = 0;
    let replay_started = Instant::now();
    for op in &prepared.workload.ops {
        if !matches!(op, WorkloadOp::Query { .. }) {
            op.apply_to(&mut index);
            continue;
        }
        let t = Instant::now();
        match input {
            Input::Hashed => reader.lookup(prepared.hashed[query].iter().copied(), &mut matches),
            Input::Chained => {
                reader.lookup(SeqHashes::new(prepared.locals[query], None), &mut matches)
            }
        }
        let took = t.elapsed();
        query += 1;
        in_queries += took;
        latencies.push(took.as_nanos() as u64);
        fingerprint += u64::from(matches.longest());
    }
    let in_events = replay_started.elapsed().saturating_sub(in_queries);

    stop.store(true, Ordering::Relaxed);
    // The lookup thread hands its buffers back, so they are freed after the
    // measurement, not during it.
    let (concurrent, buffers) = match load.map(|h| h.join().expect("the lookup thread panicked")) {
        Some((c, buffers)) => (Some(c), Some(buffers)),
        None => (None, None),
    };
    drop(matches);
    drop(reader);
    let index_bytes = crate::ALLOCATOR.allocated().saturating_sub(baseline) as u64;
    drop(buffers);

    let stats = index.stats();
    Run {
        input,
        block_ops_per_s: prepared.workload.block_ops() as f64 / in_events.as_secs_f64(),
        latency: Latency::of(&mut latencies),
        cached_blocks: index.cached_blocks(),
        index_bytes,
        fingerprint,
        inconsistencies: stats.inconsistencies(),
        concurrent,
    }
}

/// The second thread: lookups in a loop until told to stop.
#[allow(clippy::type_complexity)]
fn concurrent_lookups(
    reader: std::sync::mpsc::Receiver<IndexReader>,
    queries: Vec<Vec<SeqHash>>,
    stop: &AtomicBool,
    mut latencies: Vec<u64>,
) -> ((u64, Latency), (Vec<u64>, Vec<Vec<SeqHash>>)) {
    if let Ok(reader) = reader.recv() {
        let mut matches = Matches::new();
        'outer: loop {
            for q in &queries {
                if stop.load(Ordering::Relaxed) || latencies.len() == latencies.capacity() {
                    break 'outer;
                }
                let t = Instant::now();
                reader.lookup(q.iter().copied(), &mut matches);
                latencies.push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    let summary = (latencies.len() as u64, Latency::of(&mut latencies));
    (summary, (latencies, queries))
}

/// The `q` quantile (nearest rank) of sorted nanoseconds, in µs.
fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    round3(sorted[rank - 1] as f64 / 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
