//! The relay's state for one engine socket (one data-parallel rank), sans-IO:
//! engine messages `(seq, payload)` in, our KV events out.
//!
//! - **Hashes.** Stored blocks are re-hashed from their `token_ids` with our
//!   block hashing, chained on the parent's hash (LoRA adapters salt the
//!   chain). The engine-hash → our-hash map is kept to translate removals;
//!   it holds one entry per block the engine caches, and is capped at
//!   `max_tracked` (oldest dropped first, counted) in case an engine never
//!   sends its removals. A block whose parent is unknown (stored before the
//!   relay started, or lost) cannot be hashed consistently: it is skipped
//!   and counted, as are removals of unknown blocks.
//! - **Sequence.** Engine sequence numbers start at 0 at process start and
//!   grow by one per batch. A jump ahead is a gap: the caller asks the
//!   engine's replay socket from the first missing number
//!   ([`Live::Replay`]), feeds the answers to [`RankRelay::on_replayed`],
//!   then the message that revealed the gap to [`RankRelay::after_replay`].
//!   What replay could not recover is counted as lost, and the rank's state
//!   is cleared (our subscribers drop it) rather than left silently wrong.
//!   Live messages already applied from replay are skipped as duplicates. A
//!   number that goes back otherwise means the engine restarted: we publish
//!   `Cleared` and start over. A relay that joins a running engine (first
//!   number above 0) catches up from the replay buffer's oldest batch.
//! - Only blocks on the GPU (`medium` absent or `GPU`) are relayed: routing
//!   cares about what a prefill can reuse without a transfer.

use std::collections::{HashMap, VecDeque};

use eventplane_kv::hash::{local_hash, next_seq};
use eventplane_kv::{BlockHash, KvEvent, Salt, SeqHash};

use super::decode::{decode_batch, EngineEvent, EngineHash};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What the caller should do with a live message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Publish these events (possibly none).
    Publish(Vec<KvEvent>),
    /// Messages are missing: replay from `from`, then call
    /// [`RankRelay::after_replay`] with this same message.
    Replay {
        /// The first missing sequence number.
        from: u64,
    },
}

/// Counters of one rank's relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Engine batches applied.
    pub batches: u64,
    /// Blocks stored and relayed.
    pub blocks_stored: u64,
    /// Blocks removed and relayed.
    pub blocks_removed: u64,
    /// Clears relayed (engine clears, restarts, unrecoverable gaps).
    pub clears: u64,
    /// Payloads that could not be decoded (skipped).
    pub decode_errors: u64,
    /// Events that could not be read in an otherwise good batch (skipped).
    pub invalid_events: u64,
    /// Events of unknown types (skipped).
    pub unknown_events: u64,
    /// Stored blocks skipped: parent unknown, or tokens not matching the
    /// block count.
    pub unhashable_blocks: u64,
    /// Removals of blocks the relay did not know.
    pub unknown_removals: u64,
    /// Blocks on another medium than the GPU (not relayed).
    pub other_medium_blocks: u64,
    /// Replays asked for.
    pub replays: u64,
    /// Batches recovered by replay.
    pub replayed: u64,
    /// Batches lost for good (not in the engine's replay buffer).
    pub lost: u64,
    /// Live batches already applied from a replay.
    pub duplicates: u64,
    /// Engine restarts seen (sequence went back).
    pub restarts: u64,
    /// Map entries dropped because the map was full.
    pub evicted_mappings: u64,
}

/// The relay state of one engine rank. See the module docs.
#[derive(Debug)]
pub struct RankRelay {
    expected: Option<u64>,
    /// Live numbers in `[from, below)` were applied from a replay.
    replayed: Option<(u64, u64)>,
    replay_from: Option<u64>,
    map: FastMap<EngineHash, BlockHash>,
    order: VecDeque<EngineHash>,
    max_tracked: usize,
    stats: RelayStats,
    last_error: Option<String>,
}

impl RankRelay {
    /// A relay that tracks at most `max_tracked` engine blocks.
    pub fn new(max_tracked: usize) -> Self {
        RankRelay {
            expected: None,
            replayed: None,
            replay_from: None,
            map: FastMap::default(),
            order: VecDeque::new(),
            max_tracked: max_tracked.max(1),
            stats: RelayStats::default(),
            last_error: None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// Engine blocks currently mapped.
    pub fn tracked(&self) -> usize {
        self.map.len()
    }

    /// The last decode error, taken (for logging it once).
    pub fn take_error(&mut self) -> Option<String> {
        self.last_error.take()
    }

    /// A message from the engine's PUB socket.
    pub fn on_live(&mut self, seq: u64, payload: &[u8]) -> Live {
        let Some(expected) = self.expected else {
            if seq == 0 {
                return Live::Publish(self.apply(seq, payload));
            }
            // Joined a running engine: catch up on what its replay buffer
            // still has, from its start.
            self.stats.replays += 1;
            self.replay_from = Some(0);
            return Live::Replay { from: 0 };
        };
        if seq == expected {
            self.replayed = None;
            return Live::Publish(self.apply(seq, payload));
        }
        if seq > expected {
            self.stats.replays += 1;
            self.replay_from = Some(expected);
            return Live::Replay { from: expected };
        }
        if self
            .replayed
            .is_some_and(|(from, below)| (from..below).contains(&seq))
        {
            self.stats.duplicates += 1;
            return Live::Publish(Vec::new());
        }
        // Back to an earlier number, not a replayed one: a new engine.
        self.stats.restarts += 1;
        let mut events = self.reset();
        events.extend(self.apply(seq, payload));
        Live::Publish(events)
    }

    /// A message from the replay socket (any order the engine sends).
    pub fn on_replayed(&mut self, seq: u64, payload: &[u8]) -> Vec<KvEvent> {
        // Catching up from nothing: the buffer's oldest batch is our start.
        let accept = self.expected.unwrap_or(seq);
        if seq != accept {
            return Vec::new();
        }
        self.stats.replayed += 1;
        self.apply(seq, payload)
    }

    /// After a replay: the live message that revealed the gap.
    pub fn after_replay(&mut self, seq: u64, payload: &[u8]) -> Vec<KvEvent> {
        // Nothing replayed while catching up: start from this message.
        let expected = self.expected.unwrap_or(seq);
        let from = self.replay_from.take().unwrap_or(expected);
        self.replayed = Some((from, expected));
        if seq < expected {
            self.stats.duplicates += 1;
            return Vec::new();
        }
        let mut events = Vec::new();
        if seq > expected {
            // The engine's replay buffer no longer had these.
            self.stats.lost += seq - expected;
            events = self.reset();
        }
        events.extend(self.apply(seq, payload));
        events
    }

    /// Forgets everything (our subscribers are told with `Cleared`).
    fn reset(&mut self) -> Vec<KvEvent> {
        self.map.clear();
        self.order.clear();
        self.replayed = None;
        self.stats.clears += 1;
        vec![KvEvent::Cleared]
    }

    fn apply(&mut self, seq: u64, payload: &[u8]) -> Vec<KvEvent> {
        self.expected = Some(seq + 1);
        let batch = match decode_batch(payload) {
            Ok(b) => b,
            Err(e) => {
                self.stats.decode_errors += 1;
                self.last_error = Some(format!("batch {seq}: {e}"));
                return Vec::new();
            }
        };
        self.stats.batches += 1;
        let mut out = Vec::new();
        for event in batch.events {
            match event {
                EngineEvent::BlockStored {
                    block_hashes,
                    parent,
                    token_ids,
                    block_size,
                    lora_id,
                    lora_name,
                    medium,
                } => {
                    if !on_gpu(&medium) {
                        self.stats.other_medium_blocks += block_hashes.len() as u64;
                        continue;
                    }
                    let salt = lora_salt(lora_id, lora_name.as_deref());
                    if let Some(e) =
                        self.stored(&block_hashes, parent, &token_ids, block_size, salt)
                    {
                        out.push(e);
                    }
                }
                EngineEvent::BlockRemoved {
                    block_hashes,
                    medium,
                } => {
                    if !on_gpu(&medium) {
                        self.stats.other_medium_blocks += block_hashes.len() as u64;
                        continue;
                    }
                    let mut ours = Vec::with_capacity(block_hashes.len());
                    for h in block_hashes {
                        match self.map.remove(&h) {
                            Some(b) => ours.push(b.seq),
                            None => self.stats.unknown_removals += 1,
                        }
                    }
                    if !ours.is_empty() {
                        self.stats.blocks_removed += ours.len() as u64;
                        out.push(KvEvent::Removed { blocks: ours });
                    }
                }
                EngineEvent::AllBlocksCleared => {
                    out.extend(self.reset());
                }
                EngineEvent::Unknown(_) => self.stats.unknown_events += 1,
                EngineEvent::Invalid(e) => {
                    self.stats.invalid_events += 1;
                    self.last_error = Some(format!("batch {seq}: {e}"));
                }
            }
        }
        out
    }

    fn stored(
        &mut self,
        engine: &[EngineHash],
        parent: Option<EngineHash>,
        tokens: &[u32],
        block_size: u32,
        salt: Option<Salt>,
    ) -> Option<KvEvent> {
        let bs = block_size as usize;
        if tokens.len() != engine.len() * bs {
            self.stats.unhashable_blocks += engine.len() as u64;
            return None;
        }
        let our_parent: Option<SeqHash> = match parent {
            None => None,
            Some(p) => match self.map.get(&p) {
                Some(b) => Some(b.seq),
                None => {
                    self.stats.unhashable_blocks += engine.len() as u64;
                    return None;
                }
            },
        };
        let mut prev = our_parent;
        let mut blocks = Vec::with_capacity(engine.len());
        for (h, chunk) in engine.iter().zip(tokens.chunks_exact(bs)) {
            let local = local_hash(chunk);
            let seq = next_seq(prev, salt, local);
            let ours = BlockHash { local, seq };
            if self.map.insert(*h, ours).is_none() {
                self.order.push_back(*h);
            }
            blocks.push(ours);
            prev = Some(seq);
        }
        self.enforce_cap();
        self.stats.blocks_stored += blocks.len() as u64;
        Some(KvEvent::Stored {
            parent: our_parent,
            position: None,
            blocks,
        })
    }

    /// Drops the oldest mappings beyond the cap (entries already removed
    /// are skipped lazily).
    fn enforce_cap(&mut self) {
        while self.map.len() > self.max_tracked {
            let Some(h) = self.order.pop_front() else {
                break;
            };
            if self.map.remove(&h).is_some() {
                self.stats.evicted_mappings += 1;
            }
        }
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|h| map.contains_key(h));
        }
    }
}

fn on_gpu(medium: &Option<String>) -> bool {
    medium
        .as_deref()
        .is_none_or(|m| m.eq_ignore_ascii_case("gpu"))
}

/// The salt of a LoRA adapter: by name when the engine gives one, else by
/// id. The router salts requests for that adapter the same way.
pub fn lora_salt(lora_id: Option<i64>, lora_name: Option<&str>) -> Option<Salt> {
    match (lora_name, lora_id) {
        (Some(name), _) => Some(Salt::new(format!("lora:{name}").as_bytes())),
        (None, Some(id)) => Some(Salt::new(format!("lora-id:{id}").as_bytes())),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_kv::block_hashes;
    use rmpv::Value;

    fn batch(events: Vec<Value>) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(
            &mut out,
            &Value::Array(vec![Value::F64(0.0), Value::Array(events)]),
        )
        .unwrap();
        out
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: std::ops::Range<u32>) -> Value {
        Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(hashes.iter().map(|h| Value::from(*h)).collect()),
            parent.map_or(Value::Nil, Value::from),
            Value::Array(tokens.map(Value::from).collect()),
            Value::from(2u32),
        ])
    }

    fn removed(hashes: &[u64]) -> Value {
        Value::Array(vec![
            Value::from("BlockRemoved"),
            Value::Array(hashes.iter().map(|h| Value::from(*h)).collect()),
        ])
    }

    #[test]
    fn rehashes_with_our_function_and_translates_removals() {
        let mut r = RankRelay::new(100);
        let Live::Publish(ev) = r.on_live(0, &batch(vec![stored(&[900, 901], None, 1..5)])) else {
            panic!()
        };
        let ours = block_hashes(&[1, 2, 3, 4], 2, None);
        assert_eq!(
            ev,
            vec![KvEvent::Stored {
                parent: None,
                position: None,
                blocks: ours.clone()
            }]
        );
        // A child stored later chains on our hash of its parent.
        let Live::Publish(ev) = r.on_live(1, &batch(vec![stored(&[902], Some(901), 5..7)])) else {
            panic!()
        };
        let all = block_hashes(&[1, 2, 3, 4, 5, 6], 2, None);
        assert_eq!(
            ev,
            vec![KvEvent::Stored {
                parent: Some(all[1].seq),
                position: None,
                blocks: vec![all[2]]
            }]
        );
        let Live::Publish(ev) = r.on_live(2, &batch(vec![removed(&[902, 12345])])) else {
            panic!()
        };
        assert_eq!(
            ev,
            vec![KvEvent::Removed {
                blocks: vec![all[2].seq]
            }]
        );
        assert_eq!(r.stats().unknown_removals, 1);
        assert_eq!(r.tracked(), 2);
    }

    #[test]
    fn a_gap_is_replayed_and_duplicates_skipped() {
        let mut r = RankRelay::new(100);
        r.on_live(0, &batch(vec![stored(&[1], None, 0..2)]));
        // 1 is missing; 2 arrives.
        let two = batch(vec![stored(&[3], Some(2), 4..6)]);
        assert_eq!(r.on_live(2, &two), Live::Replay { from: 1 });
        let one = batch(vec![stored(&[2], Some(1), 2..4)]);
        assert_eq!(r.on_replayed(1, &one).len(), 1);
        assert_eq!(r.on_replayed(2, &two).len(), 1, "replay covers 2 too");
        assert!(r.after_replay(2, &two).is_empty(), "already applied");
        // The live copy of 2 may still be queued... no: after_replay had it.
        // A later duplicate from the live socket is skipped, then 3 flows.
        assert_eq!(r.on_live(2, &two), Live::Publish(vec![]));
        assert!(matches!(r.on_live(3, &batch(vec![])), Live::Publish(_)));
        let s = r.stats();
        assert_eq!(
            (s.replays, s.replayed, s.lost, s.duplicates, s.restarts),
            (1, 2, 0, 2, 0)
        );
        assert_eq!(s.unhashable_blocks, 0, "the chain stayed intact");
    }

    #[test]
    fn an_unrecoverable_gap_clears_and_a_restart_starts_over() {
        let mut r = RankRelay::new(100);
        r.on_live(0, &batch(vec![stored(&[1], None, 0..2)]));
        assert_eq!(r.on_live(5, &batch(vec![])), Live::Replay { from: 1 });
        // The engine's buffer only had 4 onwards.
        assert!(r.on_replayed(4, &batch(vec![])).is_empty());
        assert_eq!(r.after_replay(5, &batch(vec![])), vec![KvEvent::Cleared]);
        assert_eq!(r.stats().lost, 4);
        assert_eq!(r.tracked(), 0);
        // Sequence back to 0: a new engine.
        let Live::Publish(ev) = r.on_live(0, &batch(vec![stored(&[7], None, 0..2)])) else {
            panic!()
        };
        assert_eq!(ev[0], KvEvent::Cleared);
        assert_eq!(ev.len(), 2);
        assert_eq!(r.stats().restarts, 1);
    }

    #[test]
    fn joining_a_running_engine_catches_up_from_its_replay_buffer() {
        let mut r = RankRelay::new(100);
        let five = batch(vec![stored(&[6], Some(5), 2..4)]);
        assert_eq!(r.on_live(5, &five), Live::Replay { from: 0 });
        // The buffer starts at 4.
        assert_eq!(
            r.on_replayed(4, &batch(vec![stored(&[5], None, 0..2)]))
                .len(),
            1
        );
        assert_eq!(r.on_replayed(5, &five).len(), 1);
        assert!(r.after_replay(5, &five).is_empty());
        let s = r.stats();
        assert_eq!((s.lost, s.clears, s.unhashable_blocks), (0, 0, 0));
        // Nothing buffered at all: the live message is the start.
        let mut r = RankRelay::new(100);
        assert_eq!(r.on_live(9, &five), Live::Replay { from: 0 });
        assert!(r.after_replay(9, &five).is_empty(), "its parent is unknown");
        assert_eq!(r.stats().lost, 0);
        assert_eq!(r.stats().unhashable_blocks, 1);
    }

    #[test]
    fn bad_payloads_and_unknown_parents_are_counted_not_fatal() {
        let mut r = RankRelay::new(2);
        assert_eq!(r.on_live(0, b"\xc1garbage"), Live::Publish(vec![]));
        assert_eq!(r.stats().decode_errors, 1);
        assert!(r.take_error().unwrap().contains("batch 0"));
        assert_eq!(
            r.on_live(1, &batch(vec![stored(&[5], Some(4), 0..2)])),
            Live::Publish(vec![])
        );
        assert_eq!(r.stats().unhashable_blocks, 1);
        // Tokens that do not fill the blocks.
        r.on_live(2, &batch(vec![stored(&[6, 7], None, 0..3)]));
        assert_eq!(r.stats().unhashable_blocks, 3);
        // The cap: three blocks tracked at most two.
        r.on_live(3, &batch(vec![stored(&[8, 9, 10], None, 0..6)]));
        assert_eq!(r.tracked(), 2);
        assert_eq!(r.stats().evicted_mappings, 1);
    }
}
