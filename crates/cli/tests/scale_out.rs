//! The scale-out setup of the README on loopback: a real `nats-server` and a
//! real `etcd`, two mock workers and a frontend as separate processes, with
//! NATS carrying the events and etcd finding the workers. A request is
//! routed by prefix; a worker killed with SIGKILL leaves within the lease
//! TTL; after etcd restarts without its data, the surviving worker registers
//! again by itself and the frontend routes to it.

#![cfg(feature = "etcd")]

mod common;

use common::Proc;
use eventplane_testkit::etcd::EtcdServer;
use eventplane_testkit::nats::NatsServer;
use std::time::{Duration, Instant};

const TTL_S: u64 = 2;

fn start(
    name: &str,
    dir: &std::path::Path,
    nats: &NatsServer,
    etcd: &EtcdServer,
    args: &[&str],
) -> Proc {
    let ttl = TTL_S.to_string();
    let env = [
        ("DYN_EVENT_PLANE", "nats"),
        ("NATS_SERVER", &nats.url()),
        ("DYN_DISCOVERY_BACKEND", "etcd"),
        ("ETCD_ENDPOINTS", &etcd.client_url()),
        ("ETCD_LEASE_TTL", &ttl),
    ];
    Proc::start_with_env(name, dir, args, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_a_frontend_over_nats_and_etcd() {
    let nats = NatsServer::start();
    let mut etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut worker_urls = Vec::new();
    let mut workers: Vec<Proc> = (1..=2)
        .map(|id| {
            let id = id.to_string();
            let w = start(
                "worker",
                dir.path(),
                &nats,
                &etcd,
                &[
                    "worker",
                    "--engine",
                    "mock",
                    "--worker-id",
                    &id,
                    "--http-port",
                    "0",
                    "--block-size",
                    "4",
                    "--speedup",
                    "100",
                ],
            );
            worker_urls.push(w.until_type("ready")["url"].as_str().unwrap().to_owned());
            w
        })
        .collect();
    let frontend = start(
        "frontend",
        dir.path(),
        &nats,
        &etcd,
        &["frontend", "--http-port", "0"],
    );
    let (url, joined) = common::frontend_with_workers(&frontend, 2);

    let client = reqwest::Client::new();
    let prefix: String = (0..64).map(|i| format!("word{i} ")).collect();
    let (status, first, _) = common::complete(&client, &url, &format!("{prefix}first")).await;
    assert_eq!(status, 200);
    assert!(joined.contains(&first));

    // SIGKILL of the other worker: its registration expires with its lease.
    let other = if first == 1 { 2 } else { 1 };
    let mut victim = workers.remove((other - 1) as usize);
    let killed_at = Instant::now();
    victim.signal(libc::SIGKILL);
    victim.wait();
    let left = frontend.until_type("worker_left");
    assert_eq!(left["worker_id"], other);
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_secs(TTL_S + 2),
        "left after {took:?}"
    );

    // etcd loses everything: the surviving worker registers again by itself
    // (its metrics say so), and the frontend routes to it.
    etcd.restart_wiped();
    let metric = common::metric;
    let worker_metrics = format!("{}/metrics", worker_urls[(first - 1) as usize]);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let text = common::get_text(&client, &worker_metrics).await;
        if metric(
            &text,
            "eventplane_worker_discovery_etcd_reregistrations_total",
        ) >= Some(1.0)
        {
            assert_eq!(
                metric(&text, "eventplane_worker_discovery_etcd_registrations"),
                Some(1.0)
            );
            assert_eq!(
                metric(&text, "eventplane_worker_transport_nats_connected"),
                Some(1.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not register again:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let v = common::get_json(&client, &format!("{url}/router/workers")).await;
        let ids: Vec<u64> = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["worker_id"].as_u64())
            .collect();
        if ids == vec![first] {
            let (status, worker, _) =
                common::complete(&client, &url, &format!("{prefix}after")).await;
            if status == 200 {
                assert_eq!(worker, first);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the frontend did not route to it: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(victim);
}
