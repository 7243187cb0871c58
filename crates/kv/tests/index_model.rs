//! The indexes against brute-force models, on random operation sequences.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use eventplane_kv::{
    ApproxConfig, ApproxIndex, BlockHash, LocalHash, Matches, PrefixIndex, SeqHash, WorkerKey,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Store(WorkerKey, Option<SeqHash>, Vec<SeqHash>),
    Remove(WorkerKey, Vec<SeqHash>),
    Clear(WorkerKey),
    RemoveWorker(WorkerKey),
    Lookup(Vec<SeqHash>),
}

/// Few distinct hashes (0 included) so workers share blocks and chains
/// overlap; up to 150 workers so several tables are in play.
fn seq() -> impl Strategy<Value = SeqHash> {
    (0u64..24).prop_map(SeqHash)
}

fn worker() -> impl Strategy<Value = WorkerKey> {
    prop_oneof![
        3 => (0u64..6, 0u32..2).prop_map(|(w, r)| WorkerKey { worker_id: w, dp_rank: r }),
        1 => (0u64..150).prop_map(WorkerKey::new),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (worker(), proptest::option::of(seq()), proptest::collection::vec(seq(), 0..8))
            .prop_map(|(w, p, b)| Op::Store(w, p, b)),
        3 => (worker(), proptest::collection::vec(seq(), 0..6)).prop_map(|(w, b)| Op::Remove(w, b)),
        1 => worker().prop_map(Op::Clear),
        1 => worker().prop_map(Op::RemoveWorker),
        5 => proptest::collection::vec(seq(), 0..10).prop_map(Op::Lookup),
    ]
}

/// Leading blocks of `query` each worker of `model` holds, as the index
/// reports them (workers with 0 absent), sorted.
fn model_answer(
    model: &HashMap<WorkerKey, HashSet<SeqHash>>,
    query: &[SeqHash],
) -> Vec<(WorkerKey, u32)> {
    let mut out: Vec<(WorkerKey, u32)> = model
        .iter()
        .map(|(w, held)| {
            (
                *w,
                query.iter().take_while(|s| held.contains(s)).count() as u32,
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort();
    out
}

fn sorted(m: &Matches) -> Vec<(WorkerKey, u32)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort();
    v
}

fn blocks(seqs: &[SeqHash]) -> Vec<BlockHash> {
    seqs.iter()
        .map(|s| BlockHash {
            local: LocalHash(s.0),
            seq: *s,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn prefix_index_answers_like_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut index = PrefixIndex::new();
        let reader = index.reader();
        let mut model: HashMap<WorkerKey, HashSet<SeqHash>> = HashMap::new();
        let mut unknown_removals = 0u64;
        let mut unknown_parents = 0u64;
        let (mut a, mut b) = (Matches::new(), Matches::new());
        for op in ops {
            match op {
                Op::Store(w, parent, seqs) => {
                    let held = model.entry(w).or_default();
                    if parent.is_some_and(|p| !held.contains(&p)) {
                        unknown_parents += 1;
                    }
                    held.extend(seqs.iter().copied());
                    index.store(w, parent, &blocks(&seqs));
                }
                Op::Remove(w, seqs) => {
                    for s in &seqs {
                        if !model.get_mut(&w).is_some_and(|h| h.remove(s)) {
                            unknown_removals += 1;
                        }
                    }
                    index.remove(w, &seqs);
                }
                Op::Clear(w) => {
                    if let Some(h) = model.get_mut(&w) {
                        h.clear();
                    }
                    index.clear(w);
                }
                Op::RemoveWorker(w) => {
                    prop_assert_eq!(index.remove_worker(w), model.remove(&w).is_some());
                }
                Op::Lookup(q) => {
                    let expected = model_answer(&model, &q);
                    index.lookup(q.iter().copied(), &mut a);
                    reader.lookup(q.iter().copied(), &mut b);
                    prop_assert_eq!(sorted(&a), expected.clone());
                    prop_assert_eq!(sorted(&b), expected);
                }
            }
            let cached: usize = model.values().map(HashSet::len).sum();
            prop_assert_eq!(index.cached_blocks(), cached as u64);
            for (w, held) in &model {
                prop_assert_eq!(index.worker_cached_blocks(*w), held.len() as u64);
            }
        }
        prop_assert_eq!(index.stats().unknown_removals, unknown_removals);
        prop_assert_eq!(index.stats().unknown_parents, unknown_parents);
    }
}

#[derive(Debug, Clone)]
enum ApproxOp {
    Route(WorkerKey, Vec<SeqHash>, u64),
    Lookup(Vec<SeqHash>, u64),
    Expire(u64),
    RemoveWorker(WorkerKey),
}

fn approx_op() -> impl Strategy<Value = ApproxOp> {
    // Time steps in ms: many zero steps (ties), some past the TTL.
    let dt = prop_oneof![3 => Just(0u64), 4 => 0u64..400, 1 => 900u64..1100];
    prop_oneof![
        6 => (worker(), proptest::collection::vec(seq(), 0..8), dt.clone())
            .prop_map(|(w, b, d)| ApproxOp::Route(w, b, d)),
        3 => (proptest::collection::vec(seq(), 0..8), dt.clone()).prop_map(|(q, d)| ApproxOp::Lookup(q, d)),
        1 => dt.prop_map(ApproxOp::Expire),
        1 => worker().prop_map(ApproxOp::RemoveWorker),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn approx_index_expires_at_ttl_and_prunes_lru_under_its_maximum(
        ops in proptest::collection::vec(approx_op(), 1..150),
        max_blocks in 4usize..40,
    ) {
        let ttl = Duration::from_millis(1000);
        let config = ApproxConfig::new(ttl, max_blocks);
        let mut index = ApproxIndex::new(config);
        let start = Instant::now();
        let mut now = 0u64;
        // (worker, block) -> (refresh time, refresh order)
        let mut model: HashMap<(WorkerKey, SeqHash), (u64, u64)> = HashMap::new();
        let mut order = 0u64;
        let expire = |model: &mut HashMap<(WorkerKey, SeqHash), (u64, u64)>, now: u64| {
            model.retain(|_, (t, _)| now - *t < 1000);
        };
        let mut m = Matches::new();
        for op in ops {
            match op {
                ApproxOp::Route(w, seqs, dt) => {
                    now += dt;
                    expire(&mut model, now);
                    for s in &seqs {
                        order += 1;
                        model.insert((w, *s), (now, order));
                    }
                    if model.len() > max_blocks {
                        let mut by_age: BTreeMap<u64, (WorkerKey, SeqHash)> =
                            model.iter().map(|(k, (_, o))| (*o, *k)).collect();
                        while model.len() > config.prune_to {
                            let (_, k) = by_age.pop_first().unwrap();
                            model.remove(&k);
                        }
                    }
                    index.record_routing(w, &seqs, start + Duration::from_millis(now));
                }
                ApproxOp::Lookup(q, dt) => {
                    now += dt;
                    expire(&mut model, now);
                    index.lookup(q.iter().copied(), start + Duration::from_millis(now), &mut m);
                    let mut held: HashMap<WorkerKey, HashSet<SeqHash>> = HashMap::new();
                    for (w, s) in model.keys() {
                        held.entry(*w).or_default().insert(*s);
                    }
                    prop_assert_eq!(sorted(&m), model_answer(&held, &q));
                }
                ApproxOp::Expire(dt) => {
                    now += dt;
                    expire(&mut model, now);
                    index.expire(start + Duration::from_millis(now));
                }
                ApproxOp::RemoveWorker(w) => {
                    model.retain(|(mw, _), _| *mw != w);
                    index.remove_worker(w);
                }
            }
            prop_assert!(index.len() <= max_blocks, "{} records over the maximum {}", index.len(), max_blocks);
            prop_assert_eq!(index.len(), model.len());
            for (w, s) in model.keys() {
                prop_assert!(index.holds(*w, *s));
            }
        }
    }
}

#[test]
fn approx_record_lives_until_exactly_its_ttl() {
    let ttl = Duration::from_secs(120);
    let mut index = ApproxIndex::new(ApproxConfig::new(ttl, 100));
    let w = WorkerKey::new(1);
    let t0 = Instant::now();
    let mut m = Matches::new();
    index.record_routing(w, &[SeqHash(1), SeqHash(2)], t0);
    index.lookup(
        [SeqHash(1), SeqHash(2)],
        t0 + ttl - Duration::from_nanos(1),
        &mut m,
    );
    assert_eq!(m.get(w), 2, "alive one nanosecond before the TTL");
    index.lookup([SeqHash(1), SeqHash(2)], t0 + ttl, &mut m);
    assert!(m.is_empty(), "expired at the TTL");
    assert_eq!(index.expired(), 2);
    assert_eq!(index.stats().blocks_removed, 2);
}

#[test]
fn refreshing_a_record_restarts_its_ttl() {
    let ttl = Duration::from_secs(10);
    let mut index = ApproxIndex::new(ApproxConfig::new(ttl, 100));
    let w = WorkerKey::new(1);
    let t0 = Instant::now();
    index.record_routing(w, &[SeqHash(1)], t0);
    index.record_routing(w, &[SeqHash(1)], t0 + Duration::from_secs(5));
    index.expire(t0 + Duration::from_secs(12));
    assert!(index.holds(w, SeqHash(1)));
    index.expire(t0 + Duration::from_secs(15));
    assert!(!index.holds(w, SeqHash(1)));
}

#[test]
fn a_parent_removed_mid_chain_leaves_nothing_behind() {
    let mut index = PrefixIndex::new();
    let w = WorkerKey::new(3);
    let chain: Vec<SeqHash> = (1..=5).map(SeqHash).collect();
    index.store(w, None, &blocks(&chain));
    index.remove(w, &[SeqHash(3)]);
    let mut m = Matches::new();
    index.lookup(chain.iter().copied(), &mut m);
    assert_eq!(m.get(w), 2, "the match stops at the hole");
    index.remove(w, &[SeqHash(1), SeqHash(2), SeqHash(4), SeqHash(5)]);
    assert_eq!(index.cached_blocks(), 0);
    // A store after an unknown parent is counted and still answerable once
    // the prefix is back.
    index.store(w, Some(SeqHash(9)), &blocks(&[SeqHash(10)]));
    assert_eq!(index.stats().unknown_parents, 1);
    index.remove_worker(w);
    assert_eq!(index.cached_blocks(), 0);
    assert_eq!(index.workers().count(), 0);
}

#[test]
fn memory_follows_what_is_cached() {
    let mut index = PrefixIndex::new();
    let w = WorkerKey::new(1);
    let chain: Vec<SeqHash> = (1..=100_000).map(SeqHash).collect();
    index.store(w, None, &blocks(&chain));
    let full = index.heap_bytes();
    assert!(full >= 100_000 * 16, "{full}");
    index.remove(w, &chain[..99_000]);
    let after = index.heap_bytes();
    assert!(
        after * 10 < full,
        "{after} bytes after removing 99% (from {full})"
    );
}
