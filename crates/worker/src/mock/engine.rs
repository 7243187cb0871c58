//! The mock engine's scheduler: requests wait, are scheduled in steps under
//! a token budget, prefill in chunks, decode one token per step, and are
//! preempted when the pool runs out of blocks, the way vLLM (v1) does it.
//! Each step reports how long it would have taken on a GPU (a cost model),
//! so the I/O layer can sleep that long: replaying a trace behaves like a
//! loaded engine, faster than real time with a speedup factor.
//!
//! Sans-IO: no clock is read here. A step returns its simulated duration,
//! and the caller decides when the next step runs.
//!
//! One step:
//!
//! 1. Running requests, oldest first, each get what they still need to
//!    compute (a prefill chunk, or one decode token), within the step's
//!    token budget (`max_num_batched_tokens`). A request that needs a block
//!    when none is free preempts the newest running request (its blocks are
//!    released, cached contents kept; it goes back to the front of the
//!    queue and recomputes later), possibly itself.
//! 2. If nobody was preempted, waiting requests join in arrival order while
//!    there is budget and fewer than `max_num_seqs` run. A joining request
//!    first reuses the longest cached prefix of its full blocks (always
//!    leaving at least one token to compute, as vLLM does), then allocates
//!    blocks for its first chunk; if they do not fit, it and those behind it
//!    wait.
//! 3. Work is "done": computed tokens advance, blocks that became full are
//!    cached (emitting KV events), and every request whose tokens are all
//!    computed samples its next token (deterministic), finishing at
//!    `max_tokens`.

use std::collections::VecDeque;
use std::time::Duration;

use eventplane_kv::hash::{local_hash, next_seq};
use eventplane_kv::tokenize::VOCAB;
use eventplane_kv::{BlockHash, KvEvent, Salt};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::pool::{BlockId, BlockPool};

/// A request's id, unique among those the engine holds.
pub type RequestId = u64;

/// How long a step takes on the simulated GPU. Prefill cost grows with the
/// tokens computed (cached ones cost nothing); decode cost with the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Fixed cost of any step that does work.
    pub step_base: Duration,
    /// Cost of each prompt token computed.
    pub prefill_per_token: Duration,
    /// Cost of each request decoding in the step.
    pub decode_per_seq: Duration,
    /// Everything above is divided by this (≥ 1 replays faster than real
    /// time).
    pub speedup: f64,
}

impl Default for Timing {
    /// Roughly an 8B model on one modern GPU: 2 ms per step, 50,000 prompt
    /// tokens/s, 0.1 ms per decoding request.
    fn default() -> Self {
        Timing {
            step_base: Duration::from_millis(2),
            prefill_per_token: Duration::from_micros(20),
            decode_per_seq: Duration::from_micros(100),
            speedup: 1.0,
        }
    }
}

impl Timing {
    /// The duration of a step that computed `prefill_tokens` prompt tokens
    /// and decoded for `decode_seqs` requests.
    pub fn step_time(&self, prefill_tokens: usize, decode_seqs: usize) -> Duration {
        if prefill_tokens == 0 && decode_seqs == 0 {
            return Duration::ZERO;
        }
        let t = self.step_base
            + self.prefill_per_token * prefill_tokens as u32
            + self.decode_per_seq * decode_seqs as u32;
        t.div_f64(self.speedup.max(f64::MIN_POSITIVE))
    }
}

/// Limits of the simulated engine (vLLM's flags of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// KV blocks in the pool.
    pub num_gpu_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Most requests running at once.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (chunked prefill splits prompts).
    pub max_num_batched_tokens: usize,
    /// The cost model.
    pub timing: Timing,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            num_gpu_blocks: 8192,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            timing: Timing::default(),
        }
    }
}

/// A request as submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    /// Unique among the engine's requests.
    pub id: RequestId,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to generate (at least one).
    pub max_tokens: u32,
    /// Separates caches that must not share blocks (LoRA adapter...).
    pub salt: Option<Salt>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// `max_tokens` was 0.
    #[error("max_tokens must be at least 1")]
    NoOutput,
    /// The request could never fit in the pool, even alone.
    #[error("the request needs {needed} KV blocks; the pool has {total}")]
    TooLong {
        /// Blocks for prompt and output.
        needed: usize,
        /// Blocks in the pool.
        total: usize,
    },
    /// The id is already in use.
    #[error("request id {0} is already in use")]
    DuplicateId(RequestId),
}

/// Token counts of a finished request, as the OpenAI `usage` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens found in the prefix cache when first scheduled.
    pub cached_tokens: u32,
}

/// Something a step produced for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A generated token; `first` for the first of the request.
    Token {
        /// The request.
        id: RequestId,
        /// The token.
        token: u32,
        /// Whether it is the request's first.
        first: bool,
    },
    /// The request generated its `max_tokens` and released its blocks.
    Finished {
        /// The request.
        id: RequestId,
        /// Its token counts.
        usage: Usage,
    },
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// How long it took on the simulated GPU (zero if there was no work).
    pub duration: Duration,
    /// Tokens and completions, in order.
    pub outputs: Vec<Output>,
    /// Prompt tokens computed.
    pub prefill_tokens: usize,
    /// Requests that decoded.
    pub decode_seqs: usize,
    /// Requests preempted.
    pub preempted: usize,
}

/// The engine's load, as [`eventplane_kv::event::LoadMetrics`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Blocks referenced by requests.
    pub kv_blocks_used: u64,
    /// Blocks in the pool.
    pub kv_blocks_total: u64,
    /// Requests running.
    pub active_requests: u32,
    /// Requests waiting.
    pub waiting_requests: u32,
    /// Prompt tokens not yet computed, over all requests.
    pub active_prefill_tokens: u64,
}

#[derive(Debug)]
struct Request {
    id: RequestId,
    /// Prompt, then output so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: u32,
    salt: Option<Salt>,
    /// Tokens whose KV is computed.
    computed: usize,
    /// Blocks held, in sequence order.
    blocks: Vec<BlockId>,
    /// Hashes of the full blocks of `tokens` computed so far.
    hashes: Vec<BlockHash>,
    /// Leading blocks of `blocks` that are cached.
    cached_blocks: usize,
    /// Prompt tokens found cached when first scheduled.
    cached_prompt_tokens: Option<u32>,
}

impl Request {
    fn outputs(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Extends `hashes` to every full block of `tokens`.
    fn hash_full_blocks(&mut self, block_size: usize) {
        while self.hashes.len() < self.tokens.len() / block_size {
            let i = self.hashes.len();
            let local = local_hash(&self.tokens[i * block_size..(i + 1) * block_size]);
            let seq = next_seq(self.hashes.last().map(|b| b.seq), self.salt, local);
            self.hashes.push(BlockHash { local, seq });
        }
    }
}

/// The simulated engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    pool: BlockPool,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
}

impl Engine {
    /// An idle engine with an empty cache.
    ///
    /// # Panics
    ///
    /// If a limit is zero (flags are validated before this).
    pub fn new(config: EngineConfig) -> Self {
        assert!(config.block_size > 0 && config.max_num_seqs > 0);
        assert!(config.max_num_batched_tokens > 0);
        Engine {
            pool: BlockPool::new(config.num_gpu_blocks),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request.
    pub fn add(&mut self, r: NewRequest) -> Result<(), Rejected> {
        if r.prompt.is_empty() {
            return Err(Rejected::EmptyPrompt);
        }
        if r.max_tokens == 0 {
            return Err(Rejected::NoOutput);
        }
        let needed = self.blocks_for(r.prompt.len() + r.max_tokens as usize);
        if needed > self.pool.total() {
            return Err(Rejected::TooLong {
                needed,
                total: self.pool.total(),
            });
        }
        if self.find(r.id).is_some() {
            return Err(Rejected::DuplicateId(r.id));
        }
        let mut req = Request {
            id: r.id,
            prompt_len: r.prompt.len(),
            tokens: r.prompt,
            max_tokens: r.max_tokens,
            salt: r.salt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_blocks: 0,
            cached_prompt_tokens: None,
        };
        req.hash_full_blocks(self.config.block_size);
        self.waiting.push_back(req);
        Ok(())
    }

    /// Drops a request (client gone), releasing its blocks. Returns whether
    /// it was there.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(i);
            self.pool.release(&r.blocks);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|r| r.id == id) {
            let r = self.waiting.remove(i).expect("index from position");
            self.pool.release(&r.blocks);
            return true;
        }
        false
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Resets the prefix cache (emits [`KvEvent::Cleared`]) if no request
    /// holds blocks; returns whether it did.
    pub fn clear_cache(&mut self) -> bool {
        self.pool.clear_cache()
    }

    /// KV events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    /// Keep stored blocks' token ids with the events (for the vLLM-format
    /// mirror); see [`Engine::take_events_with_tokens`].
    pub fn record_tokens(&mut self) {
        self.pool.record_tokens();
    }

    /// KV events since the last call, each with its stored blocks' tokens.
    pub fn take_events_with_tokens(&mut self) -> Vec<(KvEvent, Vec<u32>)> {
        self.pool.take_events_with_tokens()
    }

    /// The block pool (read only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Current load.
    pub fn load(&self) -> Load {
        let pending_prefill: usize = self
            .running
            .iter()
            .chain(self.waiting.iter())
            .map(|r| r.prompt_len.saturating_sub(r.computed))
            .sum();
        Load {
            kv_blocks_used: self.pool.used() as u64,
            kv_blocks_total: self.pool.total() as u64,
            active_requests: self.running.len() as u32,
            waiting_requests: self.waiting.len() as u32,
            active_prefill_tokens: pending_prefill as u64,
        }
    }

    /// Runs one step: schedules, "computes", and says how long that took
    /// ([`Step::duration`]); the caller lets that much time pass before the
    /// next step.
    pub fn step(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.config.max_num_batched_tokens;
        // (id, tokens to compute this step)
        let mut scheduled: Vec<(RequestId, usize)> = Vec::new();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let r = &self.running[i];
            let n = (r.tokens.len() - r.computed).min(budget);
            let need = self.blocks_for(r.computed + n) - r.blocks.len();
            let mut preempted_self = false;
            let ids = loop {
                if let Some(ids) = self.pool.allocate(need) {
                    break ids;
                }
                let victim = self.running.len() - 1;
                self.preempt(victim);
                step.preempted += 1;
                if victim == i {
                    preempted_self = true;
                    break Vec::new();
                }
            };
            if preempted_self {
                break;
            }
            let r = &mut self.running[i];
            r.blocks.extend(ids);
            budget -= n;
            scheduled.push((r.id, n));
            i += 1;
        }

        if step.preempted == 0 {
            while budget > 0 && self.running.len() < self.config.max_num_seqs {
                let Some(n) = self.admit_next(budget) else {
                    break;
                };
                budget -= n;
                scheduled.push((self.running.last().expect("just admitted").id, n));
            }
        }

        for (id, n) in scheduled {
            self.execute(id, n, &mut step);
        }
        step.duration = self
            .config
            .timing
            .step_time(step.prefill_tokens, step.decode_seqs);
        step
    }

    /// Moves the first waiting request to running if its first chunk fits;
    /// returns the tokens it will compute this step.
    fn admit_next(&mut self, budget: usize) -> Option<usize> {
        let bs = self.config.block_size;
        let r = self.waiting.front_mut()?;
        r.hash_full_blocks(bs);
        let mut hit = self.pool.cached_prefix(&r.hashes);
        // Always compute at least the last token: it produces the output.
        if hit * bs >= r.tokens.len() {
            hit = (r.tokens.len() - 1) / bs;
        }
        let n = (r.tokens.len() - hit * bs).min(budget);
        let need = (hit * bs + n).div_ceil(bs) - hit;
        if self.pool.free() < need + self.pool.free_among(&r.hashes, hit) {
            return None;
        }
        let mut r = self.waiting.pop_front().expect("front exists");
        r.blocks = self.pool.acquire_cached(&r.hashes, hit);
        r.blocks
            .extend(self.pool.allocate(need).expect("checked free blocks"));
        r.computed = hit * bs;
        r.cached_blocks = hit;
        if r.cached_prompt_tokens.is_none() {
            r.cached_prompt_tokens = Some(r.computed.min(r.prompt_len) as u32);
        }
        self.running.push(r);
        Some(n)
    }

    fn execute(&mut self, id: RequestId, n: usize, step: &mut Step) {
        let bs = self.config.block_size;
        let Some(i) = self.running.iter().position(|r| r.id == id) else {
            return;
        };
        let r = &mut self.running[i];
        if r.outputs() == 0 || r.computed < r.prompt_len {
            step.prefill_tokens += n;
        } else {
            step.decode_seqs += 1;
        }
        r.computed += n;
        r.hash_full_blocks(bs);
        while r.cached_blocks < r.computed / bs {
            let b = r.cached_blocks;
            let parent = b.checked_sub(1).map(|p| r.hashes[p].seq);
            let tokens = &r.tokens[b * bs..(b + 1) * bs];
            self.pool
                .cache(r.blocks[b], r.hashes[b], parent, b as u32, tokens);
            r.cached_blocks += 1;
        }
        if r.computed < r.tokens.len() {
            return;
        }
        let token = sample(r.id, r.tokens.len());
        r.tokens.push(token);
        step.outputs.push(Output::Token {
            id,
            token,
            first: r.outputs() == 1,
        });
        if r.outputs() == r.max_tokens as usize {
            let r = self.running.remove(i);
            self.pool.release(&r.blocks);
            step.outputs.push(Output::Finished {
                id,
                usage: Usage {
                    prompt_tokens: r.prompt_len as u32,
                    completion_tokens: r.max_tokens,
                    cached_tokens: r.cached_prompt_tokens.unwrap_or(0),
                },
            });
        }
    }

    fn preempt(&mut self, index: usize) {
        let mut r = self.running.remove(index);
        self.pool.release(&r.blocks);
        r.blocks.clear();
        r.computed = 0;
        r.cached_blocks = 0;
        self.waiting.push_front(r);
    }

    fn find(&self, id: RequestId) -> Option<&Request> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|r| r.id == id)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }
}

/// The token a request generates at `position` (deterministic).
fn sample(id: RequestId, position: usize) -> u32 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&id.to_le_bytes());
    buf[8..].copy_from_slice(&(position as u64).to_le_bytes());
    1 + (xxh3_64_with_seed(&buf, 7) % u64::from(VOCAB - 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(blocks: usize, block_size: usize, batch: usize) -> Engine {
        Engine::new(EngineConfig {
            num_gpu_blocks: blocks,
            block_size,
            max_num_seqs: 8,
            max_num_batched_tokens: batch,
            timing: Timing::default(),
        })
    }

    fn request(id: RequestId, prompt: std::ops::Range<u32>, max_tokens: u32) -> NewRequest {
        NewRequest {
            id,
            prompt: prompt.collect(),
            max_tokens,
            salt: None,
        }
    }

    /// Steps until idle; returns the usage of each finished request.
    fn run(e: &mut Engine) -> Vec<(RequestId, Usage)> {
        let mut done = Vec::new();
        for _ in 0..10_000 {
            if !e.has_work() {
                return done;
            }
            for o in e.step().outputs {
                if let Output::Finished { id, usage } = o {
                    done.push((id, usage));
                }
            }
            e.pool().check_invariants();
        }
        panic!("engine did not finish");
    }

    #[test]
    fn prefill_then_decode_then_finish() {
        let mut e = engine(16, 16, 1024);
        e.add(request(1, 0..40, 3)).unwrap();
        let s = e.step();
        assert_eq!(s.prefill_tokens, 40);
        assert!(matches!(
            s.outputs[..],
            [Output::Token {
                id: 1,
                first: true,
                ..
            }]
        ));
        assert_eq!(s.duration, e.config().timing.step_time(40, 0));
        assert_eq!(e.step().decode_seqs, 1);
        let last = e.step();
        assert!(matches!(
            last.outputs[1],
            Output::Finished {
                id: 1,
                usage: Usage {
                    prompt_tokens: 40,
                    completion_tokens: 3,
                    cached_tokens: 0
                }
            }
        ));
        assert_eq!(e.pool().used(), 0, "blocks released");
        // The two full prompt blocks were cached, in one event.
        let events = e.take_events();
        assert!(
            matches!(&events[..], [KvEvent::Stored { parent: None, blocks, .. }] if blocks.len() == 2)
        );
    }

    #[test]
    fn a_repeated_prompt_reuses_its_cached_blocks_but_computes_the_last_token() {
        let mut e = engine(16, 16, 1024);
        e.add(request(1, 0..40, 1)).unwrap();
        run(&mut e);
        e.add(request(2, 0..40, 1)).unwrap();
        e.add(request(3, 0..32, 1)).unwrap();
        let done = run(&mut e);
        assert_eq!(done[0].1.cached_tokens, 32, "both full blocks reused");
        assert_eq!(
            done[1].1.cached_tokens, 16,
            "a fully cached prompt still computes its last block"
        );
    }

    #[test]
    fn long_prompts_prefill_in_chunks() {
        let mut e = engine(16, 16, 32);
        e.add(request(1, 0..100, 1)).unwrap();
        let chunks: Vec<usize> = (0..4).map(|_| e.step().prefill_tokens).collect();
        assert_eq!(chunks, [32, 32, 32, 4]);
    }

    #[test]
    fn a_full_pool_preempts_the_newest_request_and_both_finish() {
        // 4 blocks of 4 tokens; each request needs 3 blocks at the end.
        let mut e = engine(4, 4, 64);
        e.add(request(1, 0..6, 6)).unwrap();
        e.add(request(2, 100..106, 6)).unwrap();
        let mut preempted = 0;
        let mut done = Vec::new();
        while e.has_work() {
            let s = e.step();
            preempted += s.preempted;
            for o in s.outputs {
                if let Output::Finished { id, .. } = o {
                    done.push(id);
                }
            }
            e.pool().check_invariants();
        }
        assert!(preempted > 0);
        assert_eq!(done, [1, 2], "the older request is never the victim");
    }

    #[test]
    fn impossible_requests_are_refused_with_a_reason() {
        let mut e = engine(4, 4, 64);
        assert_eq!(e.add(request(1, 0..0, 1)), Err(Rejected::EmptyPrompt));
        assert_eq!(e.add(request(1, 0..4, 0)), Err(Rejected::NoOutput));
        assert_eq!(
            e.add(request(1, 0..16, 1)),
            Err(Rejected::TooLong {
                needed: 5,
                total: 4
            })
        );
        e.add(request(1, 0..4, 1)).unwrap();
        assert_eq!(e.add(request(1, 0..4, 1)), Err(Rejected::DuplicateId(1)));
        assert!(e.abort(1));
        assert!(!e.abort(1));
    }

    #[test]
    fn load_counts_requests_blocks_and_pending_prompt() {
        let mut e = engine(16, 4, 8);
        e.add(request(1, 0..20, 2)).unwrap();
        e.add(request(2, 50..60, 2)).unwrap();
        e.step();
        let l = e.load();
        assert_eq!(l.kv_blocks_total, 16);
        assert_eq!(l.active_requests, 1);
        assert_eq!(l.waiting_requests, 1);
        assert_eq!(l.kv_blocks_used, 2);
        assert_eq!(l.active_prefill_tokens, 12 + 10);
    }

    #[test]
    fn speedup_divides_step_time() {
        let t = Timing {
            speedup: 10.0,
            ..Timing::default()
        };
        assert_eq!(t.step_time(0, 0), Duration::ZERO);
        assert_eq!(
            t.step_time(100, 2) * 10,
            Timing::default().step_time(100, 2)
        );
    }
}
