//! One client request through the cluster: validate, tokenize, route to the
//! least-loaded worker, detokenize its token stream and cut at stop strings.
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;
use zeroshard_proto::v1 as pb;
use zeroshard_worker::engine::GenerationParams;

use super::Coordinator;
use crate::error::{CoordinatorError, Result};
use crate::local::TextStream;

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
    zeroshard_worker::engine::validate_prompt(&inner.config, &prompt)?;
    let params = zeroshard_worker::convert::generation_params(req.sampling);
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
pub async fn run(
    coord: Coordinator,
    req: pb::GenerateRequest,
    out: mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
) {
    if let Err(e) = run_inner(&coord, req, &out).await {
        let _ = out.send(Err(Status::from(e))).await;
    }
}

/// Decrements a worker's active count when a sequence ends, however it ends.
struct ActiveGuard(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_inner(
    coord: &Coordinator,
    req: pb::GenerateRequest,
    out: &mpsc::Sender<std::result::Result<pb::GenerateChunk, Status>>,
) -> Result<()> {
    let plan = coord.plan()?;
    let v = validate(coord, req)?;
    let worker = coord.least_loaded()?;
    worker.active.fetch_add(1, Ordering::Relaxed);
    let _guard = ActiveGuard(worker.active.clone());
    let start = Instant::now();
    let mut client = worker.client.clone();
    let mut steps = client
        .run_sequence(pb::RunSequenceRequest {
            sequence_id: coord.0.next_seq.fetch_add(1, Ordering::Relaxed),
            epoch: plan.epoch(),
            prompt_token_ids: v.prompt.clone(),
            generated_token_ids: vec![],
            sampling: v.sampling,
        })
        .await
        .map_err(|s| {
            CoordinatorError::Unavailable(format!("{} at {}: {}", worker.id, worker.address, s.message()))
        })?
        .into_inner();
    let mut text = TextStream::new(coord.0.tokenizer.as_deref(), &v.stop)?;
    let mut timings = pb::Timings { prompt_tokens: v.prompt.len() as u32, ..Default::default() };
    let mut first = true;
    let mut generated = 0u32;
    let mut finish = if v.params.max_new_tokens == 0 { Some(pb::FinishReason::Length) } else { None };
    while finish.is_none() {
        let step = match steps.message().await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(CoordinatorError::Unavailable(format!("{} ended the sequence early", worker.id)))
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                return Err(CoordinatorError::InvalidRequest(s.message().to_string()))
            }
            Err(s) => return Err(CoordinatorError::Unavailable(format!("{}: {}", worker.id, s.message()))),
        };
        if first {
            timings.prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        let mut delta = String::new();
        for &t in &step.token_ids {
            generated += 1;
            let d = text.push(t)?;
            delta.push_str(&d.text);
            if d.stopped {
                finish = Some(pb::FinishReason::Stop);
            }
        }
        if finish.is_none() {
            let r = pb::FinishReason::try_from(step.finish_reason).unwrap_or(pb::FinishReason::Unspecified);
            if r != pb::FinishReason::Unspecified {
                finish = Some(r);
            }
        }
        let chunk = pb::GenerateChunk {
            token_ids: step.token_ids,
            text: delta,
            prompt_token_ids: if first { v.prompt.clone() } else { vec![] },
            finish_reason: 0,
            timings: None,
        };
        first = false;
        if out.send(Ok(chunk)).await.is_err() {
            return Ok(()); // the client left: dropping `steps` cancels the sequence
        }
    }
    drop(steps);
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
