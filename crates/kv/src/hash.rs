//! Block hashing: the one function that turns token ids into the hashes the
//! index, the router and every worker agree on.
//!
//! A prompt is cut into blocks of `block_size` tokens; only full blocks are
//! hashed (a partial last block is never cached by an engine, so it cannot
//! match). Each block gets two hashes:
//!
//! - its **local hash**: XXH3-64 (seed [`HASH_SEED`]) of the block's token
//!   ids, each written as 4 little-endian bytes;
//! - its **sequence hash**, which identifies the block *together with
//!   everything before it*: `seq[0] = local[0]`, and
//!   `seq[i] = XXH3-64(seq[i-1] as 8 LE bytes ++ local[i] as 8 LE bytes)`
//!   (seed [`HASH_SEED`]). With a [`Salt`] (a LoRA adapter, a cache
//!   namespace), the chain starts from the salt instead:
//!   `seq[0] = XXH3-64(salt ++ local[0])`, so equal tokens under different
//!   salts never share blocks.
//!
//! The index matches on sequence hashes alone: two blocks with equal
//! sequence hashes hold the same tokens after the same prefix. XXH3 was
//! chosen because it is the fastest well-distributed 64-bit hash for these
//! input sizes (`cargo bench -p eventplane-kv -- hash` measures it) and is
//! what the workload files and NVIDIA Dynamo use, so hashes can be compared
//! across implementations. The chaining rule is the one documented in
//! `docs/wire-format.md`; changing it is a wire-format change.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of every XXH3 call in block hashing.
pub const HASH_SEED: u64 = 1337;

/// The hash of one block's tokens, independent of what precedes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LocalHash(pub u64);

/// The hash of a block and its whole prefix: what the index is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeqHash(pub u64);

/// Both hashes of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "(LocalHash, SeqHash)", into = "(LocalHash, SeqHash)")]
pub struct BlockHash {
    /// Hash of the block's own tokens.
    pub local: LocalHash,
    /// Hash of the block chained on its prefix.
    pub seq: SeqHash,
}

impl From<(LocalHash, SeqHash)> for BlockHash {
    fn from((local, seq): (LocalHash, SeqHash)) -> Self {
        BlockHash { local, seq }
    }
}

impl From<BlockHash> for (LocalHash, SeqHash) {
    fn from(b: BlockHash) -> Self {
        (b.local, b.seq)
    }
}

/// Separates caches that must never share blocks although their tokens are
/// equal: a LoRA adapter, a tenant's cache namespace. Computed once, then
/// cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Salt(u64);

impl Salt {
    /// The salt for arbitrary bytes (an adapter's name, a namespace).
    pub fn new(bytes: &[u8]) -> Self {
        Salt(xxh3_64_with_seed(bytes, HASH_SEED))
    }
}

/// The local hash of one block of token ids.
#[inline]
pub fn local_hash(tokens: &[u32]) -> LocalHash {
    // Token ids are hashed as their little-endian bytes. On little-endian
    // machines that is the slice's own memory, so no copy is needed.
    #[cfg(target_endian = "little")]
    {
        LocalHash(xxh3_64_with_seed(
            bytemuck::cast_slice::<u32, u8>(tokens),
            HASH_SEED,
        ))
    }
    #[cfg(not(target_endian = "little"))]
    {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        LocalHash(xxh3_64_with_seed(&bytes, HASH_SEED))
    }
}

/// The sequence hash of a block whose local hash is `local`, following the
/// block whose sequence hash is `prev` (`None`: the first block of an
/// unsalted sequence).
#[inline]
pub fn chain(prev: Option<SeqHash>, local: LocalHash) -> SeqHash {
    match prev {
        None => SeqHash(local.0),
        Some(p) => chain_after(p.0, local),
    }
}

#[inline]
fn chain_after(prev: u64, local: LocalHash) -> SeqHash {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&prev.to_le_bytes());
    buf[8..].copy_from_slice(&local.0.to_le_bytes());
    SeqHash(xxh3_64_with_seed(&buf, HASH_SEED))
}

/// The sequence hash of the first block of a sequence, salted or not.
#[inline]
pub fn first(salt: Option<Salt>, local: LocalHash) -> SeqHash {
    match salt {
        None => SeqHash(local.0),
        Some(s) => chain_after(s.0, local),
    }
}

/// The sequence hash of a block whose local hash is `local`, following the
/// block `prev`, or starting a sequence salted by `salt` when there is none.
#[inline]
pub fn next_seq(prev: Option<SeqHash>, salt: Option<Salt>, local: LocalHash) -> SeqHash {
    match prev {
        None => first(salt, local),
        Some(p) => chain_after(p.0, local),
    }
}

/// Hashes every full block of `tokens`: the function routers and workers
/// share. Tokens after the last full block are ignored.
///
/// # Panics
///
/// If `block_size` is 0 (a configuration error caught at start-up).
pub fn block_hashes(tokens: &[u32], block_size: usize, salt: Option<Salt>) -> Vec<BlockHash> {
    assert!(block_size > 0, "block size must be positive");
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut prev: Option<SeqHash> = None;
    for block in tokens.chunks_exact(block_size) {
        let local = local_hash(block);
        let seq = next_seq(prev, salt, local);
        out.push(BlockHash { local, seq });
        prev = Some(seq);
    }
    out
}

/// Sequence hashes computed lazily from local hashes, so a lookup that stops
/// after three blocks hashes three blocks, not the whole prompt.
#[derive(Debug, Clone)]
pub struct SeqHashes<'a> {
    locals: std::slice::Iter<'a, LocalHash>,
    prev: Option<SeqHash>,
    salt: Option<Salt>,
}

impl<'a> SeqHashes<'a> {
    /// The sequence hashes of `locals`, chained from `salt`.
    pub fn new(locals: &'a [LocalHash], salt: Option<Salt>) -> Self {
        SeqHashes {
            locals: locals.iter(),
            prev: None,
            salt,
        }
    }
}

impl Iterator for SeqHashes<'_> {
    type Item = SeqHash;

    #[inline]
    fn next(&mut self) -> Option<SeqHash> {
        let local = *self.locals.next()?;
        let seq = next_seq(self.prev, self.salt, local);
        self.prev = Some(seq);
        Some(seq)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.locals.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_block_sequence_hash_is_its_local_hash() {
        let h = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, None);
        assert_eq!(h.len(), 2, "the partial last block is not hashed");
        assert_eq!(h[0].seq.0, h[0].local.0);
        assert_eq!(h[1].seq, chain(Some(h[0].seq), h[1].local));
        assert_ne!(h[1].seq.0, h[1].local.0);
    }

    #[test]
    fn local_hash_is_xxh3_of_little_endian_token_bytes() {
        let bytes: Vec<u8> = [7u32, 0x01020304]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        assert_eq!(
            local_hash(&[7, 0x01020304]).0,
            xxh3_64_with_seed(&bytes, HASH_SEED)
        );
    }

    #[test]
    fn chain_matches_the_workload_files_rule() {
        // From ../shared/workloads/conversation-16w (first store): the
        // second block's local and sequence hashes after the first.
        let s0 = SeqHash(6964963774696201994);
        let l1 = LocalHash(6581362553819431323);
        assert_eq!(chain(Some(s0), l1), SeqHash(11964331458684245151));
    }

    /// The test vectors of docs/wire-format.md §10, computed there with the
    /// Python `xxhash` package: an independent XXH3 implementation.
    #[test]
    fn documented_test_vectors() {
        let plain = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, None);
        let got: Vec<(u64, u64)> = plain.iter().map(|b| (b.local.0, b.seq.0)).collect();
        assert_eq!(
            got,
            [
                (14643705804678351452, 14643705804678351452),
                (16777012769546811212, 4945711292740353085)
            ]
        );
        let salted = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4, Some(Salt::new(b"lora-a")));
        assert_eq!(Salt::new(b"lora-a").0, 8954828697784921239);
        let seqs: Vec<u64> = salted.iter().map(|b| b.seq.0).collect();
        assert_eq!(seqs, [16266448407500416381, 16490874630527646485]);
    }

    #[test]
    fn salt_separates_equal_tokens_everywhere_in_the_chain() {
        let tokens: Vec<u32> = (0..64).collect();
        let plain = block_hashes(&tokens, 16, None);
        let a = block_hashes(&tokens, 16, Some(Salt::new(b"lora-a")));
        let b = block_hashes(&tokens, 16, Some(Salt::new(b"lora-b")));
        for i in 0..4 {
            assert_eq!(plain[i].local, a[i].local, "local hashes ignore the salt");
            assert_ne!(plain[i].seq, a[i].seq);
            assert_ne!(a[i].seq, b[i].seq);
        }
    }

    #[test]
    fn lazy_sequence_hashes_equal_the_eager_ones() {
        let tokens: Vec<u32> = (0..100).map(|i| i * 31 + 7).collect();
        let salt = Some(Salt::new(b"ns"));
        let eager = block_hashes(&tokens, 8, salt);
        let locals: Vec<LocalHash> = eager.iter().map(|b| b.local).collect();
        let lazy: Vec<SeqHash> = SeqHashes::new(&locals, salt).collect();
        let expected: Vec<SeqHash> = eager.iter().map(|b| b.seq).collect();
        assert_eq!(lazy, expected);
    }
}
