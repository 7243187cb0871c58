//! Hot paths of the core: encoding and decoding an envelope, sequence
//! tracking, a subscriber's whole receive path over a transport that has
//! envelopes ready, and a publisher's over one that takes frames at once.
//! `cargo bench -p eventplane-core`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventplane_core::envelope::{decode, encode, Header, Kind};
use eventplane_core::queue::{Deadline, FrameSource, SourceCounters, SourceItem, TimedOut};
use eventplane_core::{
    Channel, Event, FrameSink, Identity, Publisher, RawSubscriber, Scope, SendError,
    SequenceTracker,
};
use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::Duration;

fn header(seq: u64) -> Header {
    Header {
        kind: Kind::Data,
        publisher_id: 0x1234_5678_9abc_def0,
        incarnation: 1_795_505_015_529_199_385,
        seq,
        timestamp_ns: 1_795_505_015_533_862_946,
    }
}

/// The channel the benches publish on: a worker's KV events.
fn kv_events() -> Channel {
    Scope::new("dynamo", "backend")
        .unwrap()
        .channel("kv-events")
        .unwrap()
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for size in [100usize, 4096] {
        let payload = vec![0xab; size];
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, p| {
            let mut buf = Vec::with_capacity(size + 128);
            let mut seq = 0;
            b.iter(|| {
                seq += 1;
                buf.clear();
                encode(&header(seq), p, &mut buf);
                black_box(buf.len())
            })
        });
        let mut frame = Vec::new();
        encode(&header(1), &payload, &mut frame);
        group.bench_with_input(BenchmarkId::new("decode", size), &frame, |b, f| {
            b.iter(|| black_box(decode(black_box(f)).unwrap().payload.len()))
        });
    }
    group.finish();
}

fn tracking(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequence");
    for publishers in [1u64, 16, 1024] {
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("observe_in_order", publishers),
            &publishers,
            |b, &n| {
                let mut t = SequenceTracker::default();
                let mut out = Vec::new();
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    let h = Header {
                        publisher_id: i % n,
                        seq: i / n + 1,
                        ..header(0)
                    };
                    out.clear();
                    black_box(t.observe(&h, i, &mut out))
                })
            },
        );
    }
    group.finish();
}

/// A transport with envelopes ready, handed over one per blocking wait, as
/// the ZMQ transport does while messages stream in.
struct Ready {
    frames: VecDeque<bytes::Bytes>,
    counters: SourceCounters,
}

impl FrameSource for Ready {
    fn poll_next(&mut self, _: &mut Context<'_>) -> Poll<Option<SourceItem>> {
        Poll::Ready(self.try_next())
    }
    fn try_next(&mut self) -> Option<SourceItem> {
        self.frames.pop_front().map(SourceItem::Frame)
    }
    fn counters(&self) -> &SourceCounters {
        &self.counters
    }
    fn wait_next(&mut self, _: &mut Deadline) -> Result<Option<SourceItem>, TimedOut> {
        Ok(self.try_next())
    }
}

/// `RawSubscriber::recv_blocking` per message: what eventplane adds on the
/// receiving thread to what the socket costs (decoding, sequence tracking,
/// the event), for envelopes cut from a shared buffer as the ZMQ transport
/// cuts small ones.
fn receiving(c: &mut Criterion) {
    const N: u64 = 1_000;
    let channel = kv_events();
    let mut group = c.benchmark_group("subscriber");
    for size in [100usize, 4096] {
        let payload = vec![0xab; size];
        let mut arena = bytes::BytesMut::new();
        let mut frame = Vec::new();
        let frames: VecDeque<bytes::Bytes> = (1..=N)
            .map(|seq| {
                frame.clear();
                encode(&header(seq), &payload, &mut frame);
                arena.extend_from_slice(&frame);
                arena.split().freeze()
            })
            .collect();
        group.throughput(Throughput::Elements(N));
        group.bench_function(BenchmarkId::new("recv_blocking", size), |b| {
            b.iter_batched(
                || {
                    let source = Ready {
                        frames: frames.clone(),
                        counters: SourceCounters::default(),
                    };
                    RawSubscriber::new(channel.clone(), Box::new(source), Box::new(()))
                },
                |mut sub| {
                    let mut bytes = 0;
                    for _ in 0..N {
                        if let Ok(Some(Event::Message(m))) =
                            sub.recv_blocking(Duration::from_secs(1))
                        {
                            bytes += m.payload.len();
                        }
                    }
                    black_box(bytes);
                    sub
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// A transport that takes every frame at once and only counts its bytes.
struct Counting(std::sync::atomic::AtomicUsize);

impl FrameSink for Counting {
    fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
        self.0.fetch_add(
            black_box(head).len() + black_box(payload).len(),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }
}

/// `Publisher::publish_bytes` per message: what eventplane adds on the
/// publishing thread to what the transport costs (the sequence number, the
/// timestamp, the envelope's head).
fn publishing(c: &mut Criterion) {
    let channel = kv_events();
    let mut group = c.benchmark_group("publisher");
    for size in [100usize, 4096] {
        let payload = vec![0xab; size];
        let publisher = Publisher::new(
            channel.clone(),
            Identity::new(7),
            1 << 20,
            Box::new(Counting(Default::default())),
        );
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("publish_bytes", size), |b| {
            b.iter(|| publisher.publish_bytes(black_box(&payload)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, codec, tracking, receiving, publishing);
criterion_main!(benches);
