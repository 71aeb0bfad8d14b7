//! A validated request as a sequence on the workers: wait in the admission
//! queue for room, run on the reserved worker, detokenize its steps and cut
//! at stop strings, and send the client each piece. When the worker fails,
//! stalls or leaves, the sequence resumes on another one from its prompt plus
//! the tokens already produced: the client sees a pause, and no token twice
//! or never. What a worker's failure means (the retry rule) is decided where
//! its status is read ([`Interrupted`]); what to do about it, here.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use zeroshard_offload::request::{kv_tokens, FinishReason, ScoreRequest};

use super::admission::Reservation;
use super::audit::Producer;
use super::generate::{Out, Validated};
use super::worker_client::Interrupted;
use super::Coordinator;
use crate::error::{CoordinatorError, Result};
use crate::request::{Chunk, End, Timings};
use crate::text_stream::TextStream;

/// How long a sequence keeps trying to resume after its worker failed.
const RESUME_PATIENCE: Duration = Duration::from_secs(120);

/// Resumptions in a row after failed steps that do not wait for a change.
const QUICK_RESUMES: u32 = 2;

/// How long a fresh request waits for a live worker of the plan (not for room:
/// that wait is the queue's) before it is refused as UNAVAILABLE.
const NO_WORKER_PATIENCE: Duration = Duration::from_secs(1);

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
    timings: Timings,
    /// No chunk sent yet.
    first: bool,
    /// Every token produced so far (a resume sends them with the prompt).
    produced: Vec<u32>,
    /// Which worker produced which of them (for the output audit).
    by: Vec<Producer>,
    finish: Option<FinishReason>,
    /// When the sequence left the queue (prefill and decode times start here).
    start: Instant,
    /// When the request arrived (time to first token counts from here).
    received: Instant,
    /// When the last chunk with tokens went out.
    last_sent: Option<Instant>,
}

/// How one run of a sequence on one worker ended.
enum Attempt {
    /// Finished (or the client left).
    Done,
    /// The worker missed the step deadline: resume elsewhere at once, and send
    /// it nothing new for a while.
    Stalled(String),
    /// The worker ended the run (see [`Interrupted`] for each rule).
    Interrupted(Interrupted),
}

impl Run<'_> {
    /// Runs the sequence on the reserved worker from where it is, forwarding
    /// each step; each message must come within the worker's step deadline.
    async fn attempt(
        &mut self,
        coord: &Coordinator,
        v: &Validated,
        room: &Reservation,
        out: &Out,
        changes: &mut watch::Receiver<u64>,
    ) -> Result<Attempt> {
        let (worker, plan) = (&room.worker, &room.plan);
        let floor = coord.cfg().limits.step_deadline;
        let id = coord.requests().next_seq.fetch_add(1, Ordering::Relaxed);
        // Rated tokens: the prompt's with the first chunk (if asked), then
        // each token as it is sampled; a resume rates only what it samples.
        let score = v.logprobs.map(|l| ScoreRequest {
            from: if l.prompt && self.first { 0 } else { v.prompt.len() + self.produced.len() - 1 },
            top: l.top,
            tolerance: 0.0,
            sampled: true,
        });
        let call = worker.client.run_sequence(
            id,
            plan.epoch(),
            &v.prompt,
            &self.produced,
            &v.params,
            score.as_ref(),
        );
        let mut steps = match tokio::time::timeout(floor, call).await {
            Err(_) => return Ok(Attempt::Stalled(format!("{} did not answer within {floor:?}", worker.id))),
            Ok(Ok(s)) => s,
            Ok(Err(i)) => return Ok(Attempt::Interrupted(i)),
        };
        // The first message prefills the prompt and what was produced before.
        let mut prefill = Some(worker.clock.prefill(v.prompt.len() + self.produced.len()));
        let sent = Instant::now();
        let mut last = sent;
        while self.finish.is_none() {
            let deadline = worker.clock.deadline(floor);
            let step = tokio::select! {
                m = tokio::time::timeout(deadline, steps.next()) => match m {
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
                    return Ok(Attempt::Interrupted(Interrupted::Failed(format!("{} left the cluster", worker.id))));
                }
            };
            let step = match step {
                Ok(Some(s)) => s,
                Ok(None) => {
                    let why = format!("{} ended the sequence early", worker.id);
                    return Ok(Attempt::Interrupted(Interrupted::Failed(why)));
                }
                Err(i) => return Ok(Attempt::Interrupted(i)),
            };
            match prefill.take() {
                Some(p) => p.done(sent.elapsed()),
                None => worker.clock.record_step(last.elapsed()),
            }
            last = Instant::now();
            if self.first {
                self.timings.prefill_ms = self.start.elapsed().as_secs_f64() * 1e3;
            }
            let mut scores = step.scores;
            if v.score_only {
                // The prompt's scores are the answer; the token sampled after it is not.
                scores.truncate(v.prompt.len() - 1);
                self.finish = Some(FinishReason::Length);
                let chunk = Chunk { prompt_token_ids: v.prompt.clone(), scores, ..Chunk::default() };
                self.first = false;
                let _ = out.send(Ok(chunk)).await;
                return Ok(Attempt::Done);
            }
            let mut delta = String::new();
            for &t in &step.token_ids {
                self.produced.push(t);
                let d = self.text.push(t)?;
                delta.push_str(&d.text);
                if d.stopped {
                    self.finish = Some(FinishReason::Stop);
                }
            }
            self.finish = self.finish.or(step.finish);
            let chunk = Chunk {
                token_ids: step.token_ids,
                text: delta,
                prompt_token_ids: if self.first { v.prompt.clone() } else { vec![] },
                end: None,
                scores,
            };
            self.first = false;
            self.record(chunk.token_ids.len());
            if out.send(Ok(chunk)).await.is_err() {
                return Ok(Attempt::Done); // the client left: dropping `steps` cancels the sequence
            }
        }
        Ok(Attempt::Done)
    }

    /// Counts `n` tokens going out now (time to first token, inter-token latency).
    fn record(&mut self, n: usize) {
        let now = Instant::now();
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
    }
}

/// Runs `v` to its end, resuming it wherever it can go on. `Ok(true)`: the
/// sequence finished; `Ok(false)`: the client left first.
pub(super) async fn run(coord: &Coordinator, v: Validated, out: &Out, received: Instant) -> Result<bool> {
    let tokens = kv_tokens(&coord.model().config, v.prompt.len(), v.params.max_new_tokens);
    let arrived = Instant::now();
    let mut run = Run {
        text: TextStream::new(coord.model().tokenizer.as_deref(), &v.prompt, &v.stop)?,
        timings: Timings { prompt_tokens: v.prompt.len(), ..Default::default() },
        first: true,
        produced: Vec::new(),
        by: Vec::new(),
        finish: if v.params.max_new_tokens == 0 { Some(FinishReason::Length) } else { None },
        start: arrived,
        received,
        last_sent: None,
    };
    let deadline = arrived + RESUME_PATIENCE;
    let mut quick = 0;
    let mut resume = false;
    while run.finish.is_none() {
        let mut changes = coord.changes();
        let patience = if resume { deadline } else { arrived + NO_WORKER_PATIENCE };
        let (room, queued) = tokio::select! {
            r = coord.admission().admit(tokens, resume, patience) => r?,
            _ = out.closed() => return Ok(false),
        };
        if !resume {
            run.timings.queue_ms = queued.as_secs_f64() * 1e3;
            run.start = Instant::now();
        }
        resume = true;
        let id = room.worker.id;
        let before = run.produced.len();
        let outcome = run.attempt(coord, &v, &room, out, &mut changes).await;
        if run.produced.len() > before {
            run.by.push(Producer { worker: id, tokens: before..run.produced.len() });
        }
        let outcome = outcome?;
        drop(room);
        match outcome {
            Attempt::Done => break,
            Attempt::Interrupted(Interrupted::Invalid(m)) => return Err(CoordinatorError::InvalidRequest(m)),
            Attempt::Interrupted(Interrupted::Busy(why)) => {
                tracing::debug!("{why}; queued again");
                if Instant::now() > deadline {
                    return Err(CoordinatorError::Unavailable(format!(
                        "no worker had room for the sequence within {RESUME_PATIENCE:?}: {why}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Attempt::Interrupted(Interrupted::Moved(why)) => {
                tracing::info!("{why}; continuing after {} tokens elsewhere", run.produced.len());
                coord.admission().avoid(id);
                coord.counters().sequences_moved.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Stalled(why) => {
                tracing::warn!("{why}; resuming elsewhere after {} tokens", run.produced.len());
                coord.admission().stall(id);
                coord.counters().sequences_resumed.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Interrupted(Interrupted::Replaced(why)) if quick < QUICK_RESUMES => {
                quick += 1;
                tracing::info!("{why}; continuing after {} tokens", run.produced.len());
                coord.counters().sequences_moved.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Interrupted(Interrupted::StepFailed(why)) if quick < QUICK_RESUMES => {
                quick += 1;
                tracing::warn!("a step failed on {id} ({why}); resuming after {} tokens", run.produced.len());
                coord.counters().sequences_resumed.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Interrupted(
                Interrupted::Failed(why) | Interrupted::StepFailed(why) | Interrupted::Replaced(why),
            ) => {
                quick = 0;
                tracing::warn!(
                    "sequence on {id} failed ({why}); resuming after {} tokens",
                    run.produced.len()
                );
                coord.report_failure(id);
                coord.counters().sequences_resumed.fetch_add(1, Ordering::Relaxed);
                wait_for_change(&mut changes, deadline, &why).await?;
            }
        }
        if out.is_closed() {
            return Ok(false);
        }
    }
    let Run { mut text, mut timings, first, produced, by, finish, start, .. } = run;
    if finish.is_some() {
        super::audit::consider(coord, &v.prompt, &v.params, &produced, &by);
    }
    let generated = produced.len();
    let tail = text.finish()?;
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    timings.decode_ms = total_ms - timings.prefill_ms;
    timings.generated_tokens = generated;
    timings.prefill_tokens_per_s = timings.prompt_tokens as f64 / (timings.prefill_ms / 1e3).max(1e-9);
    if generated > 1 {
        timings.decode_tokens_per_s = (generated - 1) as f64 / (timings.decode_ms / 1e3).max(1e-9);
    }
    let last = Chunk {
        token_ids: vec![],
        text: tail,
        prompt_token_ids: if first { v.prompt } else { vec![] },
        end: Some(End { finish: finish.unwrap_or(FinishReason::Length), timings }),
        scores: vec![],
    };
    let _ = out.send(Ok(last)).await;
    Ok(finish.is_some())
}
