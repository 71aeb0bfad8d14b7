//! The OpenAI-compatible HTTP front (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`,
//! on the coordinator's runtime. A request becomes the same domain request a
//! gRPC one does and takes the same path ([`super::generate::start`]): the
//! same limits, queue, resumption and drain; only the shapes differ. Errors
//! use OpenAI's JSON error object with the HTTP status of the error's kind.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use super::answer::{Head, Shape};
use super::openai::{ChatRequest, CompletionRequest, Job};
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
    /// The most connections open at once (`--max-http-connections`).
    pub max_connections: usize,
}

/// Serves the HTTP front until `shutdown`.
pub async fn serve_http(
    coord: Coordinator,
    front: HttpFront,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let HttpFront { listener, model, metrics, max_connections } = front;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let front = Arc::new(Front { coord, model, created, next_id: AtomicU64::new(1), metrics });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found_error", "no such route".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(bounded))
        .layer(axum::middleware::map_response(answered))
        .with_state(front);
    super::connections::serve(listener, app, max_connections, shutdown).await;
    Ok(())
}

/// Request bodies larger than this are refused (413) before they are parsed.
const BODY_LIMIT: usize = 2 << 20;
/// How long a request body may take to arrive once its head has.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request may cost before a handler sees it: header fields past
/// [`super::connections::MAX_HEADERS`] or their bytes past
/// [`super::connections::MAX_HEADER_BYTES`] (431), a body that takes longer
/// than [`BODY_TIMEOUT`] (408) or is larger than [`BODY_LIMIT`] (413). The
/// body is read here, so the handlers' extractors never wait on the client.
async fn bounded(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use super::connections::{MAX_HEADERS, MAX_HEADER_BYTES};
    let fields = req.headers().len();
    let bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if fields > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request has {fields} header fields of {bytes} bytes; at most {MAX_HEADERS} fields of {MAX_HEADER_BYTES} bytes are taken"
            ),
        );
    }
    if req.method() != axum::http::Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if format!("{e:#}").contains("length limit") => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than {BODY_LIMIT} bytes"),
            )
        }
        Ok(Err(e)) => return invalid(format!("the request body could not be read: {e}")),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
            )
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(body))).await
}

/// Every answer of the front: counted by status
/// (`zeroshard_http_responses_total{status}`: refusals that never become a
/// request — an unknown model, malformed JSON — included), and errors in
/// OpenAI's shape ([`as_openai_error`]).
async fn answered(res: Response) -> Response {
    metrics::counter!("zeroshard_http_responses_total", "status" => res.status().as_u16().to_string())
        .increment(1);
    let mut res = as_openai_error(res);
    // A full queue: when to try again (clients' retry loops read it).
    if res.status() == StatusCode::TOO_MANY_REQUESTS && !res.headers().contains_key(RETRY_AFTER) {
        res.headers_mut().insert(RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
    }
    res
}

/// Refusals made below the handlers — a body over [`BODY_LIMIT`] (413), a
/// method a route does not take (405) — come as plain text from the
/// framework: they get OpenAI's error JSON like every other error, with the
/// same status (and the `Allow` header of a 405).
fn as_openai_error(res: Response) -> Response {
    let status = res.status();
    let json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("the request body is over the limit of {BODY_LIMIT} bytes"),
        StatusCode::METHOD_NOT_ALLOWED => "this route does not take that method".into(),
        s => s.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let allow = res.headers().get(axum::http::header::ALLOW).cloned();
    let mut answer = error(status, "invalid_request_error", message);
    if let Some(a) = allow {
        answer.headers_mut().insert(axum::http::header::ALLOW, a);
    }
    answer
}

/// An error answer: HTTP status, OpenAI error type, message.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1, self.2)
    }
}

/// OpenAI's error object.
pub(super) fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message.into())
}

/// The HTTP status and OpenAI error type of an error from the request path:
/// those of its [kind](crate::ErrorKind::http_status).
pub(super) fn http_status(e: &CoordinatorError) -> (StatusCode, &'static str) {
    let (code, kind) = e.kind().http_status();
    (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), kind)
}

pub(super) fn error_response(e: &CoordinatorError) -> Response {
    let (code, kind) = http_status(e);
    error(code, kind, e.to_string())
}

/// `Authorization: Bearer KEY` when the cluster has API keys.
fn authorize(front: &Front, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(keys) = front.coord.cfg().api_keys.as_ref() else { return Ok(()) };
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

/// A request body must be declared JSON: a browser's cross-site "simple"
/// POST (form or text/plain, sent without a preflight) never reaches a model.
fn json_declared(headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let declared = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = declared.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        format!(
            "the body must be sent as `Content-Type: application/json`{}",
            if declared.is_empty() { String::new() } else { format!(", not `{declared}`") }
        ),
    ))
}

async fn health(State(front): State<Arc<Front>>) -> Response {
    if let Some(u) = front.coord.unservable() {
        let body = json!({"status": "cannot serve", "reason": u.why, "until_restart": u.until_restart});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
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
    let in_flight = front.coord.in_flight();
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
        "data": [{
            "id": front.model,
            "object": "model",
            "created": front.created,
            "owned_by": "zeroshard",
            "max_model_len": front.coord.model().config.max_position_embeddings,
        }],
    }))
    .into_response()
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
    if let Err(r) = authorize(&front, &headers).and_then(|()| json_declared(&headers)) {
        return refused(r.into_response());
    }
    let req: CompletionRequest = match parse_body(&body, "completions") {
        Ok(r) => r,
        Err(r) => return refused(r.into_response()),
    };
    if let Err(r) = check_model(&front, &req.common.model) {
        return refused(r.into_response());
    }
    match req.to_job() {
        Ok(job) => {
            answer(&front, Shape::Completion, job, req.common.stream, req.common.include_usage()).await
        }
        Err(m) => refused(invalid(m)),
    }
}

/// A completion refused before it became a request (a bad key, body, model
/// or field): counted in `zeroshard_requests_total` by its status, as
/// requests refused later are by their error's kind.
fn refused(res: Response) -> Response {
    let outcome = match res.status().as_u16() {
        401 | 403 => "denied",
        429 => "rejected",
        400..=499 => "invalid",
        503 => "unavailable",
        _ => "error",
    };
    metrics::counter!("zeroshard_requests_total", "outcome" => outcome).increment(1);
    res
}

async fn chat_completions(State(front): State<Arc<Front>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&front, &headers).and_then(|()| json_declared(&headers)) {
        return refused(r.into_response());
    }
    let req: ChatRequest = match parse_body(&body, "chat completions") {
        Ok(r) => r,
        Err(r) => return refused(r.into_response()),
    };
    if let Err(r) = check_model(&front, &req.common.model) {
        return refused(r.into_response());
    }
    let positions = u32::try_from(front.coord.model().config.max_position_embeddings).unwrap_or(u32::MAX);
    match req.to_job(positions) {
        Ok(job) => answer(&front, Shape::Chat, job, req.common.stream, req.common.include_usage()).await,
        Err(m) => refused(invalid(m)),
    }
}

/// Answers `job` in `shape` under a fresh id.
async fn answer(front: &Front, shape: Shape, job: Job, stream: bool, usage: bool) -> Response {
    let serial = front.next_id.fetch_add(1, Ordering::Relaxed);
    let head = Head {
        id: format!("{}-{:x}{serial:06x}", shape.id_prefix(), front.created),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: front.model.clone(),
    };
    super::answer::answer(&front.coord, shape, head, job, stream, usage).await
}
