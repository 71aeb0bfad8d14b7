//! Sequences and the batched step: one forward over the new tokens of every
//! active sequence (prompts and single decode tokens mixed), then sampling.
//!
//! ```ignore
//! let engine = Engine::new(CpuBackend::new(), config, weights);
//! let mut seq = engine.new_sequence(prompt_ids, params)?;
//! while seq.finished().is_none() {
//!     engine.step(&mut [&mut seq])?;
//! }
//! ```
//!
//! A step that fails leaves its sequences unusable (their caches may hold part of
//! the step): later steps refuse them, and the caller starts new ones. Whether the
//! engine can run those depends on the error: [`EngineError::is_fatal`] means the
//! device is broken and no later step will succeed.
use std::collections::VecDeque;
use std::sync::Arc;

use zeroshard_offload::ModelConfig;

use crate::backend::{Backend, BatchLayout, Piece};
use crate::error::{EngineError, Result};
use crate::model::{tensor_specs, LayerWeights, Model, OuterWeights};
use crate::sampling::{self, Sampler};
use crate::source::{WeightSource, HEAD_SLICE};
use crate::tensor::{Collective, TensorShard};
use crate::weights::HostWeights;
pub use zeroshard_offload::request::{
    kv_tokens, validate_prompt, FinishReason, GenerationParams, ScoreRequest, TokenScore,
};

/// Rows of logits the head computes at once: a scored prompt of thousands of
/// tokens makes its `[rows, vocab]` logits a chunk at a time.
const HEAD_ROWS: usize = 256;

/// One sequence: its tokens, cache, sampler and state.
pub struct Sequence<B: Backend> {
    tokens: Vec<u32>, // prompt + generated
    prompt_len: usize,
    cache: B::KvCache,
    sampler: Sampler,
    params: GenerationParams,
    finished: Option<FinishReason>,
    /// A forward over this sequence failed: its cache may hold part of that step.
    failed: bool,
    /// Positions its first forward scores (see [`Sequence::scoring`]), and
    /// the scores that forward made, until a step hands them out.
    score: Option<ScoreRequest>,
    scores: Vec<TokenScore>,
}

impl<B: Backend> Sequence<B> {
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// Generated tokens so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// What it generates with (its limit, its sampling, whether it stops at EOS).
    pub fn params(&self) -> &GenerationParams {
        &self.params
    }

    /// Marks the sequence finished (e.g. a stop string matched).
    pub fn finish(&mut self, reason: FinishReason) {
        self.finished.get_or_insert(reason);
    }

    /// Scores the positions `req.from..` of the sequence's first forward (the
    /// prompt's), which the step that makes them hands out in
    /// [`StepToken::scores`]; the sequence samples and stops as before.
    pub fn scoring(mut self, req: ScoreRequest) -> Self {
        self.score = Some(req);
        self
    }

    /// The first position its next forward scores, if it is scored.
    pub fn score_from(&self) -> Option<usize> {
        self.score.as_ref().map(|r| r.from)
    }
}

/// What a step produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct StepToken {
    pub token: u32,
    /// Set when this token ended the sequence.
    pub finished: Option<FinishReason>,
    /// A scored sequence's scores, on the step of its first forward (empty
    /// otherwise, and on the members of a tensor-parallel group but rank 0).
    pub scores: Vec<TokenScore>,
    /// Set when this step's logits for the sequence were not all finite (NaN
    /// or ±inf: a model or config that overflows): nothing was sampled
    /// (`token` means nothing), and the sequence refuses later steps.
    pub fault: Option<String>,
}

/// A model, its weights in host memory and a backend to run them.
pub struct Engine<B: Backend> {
    backend: B,
    model: Model,
    weights: Arc<HostWeights>,
    /// Tensor names of each piece the forward stages (see [`Backend::stage`]).
    names: PieceNames,
    /// The forward runs inside the process's compute pool ([`compute_pool`]), so the
    /// matmul's fork/join stays on pool threads (calling in from outside a pool costs
    /// ~30% on decode).
    pool: Arc<rayon::ThreadPool>,
    /// The tensor-parallel shard this engine computes (`None`: the whole model).
    shard: Option<TensorShard>,
}

/// Compute threads asked for before the pool was built (0: rayon's default).
static COMPUTE_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sizes the process's compute pool: `threads` threads, or with `None` one per core this
/// process may run on (its CPU affinity and cgroup quota; `RAYON_NUM_THREADS` if set).
/// Must come before the first engine; returns false, changing nothing, after.
pub fn set_compute_threads(threads: Option<usize>) -> bool {
    COMPUTE_THREADS.store(threads.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    POOL.get().is_none()
}

static POOL: std::sync::OnceLock<Arc<rayon::ThreadPool>> = std::sync::OnceLock::new();

/// The one pool every engine of this process computes in: products, attention and the
/// bench's bandwidth and FMA probes share it, so compute never has more threads than
/// [`set_compute_threads`] gave it, whatever the number of engines. The batching loop
/// waits on it and the async runtime only moves bytes, so neither competes for long.
pub fn compute_pool() -> Arc<rayon::ThreadPool> {
    POOL.get_or_init(|| {
        let threads = COMPUTE_THREADS.load(std::sync::atomic::Ordering::Relaxed);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("compute-{i}"))
            .build()
            .map(Arc::new)
            .expect("a compute thread pool")
    })
    .clone()
}

/// The tensors of each piece, by checkpoint name.
struct PieceNames {
    /// Embedding, final norm and head (the embedding and head pieces).
    outer: Vec<String>,
    /// Each decoder layer's.
    layers: Vec<Vec<String>>,
    head_slice: Vec<String>,
}

impl PieceNames {
    fn new(c: &ModelConfig) -> Self {
        let mut outer = Vec::new();
        let mut layers = vec![Vec::new(); c.num_layers];
        for s in tensor_specs(c) {
            match s.layer {
                Some(l) => layers[l].push(s.name),
                None => outer.push(s.name),
            }
        }
        Self { outer, layers, head_slice: vec![HEAD_SLICE.to_string()] }
    }

    fn of(&self, piece: Piece) -> &[String] {
        match piece {
            Piece::Embedding | Piece::Head => &self.outer,
            Piece::Layer(l) => &self.layers[l],
            Piece::HeadSlice(_) => &self.head_slice,
        }
    }
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, config: ModelConfig, weights: HostWeights) -> Self {
        Self::with_shared_weights(backend, config, Arc::new(weights))
    }

    /// [`Self::new`] with weights already behind an `Arc`.
    pub fn with_shared_weights(backend: B, config: ModelConfig, weights: Arc<HostWeights>) -> Self {
        let pool = compute_pool();
        Self {
            backend,
            names: PieceNames::new(&config),
            model: Model::new(config),
            weights,
            pool,
            shard: None,
        }
    }

    /// Member `shard` of a tensor-parallel group for the model `config`, with
    /// that member's weights ([`TensorShard::weights`] or [`TensorShard::load`]).
    /// It steps with [`Self::step_in_group`]; its [`config`](Self::config) is
    /// the shard's (its heads, its MLP rows), its KV cache holds its heads only.
    pub fn tensor_member(backend: B, config: &ModelConfig, shard: TensorShard, weights: HostWeights) -> Self {
        let mut e = Self::new(backend, shard.config(config), weights);
        e.shard = Some(shard);
        e
    }

    /// Makes this engine compute `shard` of the model `config` from `weights`
    /// (the shard's), or with `None` the whole model from the step's
    /// [`WeightSource`]; the backend, and its device, stay. Sequences started
    /// before do not fit the new shapes: the caller ends them first.
    pub fn reshard(&mut self, config: &ModelConfig, shard: Option<(TensorShard, Arc<HostWeights>)>) {
        let (c, weights, shard) = match shard {
            Some((s, w)) => (s.config(config), w, Some(s)),
            None => (config.clone(), Arc::new(HostWeights::default()), None),
        };
        self.names = PieceNames::new(&c);
        self.model = Model::new(c);
        self.weights = weights;
        self.shard = shard;
    }

    /// The tensor-parallel shard this engine computes, if it computes one.
    pub fn shard(&self) -> Option<&TensorShard> {
        self.shard.as_ref()
    }

    /// Computes in `pool` instead of the process's compute pool (members of an
    /// in-process group, which wait on each other, each need their own threads).
    pub fn with_compute_pool(mut self, pool: Arc<rayon::ThreadPool>) -> Self {
        self.pool = pool;
        self
    }

    /// An engine that holds no weights: every step names its [`WeightSource`].
    pub fn without_weights(backend: B, config: ModelConfig) -> Self {
        Self::new(backend, config, HostWeights::default())
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes one token takes in a sequence's KV cache, over every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let c = self.config();
        (c.num_layers * 2 * c.kv_dim() * self.backend.kv_element_bytes()) as u64
    }

    pub fn weights(&self) -> &HostWeights {
        &self.weights
    }

    /// Validates `prompt` and starts a sequence.
    pub fn new_sequence(&self, prompt: Vec<u32>, params: GenerationParams) -> Result<Sequence<B>> {
        let c = self.config();
        validate_prompt(c, &prompt)?;
        params.sampling.validate().map_err(EngineError::InvalidRequest)?;
        let cache = self.backend.new_kv_cache(
            c.num_layers,
            c.kv_dim(),
            kv_tokens(c, prompt.len(), params.max_new_tokens),
        );
        Ok(Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            cache,
            sampler: Sampler::new(params.sampling.clone()),
            finished: if params.max_new_tokens == 0 { Some(FinishReason::Length) } else { None },
            params,
            failed: false,
            score: None,
            scores: Vec::new(),
        })
    }

    /// One forward over the tokens each sequence has not cached yet, from the
    /// engine's own weights; returns each sequence's next-token logits.
    pub fn forward(&self, seqs: &mut [&mut Sequence<B>]) -> Result<Vec<Vec<f32>>> {
        self.forward_from(seqs, &self.weights)
    }

    fn stage(&self, host: &Arc<HostWeights>, piece: Piece) -> Result<B::Staged> {
        self.backend.stage(host, piece, self.names.of(piece))
    }

    /// [`Self::forward`] with weights from `src`, piece by piece: the embedding,
    /// each layer in order (staged up to [`Backend::prefetch_depth`] layers ahead
    /// of the one computing), the head (`[seqs][vocab]` logits).
    ///
    /// Refuses a sequence whose earlier forward failed; when this one fails, every
    /// sequence in it is refused from then on (its cache may hold part of the step).
    pub fn forward_from(
        &self,
        seqs: &mut [&mut Sequence<B>],
        src: &dyn WeightSource,
    ) -> Result<Vec<Vec<f32>>> {
        if self.shard.is_some() {
            return Err(EngineError::InvalidRequest(
                "a tensor-parallel member steps with its group (step_in_group)".into(),
            ));
        }
        self.forward_checked(seqs, src, None).map(|l| l.unwrap_or_default())
    }

    /// [`Self::forward_pieces`] over sequences whose earlier steps succeeded;
    /// when it fails, every sequence in it is refused from then on.
    fn forward_checked(
        &self,
        seqs: &mut [&mut Sequence<B>],
        src: &dyn WeightSource,
        group: Option<&dyn Collective>,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        if seqs.iter().any(|s| s.failed) {
            return Err(EngineError::InvalidRequest(
                "a step on this sequence failed before (its cache may hold part of that step)".into(),
            ));
        }
        let logits = self.forward_pieces(seqs, src, group);
        if logits.is_err() {
            seqs.iter_mut().for_each(|s| s.failed = true);
        }
        logits
    }

    /// The forward of [`Self::forward_from`], over sequences that have not failed.
    /// In a tensor-parallel group (`group` and [`Self::shard`]): the embedding's
    /// rows, each layer's two partial outputs summed across the group, and the
    /// logits' vocabulary slices assembled on rank 0 (`None` on the others).
    fn forward_pieces(
        &self,
        seqs: &mut [&mut Sequence<B>],
        src: &dyn WeightSource,
        group: Option<&dyn Collective>,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let tensor = match (group, &self.shard) {
            (Some(g), Some(shard)) => Some((g, shard)),
            (None, None) => None,
            _ => {
                return Err(EngineError::InvalidRequest(
                    "a tensor-parallel step needs its shard and group".into(),
                ))
            }
        };
        let (b, c) = (&self.backend, self.model.config());
        let mut ids = Vec::new();
        let mut parts = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            let past = b.kv_len(&s.cache);
            ids.extend_from_slice(&s.tokens[past..]);
            parts.push((s.tokens.len() - past, past));
        }
        let layout = BatchLayout::new(parts);
        let caches: Vec<&mut B::KvCache> = seqs.iter_mut().map(|s| &mut s.cache).collect();
        let mut step = self.model.step::<B>(&layout, caches, group);
        let mut x = {
            let (w, mut local_ids) = src.embedding(&ids)?;
            let vocab = tensor.map(|(_, shard)| shard.vocab.clone());
            if let Some(v) = &vocab {
                // This member's rows of the table; an id it does not hold reads
                // row 0 and is zeroed before the sum below.
                for id in &mut local_ids {
                    *id = if v.contains(&(*id as usize)) { *id - v.start as u32 } else { 0 };
                }
            }
            let staged = self.stage(&w, Piece::Embedding)?;
            let outer = OuterWeights::from_lookup(c, |n| b.weight(&staged, n))?;
            let mut x = self.model.embed(b, &outer, &local_ids, &layout)?; // [rows, hidden]
            if let (Some((g, _)), Some(v)) = (tensor, vocab) {
                let hidden = c.hidden_size;
                b.on_host(&mut x, &mut |h| {
                    for (row, id) in h.chunks_exact_mut(hidden).zip(&ids) {
                        if !v.contains(&(*id as usize)) {
                            row.fill(0.0);
                        }
                    }
                    g.all_reduce_sum(h)
                })?;
            }
            x
        };
        let depth = b.prefetch_depth();
        let mut ahead: VecDeque<B::Staged> = VecDeque::with_capacity(depth + 1);
        let mut next = 0; // the next layer to stage
        for l in 0..c.num_layers {
            if ahead.is_empty() {
                ahead.push_back(self.stage(&src.layer(l)?, Piece::Layer(l))?);
                next = l + 1;
            }
            let staged = ahead.pop_front().expect("layer l is staged");
            let lw = LayerWeights::from_lookup(c, l, |n| b.weight(&staged, n))?;
            x = self.model.layer(b, l, &lw, x, &mut step)?;
            // Layer l's compute is enqueued: copy the next ones meanwhile.
            while next < c.num_layers && next <= l + depth {
                ahead.push_back(self.stage(&src.layer(next)?, Piece::Layer(next))?);
                next += 1;
            }
        }
        let w = src.head()?;
        let staged = self.stage(&w, Piece::Head)?;
        let outer = OuterWeights::from_lookup(c, |n| b.weight(&staged, n))?;
        // The head's rows: every sequence's last; a scored one's from its `from` on.
        let mut rows = Vec::new(); // rows of `x`
        let mut owners = Vec::new(); // (sequence, position) of each
        for (i, (slot, s)) in layout.seqs.iter().zip(seqs.iter()).enumerate() {
            let last = slot.past + slot.len - 1;
            let first = match &s.score {
                Some(r) if r.from >= slot.past => r.from.min(last),
                _ => last,
            };
            for pos in first..=last {
                rows.push(slot.start + pos - slot.past);
                owners.push((i, pos));
            }
        }
        let mut logits = vec![Vec::new(); seqs.len()];
        let mut assembled = true;
        for (chunk, who) in rows.chunks(HEAD_ROWS).zip(owners.chunks(HEAD_ROWS)) {
            let normed = self.model.head_norm(b, &outer, &x, chunk)?; // [chunk, hidden]
            let Some(part) = self.head(&normed, &outer, src, tensor, chunk.len())? else {
                assembled = false; // a member of a group: rank 0 has the logits
                continue;
            };
            for (row, &(i, pos)) in part.chunks_exact(c.vocab_size).zip(who) {
                let s = &mut *seqs[i];
                let next = s.tokens.get(pos + 1).copied();
                // A sequence that rates what it samples scores its last row
                // once the step has sampled (see `choose_scored`).
                if let Some(req) = s.score.as_ref().filter(|r| next.is_some() || !r.sampled) {
                    let scored = sampling::score(row, &s.tokens[..=pos], next, &s.params.sampling, req);
                    s.scores.push(scored);
                }
                if pos + 1 == s.tokens.len() {
                    logits[i] = row.to_vec();
                }
            }
        }
        // The first forward's scores are made; only what is sampled is rated later.
        seqs.iter_mut().filter(|s| !s.score.as_ref().is_some_and(|r| r.sampled)).for_each(|s| s.score = None);
        Ok(assembled.then_some(logits))
    }

    /// The logits `[rows, vocab]` of `normed`'s rows (`[rows, hidden]`): from
    /// the whole head, its vocabulary slices one at a time, or in a
    /// tensor-parallel group this member's vocabulary rows assembled on rank 0
    /// (`None` on the others).
    fn head(
        &self,
        normed: &B::Tensor,
        outer: &OuterWeights<'_, B::Weight>,
        src: &dyn WeightSource,
        tensor: Option<(&dyn Collective, &TensorShard)>,
        rows_n: usize,
    ) -> Result<Option<Vec<f32>>> {
        let (b, c) = (&self.backend, self.model.config());
        if let Some((g, shard)) = tensor {
            // This member's vocabulary rows → `[rows, part]`, assembled on rank 0.
            let part = b.to_host(&b.linear(normed, outer.lm_head(), None, shard.vocab.len())?)?;
            let Some(parts) = g.gather(part)? else { return Ok(None) };
            let mut logits = vec![0f32; rows_n * c.vocab_size];
            for (r, (part, cols)) in parts.iter().zip(TensorShard::vocab_parts(c, g.degree())).enumerate() {
                if part.len() != rows_n * cols.len() {
                    return Err(EngineError::InvalidRequest(format!(
                        "member {r} sent {} logits for {rows_n} rows × {} vocabulary rows",
                        part.len(),
                        cols.len()
                    )));
                }
                for (row, chunk) in logits.chunks_exact_mut(c.vocab_size).zip(part.chunks_exact(cols.len())) {
                    row[cols.clone()].copy_from_slice(chunk);
                }
            }
            return Ok(Some(logits));
        }
        Ok(Some(match src.head_slices() {
            0 => b.to_host(&b.linear(normed, outer.lm_head(), None, c.vocab_size)?)?, // [rows, vocab]
            n => {
                // The head in vocabulary slices: each `[rows, part]` lands in its columns.
                let mut logits = vec![0f32; rows_n * c.vocab_size];
                for i in 0..n {
                    let (w, cols) = src.head_slice(i)?;
                    let staged = self.stage(&w, Piece::HeadSlice(i))?;
                    let slice = b
                        .weight(&staged, HEAD_SLICE)?
                        .ok_or_else(|| EngineError::MissingWeight(HEAD_SLICE.into()))?;
                    let part = b.to_host(&b.linear(normed, slice, None, cols.len())?)?; // [rows, part]
                    for (row, chunk) in
                        logits.chunks_exact_mut(c.vocab_size).zip(part.chunks_exact(cols.len()))
                    {
                        row[cols.clone()].copy_from_slice(chunk);
                    }
                }
                logits
            }
        }))
    }

    /// Forward, then sample one token per sequence and apply the stop rules.
    /// With `keep_logits`, also returns each sequence's raw logits.
    pub fn step_with_logits(
        &self,
        seqs: &mut [&mut Sequence<B>],
        keep_logits: bool,
    ) -> Result<(Vec<StepToken>, Vec<Vec<f32>>)> {
        self.step_from(seqs, &self.weights, keep_logits)
    }

    /// [`Self::step_with_logits`] with weights from `src`.
    pub fn step_from(
        &self,
        seqs: &mut [&mut Sequence<B>],
        src: &dyn WeightSource,
        keep_logits: bool,
    ) -> Result<(Vec<StepToken>, Vec<Vec<f32>>)> {
        refuse_finished(seqs)?;
        let logits = self.pool.install(|| self.forward_from(seqs, src))?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut kept = Vec::new();
        for (s, mut l) in seqs.iter_mut().zip(logits) {
            if keep_logits {
                kept.push(l.clone());
            }
            let (token, fault) = choose_scored(s, &mut l);
            out.push(self.accept(s, token, fault));
        }
        Ok((out, kept))
    }

    /// Appends `token` to `s` and applies the stop rules; with a `fault` (see
    /// [`choose`]) the sequence refuses later steps.
    fn accept(&self, s: &mut Sequence<B>, token: u32, fault: Option<String>) -> StepToken {
        let c = self.config();
        s.tokens.push(token);
        let scores = std::mem::take(&mut s.scores);
        let finished = if !s.params.ignore_eos && c.eos_token_ids.contains(&token) {
            Some(FinishReason::Eos)
        } else if s.generated().len() >= s.params.max_new_tokens || s.tokens.len() > c.max_position_embeddings
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        s.finished = finished;
        s.failed |= fault.is_some();
        StepToken { token, finished, scores, fault }
    }

    /// One step of a tensor-parallel member: every member of `group` calls it
    /// with the same sequences (the same prompts and tokens, its own caches) in
    /// the same order. Rank 0 samples from the assembled logits and every
    /// member appends the tokens it chose; with `keep_logits` rank 0 also
    /// returns each sequence's logits (the others return none).
    pub fn step_in_group(
        &self,
        seqs: &mut [&mut Sequence<B>],
        group: &dyn Collective,
        keep_logits: bool,
    ) -> Result<(Vec<StepToken>, Vec<Vec<f32>>)> {
        refuse_finished(seqs)?;
        let logits = self.pool.install(|| self.forward_checked(seqs, &self.weights, Some(group)))?;
        let mut kept = Vec::new();
        let mut tokens = Vec::with_capacity(seqs.len());
        let mut faults = vec![None; seqs.len()];
        if let Some(logits) = logits {
            for ((s, mut l), fault) in seqs.iter_mut().zip(logits).zip(&mut faults) {
                if keep_logits {
                    kept.push(l.clone());
                }
                let (token, why) = choose_scored(s, &mut l);
                tokens.push(token);
                *fault = why;
            }
        }
        group.broadcast_tokens(&mut tokens)?;
        if tokens.len() != seqs.len() {
            return Err(EngineError::InvalidRequest(format!(
                "rank 0 chose {} tokens for a step of {} sequences",
                tokens.len(),
                seqs.len()
            )));
        }
        let out =
            seqs.iter_mut().zip(tokens).zip(faults).map(|((s, t), fault)| self.accept(s, t, fault)).collect();
        Ok((out, kept))
    }

    pub fn step(&self, seqs: &mut [&mut Sequence<B>]) -> Result<Vec<StepToken>> {
        Ok(self.step_with_logits(seqs, false)?.0)
    }
}

/// The token `s` samples from its raw `logits`, or (token 0 and) why it
/// cannot: logits that are not all finite are never sampled.
fn choose<B: Backend>(s: &mut Sequence<B>, logits: &mut [f32]) -> (u32, Option<String>) {
    match non_finite(logits, s.generated().len()) {
        Some(why) => (0, Some(why)),
        None => (s.sampler.sample(logits, &s.tokens), None),
    }
}

/// [`choose`], and for a sequence that rates what it samples
/// ([`ScoreRequest::sampled`]) the score of the token chosen, from the raw
/// logits (before the sampler's penalty and temperature).
fn choose_scored<B: Backend>(s: &mut Sequence<B>, logits: &mut [f32]) -> (u32, Option<String>) {
    let Some(req) = s.score.clone().filter(|r| r.sampled) else {
        return choose(s, logits);
    };
    let raw = logits.to_vec();
    let (token, fault) = choose(s, logits);
    if fault.is_none() {
        s.scores.push(sampling::score(&raw, &s.tokens, Some(token), &s.params.sampling, &req));
    }
    (token, fault)
}

/// Why `logits` (of the step producing generated token `n`) cannot be
/// sampled: the count of NaN and infinite values, if any.
fn non_finite(logits: &[f32], n: usize) -> Option<String> {
    let (nan, inf) = logits
        .iter()
        .fold((0, 0), |(nan, inf), l| (nan + usize::from(l.is_nan()), inf + usize::from(l.is_infinite())));
    (nan + inf > 0).then(|| {
        format!(
            "the model's logits for generated token {n} are not finite ({nan} NaN, {inf} infinite of {}): \
             nothing can be sampled from them (a model or config whose numbers overflow)",
            logits.len()
        )
    })
}

/// A step over a finished sequence is the caller's mistake.
fn refuse_finished<B: Backend>(seqs: &[&mut Sequence<B>]) -> Result<()> {
    match seqs.iter().find(|s| s.finished.is_some()) {
        Some(s) => {
            Err(EngineError::InvalidRequest(format!("step on a finished sequence ({:?})", s.finished)))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod fault_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use zeroshard_offload::Architecture;

    fn config(architecture: Architecture, num_heads: usize) -> ModelConfig {
        let hidden = 4 * num_heads;
        ModelConfig {
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            ..ModelConfig::synthetic(architecture, hidden, 2, num_heads, num_heads, 4 * hidden, 50)
        }
    }

    fn engine(c: ModelConfig) -> Engine<CpuBackend> {
        let weights = HostWeights::random(&c, 7);
        Engine::new(CpuBackend::new(), c, weights)
    }

    fn params(max_new_tokens: usize) -> GenerationParams {
        GenerationParams { sampling: Default::default(), max_new_tokens, ignore_eos: true }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs()))
    }

    /// Prefill in one pass, or token by token through the cache, or batched with
    /// another sequence: the same logits (positions and ALiBi biases are absolute).
    fn cache_and_batch_agree(c: ModelConfig) {
        let e = engine(c);
        let prompt = vec![3, 14, 15, 9, 26, 5];
        let mut whole = e.new_sequence(prompt.clone(), params(4)).expect("seq");
        let full = e.forward(&mut [&mut whole]).expect("forward").remove(0);

        let mut stepwise = e.new_sequence(prompt[..1].to_vec(), params(4)).expect("seq");
        let mut last = Vec::new();
        for i in 1..=prompt.len() {
            last = e.forward(&mut [&mut stepwise]).expect("forward").remove(0);
            if i < prompt.len() {
                stepwise.tokens.push(prompt[i]);
            }
        }
        assert!(close(&full, &last), "{full:?}\n{last:?}");

        let mut other = e.new_sequence(vec![1, 2], params(4)).expect("seq");
        let mut again = e.new_sequence(prompt, params(4)).expect("seq");
        let batched = e.forward(&mut [&mut other, &mut again]).expect("forward");
        assert!(close(&full, &batched[1]));
    }

    /// A scored prefill over prompt + generated rates each generated token as
    /// its decode step saw it; batched with another sequence, neither changes.
    fn a_scored_prefill_rates_each_token_as_its_decode_step_did(c: ModelConfig) {
        let e = engine(c);
        let prompt = vec![3, 14, 15, 9];
        let mut decode = e.new_sequence(prompt.clone(), params(6)).expect("seq");
        let mut seen = Vec::new();
        while decode.finished().is_none() {
            let (_, mut logits) = e.step_with_logits(&mut [&mut decode], true).expect("step");
            seen.push(logits.remove(0));
        }
        let generated = decode.generated().to_vec();
        let req = ScoreRequest { from: prompt.len() - 1, top: 3, tolerance: 0.01, sampled: false };
        let whole: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        let mut scored = e.new_sequence(whole.clone(), params(1)).expect("seq").scoring(req.clone());
        let mut other = e.new_sequence(vec![7, 8], params(1)).expect("seq");
        let alone = e.forward(&mut [&mut e.new_sequence(vec![7, 8], params(1)).expect("seq")]).expect("fwd");
        let steps = e.step_with_logits(&mut [&mut other, &mut scored], true).expect("step");
        assert!(close(&steps.1[0], &alone[0]), "a scored neighbour changed another sequence's logits");
        assert!(steps.0[0].scores.is_empty());
        let scores = &steps.0[1].scores;
        assert_eq!(scores.len(), generated.len() + 1, "{scores:?}");
        for (j, (sc, logits)) in scores.iter().zip(&seen).enumerate() {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
            assert_eq!(sc.token, Some(generated[j]));
            assert!(sc.kept, "token {j} was the decode's greedy choice: {sc:?}");
            assert!((sc.logprob - (logits[generated[j] as usize] - lse)).abs() < 1e-3, "{sc:?}");
            assert_eq!(sc.top.len(), 3);
            assert_eq!(sc.top[0].0, generated[j]);
        }
        assert_eq!(scores[generated.len()].token, None);
        assert!(!scores[generated.len()].kept);
        // Rated as it samples: the prompt's positions with the first step, then
        // one score per step, each with its sampled token, as the prefill rated them.
        let live = ScoreRequest { from: 0, sampled: true, ..req.clone() };
        let mut seq = e.new_sequence(prompt.clone(), params(6)).expect("seq").scoring(live);
        let mut rated = Vec::new();
        while seq.finished().is_none() {
            let step = e.step(&mut [&mut seq]).expect("step").remove(0);
            assert_eq!(step.scores.last().and_then(|s| s.token), Some(step.token), "{:?}", step.scores);
            rated.extend(step.scores);
        }
        assert_eq!(seq.generated(), &generated[..]);
        assert_eq!(rated.len(), prompt.len() - 1 + generated.len(), "{rated:?}");
        for (j, (live, pre)) in rated[prompt.len() - 1..].iter().zip(scores).enumerate() {
            assert_eq!((live.token, live.kept), (Some(generated[j]), true), "{live:?}");
            assert!((live.logprob - pre.logprob).abs() < 1e-3, "{live:?} {pre:?}");
            assert_eq!(
                live.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                pre.top.iter().map(|t| t.0).collect::<Vec<_>>()
            );
        }
        // The least likely token in place of the third: rated out of the greedy set.
        let worst = seen[2].iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).expect("logits").0 as u32;
        let mut altered = whole;
        altered[prompt.len() + 2] = worst;
        let mut scored = e.new_sequence(altered, params(1)).expect("seq").scoring(req);
        let scores = e.step(&mut [&mut scored]).expect("step").remove(0).scores;
        assert!(scores[..2].iter().all(|s| s.kept));
        assert!(!scores[2].kept, "{:?}", scores[2]);
    }

    /// A config the parser would refuse (`rope_theta` 1e-300: every rotary
    /// frequency overflows) makes every logit NaN: the step samples nothing
    /// for the sequence, says why, and refuses it from then on.
    #[test]
    fn non_finite_logits_fail_the_sequence_and_are_never_sampled() {
        let mut c = config(Architecture::Llama, 4);
        c.rope.theta = 1e-300;
        let weights = HostWeights::random(&c, 7);
        let e = Engine::new(CpuBackend::new(), c, weights);
        let mut s = e.new_sequence(vec![3, 14, 15], params(4)).expect("seq");
        let t = e.step(&mut [&mut s]).expect("the step itself runs").remove(0);
        let why = t.fault.expect("non-finite logits are a fault");
        assert!(why.contains("not finite") && why.contains("generated token 0"), "{why}");
        assert!(e.step(&mut [&mut s]).is_err(), "a faulted sequence is refused");
        assert_eq!(non_finite(&[0.0, 1.0], 3), None);
        assert!(non_finite(&[0.0, f32::NEG_INFINITY, f32::NAN], 3)
            .is_some_and(|w| w.contains("1 NaN, 1 infinite of 3")));
    }

    #[test]
    fn llama_scored_prefills_agree_with_decode() {
        a_scored_prefill_rates_each_token_as_its_decode_step_did(ModelConfig {
            tie_word_embeddings: false,
            ..config(Architecture::Llama, 4)
        });
    }

    #[test]
    fn bloom_scored_prefills_agree_with_decode() {
        a_scored_prefill_rates_each_token_as_its_decode_step_did(config(Architecture::Bloom, 4));
    }

    #[test]
    fn gpt2_cache_and_batch_agree() {
        cache_and_batch_agree(config(Architecture::Gpt2, 4));
    }

    #[test]
    fn bloom_cache_and_batch_agree() {
        // 6 heads: ALiBi slopes beyond the power of two.
        cache_and_batch_agree(config(Architecture::Bloom, 6));
    }

    #[test]
    fn gpt2_stops_at_its_last_learned_position_and_refuses_past_it() {
        let e = engine(config(Architecture::Gpt2, 4)); // 16 positions
        let Err(too_long) = e.new_sequence(vec![1; 17], params(4)) else { panic!("17 tokens accepted") };
        let too_long = too_long.to_string();
        assert!(too_long.contains("17 tokens, more than the model's n_positions 16"), "{too_long}");
        let mut s = e.new_sequence(vec![1; 14], params(10)).expect("seq");
        while s.finished().is_none() {
            e.step(&mut [&mut s]).expect("step");
        }
        // Positions 14 and 15 computed: the tokens they produced end the sequence.
        assert_eq!((s.generated().len(), s.finished()), (3, Some(FinishReason::Length)));
        // Forcing one more position is refused, not read past the table.
        s.finished = None;
        let err = e.forward(&mut [&mut s]).expect_err("position 16 refused").to_string();
        assert!(err.contains("position 16 is past the model's 16 learned positions"), "{err}");
    }

    /// A source that hands out the whole model but the LM head in slices of
    /// `rows` vocabulary rows (the last one shorter), as the cluster does.
    struct Sliced {
        whole: Arc<HostWeights>,
        head_name: String,
        vocab: usize,
        hidden: usize,
        rows: usize,
    }

    impl WeightSource for Sliced {
        fn embedding(&self, ids: &[u32]) -> Result<(Arc<HostWeights>, Vec<u32>)> {
            self.whole.embedding(ids)
        }
        fn layer(&self, l: usize) -> Result<Arc<HostWeights>> {
            WeightSource::layer(&self.whole, l)
        }
        fn head(&self) -> Result<Arc<HostWeights>> {
            self.whole.head()
        }
        fn head_slices(&self) -> usize {
            self.vocab.div_ceil(self.rows)
        }
        fn head_slice(&self, i: usize) -> Result<(Arc<HostWeights>, std::ops::Range<usize>)> {
            let rows = i * self.rows..((i + 1) * self.rows).min(self.vocab);
            let table = self.whole.get(&self.head_name).expect("head");
            let mut w = HostWeights::default();
            let spec = crate::model::tensor_specs(&config(Architecture::Llama, 2))
                .into_iter()
                .next()
                .map(|mut s| {
                    s.name = HEAD_SLICE.into();
                    s.shape = vec![rows.len(), self.hidden];
                    s
                })
                .expect("a spec");
            w.insert(&spec, table[rows.start * self.hidden..rows.end * self.hidden].to_vec());
            Ok((Arc::new(w), rows))
        }
    }

    #[test]
    fn a_head_applied_in_vocabulary_slices_gives_the_same_logits() {
        let c = config(Architecture::Llama, 2);
        let (vocab, hidden) = (c.vocab_size, c.hidden_size);
        let e = engine(c);
        let head_name = "model.embed_tokens.weight".to_string(); // tied
        for rows in [1, 7, 16, 50, 64] {
            let src = Sliced { whole: e.weights.clone(), head_name: head_name.clone(), vocab, hidden, rows };
            let mut a = e.new_sequence(vec![3, 1, 4, 1, 5], params(2)).expect("seq");
            let mut b = e.new_sequence(vec![3, 1, 4, 1, 5], params(2)).expect("seq");
            let mut c2 = e.new_sequence(vec![9, 2], params(2)).expect("seq");
            let whole = e.forward(&mut [&mut a]).expect("whole");
            let sliced = e.forward_from(&mut [&mut b, &mut c2], &src).expect("sliced");
            assert_eq!(whole[0], sliced[0], "{rows} rows per slice");
            assert_eq!(sliced[1].len(), vocab);
        }
    }
}
