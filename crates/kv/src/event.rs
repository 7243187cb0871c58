//! The messages workers and routers exchange about KV caches and load, as
//! they travel on the event plane (MessagePack maps, field names as below;
//! `docs/wire-format.md` §9 is the normative description).
//!
//! Every message carries [`EVENT_VERSION`]. A reader accepts any message
//! whose version it knows, ignores fields it does not know (so producers can
//! add optional fields without a version change) and rejects, with a counted
//! error, a version it does not know: a silent misreading of a changed format
//! is the failure users of the reference complain about most.

use serde::{Deserialize, Serialize};

use crate::hash::{BlockHash, SeqHash};

/// Version of the message formats in this module.
pub const EVENT_VERSION: u16 = 1;

/// Topic of [`KvEventBatch`] messages.
pub const KV_EVENTS_TOPIC: &str = "kv-events";
/// Topic of [`LoadMetrics`] messages.
pub const LOAD_METRICS_TOPIC: &str = "load-metrics";
/// Topic of [`ActiveSequenceEvent`] messages.
pub const ACTIVE_SEQUENCES_TOPIC: &str = "active-sequences";

/// One KV cache: a worker, and a data-parallel rank within it. Each rank has
/// its own cache, so the index tracks ranks separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerKey {
    /// The worker's id (unique in the fleet; a restarted worker may reuse it).
    pub worker_id: u64,
    /// Data-parallel rank within the worker (0 without data parallelism).
    #[serde(default)]
    pub dp_rank: u32,
}

impl WorkerKey {
    /// Rank 0 of `worker_id`.
    pub fn new(worker_id: u64) -> Self {
        WorkerKey {
            worker_id,
            dp_rank: 0,
        }
    }
}

impl std::fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}/{}", self.worker_id, self.dp_rank)
    }
}

/// A change to one KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvEvent {
    /// Blocks became cached, in prefix order: `blocks[0]` follows the block
    /// whose sequence hash is `parent`, and each next block follows the one
    /// before it.
    Stored {
        /// Sequence hash of the block before `blocks[0]`; `None` when
        /// `blocks[0]` starts a sequence.
        parent: Option<SeqHash>,
        /// Position of `blocks[0]` in its sequence (0 for the first block),
        /// when the producer knows it; informational.
        #[serde(default)]
        position: Option<u32>,
        /// The blocks, each as `[local, seq]`.
        blocks: Vec<BlockHash>,
    },
    /// Blocks were evicted (sequence hashes). Removing a block does not
    /// remove its descendants: each has its own event.
    Removed {
        /// Sequence hashes of the evicted blocks.
        blocks: Vec<SeqHash>,
    },
    /// The whole cache was dropped (engine reset, or a relay starting over).
    Cleared,
}

/// What a worker publishes on [`KV_EVENTS_TOPIC`]: one or more changes to
/// one rank's cache, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventBatch {
    /// [`EVENT_VERSION`].
    pub version: u16,
    /// The worker whose cache changed.
    pub worker_id: u64,
    /// Its data-parallel rank (0 without data parallelism).
    #[serde(default)]
    pub dp_rank: u32,
    /// The events, oldest first.
    pub events: Vec<KvEvent>,
}

impl KvEventBatch {
    /// Splits the batch in two halves that, applied in order, mean exactly
    /// what it meant: by events, or, for a single `Stored` event, by blocks
    /// (the second part's parent is the first part's last block, its
    /// position advanced). `None` when it cannot be split further (one event
    /// of at most one block). Publishers use it to fit a transport's message
    /// size limit.
    pub fn split(self) -> Option<(KvEventBatch, KvEventBatch)> {
        let KvEventBatch {
            version,
            worker_id,
            dp_rank,
            mut events,
        } = self;
        let half = |events| KvEventBatch {
            version,
            worker_id,
            dp_rank,
            events,
        };
        if events.len() >= 2 {
            let tail = events.split_off(events.len() / 2);
            return Some((half(events), half(tail)));
        }
        match events.pop()? {
            KvEvent::Stored {
                parent,
                position,
                mut blocks,
            } if blocks.len() >= 2 => {
                let tail = blocks.split_off(blocks.len() / 2);
                let first_len = blocks.len() as u32;
                let tail_parent = blocks.last().map(|b| b.seq);
                Some((
                    half(vec![KvEvent::Stored {
                        parent,
                        position,
                        blocks,
                    }]),
                    half(vec![KvEvent::Stored {
                        parent: tail_parent,
                        position: position.map(|p| p + first_len),
                        blocks: tail,
                    }]),
                ))
            }
            KvEvent::Removed { mut blocks } if blocks.len() >= 2 => {
                let tail = blocks.split_off(blocks.len() / 2);
                Some((
                    half(vec![KvEvent::Removed { blocks }]),
                    half(vec![KvEvent::Removed { blocks: tail }]),
                ))
            }
            _ => None,
        }
    }
}

/// How loaded one rank is, published on [`LOAD_METRICS_TOPIC`] when it
/// changes (debounced) and periodically, so that silence is never read as
/// idleness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadMetrics {
    /// [`EVENT_VERSION`].
    pub version: u16,
    /// The worker measured.
    pub worker_id: u64,
    /// Its data-parallel rank.
    #[serde(default)]
    pub dp_rank: u32,
    /// KV blocks in use (referenced by running requests).
    pub kv_blocks_used: u64,
    /// KV blocks in the pool.
    pub kv_blocks_total: u64,
    /// Requests being processed (prefill or decode).
    pub active_requests: u32,
    /// Requests queued, not yet scheduled.
    pub waiting_requests: u32,
    /// Prompt tokens of scheduled requests not yet prefilled.
    #[serde(default)]
    pub active_prefill_tokens: u64,
}

/// A router's booking of a request on a worker, shared between router
/// replicas on [`ACTIVE_SEQUENCES_TOPIC`] so they agree on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSequenceEvent {
    /// [`EVENT_VERSION`].
    pub version: u16,
    /// The router replica that routed the request.
    pub router_id: u64,
    /// The request, unique per router replica.
    pub request_id: String,
    /// The worker it was routed to.
    pub worker_id: u64,
    /// Its data-parallel rank.
    #[serde(default)]
    pub dp_rank: u32,
    /// What happened to it.
    pub change: ActiveSequenceChange,
}

/// The life of a routed request, as far as load is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveSequenceChange {
    /// The request was routed to the worker.
    Added {
        /// Sequence hashes of the prompt's full blocks.
        blocks: Vec<SeqHash>,
        /// Prompt length in tokens.
        prompt_tokens: u32,
        /// Of which the router expected this many to be cached already.
        cached_tokens: u32,
    },
    /// The first output token arrived: the prompt is in the cache now.
    PrefillCompleted,
    /// The request ended (finished, failed or cancelled).
    Freed,
}

macro_rules! worker_of {
    ($($t:ty),*) => {$(
        impl $t {
            /// The cache this message is about.
            pub fn worker(&self) -> WorkerKey {
                WorkerKey {
                    worker_id: self.worker_id,
                    dp_rank: self.dp_rank,
                }
            }
        }
    )*};
}
worker_of!(KvEventBatch, LoadMetrics, ActiveSequenceEvent);

/// A message whose version this build does not understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message version {found} is not supported (this build reads version {EVENT_VERSION})")]
pub struct UnsupportedVersion {
    /// The version the message carried.
    pub found: u16,
}

/// Accepts the versions this build reads.
pub fn check_version(found: u16) -> Result<(), UnsupportedVersion> {
    if found == EVENT_VERSION {
        Ok(())
    } else {
        Err(UnsupportedVersion { found })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn split_halves_mean_what_the_batch_meant() {
        use crate::hash::block_hashes;
        let tokens: Vec<u32> = (0..16 * 5).collect();
        let blocks = block_hashes(&tokens, 16, None);
        let batch = KvEventBatch {
            version: EVENT_VERSION,
            worker_id: 3,
            dp_rank: 1,
            events: vec![KvEvent::Stored {
                parent: None,
                position: Some(0),
                blocks: blocks.clone(),
            }],
        };
        let (a, b) = batch.split().unwrap();
        assert_eq!((a.worker_id, b.dp_rank), (3, 1));
        let KvEvent::Stored { blocks: first, .. } = &a.events[0] else {
            panic!("{a:?}")
        };
        assert_eq!(
            b.events[0],
            KvEvent::Stored {
                parent: Some(first.last().unwrap().seq),
                position: Some(first.len() as u32),
                blocks: blocks[first.len()..].to_vec(),
            }
        );
        // Events split by count; a single block or a Cleared cannot be split.
        let two = KvEventBatch {
            events: vec![
                KvEvent::Cleared,
                KvEvent::Removed {
                    blocks: vec![blocks[0].seq],
                },
            ],
            ..a.clone()
        };
        let (x, y) = two.split().unwrap();
        assert_eq!((x.events.len(), y.events.len()), (1, 1));
        assert!(x.split().is_none());
        assert!(y.split().is_none());
    }
    use super::*;
    use crate::hash::LocalHash;

    #[test]
    fn kv_batch_round_trips_and_reads_as_a_named_map() {
        let batch = KvEventBatch {
            version: EVENT_VERSION,
            worker_id: 7,
            dp_rank: 1,
            events: vec![
                KvEvent::Stored {
                    parent: None,
                    position: Some(0),
                    blocks: vec![BlockHash {
                        local: LocalHash(u64::MAX),
                        seq: SeqHash(u64::MAX),
                    }],
                },
                KvEvent::Removed {
                    blocks: vec![SeqHash(3)],
                },
                KvEvent::Cleared,
            ],
        };
        let bytes = rmp_serde::to_vec_named(&batch).unwrap();
        let back: KvEventBatch = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, batch);
        // Field names travel, so other languages can read by name.
        let text = String::from_utf8_lossy(&bytes);
        for field in [
            "version",
            "worker_id",
            "dp_rank",
            "events",
            "stored",
            "cleared",
        ] {
            assert!(text.contains(field), "{field} missing from the encoding");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_optional_ones_may_be_missing() {
        #[derive(Serialize)]
        struct Newer {
            version: u16,
            worker_id: u64,
            kv_blocks_used: u64,
            kv_blocks_total: u64,
            active_requests: u32,
            waiting_requests: u32,
            future_field: &'static str,
        }
        let bytes = rmp_serde::to_vec_named(&Newer {
            version: 1,
            worker_id: 9,
            kv_blocks_used: 5,
            kv_blocks_total: 10,
            active_requests: 2,
            waiting_requests: 0,
            future_field: "x",
        })
        .unwrap();
        let m: LoadMetrics = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(m.worker(), WorkerKey::new(9));
        assert_eq!(m.active_prefill_tokens, 0);
    }

    /// The worked example of docs/wire-format.md §9.6, byte for byte.
    #[test]
    fn documented_example_encodes_exactly() {
        let batch = KvEventBatch {
            version: 1,
            worker_id: 7,
            dp_rank: 0,
            events: vec![
                KvEvent::Stored {
                    parent: Some(SeqHash(9)),
                    position: Some(3),
                    blocks: vec![BlockHash {
                        local: LocalHash(1),
                        seq: SeqHash(2),
                    }],
                },
                KvEvent::Removed {
                    blocks: vec![SeqHash(5)],
                },
                KvEvent::Cleared,
            ],
        };
        let documented = "84 a7 76 65 72 73 69 6f 6e 01 a9 77 6f 72 6b 65 72 5f 69 64 07 \
            a7 64 70 5f 72 61 6e 6b 00 a6 65 76 65 6e 74 73 93 \
            81 a6 73 74 6f 72 65 64 83 a6 70 61 72 65 6e 74 09 \
            a8 70 6f 73 69 74 69 6f 6e 03 a6 62 6c 6f 63 6b 73 91 92 01 02 \
            81 a7 72 65 6d 6f 76 65 64 81 a6 62 6c 6f 63 6b 73 91 05 \
            a7 63 6c 65 61 72 65 64";
        let expected: Vec<u8> = documented
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        assert_eq!(rmp_serde::to_vec_named(&batch).unwrap(), expected);
        assert_eq!(
            rmp_serde::from_slice::<KvEventBatch>(&expected).unwrap(),
            batch
        );
    }

    #[test]
    fn unknown_versions_are_rejected() {
        assert!(check_version(EVENT_VERSION).is_ok());
        assert_eq!(check_version(2), Err(UnsupportedVersion { found: 2 }));
    }
}
