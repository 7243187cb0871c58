//! The prefix index: which worker caches which block, fed by KV events, asked
//! how many leading blocks of a request each worker holds.
//!
//! Layout. Every worker (a [`WorkerKey`]: worker and data-parallel rank) gets
//! a small dense number when it first appears. Workers `64w .. 64w+63` share
//! table `w`, which maps a block's sequence hash to a 64-bit set of the
//! workers holding it; fleets of up to 64 ranks use one table and one probe
//! per block. Because blocks are keyed by sequence hash (which already
//! identifies the whole prefix), no tree is needed: a block stored after an
//! unknown or evicted parent, a block removed from the middle of a chain, or
//! a worker that vanishes cannot leave anything unreachable behind. Memory is
//! one 16-byte slot per distinct (block, table) pair at 40–70 % load.
//!
//! Concurrency. [`PrefixIndex`] is the single writer; [`IndexReader`]s,
//! cloned for any number of threads, look up without locks and never wait
//! for it (see `table.rs`). A reader sees each block's holders either before
//! or after any one change; a lookup that runs while events are applied sees
//! a mix of the states before and after them, as it would have had it run a
//! moment earlier or later.
//!
//! Dense numbers are reused after a worker is removed. A reader that loaded
//! the worker directory before the removal could attribute the new owner's
//! blocks to the old one; the directory version, bumped on every change and
//! checked after each lookup, makes that reader retry instead.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use super::table::{slot_key, Place, Table, MIN_SLOTS};
use crate::event::{check_version, KvEvent, KvEventBatch, UnsupportedVersion, WorkerKey};
use crate::hash::{chain, BlockHash, SeqHash};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Counters of everything the index was asked to do, including what did not
/// make sense. Inconsistent events are counted and applied as far as they can
/// be; they never fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IndexStats {
    /// Events applied.
    pub events: u64,
    /// Blocks added to a worker's cached set.
    pub blocks_stored: u64,
    /// Blocks taken out of a worker's cached set by removals.
    pub blocks_removed: u64,
    /// `Cleared` events applied.
    pub clears: u64,
    /// Workers removed entirely.
    pub workers_removed: u64,
    /// Tables rebuilt (grown, shrunk or cleaned of tombstones).
    pub rebuilds: u64,
    /// Stores of a block the worker already held.
    pub duplicate_stores: u64,
    /// Stores whose parent the worker did not hold.
    pub unknown_parents: u64,
    /// Removals of a block the worker did not hold.
    pub unknown_removals: u64,
    /// Stored blocks whose sequence hash does not follow from their parent
    /// and local hash by [`chain`]: a producer hashing differently. Stored
    /// anyway (the producer says it holds them), but no lookup will match
    /// them past that point.
    pub hash_mismatches: u64,
}

impl IndexStats {
    /// Events that did not match the index's view of the worker.
    pub fn inconsistencies(&self) -> u64 {
        self.duplicate_stores + self.unknown_parents + self.unknown_removals + self.hash_mismatches
    }
}

/// The answer to a lookup: for each worker holding at least the first block,
/// how many leading blocks it holds. Reuse one per thread: lookups allocate
/// nothing once its buffers have grown.
#[derive(Debug, Default, Clone)]
pub struct Matches {
    found: Vec<(WorkerKey, u32)>,
    raw: Vec<(u32, u32)>,
    active: Vec<(u32, u64)>,
}

impl Matches {
    /// An empty answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// `(worker, leading blocks held)`, in no particular order; workers
    /// holding no leading block are absent.
    pub fn iter(&self) -> impl Iterator<Item = (WorkerKey, u32)> + '_ {
        self.found.iter().copied()
    }

    /// Leading blocks `worker` holds.
    pub fn get(&self, worker: WorkerKey) -> u32 {
        self.found
            .iter()
            .find(|(w, _)| *w == worker)
            .map_or(0, |(_, n)| *n)
    }

    /// The longest match over all workers (0 if none).
    pub fn longest(&self) -> u32 {
        self.found.iter().map(|(_, n)| *n).max().unwrap_or(0)
    }

    /// Number of workers with a match.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    /// Whether no worker holds the first block.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }
}

/// What readers share with the writer.
struct Shared {
    snapshot: ArcSwap<Snapshot>,
    directory_version: AtomicU64,
}

/// The tables and the dense-number → worker directory, as last published.
struct Snapshot {
    tables: Box<[Arc<Table>]>,
    directory: Box<[Option<WorkerKey>]>,
}

/// Per-worker bookkeeping of the writer.
#[derive(Debug, Clone, Copy)]
struct WorkerSlot {
    number: u32,
    cached_blocks: u64,
}

/// Counts of one table's slots, kept by the writer.
#[derive(Debug, Clone, Copy, Default)]
struct Occupancy {
    /// Claimed slots, live or tombstone.
    used: usize,
    /// Slots with at least one holder.
    live: usize,
}

/// The prefix index's writer. See the module docs.
pub struct PrefixIndex {
    shared: Arc<Shared>,
    tables: Vec<Arc<Table>>,
    occupancy: Vec<Occupancy>,
    directory: Vec<Option<WorkerKey>>,
    workers: FastMap<WorkerKey, WorkerSlot>,
    free_numbers: BTreeSet<u32>,
    cached_blocks: u64,
    seed: u64,
    stats: IndexStats,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("workers", &self.workers.len())
            .field("cached_blocks", &self.cached_blocks)
            .field("stats", &self.stats)
            .finish()
    }
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> Self {
        use std::hash::BuildHasher;
        // Only the table layout depends on the seed, never an answer.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x6b76_u64);
        let snapshot = Snapshot {
            tables: Box::new([]),
            directory: Box::new([]),
        };
        PrefixIndex {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                directory_version: AtomicU64::new(0),
            }),
            tables: Vec::new(),
            occupancy: Vec::new(),
            directory: Vec::new(),
            workers: FastMap::default(),
            free_numbers: BTreeSet::new(),
            cached_blocks: 0,
            seed,
            stats: IndexStats::default(),
        }
    }

    /// A handle for looking up from other threads.
    pub fn reader(&self) -> IndexReader {
        IndexReader {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Applies one batch from the event plane. A batch of a version this
    /// build does not read is rejected whole (count it and drop it).
    pub fn apply_batch(&mut self, batch: &KvEventBatch) -> Result<(), UnsupportedVersion> {
        check_version(batch.version)?;
        let worker = batch.worker();
        for event in &batch.events {
            self.apply(worker, event);
        }
        Ok(())
    }

    /// Applies one event to `worker`'s cached set.
    pub fn apply(&mut self, worker: WorkerKey, event: &KvEvent) {
        match event {
            KvEvent::Stored { parent, blocks, .. } => self.store(worker, *parent, blocks),
            KvEvent::Removed { blocks } => self.remove(worker, blocks),
            KvEvent::Cleared => self.clear(worker),
        }
    }

    /// `worker` cached `blocks`, in prefix order, after the block `parent`.
    pub fn store(&mut self, worker: WorkerKey, parent: Option<SeqHash>, blocks: &[BlockHash]) {
        self.stats.events += 1;
        let number = self.number_of(worker);
        if let Some(p) = parent {
            if !self.holds_number(number, p) {
                self.stats.unknown_parents += 1;
            }
        }
        let mut prev = parent;
        let mut added = 0u64;
        let table = split(number).0;
        for b in blocks.iter().take(WRITE_AHEAD) {
            self.tables[table].prefetch_for_write(slot_key(b.seq.0));
        }
        for (i, b) in blocks.iter().enumerate() {
            if let Some(ahead) = blocks.get(i + WRITE_AHEAD) {
                self.tables[table].prefetch_for_write(slot_key(ahead.seq.0));
            }
            // The first block of a sequence cannot be checked: its hash
            // depends on a salt the index does not know.
            if prev.is_some() && chain(prev, b.local) != b.seq {
                self.stats.hash_mismatches += 1;
            }
            prev = Some(b.seq);
            if self.add_holder(number, b.seq) {
                added += 1;
            } else {
                self.stats.duplicate_stores += 1;
            }
        }
        self.count_cached(worker, added as i64);
        self.stats.blocks_stored += added;
    }

    /// `worker` evicted `blocks` (sequence hashes).
    pub fn remove(&mut self, worker: WorkerKey, blocks: &[SeqHash]) {
        self.stats.events += 1;
        let Some(slot) = self.workers.get(&worker).copied() else {
            self.stats.unknown_removals += blocks.len() as u64;
            return;
        };
        let mut removed = 0u64;
        let table = split(slot.number).0;
        for seq in blocks.iter().take(WRITE_AHEAD) {
            self.tables[table].prefetch_for_write(slot_key(seq.0));
        }
        for (i, &seq) in blocks.iter().enumerate() {
            if let Some(ahead) = blocks.get(i + WRITE_AHEAD) {
                self.tables[table].prefetch_for_write(slot_key(ahead.0));
            }
            if self.remove_holder(slot.number, seq) {
                removed += 1;
            } else {
                self.stats.unknown_removals += 1;
            }
        }
        self.count_cached(worker, -(removed as i64));
        self.stats.blocks_removed += removed;
    }

    /// `worker` dropped its whole cache. It stays known (its dense number is
    /// kept), so its next stores need no directory change.
    pub fn clear(&mut self, worker: WorkerKey) {
        self.stats.events += 1;
        self.stats.clears += 1;
        if let Some(slot) = self.workers.get(&worker).copied() {
            self.clear_number(slot.number);
            self.count_cached(worker, -(slot.cached_blocks as i64));
        }
    }

    /// Forgets `worker` entirely (it left the fleet). Returns whether it was
    /// known.
    pub fn remove_worker(&mut self, worker: WorkerKey) -> bool {
        let Some(slot) = self.workers.remove(&worker) else {
            return false;
        };
        self.stats.workers_removed += 1;
        self.clear_number(slot.number);
        self.cached_blocks -= slot.cached_blocks;
        self.directory[slot.number as usize] = None;
        self.free_numbers.insert(slot.number);
        self.publish(true);
        true
    }

    /// Looks up from the writer's thread (always sees every applied event).
    pub fn lookup<I>(&self, seqs: I, out: &mut Matches)
    where
        I: IntoIterator<Item = SeqHash>,
    {
        walk(
            &self.tables,
            seqs.into_iter(),
            &mut out.raw,
            &mut out.active,
        );
        resolve(&self.directory, out);
    }

    /// Whether `worker` holds block `seq`.
    pub fn holds(&self, worker: WorkerKey, seq: SeqHash) -> bool {
        self.workers
            .get(&worker)
            .is_some_and(|s| self.holds_number(s.number, seq))
    }

    /// Live (worker, block) pairs.
    pub fn cached_blocks(&self) -> u64 {
        self.cached_blocks
    }

    /// Blocks `worker` holds.
    pub fn worker_cached_blocks(&self, worker: WorkerKey) -> u64 {
        self.workers.get(&worker).map_or(0, |s| s.cached_blocks)
    }

    /// The workers known to the index (those that stored something and were
    /// not removed).
    pub fn workers(&self) -> impl Iterator<Item = WorkerKey> + '_ {
        self.workers.keys().copied()
    }

    /// The counters.
    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// Bytes the index has allocated, from its structures' capacities (an
    /// estimate for metrics; `eventplane bench index` measures instead).
    pub fn heap_bytes(&self) -> usize {
        let tables: usize = self.tables.iter().map(|t| t.heap_bytes()).sum();
        let entry = std::mem::size_of::<(WorkerKey, WorkerSlot)>() + 1;
        tables
            + self.workers.capacity() * entry
            + self.directory.capacity() * std::mem::size_of::<Option<WorkerKey>>() * 2
            + self.free_numbers.len() * 8
    }

    /// Adds one block to `worker`'s set, outside any event (the approximate
    /// index's predictions). Returns whether it was new.
    pub(crate) fn insert(&mut self, worker: WorkerKey, seq: SeqHash) -> bool {
        let number = self.number_of(worker);
        let added = self.add_holder(number, seq);
        if added {
            self.count_cached(worker, 1);
            self.stats.blocks_stored += 1;
        }
        added
    }

    /// Takes one block out of `worker`'s set, outside any event. Returns
    /// whether it was there.
    pub(crate) fn erase(&mut self, worker: WorkerKey, seq: SeqHash) -> bool {
        let Some(number) = self.workers.get(&worker).map(|s| s.number) else {
            return false;
        };
        let removed = self.remove_holder(number, seq);
        if removed {
            self.count_cached(worker, -1);
            self.stats.blocks_removed += 1;
        }
        removed
    }

    // ---- internals ------------------------------------------------------

    /// The dense number of `worker`, allocating one (and publishing the new
    /// directory) on first sight.
    fn number_of(&mut self, worker: WorkerKey) -> u32 {
        if let Some(s) = self.workers.get(&worker) {
            return s.number;
        }
        let number = match self.free_numbers.pop_first() {
            Some(n) => n,
            None => self.directory.len() as u32,
        };
        if number as usize == self.directory.len() {
            self.directory.push(None);
        }
        self.directory[number as usize] = Some(worker);
        let table = number as usize / 64;
        while self.tables.len() <= table {
            self.tables.push(Arc::new(Table::new(MIN_SLOTS, self.seed)));
            self.occupancy.push(Occupancy::default());
        }
        self.workers.insert(
            worker,
            WorkerSlot {
                number,
                cached_blocks: 0,
            },
        );
        self.publish(true);
        number
    }

    fn holds_number(&self, number: u32, seq: SeqHash) -> bool {
        let (t, bit) = split(number);
        self.tables[t].get(slot_key(seq.0)) & bit != 0
    }

    fn count_cached(&mut self, worker: WorkerKey, delta: i64) {
        if let Some(s) = self.workers.get_mut(&worker) {
            s.cached_blocks = s.cached_blocks.wrapping_add_signed(delta);
        }
        self.cached_blocks = self.cached_blocks.wrapping_add_signed(delta);
    }

    /// Adds worker `number` to the holders of `seq`; false if already there.
    fn add_holder(&mut self, number: u32, seq: SeqHash) -> bool {
        let (t, bit) = split(number);
        let key = slot_key(seq.0);
        if self.tables[t].full_for(self.occupancy[t].used) {
            self.rebuild(t, 1);
        }
        let table = &self.tables[t];
        let occupancy = &mut self.occupancy[t];
        let i = match table.find_or_claim(key) {
            Place::Found(i) => i,
            Place::Claimed(i) => {
                occupancy.used += 1;
                i
            }
        };
        let holders = table.holders_at(i);
        if holders & bit != 0 {
            return false;
        }
        if holders == 0 {
            occupancy.live += 1;
        }
        table.set_holders_at(i, holders | bit);
        true
    }

    /// Takes worker `number` out of the holders of `seq`; false if it was
    /// not there.
    fn remove_holder(&mut self, number: u32, seq: SeqHash) -> bool {
        let (t, bit) = split(number);
        let table = &self.tables[t];
        let Some(i) = table.find(slot_key(seq.0)) else {
            return false;
        };
        let holders = table.holders_at(i);
        if holders & bit == 0 {
            return false;
        }
        table.set_holders_at(i, holders & !bit);
        if holders == bit {
            self.occupancy[t].live -= 1;
            self.shrink_if_sparse(t);
        }
        true
    }

    fn clear_number(&mut self, number: u32) {
        let (t, bit) = split(number);
        let table = &self.tables[t];
        let mut emptied = 0;
        for (i, _, holders) in table.claimed() {
            if holders & bit != 0 {
                table.set_holders_at(i, holders & !bit);
                emptied += usize::from(holders == bit);
            }
        }
        self.occupancy[t].live -= emptied;
        self.shrink_if_sparse(t);
    }

    /// Rebuilds a table that holds much less than it could, so memory
    /// follows what the workers cache.
    fn shrink_if_sparse(&mut self, t: usize) {
        let cap = self.tables[t].capacity();
        if cap > MIN_SLOTS && self.occupancy[t].live * 8 < cap {
            self.rebuild(t, 0);
        }
    }

    /// Replaces table `t` by a fresh one sized for its live entries plus
    /// `extra`, at 40 % load, and publishes it.
    fn rebuild(&mut self, t: usize, extra: usize) {
        let live = self.occupancy[t].live + extra;
        let fresh = self.tables[t].rebuilt(live * 5 / 2);
        self.tables[t] = Arc::new(fresh);
        self.occupancy[t] = Occupancy {
            used: self.occupancy[t].live,
            live: self.occupancy[t].live,
        };
        self.stats.rebuilds += 1;
        self.publish(false);
    }

    /// Publishes the current tables and directory to readers.
    fn publish(&mut self, directory_changed: bool) {
        let snapshot = Snapshot {
            tables: self.tables.iter().cloned().collect(),
            directory: self.directory.clone().into_boxed_slice(),
        };
        self.shared.snapshot.store(Arc::new(snapshot));
        if directory_changed {
            self.shared
                .directory_version
                .fetch_add(1, Ordering::Release);
        }
    }
}

/// A lock-free lookup handle; clone one per thread.
#[derive(Clone)]
pub struct IndexReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IndexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexReader").finish_non_exhaustive()
    }
}

impl IndexReader {
    /// For the blocks `seqs` (sequence hashes, in prefix order), how many
    /// leading blocks each worker holds. Never waits for the writer.
    pub fn lookup<I>(&self, seqs: I, out: &mut Matches)
    where
        I: IntoIterator<Item = SeqHash>,
        I::IntoIter: Clone,
    {
        let seqs = seqs.into_iter();
        loop {
            let version = self.shared.directory_version.load(Ordering::Acquire);
            let snapshot = self.shared.snapshot.load();
            walk(
                &snapshot.tables,
                seqs.clone(),
                &mut out.raw,
                &mut out.active,
            );
            // Holders written after a directory change (a reused number)
            // are only visible together with the new version.
            if self.shared.directory_version.load(Ordering::Acquire) == version {
                resolve(&snapshot.directory, out);
                return;
            }
        }
    }
}

/// Table index and bit of a dense worker number.
#[inline]
fn split(number: u32) -> (usize, u64) {
    ((number / 64) as usize, 1u64 << (number % 64))
}

/// Records, for each bit of `dropped`, that the worker of that bit in table
/// `t` matched `depth` blocks.
#[inline]
fn record(raw: &mut Vec<(u32, u32)>, t: u32, mut dropped: u64, depth: u32) {
    while dropped != 0 {
        raw.push((t * 64 + dropped.trailing_zeros(), depth));
        dropped &= dropped - 1;
    }
}

/// How many blocks ahead of the one being probed a lookup hashes and
/// prefetches, at most. Must be a power of two.
const AHEAD: usize = 16;
/// How far ahead of the block being written an event's writes prefetch.
const WRITE_AHEAD: usize = 8;

/// The keys of a lookup's blocks, produced (hashed, if the caller chains
/// lazily) and prefetched ahead of the probes, so the cache misses of
/// successive blocks overlap instead of queueing one after another.
///
/// The distance ramps up: before probing block `d` it has produced up to
/// `d + 1 + min(d + 1, AHEAD - 1)` keys. Most lookups stop after a block or
/// two, so they hash little beyond what they use; a long match runs a full
/// [`AHEAD`] blocks ahead; and no lookup produces more than twice the blocks
/// it probes, plus one.
struct Ahead<I> {
    seqs: I,
    /// `(slot key, home bucket)` of blocks `produced - AHEAD .. produced`.
    ring: [(u64, usize); AHEAD],
    produced: usize,
    exhausted: bool,
}

impl<I: Iterator<Item = SeqHash>> Ahead<I> {
    fn new(seqs: I) -> Self {
        Ahead {
            seqs,
            ring: [(0, 0); AHEAD],
            produced: 0,
            exhausted: false,
        }
    }

    /// The key of block `depth` (the next one to probe) and what `locate`
    /// returned for it, if the lookup has that block. `locate` is called on
    /// every key as it is produced: it prefetches, and may return the key's
    /// home bucket so the probe need not compute it again.
    #[inline]
    fn key(&mut self, depth: usize, locate: impl Fn(u64) -> usize) -> Option<(u64, usize)> {
        let want = depth + 1 + (depth + 1).min(AHEAD - 1);
        while !self.exhausted && self.produced < want {
            match self.seqs.next() {
                Some(seq) => {
                    let key = slot_key(seq.0);
                    self.ring[self.produced % AHEAD] = (key, locate(key));
                    self.produced += 1;
                }
                None => self.exhausted = true,
            }
        }
        (depth < self.produced).then(|| self.ring[depth % AHEAD])
    }
}

/// The lookup itself: walks the blocks while any worker still holds every
/// block so far, recording each worker's match length as it drops out.
#[inline]
fn walk<I>(tables: &[Arc<Table>], seqs: I, raw: &mut Vec<(u32, u32)>, active: &mut Vec<(u32, u64)>)
where
    I: Iterator<Item = SeqHash>,
{
    raw.clear();
    active.clear();
    if let [table] = tables {
        // One table (up to 64 ranks): the common case, kept branch-light.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { walk_one_avx2(table, seqs, raw) };
            return;
        }
        walk_one(table, seqs, raw, |key, home| table.get_from(key, home));
        return;
    }
    let mut keys = Ahead::new(seqs);
    // Blocks every worker in `active` holds.
    let mut depth = 0u32;
    for t in 0..tables.len() {
        active.push((t as u32, u64::MAX));
    }
    loop {
        let prefetch = |k: u64| {
            for &(t, _) in active.iter() {
                tables[t as usize].prefetch(k);
            }
            0
        };
        let Some((key, _)) = keys.key(depth as usize, prefetch) else {
            break;
        };
        active.retain_mut(|(t, holding)| {
            let still = tables[*t as usize].get(key) & *holding;
            if still != *holding && depth > 0 {
                record(raw, *t, *holding & !still, depth);
            }
            *holding = still;
            still != 0
        });
        if active.is_empty() {
            return;
        }
        depth += 1;
    }
    if depth > 0 {
        for &(t, holding) in active.iter() {
            record(raw, t, holding, depth);
        }
    }
}

/// [`walk`] over a single table, reading holders with `get`.
#[inline(always)]
fn walk_one<I, G>(table: &Table, seqs: I, raw: &mut Vec<(u32, u32)>, get: G)
where
    I: Iterator<Item = SeqHash>,
    G: Fn(u64, usize) -> u64,
{
    let mut keys = Ahead::new(seqs);
    // Blocks every worker in `holding` holds.
    let mut depth = 0u32;
    let mut holding = u64::MAX;
    let locate = |key| {
        let home = table.home(key);
        table.prefetch_bucket(home);
        home
    };
    while let Some((key, home)) = keys.key(depth as usize, locate) {
        let still = get(key, home) & holding;
        if still != holding {
            if depth > 0 {
                record(raw, 0, holding & !still, depth);
            }
            holding = still;
            if holding == 0 {
                return;
            }
        }
        depth += 1;
    }
    if depth > 0 {
        record(raw, 0, holding, depth);
    }
}

/// [`walk_one`] compiled for AVX2, probing with [`Table::get_from_avx2`].
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn walk_one_avx2<I>(table: &Table, seqs: I, raw: &mut Vec<(u32, u32)>)
where
    I: Iterator<Item = SeqHash>,
{
    // SAFETY: this function only runs on CPUs with AVX2.
    walk_one(table, seqs, raw, |key, home| unsafe {
        table.get_from_avx2(key, home)
    });
}

/// Turns dense numbers into workers.
#[inline]
fn resolve(directory: &[Option<WorkerKey>], out: &mut Matches) {
    out.found.clear();
    for &(number, depth) in &out.raw {
        if let Some(Some(w)) = directory.get(number as usize) {
            out.found.push((*w, depth));
        }
    }
}
