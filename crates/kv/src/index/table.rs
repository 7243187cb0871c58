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
//! open addressing over pairs of atomics is enough:
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
//! - Slots come in buckets of four, one cache line each (the four keys,
//!   then the four holder sets); probing is linear over buckets. The table
//!   is never more than [`MAX_LOAD`] full, so every probe sequence ends at a
//!   bucket with an empty slot.
//! - On x86-64 with AVX2, readers compare a bucket's four keys in one
//!   instruction ([`Table::get_from_avx2`]); nothing in the rules above
//!   depends on the four being read at one instant, only each one whole.

use std::sync::atomic::{AtomicU64, Ordering};

/// The key of an empty slot. A sequence hash equal to it is stored as
/// [`ZERO_STAND_IN`] instead (a 2^-64 event per block; a collision with a
/// real hash of that value is as likely as any other hash collision).
pub(crate) const EMPTY: u64 = 0;
/// What key 0 is stored as.
const ZERO_STAND_IN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fraction of slots (live or tombstone) above which the writer rebuilds.
pub(crate) const MAX_LOAD: (usize, usize) = (7, 10);
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

/// Slots per bucket: one 64-byte cache line.
const BUCKET: usize = 4;

/// Four slots in one cache line: the four keys first, then the four holder
/// sets, so that one 32-byte load brings all the keys (see
/// [`Table::get_from_avx2`]). A lookup compares all four keys without branching
/// on each, and moves to the next bucket only when this one is full and does
/// not hold the key; so most lookups read one line and take one predictable
/// branch.
#[derive(Default)]
#[repr(C, align(64))]
struct Bucket {
    keys: [AtomicU64; BUCKET],
    holders: [AtomicU64; BUCKET],
}

/// The bucket array: all zeros (every slot empty) when allocated.
///
/// Tables of 2 MiB and more are aligned to 2 MiB and advised to the kernel
/// as huge-page candidates before they are first touched: a growing table
/// then costs a few huge-page faults instead of hundreds of 4 KiB faults
/// (which were half the time of a rebuild on the 2-core VM), and lookups
/// miss the TLB less. Allocation goes through the global allocator, so
/// memory accounting sees it.
struct Buckets {
    ptr: std::ptr::NonNull<Bucket>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Buckets` owns its allocation, and `Bucket` is made of atomics,
// which are safe to share and send between threads.
unsafe impl Send for Buckets {}
// SAFETY: as above: shared access only ever goes through atomics.
unsafe impl Sync for Buckets {}

/// Size from which a table asks for huge pages.
const HUGE_PAGE: usize = 2 << 20;

impl Buckets {
    fn zeroed(mut len: usize) -> Self {
        let mut bytes = len * std::mem::size_of::<Bucket>();
        if bytes >= HUGE_PAGE {
            // Whole huge pages: the tail would otherwise be small pages.
            bytes = bytes.next_multiple_of(HUGE_PAGE);
            len = bytes / std::mem::size_of::<Bucket>();
        }
        let align = if bytes >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            std::mem::align_of::<Bucket>()
        };
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), align)
            .expect("table size fits the address space");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw.cast::<Bucket>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // SAFETY: the range is our own fresh allocation; the advice
            // only changes how the kernel backs it (and failing is harmless).
            unsafe { libc::madvise(raw.cast(), bytes, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `raw` is valid for `bytes` bytes of writes; all-zero bytes
        // are a valid `Bucket` (empty slots), so the slice below is fully
        // initialised.
        unsafe { std::ptr::write_bytes(raw, 0, bytes) };
        Buckets { ptr, len, layout }
    }
}

impl std::ops::Deref for Buckets {
    type Target = [Bucket];

    fn deref(&self) -> &[Bucket] {
        // SAFETY: `ptr` points to `len` initialised buckets that live as
        // long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buckets {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

/// `PREFETCHW`: fetch the line at `p` for writing. (The intrinsic's
/// target feature is not stable yet, so the instruction is written out.)
///
/// # Safety
///
/// The CPU must support PREFETCHW ([`has_prefetchw`]).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn prefetch_write(p: *const Bucket) {
    // SAFETY: PREFETCHW only hints the cache; it reads and writes no
    // memory architecturally and never faults.
    unsafe {
        std::arch::asm!(
            "prefetchw byte ptr [{p}]",
            p = in(reg) p,
            options(nostack, preserves_flags, readonly)
        )
    };
}

/// Whether the CPU has PREFETCHW (CPUID 8000_0001h, ECX bit 8: Intel's
/// PRFCHW, AMD's 3DNowPrefetch).
#[cfg(target_arch = "x86_64")]
fn has_prefetchw() -> bool {
    use std::arch::x86_64::__cpuid;
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU.
        let (max_leaf, features) = unsafe { (__cpuid(0x8000_0000).eax, __cpuid(0x8000_0001).ecx) };
        max_leaf >= 0x8000_0001 && features & (1 << 8) != 0
    })
}

/// A fixed-size open-addressing table. Only the index's writer calls the
/// methods that change it; any thread may call [`Table::get`].
pub(crate) struct Table {
    buckets: Buckets,
    /// Mixed into slot positions, so keys chosen by a misbehaving worker
    /// cannot be aimed at one run of slots.
    seed: u64,
    /// Whether [`Table::prefetch_for_write`] can use PREFETCHW.
    prefetchw: bool,
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
        let buckets = slots.max(MIN_SLOTS).div_ceil(BUCKET);
        Table {
            buckets: Buckets::zeroed(buckets),
            seed,
            #[cfg(target_arch = "x86_64")]
            prefetchw: has_prefetchw(),
            #[cfg(not(target_arch = "x86_64"))]
            prefetchw: false,
        }
    }

    /// Number of slots.
    pub(crate) fn capacity(&self) -> usize {
        self.buckets.len() * BUCKET
    }

    /// Bytes of the slot array.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    /// Whether `used` claimed slots (live or tombstone) plus one more would
    /// exceed [`MAX_LOAD`].
    pub(crate) fn full_for(&self, used: usize) -> bool {
        (used + 1) * MAX_LOAD.1 > self.capacity() * MAX_LOAD.0
    }

    /// The bucket `key`'s probe starts at.
    #[inline]
    pub(crate) fn home(&self, key: u64) -> usize {
        let mixed = (key ^ self.seed).wrapping_mul(0xa076_1d64_78bd_642f);
        // Multiply-shift maps the mixed key onto any table size (no power of
        // two needed, so a rebuild can size the table to what it holds).
        ((u128::from(mixed) * self.buckets.len() as u128) >> 64) as usize
    }

    /// The key of slot `i`.
    #[inline]
    fn key_at(&self, i: usize) -> &AtomicU64 {
        &self.buckets[i / BUCKET].keys[i % BUCKET]
    }

    /// The holders of slot `i`.
    #[inline]
    fn holders_cell(&self, i: usize) -> &AtomicU64 {
        &self.buckets[i / BUCKET].holders[i % BUCKET]
    }

    /// Probes for `key`: `Ok(slot)` where it is, or `Err(slot)` for the
    /// first empty slot where it would go. Buckets are scanned from the home
    /// bucket; a key is never past a bucket with an empty slot, because keys
    /// are never taken out of a table (see the module docs).
    #[inline]
    fn probe(&self, key: u64, order: Ordering) -> Result<usize, usize> {
        self.probe_from(key, self.home(key), order)
    }

    /// [`Table::probe`] from a home bucket already computed.
    #[inline]
    fn probe_from(&self, key: u64, home: usize, order: Ordering) -> Result<usize, usize> {
        let n = self.buckets.len();
        let mut b = home;
        loop {
            // Bit j of `hits` / `empties`: slot j holds the key / is empty.
            // Built with comparisons turned into bits, not branches: which
            // slot of the four holds a key is random, so a branch per slot
            // would be mispredicted on most lookups.
            let mut hits = 0u32;
            let mut empties = 0u32;
            for (j, k) in self.buckets[b].keys.iter().enumerate() {
                let k = k.load(order);
                hits |= u32::from(k == key) << j;
                empties |= u32::from(k == EMPTY) << j;
            }
            if hits != 0 {
                return Ok(b * BUCKET + hits.trailing_zeros() as usize);
            }
            if empties != 0 {
                return Err(b * BUCKET + empties.trailing_zeros() as usize);
            }
            b += 1;
            if b == n {
                b = 0;
            }
        }
    }

    /// Starts loading the first slot `key` could be in, so that a later
    /// [`Table::get`] finds it in cache. Lookups and events touch slots at
    /// random; issuing the loads of a run of blocks together lets their
    /// cache misses overlap instead of queueing one after another.
    #[inline]
    pub(crate) fn prefetch(&self, key: u64) {
        self.prefetch_bucket(self.home(key));
    }

    /// As [`Table::prefetch`], for a slot about to be written: the line is
    /// fetched for ownership (`PREFETCHW`), so when a reader on another core
    /// holds a copy, the write does not stall on invalidating it. With a
    /// reader looking up without pause, this doubled the writer's rate on
    /// the 2-core VM. Falls back to a plain prefetch on CPUs without it.
    /// Writer only.
    #[inline]
    pub(crate) fn prefetch_for_write(&self, key: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            if self.prefetchw {
                let bucket: *const Bucket = &self.buckets[self.home(key)];
                // SAFETY: the CPU has PREFETCHW (`has_prefetchw`); a
                // prefetch never faults, and `bucket` is in our slice.
                unsafe { prefetch_write(bucket) };
            } else {
                self.prefetch(key);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// [`Table::prefetch`] of a home bucket already computed.
    #[inline]
    pub(crate) fn prefetch_bucket(&self, home: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let bucket: *const Bucket = &self.buckets[home];
            // SAFETY: a prefetch is a hint: it never faults and has no
            // architectural effect, and `bucket` points into our own slice.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    bucket.cast::<i8>(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = home;
    }

    /// The holders of `key` (0 if absent). Safe to call from any thread at
    /// any time.
    #[inline]
    pub(crate) fn get(&self, key: u64) -> u64 {
        self.get_from(key, self.home(key))
    }

    /// [`Table::get`] from `key`'s home bucket, as [`Table::home`] gave it.
    #[inline]
    pub(crate) fn get_from(&self, key: u64, home: usize) -> u64 {
        match self.probe_from(key, home, Ordering::Acquire) {
            Ok(i) => self.holders_cell(i).load(Ordering::Acquire),
            Err(_) => 0,
        }
    }

    /// [`Table::get_from`], comparing a bucket's four keys with one AVX2
    /// comparison instead of four: a lookup spends most of its time probing
    /// one bucket per block (hot lookups of 128 and 512 blocks measured
    /// ~25% faster with it). Same answers as [`Table::get_from`].
    ///
    /// The four keys are read with one 32-byte load written in assembly,
    /// outside Rust's memory model, while the writer may store into them:
    /// x86 reads each aligned 8-byte element of such a load atomically, which
    /// is all a reader needs (it never relies on two keys being read at the
    /// same instant; see the module docs). A compiler fence then keeps the
    /// holders' load after the keys', as an `Acquire` load of the key would.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 (`is_x86_feature_detected!("avx2")`, which
    /// the standard library answers from a cached value).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn get_from_avx2(&self, key: u64, home: usize) -> u64 {
        use std::arch::x86_64::{
            __m256i, _mm256_castsi256_pd, _mm256_cmpeq_epi64, _mm256_movemask_pd,
            _mm256_set1_epi64x, _mm256_setzero_si256,
        };
        let want = _mm256_set1_epi64x(key as i64);
        let n = self.buckets.len();
        let mut b = home;
        loop {
            let bucket = &self.buckets[b];
            let keys: __m256i;
            // SAFETY: reads the 32 bytes of this bucket's keys, which are
            // aligned to 64 (the bucket's alignment) and live while `self`
            // does; the CPU has AVX (implied by AVX2). See above for why a
            // racing atomic store is harmless.
            unsafe {
                std::arch::asm!(
                    "vmovdqa {keys}, ymmword ptr [{p}]",
                    keys = out(ymm_reg) keys,
                    p = in(reg) bucket.keys.as_ptr(),
                    options(nostack, preserves_flags, readonly),
                );
            }
            std::sync::atomic::compiler_fence(Ordering::Acquire);
            let hits =
                _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(keys, want))) as u32;
            if hits != 0 {
                return bucket.holders[hits.trailing_zeros() as usize].load(Ordering::Acquire);
            }
            const _: () = assert!(EMPTY == 0, "empty slots are compared with zeros");
            let empty = _mm256_cmpeq_epi64(keys, _mm256_setzero_si256());
            if _mm256_movemask_pd(_mm256_castsi256_pd(empty)) != 0 {
                return 0;
            }
            b += 1;
            if b == n {
                b = 0;
            }
        }
    }

    /// The slot holding `key`, if any. Writer only.
    #[inline]
    pub(crate) fn find(&self, key: u64) -> Option<usize> {
        self.probe(key, Ordering::Relaxed).ok()
    }

    /// The slot holding `key`, claiming an empty one (with no holders) if
    /// absent. Writer only; the caller keeps the load under [`MAX_LOAD`].
    #[inline]
    pub(crate) fn find_or_claim(&self, key: u64) -> Place {
        match self.probe(key, Ordering::Relaxed) {
            Ok(i) => Place::Found(i),
            Err(i) => {
                self.holders_cell(i).store(0, Ordering::Relaxed);
                self.key_at(i).store(key, Ordering::Release);
                Place::Claimed(i)
            }
        }
    }

    /// Holders of slot `i`. Writer only (it reads its own writes).
    #[inline]
    pub(crate) fn holders_at(&self, i: usize) -> u64 {
        self.holders_cell(i).load(Ordering::Relaxed)
    }

    /// Sets the holders of slot `i`. Writer only.
    #[inline]
    pub(crate) fn set_holders_at(&self, i: usize, holders: u64) {
        self.holders_cell(i).store(holders, Ordering::Release);
    }

    /// Every claimed slot: `(slot, key, holders)`, tombstones included.
    /// Writer only.
    pub(crate) fn claimed(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let slots = self
            .buckets
            .iter()
            .flat_map(|b| b.keys.iter().zip(b.holders.iter()));
        slots.enumerate().filter_map(|(i, (k, h))| {
            let k = k.load(Ordering::Relaxed);
            (k != EMPTY).then(|| (i, k, h.load(Ordering::Relaxed)))
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
        assert_eq!(r.heap_bytes(), 400 * 16);
        for k in 1..=100u64 {
            let expected = if k == 2 { 0 } else { k };
            assert_eq!(t.get(slot_key(k * 7919)), expected);
            assert_eq!(r.get(slot_key(k * 7919)), expected);
        }
        assert_eq!(r.claimed().count(), 99);
        assert_eq!(t.get(slot_key(0)), 0, "hash 0 is storable, and absent here");
    }

    #[test]
    fn avx2_probe_answers_like_the_scalar_one() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        // A small table filled to its limit: long probe runs, wrap-around,
        // tombstones, absent keys and key 0 (stored as its stand-in).
        let t = Table::new(64, 7);
        let mut used = 0;
        let mut k = 0u64;
        while !t.full_for(used) {
            let Place::Claimed(i) = t.find_or_claim(slot_key(k * 0x9e37)) else {
                panic!("fresh key {k} found")
            };
            t.set_holders_at(i, if k.is_multiple_of(3) { 0 } else { k + 1 });
            used += 1;
            k += 1;
        }
        for probe in 0..k + 50 {
            let key = slot_key(probe * 0x9e37);
            let home = t.home(key);
            // SAFETY: AVX2 was detected above.
            let fast = unsafe { t.get_from_avx2(key, home) };
            assert_eq!(fast, t.get_from(key, home), "key {probe}");
        }
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
