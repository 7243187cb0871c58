//! One scenario, run on every backend: register, list, watch, replace,
//! withdraw. Then the file backend's own promises: expiry of dead owners and
//! stale leases, and self-repair of a removed entry.

use eventplane_discovery::{Discovery, FileDiscovery, MemDiscovery, WatchEvent};
use serde_json::json;
use std::time::Duration;

mod common;

use common::{next, scenario, WAIT};

#[tokio::test]
async fn mem_conformance() {
    scenario(&MemDiscovery::new()).await;
}

#[tokio::test]
async fn file_conformance() {
    let dir = tempfile::tempdir().unwrap();
    scenario(&FileDiscovery::new(dir.path()).unwrap()).await;
}

fn write_foreign_entry(dir: &std::path::Path, key: &str, pid: u32, ttl_ms: u64) {
    let body = json!({"key": key, "value": {"endpoint": "tcp://127.0.0.1:9"}, "pid": pid, "host": hostname(), "ttl_ms": ttl_ms});
    std::fs::write(
        dir.join(format!("{}.json", key.replace('/', "%2F"))),
        body.to_string(),
    )
    .unwrap();
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn file_entry_of_a_dead_process_expires_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    write_foreign_entry(dir.path(), "svc/dead", dead_pid, 60_000);
    assert!(
        d.list("svc/").await.unwrap().is_empty(),
        "an entry whose owner is gone is not live"
    );
    assert!(
        !dir.path().join("svc%2Fdead.json").exists(),
        "and it is deleted"
    );
}

#[tokio::test]
async fn file_entry_without_keepalive_expires_after_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let mut w = d.watch("svc/").await.unwrap();
    // Our own pid is alive, so only the TTL can expire it.
    let t0 = std::time::Instant::now();
    write_foreign_entry(dir.path(), "svc/stale", std::process::id(), 300);
    assert!(matches!(next(&mut w).await, WatchEvent::Added(e) if e.key == "svc/stale"));
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/stale".into()
        }
    );
    let waited = t0.elapsed();
    // File times come from a coarse clock (one scheduler tick, up to 10 ms,
    // behind the precise one), hence the tolerance.
    assert!(
        waited >= Duration::from_millis(290),
        "expired early, after {waited:?}"
    );
}

#[tokio::test]
async fn file_lease_is_kept_alive_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let reg = d
        .register("svc/live", json!(1), Duration::from_millis(1000))
        .await
        .unwrap();
    let mut w = d.watch("svc/").await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(_)));
    // Three TTLs pass with no change: the keepalive (every third of the TTL,
    // from its own thread) holds the entry, even on a busy CI machine.
    assert!(tokio::time::timeout(Duration::from_millis(3000), w.next())
        .await
        .is_err());
    // Someone deletes the file: the owner puts it back within a refresh period.
    let path = dir.path().join("svc%2Flive.json");
    std::fs::remove_file(&path).unwrap();
    let t0 = std::time::Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < WAIT, "entry not restored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(d.list("svc/").await.unwrap().len(), 1);
    drop(reg);
    // A watcher may or may not have seen the brief hole; either way it ends removed.
    loop {
        if next(&mut w).await
            == (WatchEvent::Removed {
                key: "svc/live".into(),
            })
            && d.list("svc/").await.unwrap().is_empty()
        {
            break;
        }
    }
    assert!(!path.exists());
}

#[tokio::test]
async fn garbage_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let _r = d
        .register("svc/ok", json!(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.list("").await.unwrap().len(), 1);
}

#[tokio::test]
async fn file_keys_longer_than_a_file_name_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let long_a = format!("svc/{}a", "x.".repeat(200));
    let long_b = format!("svc/{}b", "x.".repeat(200));
    let _a = d
        .register(&long_a, json!("a"), Duration::from_secs(5))
        .await
        .unwrap();
    let _b = d
        .register(&long_b, json!("b"), Duration::from_secs(5))
        .await
        .unwrap();
    let keys: Vec<String> = d
        .list("svc/")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, vec![long_a, long_b]);
}

#[tokio::test]
async fn file_value_replaced_with_one_of_the_same_size_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let _a = d
        .register("svc/x", json!("aa"), Duration::from_secs(5))
        .await
        .unwrap();
    let mut w = d.watch("svc/").await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(e) if e.value == json!("aa")));
    let _b = d
        .register("svc/x", json!("bb"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/x".into()
        }
    );
    assert!(matches!(next(&mut w).await, WatchEvent::Added(e) if e.value == json!("bb")));
}

/// A watched directory where nothing changes is scanned on the periodic
/// timer alone. Our scans open the directory and its files; when those
/// reads counted as changes, each scan triggered the next (hundreds a second
/// on an idle machine, a core's worth of wake-ups taken from the transport).
#[tokio::test]
async fn an_idle_watch_scans_on_its_timer_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = FileDiscovery::new(dir.path()).unwrap();
    let _a = d
        .register("svc/a", json!("a"), Duration::from_secs(30))
        .await
        .unwrap();
    let mut w = d.watch("svc/").await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(_)));
    let scans = || {
        d.metrics()
            .iter()
            .find(|m| m.name == "scans")
            .map(|m| m.value)
            .expect("the file backend counts its scans")
    };
    let before = scans();
    // The window is what is measured here (how many scans happen in it);
    // nothing is being waited for.
    let window = Duration::from_secs(1);
    tokio::time::sleep(window).await;
    let during = scans() - before;
    let timer_only =
        (window.as_millis() / eventplane_discovery::FILE_SCAN_INTERVAL.as_millis()) as u64;
    assert!(
        during <= timer_only + 3,
        "{during} scans in {window:?} on an idle directory (the timer alone makes {timer_only})"
    );
}
