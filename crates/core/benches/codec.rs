//! Hot paths of the core: encoding and decoding an envelope, and sequence
//! tracking. `cargo bench -p eventplane-core`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventplane_core::envelope::{decode, encode, Header, Kind};
use eventplane_core::SequenceTracker;

fn header(seq: u64) -> Header {
    Header {
        kind: Kind::Data,
        publisher_id: 0x1234_5678_9abc_def0,
        incarnation: 1_795_505_015_529_199_385,
        seq,
        timestamp_ns: 1_795_505_015_533_862_946,
    }
}

fn codec(c: &mut Criterion) {
    let subject = "ep.dynamo.backend.kv-events";
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
                encode(&header(seq), subject, p, &mut buf);
                black_box(buf.len())
            })
        });
        let mut frame = Vec::new();
        encode(&header(1), subject, &payload, &mut frame);
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

criterion_group!(benches, codec, tracking);
criterion_main!(benches);
