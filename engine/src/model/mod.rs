//! Model definitions, written once against [`Backend`](crate::backend::Backend).
//!
//! One file per family: [`llama`] (Llama, Mistral, Qwen2), [`gpt2`], [`bloom`]; the
//! latter two share their block ([`fused`]).
//! A model never owns or locates its weights: every call borrows them
//! ([`LayerWeights`] for one decoder layer, [`OuterWeights`] for embeddings, final
//! norm and head, each an enum over the families), so the same code runs on
//! weights from local memory, gathered from peers, or kept resident in a cache.
//! [`tensor_specs`] lists every tensor as stored; [`TensorSpec::to_compute_layout`]
//! rearranges one (GPT-2's `[in, out]` Conv1D weights, BLOOM's per-head fused qkv)
//! once it is loaded or gathered whole.
//!
//! ```ignore
//! let model = Model::new(config);
//! let mut step = model.step(&layout, caches);
//! let mut x = model.embed(&backend, &outer, &ids, &layout)?;  // [rows, hidden]
//! for l in 0..model.config().num_layers {
//!     let lw = LayerWeights::from_lookup(model.config(), l, |n| Ok(store.get(n)))?;
//!     x = model.layer(&backend, l, &lw, x, &mut step)?;         // [rows, hidden]
//! }
//! let logits = model.head(&backend, &outer, &x, &layout.last_rows())?; // [seqs, vocab]
//! ```
//!
//! Every op can fail (a device error), so every forward returns [`Result`].
mod alibi;
mod bloom;
mod fused;
mod gpt2;
mod llama;
mod rope;

pub(crate) use alibi::alibi_slopes;
pub(crate) use bloom::BloomOuterWeights;
pub(crate) use fused::FusedBlockWeights;
pub(crate) use gpt2::Gpt2OuterWeights;
pub(crate) use llama::{LlamaLayerWeights, LlamaOuterWeights};
pub(crate) use rope::RopeTable;
pub(crate) use zeroshard_offload::spec::{tensor_specs, TensorSpec};

use zeroshard_offload::{Architecture, ModelConfig, PositionEncoding};

use crate::backend::{Backend, BatchLayout};
use crate::error::{EngineError, Result};
use crate::tensor::Collective;

/// Borrowed weights of one decoder layer, per family.
pub enum LayerWeights<'a, W: ?Sized> {
    Llama(LlamaLayerWeights<'a, W>),
    /// GPT-2 and BLOOM: the same block under different names.
    Fused(FusedBlockWeights<'a, W>),
}

/// Borrowed weights outside the decoder layers, per family.
pub enum OuterWeights<'a, W: ?Sized> {
    Llama(LlamaOuterWeights<'a, W>),
    Gpt2(Gpt2OuterWeights<'a, W>),
    Bloom(BloomOuterWeights<'a, W>),
}

/// Finds a tensor by checkpoint name (`Ok(None)`: there is none); a backend's
/// lookup can fail (see [`Backend::weight`]).
pub trait Lookup<'a, W: ?Sized + 'a>: Fn(&str) -> Result<Option<&'a W>> {}

impl<'a, W: ?Sized + 'a, F: Fn(&str) -> Result<Option<&'a W>>> Lookup<'a, W> for F {}

impl<'a, W: ?Sized> LayerWeights<'a, W> {
    /// Looks up layer `l`'s tensors by their checkpoint names (in compute layout).
    pub fn from_lookup(c: &ModelConfig, l: usize, get: impl Lookup<'a, W>) -> Result<Self> {
        Ok(match c.architecture {
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                Self::Llama(LlamaLayerWeights::from_lookup(c, l, get)?)
            }
            Architecture::Gpt2 => Self::Fused(FusedBlockWeights::from_lookup(&gpt2::block_names(l), get)?),
            Architecture::Bloom => Self::Fused(FusedBlockWeights::from_lookup(&bloom::block_names(l), get)?),
        })
    }
}

impl<'a, W: ?Sized> OuterWeights<'a, W> {
    /// The LM head `[vocab, hidden]` (the token embedding when tied).
    pub fn lm_head(&self) -> &'a W {
        match self {
            Self::Llama(w) => w.lm_head,
            Self::Gpt2(w) => w.lm_head,
            Self::Bloom(w) => w.lm_head,
        }
    }

    pub fn from_lookup(c: &ModelConfig, get: impl Lookup<'a, W>) -> Result<Self> {
        Ok(match c.architecture {
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                Self::Llama(LlamaOuterWeights::from_lookup(c, get)?)
            }
            Architecture::Gpt2 => Self::Gpt2(Gpt2OuterWeights::from_lookup(c, get)?),
            Architecture::Bloom => Self::Bloom(BloomOuterWeights::from_lookup(c, get)?),
        })
    }
}

/// A weight and its bias, `{prefix}.weight` and `{prefix}.bias`: a linear layer's
/// (`[out, in]` in compute layout, `[out]`), or a LayerNorm's scale and shift
/// (`[dim]` each: the same pair, applied elementwise after normalising).
pub struct LinearWeights<'a, W: ?Sized> {
    pub weight: &'a W,
    pub bias: &'a W,
}

impl<'a, W: ?Sized> LinearWeights<'a, W> {
    /// `{prefix}.weight` and `{prefix}.bias`.
    fn from_lookup(get: &impl Lookup<'a, W>, prefix: &str) -> Result<Self> {
        Ok(Self {
            weight: need(get, format!("{prefix}.weight"))?,
            bias: need(get, format!("{prefix}.bias"))?,
        })
    }

    /// As a linear layer: `[rows, in]` → `[rows, out]`.
    pub fn linear<B: Backend<Weight = W>>(&self, b: &B, x: &B::Tensor, out: usize) -> Result<B::Tensor> {
        b.linear(x, self.weight, Some(self.bias), out)
    }

    /// As a LayerNorm: `[rows, dim]` → `[rows, dim]`.
    pub fn layer_norm<B: Backend<Weight = W>>(&self, b: &B, x: &B::Tensor, eps: f32) -> Result<B::Tensor> {
        b.layer_norm(x, self.weight, self.bias, eps)
    }
}

fn need<'a, W: ?Sized>(get: &impl Lookup<'a, W>, name: String) -> Result<&'a W> {
    get(&name)?.ok_or(EngineError::MissingWeight(name))
}

/// A fused projection `[rows, q_dim + 2 * kv_dim]` → q `[rows, q_dim]`, k and v
/// `[rows, kv_dim]`.
fn split_qkv<B: Backend>(
    b: &B,
    qkv: &B::Tensor,
    q_dim: usize,
    kv_dim: usize,
) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
    let mut parts = b.split_cols(qkv, &[q_dim, kv_dim, kv_dim])?.into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(q), Some(k), Some(v)) => Ok((q, k, v)),
        _ => panic!("split_cols returns one tensor per width"),
    }
}

/// How the model places tokens, with what it precomputes for that.
#[derive(Clone, Debug)]
enum Positions {
    Rope(RopeTable),
    /// Learned table, read from the weights.
    Learned,
    /// One ALiBi slope per head.
    Alibi(Vec<f32>),
}

/// A model: its validated config and what its position encoding precomputes.
#[derive(Clone, Debug)]
pub(crate) struct Model {
    config: ModelConfig,
    positions: Positions,
}

/// Per-step state the layers share: layout, angle tables, the batch's caches.
pub(crate) struct Step<'a, B: Backend> {
    pub layout: &'a BatchLayout,
    pub caches: Vec<&'a mut B::KvCache>,
    /// `[rows, head_dim / 2]` cosines and sines of each row's position (RoPE
    /// families; empty otherwise).
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// The tensor-parallel group this member computes with (`None`: the whole
    /// model in this process).
    pub group: Option<&'a dyn Collective>,
}

impl<B: Backend> Step<'_, B> {
    /// A layer's partial output summed across the tensor-parallel group (after
    /// attention's o_proj and the MLP's down_proj); nothing without a group.
    pub(crate) fn all_reduce(&self, b: &B, x: &mut B::Tensor) -> Result<()> {
        match self.group {
            Some(g) => b.on_host(x, &mut |h| g.all_reduce_sum(h)),
            None => Ok(()),
        }
    }
}

impl Model {
    pub(crate) fn new(config: ModelConfig) -> Self {
        let positions = match config.architecture.position_encoding() {
            PositionEncoding::Rope => Positions::Rope(RopeTable::new(&config)),
            PositionEncoding::Learned => Positions::Learned,
            PositionEncoding::Alibi => Positions::Alibi(alibi_slopes(config.num_heads)),
        };
        Self { config, positions }
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Prepares the shared per-step state (angle tables for each row's position).
    pub(crate) fn step<'a, B: Backend>(
        &self,
        layout: &'a BatchLayout,
        caches: Vec<&'a mut B::KvCache>,
        group: Option<&'a dyn Collective>,
    ) -> Step<'a, B> {
        let (cos, sin) = match &self.positions {
            Positions::Rope(rope) => rope.angles(&layout.positions()),
            Positions::Learned | Positions::Alibi(_) => (Vec::new(), Vec::new()),
        };
        Step { layout, caches, cos, sin, group }
    }

    /// Token embeddings (plus learned positions, or the embedding norm) →
    /// `[rows, hidden]`. Refuses a position the model has no embedding for.
    pub(crate) fn embed<B: Backend>(
        &self,
        b: &B,
        w: &OuterWeights<'_, B::Weight>,
        ids: &[u32],
        layout: &BatchLayout,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        match w {
            OuterWeights::Llama(w) => b.embed(w.embed_tokens, ids, c.hidden_size),
            OuterWeights::Gpt2(w) => gpt2::embed(c, b, w, ids, layout),
            OuterWeights::Bloom(w) => bloom::embed(c, b, w, ids),
        }
    }

    /// One decoder layer: `[rows, hidden]` → `[rows, hidden]`.
    pub(crate) fn layer<B: Backend>(
        &self,
        b: &B,
        layer: usize,
        w: &LayerWeights<'_, B::Weight>,
        x: B::Tensor,
        step: &mut Step<'_, B>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        match (w, &self.positions) {
            (LayerWeights::Llama(w), _) => llama::decoder_layer(c, b, layer, w, x, step),
            (LayerWeights::Fused(w), Positions::Alibi(slopes)) => {
                fused::block(c, b, layer, w, Some(slopes), x, step)
            }
            (LayerWeights::Fused(w), _) => fused::block(c, b, layer, w, None, x, step),
        }
    }

    /// The final norm of the given rows → `[rows.len(), hidden]`, the input of
    /// the LM head (which a caller may apply in vocabulary slices).
    pub(crate) fn head_norm<B: Backend>(
        &self,
        b: &B,
        w: &OuterWeights<'_, B::Weight>,
        x: &B::Tensor,
        rows: &[usize],
    ) -> Result<B::Tensor> {
        let c = &self.config;
        match w {
            OuterWeights::Llama(w) => llama::head_norm(c, b, w, x, rows),
            // GPT-2 and BLOOM: the final LayerNorm `ln_f`.
            OuterWeights::Gpt2(w) => w.ln_f.layer_norm(b, &b.select_rows(x, rows)?, c.rms_norm_eps),
            OuterWeights::Bloom(w) => w.ln_f.layer_norm(b, &b.select_rows(x, rows)?, c.rms_norm_eps),
        }
    }
}
