//! `eventplane tail`: live messages of a channel as JSON lines on stdout.
//!
//! Line types (field `type`): `message`, `notice` (from sequence tracking:
//! joined, gap, late, duplicate, restarted, stale, silent, ...),
//! `publisher_added` / `publisher_removed` (discovery), and, on exit (after
//! `--count` messages, Ctrl-C or SIGTERM), one `summary` with per-publisher
//! counts and the subscriber's stats.

use anyhow::Context;
use eventplane::{EventPlane, RawMessage};
use eventplane_core::Event;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

use crate::args::TailArgs;

#[derive(Default, serde::Serialize)]
struct PublisherSummary {
    incarnation: u64,
    messages: u64,
    first_seq: u64,
    last_seq: u64,
}

pub async fn run(a: TailArgs) -> anyhow::Result<()> {
    let config = a.plane.config()?;
    let channel = a.channel.channel()?;
    let plane = EventPlane::start(config).await?;
    let mut sub = plane
        .raw_subscriber(&channel)
        .await
        .with_context(|| format!("subscribing to {channel}"))?;
    tracing::info!(channel = %channel, transport = %plane.config().transport, discovery = plane.discovery().name(), "tailing");

    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut publishers: BTreeMap<u64, PublisherSummary> = BTreeMap::new();
    let mut messages = 0u64;
    let mut term = signal(SignalKind::terminate())?;
    let mut silence = tokio::time::interval(Duration::from_millis((a.silence_ms / 4).max(10)));
    let silence_ns = a.silence_ms.saturating_mul(1_000_000);
    let limit = a.count.unwrap_or(u64::MAX);

    'outer: while messages < limit {
        let first = tokio::select! {
            ev = sub.recv() => match ev { Some(ev) => ev, None => break },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = silence.tick() => { sub.check_silence(silence_ns); continue }
        };
        // Print everything already waiting before flushing once.
        let mut ev = Some(first);
        while let Some(e) = ev.take() {
            if let Event::Message(m) = &e {
                messages += 1;
                let p = publishers.entry(m.meta.publisher_id).or_default();
                if p.incarnation != m.meta.incarnation {
                    *p = PublisherSummary {
                        incarnation: m.meta.incarnation,
                        first_seq: m.meta.seq,
                        ..Default::default()
                    };
                }
                p.messages += 1;
                p.last_seq = m.meta.seq;
            }
            print_event(&mut out, &e, &a)?;
            if messages >= limit {
                break 'outer;
            }
            ev = sub.try_recv();
        }
        out.flush()?;
    }
    let summary = json!({"type": "summary", "messages": messages, "publishers": publishers, "stats": sub.stats()});
    writeln!(out, "{summary}")?;
    out.flush()?;
    Ok(())
}

fn print_event(out: &mut impl Write, ev: &Event<RawMessage>, a: &TailArgs) -> std::io::Result<()> {
    let line = match ev {
        Event::Message(_) if a.quiet => return Ok(()),
        Event::Message(m) => {
            let mut line = json!({
                "type": "message",
                "publisher_id": m.meta.publisher_id,
                "incarnation": m.meta.incarnation,
                "seq": m.meta.seq,
                "timestamp_ns": m.meta.timestamp_ns,
            });
            if m.meta.late {
                line["late"] = true.into();
            }
            if !a.no_values {
                match rmp_serde_to_json(&m.payload) {
                    Some(v) => line["value"] = v,
                    None => {
                        line["payload_hex"] = m
                            .payload
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                            .into()
                    }
                }
            }
            line
        }
        Event::Notice(n) => {
            let mut line = serde_json::to_value(n).unwrap_or_default();
            line["type"] = "notice".into();
            line
        }
        Event::Discovery(c) => serde_json::to_value(c).unwrap_or_default(),
    };
    writeln!(out, "{line}")
}

/// The payload as JSON if it is MessagePack that maps onto JSON.
fn rmp_serde_to_json(payload: &[u8]) -> Option<serde_json::Value> {
    let mut rd = payload;
    let v: serde_json::Value =
        serde::Deserialize::deserialize(&mut rmp_serde::Deserializer::new(&mut rd)).ok()?;
    rd.is_empty().then_some(v)
}
