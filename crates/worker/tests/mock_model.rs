//! The mock engine under random request mixes: block accounting never
//! leaks, every request finishes exactly once, prefix reuse is exact, and
//! the KV events it emits, applied to the prefix index, reproduce the pool's
//! cached set exactly after every step.

use std::collections::{HashMap, HashSet};

use eventplane_kv::{PrefixIndex, SeqHash, WorkerKey};
use eventplane_worker::mock::{Engine, EngineConfig, NewRequest, Output, Timing};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// A prompt: one of three shared prefixes, cut at `prefix_len`, then a
    /// private suffix.
    Add {
        prefix: usize,
        prefix_len: usize,
        suffix_len: usize,
        max_tokens: u32,
    },
    Step,
    Abort(u64),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, 0usize..40, 0usize..12, 1u32..12).prop_map(|(prefix, prefix_len, suffix_len, max_tokens)| Op::Add {
            prefix,
            prefix_len,
            suffix_len,
            max_tokens
        }),
        8 => Just(Op::Step),
        1 => (0u64..30).prop_map(Op::Abort),
        1 => Just(Op::Clear),
    ]
}

fn config() -> impl Strategy<Value = EngineConfig> {
    (8usize..48, 1usize..6, 1usize..6, 1usize..48).prop_map(|(blocks, bs, seqs, batch)| {
        EngineConfig {
            num_gpu_blocks: blocks,
            block_size: bs,
            max_num_seqs: seqs,
            max_num_batched_tokens: batch,
            timing: Timing::default(),
        }
    })
}

/// The pool's cached set equals what the events told the index.
fn check_index_mirrors_pool(engine: &mut Engine, index: &mut PrefixIndex, worker: WorkerKey) {
    for event in engine.take_events() {
        index.apply(worker, &event);
    }
    let cached: HashSet<SeqHash> = engine.pool().cached().collect();
    assert_eq!(index.worker_cached_blocks(worker), cached.len() as u64);
    for s in &cached {
        assert!(index.holds(worker, *s), "index misses cached block {s:?}");
    }
    assert_eq!(index.stats().inconsistencies(), 0, "{:?}", index.stats());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn accounting_events_and_completion(config in config(), ops in proptest::collection::vec(op(), 1..80)) {
        let mut engine = Engine::new(config);
        let mut index = PrefixIndex::new();
        let worker = WorkerKey::new(1);
        let mut next_id = 0u64;
        let mut expected: HashMap<u64, u32> = HashMap::new();
        let mut finished: HashMap<u64, u32> = HashMap::new();
        let record = |outputs: Vec<Output>, finished: &mut HashMap<u64, u32>| {
            for o in outputs {
                if let Output::Finished { id, usage } = o {
                    assert!(finished.insert(id, usage.completion_tokens).is_none(), "{id} finished twice");
                    assert!(usage.cached_tokens < usage.prompt_tokens);
                }
            }
        };
        for op in ops {
            match op {
                Op::Add { prefix, prefix_len, suffix_len, max_tokens } => {
                    let mut prompt: Vec<u32> = (0..prefix_len as u32).map(|t| 1000 * (prefix as u32 + 1) + t).collect();
                    prompt.extend((0..suffix_len as u32).map(|t| 100_000 + 100 * next_id as u32 + t));
                    if engine
                        .add(NewRequest { id: next_id, prompt, max_tokens, salt: None })
                        .is_ok()
                    {
                        expected.insert(next_id, max_tokens);
                    }
                    next_id += 1;
                }
                Op::Step => record(engine.step().outputs, &mut finished),
                Op::Abort(id) => {
                    if engine.abort(id) {
                        expected.remove(&id);
                    }
                }
                Op::Clear => {
                    let idle = engine.pool().used() == 0;
                    prop_assert_eq!(engine.clear_cache(), idle);
                }
            }
            engine.pool().check_invariants();
            check_index_mirrors_pool(&mut engine, &mut index, worker);
        }
        // Whatever is left finishes (no deadlock, no livelock).
        let mut steps = 0;
        while engine.has_work() {
            record(engine.step().outputs, &mut finished);
            engine.pool().check_invariants();
            check_index_mirrors_pool(&mut engine, &mut index, worker);
            steps += 1;
            prop_assert!(steps < 100_000, "engine stuck");
        }
        prop_assert_eq!(engine.pool().used(), 0, "blocks leaked");
        for (id, max_tokens) in &expected {
            prop_assert_eq!(finished.get(id), Some(max_tokens), "request {} did not finish right", id);
        }
    }

    /// A prompt sent again once its first run finished (nothing else ran in
    /// between, the pool being large enough) finds every full block of it
    /// cached, less the block holding its last token.
    #[test]
    fn prefix_reuse_is_exact(len in 1usize..200, bs in 1usize..17) {
        let mut engine = Engine::new(EngineConfig {
            num_gpu_blocks: 64,
            block_size: bs,
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            timing: Timing::default(),
        });
        let prompt: Vec<u32> = (0..len as u32).collect();
        let mut cached = Vec::new();
        for id in 0..2 {
            if engine.add(NewRequest { id, prompt: prompt.clone(), max_tokens: 1, salt: None }).is_err() {
                return Ok(());
            }
            while engine.has_work() {
                for o in engine.step().outputs {
                    if let Output::Finished { usage, .. } = o {
                        cached.push(usage.cached_tokens);
                    }
                }
            }
        }
        prop_assert_eq!(cached[0], 0);
        prop_assert_eq!(cached[1] as usize, (len - 1) / bs * bs);
    }
}
