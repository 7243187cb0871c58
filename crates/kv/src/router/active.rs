//! Active-sequence tracking: the load a router has put on each worker, from
//! its own bookings (and, with replica sync, its peers'), fresher than any
//! worker's load report.
//!
//! A request is booked when routed (`add`), its prefill ends at its first
//! token (`prefill_completed`), and it is released at the end, however it
//! ends (`free`). Per worker this gives the requests in flight, the prompt
//! tokens still to prefill, and the distinct KV blocks those requests hold
//! (a prefix shared by several requests counts once, as in the cache).
//!
//! A booking whose end was lost (a crashed peer, a lost message) would be
//! phantom load forever; every booking therefore expires `ttl` after its
//! last update (time is an argument), and expiries are counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::event::WorkerKey;
use crate::hash::SeqHash;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A request, unique across router replicas.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// The router replica that routed it.
    pub router_id: u64,
    /// Its id within that replica.
    pub request_id: String,
}

#[derive(Debug, Clone)]
struct Booking {
    worker: WorkerKey,
    blocks: Vec<SeqHash>,
    /// Prompt tokens to prefill (not cached), until prefill completes.
    prefill_tokens: u64,
    updated: Instant,
}

/// A worker's booked load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActiveLoad {
    /// Requests in flight.
    pub requests: u32,
    /// Prompt tokens still to prefill.
    pub prefill_tokens: u64,
    /// Distinct KV blocks held by those requests.
    pub blocks: u64,
}

#[derive(Debug, Default)]
struct WorkerState {
    requests: u32,
    prefill_tokens: u64,
    /// Block → requests holding it.
    blocks: FastMap<SeqHash, u32>,
}

/// The bookings. See the module docs.
#[derive(Debug)]
pub struct ActiveSequences {
    ttl: Duration,
    bookings: FastMap<RequestKey, Booking>,
    workers: FastMap<WorkerKey, WorkerState>,
    expired: u64,
}

impl ActiveSequences {
    /// Bookings expire `ttl` after their last update.
    pub fn new(ttl: Duration) -> Self {
        ActiveSequences {
            ttl,
            bookings: FastMap::default(),
            workers: FastMap::default(),
            expired: 0,
        }
    }

    /// Books a request on `worker`: its prompt's `blocks`, of which
    /// `prefill_tokens` tokens are not cached. Re-adding a key replaces it.
    pub fn add(
        &mut self,
        key: RequestKey,
        worker: WorkerKey,
        blocks: Vec<SeqHash>,
        prefill_tokens: u64,
        now: Instant,
    ) {
        self.free(&key);
        let w = self.workers.entry(worker).or_default();
        w.requests += 1;
        w.prefill_tokens += prefill_tokens;
        for b in &blocks {
            *w.blocks.entry(*b).or_default() += 1;
        }
        self.bookings.insert(
            key,
            Booking {
                worker,
                blocks,
                prefill_tokens,
                updated: now,
            },
        );
    }

    /// The request produced its first token: its prompt is prefilled.
    pub fn prefill_completed(&mut self, key: &RequestKey, now: Instant) -> bool {
        let Some(b) = self.bookings.get_mut(key) else {
            return false;
        };
        if let Some(w) = self.workers.get_mut(&b.worker) {
            w.prefill_tokens -= b.prefill_tokens;
        }
        b.prefill_tokens = 0;
        b.updated = now;
        true
    }

    /// The request ended. Returns whether it was booked.
    pub fn free(&mut self, key: &RequestKey) -> bool {
        let Some(b) = self.bookings.remove(key) else {
            return false;
        };
        self.release(&b);
        true
    }

    /// Drops bookings not updated for the TTL; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        let stale: Vec<RequestKey> = self
            .bookings
            .iter()
            .filter(|(_, b)| now.saturating_duration_since(b.updated) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.free(k);
        }
        self.expired += stale.len() as u64;
        stale.len()
    }

    /// Forgets every booking on `worker` (it left the fleet).
    pub fn remove_worker(&mut self, worker: WorkerKey) {
        self.bookings.retain(|_, b| b.worker != worker);
        self.workers.remove(&worker);
    }

    /// Forgets every booking of router replica `router_id` (it restarted or
    /// is gone; its live bookings will be re-announced if it is alive).
    pub fn remove_router(&mut self, router_id: u64) {
        let gone: Vec<RequestKey> = self
            .bookings
            .keys()
            .filter(|k| k.router_id == router_id)
            .cloned()
            .collect();
        for k in &gone {
            self.free(k);
        }
    }

    /// `worker`'s booked load.
    pub fn load(&self, worker: WorkerKey) -> ActiveLoad {
        self.workers
            .get(&worker)
            .map_or_else(ActiveLoad::default, |w| ActiveLoad {
                requests: w.requests,
                prefill_tokens: w.prefill_tokens,
                blocks: w.blocks.len() as u64,
            })
    }

    /// Requests booked, over all workers.
    pub fn len(&self) -> usize {
        self.bookings.len()
    }

    /// Whether nothing is booked.
    pub fn is_empty(&self) -> bool {
        self.bookings.is_empty()
    }

    /// Bookings dropped by expiry so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    fn release(&mut self, b: &Booking) {
        let Some(w) = self.workers.get_mut(&b.worker) else {
            return;
        };
        w.requests -= 1;
        w.prefill_tokens -= b.prefill_tokens;
        for block in &b.blocks {
            if let Some(n) = w.blocks.get_mut(block) {
                *n -= 1;
                if *n == 0 {
                    w.blocks.remove(block);
                }
            }
        }
        if w.requests == 0 {
            self.workers.remove(&b.worker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(r: u64, id: &str) -> RequestKey {
        RequestKey {
            router_id: r,
            request_id: id.into(),
        }
    }

    #[test]
    fn shared_blocks_count_once_and_everything_returns_to_zero() {
        let mut a = ActiveSequences::new(Duration::from_secs(60));
        let w = WorkerKey::new(1);
        let t = Instant::now();
        a.add(key(1, "a"), w, vec![SeqHash(1), SeqHash(2)], 30, t);
        a.add(key(1, "b"), w, vec![SeqHash(1), SeqHash(3)], 10, t);
        assert_eq!(
            a.load(w),
            ActiveLoad {
                requests: 2,
                prefill_tokens: 40,
                blocks: 3
            }
        );
        assert!(a.prefill_completed(&key(1, "a"), t));
        assert_eq!(a.load(w).prefill_tokens, 10);
        assert!(a.free(&key(1, "a")));
        assert!(!a.free(&key(1, "a")), "freed once");
        assert_eq!(a.load(w).blocks, 2);
        a.free(&key(1, "b"));
        assert_eq!(a.load(w), ActiveLoad::default());
        assert!(a.is_empty());
    }

    #[test]
    fn lost_endings_expire_and_departed_routers_are_forgotten() {
        let mut a = ActiveSequences::new(Duration::from_secs(10));
        let w = WorkerKey::new(1);
        let t = Instant::now();
        a.add(key(1, "old"), w, vec![SeqHash(1)], 5, t);
        a.add(
            key(2, "peer"),
            w,
            vec![SeqHash(2)],
            5,
            t + Duration::from_secs(5),
        );
        a.prefill_completed(&key(2, "peer"), t + Duration::from_secs(9));
        assert_eq!(
            a.expire(t + Duration::from_secs(10)),
            1,
            "only the stale one"
        );
        assert_eq!(a.load(w).requests, 1);
        a.remove_router(2);
        assert!(a.is_empty());
        assert_eq!(a.expired(), 1);
    }
}
