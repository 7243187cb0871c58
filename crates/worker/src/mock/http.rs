//! The mock engine's OpenAI-compatible HTTP API (axum):
//!
//! - `POST /v1/completions`: `prompt` is a string (built-in tokenizer) or an
//!   array of token ids; `max_tokens` (default 16); `stream` (server-sent
//!   events, ending `data: [DONE]`; with `stream_options.include_usage` a
//!   last chunk carries `usage`).
//! - `POST /v1/chat/completions`: `messages` (`role`, `content` string) are
//!   rendered by the built-in chat template
//!   ([`eventplane_kv::tokenize::render_chat`]) and tokenized; `max_tokens` or `max_completion_tokens` (default 16);
//!   `stream` as above.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! `usage.prompt_tokens_details.cached_tokens` reports the prompt tokens
//! found in the prefix cache, as vLLM does. Errors use OpenAI's shape,
//! `{"error": {"message", "type", "code"}}`: 400 for a bad request, 404 for
//! another model's name, 503 when the engine's queue is full.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventplane_kv::tokenize;
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::Usage;
use super::service::{Delta, EngineHandle, SubmitError};

/// Default `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The engine task.
    pub engine: EngineHandle,
    /// The model name served.
    pub model: String,
    /// Everything `/metrics` serves.
    pub metrics: Arc<prometheus_client::registry::Registry>,
}

/// The router serving the API.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// An OpenAI-shaped error.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_busy",
            message: e.to_string(),
        }
    }
}

/// Which endpoint's JSON shapes to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Completion,
    Chat,
}

impl Flavor {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Flavor::Completion, _) => "text_completion",
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Chat, true) => "chat.completion.chunk",
        }
    }
}

fn check_model(state: &ApiState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != &state.model => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            message: format!(
                "the model `{m}` does not exist; this worker serves `{}`",
                state.model
            ),
        }),
        _ => Ok(()),
    }
}

async fn completions(
    State(state): State<ApiState>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    check_model(&state, &req.model)?;
    let prompt = match req.prompt {
        Prompt::Text(t) => tokenize::encode(&t),
        Prompt::Tokens(t) => t,
    };
    let include_usage = req.stream_options.unwrap_or_default().include_usage;
    generate(
        &state,
        Flavor::Completion,
        prompt,
        req.max_tokens,
        req.stream,
        include_usage,
    )
    .await
}

async fn chat_completions(
    State(state): State<ApiState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    check_model(&state, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("`messages` is empty"));
    }
    let prompt = tokenize::encode(&tokenize::render_chat(
        req.messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    ));
    let include_usage = req.stream_options.unwrap_or_default().include_usage;
    generate(
        &state,
        Flavor::Chat,
        prompt,
        req.max_completion_tokens.or(req.max_tokens),
        req.stream,
        include_usage,
    )
    .await
}

async fn generate(
    state: &ApiState,
    flavor: Flavor,
    prompt: Vec<u32>,
    max_tokens: Option<u32>,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let max_tokens = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    let mut rx = state.engine.submit(prompt, max_tokens)?;
    let meta = Meta {
        id: format!("cmpl-{:016x}", rand_id()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: state.model.clone(),
        flavor,
    };
    if stream {
        // A rejection must be an HTTP error, not a stream: wait for the
        // first delta before committing to SSE.
        let first = rx.recv().await;
        if let Some(Delta::Rejected(e)) = &first {
            return Err(ApiError::bad_request(e.to_string()));
        }
        let events = sse_stream(meta, first, rx, include_usage);
        return Ok(Sse::new(events).into_response());
    }
    let mut tokens = Vec::new();
    while let Some(delta) = rx.recv().await {
        match delta {
            Delta::Token(t) => tokens.push(t),
            Delta::Rejected(e) => return Err(ApiError::bad_request(e.to_string())),
            Delta::Finished(usage) => {
                let text = tokenize::decode(&tokens);
                let choice = match flavor {
                    Flavor::Completion => {
                        json!({"index": 0, "text": text, "finish_reason": "length", "logprobs": null})
                    }
                    Flavor::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
                    }
                };
                let body = json!({
                    "id": meta.id, "object": flavor.object(false), "created": meta.created,
                    "model": meta.model, "choices": [choice], "usage": usage_json(&usage),
                });
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::from(SubmitError::Stopped))
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    flavor: Flavor,
}

impl Meta {
    fn chunk(&self, text: &str, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.flavor {
            Flavor::Completion => json!({"index": 0, "text": text, "finish_reason": finish}),
            Flavor::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.flavor.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn sse_stream(
    meta: Meta,
    first: Option<Delta>,
    rx: mpsc::Receiver<Delta>,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct St {
        meta: Meta,
        pending: Option<Delta>,
        rx: mpsc::Receiver<Delta>,
        sent: usize,
        finished: Option<Usage>,
        done: bool,
        include_usage: bool,
    }
    let st = St {
        meta,
        pending: first,
        rx,
        sent: 0,
        finished: None,
        done: false,
        include_usage,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(usage) = st.finished.take() {
            // After the last token: the usage chunk (if asked), then [DONE].
            if st.include_usage {
                let mut chunk = st.meta.chunk("", false, None);
                chunk["choices"] = json!([]);
                chunk["usage"] = usage_json(&usage);
                return Some((Ok(Event::default().data(chunk.to_string())), st));
            }
        }
        let delta = match st.pending.take() {
            Some(d) => Some(d),
            None => st.rx.recv().await,
        };
        let event = match delta {
            Some(Delta::Token(t)) => {
                let word = tokenize::decode_one(t);
                let text = if st.sent == 0 {
                    word
                } else {
                    format!(" {word}")
                };
                let chunk = st.meta.chunk(&text, st.sent == 0, None);
                st.sent += 1;
                Event::default().data(chunk.to_string())
            }
            Some(Delta::Finished(usage)) => {
                st.finished = Some(usage);
                let chunk = st.meta.chunk("", st.sent == 0, Some("length"));
                Event::default().data(chunk.to_string())
            }
            Some(Delta::Rejected(_)) | None => {
                st.done = true;
                Event::default().data("[DONE]")
            }
        };
        Some((Ok(event), st))
    })
}

async fn models(State(state): State<ApiState>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "eventplane"}]}),
    )
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    metrics_response(&state.metrics)
}

/// `registry` in the OpenMetrics text format, as a `/metrics` response.
pub fn metrics_response(registry: &prometheus_client::registry::Registry) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Exposes the event plane's transport state on every scrape:
/// `transport_nats_connected` (0 or 1) and the NATS connection's totals
/// (`transport_nats_{connects,disconnects,hold_dropped,
/// too_large,slow_consumer_events,server_errors,resent}_total`), and the
/// discovery backend's health figures (`discovery_etcd_leases_lost_total`,
/// ...), under the registry's prefix. Nothing for transports without a
/// connection (ZMQ, in-process) or backends without figures.
pub fn register_transport_metrics(
    registry: &mut prometheus_client::registry::Registry,
    probe: eventplane::TransportProbe,
) {
    registry.register_collector(Box::new(TransportCollector(probe)));
}

#[derive(Debug)]
struct TransportCollector(eventplane::TransportProbe);

impl prometheus_client::collector::Collector for TransportCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let (backend, figures) = self.0.discovery_metrics();
        for f in figures {
            let name = format!("discovery_{backend}_{}", f.name);
            if f.gauge {
                let g = ConstGauge::new(f.value as i64);
                g.encode(encoder.encode_descriptor(&name, f.help, None, g.metric_type())?)?;
            } else {
                let c = ConstCounter::new(f.value);
                c.encode(encoder.encode_descriptor(&name, f.help, None, c.metric_type())?)?;
            }
        }
        let eventplane::TransportStats::Nats(n) = self.0.stats() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(i64::from(n.connected));
        gauge.encode(encoder.encode_descriptor(
            "transport_nats_connected",
            "1 while connected to a NATS server",
            None,
            gauge.metric_type(),
        )?)?;
        for (name, help, value) in [
            ("transport_nats_connects", "NATS connections established (the first and every reconnect)", n.connects),
            ("transport_nats_disconnects", "NATS disconnections", n.disconnects),
            ("transport_nats_hold_dropped", "envelopes dropped because a publisher's hold queue was full, during an outage or an overload (reported as gaps)", n.hold_dropped),
            ("transport_nats_too_large", "envelopes refused as larger than the server's max_payload", n.too_large),
            ("transport_nats_slow_consumer_events", "times a subscription fell behind and the client dropped for it", n.slow_consumer_events),
            ("transport_nats_server_errors", "errors reported by the NATS server", n.server_errors),
            ("transport_nats_resent", "envelopes sent again after a reconnect (not confirmed by the old connection)", n.resent),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}
