//! The approximate index, for routers running without KV events
//! (`--no-kv-events`): it predicts what each worker caches from the router's
//! own decisions. Routing a request's blocks to a worker records them as
//! cached there; a record expires `ttl` after it was last refreshed, and when
//! more than `max_blocks` (worker, block) records are held, the least
//! recently refreshed are dropped until `prune_to` remain.
//!
//! Time is an argument (`now`), never read from a clock, so tests are exact.
//! A `now` earlier than one seen before is treated as that earlier maximum:
//! time never runs backwards here.
//!
//! The records live in a [`PrefixIndex`], so lookups (and concurrent
//! [`IndexReader`]s) work exactly as with KV events. Recency is kept in a
//! queue of `(time, stamp, worker, block)` in refresh order; refreshing a
//! record appends a new entry and leaves the old one stale (recognised
//! because its stamp no longer matches), and the queue is compacted when stale entries
//! outnumber live ones.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::prefix::{IndexReader, IndexStats, Matches, PrefixIndex};
use crate::event::WorkerKey;
use crate::hash::SeqHash;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Default record lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// Default ceiling on (worker, block) records.
pub const DEFAULT_MAX_BLOCKS: usize = 1 << 20;

/// Limits of an [`ApproxIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApproxConfig {
    /// How long a record lives after its last refresh.
    pub ttl: Duration,
    /// Most (worker, block) records held after any call.
    pub max_blocks: usize,
    /// What pruning brings the count down to (default 80 % of the maximum).
    pub prune_to: usize,
}

impl Default for ApproxConfig {
    fn default() -> Self {
        ApproxConfig::new(DEFAULT_TTL, DEFAULT_MAX_BLOCKS)
    }
}

impl ApproxConfig {
    /// `ttl` and `max_blocks`, pruning to 80 % of the maximum.
    pub fn new(ttl: Duration, max_blocks: usize) -> Self {
        ApproxConfig {
            ttl,
            max_blocks,
            prune_to: max_blocks - max_blocks / 5,
        }
    }
}

/// The approximate index. See the module docs.
#[derive(Debug)]
pub struct ApproxIndex {
    config: ApproxConfig,
    index: PrefixIndex,
    /// The stamp of each live record's last refresh.
    refreshed: FastMap<(WorkerKey, SeqHash), u64>,
    /// Refreshes `(time, stamp, worker, block)`, oldest first; an entry whose
    /// stamp differs from `refreshed` is stale.
    order: VecDeque<(Instant, u64, WorkerKey, SeqHash)>,
    /// Stamp of the next refresh (counts up; unique even within one `now`).
    next_stamp: u64,
    now: Option<Instant>,
    expired: u64,
    pruned: u64,
}

impl ApproxIndex {
    /// An empty index.
    pub fn new(config: ApproxConfig) -> Self {
        ApproxIndex {
            config,
            index: PrefixIndex::new(),
            refreshed: FastMap::default(),
            order: VecDeque::new(),
            next_stamp: 0,
            now: None,
            expired: 0,
            pruned: 0,
        }
    }

    /// The router sent a request whose blocks are `blocks` to `worker` at
    /// `now`: the worker will cache them.
    pub fn record_routing(&mut self, worker: WorkerKey, blocks: &[SeqHash], now: Instant) {
        self.expire(now);
        let now = self.advance(now);
        for &seq in blocks {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            if self.refreshed.insert((worker, seq), stamp).is_none() {
                self.index.insert(worker, seq);
            }
            self.order.push_back((now, stamp, worker, seq));
        }
        if self.refreshed.len() > self.config.max_blocks {
            while self.refreshed.len() > self.config.prune_to {
                if self.pop_oldest().is_some() {
                    self.pruned += 1;
                }
            }
        }
        self.compact_if_stale();
    }

    /// Drops every record older than the TTL at `now`. Lookups and routing
    /// call it, so
    /// calling it directly is only needed to free memory while idle.
    pub fn expire(&mut self, now: Instant) {
        let now = self.advance(now);
        while let Some(&(t, stamp, worker, seq)) = self.order.front() {
            if now.saturating_duration_since(t) < self.config.ttl {
                break;
            }
            self.order.pop_front();
            if self.is_current(stamp, worker, seq) {
                self.drop_record(worker, seq);
                self.expired += 1;
            }
        }
    }

    /// Expires what is due at `now`, then answers like
    /// [`PrefixIndex::lookup`].
    pub fn lookup<I>(&mut self, seqs: I, now: Instant, out: &mut Matches)
    where
        I: IntoIterator<Item = SeqHash>,
    {
        self.expire(now);
        self.index.lookup(seqs, out);
    }

    /// A lock-free handle for other threads. It sees records until the
    /// writer expires them (at its next call).
    pub fn reader(&self) -> IndexReader {
        self.index.reader()
    }

    /// Forgets `worker` (it left the fleet).
    pub fn remove_worker(&mut self, worker: WorkerKey) {
        if self.index.remove_worker(worker) {
            self.refreshed.retain(|(w, _), _| *w != worker);
            self.order.retain(|(_, _, w, _)| *w != worker);
        }
    }

    /// Whether `worker` is predicted to hold `seq` (ignoring expiry due since
    /// the last call).
    pub fn holds(&self, worker: WorkerKey, seq: SeqHash) -> bool {
        self.refreshed.contains_key(&(worker, seq))
    }

    /// Live (worker, block) records.
    pub fn len(&self) -> usize {
        self.refreshed.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.refreshed.is_empty()
    }

    /// Records dropped because they outlived the TTL.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Records dropped by pruning to the target.
    pub fn pruned(&self) -> u64 {
        self.pruned
    }

    /// The underlying index's counters.
    pub fn stats(&self) -> IndexStats {
        self.index.stats()
    }

    /// The limits.
    pub fn config(&self) -> ApproxConfig {
        self.config
    }

    fn advance(&mut self, now: Instant) -> Instant {
        let now = self.now.map_or(now, |prev| prev.max(now));
        self.now = Some(now);
        now
    }

    /// Drops the least recently refreshed live record, skipping stale queue
    /// entries; returns it.
    fn pop_oldest(&mut self) -> Option<(WorkerKey, SeqHash)> {
        while let Some((_, stamp, worker, seq)) = self.order.pop_front() {
            if self.is_current(stamp, worker, seq) {
                self.drop_record(worker, seq);
                return Some((worker, seq));
            }
        }
        None
    }

    /// Whether a queue entry is the latest refresh of its record.
    fn is_current(&self, stamp: u64, worker: WorkerKey, seq: SeqHash) -> bool {
        self.refreshed.get(&(worker, seq)) == Some(&stamp)
    }

    fn drop_record(&mut self, worker: WorkerKey, seq: SeqHash) {
        self.refreshed.remove(&(worker, seq));
        self.index.erase(worker, seq);
    }

    fn compact_if_stale(&mut self) {
        if self.order.len() > 2 * self.refreshed.len() + 1024 {
            let mut order = std::mem::take(&mut self.order);
            order.retain(|&(_, stamp, w, s)| self.is_current(stamp, w, s));
            self.order = order;
        }
    }
}
