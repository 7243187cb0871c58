//! `eventplane bench transport`: what a subscriber gets from a publisher.
//!
//! For every payload size and transport (eventplane over ZMQ and over NATS,
//! eventplane's in-process transport, and the baselines: raw libzmq PUB/SUB
//! and raw async-nats through the same `nats-server`), in one process and,
//! for the socket transports, across two:
//!
//! 1. **Sustained throughput**: the highest offered rate at which the
//!    subscriber receives every message. Found by bisection between 0 and
//!    the publisher's unpaced rate, with trials of `--trial-s` seconds (a
//!    failed trial is tried once more before the rate counts as too high).
//!    The bisections of all transports run in lockstep, one trial of each
//!    in turn (each step starting one transport later, see below),
//!    `--throughput-rounds` times; the median is reported.
//! 2. **Past it**: an unpaced trial, where the publisher outruns the
//!    subscriber. For eventplane, every lost message must be reported by
//!    sequence tracking (`unreported` must be 0); raw libzmq loses silently,
//!    and we only know how many because the bench numbers its payloads.
//! 3. **Latency** at a fixed offered rate (`--latency-rate`, default 50,000
//!    msg/s): publish → receive, p50 / p99 / p99.9, from the publisher's
//!    timestamp to the moment the application gets the message.
//!
//! Raw libzmq uses the same high-water marks, payload sizes and pacing: one
//! frame per message, a topic as long as ours (subscribed to, so libzmq
//! filters it by prefix), then the payload, which carries the bench's counter
//! and timestamp. Raw async-nats likewise publishes on a subject as long as
//! ours, from a thread of its own, with the same pacing. Latency runs
//! alternate between the transports, each round starting one transport
//! later than the one before (A B C, B C A, C A B, ...), three rounds, and
//! report each
//! percentile's median, so that a noisy moment of the machine does not land
//! on one transport only.
//!
//! With `--control`, each baseline runs a second time as a row of its own
//! (`…-control`), taking its turns beside the baseline as ours do and
//! compared with it the same way. Its ratios differ from 1.00 only by the
//! host's noise: how far they stray is how far apart two runs of the same
//! code land during this run, the resolution of the other ratios. With
//! `--control-size`, the control sends payloads of that size instead
//! (`…-control-159B`), still beside the baseline: its ratios then say what
//! the baseline itself pays for the other size, paired round by round,
//! which rows of different sizes, run minutes apart, cannot say.
//!
//! Each ratio to the baseline is given twice: the ratio of the medians, and
//! the median of the paired ratios (each round of ours against the
//! baseline's round run next to it). On a shared host whose speed drifts
//! over minutes the second is the steadier: the halves of a pair see the
//! same host.
//!
//! With 6 rounds or more, the paired ratio also comes with an interval that
//! holds the true median of the paired ratios with 95 % confidence
//! ([`median_interval`](super::median_interval); `…_paired_interval` in
//! `--json`), and a verdict on the issues' target (`throughput_target`,
//! `p99_target`): `met` or `missed` when the whole interval lies on one side
//! of it, else `unresolved`: then the host's noise during this run is wider
//! than the distance to the target, and more rounds or a quieter host are
//! what would settle it. A control's verdict shows what the same judgement
//! makes of two runs of identical code.
//!
//! Each row also shows the share of CPU time the hypervisor stole from this
//! VM while its size and process layout ran (`host_steal_pct`; per latency
//! round in `latency_rounds_steal_pct`), and the header the share over the
//! whole run: runs taken on a busy host show it (see [`super::host`]). With
//! `--max-steal PCT`, a latency round during which more than PCT % was
//! stolen is run again, and a throughput trial that failed then does not
//! count as a failure (at most [`MAX_STEAL_REPEATS`] times each), the same
//! rule for every transport.
//!
//! eventplane's subscriber receives, by default (`--receive auto`), over ZMQ
//! on a thread of its own blocked in `recv_blocking`, as the raw libzmq
//! baseline's blocks in `zmq_recv`; over NATS (and in process) with
//! `recv().await` on the bench's current-thread runtime, as raw async-nats's
//! does.
//!
//! Without `--nats-server`, the bench starts a `nats-server` of its own on a
//! free loopback port for the NATS rows (and stops it at the end).

use anyhow::{bail, Context};
use eventplane::{Config, DiscoveryKind, Event, EventPlane, Identity, Scope, TransportKind};
use eventplane_core::envelope::unix_nanos;
use eventplane_discovery::{Discovery, FileDiscovery, MemDiscovery};
use hdrhistogram::Histogram;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{host, median, median_interval, MEDIAN_CONFIDENCE};
use crate::args::{BenchPeerArgs, BenchTransport, ReceiveOn, TransportBenchArgs};
use crate::pace::Pacer;

/// How long the subscriber waits with nothing arriving before it decides the
/// rest of a trial is lost.
const QUIET: Duration = Duration::from_millis(500);

/// Under `--max-steal`, how many times one latency round is run again while
/// the host is busier than that (then the quietest attempt is kept), and how
/// many failed throughput trials of one bisection step may be run again
/// instead of counting: so that a run on a busy host still ends.
const MAX_STEAL_REPEATS: u32 = 3;

/// The raw baseline's topic: as long as an eventplane subject with its NUL,
/// and subscribed to, as a plain libzmq user would. (eventplane's subscriber
/// subscribes to everything and checks the prefix itself: each publisher's
/// socket carries one channel; docs/wire-format.md §5.3.)
const RAW_TOPIC: &[u8] = b"ep.bench.transport.t1\0";

/// What one trial asks for.
#[derive(Debug, Clone, Copy)]
struct Spec {
    size: usize,
    count: u64,
    rate: f64,
}

/// What one trial saw.
#[derive(Debug)]
struct Trial {
    sent: u64,
    send_s: f64,
    received: u64,
    /// Loss reported by sequence tracking (None: the transport cannot tell).
    reported_lost: Option<u64>,
    latency_ns: Histogram<u64>,
}

impl Trial {
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    OneProcess,
    TwoProcess,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn name(t: BenchTransport) -> &'static str {
    match t {
        BenchTransport::Zmq => "eventplane-zmq",
        BenchTransport::Mem => "eventplane-mem",
        BenchTransport::RawZmq => "raw-libzmq",
        BenchTransport::Nats => "eventplane-nats",
        BenchTransport::RawNats => "raw-async-nats",
    }
}

/// The raw baseline a transport's ratios compare with.
fn baseline(t: BenchTransport) -> BenchTransport {
    match t {
        BenchTransport::Nats | BenchTransport::RawNats => BenchTransport::RawNats,
        _ => BenchTransport::RawZmq,
    }
}

/// The requested transports, each baseline added once after the first
/// transport that needs it.
fn with_baselines(requested: &[BenchTransport]) -> Vec<BenchTransport> {
    let mut out = Vec::new();
    for &t in requested {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    for &t in requested {
        let b = baseline(t);
        if !out.contains(&b) {
            let at = out
                .iter()
                .rposition(|&x| baseline(x) == b)
                .map_or(out.len(), |i| i + 1);
            out.insert(at, b);
        }
    }
    out
}

pub async fn run(mut a: TransportBenchArgs) -> anyhow::Result<()> {
    let hwm = Config::from_env()?.hwm;
    a.transports = with_baselines(&a.transports);
    let needs_nats = a
        .transports
        .iter()
        .any(|t| matches!(t, BenchTransport::Nats | BenchTransport::RawNats));
    // Our own server unless one was given; stopped when the bench ends.
    let mut _own_server = None;
    let nats_url = match (&a.nats_server, needs_nats) {
        (Some(url), _) => Some(url.clone()),
        (None, true) => {
            if eventplane_testkit::find_binary("nats-server").is_none() {
                bail!("the NATS rows need `nats-server` (apt-get install nats-server, or scripts/test.sh), or --nats-server URL; to skip them: --transports mem,zmq");
            }
            let server = eventplane_testkit::nats::NatsServer::start();
            let url = server.url();
            _own_server = Some(server);
            Some(url)
        }
        (None, false) => None,
    };
    let mut rows = Vec::new();
    let run_start = host::CpuTimes::now();
    for &size in &a.sizes {
        for mode in [Mode::OneProcess, Mode::TwoProcess] {
            if mode == Mode::TwoProcess && !a.two_process {
                continue;
            }
            let mut rigs: Vec<Rig> = lineup(&a.transports, mode, a.control)
                .into_iter()
                .map(|(t, control)| Rig {
                    transport: t,
                    control,
                    size: a.control_size.filter(|_| control),
                    receive: match (a.receive, t) {
                        // The baselines receive as they always do: raw libzmq
                        // blocks on its thread, raw async-nats awaits.
                        (_, BenchTransport::RawZmq) => ReceiveOn::Thread,
                        (_, BenchTransport::RawNats) => ReceiveOn::Async,
                        (ReceiveOn::Auto, BenchTransport::Zmq) => ReceiveOn::Thread,
                        (ReceiveOn::Auto, _) => ReceiveOn::Async,
                        (r, _) => r,
                    },
                    mode,
                    hwm,
                    seq: 0,
                    nats_url: nats_url.clone().unwrap_or_default(),
                })
                .collect();
            let group_start = host::CpuTimes::now();
            let group = if a.latency_only {
                rigs.iter().map(|rig| row_head(rig, size)).collect()
            } else {
                throughput(&mut rigs, size, &a).await?
            };
            // Latency: rounds alternate between the transports, each starting
            // one transport later than the last (see `turn_order`).
            let mut samples: Vec<Vec<[f64; 3]>> = vec![Vec::new(); rigs.len()];
            let mut lost = vec![0u64; rigs.len()];
            let mut round_steal: Vec<Vec<Option<f64>>> = vec![Vec::new(); rigs.len()];
            let mut repeated = vec![0u32; rigs.len()];
            for round in 0..a.latency_rounds {
                for k in turn_order(rigs.len(), round) {
                    let rig = &mut rigs[k];
                    let spec = Spec {
                        size,
                        count: (a.latency_rate as f64 * a.latency_s) as u64,
                        rate: a.latency_rate as f64,
                    };
                    let (t, steal, repeats) = latency_round(rig, spec, a.max_steal).await?;
                    repeated[k] += repeats;
                    let q =
                        |p: f64| (t.latency_ns.value_at_quantile(p) as f64 / 100.0).round() / 10.0;
                    samples[k].push([q(0.5), q(0.99), q(0.999)]);
                    round_steal[k].push(steal);
                    lost[k] += t.lost();
                }
            }
            let steal = host::steal_pct(group_start, host::CpuTimes::now());
            for (k, mut row) in group.into_iter().enumerate() {
                row["host_steal_pct"] = json!(steal);
                let percentile = |i: usize| median(samples[k].iter().map(|s| s[i]).collect());
                row["latency_rate"] = json!(a.latency_rate);
                row["latency_lost"] = json!(lost[k]);
                row["p50_us"] = json!(percentile(0));
                row["p99_us"] = json!(percentile(1));
                row["p99_9_us"] = json!(percentile(2));
                row["latency_rounds"] = json!(samples[k]);
                row["latency_rounds_steal_pct"] = json!(round_steal[k]);
                row["latency_rounds_repeated"] = json!(repeated[k]);
                eprintln!("{row}");
                rows.push(row);
            }
        }
    }
    // Ratios against the raw baseline with the same size and process layout.
    for i in 0..rows.len() {
        let base = rows.iter().find(|r| {
            r["transport"] == rows[i]["baseline"]
                && r["size"] == rows[i]["size"]
                && r["processes"] == rows[i]["processes"]
        });
        if let Some(base) = base.cloned() {
            let row = rows[i].clone();
            let ratio = |k: &str| match (row[k].as_f64(), base[k].as_f64()) {
                (Some(x), Some(b)) if b > 0.0 => hundredths(x / b),
                _ => serde_json::Value::Null,
            };
            rows[i]["throughput_vs_raw"] = ratio("sustained_msg_s");
            rows[i]["p99_vs_raw"] = ratio("p99_us");
            // The same, round by round: each of ours against the baseline's
            // round run right before or after it, then the median of those.
            let rounds = |r: &serde_json::Value, k: &str, i: Option<usize>| -> Vec<f64> {
                r[k].as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(|x| match i {
                                Some(i) => x[i].as_f64(),
                                None => x.as_f64(),
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let paired = |k: &str, i: Option<usize>| {
                paired_ratios(&rounds(&row, k, i), &rounds(&base, k, i))
            };
            // The baseline's ratios to itself are 1 by definition: no
            // interval or target to judge there.
            let judged = row["transport"] != row["baseline"];
            for (field, ratios, target) in [
                (
                    "throughput",
                    paired("sustained_rounds", None),
                    Target::AtLeast(THROUGHPUT_TARGET),
                ),
                (
                    "p99",
                    paired("latency_rounds", Some(1)),
                    Target::AtMost(P99_TARGET),
                ),
            ] {
                let interval = median_interval(ratios.clone());
                rows[i][format!("{field}_vs_raw_paired")] = if ratios.is_empty() {
                    serde_json::Value::Null
                } else {
                    hundredths(median(ratios))
                };
                let (interval, verdict) = match interval {
                    // Rounded outwards, so that the interval shown never
                    // claims more than the one judged (0.798 shows as 0.79,
                    // not as a 0.80 that would seem to meet 0.8).
                    Some((lo, hi)) if judged => (
                        json!([hundredths_by(lo, f64::floor), hundredths_by(hi, f64::ceil)]),
                        json!(target.verdict((lo, hi))),
                    ),
                    _ => (serde_json::Value::Null, serde_json::Value::Null),
                };
                rows[i][format!("{field}_vs_raw_paired_interval")] = interval;
                rows[i][format!("{field}_target")] = verdict;
            }
        }
    }
    let run_steal = host::steal_pct(run_start, host::CpuTimes::now());
    if a.json {
        for r in &rows {
            println!("{r}");
        }
    } else {
        print_table(&rows, &a, run_steal);
    }
    Ok(())
}

/// The rigs of one process layout, in turn order, as (transport, control):
/// the transports that layout has (the in-process one has no second
/// process), and under `control` each baseline's control right after it, so
/// that it takes its turns next to the baseline as ours do.
fn lineup(transports: &[BenchTransport], mode: Mode, control: bool) -> Vec<(BenchTransport, bool)> {
    transports
        .iter()
        .filter(|&&t| !(mode == Mode::TwoProcess && t == BenchTransport::Mem))
        .flat_map(|&t| {
            let with_control = control && baseline(t) == t;
            std::iter::once((t, false)).chain(with_control.then_some((t, true)))
        })
        .collect()
}

/// Whether a trial with `steal` % stolen counts as taken on a busy host
/// under `--max-steal` (never without it, or where steal is unknown).
fn busier_than(max_steal: Option<f64>, steal: Option<f64>) -> bool {
    matches!((max_steal, steal), (Some(max), Some(s)) if s > max)
}

/// The order in which `n` transports take their turn in round `round`: a
/// rotation, starting with transport `round mod n`. Over `n` rounds each
/// transport takes each place once, so whatever a trial leaves behind for
/// the next one (a server collecting its garbage, connections closing) and
/// whatever drifts within a round fall on every transport alike; and with
/// three or more, none ever runs twice in a row. (Reversing the order every
/// other round, as the bench did before, gave the first and the last
/// transport two turns in a row at every boundary, and the ones between
/// never: with a control, ours and the control were treated alike and the
/// baseline differently.)
fn turn_order(n: usize, round: u32) -> impl Iterator<Item = usize> {
    let start = if n == 0 { 0 } else { round as usize % n };
    (0..n).map(move |i| (start + i) % n)
}

/// One latency round of `rig`: the trial, the host's steal during it, and
/// how many times it was run again because more than `max_steal` % was
/// stolen (at most [`MAX_STEAL_REPEATS`]; the quietest attempt is kept).
async fn latency_round(
    rig: &mut Rig,
    spec: Spec,
    max_steal: Option<f64>,
) -> anyhow::Result<(Trial, Option<f64>, u32)> {
    let mut kept: Option<(Trial, Option<f64>)> = None;
    let mut repeats = 0;
    loop {
        let start = host::CpuTimes::now();
        let t = rig
            .trial(spec)
            .await
            .with_context(|| format!("{} latency", rig.name()))?;
        let steal = host::steal_pct(start, host::CpuTimes::now());
        let quieter = match (&kept, steal) {
            (None, _) => true,
            (Some((_, Some(best))), Some(s)) => s < *best,
            (Some(_), _) => false,
        };
        if quieter {
            kept = Some((t, steal));
        }
        if !busier_than(max_steal, steal) || repeats == MAX_STEAL_REPEATS {
            let (t, steal) = kept.expect("set by the first attempt");
            return Ok((t, steal, repeats));
        }
        repeats += 1;
        tracing::info!(
            transport = rig.name(),
            steal_pct = steal,
            repeats,
            "latency round taken while the host was busy; running it again"
        );
    }
}

/// `ours[k] / base[k]` for the rounds both have, whose median is the
/// "paired" ratio. Rounds of a transport and of its baseline run one right
/// after the other, so a slow minute of the host lands on both halves of a
/// pair; the ratio of medians (the table's other column) compares rounds
/// minutes apart.
fn paired_ratios(ours: &[f64], base: &[f64]) -> Vec<f64> {
    ours.iter()
        .zip(base)
        .filter(|(_, &b)| b > 0.0)
        .map(|(&x, &b)| x / b)
        .collect()
}

/// Issues 2 and 6: sustained throughput at least 0.8× the raw baseline's.
const THROUGHPUT_TARGET: f64 = 0.8;
/// Issues 2 and 6: p99 at 50,000 msg/s at most 1.2× the raw baseline's.
const P99_TARGET: f64 = 1.2;

/// A bound a ratio to the baseline must keep.
#[derive(Debug, Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    /// What an interval of the paired ratio (see [`median_interval`]) says
    /// of the target: `met` or `missed` when all of it lies on one side,
    /// `unresolved` when the host's noise leaves both possible.
    fn verdict(self, (lo, hi): (f64, f64)) -> &'static str {
        let (met, missed) = match self {
            Target::AtLeast(t) => (lo >= t, hi < t),
            Target::AtMost(t) => (hi <= t, lo > t),
        };
        match (met, missed) {
            (true, _) => "met",
            (_, true) => "missed",
            _ => "unresolved",
        }
    }
}

/// A ratio as the table shows it, to two decimals.
fn hundredths(x: f64) -> serde_json::Value {
    json!(hundredths_by(x, f64::round))
}

/// `x` to two decimals, rounded by `round` (`f64::round`, `floor`, `ceil`).
fn hundredths_by(x: f64, round: fn(f64) -> f64) -> f64 {
    round(x * 100.0) / 100.0
}

/// The table on stdout. `run_steal` is the host's steal over the whole run
/// (each row's column: over its size and process layout's trials).
fn print_table(rows: &[serde_json::Value], a: &TransportBenchArgs, run_steal: Option<f64>) {
    println!(
        "transport bench: {} s trials; latency at {} msg/s for {} s; HWM {}; host CPU stolen by the hypervisor during the run: {}",
        a.trial_s,
        a.latency_rate,
        a.latency_s,
        rows.first().map(|r| r["hwm"].clone()).unwrap_or_default(),
        run_steal.map_or("unknown".to_owned(), |s| format!("{s} %")),
    );
    if let Some(max) = a.max_steal {
        let sum = |k: &str| rows.iter().filter_map(|r| r[k].as_u64()).sum::<u64>();
        println!(
            "run again while more than {max} % was stolen: {} latency rounds, {} failed throughput trials",
            sum("latency_rounds_repeated"),
            sum("throughput_trials_repeated"),
        );
    }
    println!(
        "paired: the median of the round-by-round ratios, and in brackets an interval holding the true median with {:.0} % confidence (its width is the host's noise); target: met / missed when all of that interval is on one side of the target (≥ {THROUGHPUT_TARGET}× raw throughput, ≤ {P99_TARGET}× raw p99), else unresolved, - with fewer than 6 rounds",
        MEDIAN_CONFIDENCE * 100.0
    );
    println!(
        "| transport | procs | size B | sustained msg/s | vs raw | paired | target | unpaced offered msg/s | received | lost | reported lost | unreported | p50 µs | p99 µs | p99.9 µs | p99 vs raw | paired | target | steal % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let f = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::Number(n) => n
            .as_f64()
            .map(|x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.2}")
                }
            })
            .unwrap_or_default(),
        other => other.to_string().trim_matches('"').to_owned(),
    };
    // "1.05 [0.91, 1.20]": the paired ratio and its interval, when known.
    let paired = |r: &serde_json::Value, field: &str| {
        let median = f(&r[format!("{field}_vs_raw_paired")]);
        match r[format!("{field}_vs_raw_paired_interval")].as_array() {
            Some(lo_hi) if lo_hi.len() == 2 => {
                format!("{median} [{}, {}]", f(&lo_hi[0]), f(&lo_hi[1]))
            }
            _ => median,
        }
    };
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f(&r["transport"]),
            f(&r["processes"]),
            f(&r["size"]),
            f(&r["sustained_msg_s"]),
            f(&r["throughput_vs_raw"]),
            paired(r, "throughput"),
            f(&r["throughput_target"]),
            f(&r["unpaced"]["offered_msg_s"]),
            f(&r["unpaced"]["received"]),
            f(&r["unpaced"]["lost"]),
            f(&r["unpaced"]["reported_lost"]),
            f(&r["unpaced"]["unreported"]),
            f(&r["p50_us"]),
            f(&r["p99_us"]),
            f(&r["p99_9_us"]),
            f(&r["p99_vs_raw"]),
            paired(r, "p99"),
            f(&r["p99_target"]),
            f(&r["host_steal_pct"]),
        );
    }
}

/// Sustained throughput and the unpaced trial, for every rig of one size
/// and process layout: one row each.
///
/// Each rig's unpaced trial runs once; then `--throughput-rounds`
/// bisections, run in lockstep: every step runs each rig's trial in turn,
/// so that a noisy second of the shared machine lands on the baseline as
/// well as on eventplane, instead of on whichever ran then. The sustained
/// rate reported is the median of the rounds.
async fn throughput(
    rigs: &mut [Rig],
    size: usize,
    a: &TransportBenchArgs,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let what = |rig: &Rig| format!("{} {:?} {size} B", rig.name(), rig.mode);
    let mut rows = Vec::with_capacity(rigs.len());
    // What each rig's publisher offers unpaced: where its bisections start.
    let mut tops = Vec::with_capacity(rigs.len());
    for rig in rigs.iter_mut() {
        let (row, top) = unpaced(rig, size, a).await.with_context(|| what(rig))?;
        rows.push(row);
        tops.push(top);
    }
    let mut sustained: Vec<Vec<f64>> = vec![Vec::new(); rigs.len()];
    // Per rig: trials run again because they failed on a busy host.
    let mut repeated = vec![0u32; rigs.len()];
    // Steps are counted across the bisections, so that the rotation of turns
    // carries on from one to the next.
    let mut step = 0u32;
    for _ in 0..a.throughput_rounds {
        let mut searches: Vec<Bisection> = tops.iter().map(|&t| Bisection::new(t)).collect();
        loop {
            if searches.iter().all(|s| s.next_rate().is_none()) {
                break;
            }
            for k in turn_order(rigs.len(), step) {
                let (rig, search) = (&mut rigs[k], &mut searches[k]);
                let Some(rate) = search.next_rate() else {
                    continue;
                };
                // Two tries, for every transport alike: a single noisy
                // second should not decide the result. A failure while the
                // host was busier than --max-steal does not count as a try
                // (up to MAX_STEAL_REPEATS times a step).
                let spec = Spec {
                    size,
                    count: ((rate * a.trial_s) as u64).max(1_000),
                    rate,
                };
                let (mut failures, mut busy_failures) = (0, 0);
                let passed = loop {
                    let start = host::CpuTimes::now();
                    let t = rig.trial(spec).await.with_context(|| what(rig))?;
                    if t.lost() == 0 && t.sent as f64 / t.send_s.max(1e-9) >= rate * 0.97 {
                        break true;
                    }
                    let steal = host::steal_pct(start, host::CpuTimes::now());
                    if busier_than(a.max_steal, steal) && busy_failures < MAX_STEAL_REPEATS {
                        busy_failures += 1;
                        continue;
                    }
                    failures += 1;
                    if failures == 2 {
                        break false;
                    }
                };
                repeated[k] += busy_failures;
                search.record(rate, passed);
            }
            step = step.wrapping_add(1);
        }
        for (k, search) in searches.iter().enumerate() {
            sustained[k].push(search.lo.round());
        }
    }
    for ((row, rounds), repeated) in rows.iter_mut().zip(sustained).zip(repeated) {
        row["sustained_rounds"] = json!(rounds);
        row["sustained_msg_s"] = json!(median(rounds));
        row["throughput_trials_repeated"] = json!(repeated);
    }
    Ok(rows)
}

/// The unpaced trials of one rig: its publisher's top speed, and what
/// happens past the subscriber's capacity. Returns the row (without the
/// sustained rate) and the rate offered unpaced, where bisection starts; if
/// nothing was lost even then, that rate is the sustained one.
async fn unpaced(
    rig: &mut Rig,
    size: usize,
    a: &TransportBenchArgs,
) -> anyhow::Result<(serde_json::Value, Top)> {
    let probe = rig
        .trial(Spec {
            size,
            count: 200_000,
            rate: 0.0,
        })
        .await?;
    let top = (probe.sent as f64 / probe.send_s.max(1e-9)).max(1_000.0);
    let count = ((top * a.trial_s) as u64).clamp(10_000, 5_000_000);
    let unpaced = rig
        .trial(Spec {
            size,
            count,
            rate: 0.0,
        })
        .await?;
    let offered = unpaced.sent as f64 / unpaced.send_s.max(1e-9);
    let reported = unpaced.reported_lost;
    let mut row = row_head(rig, size);
    row["unpaced"] = json!({
        "offered_msg_s": offered.round(),
        "sent": unpaced.sent,
        "received": unpaced.received,
        "lost": unpaced.lost(),
        "reported_lost": reported,
        "unreported": reported.map(|r| unpaced.lost().saturating_sub(r)),
    });
    Ok((
        row,
        Top {
            offered,
            lossless: unpaced.lost() == 0,
        },
    ))
}

/// A publisher's unpaced rate, and whether its subscriber kept up with it.
#[derive(Clone, Copy)]
struct Top {
    offered: f64,
    lossless: bool,
}

/// A search for the highest offered rate with no loss, between 0 and the
/// unpaced rate, in seven halvings.
struct Bisection {
    /// The highest rate that passed (0: none yet).
    lo: f64,
    /// The lowest rate that failed.
    hi: f64,
    steps_left: u32,
}

impl Bisection {
    fn new(top: Top) -> Self {
        if top.lossless {
            // The subscriber kept up with everything the publisher offers.
            Bisection {
                lo: top.offered,
                hi: top.offered,
                steps_left: 0,
            }
        } else {
            Bisection {
                lo: 0.0,
                hi: top.offered,
                steps_left: 7,
            }
        }
    }

    /// The rate to try next; `None` when the search is over.
    fn next_rate(&self) -> Option<f64> {
        (self.steps_left > 0).then(|| {
            if self.lo == 0.0 {
                self.hi / 2.0
            } else {
                (self.lo + self.hi) / 2.0
            }
        })
    }

    fn record(&mut self, rate: f64, passed: bool) {
        if passed {
            self.lo = rate;
        } else {
            self.hi = rate;
        }
        self.steps_left = self.steps_left.saturating_sub(1);
    }
}

/// The fields that name a row of the table.
fn row_head(rig: &Rig, size: usize) -> serde_json::Value {
    json!({
        "transport": rig.name(),
        // What its ratios compare with: a control's is the baseline it repeats.
        "baseline": name(baseline(rig.transport)),
        "processes": if rig.mode == Mode::OneProcess { 1 } else { 2 },
        "size": size,
        // What its trials send (see `Rig::payload_size`).
        "payload_size": rig.payload_size(size),
        "hwm": rig.hwm,
        "receive": match rig.receive {
            ReceiveOn::Async => "async",
            _ => "thread",
        },
    })
}

struct Rig {
    transport: BenchTransport,
    /// A second run of a baseline, compared with the first like any other
    /// transport (`--control`).
    control: bool,
    /// The payload size of its trials when it is not the row's: a control
    /// under `--control-size`.
    size: Option<usize>,
    receive: ReceiveOn,
    mode: Mode,
    hwm: i32,
    seq: u64,
    nats_url: String,
}

impl Rig {
    /// The row's name: the transport's, with `-control` for a control run
    /// (and its payload size when that is its own: `-control-159B`).
    fn name(&self) -> String {
        let base = name(self.transport);
        match (self.control, self.size) {
            (true, Some(size)) => format!("{base}-control-{size}B"),
            (true, None) => format!("{base}-control"),
            (false, _) => base.to_owned(),
        }
    }

    /// What its trials send in a row of `row_size` bytes: that, but for a
    /// control under `--control-size`.
    fn payload_size(&self, row_size: usize) -> usize {
        self.size.unwrap_or(row_size)
    }

    async fn trial(&mut self, spec: Spec) -> anyhow::Result<Trial> {
        self.seq += 1;
        let spec = Spec {
            size: self.payload_size(spec.size),
            ..spec
        };
        match (self.transport, self.mode) {
            (BenchTransport::RawZmq, mode) => {
                let hwm = self.hwm;
                tokio::task::spawn_blocking(move || raw_trial(spec, mode, hwm)).await?
            }
            (BenchTransport::RawNats, mode) => {
                raw_nats_trial(spec, mode, &self.nats_url, &subject(self.seq)).await
            }
            (t, mode) => self.plane_trial(t, mode, spec).await,
        }
    }

    async fn plane_trial(
        &self,
        t: BenchTransport,
        mode: Mode,
        spec: Spec,
    ) -> anyhow::Result<Trial> {
        let channel = Scope::new("bench", "transport")?.channel(format!("t{}", self.seq))?;
        let config = Config {
            transport: TransportKind::Zmq,
            discovery: DiscoveryKind::Mem,
            hwm: self.hwm,
            ..Config::default()
        };
        let dir = tempfile::tempdir()?;
        let plane = match (t, mode) {
            (BenchTransport::Mem, _) => EventPlane::in_process(),
            (BenchTransport::Nats, _) => {
                EventPlane::connect(nats_config(&self.nats_url), Arc::new(MemDiscovery::new()))
                    .await?
            }
            (_, Mode::OneProcess) => {
                EventPlane::with_discovery(config, Arc::new(MemDiscovery::new()))?
            }
            (_, Mode::TwoProcess) => {
                let d: Arc<dyn Discovery> = Arc::new(FileDiscovery::new(dir.path())?);
                EventPlane::with_discovery(
                    Config {
                        discovery: DiscoveryKind::File,
                        ..config
                    },
                    d,
                )?
            }
        };
        let mut sub = plane.raw_subscriber(&channel).await?;
        let done = Arc::new(AtomicBool::new(false));
        let sender: std::thread::JoinHandle<anyhow::Result<(u64, f64)>> = match mode {
            Mode::OneProcess => {
                // Over NATS the publisher gets a connection of its own, as the
                // raw baseline's does (and as a worker and a router would).
                let publisher_plane = match t {
                    BenchTransport::Nats => Some(
                        EventPlane::connect(
                            nats_config(&self.nats_url),
                            Arc::new(MemDiscovery::new()),
                        )
                        .await?,
                    ),
                    _ => None,
                };
                let publisher = publisher_plane
                    .as_ref()
                    .unwrap_or(&plane)
                    .publisher(&channel, Identity::new(self.seq))
                    .await?;
                // Connected once the welcome heartbeat arrives: no sleep.
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
                        Ok(Some(Event::Notice(eventplane::Notice::Joined { .. }))) => break,
                        Ok(Some(_)) => {}
                        _ => bail!("publisher never joined"),
                    }
                }
                let done = done.clone();
                std::thread::spawn(move || {
                    let _connection = publisher_plane;
                    let r = send_plane(&publisher, spec);
                    done.store(true, Ordering::Release);
                    // Stay alive (and heartbeating) until the subscriber has
                    // accounted for everything, as a real publisher would.
                    while done.load(Ordering::Acquire) {
                        std::thread::park();
                    }
                    r
                })
            }
            Mode::TwoProcess => {
                let (kind, target) = match t {
                    BenchTransport::Nats => ("nats", std::ffi::OsString::from(&self.nats_url)),
                    _ => ("zmq", dir.path().as_os_str().to_owned()),
                };
                let mut child = peer_command(kind, &target, spec, self.hwm)?
                    .args(["--topic", channel.topic()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                let out = child.stdout.take().expect("piped");
                let release = child.stdin.take().expect("piped");
                let done = done.clone();
                std::thread::spawn(move || {
                    let r = read_peer(BufReader::new(out).lines());
                    done.store(true, Ordering::Release);
                    // The peer stays alive (heartbeating) until its stdin
                    // closes, after the subscriber has accounted for everything.
                    while done.load(Ordering::Acquire) {
                        std::thread::park();
                    }
                    drop(release);
                    let _ = child.wait();
                    r
                })
            }
        };

        let heartbeat_wait = plane.config().heartbeat_interval * 2 + QUIET;
        let count = spec.count;
        // Whether the subscriber has accounted for every message sent.
        let complete = move |done: &AtomicBool,
                             receipts: &Receipts,
                             sub: &eventplane::RawSubscriber| {
            done.load(Ordering::Acquire) && receipts.received + sub.stats().sequence.lost >= count
        };
        let (sub, receipts) = match self.receive {
            ReceiveOn::Thread | ReceiveOn::Auto => {
                let done = done.clone();
                tokio::task::spawn_blocking(move || {
                    let mut receipts = Receipts::new();
                    loop {
                        match sub.recv_blocking(Duration::from_millis(50)) {
                            Ok(Some(Event::Message(m))) => {
                                receipts.record_timestamp(m.meta.timestamp_ns)
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            // The publisher's idle heartbeat reveals any tail
                            // loss within its interval; wait for it before
                            // calling the rest lost.
                            Err(_) if receipts.quiet_after(&done, heartbeat_wait) => break,
                            Err(_) => {}
                        }
                        if complete(&done, &receipts, &sub) {
                            break;
                        }
                    }
                    (sub, receipts)
                })
                .await?
            }
            ReceiveOn::Async => {
                let mut receipts = Receipts::new();
                // One timer for the whole trial: a timeout per receive would
                // put a timer registration on every message's path.
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        biased;
                        ev = sub.recv() => match ev {
                            Some(Event::Message(m)) => receipts.record_timestamp(m.meta.timestamp_ns),
                            Some(_) => {}
                            None => break,
                        },
                        _ = tick.tick() => {
                            if receipts.quiet_after(&done, heartbeat_wait) {
                                break;
                            }
                        }
                    }
                    if complete(&done, &receipts, &sub) {
                        break;
                    }
                }
                (sub, receipts)
            }
        };
        done.store(false, Ordering::Release);
        sender.thread().unpark();
        let lost = sub.stats().sequence.lost;
        tracing::debug!(?spec, received = receipts.received, stats = ?sub.stats(), "trial");
        let mut trial = receipts.finish(sender)?;
        trial.reported_lost = Some(lost);
        Ok(trial)
    }
}

/// Publishes `spec.count` payloads of `spec.size` at `spec.rate`; returns
/// (sent, seconds).
fn send_plane(publisher: &eventplane::Publisher, spec: Spec) -> anyhow::Result<(u64, f64)> {
    let payload = vec![0xabu8; spec.size];
    let pacer = Pacer::new(spec.rate);
    let start = Instant::now();
    for k in 0..spec.count {
        pacer.wait_for(k);
        publisher.publish_bytes(&payload)?;
    }
    let send_s = start.elapsed().as_secs_f64();
    publisher.heartbeat()?;
    Ok((spec.count, send_s))
}

/// The command that runs the remote half of a two-process trial.
fn peer_command(
    transport: &str,
    target: &std::ffi::OsStr,
    spec: Spec,
    hwm: i32,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["bench-peer", "--transport", transport, "--target"])
        .arg(target)
        .args([
            "--size",
            &spec.size.to_string(),
            "--count",
            &spec.count.to_string(),
            "--rate",
            &spec.rate.to_string(),
        ])
        .env("DYN_EVENT_PLANE_HWM", hwm.to_string())
        .env("EVENTPLANE_LOG", "warn");
    Ok(cmd)
}

/// A thread that reads a raw bench peer's report, reaps it, then sets
/// `done`; it yields the peer's (sent, seconds).
fn wait_for_peer(
    mut child: std::process::Child,
    lines: impl Iterator<Item = std::io::Result<String>> + Send + 'static,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<(u64, f64)>> {
    std::thread::spawn(move || {
        let r = read_peer(lines);
        let _ = child.wait();
        done.store(true, Ordering::Release);
        r
    })
}

/// Reads a bench peer's stdout until its `done` line: (sent, seconds).
fn read_peer(lines: impl Iterator<Item = std::io::Result<String>>) -> anyhow::Result<(u64, f64)> {
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if v["type"] == "done" {
            return Ok((
                v["sent"].as_u64().unwrap_or(0),
                v["send_s"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    bail!("bench peer exited without reporting")
}

/// Raw libzmq: an XPUB (to know when the subscriber has joined) and a SUB,
/// one frame per message.
fn raw_trial(spec: Spec, mode: Mode, hwm: i32) -> anyhow::Result<Trial> {
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_rcvhwm(hwm)?;
    sub.set_subscribe(RAW_TOPIC)?;
    sub.set_rcvtimeo(50)?;
    let done = Arc::new(AtomicBool::new(false));
    let sender: std::thread::JoinHandle<anyhow::Result<(u64, f64)>> = match mode {
        Mode::OneProcess => {
            let publ = ctx.socket(zmq::XPUB)?;
            publ.set_sndhwm(hwm)?;
            publ.bind("tcp://127.0.0.1:*")?;
            let endpoint = publ
                .get_last_endpoint()?
                .map_err(|_| anyhow::anyhow!("endpoint"))?;
            sub.connect(&endpoint)?;
            publ.recv_bytes(0)?; // the subscription: connected
            let done = done.clone();
            std::thread::spawn(move || {
                let r = send_raw(&publ, spec);
                done.store(true, Ordering::Release);
                r
            })
        }
        Mode::TwoProcess => {
            let mut child = peer_command("raw-zmq", "tcp://127.0.0.1:*".as_ref(), spec, hwm)?
                .stdout(Stdio::piped())
                .spawn()?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            let first: serde_json::Value =
                serde_json::from_str(&lines.next().context("peer printed nothing")??)?;
            sub.connect(first["endpoint"].as_str().context("no endpoint")?)?;
            wait_for_peer(child, lines, done.clone())
        }
    };
    let mut receipts = Receipts::new();
    let mut msg = zmq::Message::new();
    loop {
        if receipts.received >= spec.count && done.load(Ordering::Acquire) {
            break;
        }
        match sub.recv(&mut msg, 0) {
            Ok(()) => receipts.record(&msg[RAW_TOPIC.len().min(msg.len())..]),
            Err(zmq::Error::EAGAIN) => {
                if receipts.quiet_after(&done, QUIET) {
                    break;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    receipts.finish(sender)
}

/// What a trial's subscriber counted: messages, and the latency from the
/// timestamp each carries (in the envelope, or after a raw payload's counter).
struct Receipts {
    received: u64,
    latency_ns: Histogram<u64>,
    last_progress: Instant,
}

impl Receipts {
    fn new() -> Self {
        Self {
            received: 0,
            latency_ns: hist(),
            last_progress: Instant::now(),
        }
    }

    /// One raw payload (counter, then timestamp, then padding).
    fn record(&mut self, payload: &[u8]) {
        match payload.get(8..16) {
            Some(ts) => self.record_timestamp(u64::from_le_bytes(ts.try_into().expect("8 bytes"))),
            None => {
                self.received += 1;
                self.last_progress = Instant::now();
            }
        }
    }

    /// One message published at `timestamp_ns` (Unix epoch).
    fn record_timestamp(&mut self, timestamp_ns: u64) {
        self.received += 1;
        let _ = self
            .latency_ns
            .record(unix_nanos().saturating_sub(timestamp_ns).max(1));
        self.last_progress = Instant::now();
    }

    /// The sender is done and nothing has arrived for `quiet`: the rest is lost.
    fn quiet_after(&self, done: &AtomicBool, quiet: Duration) -> bool {
        done.load(Ordering::Acquire) && self.last_progress.elapsed() > quiet
    }

    /// The trial, once the sender's thread reports.
    fn finish(
        self,
        sender: std::thread::JoinHandle<anyhow::Result<(u64, f64)>>,
    ) -> anyhow::Result<Trial> {
        let (sent, send_s) = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(Trial {
            sent,
            send_s,
            received: self.received,
            reported_lost: None,
            latency_ns: self.latency_ns,
        })
    }
}

fn send_raw(publ: &zmq::Socket, spec: Spec) -> anyhow::Result<(u64, f64)> {
    let t = RAW_TOPIC.len();
    // Topic, then a payload of `size` bytes (at least 16) that starts with the
    // bench counter and timestamp, written before each send.
    let mut frame = [RAW_TOPIC, &vec![0u8; spec.size.max(16)]].concat();
    let pacer = Pacer::new(spec.rate);
    let start = Instant::now();
    for k in 0..spec.count {
        pacer.wait_for(k);
        frame[t..t + 8].copy_from_slice(&k.to_le_bytes());
        frame[t + 8..t + 16].copy_from_slice(&unix_nanos().to_le_bytes());
        publ.send(&frame[..], zmq::DONTWAIT)?;
    }
    Ok((spec.count, start.elapsed().as_secs_f64()))
}

/// The remote publisher of a two-process trial.
pub async fn peer(a: BenchPeerArgs) -> anyhow::Result<()> {
    let spec = Spec {
        size: a.size,
        count: a.count,
        rate: a.rate,
    };
    let hwm = Config::from_env()?.hwm;
    let (sent, send_s) = match a.transport {
        BenchTransport::RawZmq => {
            let ctx = zmq::Context::new();
            let publ = ctx.socket(zmq::XPUB)?;
            publ.set_sndhwm(hwm)?;
            publ.set_linger(5_000)?;
            publ.bind(&a.target)?;
            let endpoint = publ
                .get_last_endpoint()?
                .map_err(|_| anyhow::anyhow!("endpoint"))?;
            println!("{}", json!({"type": "ready", "endpoint": endpoint}));
            publ.recv_bytes(0)?;
            send_raw(&publ, spec)?
        }
        BenchTransport::RawNats => {
            let client = async_nats::connect(&a.target).await?;
            let subject = format!("ep.bench.transport.{}", a.topic);
            let r = tokio::task::spawn_blocking(move || send_raw_nats(&client, &subject, spec))
                .await??;
            r
        }
        BenchTransport::Zmq | BenchTransport::Nats => {
            let plane = if a.transport == BenchTransport::Nats {
                EventPlane::connect(nats_config(&a.target), Arc::new(MemDiscovery::new())).await?
            } else {
                let d: Arc<dyn Discovery> = Arc::new(FileDiscovery::new(&a.target)?);
                let config = Config {
                    transport: TransportKind::Zmq,
                    discovery: DiscoveryKind::File,
                    hwm,
                    ..Config::default()
                };
                EventPlane::with_discovery(config, d)?
            };
            let channel = Scope::new("bench", "transport")?.channel(&a.topic)?;
            let publisher = plane.publisher(&channel, Identity::new(1)).await?;
            if !tokio::time::timeout(Duration::from_secs(10), publisher.wait_for_subscriptions(1))
                .await
                .unwrap_or(false)
            {
                bail!("no subscriber joined");
            }
            let (sent, publisher) =
                tokio::task::spawn_blocking(move || (send_plane(&publisher, spec), publisher))
                    .await?;
            let sent = sent?;
            println!(
                "{}",
                json!({"type": "done", "sent": sent.0, "send_s": sent.1})
            );
            // Keep publishing heartbeats until the parent closes our stdin.
            tokio::task::spawn_blocking(|| {
                std::io::copy(&mut std::io::stdin(), &mut std::io::sink())
            })
            .await??;
            drop(publisher);
            return Ok(());
        }
        BenchTransport::Mem => bail!("the in-process transport has no second process"),
    };
    println!(
        "{}",
        json!({"type": "done", "sent": sent, "send_s": send_s})
    );
    Ok(())
}

/// The subject of trial `seq`, as the plane's channel `bench.transport.t<seq>`.
fn subject(seq: u64) -> String {
    format!("ep.bench.transport.t{seq}")
}

/// An event plane over NATS at `url`, with the bench's discovery (none needed).
fn nats_config(url: &str) -> Config {
    let mut c = Config {
        transport: TransportKind::Nats,
        discovery: DiscoveryKind::Mem,
        ..Config::default()
    };
    c.nats.servers = vec![url.to_owned()];
    c
}

/// Raw async-nats: one client subscribes (confirmed by a flush), another
/// publishes from a thread of its own, paced like the others.
async fn raw_nats_trial(spec: Spec, mode: Mode, url: &str, subject: &str) -> anyhow::Result<Trial> {
    let sub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe(subject.to_owned()).await?;
    sub_client.flush().await?;
    let done = Arc::new(AtomicBool::new(false));
    let sender: std::thread::JoinHandle<anyhow::Result<(u64, f64)>> = match mode {
        Mode::OneProcess => {
            let client = async_nats::connect(url).await?;
            let (done, subject) = (done.clone(), subject.to_owned());
            std::thread::spawn(move || {
                let r = send_raw_nats(&client, &subject, spec);
                done.store(true, Ordering::Release);
                r
            })
        }
        Mode::TwoProcess => {
            let topic = subject.rsplit('.').next().unwrap_or("t");
            let mut child = peer_command("raw-nats", url.as_ref(), spec, 1)?
                .args(["--topic", topic])
                .stdout(Stdio::piped())
                .spawn()?;
            let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            wait_for_peer(child, lines, done.clone())
        }
    };
    let mut receipts = Receipts::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if receipts.received >= spec.count && done.load(Ordering::Acquire) {
            break;
        }
        tokio::select! {
            biased;
            msg = futures::StreamExt::next(&mut sub) => match msg {
                Some(m) => receipts.record(&m.payload),
                None => break,
            },
            _ = tick.tick() => {
                if receipts.quiet_after(&done, QUIET) {
                    break;
                }
            }
        }
    }
    receipts.finish(sender)
}

/// Publishes raw payloads (counter and timestamp first) with async-nats,
/// from the calling thread, waiting only when the client's queue is full.
fn send_raw_nats(
    client: &async_nats::Client,
    subject: &str,
    spec: Spec,
) -> anyhow::Result<(u64, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let subject = async_nats::Subject::from(subject);
    let mut payload = vec![0u8; spec.size.max(16)];
    let pacer = Pacer::new(spec.rate);
    rt.block_on(async {
        let start = Instant::now();
        for k in 0..spec.count {
            pacer.wait_for(k);
            payload[..8].copy_from_slice(&k.to_le_bytes());
            payload[8..16].copy_from_slice(&unix_nanos().to_le_bytes());
            client
                .publish(subject.clone(), bytes::Bytes::copy_from_slice(&payload))
                .await?;
        }
        let send_s = start.elapsed().as_secs_f64();
        client.flush().await?;
        Ok((spec.count, send_s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_follow_their_baselines() {
        use BenchTransport::*;
        let transports = with_baselines(&[Mem, Zmq, Nats]);
        assert_eq!(
            lineup(&transports, Mode::OneProcess, true),
            [
                (Mem, false),
                (Zmq, false),
                (RawZmq, false),
                (RawZmq, true),
                (Nats, false),
                (RawNats, false),
                (RawNats, true),
            ]
        );
        // No in-process rows across two processes; no controls unless asked.
        assert_eq!(
            lineup(&transports, Mode::TwoProcess, false),
            [
                (Zmq, false),
                (RawZmq, false),
                (Nats, false),
                (RawNats, false)
            ]
        );
    }

    #[test]
    fn a_control_at_a_size_of_its_own_says_so_and_keeps_its_row() {
        let rig = |control, size| Rig {
            transport: BenchTransport::RawNats,
            control,
            size,
            receive: ReceiveOn::Async,
            mode: Mode::TwoProcess,
            hwm: 1,
            seq: 0,
            nats_url: String::new(),
        };
        let head = row_head(&rig(true, Some(159)), 100);
        assert_eq!(head["transport"], "raw-async-nats-control-159B");
        assert_eq!(head["payload_size"], 159);
        // Grouped with the row's size, so compared with that baseline.
        assert_eq!(head["size"], 100);
        assert_eq!(head["baseline"], "raw-async-nats");
        let head = row_head(&rig(true, None), 100);
        assert_eq!(head["transport"], "raw-async-nats-control");
        assert_eq!(head["payload_size"], 100);
        assert_eq!(row_head(&rig(false, None), 4096)["payload_size"], 4096);
    }

    #[test]
    fn a_target_is_judged_only_when_the_whole_interval_agrees() {
        let p99 = Target::AtMost(P99_TARGET);
        assert_eq!(p99.verdict((0.9, 1.2)), "met");
        assert_eq!(p99.verdict((1.15, 1.3)), "unresolved");
        assert_eq!(p99.verdict((1.21, 1.5)), "missed");
        let throughput = Target::AtLeast(THROUGHPUT_TARGET);
        assert_eq!(throughput.verdict((0.8, 1.1)), "met");
        assert_eq!(throughput.verdict((0.7, 0.85)), "unresolved");
        assert_eq!(throughput.verdict((0.6, 0.79)), "missed");
    }

    #[test]
    fn paired_ratios_skip_rounds_the_baseline_lacks() {
        assert_eq!(
            paired_ratios(&[2.0, 3.0, 4.0], &[1.0, 0.0]),
            [2.0],
            "a zero baseline round has no ratio; a missing one no pair"
        );
    }

    #[test]
    fn turns_rotate_so_every_transport_takes_every_place() {
        let turns: Vec<usize> = (0..6).flat_map(|r| turn_order(3, r)).collect();
        assert_eq!(
            turns,
            [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2, 1, 2, 0, 2, 0, 1]
        );
        // Every transport is first, second and third once in three rounds.
        for place in 0..3 {
            let mut at: Vec<usize> = turns.chunks(3).take(3).map(|round| round[place]).collect();
            at.sort();
            assert_eq!(at, [0, 1, 2], "place {place}");
        }
        // With three or more, none runs twice in a row, across rounds too.
        for n in 3..6 {
            let turns: Vec<usize> = (0..12).flat_map(|r| turn_order(n, r)).collect();
            assert!(turns.windows(2).all(|w| w[0] != w[1]), "{n}: {turns:?}");
        }
        // Two transports alternate which goes first, as before.
        let firsts: Vec<usize> = (0..4).filter_map(|r| turn_order(2, r).next()).collect();
        assert_eq!(firsts, [0, 1, 0, 1]);
        assert_eq!(turn_order(0, 5).count(), 0);
    }
}
