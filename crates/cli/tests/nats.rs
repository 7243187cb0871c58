//! The `eventplane` binary over NATS, against a real `nats-server` started on
//! a free loopback port: publishers and a subscriber in separate processes,
//! a restart recognised as a new incarnation, a clear error when no server
//! answers, and a `nats-py` subscriber written from `docs/wire-format.md`
//! alone.

mod common;

use common::Proc;
use eventplane_testkit::nats::NatsServer;
use std::collections::BTreeMap;
use std::process::Command;

const N: u64 = 50_000;

/// `eventplane ARGS` over NATS at `server`, with `extra` environment.
fn start_with(
    name: &str,
    dir: &std::path::Path,
    server: &NatsServer,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Proc {
    let url = server.url();
    let mut env = vec![("DYN_EVENT_PLANE", "nats"), ("NATS_SERVER", url.as_str())];
    env.extend_from_slice(extra);
    Proc::start_with_env(name, dir, args, &env)
}

fn start(name: &str, dir: &std::path::Path, server: &NatsServer, args: &[&str]) -> Proc {
    start_with(name, dir, server, args, &[])
}

/// `tail` of the load channel the publishers below publish on.
fn load_tail(dir: &std::path::Path, server: &NatsServer) -> Proc {
    let args = ["tail", "-c", "workers", "-t", "load", "--no-values"];
    start("tail", dir, server, &args)
}

fn publisher(
    dir: &std::path::Path,
    server: &NatsServer,
    id: u64,
    count: u64,
    rate: u64,
    extra: &[(&str, &str)],
) -> Proc {
    let args = common::load_publisher_args(id, count, rate);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_with(&format!("publisher {id}"), dir, server, &args, extra)
}

#[test]
fn publishers_and_a_subscriber_in_separate_processes() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tail = load_tail(dir.path(), &server);
    let mut pubs: BTreeMap<u64, Proc> = (1..=2)
        .map(|id| (id, publisher(dir.path(), &server, id, N, 10_000, &[])))
        .collect();
    let mut incarnations = BTreeMap::new();
    for (id, p) in &pubs {
        incarnations.insert(*id, p.until_type("ready")["incarnation"].as_u64().unwrap());
        p.until_type("published");
    }
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    let mut notices = Vec::new();
    while (1..=2).any(|id| next.get(&id).copied().unwrap_or(1) <= N) {
        let line = tail.next_line();
        match line["type"].as_str() {
            Some("message") => {
                let pid = line["publisher_id"].as_u64().unwrap();
                let n = next.entry(pid).or_insert(1);
                assert_eq!(
                    line["seq"].as_u64(),
                    Some(*n),
                    "publisher {pid}: lost or out of order"
                );
                *n += 1;
            }
            Some("notice") if line["notice"] != "joined" && line["notice"] != "silent" => {
                notices.push(line)
            }
            _ => {}
        }
    }
    assert!(notices.is_empty(), "unexpected notices: {notices:?}");

    // Publisher 2 restarts with the same id: a new incarnation, recognised.
    let mut old = pubs.remove(&2).unwrap();
    old.signal(libc::SIGTERM);
    old.wait();
    let restarted = publisher(dir.path(), &server, 2, 10, 10_000, &[]);
    let new_inc = restarted.until_type("ready")["incarnation"]
        .as_u64()
        .unwrap();
    let notice = tail.until(
        |l| l["type"] == "notice" && l["notice"] == "restarted",
        |_| {},
    );
    assert_eq!(notice["publisher_id"], 2);
    assert_eq!(notice["old_incarnation"].as_u64(), Some(incarnations[&2]));
    assert_eq!(notice["new_incarnation"].as_u64(), Some(new_inc));
    assert_eq!(notice["last_seq"].as_u64(), Some(N));

    tail.signal(libc::SIGTERM);
    let summary = tail.until_type("summary");
    assert_eq!(summary["stats"]["sequence"]["lost"], 0, "{summary}");
}

#[test]
fn a_server_restart_under_running_processes_loses_nothing() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tail = load_tail(dir.path(), &server);
    let n = 100_000u64;
    let buffer = [("DYN_EVENT_PLANE_NATS_BUFFER", "100000")];
    let publisher = publisher(dir.path(), &server, 1, n, 20_000, &buffer);
    publisher.until_type("ready");
    let mut received = std::collections::BTreeSet::new();
    let mut restarted = false;
    // Until the last message is received. A gap may be reported and filled
    // later (what the old connection had not confirmed is sent again), so
    // the verdict is the tracker's final count, and every number received.
    while !received.contains(&n) {
        let line = tail.next_line();
        if line["type"] == "message" {
            received.insert(line["seq"].as_u64().unwrap());
        }
        if !restarted && received.len() as u64 == n / 2 {
            // Both processes keep running through the outage.
            server.stop();
            server.restart();
            restarted = true;
        }
    }
    assert!(restarted);
    let missing: Vec<u64> = (1..=n).filter(|s| !received.contains(s)).take(10).collect();
    assert!(missing.is_empty(), "never received: {missing:?}...");
    publisher.until_type("published");
    tail.signal(libc::SIGTERM);
    let summary = tail.until_type("summary");
    assert_eq!(summary["stats"]["sequence"]["lost"], 0, "{summary}");
}

#[test]
fn an_unreachable_server_is_named_in_the_error() {
    let port = eventplane_testkit::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args([
            "tail",
            "-c",
            "workers",
            "-t",
            "load",
            "--event-plane",
            "nats",
        ])
        .args(["--nats-server", &url])
        .env("EVENTPLANE_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("NATS_SERVER"), "{err}");
}

#[test]
fn nats_py_subscriber_written_from_the_spec_receives_everything() {
    let root = common::workspace_root();
    let Some(python) = common::python(&root, &["nats", "msgpack"]) else {
        return;
    };
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let count = 50u64;
    let value = r#"{"blocks":[1,2,18446744073709551615],"name":"w1"}"#;
    let mut subscriber = Proc::spawn(
        "nats-py subscriber",
        Command::new(&python)
            .arg(root.join("tests/interop/nats_subscriber.py"))
            .args(["--server", &server.url()])
            .args([
                "--namespace",
                "dynamo",
                "--component",
                "comp",
                "--topic",
                "topic-x",
            ])
            .args(["--count", &count.to_string(), "--timeout", "30"]),
    );
    subscriber.until(|l| l["ready"] == true, |_| {});
    let publisher = start(
        "publisher",
        dir.path(),
        &server,
        &[
            "publish",
            "-n",
            "dynamo",
            "-c",
            "comp",
            "-t",
            "topic-x",
            "--publisher-id",
            "77",
            "--value",
            value,
            "--count",
            &count.to_string(),
            "--rate",
            "1000",
            "--wait-subscribers",
            "1",
            "--hold",
        ],
    );
    let ready = publisher.until_type("ready");
    let result = subscriber.until(|l| l.get("messages").is_some(), |_| {});
    assert!(subscriber.wait().success());
    assert_eq!(result["subject"], ready["subject"]);
    assert_eq!(result["gaps"], 0, "{result}");
    let messages = result["messages"].as_array().unwrap();
    assert_eq!(messages.len() as u64, count);
    let expected: serde_json::Value = serde_json::from_str(value).unwrap();
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m["seq"], i as u64 + 1, "{m}");
        assert_eq!(m["publisher_id"], 77, "{m}");
        assert_eq!(m["incarnation"], ready["incarnation"], "{m}");
        assert_eq!(m["value"], expected, "{m}");
    }
    // The welcome heartbeat answered the hello.
    assert!(result["heartbeats"].as_u64() >= Some(1), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_a_nats_outage_and_shows_it_in_metrics() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = start(
        "worker",
        dir.path(),
        &server,
        &[
            "worker",
            "--engine",
            "mock",
            "--worker-id",
            "5",
            "--http-port",
            "0",
        ],
    );
    let url = worker.until_type("ready")["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let scrape = || async {
        reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = scrape().await;
    assert_eq!(
        common::metric(&text, "eventplane_worker_transport_nats_connected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        common::metric(&text, "eventplane_worker_transport_nats_disconnects_total"),
        Some(0.0)
    );

    server.stop();
    server.restart();
    // The worker reconnects by itself; poll its metrics until it says so.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let text = scrape().await;
        let connected = common::metric(&text, "eventplane_worker_transport_nats_connected");
        let disconnects =
            common::metric(&text, "eventplane_worker_transport_nats_disconnects_total");
        if connected == Some(1.0) && disconnects >= Some(1.0) {
            assert!(
                common::metric(&text, "eventplane_worker_transport_nats_connects_total")
                    >= Some(2.0)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reconnect seen:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
