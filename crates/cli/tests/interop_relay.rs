//! The relay against a real foreign publisher: `tests/interop/vllm_publisher.py`
//! (pyzmq + msgspec, structs defined the way vLLM defines them) plays a
//! scenario in each encoding (arrays and maps): hashes above 2^63, an
//! unknown event type, a message only available through the replay socket,
//! garbage, and an engine restart. `eventplane worker --engine vllm` relays
//! it; our subscriber applies what it republishes to a prefix index, which
//! must hold exactly the blocks the script says the engine caches, at each
//! checkpoint.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Proc;
use eventplane::Event;
use eventplane_kv::event::KvEventBatch;
use eventplane_kv::{block_hashes, PrefixIndex, SeqHash, WorkerKey};

const WORKER: u64 = 7;
const WAIT: Duration = Duration::from_secs(30);

/// The sequence hash of the last block of each token list.
fn expected_blocks(line: &serde_json::Value) -> HashSet<SeqHash> {
    line["cached"]
        .as_array()
        .expect("cached")
        .iter()
        .map(|tokens| {
            let tokens: Vec<u32> = serde_json::from_value(tokens.clone()).unwrap();
            block_hashes(&tokens, 4, None)
                .last()
                .expect("a full block")
                .seq
        })
        .collect()
}

/// Applies relayed batches until the index holds exactly `expected`.
async fn until_index_holds(
    sub: &mut eventplane::Subscriber<KvEventBatch>,
    index: &mut PrefixIndex,
    expected: &HashSet<SeqHash>,
) {
    let worker = WorkerKey::new(WORKER);
    let deadline = Instant::now() + WAIT;
    loop {
        let exact = index.worker_cached_blocks(worker) == expected.len() as u64
            && expected.iter().all(|s| index.holds(worker, *s));
        if exact {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.recv()).await {
            Ok(Some(Event::Message(m))) => index.apply_batch(&m.value).unwrap(),
            Ok(Some(_)) => {}
            Ok(None) => panic!("subscriber ended"),
            Err(_) => panic!(
                "the relayed state never matched: index has {} blocks for the worker, expected {}",
                index.worker_cached_blocks(worker),
                expected.len()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_follows_a_vllm_style_publisher_in_both_encodings() {
    let root = common::workspace_root();
    let Some(python) = common::python(&root, &["zmq", "msgspec"]) else {
        return;
    };
    for encoding in ["array", "map"] {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Proc::spawn_interactive(
            "vllm publisher",
            Command::new(&python)
                .arg(root.join("tests/interop/vllm_publisher.py"))
                .args(["--encoding", encoding]),
        );
        let endpoints = engine.next_line();
        let worker_id = WORKER.to_string();
        let relay = Proc::start(
            "relay",
            dir.path(),
            &[
                "worker",
                "--engine",
                "vllm",
                "--worker-id",
                &worker_id,
                "--kv-events-endpoint",
                endpoints["pub"].as_str().unwrap(),
                "--replay-endpoint",
                endpoints["replay"].as_str().unwrap(),
                "--block-size",
                "4",
            ],
        );
        relay.until_type("ready");

        // Connected to the relay's publisher (its welcome heartbeat) before
        // the engine starts, so nothing is published before we listen.
        let (_plane, mut sub) = common::kv_events_joined(dir.path(), 1).await;
        engine.send("go");

        let mut index = PrefixIndex::new();
        let first = engine.until(|l| l["checkpoint"] == 1, |_| {});
        assert_eq!(
            first["replayed_from"], 3,
            "{encoding}: the relay asked to replay from 3"
        );
        until_index_holds(&mut sub, &mut index, &expected_blocks(&first)).await;

        engine.send("next");
        let second = engine.until(|l| l["checkpoint"] == 2, |_| {});
        until_index_holds(&mut sub, &mut index, &expected_blocks(&second)).await;
        assert_eq!(
            index.stats().clears,
            1,
            "{encoding}: the restart cleared once"
        );
        engine.send("stop");
    }
}
