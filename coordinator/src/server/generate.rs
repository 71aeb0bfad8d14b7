//! One client request through the cluster, as both fronts hand it over (a
//! [`GenerateRequest`]; [`start`] returns its [`Chunk`]s): refused while the
//! coordinator drains, validated and tokenized, then run as a sequence
//! ([`sequence`](super::sequence): routing, resumption, detokenization), and
//! counted by how it ended.
//!
//! Limits come before work: stop strings and prompt bytes are bounded before
//! the prompt is tokenized (on the blocking pool, one per core); a sequence
//! then waits in the admission queue for room on a worker; each of its
//! messages must arrive within that worker's step deadline.
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use zeroshard_offload::request::GenerationParams;

use super::config::{MAX_STOP_BYTES, MAX_STOP_STRINGS, PROMPT_BYTES_PER_POSITION};
use super::{Coordinator, DrainState};
use crate::error::{CoordinatorError, Result};
use crate::request::{Chunk, GenerateRequest, Logprobs, PastContext, Prompt};
use crate::tokenizer::Tokenizer;

/// Where a request's chunks go: the front that took it. The request runs in
/// its own task (so a resumption on another worker is invisible to the
/// front); this bounded channel is its back-pressure, and a dropped receiver
/// tells it the client left.
pub(super) type Out = mpsc::Sender<Result<Chunk>>;

/// How many chunks may wait for a slow client before the sequence waits too.
pub(super) const OUT_CHUNKS: usize = 64;

/// A validated request.
pub(super) struct Validated {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    pub stop: Vec<String>,
    pub logprobs: Option<Logprobs>,
    /// Only the prompt is rated (OpenAI's `echo` with `max_tokens` 0): the
    /// sequence runs one step whose token is not returned.
    pub score_only: bool,
}

fn invalid(m: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidRequest(m.into())
}

/// Checks `req` against the limits before any work, then tokenizes its text
/// on the blocking pool (one tokenization per core at a time). `None`: the
/// client left meanwhile.
async fn validate(coord: &Coordinator, req: GenerateRequest, out: &Out) -> Result<Option<Validated>> {
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(format!(
            "{} stop strings, more than the {MAX_STOP_STRINGS} allowed",
            req.stop.len()
        )));
    }
    if let Some(s) = req.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!(
            "a stop string has {} bytes, more than the {MAX_STOP_BYTES} allowed",
            s.len()
        )));
    }
    if !req.stop.is_empty() && coord.model().tokenizer.is_none() {
        return Err(invalid("stop strings need a tokenizer.json in the model folder"));
    }
    if req.stop.iter().any(String::is_empty) {
        return Err(invalid("a stop string is empty"));
    }
    let mut params = req.params;
    params.sampling.validate().map_err(invalid)?;
    let prompt = match req.prompt {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => {
            check_prompt_bytes(coord, "the prompt has", t.len())?;
            // Empty text is a prompt too, as in `generate`: BOS where the tokenizer adds it.
            match tokenize(coord, out, move |tokenizer| Ok(tokenizer.encode_prompt(&t)?)).await? {
                Some(ids) => ids,
                None => return Ok(None),
            }
        }
        Prompt::Chat(messages) => {
            let bytes = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            check_prompt_bytes(coord, "the messages have", bytes)?;
            let template = coord.model().chat_template.clone().ok_or_else(|| {
                invalid("the model has no chat template (chat_template.jinja or tokenizer_config.json): send a prompt instead of messages")
            })?;
            let encode =
                move |tokenizer: &Tokenizer| Ok(tokenizer.encode_rendered(&template.render(&messages)?)?);
            match tokenize(coord, out, encode).await? {
                Some(ids) => ids,
                None => return Ok(None),
            }
        }
    };
    let config = &coord.model().config;
    zeroshard_offload::request::validate_prompt(config, &prompt)?;
    if let Some((id, _)) = params.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= config.vocab_size)
    {
        return Err(invalid(format!(
            "logit_bias names token {id}, outside the vocabulary (vocab_size {})",
            config.vocab_size
        )));
    }
    let context = config.max_position_embeddings;
    if req.past_context == PastContext::Refuse && prompt.len() + params.max_new_tokens > context {
        return Err(invalid(format!(
            "the prompt has {} tokens and {} more were asked for (max_tokens): {} in all, more than the \
             model's context of {context} tokens",
            prompt.len(),
            params.max_new_tokens,
            prompt.len() + params.max_new_tokens
        )));
    }
    let score_only = params.max_new_tokens == 0 && req.logprobs.is_some_and(|l| l.prompt);
    if score_only {
        params.max_new_tokens = 1;
    }
    Ok(Some(Validated { prompt, params, stop: req.stop, logprobs: req.logprobs, score_only }))
}

/// Refuses prompt text over the byte limit before any tokenization: the
/// limit is `--max-prompt-bytes`, or so many bytes per position of the
/// model's context.
fn check_prompt_bytes(coord: &Coordinator, what: &str, bytes: usize) -> Result<()> {
    let limit = coord
        .cfg()
        .limits
        .max_prompt_bytes
        .unwrap_or(coord.model().config.max_position_embeddings * PROMPT_BYTES_PER_POSITION);
    if bytes > limit {
        return Err(invalid(format!(
            "{what} {bytes} bytes of text, more than the limit of {limit} (--max-prompt-bytes)"
        )));
    }
    Ok(())
}

/// Runs `encode` with the model's tokenizer on the blocking pool, at most one
/// per core at a time. `None`: the client left meanwhile.
async fn tokenize(
    coord: &Coordinator,
    out: &Out,
    encode: impl FnOnce(&Tokenizer) -> Result<Vec<u32>> + Send + 'static,
) -> Result<Option<Vec<u32>>> {
    let tokenizer = coord
        .model()
        .tokenizer
        .clone()
        .ok_or_else(|| invalid("the model has no tokenizer.json: send token_ids"))?;
    let Ok(_permit) = coord.requests().tokenizing.acquire().await else {
        return Err(CoordinatorError::Unavailable("the coordinator is stopping".into()));
    };
    if out.is_closed() {
        return Ok(None);
    }
    let work = tokio::task::spawn_blocking(move || encode(&tokenizer));
    tokio::select! {
        r = work => r.map_err(|e| CoordinatorError::Unavailable(format!("tokenizer task: {e}")))?.map(Some),
        _ = out.closed() => Ok(None),
    }
}

/// Starts `req` in its own task and returns the receiving end of its
/// chunks: the first carries the prompt ids, the last the finish reason and
/// timings; an error ends them. `req` is what the front made of the client's
/// message: one it could not read fails here, counted and answered like any
/// invalid request. Dropping the receiver (the client left) cancels the
/// sequence on its worker.
pub(super) fn start(coord: &Coordinator, req: Result<GenerateRequest>) -> mpsc::Receiver<Result<Chunk>> {
    let (tx, rx) = mpsc::channel(OUT_CHUNKS);
    tokio::spawn(run(coord.clone(), req, tx));
    rx
}

/// Runs `req`, sending its chunks to `out`, and counts how it ended (the
/// `outcome` label: `ok`, `cancelled`, or the error's kind).
async fn run(coord: Coordinator, req: Result<GenerateRequest>, out: Out) {
    let mut drain = coord.drain_state();
    if *drain.borrow_and_update() != DrainState::Serving {
        let e =
            CoordinatorError::Unavailable("the coordinator is shutting down: send the request again".into());
        metrics::counter!("zeroshard_requests_total", "outcome" => e.kind().outcome()).increment(1);
        let _ = out.send(Err(e)).await;
        return;
    }
    let _running = coord.request_started();
    let received = Instant::now();
    let cut = async {
        let _ = drain.wait_for(|d| *d == DrainState::Cut).await;
    };
    // One span per request: its events (resumptions, moves) carry its number.
    let span =
        tracing::info_span!("request", n = coord.requests().next_request.fetch_add(1, Ordering::Relaxed));
    let result = tokio::select! {
        r = tracing::Instrument::instrument(run_inner(&coord, req, &out, received), span.clone()) => r,
        _ = cut => Err(CoordinatorError::Unavailable(
            "the coordinator shut down before the sequence finished (its drain time ran out)".into(),
        )),
    };
    let outcome = match &result {
        Ok(true) => "ok",
        Ok(false) => "cancelled",
        Err(e) => e.kind().outcome(),
    };
    metrics::counter!("zeroshard_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("zeroshard_request_duration_seconds").record(received.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(outcome, seconds = received.elapsed().as_secs_f64(), "request ended"));
    if let Err(e) = result {
        let _ = out.send(Err(e)).await;
    }
}

/// `Ok(true)`: the sequence finished; `Ok(false)`: the client left first.
async fn run_inner(
    coord: &Coordinator,
    req: Result<GenerateRequest>,
    out: &Out,
    received: Instant,
) -> Result<bool> {
    coord.plan()?;
    let Some(v) = validate(coord, req?, out).await? else { return Ok(false) };
    metrics::counter!("zeroshard_prompt_tokens_total").increment(v.prompt.len() as u64);
    super::sequence::run(coord, v, out, received).await
}
