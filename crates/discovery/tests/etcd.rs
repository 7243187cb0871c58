//! The etcd backend against real `etcd` processes (started by
//! `eventplane-testkit` on free loopback ports, one server per test): the
//! shared conformance scenario, an owner process killed with SIGKILL, etcd
//! restarted with and without its data, a lease revoked behind the owner's
//! back, a three-member cluster losing its leader, an application runtime
//! blocked for several TTLs, and the start-up error when nothing listens.
//!
//! Run with `cargo test -p eventplane-discovery --features etcd`.
#![cfg(feature = "etcd")]

mod common;

use common::{next, scenario, WAIT};
use eventplane_discovery::{
    Discovery, DiscoveryError, EtcdDiscovery, EtcdOptions, Watch, WatchEvent,
};
use eventplane_testkit::etcd::{EtcdCluster, EtcdServer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The lease TTL of these tests: short, so that expiry is seen quickly
/// (etcd's own minimum is 1.5 s).
const TTL: Duration = Duration::from_secs(2);

fn options(endpoints: Vec<String>) -> EtcdOptions {
    EtcdOptions {
        endpoints,
        connect_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    }
}

async fn connect(endpoints: Vec<String>) -> EtcdDiscovery {
    logs();
    EtcdDiscovery::connect(options(endpoints))
        .await
        .expect("connect to the test's etcd")
}

/// The backend's logs in the test's output (shown when it fails), filtered
/// by `RUST_LOG` (default: `eventplane_discovery=info`).
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("eventplane_discovery=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Blocking work (starting or stopping a server) without stalling the
/// runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Applies watch events to `view` until it equals `expected`; panics after
/// [`WAIT`] with what was seen.
async fn until_state(
    w: &mut Watch,
    view: &mut BTreeMap<String, Value>,
    expected: &[(&str, Value)],
) {
    let expected: BTreeMap<String, Value> = expected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while *view != expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, w.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("watch closed; events: {seen:?}"),
            Err(_) => {
                panic!("watch state {view:?} is not {expected:?} after {WAIT:?}; events: {seen:?}")
            }
        };
        match &event {
            WatchEvent::Added(e) => {
                assert!(
                    view.insert(e.key.clone(), e.value.clone()).is_none(),
                    "Added without Removed for {}; events: {seen:?}",
                    e.key
                );
            }
            WatchEvent::Removed { key } => {
                assert!(
                    view.remove(key).is_some(),
                    "Removed {key} unknown; events: {seen:?}"
                );
            }
        }
        seen.push(event);
    }
}

/// Polls `condition` (a statistic an event cannot announce: the owner counts
/// a re-registration only after etcd has published it) until it holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn keys(entries: &[eventplane_discovery::Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.key.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_conformance() {
    let etcd = blocking(EtcdServer::start);
    let d = connect(vec![etcd.client_url()]).await;
    assert_eq!(d.name(), "etcd");
    scenario(&d).await;
    let stats = d.stats();
    assert_eq!(stats.registrations, 0, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
}

/// The variable that turns this test binary into the owner process of
/// [`owner_killed_with_sigkill_expires_within_ttl`]: it holds the endpoint.
const OWNER_ENV: &str = "EVENTPLANE_TEST_ETCD_OWNER";
const OWNER_KEY: &str = "workers/owner";

/// The owner process: registers [`OWNER_KEY`], says so, and waits to be killed.
async fn run_owner(endpoint: String) {
    let d = connect(vec![endpoint]).await;
    let _reg = d
        .register(OWNER_KEY, json!({"pid": std::process::id()}), TTL)
        .await
        .expect("register");
    println!("registered");
    std::future::pending::<()>().await;
}

/// A child process killed (SIGKILL) when dropped.
struct Owner(Child);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_with_sigkill_expires_within_ttl() {
    if let Ok(endpoint) = std::env::var(OWNER_ENV) {
        return run_owner(endpoint).await;
    }
    let etcd = blocking(EtcdServer::start);
    let d = connect(vec![etcd.client_url()]).await;
    let mut w = d.watch("workers/").await.unwrap();

    // The owner is this test binary again, running only this test.
    let mut owner = Owner(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "owner_killed_with_sigkill_expires_within_ttl",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(OWNER_ENV, etcd.client_url())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the owner process"),
    );
    let pid = owner.0.id();
    let stdout = owner.0.stdout.take().unwrap();
    let said = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // The harness prints "test <name> ... " first, on the same line.
            .any(|line| line.trim_end().ends_with("registered"))
    });
    assert!(
        tokio::time::timeout(WAIT, said)
            .await
            .expect("owner registers within 10 s")
            .unwrap(),
        "the owner exited without registering"
    );
    let added = next(&mut w).await;
    assert_eq!(
        added,
        WatchEvent::Added(eventplane_discovery::Entry {
            key: OWNER_KEY.into(),
            value: json!({"pid": pid}),
        })
    );
    assert_eq!(keys(&d.list("workers/").await.unwrap()), [OWNER_KEY]);

    owner.0.kill().unwrap(); // SIGKILL: no withdrawal, the lease must expire
    let killed = Instant::now();
    owner.0.wait().unwrap();
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: OWNER_KEY.into()
        }
    );
    let after = killed.elapsed();
    eprintln!("the entry expired {after:?} after its owner was killed (TTL {TTL:?})");
    assert!(
        after <= TTL + Duration::from_secs(1),
        "expired {after:?} after the kill (TTL {TTL:?})"
    );
    assert!(d.list("workers/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_on_its_data_watch_resumes() {
    let mut etcd = blocking(EtcdServer::start);
    let owner = connect(vec![etcd.client_url()]).await;
    let watcher = connect(vec![etcd.client_url()]).await;
    let _a = owner.register("svc/a", json!("a"), TTL).await.unwrap();
    let mut w = watcher.watch("svc/").await.unwrap();
    let mut view = BTreeMap::new();
    until_state(&mut w, &mut view, &[("svc/a", json!("a"))]).await;

    blocking(|| {
        etcd.kill();
        etcd.restart();
    });
    // The registration is there after the restart, the owner kept its
    // lease alive, and the watch started before the restart goes on.
    let _b = owner.register("svc/b", json!("b"), TTL).await.unwrap();
    until_state(
        &mut w,
        &mut view,
        &[("svc/a", json!("a")), ("svc/b", json!("b"))],
    )
    .await;
    assert_eq!(
        keys(&watcher.list("svc/").await.unwrap()),
        ["svc/a", "svc/b"]
    );
    let stats = watcher.stats();
    assert!(stats.watch_resumes >= 1, "{stats:?}");
    assert_eq!(stats.watch_relists, 0, "{stats:?}");
    assert!(stats.reconnects >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_without_its_data_registrations_come_back() {
    let mut etcd = blocking(EtcdServer::start);
    let owner = connect(vec![etcd.client_url()]).await;
    let other = connect(vec![etcd.client_url()]).await;
    let watcher = connect(vec![etcd.client_url()]).await;
    let _a = owner.register("svc/a", json!({"n": 1}), TTL).await.unwrap();
    let _b = owner.register("svc/b", json!({"n": 2}), TTL).await.unwrap();
    let c = other.register("svc/c", json!({"n": 3}), TTL).await.unwrap();
    let mut w = watcher.watch("svc/").await.unwrap();
    let mut view = BTreeMap::new();
    let all = [
        ("svc/a", json!({"n": 1})),
        ("svc/b", json!({"n": 2})),
        ("svc/c", json!({"n": 3})),
    ];
    until_state(&mut w, &mut view, &all).await;

    blocking(|| etcd.stop());
    drop(c); // withdrawn during the outage: gone with the data, and never put back
    blocking(|| etcd.restart_wiped());

    // The owner notices its leases are gone and registers again by itself;
    // the watcher, whose revision the new etcd never had, lists anew.
    until_state(&mut w, &mut view, &all[..2]).await;
    assert_eq!(
        keys(&watcher.list("svc/").await.unwrap()),
        ["svc/a", "svc/b"]
    );
    eventually("the owner counts its re-registrations", || {
        let stats = owner.stats();
        stats.leases_lost >= 2 && stats.reregistrations >= 2
    })
    .await;
    let stats = watcher.stats();
    assert!(stats.watch_relists >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_by_someone_else_owner_registers_again() {
    let etcd = blocking(EtcdServer::start);
    let owner = connect(vec![etcd.client_url()]).await;
    let watcher = connect(vec![etcd.client_url()]).await;
    let _a = owner.register("svc/a", json!("a"), TTL).await.unwrap();
    let mut w = watcher.watch("svc/").await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(e) if e.key == "svc/a"));

    let mut admin = etcd_client::Client::connect([etcd.client_url()], None)
        .await
        .unwrap();
    let leases = admin.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1);
    admin.lease_revoke(leases.leases()[0].id()).await.unwrap();

    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/a".into()
        }
    );
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Added(eventplane_discovery::Entry {
            key: "svc/a".into(),
            value: json!("a")
        })
    );
    eventually("the owner counts its re-registration", || {
        owner.stats().reregistrations == 1
    })
    .await;
    assert_eq!(owner.stats().leases_lost, 1);
    let leases = admin.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1, "one new lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_three_keeps_working_without_its_leader() {
    let mut cluster = blocking(|| EtcdCluster::start(3));
    let owner = connect(cluster.client_urls()).await;
    let watcher = connect(cluster.client_urls()).await;
    let r1 = owner.register("svc/1", json!(1), TTL).await.unwrap();
    let mut w = watcher.watch("svc/").await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(e) if e.key == "svc/1"));

    // Stop the leader, the member whose loss hurts most.
    let mut leader = None;
    for (i, url) in cluster.client_urls().into_iter().enumerate() {
        let mut c = etcd_client::Client::connect([url], None).await.unwrap();
        let status = c.status().await.unwrap();
        if status.leader() == status.header().unwrap().member_id() {
            leader = Some(i);
        }
    }
    let leader = leader.expect("a leader");
    blocking(|| cluster.stop_member(leader));

    let r2 = owner.register("svc/2", json!(2), TTL).await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(e) if e.key == "svc/2"));
    assert_eq!(
        keys(&watcher.list("svc/").await.unwrap()),
        ["svc/1", "svc/2"]
    );
    drop(r1);
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/1".into()
        }
    );
    // Keepalives go on: the entry outlives several TTLs.
    let quiet = tokio::time::timeout(2 * TTL, w.next()).await;
    assert!(quiet.is_err(), "unexpected event {quiet:?}");
    assert_eq!(keys(&owner.list("svc/").await.unwrap()), ["svc/2"]);
    drop(r2);
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/2".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_whose_revision_was_compacted_lists_anew() {
    let mut cluster = blocking(|| EtcdCluster::start(3));
    let urls = cluster.client_urls();
    // The watcher reaches the cluster through member 2 only; the changes
    // go through member 0.
    let watcher = connect(vec![urls[2].clone()]).await;
    let mut admin = etcd_client::Client::connect([urls[0].clone()], None)
        .await
        .unwrap();
    admin.put("svc/a", "\"a\"", None).await.unwrap();
    admin.put("svc/b", "\"b\"", None).await.unwrap();
    let mut w = watcher.watch("svc/").await.unwrap();
    let mut view = BTreeMap::new();
    until_state(
        &mut w,
        &mut view,
        &[("svc/a", json!("a")), ("svc/b", json!("b"))],
    )
    .await;

    // While the watcher is cut off, the entries change and etcd compacts
    // the history the watcher would resume from.
    blocking(|| cluster.stop_member(2));
    admin.delete("svc/a", None).await.unwrap();
    admin.put("svc/b", "\"b2\"", None).await.unwrap();
    let put = admin.put("svc/c", "\"c\"", None).await.unwrap();
    let revision = put.header().unwrap().revision();
    admin
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();
    blocking(|| cluster.member_mut(2).restart());

    until_state(
        &mut w,
        &mut view,
        &[("svc/b", json!("b2")), ("svc/c", json!("c"))],
    )
    .await;
    let stats = watcher.stats();
    assert_eq!(
        (stats.watch_relists, stats.watch_resumes),
        (1, 0),
        "{stats:?}"
    );
}

/// The application's runtime blocked for three TTLs: the registration
/// survives, because its keepalives come from a thread of their own.
#[test]
fn keepalive_does_not_depend_on_the_application_runtime() {
    let etcd = EtcdServer::start();
    let url = etcd.client_url();
    let app = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = app.block_on(connect(vec![url.clone()]));
    let reg = app.block_on(d.register("svc/a", json!("a"), TTL)).unwrap();

    // A watcher in another process's stead: its own thread and runtime.
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let d = connect(vec![url]).await;
            let mut w = d.watch("svc/").await.unwrap();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    event = w.next() => match event {
                        Some(event) => tx.send(event).unwrap(),
                        None => return,
                    },
                }
            }
        });
    });
    let first = rx.recv_timeout(WAIT).expect("the watcher sees the entry");
    assert!(matches!(first, WatchEvent::Added(e) if e.key == "svc/a"));

    // Starve the application: its only thread sleeps inside the runtime.
    app.block_on(async { std::thread::sleep(3 * TTL) });
    assert!(
        rx.try_recv().is_err(),
        "the entry must not have changed while the application was blocked"
    );
    assert_eq!(d.stats().leases_lost, 0);

    drop(reg);
    assert_eq!(
        rx.recv_timeout(WAIT).expect("the withdrawal is seen"),
        WatchEvent::Removed {
            key: "svc/a".into()
        }
    );
    stop.send(()).unwrap();
    watcher.join().unwrap();
}

#[tokio::test]
async fn nothing_listening_is_a_clear_error_within_the_connect_timeout() {
    let port = eventplane_testkit::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = EtcdDiscovery::connect(EtcdOptions {
        endpoints: vec![endpoint.clone()],
        connect_timeout: timeout,
        ..EtcdOptions::default()
    })
    .await
    .expect_err("nothing listens there");
    let took = started.elapsed();
    assert!(matches!(err, DiscoveryError::Etcd { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "cannot reach etcd at {endpoint} (set ETCD_ENDPOINTS): "
        )),
        "{message}"
    );
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
}
