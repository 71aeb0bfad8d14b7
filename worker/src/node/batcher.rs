//! The continuous-batching loop: one thread that owns every active sequence.
//! Sequences join and leave at step boundaries; each step is one forward over
//! all of them, so one gather per layer serves the whole batch. The loop is the
//! same for every backend: `state` starts it with a CPU or a CUDA engine.
//!
//! The loop speaks domain types only: each sequence gets [`SeqEvent`]s, a
//! token or the error that ended it; the `Worker` service turns them into
//! messages and statuses. A step that fails ends the sequences of that step
//! with its error (the coordinator resumes them elsewhere); a fatal error (the
//! device cannot be trusted again) also ends the loop and is reported on
//! `fatal`, so the worker leaves the cluster instead of staying registered
//! without stepping.
//!
//! Admission: a sequence joins only when its whole KV cache (prompt +
//! `max_new_tokens`, within the model's positions) fits in what the budget
//! has left and the cap on sequences allows; otherwise it ends at once with
//! [`WorkerError::Overloaded`], so a running sequence never runs out of memory
//! half-way. A sequence that cannot run at all (nothing left to generate, a
//! prompt the model refuses) ends alone with its own error; the batch goes on.
//!
//! Draining ([`Command::Drain`]): every sequence is handed back at the next
//! step boundary ([`WorkerError::Draining`]) and new ones are refused, so the
//! coordinator continues them elsewhere from the tokens already sent.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::group::{self, Followed, Joined, Leader, Member, Order};
use super::Faults;
use crate::error::WorkerError;
use zeroshard_engine::engine::{kv_tokens, Engine, GenerationParams, ScoreRequest, Sequence, StepToken};
use zeroshard_engine::source::WeightSource;
use zeroshard_engine::tensor::TensorShard;
use zeroshard_engine::weights::HostWeights;
use zeroshard_engine::Backend;
use zeroshard_offload::ModelConfig;

/// What a running sequence hears from the loop: its next token, or the error
/// that ended it (shared by every sequence of a failed step).
pub(crate) type SeqEvent = Result<StepToken, Arc<WorkerError>>;

/// What the loop is asked to do.
pub(crate) enum Command {
    /// Start a sequence; its steps go to `tx` (closed `tx` = client left).
    Run {
        id: u64,
        prompt: Vec<u32>,
        params: GenerationParams,
        /// Score its prompt from this position on (an output audit).
        score: Option<ScoreRequest>,
        tx: UnboundedSender<SeqEvent>,
    },
    Cancel(u64),
    /// Hand every sequence back, and refuse new ones: the worker is leaving.
    Drain,
    /// Compute from these weights from the next step on.
    Source(Arc<dyn WeightSource>),
    /// Compute this tensor-parallel shard of the model (its weights held here)
    /// from now on, or with `None` the whole model from a [`Command::Source`]:
    /// running sequences are handed back (their shapes change).
    Tensor {
        config: Box<ModelConfig>,
        shard: Option<(TensorShard, Arc<HostWeights>)>,
    },
    /// Rank 0 of a group: step with these members.
    Lead(Arc<Leader>),
    /// Another member of a group: step as rank 0 orders.
    Follow(Member),
}

/// Counters the loop keeps for `Stats`.
#[derive(Debug, Default)]
pub(crate) struct BatchStats {
    pub active: AtomicU32,
    pub steps: AtomicU64,
    /// Wall-clock time of all steps.
    pub step_nanos: AtomicU64,
    /// The admission limits (0 until the loop starts) and what is reserved.
    pub kv_cache_bytes: AtomicU64,
    pub kv_bytes_per_token: AtomicU64,
    pub max_active: AtomicU32,
    pub kv_reserved: AtomicU64,
}

/// What the loop admits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// KV-cache bytes all admitted sequences may reserve together.
    pub kv_cache_bytes: u64,
    /// Sequences running at once.
    pub max_active: usize,
}

/// How the loop runs: its limits and its test hooks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoopConfig {
    pub limits: Limits,
    /// Test hooks: a delay after every step (a short generation made long
    /// enough to disturb), a loop that stops stepping (a stuck worker).
    pub faults: Faults,
}

struct Active<B: Backend> {
    seq: Sequence<B>,
    tx: UnboundedSender<SeqEvent>,
    /// KV-cache bytes reserved for it.
    reserved: u64,
}

/// Admits a new sequence (see the module docs), or says why not.
fn admit<B: Backend>(
    engine: &Engine<B>,
    limits: &Limits,
    active: &HashMap<u64, Active<B>>,
    prompt: Vec<u32>,
    params: GenerationParams,
    score: Option<ScoreRequest>,
) -> Result<(Sequence<B>, u64), WorkerError> {
    if let Some(r) = score.as_ref().filter(|r| r.from >= prompt.len()) {
        return Err(WorkerError::InvalidRequest(format!(
            "scoring from position {} of a prompt of {} tokens",
            r.from,
            prompt.len()
        )));
    }
    if params.max_new_tokens == 0 {
        return Err(WorkerError::InvalidRequest(
            "nothing to generate: the sequence has produced its max_new_tokens already".into(),
        ));
    }
    let need =
        kv_tokens(engine.config(), prompt.len(), params.max_new_tokens) as u64 * engine.kv_bytes_per_token();
    if need > limits.kv_cache_bytes {
        return Err(WorkerError::InvalidRequest(format!(
            "the sequence needs {:.1} MB of KV cache ({} prompt + {} new tokens), more than this \
             worker's whole budget of {:.1} MB (--kv-cache-bytes)",
            need as f64 / MB,
            prompt.len(),
            params.max_new_tokens,
            limits.kv_cache_bytes as f64 / MB
        )));
    }
    if active.len() >= limits.max_active {
        return Err(WorkerError::Overloaded(format!(
            "{} sequences running, the most this worker runs (--max-active-sequences {})",
            active.len(),
            limits.max_active
        )));
    }
    let reserved: u64 = active.values().map(|a| a.reserved).sum();
    if reserved + need > limits.kv_cache_bytes {
        return Err(WorkerError::Overloaded(format!(
            "the sequence needs {:.1} MB of KV cache, {:.1} of {:.1} MB are free (--kv-cache-bytes)",
            need as f64 / MB,
            (limits.kv_cache_bytes - reserved) as f64 / MB,
            limits.kv_cache_bytes as f64 / MB
        )));
    }
    let seq = engine.new_sequence(prompt, params)?;
    Ok((
        match score {
            Some(r) => seq.scoring(r),
            None => seq,
        },
        need,
    ))
}

/// KV-cache figures are in MB (10^6 bytes), as `status` shows them.
const MB: f64 = 1e6;

/// Runs until every command sender is gone, or until a fatal step error,
/// which it publishes on `fatal`.
pub(super) fn run<B: Backend>(
    mut engine: Engine<B>,
    rx: Receiver<Command>,
    stats: Arc<BatchStats>,
    cfg: LoopConfig,
    fatal: watch::Sender<Option<Arc<WorkerError>>>,
) {
    let limits = cfg.limits;
    stats.kv_cache_bytes.store(limits.kv_cache_bytes, Ordering::Relaxed);
    stats.kv_bytes_per_token.store(engine.kv_bytes_per_token(), Ordering::Relaxed);
    stats.max_active.store(limits.max_active as u32, Ordering::Relaxed);
    let mut active: HashMap<u64, Active<B>> = HashMap::new();
    let mut source: Option<Arc<dyn WeightSource>> = None;
    // The tensor placement: this worker's group as rank 0, the sequences its
    // members know; or its link to rank 0 and the sequences it keeps for it.
    let mut leader: Option<Arc<Leader>> = None;
    let mut known: HashSet<u64> = HashSet::new();
    let mut member: Option<Member> = None;
    let mut kept: HashMap<u64, Sequence<B>> = HashMap::new();
    // Commands taken while following rank 0, handled next.
    let mut pending: VecDeque<Command> = VecDeque::new();
    let mut draining = false;
    let handed_back =
        || Arc::new(WorkerError::Draining("the worker is draining: sequence handed back".into()));
    let publish = |active: &HashMap<u64, Active<B>>| {
        stats.active.store(active.len() as u32, Ordering::Relaxed);
        stats.kv_reserved.store(active.values().map(|a| a.reserved).sum(), Ordering::Relaxed);
    };
    loop {
        if let Some(m) = &member {
            if pending.is_empty() {
                let followed = group::follow(&engine, m, &mut kept, &stats, || match rx.try_recv() {
                    Ok(c) => {
                        pending.push_back(c);
                        true
                    }
                    Err(_) => false,
                });
                match followed {
                    Followed::Interrupted => {}
                    Followed::Closed => {
                        tracing::info!("rank 0 closed the tensor-parallel group of epoch {}", m.epoch);
                        member = None;
                        kept.clear();
                    }
                    // Stopping, the group ending under this member is expected.
                    Followed::Failed(e) if draining => {
                        tracing::info!(
                            "tensor-parallel group of epoch {} ended while draining: {e}",
                            m.epoch
                        );
                        member = None;
                        kept.clear();
                    }
                    Followed::Failed(e) => {
                        tracing::error!("tensor-parallel group of epoch {}: {e}", m.epoch);
                        member = None;
                        kept.clear();
                    }
                }
            }
        }
        let ready = if engine.shard().is_some() { leader.is_some() } else { source.is_some() };
        // Wait for work when idle; otherwise take what arrived and step.
        let first = if pending.is_empty() && (active.is_empty() || !ready) {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            None
        };
        let taken: Vec<Command> = pending.drain(..).chain(first).chain(rx.try_iter()).collect();
        for cmd in taken {
            match cmd {
                Command::Run { tx, .. } if draining => {
                    let _ = tx.send(Err(handed_back()));
                }
                Command::Run { id, prompt, params, score, tx } => {
                    match admit(&engine, &limits, &active, prompt, params, score) {
                        Ok((seq, reserved)) => {
                            active.insert(id, Active { seq, tx, reserved });
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Arc::new(e)));
                        }
                    }
                }
                Command::Cancel(id) => {
                    active.remove(&id);
                }
                Command::Drain => {
                    draining = true;
                    for (_, a) in active.drain() {
                        let _ = a.tx.send(Err(handed_back()));
                    }
                }
                Command::Source(s) => source = Some(s),
                Command::Tensor { config, shard } => {
                    let what = match &shard {
                        Some((s, _)) => format!("tensor-parallel shard {} of {}", s.rank, s.degree),
                        None => "the whole model (gather placement)".into(),
                    };
                    for (_, a) in active.drain() {
                        let _ = a.tx.send(Err(Arc::new(WorkerError::Abandoned(format!(
                            "this worker now computes {what}: sequence handed back"
                        )))));
                    }
                    engine.reshard(&config, shard);
                    stats.kv_bytes_per_token.store(engine.kv_bytes_per_token(), Ordering::Relaxed);
                    (leader, member) = (None, None);
                    known.clear();
                    kept.clear();
                    tracing::info!("computing {what}");
                }
                Command::Lead(l) => {
                    known.clear();
                    leader = Some(l);
                }
                Command::Follow(m) => {
                    kept.clear();
                    member = Some(m);
                }
            }
        }
        // A closed stream means the client left: free its sequence.
        active.retain(|_, a| !a.tx.is_closed());
        publish(&active);
        if !ready || active.is_empty() {
            continue;
        }
        if cfg.faults.hang_after_steps().is_some_and(|n| stats.steps.load(Ordering::Relaxed) >= n) {
            std::thread::sleep(Duration::from_millis(100)); // the injected hang: never step again
            continue;
        }
        let mut ids: Vec<u64> = active.keys().copied().collect();
        ids.sort_unstable();
        let mut seqs: Vec<&mut Sequence<B>> = Vec::with_capacity(ids.len());
        // Borrow every active sequence mutably, in id order.
        let mut by_id: HashMap<u64, &mut Active<B>> = active.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut txs = Vec::with_capacity(ids.len());
        for id in &ids {
            let a = by_id.remove(id).expect("id from keys");
            txs.push(a.tx.clone());
            seqs.push(&mut a.seq);
        }
        let started = std::time::Instant::now();
        let step = tracing::debug_span!("step", batch = ids.len()).entered();
        let result = match (&leader, &source) {
            (Some(group), _) if engine.shard().is_some() => {
                let now: HashSet<u64> = ids.iter().copied().collect();
                let order = Order {
                    joined: ids
                        .iter()
                        .zip(&seqs)
                        .filter(|(id, _)| !known.contains(id))
                        .map(|(&id, s)| Joined {
                            id,
                            prompt: s.prompt().to_vec(),
                            max_new_tokens: s.params().max_new_tokens,
                            ignore_eos: s.params().ignore_eos,
                            score_from: s.score_from(),
                        })
                        .collect(),
                    left: known.difference(&now).copied().collect(),
                    step: ids.clone(),
                };
                known = now;
                group.order(&order).and_then(|()| engine.step_in_group(&mut seqs, group.as_ref(), false))
            }
            (_, Some(src)) => engine.step_from(&mut seqs, src.as_ref(), false),
            _ => unreachable!("a step runs only when ready"),
        };
        drop(step);
        let took = started.elapsed();
        stats.step_nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        stats.steps.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("zeroshard_step_seconds").record(took.as_secs_f64());
        metrics::histogram!("zeroshard_step_batch_size").record(ids.len() as f64);
        match result {
            Ok((tokens, _)) => {
                for ((id, mut t), tx) in ids.iter().zip(tokens).zip(txs) {
                    if active.get(id).is_some_and(|a| cfg.faults.alter_token(a.seq.generated().len())) {
                        t.token = (t.token + 1) % engine.config().vocab_size as u32;
                    }
                    if let Some(why) = t.fault.take() {
                        tracing::error!("sequence {id}: {why}");
                        let _ = tx.send(Err(Arc::new(WorkerError::InvalidRequest(why))));
                        active.remove(id);
                        continue;
                    }
                    let finished = t.finished.is_some();
                    if tx.send(Ok(t)).is_err() || finished {
                        active.remove(id);
                    }
                }
            }
            Err(e) => {
                if let Some(l) = leader.take() {
                    // The members may be anywhere in that step: this group is
                    // done until a plan forms it again.
                    tracing::error!(
                        "tensor-parallel group of epoch {}: rank 0 stops stepping until the next plan",
                        l.epoch
                    );
                }
                let e = WorkerError::from(e);
                let fatal_error = e.is_fatal();
                tracing::error!(
                    "step over {} sequences failed{}: {e}",
                    ids.len(),
                    if fatal_error { " (fatal)" } else { "" }
                );
                let e = Arc::new(e);
                for id in &ids {
                    if let Some(a) = active.remove(id) {
                        let _ = a.tx.send(Err(e.clone()));
                    }
                }
                if fatal_error {
                    // Sequences that joined after the step began end too: nothing steps here again.
                    for (_, a) in active.drain() {
                        let _ = a.tx.send(Err(e.clone()));
                    }
                    publish(&active);
                    let _ = fatal.send(Some(e));
                    return;
                }
            }
        }
        publish(&active);
        if !cfg.faults.step_delay().is_zero() {
            std::thread::sleep(cfg.faults.step_delay());
        }
    }
}
