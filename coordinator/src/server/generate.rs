//! One client request through the cluster: validate, tokenize, route to the
//! least-loaded worker, detokenize its token stream and cut at stop strings.
//! When the worker fails or leaves, the sequence resumes on another one from
//! its prompt plus the tokens already produced: the client sees a pause, and
//! no token twice or never.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tonic::Status;
use zeroshard_offload::plan::Plan;
use zeroshard_offload::request::GenerationParams;
use zeroshard_proto::v1 as pb;

use super::state::WorkerEntry;
use super::Coordinator;
use crate::error::{CoordinatorError, Result};
use crate::text_stream::TextStream;

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

fn validate(coord: &Coordinator, req: pb::GenerateRequest) -> Result<Validated> {
    let inner = &coord.0;
    let prompt = match req.prompt {
        None => return Err(invalid("the request has no prompt (text or token_ids)")),
        Some(pb::generate_request::Prompt::Text(t)) if t.is_empty() => {
            return Err(invalid("the prompt is empty"))
        }
        Some(pb::generate_request::Prompt::Text(t)) => inner
            .tokenizer
            .as_ref()
            .ok_or_else(|| invalid("the model has no tokenizer.json: send token_ids"))?
            .encode(&t)?,
        Some(pb::generate_request::Prompt::TokenIds(ids)) => ids.ids,
    };
    zeroshard_offload::request::validate_prompt(&inner.config, &prompt)?;
    let params = zeroshard_offload::convert::generation_params(req.sampling);
    params.sampling.validate().map_err(invalid)?;
    if !req.stop.is_empty() && inner.tokenizer.is_none() {
        return Err(invalid("stop strings need a tokenizer.json in the model folder"));
    }
    if req.stop.iter().any(String::is_empty) {
        return Err(invalid("a stop string is empty"));
    }
    Ok(Validated { prompt, params, sampling: req.sampling, stop: req.stop })
}

/// Runs `req`, sending its chunks to `out`: the first carries the prompt ids,
/// the last the finish reason and timings. Returns when the sequence ends or
/// the client leaves (a closed `out`), which cancels it on the worker.
pub(super) async fn run(
    coord: Coordinator,
    req: pb::GenerateRequest,
    out: mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
) {
    if let Err(e) = run_inner(&coord, req, &out).await {
        let _ = out.send(Err(Status::from(e))).await;
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
    start: Instant,
}

impl Run<'_> {
    /// Runs the sequence on `worker` from where it is, forwarding each step.
    async fn attempt(
        &mut self,
        coord: &Coordinator,
        v: &Validated,
        plan: &Plan,
        worker: &WorkerEntry,
        out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
        changes: &mut watch::Receiver<u64>,
    ) -> Result<Attempt> {
        worker.active.fetch_add(1, Ordering::Relaxed);
        let _guard = ActiveGuard(worker.active.clone());
        let mut client = worker.client.grpc();
        let call = client.run_sequence(pb::RunSequenceRequest {
            sequence_id: coord.0.next_seq.fetch_add(1, Ordering::Relaxed),
            epoch: plan.epoch(),
            prompt_token_ids: v.prompt.clone(),
            generated_token_ids: self.produced.clone(),
            sampling: v.sampling,
        });
        let mut steps = match call.await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                return Err(CoordinatorError::InvalidRequest(s.message().to_string()))
            }
            Err(s) => {
                return Ok(Attempt::Failed(format!("{} at {}: {}", worker.id, worker.address, s.message())))
            }
        };
        while self.finish.is_none() {
            let step = tokio::select! {
                m = steps.message() => m,
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
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(CoordinatorError::InvalidRequest(s.message().to_string()))
                }
                Err(s) if s.code() == tonic::Code::Aborted => {
                    return Ok(Attempt::StepFailed(format!("{}: {}", worker.id, s.message())))
                }
                Err(s) => return Ok(Attempt::Failed(format!("{}: {}", worker.id, s.message()))),
            };
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
            if out.send(Ok(chunk)).await.is_err() {
                return Ok(Attempt::Done); // the client left: dropping `steps` cancels the sequence
            }
        }
        Ok(Attempt::Done)
    }
}

/// Decrements a worker's active count when a sequence ends, however it ends.
struct ActiveGuard(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
}

/// Resumptions in a row after failed steps that do not wait for a change.
const QUICK_RESUMES: u32 = 2;

async fn run_inner(
    coord: &Coordinator,
    req: pb::GenerateRequest,
    out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
) -> Result<()> {
    coord.plan()?;
    let v = validate(coord, req)?;
    let start = Instant::now();
    let mut run = Run {
        text: TextStream::new(coord.0.tokenizer.as_deref(), &v.stop)?,
        timings: pb::Timings { prompt_tokens: v.prompt.len() as u32, ..Default::default() },
        first: true,
        produced: Vec::new(),
        finish: if v.params.max_new_tokens == 0 { Some(pb::FinishReason::Length) } else { None },
        start,
    };
    let deadline = start + RESUME_PATIENCE;
    let mut quick = 0;
    while run.finish.is_none() {
        let mut changes = coord.0.changes.subscribe();
        let (plan, worker) = match coord.least_loaded() {
            Ok(x) => x,
            Err(e)
                if run.first
                    && run.produced.is_empty()
                    && Instant::now() > start + Duration::from_secs(1) =>
            {
                return Err(e)
            }
            Err(e) => {
                wait_for_change(&mut changes, deadline, &e.to_string()).await?;
                continue;
            }
        };
        match run.attempt(coord, &v, &plan, &worker, out, &mut changes).await? {
            Attempt::Done => break,
            Attempt::StepFailed(why) if quick < QUICK_RESUMES => {
                quick += 1;
                tracing::warn!(
                    "a step failed on {} ({why}); resuming after {} tokens",
                    worker.id,
                    run.produced.len()
                );
                coord.0.sequences_resumed.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Failed(why) | Attempt::StepFailed(why) => {
                quick = 0;
                tracing::warn!(
                    "sequence on {} failed ({why}); resuming after {} tokens",
                    worker.id,
                    run.produced.len()
                );
                coord.report_failure(worker.id);
                coord.0.sequences_resumed.fetch_add(1, Ordering::Relaxed);
                wait_for_change(&mut changes, deadline, &why).await?;
            }
        }
        if out.is_closed() {
            return Ok(());
        }
    }
    let Run { mut text, mut timings, first, produced, finish, .. } = run;
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
    Ok(())
}
