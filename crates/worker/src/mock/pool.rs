//! The mock engine's KV block pool: a fixed number of blocks, prefix caching
//! with reference counts, and eviction of unreferenced blocks least recently
//! used first and, within a sequence, leaf first. It emits the KV events a
//! router's index needs to know exactly what is cached.
//!
//! The model is vLLM's (v1 `BlockPool`):
//!
//! - Every block is either **in use** (referenced by at least one running
//!   request) or **free**. Free blocks wait in one queue, in eviction order;
//!   a free block may still hold cached contents, which a later request with
//!   the same prefix can pick up again (taking it out of the queue).
//! - A block becomes **cached** when it is full: its sequence hash is
//!   recorded and it can be shared. Several blocks may hold the same hash
//!   (two requests filled it before either was cached); the hash stays
//!   cached until its last copy is evicted.
//! - Allocation takes free blocks from the front of the queue. Taking one
//!   that holds cached contents evicts them.
//! - A finished or preempted request returns its blocks last block first,
//!   to the back of the queue: the queue is least recently used first, and
//!   within one sequence the leaf goes before its parents.
//!
//! Events: [`KvEvent::Stored`] when a hash becomes cached (its first copy),
//! [`KvEvent::Removed`] when its last copy is evicted, [`KvEvent::Cleared`]
//! when the whole cache is reset. Applied in order to a
//! [`eventplane_kv::PrefixIndex`], they reproduce [`BlockPool::cached`]
//! exactly (a property test checks it).

use std::collections::HashMap;

use eventplane_kv::{BlockHash, KvEvent, SeqHash};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Index of a block in the pool.
pub type BlockId = u32;

/// What a cached block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Contents {
    hash: BlockHash,
    parent: Option<SeqHash>,
}

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    contents: Option<Contents>,
    /// Neighbours in the free queue (`NONE` at the ends or when in use).
    prev: BlockId,
    next: BlockId,
    queued: bool,
}

const NONE: BlockId = BlockId::MAX;

/// The pool. See the module docs.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    head: BlockId,
    tail: BlockId,
    free: usize,
    /// Cached hash → the blocks holding it.
    cached: FastMap<SeqHash, Vec<BlockId>>,
    events: Vec<KvEvent>,
    /// With token recording on: the token ids of each event's stored
    /// blocks, index for index with `events` (empty for other events).
    event_tokens: Option<Vec<Vec<u32>>>,
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` empty, free blocks.
    pub fn new(num_blocks: usize) -> Self {
        assert!(
            num_blocks > 0 && num_blocks < NONE as usize,
            "block count out of range"
        );
        let mut pool = BlockPool {
            blocks: vec![Block::default(); num_blocks],
            head: NONE,
            tail: NONE,
            free: 0,
            cached: FastMap::default(),
            events: Vec::new(),
            event_tokens: None,
            evictions: 0,
        };
        for id in 0..num_blocks as BlockId {
            pool.push_back(id);
        }
        pool
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Free blocks (evictable, cached or not).
    pub fn free(&self) -> usize {
        self.free
    }

    /// Blocks referenced by a request.
    pub fn used(&self) -> usize {
        self.blocks.len() - self.free
    }

    /// Cached contents evicted so far (every copy counts).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// How many leading blocks of `hashes` are cached.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(&h.seq))
            .count()
    }

    /// Takes a reference on one copy of each of the first `n` blocks of
    /// `hashes`, which must be cached ([`BlockPool::cached_prefix`]).
    pub fn acquire_cached(&mut self, hashes: &[BlockHash], n: usize) -> Vec<BlockId> {
        let mut ids = Vec::with_capacity(n);
        for h in &hashes[..n] {
            let id = self.cached[&h.seq][0];
            if self.blocks[id as usize].refs == 0 {
                self.unlink(id);
            }
            self.blocks[id as usize].refs += 1;
            ids.push(id);
        }
        ids
    }

    /// How many of the blocks [`BlockPool::acquire_cached`] would take for
    /// the first `n` of `hashes` are free now (acquiring them takes them out
    /// of the free queue).
    pub fn free_among(&self, hashes: &[BlockHash], n: usize) -> usize {
        hashes[..n]
            .iter()
            .filter(|h| self.blocks[self.cached[&h.seq][0] as usize].refs == 0)
            .count()
    }

    /// `n` fresh blocks, evicting what they cached; `None` (and nothing
    /// taken) if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free {
            return None;
        }
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            if let Some(c) = self.blocks[id as usize].contents.take() {
                self.evict(id, c.hash.seq);
            }
            self.blocks[id as usize].refs = 1;
            ids.push(id);
        }
        Some(ids)
    }

    /// Also keep the token ids of stored blocks with the events (for
    /// engine-format mirrors, whose `BlockStored` carries them); see
    /// [`BlockPool::take_events_with_tokens`].
    pub fn record_tokens(&mut self) {
        if self.event_tokens.is_none() {
            self.event_tokens = Some(vec![Vec::new(); self.events.len()]);
        }
    }

    /// Block `id`, in use and full, now holds `hash` (after the block
    /// `parent`, at `position` in its sequence) and can be shared. `tokens`
    /// are the block's token ids (kept only with
    /// [`BlockPool::record_tokens`]).
    pub fn cache(
        &mut self,
        id: BlockId,
        hash: BlockHash,
        parent: Option<SeqHash>,
        position: u32,
        tokens: &[u32],
    ) {
        let block = &mut self.blocks[id as usize];
        debug_assert!(block.refs > 0 && block.contents.is_none());
        block.contents = Some(Contents { hash, parent });
        let copies = self.cached.entry(hash.seq).or_default();
        copies.push(id);
        if copies.len() > 1 {
            return;
        }
        // Consecutive blocks of one sequence go in one event, as engines
        // send them.
        if let Some(KvEvent::Stored { blocks, .. }) = self.events.last_mut() {
            if blocks.last().map(|b| b.seq) == parent {
                blocks.push(hash);
                if let Some(last) = self.event_tokens.as_mut().and_then(|t| t.last_mut()) {
                    last.extend_from_slice(tokens);
                }
                return;
            }
        }
        self.push_event(
            KvEvent::Stored {
                parent,
                position: Some(position),
                blocks: vec![hash],
            },
            tokens,
        );
    }

    fn push_event(&mut self, event: KvEvent, tokens: &[u32]) {
        self.events.push(event);
        if let Some(t) = &mut self.event_tokens {
            t.push(tokens.to_vec());
        }
    }

    /// Drops one reference on each of `ids` (a request's blocks, in
    /// sequence order); blocks no longer referenced join the back of the
    /// free queue, last block first.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.refs > 0, "block {id} released twice");
            block.refs -= 1;
            if block.refs == 0 {
                self.push_back(id);
            }
        }
    }

    /// Forgets every cached hash and emits [`KvEvent::Cleared`], if no block
    /// is in use; otherwise does nothing and returns false (as vLLM's
    /// `reset_prefix_cache` does: a running request's next block would name
    /// a parent nobody caches any more).
    pub fn clear_cache(&mut self) -> bool {
        if self.used() > 0 {
            return false;
        }
        for block in &mut self.blocks {
            block.contents = None;
        }
        self.cached.clear();
        self.push_event(KvEvent::Cleared, &[]);
        true
    }

    /// The events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        if let Some(t) = &mut self.event_tokens {
            t.clear();
        }
        std::mem::take(&mut self.events)
    }

    /// The events since the last call with, for each, the token ids of the
    /// blocks it stored (empty unless [`BlockPool::record_tokens`] is on,
    /// and for events that store nothing).
    pub fn take_events_with_tokens(&mut self) -> Vec<(KvEvent, Vec<u32>)> {
        let events = std::mem::take(&mut self.events);
        let mut tokens = self
            .event_tokens
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        tokens.resize(events.len(), Vec::new());
        events.into_iter().zip(tokens).collect()
    }

    /// Every cached hash.
    pub fn cached(&self) -> impl Iterator<Item = SeqHash> + '_ {
        self.cached.keys().copied()
    }

    /// Checks the pool's internal accounting; panics with what is wrong.
    /// For tests.
    pub fn check_invariants(&self) {
        let mut queued = 0;
        let mut id = self.head;
        let mut prev = NONE;
        while id != NONE {
            let b = &self.blocks[id as usize];
            assert!(b.queued && b.refs == 0, "block {id} queued while in use");
            assert_eq!(b.prev, prev, "free queue links broken at {id}");
            queued += 1;
            prev = id;
            id = b.next;
        }
        assert_eq!(prev, self.tail);
        assert_eq!(queued, self.free, "free count drifted");
        let unreferenced = self.blocks.iter().filter(|b| b.refs == 0).count();
        assert_eq!(
            unreferenced, self.free,
            "a free block is missing from the queue"
        );
        assert_eq!(self.used() + self.free(), self.total());
        for (hash, copies) in &self.cached {
            assert!(!copies.is_empty());
            for &c in copies {
                let contents = self.blocks[c as usize]
                    .contents
                    .expect("cached block is empty");
                assert_eq!(contents.hash.seq, *hash);
            }
        }
        let with_contents = self.blocks.iter().filter(|b| b.contents.is_some()).count();
        let copies: usize = self.cached.values().map(Vec::len).sum();
        assert_eq!(with_contents, copies, "cache map and blocks disagree");
    }

    fn evict(&mut self, id: BlockId, seq: SeqHash) {
        self.evictions += 1;
        let copies = self.cached.get_mut(&seq).expect("cached block in the map");
        copies.retain(|&c| c != id);
        if copies.is_empty() {
            self.cached.remove(&seq);
            if let Some(KvEvent::Removed { blocks }) = self.events.last_mut() {
                blocks.push(seq);
            } else {
                self.push_event(KvEvent::Removed { blocks: vec![seq] }, &[]);
            }
        }
    }

    fn push_back(&mut self, id: BlockId) {
        let tail = self.tail;
        let block = &mut self.blocks[id as usize];
        debug_assert!(!block.queued);
        block.queued = true;
        block.prev = tail;
        block.next = NONE;
        if tail == NONE {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.free += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.queued);
            b.queued = false;
            (
                std::mem::replace(&mut b.prev, NONE),
                std::mem::replace(&mut b.next, NONE),
            )
        };
        if prev == NONE {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_kv::LocalHash;

    fn h(n: u64) -> BlockHash {
        BlockHash {
            local: LocalHash(n),
            seq: SeqHash(n),
        }
    }

    #[test]
    fn freed_sequences_are_evicted_oldest_first_and_leaf_first() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(2).unwrap();
        pool.cache(a[0], h(1), None, 0, &[]);
        pool.cache(a[1], h(2), Some(SeqHash(1)), 1, &[]);
        let b = pool.allocate(2).unwrap();
        pool.cache(b[0], h(3), None, 0, &[]);
        pool.cache(b[1], h(4), Some(SeqHash(3)), 1, &[]);
        assert_eq!(
            pool.take_events(),
            vec![
                KvEvent::Stored {
                    parent: None,
                    position: Some(0),
                    blocks: vec![h(1), h(2)]
                },
                KvEvent::Stored {
                    parent: None,
                    position: Some(0),
                    blocks: vec![h(3), h(4)]
                },
            ]
        );
        pool.release(&a);
        pool.release(&b);
        assert_eq!(pool.free(), 4);
        // Request a's leaf goes first, then its root, then b's.
        pool.allocate(1).unwrap();
        assert_eq!(
            pool.take_events(),
            vec![KvEvent::Removed {
                blocks: vec![SeqHash(2)]
            }]
        );
        pool.allocate(2).unwrap();
        assert_eq!(
            pool.take_events(),
            vec![KvEvent::Removed {
                blocks: vec![SeqHash(1), SeqHash(4)]
            }]
        );
        pool.check_invariants();
    }

    #[test]
    fn a_cached_prefix_is_shared_and_survives_until_its_last_copy_goes() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate(1).unwrap();
        pool.cache(a[0], h(7), None, 0, &[]);
        // A second copy of the same hash (filled before the first was cached).
        let b = pool.allocate(1).unwrap();
        pool.cache(b[0], h(7), None, 0, &[]);
        assert_eq!(pool.take_events().len(), 1, "one Stored for two copies");
        assert_eq!(pool.cached_prefix(&[h(7), h(8)]), 1);
        let shared = pool.acquire_cached(&[h(7)], 1);
        assert_eq!(pool.used(), 2, "sharing takes no new block");
        pool.release(&a);
        pool.release(&b);
        pool.release(&shared);
        assert_eq!(pool.free(), 3);
        pool.allocate(3).unwrap();
        assert_eq!(
            pool.take_events(),
            vec![KvEvent::Removed {
                blocks: vec![SeqHash(7)]
            }]
        );
        assert_eq!(pool.evictions(), 2);
        pool.check_invariants();
    }

    #[test]
    fn allocation_fails_whole_when_short() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap();
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.free(), 1);
        pool.release(&a);
        pool.check_invariants();
    }
}
