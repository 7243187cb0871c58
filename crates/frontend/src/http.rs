//! The frontend's OpenAI-compatible API: it reads just enough of each
//! request to tokenize its prompt (the built-in tokenizer and chat template
//! the mock engine uses; token-id prompts pass through), asks the router for
//! a worker, forwards the request body unchanged to the same path on that
//! worker, and streams the worker's answer back as it comes.
//!
//! The request's booking follows the answer: prefill completes at the
//! first byte from the worker, and the booking is freed when the answer
//! ends, fails, or the client goes away (the body stream is dropped).
//!
//! `GET /router/workers` shows the router's view of each worker: its URL,
//! the load booked on it and its latest load report.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as HttpRouter};
use eventplane_kv::router::RequestKey;
use eventplane_kv::tokenize;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use crate::router::Router;
use crate::tokenizer::PromptTokenizer;

/// Counters served on `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct ApiStats {
    /// Requests proxied to a worker.
    pub proxied: Counter,
    /// Requests refused for lack of workers.
    pub no_worker: Counter,
    /// Requests whose worker could not be reached.
    pub upstream_errors: Counter,
    /// Requests refused as malformed.
    pub bad_requests: Counter,
}

impl ApiStats {
    /// Adds the counters to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxied",
            "Requests proxied to a worker",
            self.proxied.clone(),
        );
        registry.register(
            "no_worker",
            "Requests refused: no worker known",
            self.no_worker.clone(),
        );
        registry.register(
            "upstream_errors",
            "Requests whose worker could not be reached",
            self.upstream_errors.clone(),
        );
        registry.register(
            "bad_requests",
            "Requests refused as malformed",
            self.bad_requests.clone(),
        );
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The router (locked briefly per request).
    pub router: Arc<Mutex<Router>>,
    /// HTTP client to the workers (keeps connections).
    pub client: reqwest::Client,
    /// Counters.
    pub stats: ApiStats,
    /// Everything `/metrics` serves.
    pub metrics: Arc<Registry>,
    /// With replica sync: where our booking changes go.
    pub sync: Option<eventplane::Publisher>,
    /// Prompts to token ids.
    pub tokenizer: Arc<PromptTokenizer>,
}

/// Publishes the router's queued booking changes (replica sync).
pub fn publish_outbox(router: &mut Router, sync: &Option<eventplane::Publisher>) {
    if let Some(p) = sync {
        for e in router.take_outbox() {
            if let Err(e) = p.publish(&e) {
                tracing::debug!(error = %e, "publishing a booking change failed");
            }
        }
    }
}

/// The API's routes.
pub fn routes(state: ApiState) -> HttpRouter {
    HttpRouter::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/router/workers", get(router_workers))
        .route("/router/cached", post(router_cached))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

/// The prompt of a completion request, as token ids.
fn completion_tokens(t: &PromptTokenizer, v: &Value) -> Result<Vec<u32>, String> {
    match v.get("prompt") {
        Some(Value::String(text)) => t.encode(text),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| format!("`prompt` holds {t}, not a token id"))
            })
            .collect(),
        Some(other) => Err(format!(
            "`prompt` must be a string or an array of token ids, got {other}"
        )),
        None => Err("missing `prompt`".into()),
    }
}

/// The prompt of a chat request, rendered and tokenized.
fn chat_tokens(t: &PromptTokenizer, v: &Value) -> Result<Vec<u32>, String> {
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` must be an array")?;
    let mut pairs = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or("a message needs a string `role`")?;
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or("a message needs a string `content`")?;
        pairs.push((role, content));
    }
    t.encode(&tokenize::render_chat(pairs))
}

async fn completions(State(state): State<ApiState>, body: Bytes) -> Response {
    forward(state, "/v1/completions", body, completion_tokens).await
}

async fn chat_completions(State(state): State<ApiState>, body: Bytes) -> Response {
    forward(state, "/v1/chat/completions", body, chat_tokens).await
}

/// Frees a booking when the answer ends, however it ends.
struct Booking {
    router: Arc<Mutex<Router>>,
    sync: Option<eventplane::Publisher>,
    key: RequestKey,
    first_byte: bool,
}

impl Booking {
    fn on_chunk(&mut self) {
        if !self.first_byte {
            self.first_byte = true;
            if let Ok(mut r) = self.router.lock() {
                r.prefill_completed(&self.key, Instant::now());
                publish_outbox(&mut r, &self.sync);
            }
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        if let Ok(mut r) = self.router.lock() {
            r.free(&self.key);
            publish_outbox(&mut r, &self.sync);
        }
    }
}

async fn forward(
    state: ApiState,
    path: &str,
    body: Bytes,
    tokens_of: fn(&PromptTokenizer, &Value) -> Result<Vec<u32>, String>,
) -> Response {
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            state.stats.bad_requests.inc();
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let tokens = match tokens_of(&state.tokenizer, &parsed) {
        Ok(t) => t,
        Err(e) => {
            state.stats.bad_requests.inc();
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", e);
        }
    };
    let routed = state.router.lock().ok().and_then(|mut r| {
        let routed = r.route(&tokens, Instant::now());
        publish_outbox(&mut r, &state.sync);
        routed
    });
    let Some(routed) = routed else {
        state.stats.no_worker.inc();
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "no worker is available (none registered in discovery)",
        );
    };
    let mut booking = Booking {
        router: Arc::clone(&state.router),
        sync: state.sync.clone(),
        key: routed.key.clone(),
        first_byte: false,
    };
    let url = format!("{}{path}", routed.url);
    let upstream = match state
        .client
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            state.stats.upstream_errors.inc();
            tracing::warn!(%url, error = %e, "worker unreachable");
            return error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("worker {url} unreachable: {e}"),
            );
        }
    };
    state.stats.proxied.inc();
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = upstream
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let stream = upstream.bytes_stream().map(move |chunk| {
        booking.on_chunk();
        chunk
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response.headers_mut().insert(
        "x-eventplane-worker",
        HeaderValue::from(routed.worker.worker_id),
    );
    response.headers_mut().insert(
        "x-eventplane-cached-blocks",
        HeaderValue::from(routed.cached_blocks),
    );
    response
}

async fn models(State(state): State<ApiState>) -> Json<Value> {
    let mut models: Vec<String> = state
        .router
        .lock()
        .map(|r| r.workers().map(|w| w.model.clone()).collect())
        .unwrap_or_default();
    models.sort();
    models.dedup();
    let data: Vec<Value> = models
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": "eventplane"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The router's view of each worker: where it is, the load booked on it (by
/// this replica and, with replica sync, its peers) and its latest report.
async fn router_workers(State(state): State<ApiState>) -> Response {
    let Ok(r) = state.router.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "router lock poisoned",
        );
    };
    let workers: Vec<Value> = r
        .workers()
        .flat_map(|w| {
            (0..w.data_parallel_size.max(1)).map(move |rank| (w, rank))
        })
        .map(|(w, rank)| {
            let key = eventplane_kv::WorkerKey {
                worker_id: w.worker_id,
                dp_rank: rank,
            };
            let booked = r.booked(key);
            let reported = r.reported_load(key);
            json!({
                "worker_id": w.worker_id, "dp_rank": rank, "url": w.url, "model": w.model,
                "booked": {"requests": booked.requests, "prefill_tokens": booked.prefill_tokens, "blocks": booked.blocks},
                "reported": reported.map(|m| json!({"kv_blocks_used": m.kv_blocks_used, "kv_blocks_total": m.kv_blocks_total,
                    "active_requests": m.active_requests, "waiting_requests": m.waiting_requests})),
            })
        })
        .collect();
    Json(json!({"workers": workers})).into_response()
}

/// `POST /router/cached` with a completion body (`{"prompt": ...}`): how many
/// leading blocks of the prompt each worker rank holds, as the router knows
/// it. Routes and books nothing.
async fn router_cached(State(state): State<ApiState>, body: Bytes) -> Response {
    let tokens = match serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("the body is not JSON: {e}"))
        .and_then(|v| completion_tokens(&state.tokenizer, &v))
    {
        Ok(t) => t,
        Err(e) => {
            state.stats.bad_requests.inc();
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", e);
        }
    };
    let Ok(mut r) = state.router.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "router lock poisoned",
        );
    };
    let found: Vec<Value> = r
        .cached_prefix(&tokens, Instant::now())
        .into_iter()
        .map(
            |(w, blocks)| json!({"worker_id": w.worker_id, "dp_rank": w.dp_rank, "blocks": blocks}),
        )
        .collect();
    Json(json!({"block_size": r.block_size(), "workers": found})).into_response()
}

async fn health(State(state): State<ApiState>) -> Response {
    let workers = state
        .router
        .lock()
        .map(|r| r.workers().count())
        .unwrap_or(0);
    Json(json!({"status": "ok", "workers": workers})).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    eventplane_worker::mock::http::metrics_response(&state.metrics)
}
