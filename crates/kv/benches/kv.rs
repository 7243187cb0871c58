//! Hot paths of the KV layer at realistic sizes:
//!
//! - `hash/*`: block hashing of prompts of 1 to 512 blocks (16 tokens per
//!   block, vLLM's default), and chaining local hashes alone;
//! - `apply/*`: storing and then removing a 16-block sequence on an index
//!   of 1 to 1,024 workers that already caches ~64k blocks per 16 workers;
//! - `lookup/*`: a request whose prefix of 1 to 512 blocks is cached by one
//!   worker, against 1 to 1,024 workers.
//!
//! `cargo bench -p eventplane-kv` runs them all; append a filter (`-- lookup`)
//! for one group.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventplane_kv::hash::{block_hashes, LocalHash, SeqHashes};
use eventplane_kv::{BlockHash, Matches, PrefixIndex, SeqHash, WorkerKey};

/// A deterministic stream of pseudo-random numbers (splitmix64).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

const BLOCK_SIZE: usize = 16;

fn tokens(mix: &mut Mix, blocks: usize) -> Vec<u32> {
    (0..blocks * BLOCK_SIZE)
        .map(|_| (mix.next() % 150_000) as u32)
        .collect()
}

fn sequence(mix: &mut Mix, blocks: usize) -> Vec<BlockHash> {
    block_hashes(&tokens(mix, blocks), BLOCK_SIZE, None)
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    let mut mix = Mix(1);
    for blocks in [1usize, 16, 128, 512] {
        let t = tokens(&mut mix, blocks);
        g.throughput(Throughput::Elements(blocks as u64));
        g.bench_with_input(BenchmarkId::new("block_hashes", blocks), &t, |b, t| {
            b.iter(|| block_hashes(black_box(t), BLOCK_SIZE, None))
        });
        let locals: Vec<LocalHash> = block_hashes(&t, BLOCK_SIZE, None)
            .iter()
            .map(|h| h.local)
            .collect();
        g.bench_with_input(BenchmarkId::new("chain", blocks), &locals, |b, l| {
            b.iter(|| SeqHashes::new(black_box(l), None).last())
        });
    }
    g.finish();
}

/// An index of `workers` workers, each caching sequences of 16 blocks, about
/// 4,000 blocks per worker (64k per 16 workers, as in conversation-16w).
fn loaded_index(mix: &mut Mix, workers: u64) -> PrefixIndex {
    let mut index = PrefixIndex::new();
    for w in 0..workers {
        for _ in 0..250 {
            let seq = sequence(mix, 16);
            index.store(WorkerKey::new(w), None, &seq);
        }
    }
    index
}

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    for workers in [1u64, 16, 128, 1024] {
        let mut mix = Mix(workers);
        let mut index = loaded_index(&mut mix, workers);
        let seqs: Vec<Vec<BlockHash>> = (0..64).map(|_| sequence(&mut mix, 16)).collect();
        // One iteration stores a 16-block sequence and removes it: 32 block
        // operations, leaving the index as it was.
        g.throughput(Throughput::Elements(32));
        g.bench_function(BenchmarkId::new("store_remove_16", workers), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let seq = &seqs[i % seqs.len()];
                let w = WorkerKey::new(i as u64 % workers);
                index.store(w, None, seq);
                let removed: Vec<SeqHash> = seq.iter().map(|h| h.seq).collect();
                index.remove(w, &removed);
                i += 1;
            })
        });
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for workers in [1u64, 16, 128, 1024] {
        let mut mix = Mix(workers + 7);
        let mut index = loaded_index(&mut mix, workers);
        let reader = index.reader();
        for blocks in [1usize, 16, 128, 512] {
            let seq = sequence(&mut mix, blocks);
            index.store(WorkerKey::new(workers / 2), None, &seq);
            let locals: Vec<LocalHash> = seq.iter().map(|h| h.local).collect();
            let mut m = Matches::new();
            g.throughput(Throughput::Elements(blocks as u64));
            g.bench_function(
                BenchmarkId::new(format!("{workers}_workers"), blocks),
                |b| {
                    b.iter(|| {
                        reader.lookup(SeqHashes::new(black_box(&locals), None), &mut m);
                        assert_eq!(m.longest(), blocks as u32);
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, hashing, apply, lookup);
criterion_main!(benches);
