//! `eventplane bench relay`: how many engine block events per second the
//! relay decodes, re-hashes and republishes, end to end on this machine.
//!
//! An engine thread sends pre-encoded vLLM-format batches (array encoding,
//! 8-byte hashes above 2^63, each batch one `BlockStored` of
//! `--blocks-per-event` blocks with their token ids, chained on the
//! previous batch, and one `BlockRemoved` of the previous batch's blocks but
//! its last) on a ZMQ
//! PUB socket as fast as it can. `eventplane worker --engine vllm`'s relay
//! (in this process, its own thread) republishes them over the ZMQ
//! transport, and a subscriber counts the blocks it receives. The clock runs
//! from the first send to the last block received. Everything shares the
//! machine's cores, as a relay beside its engine would.

use std::time::{Duration, Instant};

use anyhow::Context;
use eventplane::{Config, DiscoveryKind, Event, EventPlane, Notice, Scope, TransportKind};
use eventplane_kv::event::{KvEventBatch, KV_EVENTS_TOPIC};
use eventplane_kv::KvEvent;
use eventplane_worker::relay::{self, RankEndpoints, RelaySettings};
use rmpv::Value;
use serde_json::json;

use crate::args::RelayBenchArgs;

pub async fn run(a: RelayBenchArgs) -> anyhow::Result<()> {
    let payloads = engine_batches(&a);
    // Every batch stores n blocks; every batch but the first removes the
    // previous batch's blocks except its last (the parent of the new ones).
    let n = a.blocks_per_event;
    let block_events = a.batches * n + (a.batches - 1) * (n - 1);
    let mut rates = Vec::new();
    for run in 0..a.runs {
        let (elapsed, stats) = once(&a, &payloads, block_events).await?;
        let rate = block_events as f64 / elapsed.as_secs_f64();
        tracing::info!(
            run = run + 1,
            block_events_per_s = format!("{rate:.0}"),
            "relayed"
        );
        rates.push((rate, stats));
    }
    rates.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (rate, stats) = &rates[rates.len() / 2];
    println!(
        "{}",
        json!({
            "batches": a.batches,
            "blocks_per_event": a.blocks_per_event,
            "block_size": a.block_size,
            "block_events": block_events,
            "runs": a.runs,
            "block_events_per_s": rate.round(),
            "batches_per_s": (rate / block_events as f64 * a.batches as f64).round(),
            "lost": stats.lost,
            "decode_errors": stats.decode_errors,
            "unhashable_blocks": stats.unhashable_blocks,
        })
    );
    Ok(())
}

/// The engine's payloads: batch `i` stores blocks `i*n .. (i+1)*n` (after
/// block `i*n - 1`) and removes the blocks batch `i - 1` stored, all but
/// that last one.
fn engine_batches(a: &RelayBenchArgs) -> Vec<Vec<u8>> {
    let n = a.blocks_per_event;
    let hash = |b: u64| Value::from((1u64 << 63) + b);
    (0..a.batches)
        .map(|i| {
            let first = i * n;
            let tokens: Vec<Value> = (0..n * a.block_size)
                .map(|t| Value::from(((first * a.block_size + t) % 150_000) as u32))
                .collect();
            let stored = Value::Array(vec![
                Value::from("BlockStored"),
                Value::Array((first..first + n).map(hash).collect()),
                if i == 0 { Value::Nil } else { hash(first - 1) },
                Value::Array(tokens),
                Value::from(a.block_size),
                Value::Nil,
                Value::Nil,
            ]);
            let mut events = vec![stored];
            if i > 0 {
                events.push(Value::Array(vec![
                    Value::from("BlockRemoved"),
                    Value::Array((first - n..first - 1).map(hash).collect()),
                    Value::Nil,
                ]));
            }
            let batch = Value::Array(vec![Value::F64(0.0), Value::Array(events), Value::from(0)]);
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &batch).expect("encoding to memory");
            out
        })
        .collect()
}

async fn once(
    a: &RelayBenchArgs,
    payloads: &[Vec<u8>],
    block_events: u64,
) -> anyhow::Result<(Duration, eventplane_worker::relay::RelayStats)> {
    let ctx = zmq::Context::new();
    let engine = ctx.socket(zmq::XPUB)?;
    engine.set_sndhwm(0)?;
    engine.bind("tcp://127.0.0.1:*")?;
    let endpoint = engine
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))?;

    let plane = EventPlane::start(Config {
        transport: TransportKind::Zmq,
        discovery: DiscoveryKind::Mem,
        ..Config::default()
    })
    .await?;
    let scope = Scope::new("bench", "relay")?;
    let mut sub = plane
        .subscriber::<KvEventBatch>(&scope.channel(KV_EVENTS_TOPIC)?)
        .await?;
    let running = relay::start(
        &plane,
        RelaySettings {
            worker_id: 1,
            scope,
            ranks: vec![RankEndpoints {
                events: endpoint,
                replay: None,
            }],
            topic: String::new(),
            engine_url: "http://127.0.0.1:8000".into(),
            model: "bench".into(),
            block_size: a.block_size as u32,
            max_tracked: 1 << 22,
            replay_timeout: Duration::from_secs(1),
            load_interval: None,
            num_gpu_blocks: 0,
        },
    )
    .await?;
    // The relay's SUB subscribed, and we hear the relay's publisher.
    engine
        .recv_bytes(0)
        .context("waiting for the relay to subscribe")?;
    tokio::time::timeout(Duration::from_secs(30), async {
        while !matches!(
            sub.recv().await,
            Some(Event::Notice(Notice::Joined { .. })) | None
        ) {}
    })
    .await
    .context("waiting to hear the relay")?;

    let started = Instant::now();
    let to_send: Vec<Vec<u8>> = payloads.to_vec();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        for (seq, p) in to_send.iter().enumerate() {
            engine.send_multipart([&b""[..], &(seq as u64).to_be_bytes()[..], &p[..]], 0)?;
        }
        Ok(())
    });
    let mut received = 0u64;
    let deadline = started + Duration::from_secs(120);
    while received < block_events {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.recv()).await {
            Ok(Some(Event::Message(m))) => {
                for e in &m.value.events {
                    received += match e {
                        KvEvent::Stored { blocks, .. } => blocks.len() as u64,
                        KvEvent::Removed { blocks } => blocks.len() as u64,
                        KvEvent::Cleared => 0,
                    };
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                anyhow::bail!(
                    "only {received} of {block_events} block events arrived; relay stats: {:?}",
                    running.stats()
                )
            }
        }
    }
    let elapsed = started.elapsed();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))??;
    let stats = running.stats()[0];
    running.stop();
    Ok((elapsed, stats))
}
