//! The hash table under the prefix index: sequence hash → a 64-bit set of
//! workers, written by one thread and read by any number of threads without
//! locks.
//!
//! Why not a crate: the index needs reads that never wait for the writer and
//! 16 bytes per entry. Sharded `RwLock` maps make readers wait for a writer
//! holding the shard (and bounce the lock's cache line between cores on every
//! probe); `left-right` keeps two copies (twice the memory) and makes the
//! writer wait for readers; general lock-free maps (`papaya`, `scc`) pay for
//! many writers with larger entries and slower inserts. With a single writer,
//! open addressing over pairs of atomics is enough, in safe code:
//!
//! - A slot is `(key, holders)`. A key, once written into a slot, never
//!   changes for the life of the table, so a reader that finds its key in a
//!   slot reads that key's holders, never another key's. An empty slot has
//!   key [`EMPTY`].
//! - The writer claims a slot by storing `holders` first and then `key` with
//!   `Release`; a reader loads `key` with `Acquire`, so it sees the holders
//!   that were stored with it (or later ones).
//! - A key whose holders fall to 0 stays as a tombstone: a later store of the
//!   same key revives it. Tombstones are dropped when the writer rebuilds the
//!   table into a fresh allocation (growing or shrinking it) and swaps it in;
//!   readers still holding the old table finish on it unharmed, and it is
//!   freed when the last of them lets go (`arc-swap` in the index does that).
//! - Linear probing; the table is never more than [`MAX_LOAD`] full, so every
//!   probe sequence ends at an empty slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// The key of an empty slot. A sequence hash equal to it is stored as
/// [`ZERO_STAND_IN`] instead (a 2^-64 event per block; a collision with a
/// real hash of that value is as likely as any other hash collision).
pub(crate) const EMPTY: u64 = 0;
/// What key 0 is stored as.
const ZERO_STAND_IN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fraction of slots (live or tombstone) above which the writer rebuilds.
pub(crate) const MAX_LOAD: (usize, usize) = (4, 5);
/// Smallest table allocated.
pub(crate) const MIN_SLOTS: usize = 256;

/// The slot key of a sequence hash.
#[inline]
pub(crate) fn slot_key(seq: u64) -> u64 {
    if seq == EMPTY {
        ZERO_STAND_IN
    } else {
        seq
    }
}

#[derive(Default)]
#[repr(C, align(16))]
struct Slot {
    key: AtomicU64,
    holders: AtomicU64,
}

/// A fixed-size open-addressing table. Only the index's writer calls the
/// methods that change it; any thread may call [`Table::get`].
pub(crate) struct Table {
    slots: Box<[Slot]>,
    /// Mixed into slot positions, so keys chosen by a misbehaving worker
    /// cannot be aimed at one run of slots.
    seed: u64,
}

/// Where [`Table::find_or_claim`] put a key.
pub(crate) enum Place {
    /// The key was already in slot `.0`.
    Found(usize),
    /// Slot `.0` was empty and now holds the key.
    Claimed(usize),
}

impl Table {
    pub(crate) fn new(slots: usize, seed: u64) -> Self {
        let slots = slots.max(MIN_SLOTS);
        Table {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            seed,
        }
    }

    /// Number of slots.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of the slot array.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    /// Whether `used` claimed slots (live or tombstone) plus one more would
    /// exceed [`MAX_LOAD`].
    pub(crate) fn full_for(&self, used: usize) -> bool {
        (used + 1) * MAX_LOAD.1 > self.slots.len() * MAX_LOAD.0
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        let mixed = (key ^ self.seed).wrapping_mul(0xa076_1d64_78bd_642f);
        // Multiply-shift maps the mixed key onto any table size (no power of
        // two needed, so a rebuild can size the table to what it holds).
        ((u128::from(mixed) * self.slots.len() as u128) >> 64) as usize
    }

    /// The holders of `key` (0 if absent). Safe to call from any thread at
    /// any time.
    #[inline]
    pub(crate) fn get(&self, key: u64) -> u64 {
        let n = self.slots.len();
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            let k = slot.key.load(Ordering::Acquire);
            if k == key {
                return slot.holders.load(Ordering::Acquire);
            }
            if k == EMPTY {
                return 0;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// The slot holding `key`, if any. Writer only.
    #[inline]
    pub(crate) fn find(&self, key: u64) -> Option<usize> {
        let n = self.slots.len();
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].key.load(Ordering::Relaxed);
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// The slot holding `key`, claiming an empty one (with no holders) if
    /// absent. Writer only; the caller keeps the load under [`MAX_LOAD`].
    #[inline]
    pub(crate) fn find_or_claim(&self, key: u64) -> Place {
        let n = self.slots.len();
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            let k = slot.key.load(Ordering::Relaxed);
            if k == key {
                return Place::Found(i);
            }
            if k == EMPTY {
                slot.holders.store(0, Ordering::Relaxed);
                slot.key.store(key, Ordering::Release);
                return Place::Claimed(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// Holders of slot `i`. Writer only (it reads its own writes).
    #[inline]
    pub(crate) fn holders_at(&self, i: usize) -> u64 {
        self.slots[i].holders.load(Ordering::Relaxed)
    }

    /// Sets the holders of slot `i`. Writer only.
    #[inline]
    pub(crate) fn set_holders_at(&self, i: usize, holders: u64) {
        self.slots[i].holders.store(holders, Ordering::Release);
    }

    /// Every claimed slot: `(slot, key, holders)`, tombstones included.
    /// Writer only.
    pub(crate) fn claimed(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let k = s.key.load(Ordering::Relaxed);
            (k != EMPTY).then(|| (i, k, s.holders.load(Ordering::Relaxed)))
        })
    }

    /// A new table of `slots` slots holding this one's live entries (no
    /// tombstones). Writer only.
    pub(crate) fn rebuilt(&self, slots: usize) -> Table {
        let fresh = Table::new(slots, self.seed);
        for (_, key, holders) in self.claimed() {
            if holders != 0 {
                match fresh.find_or_claim(key) {
                    Place::Claimed(i) | Place::Found(i) => fresh.set_holders_at(i, holders),
                }
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_finds_and_survives_a_rebuild() {
        let t = Table::new(0, 42);
        assert_eq!(t.capacity(), MIN_SLOTS);
        for k in 1..=100u64 {
            let Place::Claimed(i) = t.find_or_claim(slot_key(k * 7919)) else {
                panic!("fresh key {k} found")
            };
            t.set_holders_at(i, k);
        }
        assert!(matches!(t.find_or_claim(slot_key(7919)), Place::Found(_)));
        // Tombstone one key: it reads as absent and is dropped by a rebuild.
        let i = t.find(slot_key(2 * 7919)).unwrap();
        t.set_holders_at(i, 0);
        let r = t.rebuilt(400);
        assert_eq!(r.capacity(), 400);
        for k in 1..=100u64 {
            let expected = if k == 2 { 0 } else { k };
            assert_eq!(t.get(slot_key(k * 7919)), expected);
            assert_eq!(r.get(slot_key(k * 7919)), expected);
        }
        assert_eq!(r.claimed().count(), 99);
        assert_eq!(t.get(slot_key(0)), 0, "hash 0 is storable, and absent here");
    }

    #[test]
    fn load_limit_keeps_an_empty_slot() {
        let t = Table::new(10, 1);
        let mut used = 0;
        while !t.full_for(used) {
            t.find_or_claim(slot_key(used as u64 + 1));
            used += 1;
        }
        assert!(used < t.capacity());
        assert!(used * MAX_LOAD.1 <= t.capacity() * MAX_LOAD.0);
        assert!((used + 1) * MAX_LOAD.1 > t.capacity() * MAX_LOAD.0);
    }
}
