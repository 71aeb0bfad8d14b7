//! Sequences and the batched step: one forward over the new tokens of every
//! active sequence (prompts and single decode tokens mixed), then sampling.
//!
//! ```ignore
//! let engine = Engine::new(CpuBackend, config, weights);
//! let mut seq = engine.new_sequence(prompt_ids, params)?;
//! while seq.finished().is_none() {
//!     engine.step(&mut [&mut seq])?;
//! }
//! ```
use half::f16;
use zeroshard_offload::ModelConfig;

use crate::backend::{Backend, BatchLayout};
use crate::error::{Result, WorkerError};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::weights::HostWeights;

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached, or the model's last position.
    Length,
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string matched (decided by the caller, which sees the text).
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::Stop => "stop",
        }
    }
}

/// Per-request generation settings.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
}

/// One sequence: its tokens, cache, sampler and state.
pub struct Sequence<B: Backend> {
    tokens: Vec<u32>, // prompt + generated
    prompt_len: usize,
    cache: B::KvCache,
    sampler: Sampler,
    params: GenerationParams,
    finished: Option<FinishReason>,
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

    /// Marks the sequence finished (e.g. a stop string matched).
    pub fn finish(&mut self, reason: FinishReason) {
        self.finished.get_or_insert(reason);
    }
}

/// What a step produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct StepToken {
    pub token: u32,
    /// Set when this token ended the sequence.
    pub finished: Option<FinishReason>,
}

/// A model, its weights in host memory and a backend to run them.
pub struct Engine<B: Backend> {
    backend: B,
    model: Model,
    weights: HostWeights,
}

impl<B: Backend<Weight = [f16]>> Engine<B> {
    pub fn new(backend: B, config: ModelConfig, weights: HostWeights) -> Self {
        Self {
            backend,
            model: Model::new(config),
            weights,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn weights(&self) -> &HostWeights {
        &self.weights
    }

    /// Validates `prompt` and starts a sequence.
    pub fn new_sequence(&self, prompt: Vec<u32>, params: GenerationParams) -> Result<Sequence<B>> {
        let c = self.config();
        if prompt.is_empty() {
            return Err(WorkerError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some((i, id)) = prompt.iter().enumerate().find(|(_, id)| **id as usize >= c.vocab_size) {
            return Err(WorkerError::InvalidRequest(format!(
                "prompt token {id} at index {i} is outside the vocabulary (vocab_size {})",
                c.vocab_size
            )));
        }
        if prompt.len() > c.max_position_embeddings {
            return Err(WorkerError::InvalidRequest(format!(
                "the prompt has {} tokens, more than the model's max_position_embeddings {}",
                prompt.len(),
                c.max_position_embeddings
            )));
        }
        params
            .sampling
            .validate()
            .map_err(WorkerError::InvalidRequest)?;
        Ok(Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            cache: self.backend.new_kv_cache(c.num_layers, c.kv_dim()),
            sampler: Sampler::new(params.sampling.clone()),
            finished: if params.max_new_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            params,
        })
    }

    /// One forward over the tokens each sequence has not cached yet; returns the
    /// next-token logits of each sequence, `[seqs][vocab]`.
    pub fn forward(&self, seqs: &mut [&mut Sequence<B>]) -> Result<Vec<Vec<f32>>> {
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
        let mut step = self.model.step::<B>(&layout, caches);
        let outer = self.weights.outer(c)?;
        let mut x = self.model.embed(b, &outer, &ids); // [rows, hidden]
        for l in 0..c.num_layers {
            let lw = self.weights.layer(c, l)?;
            x = self.model.layer(b, l, &lw, x, &mut step);
        }
        let logits = b.to_host(&self.model.head(b, &outer, &x, &layout.last_rows())); // [seqs, vocab]
        Ok(logits.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// Forward, then sample one token per sequence and apply the stop rules.
    /// With `keep_logits`, also returns each sequence's raw logits.
    pub fn step_with_logits(
        &self,
        seqs: &mut [&mut Sequence<B>],
        keep_logits: bool,
    ) -> Result<(Vec<StepToken>, Vec<Vec<f32>>)> {
        if let Some(s) = seqs.iter().find(|s| s.finished.is_some()) {
            return Err(WorkerError::InvalidRequest(format!(
                "step on a finished sequence ({:?})",
                s.finished
            )));
        }
        let logits = self.forward(seqs)?;
        let max_pos = self.config().max_position_embeddings;
        let eos = &self.config().eos_token_ids;
        let mut out = Vec::with_capacity(seqs.len());
        let mut kept = Vec::new();
        for (s, mut l) in seqs.iter_mut().zip(logits) {
            if keep_logits {
                kept.push(l.clone());
            }
            let token = s.sampler.sample(&mut l, &s.tokens);
            s.tokens.push(token);
            let finished = if !s.params.ignore_eos && eos.contains(&token) {
                Some(FinishReason::Eos)
            } else if s.generated().len() >= s.params.max_new_tokens || s.tokens.len() > max_pos {
                Some(FinishReason::Length)
            } else {
                None
            };
            s.finished = finished;
            out.push(StepToken { token, finished });
        }
        Ok((out, kept))
    }

    pub fn step(&self, seqs: &mut [&mut Sequence<B>]) -> Result<Vec<StepToken>> {
        Ok(self.step_with_logits(seqs, false)?.0)
    }
}
