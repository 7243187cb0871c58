//! The event plane across real processes: three publishers and a subscriber
//! over ZMQ and file discovery, then a publisher killed with SIGKILL, a new
//! one joining, and one restarting, all seen by the running subscriber.

mod common;

use common::Proc;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const N: u64 = 100_000;
const TTL_MS: u64 = 2_000;

fn publisher(dir: &std::path::Path, id: u64, count: u64, rate: u64) -> Proc {
    let args = common::load_publisher_args(id, count, rate);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start_with_env(
        &format!("publisher {id}"),
        dir,
        &args,
        &[("DYN_EVENT_PLANE_LEASE_TTL_MS", &TTL_MS.to_string())],
    )
}

#[derive(Default, Debug)]
struct Seen {
    next_seq: BTreeMap<u64, u64>,
    messages: BTreeMap<u64, u64>,
    notices: Vec<serde_json::Value>,
}

impl Seen {
    fn absorb(&mut self, line: &serde_json::Value) {
        match line["type"].as_str() {
            Some("message") => {
                let pid = line["publisher_id"].as_u64().unwrap();
                let seq = line["seq"].as_u64().unwrap();
                let next = self.next_seq.entry(pid).or_insert(1);
                assert_eq!(seq, *next, "publisher {pid}: out of order or lost");
                *next += 1;
                *self.messages.entry(pid).or_default() += 1;
            }
            Some("notice") if line["notice"] != "silent" => self.notices.push(line.clone()),
            _ => {}
        }
    }
}

#[test]
fn publishers_come_go_and_restart_under_a_running_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let tail = Proc::start(
        "tail",
        dir.path(),
        &["tail", "-c", "workers", "-t", "load", "--no-values"],
    );
    let mut seen = Seen::default();

    // Three publishers, 100,000 messages each, every one received.
    let mut pubs: BTreeMap<u64, Proc> = (1..=3)
        .map(|id| (id, publisher(dir.path(), id, N, 100_000)))
        .collect();
    let mut incarnations = BTreeMap::new();
    for (id, p) in &pubs {
        let ready = p.until_type("ready");
        incarnations.insert(*id, ready["incarnation"].as_u64().unwrap());
        p.until_type("published");
    }
    while (1..=3).any(|id| seen.messages.get(&id).copied().unwrap_or(0) < N) {
        let line = tail.next_line();
        seen.absorb(&line);
    }
    let gaps: Vec<_> = seen
        .notices
        .iter()
        .filter(|n| n["notice"] != "joined")
        .collect();
    assert!(gaps.is_empty(), "unexpected notices: {gaps:?}");
    for id in 1..=3 {
        assert_eq!(seen.messages[&id], N);
    }

    // kill -9 of publisher 1: its registration goes within the TTL, and the
    // subscriber disconnects.
    let victim = pubs.remove(&1).unwrap();
    let killed_at = Instant::now();
    victim.signal(libc::SIGKILL);
    tail.until(
        |l| l["type"] == "publisher_removed" && l["publisher_id"] == 1,
        |l| seen.absorb(l),
    );
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_millis(TTL_MS),
        "registration outlived its TTL: {took:?}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left.iter().filter(|f| f.ends_with(".json")).count(),
        2,
        "dead entry not removed: {left:?}"
    );
    drop(victim);

    // A new publisher joins: the subscriber connects to it without a restart.
    let p4 = publisher(dir.path(), 4, 1_000, 10_000);
    tail.until(
        |l| l["type"] == "publisher_added" && l["publisher_id"] == 4,
        |l| seen.absorb(l),
    );
    tail.until(
        |l| l["type"] == "notice" && l["notice"] == "joined" && l["publisher_id"] == 4,
        |l| seen.absorb(l),
    );
    p4.until_type("published");
    while seen.messages.get(&4).copied().unwrap_or(0) < 1_000 {
        seen.absorb(&tail.next_line());
    }
    pubs.insert(4, p4);

    // Publisher 2 restarts with the same id: a new incarnation, recognised.
    let mut old = pubs.remove(&2).unwrap();
    old.signal(libc::SIGTERM);
    old.wait();
    tail.until(
        |l| l["type"] == "publisher_removed" && l["publisher_id"] == 2,
        |l| seen.absorb(l),
    );
    let restarted = publisher(dir.path(), 2, 10, 1_000);
    let new_inc = restarted.until_type("ready")["incarnation"]
        .as_u64()
        .unwrap();
    let notice = tail.until(
        |l| l["type"] == "notice" && l["notice"] == "restarted",
        |l| {
            if l["type"] != "message" {
                seen.absorb(l)
            }
        },
    );
    assert_eq!(notice["publisher_id"], 2);
    assert_eq!(notice["old_incarnation"].as_u64(), Some(incarnations[&2]));
    assert_eq!(notice["new_incarnation"].as_u64(), Some(new_inc));
    assert_eq!(notice["last_seq"].as_u64(), Some(N));
    pubs.insert(2, restarted);

    // The subscriber's own accounting agrees: nothing malformed, nothing lost.
    tail.signal(libc::SIGTERM);
    let summary = tail.until_type("summary");
    let stats = &summary["stats"];
    assert_eq!(stats["sequence"]["lost"], 0, "{summary}");
    assert_eq!(stats["queue_dropped"], 0, "{summary}");
    assert_eq!(stats["bad_framing"], 0, "{summary}");
    assert_eq!(stats["sequence"]["restarts"], 1, "{summary}");
}
