//! Model definitions, written once against [`Backend`](crate::backend::Backend).
//!
//! A model never owns or locates its weights: every call borrows them
//! ([`LayerWeights`] for one decoder layer, [`OuterWeights`] for embedding, final
//! norm and head), so the same code runs on weights from local memory, gathered
//! from peers, or kept resident in a cache.
//!
//! ```ignore
//! let model = Model::new(config);
//! let mut x = model.embed(&backend, &outer, &ids);             // [rows, hidden]
//! for l in 0..model.config().num_layers {
//!     let lw = LayerWeights::from_lookup(model.config(), l, |n| store.get(n))?;
//!     x = model.layer(&backend, l, &lw, x, &mut step);          // [rows, hidden]
//! }
//! let logits = model.head(&backend, &outer, &x, &layout.last_rows()); // [seqs, vocab]
//! ```
mod llama;
mod rope;
mod spec;

pub use llama::{LayerWeights, OuterWeights};
pub use rope::RopeTable;
pub use spec::{tensor_specs, TensorSpec};

use zeroshard_offload::ModelConfig;

use crate::backend::{Backend, BatchLayout};

/// A model: its validated config and the derived RoPE frequencies.
#[derive(Clone, Debug)]
pub struct Model {
    config: ModelConfig,
    rope: RopeTable,
}

/// Per-step state the layers share: layout, angle tables, the batch's caches.
pub struct Step<'a, B: Backend> {
    pub layout: &'a BatchLayout,
    pub caches: Vec<&'a mut B::KvCache>,
    /// `[rows, head_dim / 2]` cosines and sines of each row's position.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Model {
    pub fn new(config: ModelConfig) -> Self {
        let rope = RopeTable::new(&config);
        Self { config, rope }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Prepares the shared per-step state (angle tables for each row's position).
    pub fn step<'a, B: Backend>(&self, layout: &'a BatchLayout, caches: Vec<&'a mut B::KvCache>) -> Step<'a, B> {
        let (cos, sin) = self.rope.angles(&layout.positions());
        Step {
            layout,
            caches,
            cos,
            sin,
        }
    }

    /// Token embeddings → `[rows, hidden]`.
    pub fn embed<B: Backend>(&self, b: &B, w: &OuterWeights<'_, B::Weight>, ids: &[u32]) -> B::Tensor {
        b.embed(w.embed_tokens, ids, self.config.hidden_size)
    }

    /// One decoder layer: `[rows, hidden]` → `[rows, hidden]`.
    pub fn layer<B: Backend>(
        &self,
        b: &B,
        layer: usize,
        w: &LayerWeights<'_, B::Weight>,
        x: B::Tensor,
        step: &mut Step<'_, B>,
    ) -> B::Tensor {
        llama::decoder_layer(&self.config, b, layer, w, x, step)
    }

    /// Final norm and LM head on the given rows → `[rows.len(), vocab]`.
    pub fn head<B: Backend>(&self, b: &B, w: &OuterWeights<'_, B::Weight>, x: &B::Tensor, rows: &[usize]) -> B::Tensor {
        let last = b.select_rows(x, rows); // [seqs, hidden]
        let normed = b.rms_norm(&last, w.norm, self.config.rms_norm_eps);
        b.linear(&normed, w.lm_head, None, self.config.vocab_size) // [seqs, vocab]
    }
}
