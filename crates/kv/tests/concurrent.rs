//! Readers looking up while the writer applies events: they never block,
//! never see a torn state, and never attribute one worker's blocks to
//! another, even when a removed worker's number is reused at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use eventplane_kv::{BlockHash, LocalHash, Matches, PrefixIndex, SeqHash, WorkerKey};

fn blocks(range: std::ops::Range<u64>) -> Vec<BlockHash> {
    range
        .map(|s| BlockHash {
            local: LocalHash(s),
            seq: SeqHash(s),
        })
        .collect()
}

#[test]
fn a_reused_worker_number_is_never_misattributed() {
    let mut index = PrefixIndex::new();
    let reader = index.reader();
    let (a, b) = (WorkerKey::new(1), WorkerKey::new(2));
    let (x, y) = (blocks(1..20), blocks(100..120));
    let done = Arc::new(AtomicBool::new(false));
    let checker = {
        let done = Arc::clone(&done);
        let (xs, ys): (Vec<SeqHash>, Vec<SeqHash>) = (
            x.iter().map(|b| b.seq).collect(),
            y.iter().map(|b| b.seq).collect(),
        );
        std::thread::spawn(move || {
            let mut m = Matches::new();
            let mut seen = [0u64; 2];
            while !done.load(Ordering::Relaxed) {
                reader.lookup(xs.iter().copied(), &mut m);
                assert_eq!(m.get(b), 0, "B credited with A's blocks");
                seen[0] += u64::from(m.get(a) > 0);
                reader.lookup(ys.iter().copied(), &mut m);
                assert_eq!(m.get(a), 0, "A credited with B's blocks");
                seen[1] += u64::from(m.get(b) > 0);
            }
            seen
        })
    };
    for _ in 0..20_000 {
        // A and B alternate on the same dense number.
        index.store(a, None, &x);
        index.remove_worker(a);
        index.store(b, None, &y);
        index.remove_worker(b);
    }
    done.store(true, Ordering::Relaxed);
    let seen = checker.join().expect("reader saw a misattribution");
    eprintln!("lookups that saw A: {}, saw B: {}", seen[0], seen[1]);
}

#[test]
fn a_growing_chain_is_seen_contiguously_through_rebuilds() {
    let mut index = PrefixIndex::new();
    let reader = index.reader();
    let w = WorkerKey::new(7);
    const N: u64 = 50_000;
    let chain: Vec<SeqHash> = (1..=N).map(SeqHash).collect();
    let done = Arc::new(AtomicBool::new(false));
    let checker = {
        let done = Arc::clone(&done);
        let chain = chain.clone();
        std::thread::spawn(move || {
            let mut m = Matches::new();
            let mut last = 0;
            let mut lookups = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                reader.lookup(chain.iter().copied(), &mut m);
                let now = m.get(w);
                assert!(now >= last, "match shrank from {last} to {now}");
                last = now;
                lookups += 1;
                if finished {
                    return (last, lookups);
                }
            }
        })
    };
    // One block per event, so the table grows (and is rebuilt) under the
    // reader many times.
    let mut parent = None;
    for b in blocks(1..N + 1) {
        index.store(w, parent, &[b]);
        parent = Some(b.seq);
    }
    assert!(index.stats().rebuilds >= 5, "{:?}", index.stats());
    done.store(true, Ordering::Release);
    let (last, lookups) = checker.join().expect("reader failed");
    assert_eq!(
        last, N as u32,
        "after the writer finished, the reader sees it all"
    );
    assert!(lookups > 0);
}
