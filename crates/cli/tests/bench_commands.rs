//! The bench commands end to end, small: `bench index` on workloads written
//! here (the JSON it prints, its verdict on the fingerprint, its errors),
//! `bench relay` (every engine block event arrives, none lost), a short
//! `bench transport` (its rows, the control's, and its flags' checks), and a
//! transport bench stopped by a signal (its `nats-server` goes with it).

mod common;

use std::process::Command;

/// Three workers; worker 1 holds a 3-block chain, worker 2 its first two
/// blocks, worker 3 loses its copy. Longest matches: 3, then 2 after worker
/// 1 evicts the tail, then 0 for an unknown prompt: fingerprint 5.
const WORKLOAD: &str = r#"{"op":"header","fingerprint":5}
{"op":"store","worker":1,"parent":null,"blocks":[[10,10],[11,1011],[12,1012]]}
{"op":"store","worker":2,"parent":null,"blocks":[[10,10],[11,1011]]}
{"op":"store","worker":3,"parent":null,"blocks":[[10,10]]}
{"op":"remove","worker":3,"blocks":[10]}
{"op":"query","blocks":[10,11,12,13]}
{"op":"remove","worker":1,"blocks":[1012]}
{"op":"query","blocks":[10,11,12]}
{"op":"clear","worker":2}
{"op":"query","blocks":[99]}
"#;

fn bench(workload: &str, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.kvops.jsonl");
    std::fs::write(&path, workload).unwrap();
    Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(["bench", "index", "--workload"])
        .arg(&path)
        .args(["--runs", "2"])
        .args(extra)
        .env("EVENTPLANE_LOG", "warn")
        .output()
        .unwrap()
}

/// The sequence hashes above are not XXH3 chains: rewrite them so they are,
/// since lookups chain local hashes the documented way.
fn chained(workload: &str) -> String {
    use eventplane_kv::hash::{chain, LocalHash};
    let s1 = chain(Some(eventplane_kv::SeqHash(10)), LocalHash(11)).0;
    let s2 = chain(Some(eventplane_kv::SeqHash(s1)), LocalHash(12)).0;
    workload
        .replace("1011", &s1.to_string())
        .replace("1012", &s2.to_string())
}

#[test]
fn prints_one_json_object_and_checks_the_fingerprint() {
    for extra in [&[][..], &["--concurrent-queries"][..]] {
        let out = bench(&chained(WORKLOAD), extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for field in [
            "workload",
            "ops",
            "block_ops",
            "block_ops_per_s",
            "query_p50_us",
            "query_p99_us",
            "query_max_us",
            "cached_blocks",
            "index_bytes",
            "bytes_per_cached_block",
            "fingerprint",
            "fingerprint_expected",
            "fingerprint_ok",
        ] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        assert_eq!(v["ops"], 9);
        assert_eq!(v["block_ops"], 8);
        assert_eq!(v["fingerprint"], 5);
        assert_eq!(v["fingerprint_ok"], true);
        // Worker 1 keeps two blocks, worker 2 none, worker 3 none.
        assert_eq!(v["cached_blocks"], 2);
        assert!(v["index_bytes"].as_u64().unwrap() > 0);
        assert_eq!(v["concurrent_queries"].is_null(), extra.is_empty());
    }
}

#[test]
fn a_wrong_fingerprint_fails_the_run() {
    let out = bench(
        &chained(WORKLOAD).replace("\"fingerprint\":5", "\"fingerprint\":6"),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fingerprint_ok"], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fingerprint 5 differs from the workload's 6"),
        "{stderr}"
    );
}

#[test]
fn a_bad_workload_is_named_with_its_line() {
    let out = bench(
        "{\"op\":\"query\",\"blocks\":[1]}\n{\"op\":\"teleport\"}\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("w.kvops.jsonl:2:"), "{stderr}");
    let missing = Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(["bench", "index", "--workload", "/nonexistent/w.jsonl"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/w.jsonl"));
}

#[test]
fn relay_bench_relays_every_block_event() {
    let out = common::run_ok(["bench", "relay", "--batches", "200", "--runs", "1"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 200 batches of 16 stored blocks, 199 removals of 15.
    assert_eq!(v["block_events"], 200 * 16 + 199 * 15);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["decode_errors"], 0);
    assert_eq!(v["unhashable_blocks"], 0);
    assert!(v["block_events_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn transport_bench_runs_a_control_beside_its_baseline() {
    // In process only, latency only, six short rounds (the fewest that give
    // an interval): mem against raw libzmq, and raw libzmq's control.
    let out = common::run_ok(
        "bench transport --transports mem --sizes 100 --two-process false \
         --latency-only --latency-rounds 6 --latency-s 0.1 --control --json"
            .split_whitespace(),
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["transport"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["eventplane-mem", "raw-libzmq", "raw-libzmq-control"]
    );
    for r in &rows {
        // Every row names what its ratios compare with: the control too,
        // never itself.
        assert_eq!(r["baseline"], "raw-libzmq", "{r}");
        assert_eq!(r["latency_lost"], 0, "{r}");
        assert!(r["p99_us"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The baseline against itself is 1 by definition; its control is a
    // ratio like ours, measured.
    assert_eq!(rows[1]["p99_vs_raw"], 1.0);
    assert!(rows[2]["p99_vs_raw"].as_f64().unwrap() > 0.0);
    // Ours and the control are judged against the target from the interval
    // of their paired ratios, which holds their median; the baseline is not.
    for r in [&rows[0], &rows[2]] {
        let paired = r["p99_vs_raw_paired"].as_f64().unwrap();
        let interval = r["p99_vs_raw_paired_interval"].as_array().unwrap();
        let (lo, hi) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
        assert!(lo <= paired && paired <= hi, "{r}");
        let verdict = r["p99_target"].as_str().unwrap();
        assert!(["met", "missed", "unresolved"].contains(&verdict), "{r}");
        assert_eq!(verdict == "met", hi <= 1.2, "{r}");
        // No throughput rounds ran: nothing to pair or judge.
        assert!(r["throughput_vs_raw_paired_interval"].is_null(), "{r}");
        assert!(r["throughput_target"].is_null(), "{r}");
    }
    assert!(rows[1]["p99_vs_raw_paired_interval"].is_null());
    assert!(rows[1]["p99_target"].is_null());
}

#[test]
fn transport_bench_refuses_a_trial_of_no_time() {
    for flag in ["--latency-s", "--trial-s"] {
        let out = Command::new(env!("CARGO_BIN_EXE_eventplane"))
            .args(["bench", "transport", flag, "0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("expected a number of seconds > 0, got `0`"),
            "{stderr}"
        );
    }
}

/// The `nats-server` a transport bench starts among the children of `bench`.
fn nats_server_child(bench: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{bench}/task")).ok()?;
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "nats-server")
        })
}

/// SIGTERM in the middle of a NATS bench: the bench says it was interrupted
/// and takes the `nats-server` it started down with it (a signal's default
/// action would have ended the bench without running the server's drop,
/// leaving it running).
#[test]
fn a_signal_stops_the_transport_bench_and_its_nats_server() {
    use std::io::{BufRead, BufReader, Read};
    let mut bench = Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(["bench", "transport", "--transports", "nats"])
        .args(["--sizes", "100"])
        .args(["--two-process", "false", "--latency-only"])
        .args(["--latency-rounds", "50", "--latency-s", "10"])
        .env("EVENTPLANE_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(bench.stderr.take().unwrap());
    let mut line = String::new();
    // The bench connects to its server only once the server is ready.
    while !line.contains("connected to NATS") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the bench ended before connecting"
        );
    }
    let server = nats_server_child(bench.id()).expect("the bench's nats-server");
    // Should the bench leave it behind after all, the test does not.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if std::path::Path::new(&format!("/proc/{}", self.0)).exists() {
                // SAFETY: kill(2); at worst the pid is gone already.
                unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
            }
        }
    }
    let _cleanup = KillOnDrop(server);
    // SAFETY: kill(2) on a child we have not reaped.
    unsafe { libc::kill(bench.id() as i32, libc::SIGTERM) };
    let status = bench.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(!status.success());
    assert!(rest.contains("interrupted"), "{rest}");
    // The bench killed and reaped its server before it exited.
    assert!(
        !std::path::Path::new(&format!("/proc/{server}")).exists(),
        "nats-server {server} outlived its bench"
    );
}
