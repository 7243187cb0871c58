//! `eventplane demo` end to end, small: every mode replays the first
//! requests of the shared trace through real workers and a frontend, and
//! the JSON report holds what the README's table shows.

mod common;

use std::path::Path;

#[test]
fn demo_replays_the_trace_in_every_mode() {
    let trace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/mooncake/conversation_trace.jsonl");
    if !trace.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing",
            trace.display()
        );
        eprintln!("skipping: {} not found", trace.display());
        return;
    }
    let trace = trace.to_str().expect("a UTF-8 path");
    let out = common::run_ok([
        "demo",
        "--requests",
        "200",
        "--speedup",
        "100",
        "--json",
        "--trace",
        trace,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["kv", "kv --no-kv-events", "round-robin", "random"]);
    for r in rows {
        assert_eq!(r["requests"], 200, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        let per_worker: u64 = r["requests_per_worker"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(per_worker, 200);
        // Block 0 (a shared system prompt) is cached on every worker after
        // its first request, so every mode hits something.
        assert!(r["hit_rate"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(v["oracle_hit_rate"].as_f64().unwrap() > 0.0);
}
