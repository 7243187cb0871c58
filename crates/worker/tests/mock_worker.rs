//! A mock worker end to end, on the in-process event plane: its HTTP API
//! answers like OpenAI's, its KV events tell a router's index exactly what
//! it caches, its load metrics arrive, and it is registered in discovery.

use std::net::SocketAddr;
use std::time::Duration;

use eventplane::{Event, EventPlane, Scope};
use eventplane_kv::event::{KvEventBatch, LoadMetrics, KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC};
use eventplane_kv::{block_hashes, tokenize, PrefixIndex};
use eventplane_worker::mock::{
    self, registration_prefix, EngineConfig, MockWorkerSettings, RunningWorker, Timing,
    WorkerAdvert,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn settings(scope: &Scope) -> MockWorkerSettings {
    MockWorkerSettings {
        engine: EngineConfig {
            num_gpu_blocks: 256,
            block_size: 4,
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            timing: Timing {
                speedup: 1000.0,
                ..Timing::default()
            },
        },
        worker_id: 42,
        model: "m".into(),
        scope: scope.clone(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        queue: 64,
        load_debounce: Duration::from_millis(1),
        load_heartbeat: Duration::from_millis(100),
        vllm_events_port: None,
    }
}

async fn post(worker: &RunningWorker, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", worker.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn serves_openai_and_publishes_what_it_caches() {
    let plane = EventPlane::in_process();
    let scope = Scope::new("test", "backend").unwrap();
    let mut kv = plane
        .subscriber::<KvEventBatch>(&scope.channel(KV_EVENTS_TOPIC).unwrap())
        .await
        .unwrap();
    let mut load = plane
        .subscriber::<LoadMetrics>(&scope.channel(LOAD_METRICS_TOPIC).unwrap())
        .await
        .unwrap();
    let worker = mock::start(&plane, settings(&scope)).await.unwrap();

    // Registered, with its URL.
    let entries = plane
        .discovery()
        .list(&registration_prefix(&scope))
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let advert: WorkerAdvert = serde_json::from_value(entries[0].value.clone()).unwrap();
    assert_eq!(
        (advert.worker_id, advert.url.as_str(), advert.block_size),
        (42, worker.url.as_str(), 4)
    );

    // A completion: 10 words = 2 full blocks of 4 tokens, then the same
    // prompt again finds both cached.
    let prompt = "one two three four five six seven eight nine ten";
    let (status, first) = post(
        &worker,
        "/v1/completions",
        json!({"model": "m", "prompt": prompt, "max_tokens": 5}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["usage"]["prompt_tokens"], 10);
    assert_eq!(first["usage"]["completion_tokens"], 5);
    assert_eq!(
        first["choices"][0]["text"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        5
    );
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, second) = post(
        &worker,
        "/v1/completions",
        json!({"prompt": tokenize::encode(prompt), "max_tokens": 1}),
    )
    .await;
    assert_eq!(second["usage"]["prompt_tokens_details"]["cached_tokens"], 8);

    // The KV events put exactly those blocks in a router's index.
    let expected = block_hashes(&tokenize::encode(prompt), 4, None);
    let mut index = PrefixIndex::new();
    tokio::time::timeout(WAIT, async {
        while !expected
            .iter()
            .all(|b| index.holds(eventplane_kv::WorkerKey::new(42), b.seq))
        {
            match kv.recv().await {
                Some(Event::Message(m)) => index.apply_batch(&m.value).unwrap(),
                Some(_) => {}
                None => panic!("KV event stream ended"),
            }
        }
    })
    .await
    .expect("KV events for the prompt's blocks");
    assert_eq!(index.stats().inconsistencies(), 0);

    // Load metrics, with the pool's size.
    let metrics = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Message(m)) = load.recv().await {
                return m.value;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((metrics.worker_id, metrics.kv_blocks_total), (42, 256));

    // Chat.
    let (status, chat) = post(
        &worker,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["usage"]["completion_tokens"], 2);

    // Errors in OpenAI's shape.
    let (status, e) = post(
        &worker,
        "/v1/completions",
        json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("serves `m`"));
    let (status, _) = post(&worker, "/v1/completions", json!({"prompt": ""})).await;
    assert_eq!(status, 400);
    let (status, e) = post(
        &worker,
        "/v1/completions",
        json!({"prompt": [1, 2], "max_tokens": 5000}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV blocks"),
        "{e}"
    );
    let (status, _) = post(&worker, "/v1/chat/completions", json!({"messages": "nope"})).await;
    assert_eq!(status, 400);

    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{}/v1/models", worker.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "m");
    let health = client
        .get(format!("{}/health", worker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let text = client
        .get(format!("{}/metrics", worker.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("eventplane_worker_finished_total 3"),
        "{text}"
    );
    assert!(
        text.contains("eventplane_worker_cached_tokens_total 8"),
        "{text}"
    );
    // vLLM's gauge names too, so tools that read vLLM read the mock.
    assert!(text.contains("vllm:num_requests_running"), "{text}");
    assert!(text.contains("num_gpu_blocks=\"256\""), "{text}");
    worker.stop();
}

#[tokio::test]
async fn streams_server_sent_events_and_aborts_when_the_client_leaves() {
    let plane = EventPlane::in_process();
    let scope = Scope::new("test", "stream").unwrap();
    let worker = mock::start(&plane, settings(&scope)).await.unwrap();
    let client = reqwest::Client::new();

    let body = client
        .post(format!("{}/v1/chat/completions", worker.url))
        .json(&json!({"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // 3 tokens, the finish chunk, the usage chunk.
    assert_eq!(chunks.len(), 5, "{body}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);

    worker.stop();

    // A client that goes away mid-stream: the engine drops its request. At
    // real-time speed, 1,000 tokens take seconds: it cannot finish first.
    let mut real_time = settings(&Scope::new("test", "slow").unwrap());
    real_time.engine.timing.speedup = 1.0;
    let worker = mock::start(&plane, real_time).await.unwrap();
    let mut response = client
        .post(format!("{}/v1/completions", worker.url))
        .json(&json!({"prompt": "x y z", "max_tokens": 1000, "stream": true}))
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap().expect("a first chunk");
    drop(response);
    let stats = worker.engine.stats().clone();
    tokio::time::timeout(WAIT, async {
        while stats.aborted() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request was aborted");
    worker.stop();
}

/// The mock engine's vLLM-format socket through the relay: the relay's
/// republished state equals the engine's own KV events' state, through
/// evictions (a small pool) and shared prefixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_of_the_vllm_format_mirror_matches_the_engine() {
    use eventplane_kv::WorkerKey;
    use eventplane_worker::relay::{self, RankEndpoints, RelaySettings};

    let plane = EventPlane::start(eventplane::Config {
        transport: eventplane::TransportKind::Zmq,
        discovery: eventplane::DiscoveryKind::Mem,
        ..eventplane::Config::default()
    })
    .await
    .unwrap();
    let scope = Scope::new("test", "mirror").unwrap();
    let mut kv = plane
        .subscriber::<KvEventBatch>(&scope.channel(KV_EVENTS_TOPIC).unwrap())
        .await
        .unwrap();
    let mut load = plane
        .subscriber::<LoadMetrics>(&scope.channel(LOAD_METRICS_TOPIC).unwrap())
        .await
        .unwrap();
    let mut s = settings(&scope);
    s.engine.num_gpu_blocks = 24;
    s.vllm_events_port = Some(0);
    let worker = mock::start(&plane, s).await.unwrap();
    let (events, replay) = worker.vllm_endpoints.clone().unwrap();
    let relay = relay::start(
        &plane,
        RelaySettings {
            worker_id: 99,
            scope: scope.clone(),
            ranks: vec![RankEndpoints {
                events,
                replay: Some(replay),
            }],
            topic: String::new(),
            engine_url: worker.url.clone(),
            model: "m".into(),
            block_size: 4,
            max_tracked: 10_000,
            replay_timeout: Duration::from_secs(5),
            load_interval: Some(Duration::from_millis(50)),
            num_gpu_blocks: 0,
        },
    )
    .await
    .unwrap();
    // Both publishers heard before the engine does anything.
    let mut joined = 0;
    tokio::time::timeout(WAIT, async {
        while joined < 2 {
            if let Some(Event::Notice(eventplane::Notice::Joined { .. })) = kv.recv().await {
                joined += 1;
            }
        }
    })
    .await
    .expect("joined both publishers");

    // Prompts sharing prefixes, more than the pool holds: blocks are shared,
    // evicted and stored again.
    for i in 0..30u32 {
        let prompt: Vec<u32> = (0..12)
            .map(|t| (i % 4) * 100 + t)
            .chain([1000 + i, 2000 + i, 3000 + i, 4000 + i])
            .collect();
        let (status, _) = post(
            &worker,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (engine, relayed) = (WorkerKey::new(42), WorkerKey::new(99));
    let mut index = PrefixIndex::new();
    let mut stored = 0;
    tokio::time::timeout(WAIT, async {
        loop {
            let e = index.worker_cached_blocks(engine);
            if e > 0 && e == index.worker_cached_blocks(relayed) && stored > e {
                let mut same = true;
                let probe: Vec<_> = (0..30u32)
                    .flat_map(|i| {
                        let prompt: Vec<u32> = (0..12)
                            .map(|t| (i % 4) * 100 + t)
                            .chain([1000 + i, 2000 + i, 3000 + i, 4000 + i])
                            .collect();
                        block_hashes(&prompt, 4, None)
                    })
                    .collect();
                for b in probe {
                    same &= index.holds(engine, b.seq) == index.holds(relayed, b.seq);
                }
                if same {
                    return;
                }
            }
            if let Some(Event::Message(m)) = kv.recv().await {
                if m.value.worker_id == 42 {
                    for e in &m.value.events {
                        if let eventplane_kv::KvEvent::Stored { blocks, .. } = e {
                            stored += blocks.len() as u64;
                        }
                    }
                }
                index.apply_batch(&m.value).unwrap();
            }
        }
    })
    .await
    .expect("the relayed state converged to the engine's");
    assert_eq!(index.stats().inconsistencies(), 0, "{:?}", index.stats());
    let s = relay.stats()[0];
    assert_eq!(
        (s.lost, s.decode_errors, s.unhashable_blocks),
        (0, 0, 0),
        "{s:?}"
    );
    // The relay also reports the engine's load, read from its metrics.
    let relayed_load = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Message(m)) = load.recv().await {
                if m.value.worker_id == 99 {
                    return m.value;
                }
            }
        }
    })
    .await
    .expect("load metrics from the relay");
    assert_eq!(
        relayed_load.kv_blocks_total, 24,
        "read from vllm:cache_config_info"
    );
    relay.stop();
    worker.stop();
}
