//! The frontend over real processes: three mock workers and a frontend,
//! found through file discovery, KV events over ZMQ. Requests sharing a long
//! prefix go to the worker that caches it; a worker killed with `SIGKILL`
//! stops receiving traffic and the frontend keeps serving.

mod common;

use std::time::Duration;

use common::Proc;
use eventplane_kv::tokenize;
use serde_json::{json, Value};

fn start_worker(dir: &std::path::Path, id: u64, extra: &[&str]) -> Proc {
    let id = id.to_string();
    let mut args = vec!["worker", "--engine", "mock", "--worker-id", &id];
    args.extend(["--http-port", "0", "--block-size", "4"]);
    args.extend(extra);
    let p = Proc::start("worker", dir, &args);
    p.until_type("ready");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_prefix_and_survives_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut workers: Vec<Proc> = (1..=3)
        .map(|id| start_worker(dir.path(), id, &["--speedup", "100"]))
        .collect();
    let frontend = Proc::start("frontend", dir.path(), &["frontend", "--http-port", "0"]);
    let (url, _) = common::frontend_with_workers(&frontend, 3);

    let client = reqwest::Client::new();
    let prefix: String = (0..64).map(|i| format!("word{i} ")).collect();
    let (status, first_worker, _) =
        common::complete(&client, &url, &format!("{prefix}first")).await;
    assert_eq!(status, 200);
    // Wait until the frontend's own index holds the whole prefix on that
    // worker (the KV events reach it shortly after the answer). Asking the
    // frontend, not a subscriber of our own, is what makes this an event
    // to wait for rather than a race between two subscribers.
    let want = (tokenize::encode(&prefix).len() / 4) as u64;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let v = common::post_json(
                &client,
                &format!("{url}/router/cached"),
                &json!({"prompt": prefix}),
            )
            .await;
            let held = v["workers"].as_array().unwrap().iter().any(|w| {
                w["worker_id"].as_u64() == Some(first_worker) && w["blocks"].as_u64() >= Some(want)
            });
            if held {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the frontend learns the first request's blocks");
    for i in 0..5 {
        let (status, worker, cached) =
            common::complete(&client, &url, &format!("{prefix}again {i}")).await;
        assert_eq!(status, 200);
        assert_eq!(worker, first_worker, "request {i} went elsewhere");
        assert!(cached >= 16, "request {i}: only {cached} blocks cached");
    }

    // Kill the worker that holds the prefix: traffic moves on.
    let mut victim = workers.remove((first_worker - 1) as usize);
    victim.signal(libc::SIGKILL);
    victim.wait(); // reaped, so its pid is gone and discovery sees it dead
    let left = frontend.until_type("worker_left");
    assert_eq!(left["worker_id"], first_worker);
    for i in 0..6 {
        let (status, worker, _) =
            common::complete(&client, &url, &format!("{prefix}after {i}")).await;
        assert_eq!(status, 200, "request {i} after the kill");
        assert_ne!(worker, first_worker);
    }
    drop(victim);
}

/// The booked load both frontends show for every worker.
async fn booked(client: &reqwest::Client, url: &str) -> Vec<(u64, Value)> {
    let v = common::get_json(client, &format!("{url}/router/workers")).await;
    let mut out: Vec<(u64, Value)> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["worker_id"].as_u64().unwrap(), w["booked"].clone()))
        .collect();
    out.sort_by_key(|(id, _)| *id);
    out
}

/// Polls both frontends until they show the same booked load with
/// `requests` requests on the worker; returns how long it took.
async fn replicas_agree(client: &reqwest::Client, a: &str, b: &str, requests: u64) -> Duration {
    let since = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (va, vb) = (booked(client, a).await, booked(client, b).await);
            if va == vb
                && va
                    .iter()
                    .map(|(_, l)| l["requests"].as_u64().unwrap())
                    .sum::<u64>()
                    == requests
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the two frontends never agreed on {requests} request(s)"));
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frontends_with_replica_sync_agree_on_load() {
    let dir = tempfile::tempdir().unwrap();
    // A real-time worker, so a long request stays in flight.
    let _worker = start_worker(dir.path(), 9, &[]);
    let start_frontend = |id: &str| {
        let f = Proc::start(
            "frontend",
            dir.path(),
            &[
                "frontend",
                "--http-port",
                "0",
                "--router-replica-sync",
                "--router-id",
                id,
            ],
        );
        let url = f.until_type("ready")["url"].as_str().unwrap().to_owned();
        f.until_type("worker_joined");
        (f, url)
    };
    let (_fa, a) = start_frontend("1");
    let (_fb, b) = start_frontend("2");
    let client = reqwest::Client::new();
    replicas_agree(&client, &a, &b, 0).await;

    let mut response = client
        .post(format!("{a}/v1/completions"))
        .json(&json!({"prompt": "one two three four five six seven eight", "max_tokens": 3000, "stream": true}))
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap().expect("first token");
    let booked_after = replicas_agree(&client, &a, &b, 1).await;
    drop(response);
    let freed_after = replicas_agree(&client, &a, &b, 0).await;
    eprintln!("frontend B agreed {booked_after:?} after the booking was seen, {freed_after:?} after the end");
}
