//! Per-publisher sequence tracking: the subscriber's sans-IO detector of loss,
//! restarts, duplicates and reordering.
//!
//! Drive it with [`SequenceTracker::observe`] for every decoded envelope, in
//! arrival order, passing the current time; it answers whether to deliver the
//! message and appends [`Notice`]s describing what it learnt. Call
//! [`SequenceTracker::poll_silence`] now and then to learn of publishers that
//! went quiet. It does no I/O and reads no clock.
//!
//! Per publisher it keeps the current incarnation, the highest sequence number
//! seen (data or announced by a heartbeat), and a window of the last
//! [`WINDOW`] sequence numbers recording which are still missing. So:
//! - a sequence number above the highest opens a **gap** of the numbers
//!   skipped, each counted as lost;
//! - one inside the window that is marked missing is a **late** arrival
//!   (reordering): delivered, and no longer counted as lost;
//! - one inside the window already seen is a **duplicate**: dropped;
//! - one older than the window cannot be told apart: dropped as **too old**;
//! - a greater incarnation is a **restart**: the publisher's state starts over;
//!   a smaller one is a straggler from a dead incarnation: dropped as **stale**.
//!
//! The first message from a publisher starts tracking wherever it is: messages
//! published before this subscriber joined were never addressed to it, so they
//! are not counted as lost (the [`Notice::Joined`] says where it started).

use std::collections::HashMap;

use crate::envelope::{Header, Kind};

/// Publisher ids → tracks, hashed with foldhash (seeded per process) rather
/// than SipHash: one lookup per message, and the map is capped at
/// `max_publishers` entries, so a sender choosing ids can lengthen a few
/// probes at most. Measured in `benches/codec.rs` (`sequence/*`).
type Tracks = HashMap<u64, Track, foldhash::fast::RandomState>;

/// How many recent sequence numbers per publisher are remembered, to tell late
/// arrivals from duplicates.
pub const WINDOW: u64 = 4096;

/// Default bound on the number of publishers tracked at once.
pub const DEFAULT_MAX_PUBLISHERS: usize = 65_536;

/// Something the tracker learnt about a publisher's stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// First message seen from this publisher (or from this incarnation after
    /// the tracker forgot it). `seq` is where tracking starts.
    Joined {
        publisher_id: u64,
        incarnation: u64,
        seq: u64,
    },
    /// Messages `first..=last` were not received (yet).
    Gap {
        publisher_id: u64,
        incarnation: u64,
        first: u64,
        last: u64,
    },
    /// A message counted lost arrived after all.
    Late {
        publisher_id: u64,
        incarnation: u64,
        seq: u64,
    },
    /// A message arrived twice; the copy was dropped.
    Duplicate {
        publisher_id: u64,
        incarnation: u64,
        seq: u64,
    },
    /// A message older than the reorder window arrived; dropped.
    TooOld {
        publisher_id: u64,
        incarnation: u64,
        seq: u64,
    },
    /// The publisher restarted: a new incarnation. `last_seq` is the highest
    /// sequence seen from the old one; `seq` is where the new one was joined.
    Restarted {
        publisher_id: u64,
        old_incarnation: u64,
        new_incarnation: u64,
        last_seq: u64,
        seq: u64,
    },
    /// A message from an incarnation older than the current one; dropped.
    Stale {
        publisher_id: u64,
        incarnation: u64,
        seq: u64,
    },
    /// Nothing (not even a heartbeat) heard from this publisher for `silent_ns`.
    Silent {
        publisher_id: u64,
        incarnation: u64,
        silent_ns: u64,
    },
}

impl Notice {
    /// A short, stable name for logs and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Notice::Joined { .. } => "joined",
            Notice::Gap { .. } => "gap",
            Notice::Late { .. } => "late",
            Notice::Duplicate { .. } => "duplicate",
            Notice::TooOld { .. } => "too_old",
            Notice::Restarted { .. } => "restarted",
            Notice::Stale { .. } => "stale",
            Notice::Silent { .. } => "silent",
        }
    }

    /// The publisher the notice is about.
    pub fn publisher_id(&self) -> u64 {
        match *self {
            Notice::Joined { publisher_id, .. }
            | Notice::Gap { publisher_id, .. }
            | Notice::Late { publisher_id, .. }
            | Notice::Duplicate { publisher_id, .. }
            | Notice::TooOld { publisher_id, .. }
            | Notice::Restarted { publisher_id, .. }
            | Notice::Stale { publisher_id, .. }
            | Notice::Silent { publisher_id, .. } => publisher_id,
        }
    }
}

/// What to do with an observed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand a data message to the application. `late` is set when it fills a
    /// gap reported earlier.
    Deliver { late: bool },
    /// A heartbeat: it has been accounted for; nothing to deliver.
    Heartbeat,
    /// Drop it (duplicate, too old or stale); a notice says which.
    Drop,
}

/// Running totals over all publishers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SequenceCounters {
    /// Data messages delivered (in order or late).
    pub delivered: u64,
    /// Heartbeats observed.
    pub heartbeats: u64,
    /// Gaps opened.
    pub gaps: u64,
    /// Messages lost: skipped by a gap and not (yet) arrived late.
    pub lost: u64,
    /// Late arrivals that filled a gap.
    pub late: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Too-old messages dropped.
    pub too_old: u64,
    /// Restarts (new incarnations) seen.
    pub restarts: u64,
    /// Stale-incarnation messages dropped.
    pub stale: u64,
    /// Publishers forgotten to respect the tracking bound.
    pub evicted: u64,
}

#[derive(Debug, Clone)]
struct Track {
    incarnation: u64,
    highest: u64,
    /// Bit `s % WINDOW` set: sequence `s` (within the window below `highest`) is missing.
    missing: Box<[u64; (WINDOW / 64) as usize]>,
    last_heard_ns: u64,
    silent_reported: bool,
}

impl Track {
    fn new(incarnation: u64, seq: u64, now_ns: u64) -> Self {
        Self {
            incarnation,
            highest: seq,
            missing: Box::new([0; (WINDOW / 64) as usize]),
            last_heard_ns: now_ns,
            silent_reported: false,
        }
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn is_missing(&self, seq: u64) -> bool {
        let (w, m) = Self::bit(seq);
        self.missing[w] & m != 0
    }

    fn set_missing(&mut self, seq: u64, missing: bool) {
        let (w, m) = Self::bit(seq);
        if missing {
            self.missing[w] |= m;
        } else {
            self.missing[w] &= !m;
        }
    }

    /// Raises `highest` to `to`, marking the skipped numbers missing; `to`
    /// itself is marked present when `to_present`.
    fn advance(&mut self, to: u64, to_present: bool) {
        let skipped = to - self.highest - 1;
        if skipped >= WINDOW {
            self.missing.fill(u64::MAX);
        } else {
            for s in self.highest + 1..to {
                self.set_missing(s, true);
            }
        }
        self.set_missing(to, !to_present);
        self.highest = to;
    }
}

/// The tracker: one per subscriber. See the module docs.
#[derive(Debug)]
pub struct SequenceTracker {
    tracks: Tracks,
    max_publishers: usize,
    counters: SequenceCounters,
}

impl Default for SequenceTracker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PUBLISHERS)
    }
}

impl SequenceTracker {
    /// A tracker remembering at most `max_publishers` publishers; beyond that the
    /// one heard from least recently is forgotten (and counted as evicted).
    pub fn new(max_publishers: usize) -> Self {
        Self {
            tracks: Tracks::default(),
            max_publishers: max_publishers.max(1),
            counters: SequenceCounters::default(),
        }
    }

    /// Totals so far.
    pub fn counters(&self) -> SequenceCounters {
        self.counters
    }

    /// Number of publishers currently tracked.
    pub fn publishers(&self) -> usize {
        self.tracks.len()
    }

    /// The incarnation and highest sequence number known for a publisher.
    pub fn position(&self, publisher_id: u64) -> Option<(u64, u64)> {
        self.tracks
            .get(&publisher_id)
            .map(|t| (t.incarnation, t.highest))
    }

    /// Stops tracking a publisher (for instance when discovery says it is gone
    /// for good). A later message from it starts over with [`Notice::Joined`].
    pub fn forget(&mut self, publisher_id: u64) {
        self.tracks.remove(&publisher_id);
    }

    /// Accounts for one envelope received at `now_ns`; appends notices to `out`.
    pub fn observe(&mut self, h: &Header, now_ns: u64, out: &mut Vec<Notice>) -> Verdict {
        let (pid, inc, seq) = (h.publisher_id, h.incarnation, h.seq);
        let is_data = h.kind == Kind::Data;
        let Some(t) = self.tracks.get_mut(&pid) else {
            self.make_room();
            self.tracks.insert(pid, Track::new(inc, seq, now_ns));
            out.push(Notice::Joined {
                publisher_id: pid,
                incarnation: inc,
                seq,
            });
            return accept(&mut self.counters, is_data, false);
        };
        let c = &mut self.counters;
        t.last_heard_ns = now_ns;
        t.silent_reported = false;
        if inc != t.incarnation {
            if inc < t.incarnation {
                c.stale += 1;
                out.push(Notice::Stale {
                    publisher_id: pid,
                    incarnation: inc,
                    seq,
                });
                return Verdict::Drop;
            }
            c.restarts += 1;
            out.push(Notice::Restarted {
                publisher_id: pid,
                old_incarnation: t.incarnation,
                new_incarnation: inc,
                last_seq: t.highest,
                seq,
            });
            *t = Track::new(inc, seq, now_ns);
            return accept(c, is_data, false);
        }
        if seq > t.highest {
            if seq > t.highest + 1 {
                let (first, last) = (t.highest + 1, seq - if is_data { 1 } else { 0 });
                if last >= first {
                    c.gaps += 1;
                    c.lost += last - first + 1;
                    out.push(Notice::Gap {
                        publisher_id: pid,
                        incarnation: inc,
                        first,
                        last,
                    });
                }
            } else if !is_data {
                // A heartbeat announcing exactly the next number: it was lost.
                c.gaps += 1;
                c.lost += 1;
                out.push(Notice::Gap {
                    publisher_id: pid,
                    incarnation: inc,
                    first: seq,
                    last: seq,
                });
            }
            t.advance(seq, is_data);
            return accept(c, is_data, false);
        }
        if !is_data {
            // A heartbeat at or below what we have seen tells nothing new.
            return accept(c, false, false);
        }
        if t.highest - seq >= WINDOW {
            c.too_old += 1;
            out.push(Notice::TooOld {
                publisher_id: pid,
                incarnation: inc,
                seq,
            });
            return Verdict::Drop;
        }
        if !t.is_missing(seq) {
            c.duplicates += 1;
            out.push(Notice::Duplicate {
                publisher_id: pid,
                incarnation: inc,
                seq,
            });
            return Verdict::Drop;
        }
        t.set_missing(seq, false);
        c.late += 1;
        c.lost -= 1;
        out.push(Notice::Late {
            publisher_id: pid,
            incarnation: inc,
            seq,
        });
        accept(c, true, true)
    }

    /// Reports, once per silence, every publisher not heard from for at least
    /// `timeout_ns` before `now_ns`.
    pub fn poll_silence(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<Notice>) {
        for (&pid, t) in self.tracks.iter_mut() {
            let silent = now_ns.saturating_sub(t.last_heard_ns);
            if !t.silent_reported && silent >= timeout_ns {
                t.silent_reported = true;
                out.push(Notice::Silent {
                    publisher_id: pid,
                    incarnation: t.incarnation,
                    silent_ns: silent,
                });
            }
        }
    }

    fn make_room(&mut self) {
        if self.tracks.len() < self.max_publishers {
            return;
        }
        if let Some((&oldest, _)) = self.tracks.iter().min_by_key(|(_, t)| t.last_heard_ns) {
            self.tracks.remove(&oldest);
            self.counters.evicted += 1;
        }
    }
}

/// Counts an accepted envelope and says what to do with it.
fn accept(c: &mut SequenceCounters, is_data: bool, late: bool) -> Verdict {
    if is_data {
        c.delivered += 1;
        Verdict::Deliver { late }
    } else {
        c.heartbeats += 1;
        Verdict::Heartbeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn data(pid: u64, inc: u64, seq: u64) -> Header {
        Header {
            kind: Kind::Data,
            publisher_id: pid,
            incarnation: inc,
            seq,
            timestamp_ns: 0,
        }
    }
    fn hb(pid: u64, inc: u64, seq: u64) -> Header {
        Header {
            kind: Kind::Heartbeat,
            ..data(pid, inc, seq)
        }
    }

    fn run(t: &mut SequenceTracker, h: Header) -> (Verdict, Vec<Notice>) {
        let mut out = Vec::new();
        let v = t.observe(&h, 0, &mut out);
        (v, out)
    }

    #[test]
    fn in_order_stream_has_no_notices_after_joining() {
        let mut t = SequenceTracker::default();
        let (_, n) = run(&mut t, data(1, 10, 1));
        assert_eq!(
            n,
            vec![Notice::Joined {
                publisher_id: 1,
                incarnation: 10,
                seq: 1
            }]
        );
        for s in 2..=10_000 {
            let (v, n) = run(&mut t, data(1, 10, s));
            assert_eq!(v, Verdict::Deliver { late: false });
            assert!(n.is_empty());
        }
        assert_eq!(t.counters().delivered, 10_000);
        assert_eq!(t.counters().lost, 0);
    }

    #[test]
    fn gap_then_late_arrival() {
        let mut t = SequenceTracker::default();
        run(&mut t, data(1, 1, 1));
        let (_, n) = run(&mut t, data(1, 1, 5));
        assert_eq!(
            n,
            vec![Notice::Gap {
                publisher_id: 1,
                incarnation: 1,
                first: 2,
                last: 4
            }]
        );
        assert_eq!(t.counters().lost, 3);
        let (v, n) = run(&mut t, data(1, 1, 3));
        assert_eq!(v, Verdict::Deliver { late: true });
        assert_eq!(
            n,
            vec![Notice::Late {
                publisher_id: 1,
                incarnation: 1,
                seq: 3
            }]
        );
        assert_eq!(t.counters().lost, 2);
        let (v, _) = run(&mut t, data(1, 1, 3));
        assert_eq!(v, Verdict::Drop);
        let (v, _) = run(&mut t, data(1, 1, 5));
        assert_eq!(v, Verdict::Drop);
        assert_eq!(t.counters().duplicates, 2);
    }

    #[test]
    fn heartbeat_reveals_tail_loss() {
        let mut t = SequenceTracker::default();
        run(&mut t, hb(1, 1, 0));
        run(&mut t, data(1, 1, 1));
        let (v, n) = run(&mut t, hb(1, 1, 3));
        assert_eq!(v, Verdict::Heartbeat);
        assert_eq!(
            n,
            vec![Notice::Gap {
                publisher_id: 1,
                incarnation: 1,
                first: 2,
                last: 3
            }]
        );
        // The message announced by the heartbeat can still arrive late.
        let (v, _) = run(&mut t, data(1, 1, 3));
        assert_eq!(v, Verdict::Deliver { late: true });
        assert_eq!(t.counters().lost, 1);
        // Heartbeat for the next number alone.
        let (_, n) = run(&mut t, hb(1, 1, 4));
        assert_eq!(
            n,
            vec![Notice::Gap {
                publisher_id: 1,
                incarnation: 1,
                first: 4,
                last: 4
            }]
        );
    }

    #[test]
    fn restart_and_stale_incarnation() {
        let mut t = SequenceTracker::default();
        run(&mut t, data(1, 100, 1));
        run(&mut t, data(1, 100, 2));
        let (v, n) = run(&mut t, data(1, 200, 1));
        assert_eq!(v, Verdict::Deliver { late: false });
        assert_eq!(
            n,
            vec![Notice::Restarted {
                publisher_id: 1,
                old_incarnation: 100,
                new_incarnation: 200,
                last_seq: 2,
                seq: 1
            }]
        );
        let (v, n) = run(&mut t, data(1, 100, 3));
        assert_eq!(v, Verdict::Drop);
        assert_eq!(n[0].name(), "stale");
        assert_eq!(t.counters().restarts, 1);
    }

    #[test]
    fn silence_is_reported_once() {
        let mut t = SequenceTracker::default();
        let mut out = Vec::new();
        t.observe(&hb(1, 1, 0), 1_000, &mut out);
        out.clear();
        t.poll_silence(1_500, 1_000, &mut out);
        assert!(out.is_empty());
        t.poll_silence(2_000, 1_000, &mut out);
        t.poll_silence(3_000, 1_000, &mut out);
        assert_eq!(
            out,
            vec![Notice::Silent {
                publisher_id: 1,
                incarnation: 1,
                silent_ns: 1_000
            }]
        );
    }

    #[test]
    fn bounded_publishers() {
        let mut t = SequenceTracker::new(2);
        let mut out = Vec::new();
        t.observe(&data(1, 1, 1), 1, &mut out);
        t.observe(&data(2, 1, 1), 2, &mut out);
        t.observe(&data(3, 1, 1), 3, &mut out);
        assert_eq!(t.publishers(), 2);
        assert_eq!(t.position(1), None);
        assert_eq!(t.counters().evicted, 1);
    }

    proptest! {
        /// Against a brute-force model: a stream of one publisher, with messages
        /// dropped, duplicated and displaced by less than the window, is
        /// accounted exactly: delivered = distinct messages received, and lost =
        /// numbers below the highest seen that never arrived.
        #[test]
        fn accounting_matches_model(
            n in 1u64..600,
            drops in proptest::collection::vec(any::<bool>(), 600),
            dups in proptest::collection::vec(0u8..8, 600),
            swaps in proptest::collection::vec((0usize..600, 0usize..50), 0..40),
        ) {
            let mut arrivals: Vec<u64> = (1..=n).filter(|&s| !drops[s as usize]).collect();
            for (i, &d) in dups.iter().enumerate() {
                if d == 0 && i < arrivals.len() { let s = arrivals[i]; arrivals.insert(i, s); }
            }
            let len = arrivals.len();
            for (i, d) in swaps {
                if len > 1 { let a = i % len; let b = (a + d).min(len - 1); arrivals.swap(a, b); }
            }
            let mut t = SequenceTracker::default();
            let mut out = Vec::new();
            t.observe(&hb(9, 1, 0), 0, &mut out);
            let mut delivered = BTreeSet::new();
            for &s in &arrivals {
                if let Verdict::Deliver { .. } = t.observe(&data(9, 1, s), 0, &mut out) {
                    prop_assert!(delivered.insert(s), "delivered {} twice", s);
                }
            }
            let distinct: BTreeSet<u64> = arrivals.iter().copied().collect();
            prop_assert_eq!(&delivered, &distinct);
            let highest = distinct.iter().max().copied().unwrap_or(0);
            let never = (1..=highest).filter(|s| !distinct.contains(s)).count() as u64;
            prop_assert_eq!(t.counters().lost, never);
            // A final heartbeat announcing n reveals the tail too.
            t.observe(&hb(9, 1, n), 0, &mut out);
            let never_all = (1..=n).filter(|s| !distinct.contains(s)).count() as u64;
            prop_assert_eq!(t.counters().lost, never_all);
        }
    }
}
