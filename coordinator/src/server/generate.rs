//! One client request through the cluster: validate, tokenize, route to the
//! least-loaded worker, detokenize its token stream and cut at stop strings.
//! When the worker fails or leaves, the sequence resumes on another one from
//! its prompt plus the tokens already produced: the client sees a pause, and
//! no token twice or never.
//!
//! Limits come before work: stop strings and prompt bytes are bounded before
//! the prompt is tokenized (on the blocking pool, one per core); a sequence
//! then waits in the admission queue for room on a worker; each of its
//! messages must arrive within that worker's step deadline.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tonic::Status;
use zeroshard_offload::request::{kv_tokens, GenerationParams};
use zeroshard_proto::v1 as pb;

use super::admission::Reservation;
use super::state::{WorkerEntry, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use super::{Coordinator, DrainState};
use crate::chat::ChatMessage;
use crate::error::{CoordinatorError, Result};
use crate::text_stream::TextStream;
use crate::tokenizer::Tokenizer;

/// A validated request.
struct Validated {
    prompt: Vec<u32>,
    params: GenerationParams,
    sampling: Option<pb::SamplingParams>,
    stop: Vec<String>,
}

fn invalid(m: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidRequest(m.into())
}

/// Checks `req` against the limits before any work, then tokenizes its text
/// on the blocking pool (one tokenization per core at a time). `None`: the
/// client left meanwhile.
async fn validate(
    coord: &Coordinator,
    req: pb::GenerateRequest,
    out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
) -> Result<Option<Validated>> {
    let inner = &coord.0;
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
    if !req.stop.is_empty() && inner.tokenizer.is_none() {
        return Err(invalid("stop strings need a tokenizer.json in the model folder"));
    }
    if req.stop.iter().any(String::is_empty) {
        return Err(invalid("a stop string is empty"));
    }
    let params = zeroshard_offload::convert::generation_params(req.sampling);
    params.sampling.validate().map_err(invalid)?;
    let prompt = match req.prompt {
        None => return Err(invalid("the request has no prompt (text, token_ids or chat)")),
        Some(pb::generate_request::Prompt::TokenIds(ids)) => ids.ids,
        Some(pb::generate_request::Prompt::Text(t)) => {
            check_prompt_bytes(coord, "the prompt has", t.len())?;
            // Empty text is a prompt too, as in `generate`: BOS where the tokenizer adds it.
            match tokenize(coord, out, move |tokenizer| Ok(tokenizer.encode_prompt(&t)?)).await? {
                Some(ids) => ids,
                None => return Ok(None),
            }
        }
        Some(pb::generate_request::Prompt::Chat(chat)) => {
            let bytes = chat.messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            check_prompt_bytes(coord, "the messages have", bytes)?;
            let template = inner.chat_template.clone().ok_or_else(|| {
                invalid("the model has no chat template (chat_template.jinja or tokenizer_config.json): send a prompt instead of messages")
            })?;
            let messages: Vec<ChatMessage> =
                chat.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
            let encode =
                move |tokenizer: &Tokenizer| Ok(tokenizer.encode_rendered(&template.render(&messages)?)?);
            match tokenize(coord, out, encode).await? {
                Some(ids) => ids,
                None => return Ok(None),
            }
        }
    };
    zeroshard_offload::request::validate_prompt(&inner.config, &prompt)?;
    Ok(Some(Validated { prompt, params, sampling: req.sampling, stop: req.stop }))
}

/// Refuses prompt text over the byte limit before any tokenization.
fn check_prompt_bytes(coord: &Coordinator, what: &str, bytes: usize) -> Result<()> {
    let limit = coord.max_prompt_bytes();
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
    out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
    encode: impl FnOnce(&Tokenizer) -> Result<Vec<u32>> + Send + 'static,
) -> Result<Option<Vec<u32>>> {
    let inner = &coord.0;
    let tokenizer =
        inner.tokenizer.clone().ok_or_else(|| invalid("the model has no tokenizer.json: send token_ids"))?;
    let Ok(_permit) = inner.tokenizing.acquire().await else {
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

/// Runs `req`, sending its chunks to `out`: the first carries the prompt ids,
/// the last the finish reason and timings. Returns when the sequence ends or
/// the client leaves (a closed `out`), which cancels it on the worker.
pub(super) async fn run(
    coord: Coordinator,
    req: pb::GenerateRequest,
    out: mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
) {
    let mut drain = coord.drain_state();
    if *drain.borrow_and_update() != DrainState::Serving {
        let e =
            CoordinatorError::Unavailable("the coordinator is shutting down: send the request again".into());
        metrics::counter!("zeroshard_requests_total", "outcome" => "unavailable").increment(1);
        let _ = out.send(Err(Status::from(e))).await;
        return;
    }
    coord.0.in_flight.send_modify(|n| *n += 1);
    let _done = InFlight(&coord);
    let received = Instant::now();
    let cut = async {
        let _ = drain.wait_for(|d| *d == DrainState::Cut).await;
    };
    // One span per request: its events (resumptions, moves) carry its number.
    let span = tracing::info_span!("request", n = coord.0.next_request.fetch_add(1, Ordering::Relaxed));
    let result = tokio::select! {
        r = tracing::Instrument::instrument(run_inner(&coord, req, &out, received), span.clone()) => r,
        _ = cut => Err(CoordinatorError::Unavailable(
            "the coordinator shut down before the sequence finished (its drain time ran out)".into(),
        )),
    };
    let outcome = match &result {
        Ok(true) => "ok",
        Ok(false) => "cancelled",
        Err(
            CoordinatorError::InvalidRequest(_) | CoordinatorError::Tokenizer(_) | CoordinatorError::Chat(_),
        ) => "invalid",
        Err(CoordinatorError::Overloaded(_)) => "rejected",
        Err(CoordinatorError::Unavailable(_)) => "unavailable",
        Err(_) => "error",
    };
    metrics::counter!("zeroshard_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("zeroshard_request_duration_seconds").record(received.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(outcome, seconds = received.elapsed().as_secs_f64(), "request ended"));
    if let Err(e) = result {
        let _ = out.send(Err(Status::from(e))).await;
    }
}

/// Counts a running request out when it ends, however it ends.
struct InFlight<'c>(&'c Coordinator);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0 .0.in_flight.send_modify(|n| *n -= 1);
    }
}

/// Waits until members or the plan change (at most a second), or fails with
/// UNAVAILABLE once the sequence has waited past `deadline`.
async fn wait_for_change(changes: &mut watch::Receiver<u64>, deadline: Instant, why: &str) -> Result<()> {
    if Instant::now() > deadline {
        return Err(CoordinatorError::Unavailable(format!(
            "no worker could continue the sequence within {RESUME_PATIENCE:?}: {why}"
        )));
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    Ok(())
}

/// A sequence across its runs on workers: what the client has been sent.
struct Run<'t> {
    text: TextStream<'t>,
    timings: pb::Timings,
    /// No chunk sent yet.
    first: bool,
    /// Every token produced so far (a resume sends them with the prompt).
    produced: Vec<u32>,
    finish: Option<pb::FinishReason>,
    /// When the sequence left the queue (prefill and decode times start here).
    start: Instant,
    /// When the request arrived (time to first token counts from here).
    received: Instant,
    /// When the last chunk with tokens went out.
    last_sent: Option<Instant>,
}

impl Run<'_> {
    /// Runs the sequence on the reserved worker from where it is, forwarding
    /// each step; each message must come within the worker's step deadline.
    async fn attempt(
        &mut self,
        coord: &Coordinator,
        v: &Validated,
        room: &Reservation,
        out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
        changes: &mut watch::Receiver<u64>,
    ) -> Result<Attempt> {
        let (worker, plan) = (&room.worker, &room.plan);
        let floor = coord.0.cfg.limits.step_deadline;
        let mut client = worker.client.grpc();
        let call = client.run_sequence(pb::RunSequenceRequest {
            sequence_id: coord.0.next_seq.fetch_add(1, Ordering::Relaxed),
            epoch: plan.epoch(),
            prompt_token_ids: v.prompt.clone(),
            generated_token_ids: self.produced.clone(),
            sampling: v.sampling,
        });
        let mut steps = match tokio::time::timeout(floor, call).await {
            Err(_) => return Ok(Attempt::Stalled(format!("{} did not answer within {floor:?}", worker.id))),
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) => return Attempt::from_status(worker, s),
        };
        // The first message prefills the prompt and what was produced before.
        let mut prefill = Some(worker.clock.prefill(v.prompt.len() + self.produced.len()));
        let sent = Instant::now();
        let mut last = sent;
        while self.finish.is_none() {
            let deadline = worker.clock.deadline(floor);
            let step = tokio::select! {
                m = tokio::time::timeout(deadline, steps.message()) => match m {
                    Ok(m) => m,
                    Err(_) => {
                        return Ok(Attempt::Stalled(format!(
                            "{} produced nothing within the step deadline of {deadline:?}",
                            worker.id
                        )))
                    }
                },
                _ = changes.changed() => {
                    if coord.is_member(worker.id) {
                        continue;
                    }
                    return Ok(Attempt::Failed(format!("{} left the cluster", worker.id)));
                }
            };
            let step = match step {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(Attempt::Failed(format!("{} ended the sequence early", worker.id))),
                Err(s) => return Attempt::from_status(worker, s),
            };
            match prefill.take() {
                Some(p) => p.done(sent.elapsed()),
                None => worker.clock.record_step(last.elapsed()),
            }
            last = Instant::now();
            if self.first {
                self.timings.prefill_ms = self.start.elapsed().as_secs_f64() * 1e3;
            }
            let mut delta = String::new();
            for &t in &step.token_ids {
                self.produced.push(t);
                let d = self.text.push(t)?;
                delta.push_str(&d.text);
                if d.stopped {
                    self.finish = Some(pb::FinishReason::Stop);
                }
            }
            if self.finish.is_none() {
                let r =
                    pb::FinishReason::try_from(step.finish_reason).unwrap_or(pb::FinishReason::Unspecified);
                if r != pb::FinishReason::Unspecified {
                    self.finish = Some(r);
                }
            }
            let chunk = pb::GenerateChunk {
                token_ids: step.token_ids,
                text: delta,
                prompt_token_ids: if self.first { v.prompt.clone() } else { vec![] },
                finish_reason: 0,
                timings: None,
            };
            self.first = false;
            let now = Instant::now();
            let n = chunk.token_ids.len();
            metrics::counter!("zeroshard_generated_tokens_total").increment(n as u64);
            match self.last_sent {
                None => metrics::histogram!("zeroshard_time_to_first_token_seconds")
                    .record((now - self.received).as_secs_f64()),
                Some(t) if n > 0 => {
                    let per_token = (now - t).as_secs_f64() / n as f64;
                    let h = metrics::histogram!("zeroshard_inter_token_latency_seconds");
                    (0..n).for_each(|_| h.record(per_token));
                }
                Some(_) => {}
            }
            if n > 0 {
                self.last_sent = Some(now);
            }
            if out.send(Ok(chunk)).await.is_err() {
                return Ok(Attempt::Done); // the client left: dropping `steps` cancels the sequence
            }
        }
        Ok(Attempt::Done)
    }
}

/// How long a sequence keeps trying to resume after its worker failed.
const RESUME_PATIENCE: Duration = Duration::from_secs(120);

/// How one run of a sequence on one worker ended.
enum Attempt {
    /// Finished (or the client left).
    Done,
    /// The worker failed or was lost; resume elsewhere once membership
    /// changes (or a second has passed).
    Failed(String),
    /// The worker is alive but one of its steps failed (ABORTED): resume at once.
    StepFailed(String),
    /// The worker had no room after all (RESOURCE_EXHAUSTED: it has not yet
    /// freed a sequence that ended): back to the front of the queue.
    Busy(String),
    /// The worker missed the step deadline: resume elsewhere at once, and send
    /// it nothing new for a while.
    Stalled(String),
    /// The worker is draining and handed the sequence back (CANCELLED):
    /// continue elsewhere at once; not a failure.
    Moved(String),
}

impl Attempt {
    /// What a worker's status means for the sequence; INVALID_ARGUMENT is the
    /// request's fault and ends it.
    fn from_status(worker: &WorkerEntry, s: Status) -> Result<Self> {
        let why = format!("{} at {}: {}", worker.id, worker.address, s.message());
        Ok(match s.code() {
            tonic::Code::InvalidArgument => {
                return Err(CoordinatorError::InvalidRequest(s.message().to_string()))
            }
            tonic::Code::Aborted => Self::StepFailed(why),
            tonic::Code::ResourceExhausted => Self::Busy(why),
            tonic::Code::Cancelled => Self::Moved(why),
            _ => Self::Failed(why),
        })
    }
}

/// Resumptions in a row after failed steps that do not wait for a change.
const QUICK_RESUMES: u32 = 2;

/// How long a fresh request waits for a live worker of the plan (not for room:
/// that wait is the queue's) before it is refused as UNAVAILABLE.
const NO_WORKER_PATIENCE: Duration = Duration::from_secs(1);

/// `Ok(true)`: the sequence finished; `Ok(false)`: the client left first.
async fn run_inner(
    coord: &Coordinator,
    req: pb::GenerateRequest,
    out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
    received: Instant,
) -> Result<bool> {
    coord.plan()?;
    let Some(v) = validate(coord, req, out).await? else { return Ok(false) };
    metrics::counter!("zeroshard_prompt_tokens_total").increment(v.prompt.len() as u64);
    let tokens = kv_tokens(&coord.0.config, v.prompt.len(), v.params.max_new_tokens);
    let arrived = Instant::now();
    let mut run = Run {
        text: TextStream::new(coord.0.tokenizer.as_deref(), &v.stop)?,
        timings: pb::Timings { prompt_tokens: v.prompt.len() as u32, ..Default::default() },
        first: true,
        produced: Vec::new(),
        finish: if v.params.max_new_tokens == 0 { Some(pb::FinishReason::Length) } else { None },
        start: arrived,
        received,
        last_sent: None,
    };
    let deadline = arrived + RESUME_PATIENCE;
    let mut quick = 0;
    let mut resume = false;
    while run.finish.is_none() {
        let mut changes = coord.0.changes.subscribe();
        let patience = if resume { deadline } else { arrived + NO_WORKER_PATIENCE };
        let (room, queued) = tokio::select! {
            r = coord.admit(tokens, resume, patience) => r?,
            _ = out.closed() => return Ok(false),
        };
        if !resume {
            run.timings.queue_ms = queued.as_secs_f64() * 1e3;
            run.start = Instant::now();
        }
        resume = true;
        let id = room.worker.id;
        let outcome = run.attempt(coord, &v, &room, out, &mut changes).await?;
        drop(room);
        match outcome {
            Attempt::Done => break,
            Attempt::Busy(why) => {
                tracing::debug!("{why}; queued again");
                if Instant::now() > deadline {
                    return Err(CoordinatorError::Unavailable(format!(
                        "no worker had room for the sequence within {RESUME_PATIENCE:?}: {why}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Attempt::Moved(why) => {
                tracing::info!("{why}; continuing after {} tokens elsewhere", run.produced.len());
                coord.0.admission.avoid(id);
                coord.0.sequences_moved.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Stalled(why) => {
                tracing::warn!("{why}; resuming elsewhere after {} tokens", run.produced.len());
                coord.0.admission.stall(id);
                coord.0.sequences_resumed.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::StepFailed(why) if quick < QUICK_RESUMES => {
                quick += 1;
                tracing::warn!("a step failed on {id} ({why}); resuming after {} tokens", run.produced.len());
                coord.0.sequences_resumed.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Failed(why) | Attempt::StepFailed(why) => {
                quick = 0;
                tracing::warn!(
                    "sequence on {id} failed ({why}); resuming after {} tokens",
                    run.produced.len()
                );
                coord.report_failure(id);
                coord.0.sequences_resumed.fetch_add(1, Ordering::Relaxed);
                wait_for_change(&mut changes, deadline, &why).await?;
            }
        }
        if out.is_closed() {
            return Ok(false);
        }
    }
    let Run { mut text, mut timings, first, produced, finish, start, .. } = run;
    let generated = produced.len() as u32;
    let tail = text.finish()?;
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    timings.decode_ms = total_ms - timings.prefill_ms;
    timings.generated_tokens = generated;
    timings.prefill_tokens_per_s = f64::from(timings.prompt_tokens) / (timings.prefill_ms / 1e3).max(1e-9);
    if generated > 1 {
        timings.decode_tokens_per_s = f64::from(generated - 1) / (timings.decode_ms / 1e3).max(1e-9);
    }
    let last = pb::GenerateChunk {
        token_ids: vec![],
        text: tail,
        prompt_token_ids: if first { v.prompt } else { vec![] },
        finish_reason: finish.unwrap_or(pb::FinishReason::Length) as i32,
        timings: Some(timings),
    };
    let _ = out.send(Ok(last)).await;
    Ok(finish.is_some())
}
