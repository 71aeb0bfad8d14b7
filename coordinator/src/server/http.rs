//! The OpenAI-compatible HTTP front (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, on the
//! coordinator's runtime. A request
//! takes the same path as a gRPC one ([`super::generate::run`]): the same
//! limits, queue, resumption and drain; only the shapes differ. Errors use
//! OpenAI's JSON error object with the matching HTTP status.
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use zeroshard_proto::v1 as pb;

use super::{Coordinator, Readiness};
use crate::error::{CoordinatorError, Result};

/// What the front serves: the cluster and the name clients call its model by.
struct Front {
    coord: Coordinator,
    model: String,
    created: u64,
    next_id: AtomicU64,
    /// This process's recorded metrics (requests, latencies) in the
    /// Prometheus text format.
    metrics: Option<RenderMetrics>,
}

/// Renders the process's recorded metrics in the Prometheus text format (the
/// binary installs the recorder).
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What the HTTP front serves on: its socket, the model id `/v1/models` lists
/// and requests must name, and the process's recorded metrics for `/metrics`.
pub struct HttpFront {
    pub listener: TcpListener,
    pub model: String,
    pub metrics: Option<RenderMetrics>,
}

/// Serves the HTTP front until `shutdown`.
pub async fn serve_http(
    coord: Coordinator,
    front: HttpFront,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let HttpFront { listener, model, metrics } = front;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let front = Arc::new(Front { coord, model, created, next_id: AtomicU64::new(1), metrics });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found_error", "no such route".into()) })
        .with_state(front);
    // Each streamed event goes out at once: without TCP_NODELAY a small SSE
    // write waits for the client's delayed ACK (~40 ms a token).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("HTTP front: {e}")))
}

/// An error answer: HTTP status, OpenAI error type, message.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1, self.2)
    }
}

/// OpenAI's error object.
fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message.into())
}

/// The HTTP status and OpenAI error type of a gRPC status from the request path.
fn from_status(s: &Status) -> (StatusCode, &'static str) {
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Code::Unavailable | Code::Aborted => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

fn status_response(s: &Status) -> Response {
    let (code, kind) = from_status(s);
    error(code, kind, s.message().to_string())
}

/// `Authorization: Bearer KEY` when the cluster has API keys.
fn authorize(front: &Front, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(keys) = front.coord.0.cfg.api_keys.as_ref() else { return Ok(()) };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented.map(|k| keys.check(k)) {
        Some(Some(_)) => Ok(()),
        Some(None) => {
            Err(ApiError(StatusCode::UNAUTHORIZED, "authentication_error", "the API key is not valid".into()))
        }
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "an API key is required: send `Authorization: Bearer KEY`".into(),
        )),
    }
}

async fn health(State(front): State<Arc<Front>>) -> Response {
    match *front.coord.readiness().borrow() {
        Readiness::Ready if *front.coord.drain_state().borrow() == super::DrainState::Serving => {
            (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
        }
        ref r => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": format!("{r:?}")}))).into_response(),
    }
}

/// `GET /metrics`: the Prometheus text format, unauthenticated as scrapers
/// expect (counts and latencies only, no request content).
async fn metrics_text(State(front): State<Arc<Front>>) -> Response {
    let status = front.coord.status().await;
    let in_flight = *front.coord.0.in_flight.borrow();
    let mut text = front.metrics.as_ref().map(|render| render()).unwrap_or_default();
    text.push_str(&super::metrics::cluster_text(&status, &front.model, in_flight));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn models(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&front, &headers) {
        return r.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": front.model, "object": "model", "created": front.created, "owned_by": "zeroshard"}],
    }))
    .into_response()
}

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completions prompt: text, one text in a list, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields completions and chat completions share: sampling, limits,
/// streaming. Others are refused where they would change the result, and
/// ignored where they would not.
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    logprobs: Option<Value>,
    /// vLLM's extension: keep going past end-of-sequence tokens.
    #[serde(default)]
    ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: PromptField,
    best_of: Option<u32>,
    #[serde(default)]
    echo: bool,
}

/// A chat message's content: text, or a list of parts of which only text
/// parts are understood.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
    top_logprobs: Option<u32>,
}

/// OpenAI's default for /v1/completions.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// Whether a JSON field asks for something (not absent, null, false or 0).
fn asks(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(_) => true,
    }
}

impl Common {
    /// The request the cluster runs for `prompt`, or what is wrong with it.
    /// `default_max` is used when the request names no token limit.
    fn to_generate(
        &self,
        prompt: pb::generate_request::Prompt,
        default_max: u32,
    ) -> std::result::Result<pb::GenerateRequest, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("`n` other than 1 is not supported".into());
        }
        if asks(&self.logprobs) {
            return Err("`logprobs` is not supported".into());
        }
        for (name, v) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            if v.is_some_and(|v| v != 0.0) {
                return Err(format!(
                    "`{name}` has no exact equivalent here: use `repetition_penalty` (transformers' multiplicative penalty)"
                ));
            }
        }
        let top_k = match self.top_k {
            None | Some(-1) => None,
            Some(k) if k >= 0 => Some(k as u32),
            Some(k) => return Err(format!("`top_k` must be -1 (off) or at least 0, not {k}")),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        Ok(pb::GenerateRequest {
            prompt: Some(prompt),
            sampling: Some(pb::SamplingParams {
                max_new_tokens: Some(self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_max)),
                // OpenAI's default temperature is 1.
                temperature: Some(self.temperature.unwrap_or(1.0)),
                top_k,
                top_p: self.top_p,
                seed: self.seed,
                repetition_penalty: self.repetition_penalty,
                ignore_eos: self.ignore_eos,
            }),
            stop,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    fn to_generate(&self) -> std::result::Result<pb::GenerateRequest, String> {
        if self.best_of.is_some_and(|n| n != 1) {
            return Err("`best_of` other than 1 is not supported".into());
        }
        if self.echo {
            return Err("`echo` is not supported".into());
        }
        let prompt = match &self.prompt {
            PromptField::Text(t) => pb::generate_request::Prompt::Text(t.clone()),
            PromptField::Texts(v) if v.len() == 1 => pb::generate_request::Prompt::Text(v[0].clone()),
            PromptField::Ids(ids) => {
                pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() })
            }
            PromptField::IdLists(v) if v.len() == 1 => {
                pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: v[0].clone() })
            }
            _ => return Err("`prompt` must be one prompt (a batch of prompts is not supported)".into()),
        };
        self.common.to_generate(prompt, DEFAULT_COMPLETION_TOKENS)
    }
}

impl ChatRequest {
    /// Without a token limit a chat answer may run to the end of the model's
    /// context, as OpenAI's does (`default_max`: the model's positions).
    fn to_generate(&self, default_max: u32) -> std::result::Result<pb::GenerateRequest, String> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err("`tools` are not supported".into());
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err("`top_logprobs` is not supported".into());
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err("`response_format` other than {\"type\": \"text\"} is not supported".into());
            }
        }
        if self.messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(format!(
                                    "messages[{i}]: content parts of type {} are not supported (text only)",
                                    kind.unwrap_or("(none)")
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(pb::ChatMessage { role: m.role.clone(), content });
        }
        self.common
            .to_generate(pb::generate_request::Prompt::Chat(pb::ChatMessages { messages }), default_max)
    }
}

fn finish_reason(r: i32) -> Option<&'static str> {
    match pb::FinishReason::try_from(r).ok()? {
        pb::FinishReason::Length => Some("length"),
        pb::FinishReason::Eos | pb::FinishReason::Stop => Some("stop"),
        _ => None,
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The two response shapes: text completions and chat completions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Completion,
    Chat,
}

impl Shape {
    fn id_prefix(self) -> &'static str {
        match self {
            Shape::Completion => "cmpl",
            Shape::Chat => "chatcmpl",
        }
    }

    /// The whole answer.
    fn response(self, head: &Head, text: String, finish: &str, usage: Value) -> Value {
        let (object, choice) = match self {
            Shape::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
            ),
            Shape::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish, "logprobs": null}),
            ),
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model,
               "choices": [choice], "usage": usage})
    }

    /// One streamed event: a delta of text, its finish reason on the last.
    /// The first chat chunk also carries the role.
    fn chunk(self, head: &Head, text: &str, finish: Option<&str>, first: bool) -> Value {
        let (object, choice) = match self {
            Shape::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
            ),
            Shape::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}),
                )
            }
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [choice]})
    }

    /// The usage event of a stream (`stream_options.include_usage`).
    fn usage_chunk(self, head: &Head, usage: Value) -> Value {
        let object = match self {
            Shape::Completion => "text_completion",
            Shape::Chat => "chat.completion.chunk",
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model,
               "choices": [], "usage": usage})
    }
}

/// What every message of one answer repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
}

/// Reads a JSON body as `T`, or the 400 saying why not.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> std::result::Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not a {what} request: {e}"),
        )
    })
}

/// A request naming another model: 404 as OpenAI answers.
fn check_model(front: &Front, model: &str) -> std::result::Result<(), ApiError> {
    if model == front.model {
        return Ok(());
    }
    Err(ApiError(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("the model `{model}` does not exist: this server serves `{}`", front.model),
    ))
}

async fn completions(State(front): State<Arc<Front>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&front, &headers) {
        return r.into_response();
    }
    let req: CompletionRequest = match parse_body(&body, "completions") {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_model(&front, &req.common.model) {
        return r.into_response();
    }
    match req.to_generate() {
        Ok(g) => answer(&front, Shape::Completion, g, req.common.stream, req.common.include_usage()).await,
        Err(m) => invalid(m),
    }
}

async fn chat_completions(State(front): State<Arc<Front>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&front, &headers) {
        return r.into_response();
    }
    let req: ChatRequest = match parse_body(&body, "chat completions") {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_model(&front, &req.common.model) {
        return r.into_response();
    }
    let positions = u32::try_from(front.coord.0.config.max_position_embeddings).unwrap_or(u32::MAX);
    match req.to_generate(positions) {
        Ok(g) => answer(&front, Shape::Chat, g, req.common.stream, req.common.include_usage()).await,
        Err(m) => invalid(m),
    }
}

/// Runs `generate` through the cluster and answers in `shape`: one JSON
/// object, or server-sent events.
async fn answer(
    front: &Front,
    shape: Shape,
    generate: pb::GenerateRequest,
    stream: bool,
    include_usage: bool,
) -> Response {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(super::generate::run(front.coord.clone(), generate, tx));
    let serial = front.next_id.fetch_add(1, Ordering::Relaxed);
    let head = Head {
        id: format!("{}-{:x}{serial:06x}", shape.id_prefix(), front.created),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: front.model.clone(),
    };
    if !stream {
        let (mut text, mut prompt, mut completion, mut finish) = (String::new(), 0, 0, None);
        while let Some(chunk) = rx.recv().await {
            let c = match chunk {
                Ok(c) => c,
                Err(s) => return status_response(&s),
            };
            prompt += c.prompt_token_ids.len();
            completion += c.token_ids.len();
            text.push_str(&c.text);
            finish = finish.or(finish_reason(c.finish_reason));
        }
        let Some(finish) = finish else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the sequence ended without a finish reason".into(),
            );
        };
        return Json(shape.response(&head, text, finish, usage(prompt, completion))).into_response();
    }
    // Streaming: the first message decides the HTTP status (an error before
    // any token is a plain error response); after it, events.
    let first = match rx.recv().await {
        Some(Ok(c)) => c,
        Some(Err(s)) => return status_response(&s),
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the sequence ended at once".into(),
            )
        }
    };
    Sse::new(sse_events(shape, head, first, rx, include_usage)).into_response()
}

/// The events of a streamed answer: one per chunk of text, the last with its
/// finish reason, the usage when asked, then `[DONE]`. Dropping the stream
/// (the client left) drops `rx`, which cancels the sequence.
fn sse_events(
    shape: Shape,
    head: Head,
    first: pb::GenerateChunk,
    mut rx: mpsc::Receiver<std::result::Result<pb::GenerateChunk, Status>>,
    include_usage: bool,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        let (mut prompt, mut completion) = (0usize, 0usize);
        let mut next = Some(Ok(first));
        let mut sent_any = false;
        while let Some(chunk) = next.take() {
            match chunk {
                Ok(c) => {
                    prompt += c.prompt_token_ids.len();
                    completion += c.token_ids.len();
                    let finish = finish_reason(c.finish_reason);
                    // The first chat event opens the assistant's message even
                    // before any text.
                    let opens = shape == Shape::Chat && !sent_any;
                    if !c.text.is_empty() || finish.is_some() || opens {
                        let data = shape.chunk(&head, &c.text, finish, !sent_any);
                        sent_any = true;
                        if tx.send(Event::default().data(data.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
                Err(s) => {
                    let (_, kind) = from_status(&s);
                    let data =
                        json!({"error": {"message": s.message(), "type": kind, "param": null, "code": null}});
                    let _ = tx.send(Event::default().data(data.to_string())).await;
                    return;
                }
            }
            next = tokio::select! {
                r = rx.recv() => r,
                _ = tx.closed() => return,
            };
        }
        if include_usage {
            let data = shape.usage_chunk(&head, usage(prompt, completion));
            if tx.send(Event::default().data(data.to_string())).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    })
}

/// A stream fed by a task: `body` sends into the channel; the stream ends when
/// it returns. Dropping the stream closes the channel, so `body`'s sends fail
/// and it returns (dropping what it holds).
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = std::result::Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(body(tx));
    tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}
