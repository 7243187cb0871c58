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
//! - A slot is `(key, holders)`. An empty slot has key [`EMPTY`]. The
//!   writer claims a slot by storing `holders` first and then `key` with
//!   `Release`; a reader loads `key` with `Acquire`, so it sees the holders
//!   that were stored with it (or later ones). Keys never move, and a slot
//!   never becomes empty again, so every probe sequence ends at a bucket with
//!   an empty slot and a key is never past it.
//! - A key whose holders fall to 0 stays as a tombstone: a later store of the
//!   same key revives it. On CPUs with AVX (x86-64 since 2011), a store of a
//!   new key also reuses the first tombstone on its probe sequence, so
//!   tables fill with tombstones much more slowly: fewer keys end up past
//!   their home bucket (4 % instead of 20 % in `conversation-16w`), and a
//!   lookup's probe is more often one cache line and no mispredicted branch
//!   (lookup p99 −10 % there). A reader that compared a key and then reads
//!   its holders could then read another key's holders, so where slots are
//!   reused readers load key and holders together, in one 16-byte load
//!   ([`load_pair`]), which Intel and AMD guarantee to be atomic on every CPU
//!   with AVX; a reader that finds another key there reads "no holders", as
//!   the old key had when its slot was given away. The writer keeps a
//!   reused slot's holders at 0 until its new key is stored, so every pair a
//!   reader can load is consistent. Elsewhere tombstones are not reused and
//!   a key, once written into a slot, never changes.
//! - Tombstones are dropped when the writer rebuilds the table into a fresh
//!   allocation (growing or shrinking it) and swaps it in; readers still
//!   holding the old table finish on it unharmed, and it is freed when the
//!   last of them lets go (`arc-swap` in the index does that).
//! - Slots come in buckets of four, one cache line each; probing is linear
//!   over buckets. The table is never more than [`MAX_LOAD`] full (live
//!   slots and tombstones), so every probe sequence ends.
//! - With AVX-512, a bucket's four keys are compared in one instruction
//!   ([`Table::get_from_avx512`], and [`scan_avx512`] for the writer): the
//!   per-block cost of a long lookup was mostly instructions, not cache
//!   misses (a lookup repeated while its lines are in L1 took 6 ns per
//!   block; 5 ns with this).

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

#[derive(Default)]
#[repr(C, align(16))]
struct Slot {
    key: AtomicU64,
    holders: AtomicU64,
}

/// Slots per bucket: one 64-byte cache line.
const BUCKET: usize = 4;

/// Four slots in one cache line. A lookup compares all four keys without
/// branching on each, and moves to the next bucket only when this one is
/// full and does not hold the key; so most lookups read one line and take
/// one predictable branch.
#[derive(Default)]
#[repr(C, align(64))]
struct Bucket([Slot; BUCKET]);

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

/// Whether [`load_pair`] is one atomic access on this CPU: Intel and AMD
/// guarantee that aligned 16-byte vector loads are atomic on every CPU that
/// has AVX (and [`load_pair`] is written with AVX instructions, which mix
/// with AVX-512 code without transition stalls).
fn pair_loads_are_atomic() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A slot's key and holders, read together in one 16-byte load (atomic
/// where [`pair_loads_are_atomic`]; only called then).
#[inline]
fn load_pair(slot: &Slot) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        let (key, holders): (u64, u64);
        // SAFETY: `slot` is a valid, 16-byte aligned (`Slot`'s alignment)
        // pair of atomics; VMOVDQA reads it in one access, writes nothing
        // but the named registers, and x86 loads are not reordered with
        // other loads (an acquire load). Written in assembly because Rust
        // has no 16-byte atomic load.
        unsafe {
            std::arch::asm!(
                "vmovdqa {x}, xmmword ptr [{p}]",
                "vmovq {k}, {x}",
                "vpextrq {h}, {x}, 1",
                p = in(reg) std::ptr::from_ref(slot),
                x = out(xmm_reg) _,
                k = out(reg) key,
                h = out(reg) holders,
                options(nostack, preserves_flags, readonly)
            )
        };
        (key, holders)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = slot;
        unreachable!("pair loads are only used where they are atomic")
    }
}

/// One bucket as the writer sees it: bit `j` of each mask is about slot `j`.
struct Scan {
    /// The slot holds the key looked for.
    hits: u32,
    /// The slot is empty.
    empties: u32,
    /// The slot is a tombstone: claimed, with no holders.
    dead: u32,
}

/// [`Scan`] of `bucket` for `key`, with a comparison per slot turned into
/// bits (which slot matches is random, so branches would be mispredicted).
/// Writer only (plain loads of its own writes).
#[inline]
fn scan(bucket: &Bucket, key: u64) -> Scan {
    let mut s = Scan {
        hits: 0,
        empties: 0,
        dead: 0,
    };
    for (j, slot) in bucket.0.iter().enumerate() {
        let k = slot.key.load(Ordering::Relaxed);
        let unheld = slot.holders.load(Ordering::Relaxed) == 0;
        s.hits |= u32::from(k == key) << j;
        s.empties |= u32::from(k == EMPTY) << j;
        s.dead |= u32::from((k != EMPTY) & unheld) << j;
    }
    s
}

/// [`scan`] in three AVX-512 instructions over the bucket's eight words
/// (keys in the even ones, holders in the odd ones). The AVX-512 code here
/// uses only registers 16–31: the upper halves of registers 0–15 stay
/// clean, so the SSE code around it pays no transition penalty (the
/// compiler adds no `vzeroupper` after inline assembly; with `zmm0`–`zmm15`
/// short lookups took twice as long and the writer's rate fell by a
/// quarter). Two 32-byte halves instead of one 64-byte load were slower. Writer only: the
/// bucket is read in one wide load, which only the writer's own view of
/// it may rest on.
///
/// # Safety
///
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scan_avx512(bucket: &Bucket, key: u64) -> Scan {
    let (eq, zero): (u32, u32);
    // SAFETY: the CPU has AVX-512F (the caller's promise); the asm reads
    // the 64 bytes of `bucket` and writes only the registers named.
    unsafe {
        std::arch::asm!(
            "vpbroadcastq zmm16, {key}",
            "vmovdqa64 zmm17, zmmword ptr [{p}]",
            "vpcmpeqq {m}, zmm17, zmm16",
            "kmovw {eq:e}, {m}",
            "vptestnmq {m}, zmm17, zmm17",
            "kmovw {zero:e}, {m}",
            key = in(reg) key,
            p = in(reg) std::ptr::from_ref(bucket),
            out("zmm16") _,
            out("zmm17") _,
            m = out(kreg) _,
            eq = out(reg) eq,
            zero = out(reg) zero,
            options(nostack, preserves_flags, readonly)
        )
    };
    // Word 2j is slot j's key, word 2j + 1 its holders.
    let keys = |m: u32| (m & 1) | (m >> 1 & 2) | (m >> 2 & 4) | (m >> 3 & 8);
    let empties = keys(zero);
    Scan {
        hits: keys(eq),
        empties,
        dead: !empties & keys(zero >> 1) & 0xf,
    }
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
    /// Whether tombstones are reused for new keys: only where a reader can
    /// load a slot's key and holders together in one atomic access
    /// ([`load_pair`]).
    reuse: bool,
    /// Whether [`Table::get_from_avx512`] may be called.
    avx512: bool,
}

/// Where [`Table::find_or_claim`] put a key.
pub(crate) enum Place {
    /// The key was already in slot `.0`.
    Found(usize),
    /// Slot `.0` was empty and now holds the key.
    Claimed(usize),
    /// Slot `.0` was another key's tombstone and now holds the key.
    Reused(usize),
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
            reuse: pair_loads_are_atomic(),
            #[cfg(target_arch = "x86_64")]
            avx512: pair_loads_are_atomic() && std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            avx512: false,
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

    #[inline]
    fn slot(&self, i: usize) -> &Slot {
        &self.buckets[i / BUCKET].0[i % BUCKET]
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
            for (j, slot) in self.buckets[b].0.iter().enumerate() {
                let k = slot.key.load(order);
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
            Ok(i) if self.reuse => {
                // The slot may have been given to another key since its key
                // was compared: then `key` had no holders at that moment.
                let (k, holders) = load_pair(self.slot(i));
                if k == key {
                    holders
                } else {
                    0
                }
            }
            Ok(i) => self.slot(i).holders.load(Ordering::Acquire),
            Err(_) => 0,
        }
    }

    /// Whether the CPU runs [`Table::get_from_avx512`].
    #[inline]
    pub(crate) fn avx512(&self) -> bool {
        self.avx512
    }

    /// [`Table::get_from`] with one AVX-512 comparison of the home bucket's
    /// four keys: a key found there (almost every key of a table at this
    /// load) costs a third of the instructions of the scalar probe, and
    /// every other case takes the scalar probe. The comparison only picks
    /// the slot; its key and holders are then read together atomically
    /// ([`load_pair`]), so the answer never rests on the wide load.
    ///
    /// # Safety
    ///
    /// [`Table::avx512`] must be true.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn get_from_avx512(&self, key: u64, home: usize) -> u64 {
        let bucket = &self.buckets[home];
        let hits: u32;
        // SAFETY: the CPU has AVX-512F (the caller's promise); the asm reads
        // the 64 bytes of `bucket`, which is ours, and writes only the
        // registers named.
        unsafe {
            std::arch::asm!(
                "vpbroadcastq zmm16, {key}",
                "vpcmpeqq {m}, zmm16, zmmword ptr [{p}]",
                "kmovw {hits:e}, {m}",
                key = in(reg) key,
                p = in(reg) std::ptr::from_ref(bucket),
                out("zmm16") _,
                m = out(kreg) _,
                hits = out(reg) hits,
                options(nostack, preserves_flags, readonly)
            )
        };
        // Bits 0, 2, 4, 6: the keys (bits 1, 3, 5, 7 compare holders).
        let hits = hits & 0x55;
        if hits != 0 {
            let (k, holders) = load_pair(&bucket.0[(hits.trailing_zeros() / 2) as usize]);
            if k == key {
                return holders;
            }
        }
        self.get_from(key, home)
    }

    /// The slot holding `key`, if any. Writer only.
    #[inline]
    pub(crate) fn find(&self, key: u64) -> Option<usize> {
        self.probe(key, Ordering::Relaxed).ok()
    }

    /// The slot holding `key`, claiming one (with no holders) if absent:
    /// the first tombstone on its probe sequence where tombstones are
    /// reused, else the first empty slot. Writer only; the caller keeps the
    /// load under [`MAX_LOAD`].
    #[inline]
    pub(crate) fn find_or_claim(&self, key: u64) -> Place {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { self.find_or_claim_avx512(key) };
        }
        self.find_or_claim_with(key, scan)
    }

    /// [`Table::find_or_claim`] scanning buckets with [`scan_avx512`].
    ///
    /// # Safety
    ///
    /// [`Table::avx512`] must be true.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn find_or_claim_avx512(&self, key: u64) -> Place {
        self.find_or_claim_with(key, |bucket, key| {
            // SAFETY: as this function's.
            unsafe { scan_avx512(bucket, key) }
        })
    }

    #[inline(always)]
    fn find_or_claim_with(&self, key: u64, scan: impl Fn(&Bucket, u64) -> Scan) -> Place {
        let n = self.buckets.len();
        let mut b = self.home(key);
        let mut tombstone = None;
        loop {
            let Scan {
                hits,
                empties,
                dead,
            } = scan(&self.buckets[b], key);
            if hits != 0 {
                return Place::Found(b * BUCKET + hits.trailing_zeros() as usize);
            }
            if self.reuse && tombstone.is_none() && dead != 0 {
                tombstone = Some(b * BUCKET + dead.trailing_zeros() as usize);
            }
            if empties != 0 {
                if let Some(i) = tombstone {
                    // Its holders are 0, so a reader that loads the slot
                    // between these stores sees either key with no holders.
                    self.slot(i).key.store(key, Ordering::Release);
                    return Place::Reused(i);
                }
                let i = b * BUCKET + empties.trailing_zeros() as usize;
                let slot = self.slot(i);
                slot.holders.store(0, Ordering::Relaxed);
                slot.key.store(key, Ordering::Release);
                return Place::Claimed(i);
            }
            b += 1;
            if b == n {
                b = 0;
            }
        }
    }

    /// Holders of slot `i`. Writer only (it reads its own writes).
    #[inline]
    pub(crate) fn holders_at(&self, i: usize) -> u64 {
        self.slot(i).holders.load(Ordering::Relaxed)
    }

    /// Sets the holders of slot `i`. Writer only.
    #[inline]
    pub(crate) fn set_holders_at(&self, i: usize, holders: u64) {
        self.slot(i).holders.store(holders, Ordering::Release);
    }

    /// Every claimed slot: `(slot, key, holders)`, tombstones included.
    /// Writer only.
    pub(crate) fn claimed(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let slots = self.buckets.iter().flat_map(|b| b.0.iter());
        slots.enumerate().filter_map(|(i, s)| {
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
                    Place::Claimed(i) | Place::Found(i) | Place::Reused(i) => {
                        fresh.set_holders_at(i, holders)
                    }
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

    /// Keys whose home is bucket `b` of `t`.
    fn keys_homed_at(t: &Table, b: usize, n: usize) -> Vec<u64> {
        (1..)
            .map(|k: u64| k * 0x9e37)
            .filter(|&k| t.home(k) == b)
            .take(n)
            .collect()
    }

    #[test]
    fn a_tombstone_is_reused_where_pair_loads_are_atomic() {
        let t = Table::new(0, 7);
        let keys = keys_homed_at(&t, 3, 6);
        for &k in &keys[..4] {
            let Place::Claimed(i) = t.find_or_claim(k) else {
                panic!("fresh key found")
            };
            t.set_holders_at(i, 1);
        }
        // Bucket 3 is full; tombstone its second key.
        let dead = t.find(keys[1]).unwrap();
        t.set_holders_at(dead, 0);
        let place = t.find_or_claim(keys[4]);
        if t.reuse {
            assert!(matches!(place, Place::Reused(i) if i == dead));
            assert_eq!(t.get(keys[1]), 0, "the old key is gone");
            assert_eq!(t.find(keys[1]), None);
        } else {
            assert!(matches!(place, Place::Claimed(i) if i / BUCKET == 4));
        }
        let (Place::Reused(i) | Place::Claimed(i) | Place::Found(i)) = place;
        assert_eq!(t.get(keys[4]), 0, "claimed with no holders");
        t.set_holders_at(i, 2);
        assert_eq!(t.get(keys[4]), 2);
        // The old key comes back in a slot of its own.
        let (Place::Reused(j) | Place::Claimed(j)) = t.find_or_claim(keys[1]) else {
            panic!("a replaced key found")
        };
        assert_ne!(i, j);
        t.set_holders_at(j, 4);
        for (k, h) in [
            (keys[0], 1),
            (keys[1], 4),
            (keys[2], 1),
            (keys[3], 1),
            (keys[4], 2),
        ] {
            assert_eq!(t.get(k), h);
        }
        assert_eq!(t.get(keys[5]), 0);
    }

    #[test]
    fn the_avx512_probes_agree_with_the_scalar_ones() {
        let t = Table::new(64, 3);
        if !t.avx512() {
            return;
        }
        // Fill past one bucket per home, with tombstones and some keys
        // displaced, then compare every way of reading it.
        let mut mix = 1u64;
        let mut keys = Vec::new();
        while !t.full_for(keys.len()) {
            mix = mix.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(1);
            let key = slot_key(mix);
            let (Place::Claimed(i) | Place::Reused(i) | Place::Found(i)) = t.find_or_claim(key);
            t.set_holders_at(i, mix >> 60);
            keys.push(key);
        }
        let absent = (0..200u64).map(|k| slot_key(k.wrapping_mul(0xdead_beef)));
        for key in keys.iter().copied().chain(absent) {
            let home = t.home(key);
            // SAFETY: checked above.
            assert_eq!(
                unsafe { t.get_from_avx512(key, home) },
                t.get_from(key, home)
            );
        }
        for b in t.buckets.iter() {
            for key in
                b.0.iter()
                    .map(|s| s.key.load(Ordering::Relaxed))
                    .chain([12345])
            {
                let (x, y) = (scan(b, key), unsafe { scan_avx512(b, key) });
                assert_eq!((x.hits, x.empties, x.dead), (y.hits, y.empties, y.dead));
            }
        }
    }
}
