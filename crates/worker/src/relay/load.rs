//! Load metrics of a real engine, for the relay: read from the engine's
//! Prometheus endpoint (`GET {engine_url}/metrics`) once a second and
//! published as our [`LoadMetrics`].
//!
//! Metrics read (summed over label sets, e.g. over an engine's ranks):
//!
//! | ours | vLLM | SGLang |
//! |---|---|---|
//! | active requests | `vllm:num_requests_running` | `sglang:num_running_reqs` |
//! | waiting requests | `vllm:num_requests_waiting` | `sglang:num_queue_reqs` |
//! | KV usage (fraction) | `vllm:kv_cache_usage_perc`, else `vllm:gpu_cache_usage_perc` | `sglang:token_usage` |
//! | KV blocks total | label `num_gpu_blocks` of `vllm:cache_config_info` | — |
//!
//! Without a block total from the engine, `--num-gpu-blocks` stands in.
//! The exposition format is parsed here because only these few samples are
//! needed: a line is `name{labels} value [timestamp]` or `name value`.
//! When the engine cannot be reached, nothing is published (silence, which
//! routers notice, rather than a made-up idle load); failures are counted
//! and logged once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventplane::Publisher;
use eventplane_kv::event::{LoadMetrics, EVENT_VERSION};

/// What the engine's metrics say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// Requests running.
    pub running: Option<f64>,
    /// Requests waiting.
    pub waiting: Option<f64>,
    /// Fraction of the KV cache in use (0 to 1).
    pub kv_usage: Option<f64>,
    /// KV blocks in the engine's pool.
    pub num_gpu_blocks: Option<u64>,
}

/// One sample: name, raw label text (without braces), value.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            let close = closing_brace(&line[name_end..])?;
            (
                &line[name_end + 1..name_end + close],
                &line[name_end + close + 1..],
            )
        } else {
            ("", &line[name_end..])
        };
        let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
        Some((name, labels, value))
    })
}

/// Index of the `}` closing the label set that `s` starts with, skipping
/// braces inside quoted label values.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The value of label `key` in raw label text.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// Reads the samples above from an engine's `/metrics` text.
pub fn parse_engine_metrics(text: &str) -> EngineLoad {
    let mut load = EngineLoad::default();
    let mut legacy_usage: Option<f64> = None;
    let mut usage_sum = (0.0, 0u32);
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    for (name, labels, value) in samples(text) {
        match name {
            "vllm:num_requests_running" | "sglang:num_running_reqs" => {
                add(&mut load.running, value)
            }
            "vllm:num_requests_waiting" | "sglang:num_queue_reqs" => add(&mut load.waiting, value),
            "vllm:kv_cache_usage_perc" | "sglang:token_usage" => {
                usage_sum = (usage_sum.0 + value, usage_sum.1 + 1);
            }
            "vllm:gpu_cache_usage_perc" => {
                legacy_usage = Some(legacy_usage.unwrap_or(0.0).max(value))
            }
            "vllm:cache_config_info" => {
                if let Some(n) = label(labels, "num_gpu_blocks").and_then(|n| n.parse::<u64>().ok())
                {
                    load.num_gpu_blocks = Some(load.num_gpu_blocks.unwrap_or(0) + n);
                }
            }
            _ => {}
        }
    }
    load.kv_usage = if usage_sum.1 > 0 {
        Some(usage_sum.0 / f64::from(usage_sum.1))
    } else {
        legacy_usage
    };
    load
}

/// Turns an engine's load into our message.
pub fn to_load_metrics(worker_id: u64, load: &EngineLoad, fallback_blocks: u64) -> LoadMetrics {
    let total = load.num_gpu_blocks.unwrap_or(fallback_blocks);
    let used = load
        .kv_usage
        .map_or(0, |u| (u.clamp(0.0, 1.0) * total as f64).round() as u64);
    LoadMetrics {
        version: EVENT_VERSION,
        worker_id,
        dp_rank: 0,
        kv_blocks_used: used,
        kv_blocks_total: total,
        active_requests: load.running.unwrap_or(0.0).max(0.0) as u32,
        waiting_requests: load.waiting.unwrap_or(0.0).max(0.0) as u32,
        active_prefill_tokens: 0,
    }
}

/// Counters of the scraper.
#[derive(Debug, Default)]
pub struct ScrapeStats {
    /// Successful scrapes published.
    pub published: AtomicU64,
    /// Scrapes that failed (engine unreachable, bad status).
    pub failures: AtomicU64,
}

/// Scrapes `{engine_url}/metrics` every `interval` and publishes until
/// `stop`.
pub async fn scrape_loop(
    engine_url: String,
    worker_id: u64,
    fallback_blocks: u64,
    publisher: Publisher,
    interval: Duration,
    stop: Arc<AtomicBool>,
    stats: Arc<ScrapeStats>,
) {
    let client = match reqwest::Client::builder()
        .timeout(interval.max(Duration::from_secs(1)))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client for engine metrics");
            return;
        }
    };
    let url = format!("{}/metrics", engine_url.trim_end_matches('/'));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let text = match client
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
        {
            Ok(r) => r.text().await,
            Err(e) => Err(e),
        };
        match text {
            Ok(text) => {
                let load = parse_engine_metrics(&text);
                if load.running.is_none() && load.waiting.is_none() && load.kv_usage.is_none() {
                    if stats.failures.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(%url, "the engine's metrics have none of the vllm:/sglang: load gauges; no load published (logged once)");
                    }
                    continue;
                }
                let m = to_load_metrics(worker_id, &load, fallback_blocks);
                if publisher.publish(&m).is_ok() {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if stats.failures.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(%url, error = %e, "cannot read the engine's metrics; no load published until it answers (logged once)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_metrics_summed_over_ranks() {
        let text = r#"# HELP vllm:num_requests_running Number of requests.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:cache_config_info{block_size="16",model_name="a{b}",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",model_name="a\"}",num_gpu_blocks="1000"} 1.0
other_metric 5
"#;
        let load = parse_engine_metrics(text);
        assert_eq!(load.running, Some(5.0));
        assert_eq!(load.waiting, Some(7.0));
        assert_eq!(load.kv_usage, Some(0.5));
        assert_eq!(load.num_gpu_blocks, Some(2000));
        let m = to_load_metrics(9, &load, 0);
        assert_eq!(
            (
                m.kv_blocks_used,
                m.kv_blocks_total,
                m.active_requests,
                m.waiting_requests
            ),
            (1000, 2000, 5, 7)
        );
    }

    #[test]
    fn reads_sglang_and_legacy_names_and_tolerates_junk() {
        let load = parse_engine_metrics(
            "sglang:num_running_reqs 4\nsglang:num_queue_reqs 1\nsglang:token_usage 0.1\ngarbage{ 1\nx{a=\"1\"} notanumber\n",
        );
        assert_eq!(
            (load.running, load.waiting, load.kv_usage),
            (Some(4.0), Some(1.0), Some(0.1))
        );
        let m = to_load_metrics(1, &load, 500);
        assert_eq!((m.kv_blocks_used, m.kv_blocks_total), (50, 500));
        let legacy = parse_engine_metrics("vllm:gpu_cache_usage_perc{x=\"y\"} 0.3 1700000000\n");
        assert_eq!(legacy.kv_usage, Some(0.3));
    }
}
