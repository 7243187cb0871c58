//! The router's state: the workers discovery knows, what they cache (the
//! prefix index fed by KV events, or the approximate index fed by our own
//! decisions), their reported load and the load we booked on them; and the
//! choice of a worker per request. No sockets here: the tasks in `run.rs`
//! feed it, and time is an argument.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use eventplane_kv::event::{ActiveSequenceChange, ActiveSequenceEvent, LoadMetrics, EVENT_VERSION};
use eventplane_kv::router::{choose, ActiveSequences, Candidate, RequestKey, Weights};
use eventplane_kv::{
    block_hashes, ApproxConfig, ApproxIndex, IndexReader, Matches, SeqHash, WorkerKey,
};
use eventplane_worker::mock::WorkerAdvert;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How workers are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By cost: cached prefix against load (see `eventplane_kv::router::select`).
    Kv,
    /// In turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// Where KV-mode lookups come from.
pub enum CacheView {
    /// The prefix index fed by the workers' KV events.
    Events(IndexReader),
    /// `--no-kv-events`: predicted from our own decisions.
    Approx(Box<ApproxIndex>),
}

/// Fills `matches` with what `view` says of the blocks `seqs`.
fn look_up(view: &mut CacheView, seqs: &[SeqHash], now: Instant, matches: &mut Matches) {
    match view {
        CacheView::Events(reader) => reader.lookup(seqs.iter().copied(), matches),
        CacheView::Approx(a) => a.lookup(seqs.iter().copied(), now, matches),
    }
}

/// Settings of the router.
#[derive(Debug, Clone, Copy)]
pub struct RouterSettings {
    /// How to choose.
    pub mode: Mode,
    /// Cost weights and temperature.
    pub weights: Weights,
    /// Tokens per block for hashing prompts (`None`: the workers' own, from
    /// their registrations).
    pub block_size: Option<u32>,
    /// This replica's id (in bookings shared with other replicas).
    pub router_id: u64,
    /// Bookings whose end was lost expire after this.
    pub booking_ttl: Duration,
}

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Its booking (free it when the request ends).
    pub key: RequestKey,
    /// The chosen worker.
    pub worker: WorkerKey,
    /// Its API.
    pub url: String,
    /// Leading blocks it was expected to have cached.
    pub cached_blocks: u32,
    /// Full blocks of the prompt.
    pub blocks: u32,
    /// The prompt's block hashes (for bookings shared with replicas).
    pub seqs: Vec<SeqHash>,
}

/// Counters of routing decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Requests routed.
    pub routed: u64,
    /// Requests with no worker to go to.
    pub no_worker: u64,
    /// Blocks the chosen workers were expected to have cached.
    pub expected_cached_blocks: u64,
    /// Full blocks of all routed prompts.
    pub prompt_blocks: u64,
}

/// The router. See the module docs.
pub struct Router {
    settings: RouterSettings,
    workers: BTreeMap<u64, WorkerAdvert>,
    view: CacheView,
    active: ActiveSequences,
    loads: HashMap<WorkerKey, LoadMetrics>,
    matches: Matches,
    next_turn: usize,
    next_request: u64,
    rng: StdRng,
    stats: RouterStats,
    /// With replica sync: our bookings' changes, for peers (drained by
    /// [`Router::take_outbox`]).
    outbox: Option<Vec<ActiveSequenceEvent>>,
    /// Our live bookings, for periodic re-announcement to peers.
    ours: HashMap<RequestKey, OwnBooking>,
}

/// What we re-announce of one of our bookings.
#[derive(Debug, Clone)]
struct OwnBooking {
    worker: WorkerKey,
    blocks: Vec<SeqHash>,
    prompt_tokens: u32,
    cached_tokens: u32,
    prefilled: bool,
}

impl Router {
    /// A router with no workers yet.
    pub fn new(settings: RouterSettings, view: CacheView) -> Self {
        Router {
            settings,
            workers: BTreeMap::new(),
            view,
            active: ActiveSequences::new(settings.booking_ttl),
            loads: HashMap::new(),
            matches: Matches::new(),
            next_turn: 0,
            next_request: 0,
            rng: StdRng::from_os_rng(),
            stats: RouterStats::default(),
            outbox: None,
            ours: HashMap::new(),
        }
    }

    /// Share bookings with router replicas: from now on, changes to our
    /// bookings are queued for [`Router::take_outbox`].
    pub fn enable_replica_sync(&mut self) {
        self.outbox.get_or_insert_with(Vec::new);
    }

    /// Our booking changes since the last call, to publish to peers.
    pub fn take_outbox(&mut self) -> Vec<ActiveSequenceEvent> {
        self.outbox.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Every live booking of ours, as events a peer that starts late (or
    /// missed some) can rebuild them from; queued in the outbox.
    pub fn reannounce(&mut self) {
        if self.outbox.is_none() {
            return;
        }
        let mut events = Vec::new();
        for (key, b) in &self.ours {
            events.push(self.event(key, b.worker, added(b)));
            if b.prefilled {
                events.push(self.event(key, b.worker, ActiveSequenceChange::PrefillCompleted));
            }
        }
        if let Some(o) = &mut self.outbox {
            o.extend(events);
        }
    }

    /// A peer replica's booking change. Our own echoes are ignored.
    pub fn apply_peer(&mut self, e: &ActiveSequenceEvent, now: Instant) {
        if e.router_id == self.settings.router_id {
            return;
        }
        let key = RequestKey {
            router_id: e.router_id,
            request_id: e.request_id.clone(),
        };
        match &e.change {
            ActiveSequenceChange::Added {
                blocks,
                prompt_tokens,
                cached_tokens,
            } => {
                let prefill = u64::from(prompt_tokens.saturating_sub(*cached_tokens));
                self.active
                    .add(key, e.worker(), blocks.clone(), prefill, now);
            }
            ActiveSequenceChange::PrefillCompleted => {
                self.active.prefill_completed(&key, now);
            }
            ActiveSequenceChange::Freed => {
                self.active.free(&key);
            }
        }
    }

    /// A peer replica is gone or restarted: drop its bookings (a live one
    /// re-announces what it still has).
    pub fn forget_peer(&mut self, router_id: u64) {
        if router_id != self.settings.router_id {
            self.active.remove_router(router_id);
        }
    }

    fn event(
        &self,
        key: &RequestKey,
        worker: WorkerKey,
        change: ActiveSequenceChange,
    ) -> ActiveSequenceEvent {
        ActiveSequenceEvent {
            version: EVENT_VERSION,
            router_id: self.settings.router_id,
            request_id: key.request_id.clone(),
            worker_id: worker.worker_id,
            dp_rank: worker.dp_rank,
            change,
        }
    }

    fn emit(&mut self, key: &RequestKey, worker: WorkerKey, change: ActiveSequenceChange) {
        if self.outbox.is_some() {
            let e = self.event(key, worker, change);
            if let Some(o) = &mut self.outbox {
                o.push(e);
            }
        }
    }

    /// A worker appeared (or changed) in discovery.
    pub fn add_worker(&mut self, advert: WorkerAdvert) {
        self.workers.insert(advert.worker_id, advert);
    }

    /// A worker left discovery: it gets no more traffic, and what we knew
    /// of it is dropped. Returns its ranks (to purge from the prefix index).
    pub fn remove_worker(&mut self, worker_id: u64) -> Vec<WorkerKey> {
        let Some(advert) = self.workers.remove(&worker_id) else {
            return Vec::new();
        };
        let ranks: Vec<WorkerKey> = (0..advert.data_parallel_size.max(1))
            .map(|r| WorkerKey {
                worker_id,
                dp_rank: r,
            })
            .collect();
        for &w in &ranks {
            self.active.remove_worker(w);
            self.loads.remove(&w);
            if let CacheView::Approx(a) = &mut self.view {
                a.remove_worker(w);
            }
        }
        ranks
    }

    /// The workers known, by id.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerAdvert> {
        self.workers.values()
    }

    /// A worker's load report (kept for operators and future policies;
    /// the cost uses bookings, see [`Router::route`]).
    pub fn update_load(&mut self, m: LoadMetrics) {
        self.loads.insert(m.worker(), m);
    }

    /// The latest load report of a worker rank.
    pub fn reported_load(&self, worker: WorkerKey) -> Option<&LoadMetrics> {
        self.loads.get(&worker)
    }

    /// Tokens per block used to hash prompts.
    pub fn block_size(&self) -> u32 {
        self.settings
            .block_size
            .or_else(|| self.workers.values().next().map(|w| w.block_size))
            .unwrap_or(16)
            .max(1)
    }

    /// How many leading blocks of a prompt of `tokens` each worker rank
    /// holds, as this router knows it (its KV index, or with
    /// `--no-kv-events` its prediction), sorted by worker; ranks holding
    /// none are left out. Routes and books nothing: for operators and tests
    /// asking what the router would see.
    pub fn cached_prefix(&mut self, tokens: &[u32], now: Instant) -> Vec<(WorkerKey, u32)> {
        let bs = self.block_size() as usize;
        let seqs: Vec<SeqHash> = block_hashes(tokens, bs, None)
            .into_iter()
            .map(|b| b.seq)
            .collect();
        look_up(&mut self.view, &seqs, now, &mut self.matches);
        let mut found: Vec<(WorkerKey, u32)> =
            self.matches.iter().filter(|(_, n)| *n > 0).collect();
        found.sort_by_key(|(w, _)| (w.worker_id, w.dp_rank));
        found
    }

    /// Chooses a worker for a prompt of `tokens` and books the request on
    /// it; `None` when no worker is known.
    pub fn route(&mut self, tokens: &[u32], now: Instant) -> Option<Routed> {
        if self.workers.is_empty() {
            self.stats.no_worker += 1;
            return None;
        }
        let bs = self.block_size();
        let seqs: Vec<SeqHash> = block_hashes(tokens, bs as usize, None)
            .into_iter()
            .map(|b| b.seq)
            .collect();
        let ranks: Vec<(WorkerKey, &WorkerAdvert)> = self
            .workers
            .values()
            .flat_map(|a| {
                (0..a.data_parallel_size.max(1)).map(move |r| {
                    (
                        WorkerKey {
                            worker_id: a.worker_id,
                            dp_rank: r,
                        },
                        a,
                    )
                })
            })
            .collect();
        let (worker, cached_blocks) = match self.settings.mode {
            Mode::RoundRobin => {
                let w = ranks[self.next_turn % ranks.len()].0;
                self.next_turn = self.next_turn.wrapping_add(1);
                (w, 0)
            }
            Mode::Random => (ranks[self.rng.random_range(0..ranks.len())].0, 0),
            Mode::Kv => {
                look_up(&mut self.view, &seqs, now, &mut self.matches);
                // Load is what this router booked (and, with replica sync,
                // its peers). Workers' own reports are kept (`loads`) but
                // not used here: they lag by their debounce and count our
                // bookings again, and stale-high reports pushed a
                // conversation's next turn away from the worker that had just
                // cached its prefix (the demo's hit rate on 3,000 requests
                // went from 28.2% to 21–22% with them).
                let candidates: Vec<Candidate> = ranks
                    .iter()
                    .map(|(w, _)| {
                        let booked = self.active.load(*w);
                        Candidate {
                            worker: *w,
                            cached_blocks: self.matches.get(*w),
                            active_blocks: booked.blocks,
                            prefill_tokens: booked.prefill_tokens,
                        }
                    })
                    .collect();
                let choice = choose(
                    &candidates,
                    tokens.len() as u64,
                    u64::from(bs),
                    &self.settings.weights,
                    &mut self.rng,
                )?;
                (choice.worker, choice.cached_blocks)
            }
        };
        let url = self.workers[&worker.worker_id].url.clone();
        let key = RequestKey {
            router_id: self.settings.router_id,
            request_id: self.next_request.to_string(),
        };
        self.next_request += 1;
        let uncached =
            (tokens.len() as u64).saturating_sub(u64::from(cached_blocks) * u64::from(bs));
        self.active
            .add(key.clone(), worker, seqs.clone(), uncached, now);
        if self.outbox.is_some() {
            let own = OwnBooking {
                worker,
                blocks: seqs.clone(),
                prompt_tokens: tokens.len() as u32,
                cached_tokens: (tokens.len() as u64 - uncached) as u32,
                prefilled: false,
            };
            self.emit(&key, worker, added(&own));
            self.ours.insert(key.clone(), own);
        }
        if let CacheView::Approx(a) = &mut self.view {
            a.record_routing(worker, &seqs, now);
        }
        self.stats.routed += 1;
        self.stats.expected_cached_blocks += u64::from(cached_blocks);
        self.stats.prompt_blocks += seqs.len() as u64;
        Some(Routed {
            key,
            worker,
            url,
            cached_blocks,
            blocks: seqs.len() as u32,
            seqs,
        })
    }

    /// The request's first token arrived.
    pub fn prefill_completed(&mut self, key: &RequestKey, now: Instant) {
        self.active.prefill_completed(key, now);
        if let Some(b) = self.ours.get_mut(key) {
            b.prefilled = true;
            let worker = b.worker;
            self.emit(key, worker, ActiveSequenceChange::PrefillCompleted);
        }
    }

    /// The request ended (finished, failed, or its client left).
    pub fn free(&mut self, key: &RequestKey) {
        self.active.free(key);
        if let Some(b) = self.ours.remove(key) {
            self.emit(key, b.worker, ActiveSequenceChange::Freed);
        }
    }

    /// Drops bookings whose end was lost; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.active.expire(now)
    }

    /// Booked load of a worker rank.
    pub fn booked(&self, worker: WorkerKey) -> eventplane_kv::router::ActiveLoad {
        self.active.load(worker)
    }

    /// The counters.
    pub fn stats(&self) -> RouterStats {
        self.stats
    }

    /// The settings.
    pub fn settings(&self) -> &RouterSettings {
        &self.settings
    }
}

fn added(b: &OwnBooking) -> ActiveSequenceChange {
    ActiveSequenceChange::Added {
        blocks: b.blocks.clone(),
        prompt_tokens: b.prompt_tokens,
        cached_tokens: b.cached_tokens,
    }
}

/// An approximate-index view with the default limits.
pub fn approx_view() -> CacheView {
    CacheView::Approx(Box::new(ApproxIndex::new(ApproxConfig::default())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_kv::PrefixIndex;

    fn advert(id: u64) -> WorkerAdvert {
        WorkerAdvert {
            worker_id: id,
            url: format!("http://w{id}"),
            model: "m".into(),
            block_size: 4,
            kv_blocks_total: 100,
            data_parallel_size: 1,
            pid: 0,
        }
    }

    fn settings(mode: Mode) -> RouterSettings {
        RouterSettings {
            mode,
            weights: Weights::default(),
            block_size: None,
            router_id: 1,
            booking_ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn kv_mode_follows_the_cache_and_forgets_departed_workers() {
        let mut index = PrefixIndex::new();
        let mut r = Router::new(settings(Mode::Kv), CacheView::Events(index.reader()));
        r.add_worker(advert(1));
        r.add_worker(advert(2));
        let prompt: Vec<u32> = (0..16).collect();
        index.store(WorkerKey::new(2), None, &block_hashes(&prompt, 4, None));
        let now = Instant::now();
        let routed = r.route(&prompt, now).unwrap();
        assert_eq!(
            (routed.worker, routed.cached_blocks, routed.url.as_str()),
            (WorkerKey::new(2), 4, "http://w2")
        );
        assert_eq!(r.booked(WorkerKey::new(2)).requests, 1);
        r.free(&routed.key);
        assert_eq!(r.booked(WorkerKey::new(2)).requests, 0);
        assert_eq!(r.remove_worker(2), vec![WorkerKey::new(2)]);
        assert_eq!(r.route(&prompt, now).unwrap().worker, WorkerKey::new(1));
        r.remove_worker(1);
        assert!(r.route(&prompt, now).is_none());
        assert_eq!(r.stats().no_worker, 1);
    }

    #[test]
    fn without_events_the_router_predicts_from_its_own_decisions() {
        let mut r = Router::new(settings(Mode::Kv), approx_view());
        for id in 1..=3 {
            r.add_worker(advert(id));
        }
        let prompt: Vec<u32> = (0..32).collect();
        let now = Instant::now();
        let first = r.route(&prompt, now).unwrap();
        r.free(&first.key);
        let again = r.route(&prompt, now).unwrap();
        assert_eq!(again.worker, first.worker, "sent where it was sent before");
        assert_eq!(again.cached_blocks, 8);
    }

    #[test]
    fn replicas_share_bookings_and_late_ones_converge() {
        let mut a = Router::new(settings(Mode::RoundRobin), approx_view());
        let mut b = Router::new(
            RouterSettings {
                router_id: 2,
                ..settings(Mode::RoundRobin)
            },
            approx_view(),
        );
        for r in [&mut a, &mut b] {
            r.enable_replica_sync();
            r.add_worker(advert(1));
        }
        let now = Instant::now();
        let w = WorkerKey::new(1);
        let x = a.route(&(0..8).collect::<Vec<u32>>(), now).unwrap();
        let y = a.route(&(100..108).collect::<Vec<u32>>(), now).unwrap();
        a.prefill_completed(&x.key, now);
        for e in a.take_outbox() {
            b.apply_peer(&e, now);
            a.apply_peer(&e, now); // our own echo: ignored
        }
        assert_eq!(b.booked(w), a.booked(w));
        assert_eq!(a.booked(w).requests, 2);
        // A replica that starts now learns the same from a re-announcement.
        let mut late = Router::new(
            RouterSettings {
                router_id: 3,
                ..settings(Mode::RoundRobin)
            },
            approx_view(),
        );
        late.add_worker(advert(1));
        a.reannounce();
        for e in a.take_outbox() {
            late.apply_peer(&e, now);
        }
        assert_eq!(late.booked(w), a.booked(w));
        a.free(&y.key);
        for e in a.take_outbox() {
            b.apply_peer(&e, now);
        }
        assert_eq!(b.booked(w), a.booked(w));
        b.forget_peer(1);
        assert_eq!(b.booked(w).requests, 0);
    }

    #[test]
    fn round_robin_takes_turns() {
        let mut r = Router::new(settings(Mode::RoundRobin), approx_view());
        for id in 1..=3 {
            r.add_worker(advert(id));
        }
        let now = Instant::now();
        let ids: Vec<u64> = (0..6)
            .map(|_| r.route(&[1, 2, 3, 4], now).unwrap().worker.worker_id)
            .collect();
        assert_eq!(ids, [1, 2, 3, 1, 2, 3]);
    }
}
