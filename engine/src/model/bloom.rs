//! BLOOM (`BloomForCausalLM`): no position embeddings but an ALiBi bias on the
//! attention scores, a LayerNorm right after the word embeddings, pre-LayerNorm
//! blocks, fused q|k|v attention, GELU (tanh) MLP, biases everywhere, tied LM head.
//!
//! The checkpoint's `query_key_value` interleaves q, k and v per head
//! (`[heads, 3, head_dim]` along its output); its specs carry
//! [`Layout::QkvPerHead`], so it reaches the model as q rows, then k, then v, and
//! one `[rows, 3 * hidden]` projection is split into q, k and v in the forward.
use zeroshard_offload::ModelConfig;

use super::fused::BlockNames;
use super::{need, LinearWeights, Lookup};
use crate::backend::Backend;
use crate::error::Result;

/// Borrowed weights outside the blocks.
pub struct BloomOuterWeights<'a, W: ?Sized> {
    pub word_embeddings: &'a W,                          // [vocab, hidden]
    pub word_embeddings_layernorm: LinearWeights<'a, W>, // LayerNorm [hidden], [hidden]
    pub ln_f: LinearWeights<'a, W>,                      // LayerNorm [hidden], [hidden]
    pub lm_head: &'a W,                                  // [vocab, hidden] (`word_embeddings` when tied)
}

/// Block `l`'s tensor names, in the order of [`FusedBlockWeights`](super::fused::FusedBlockWeights).
pub(super) fn block_names(l: usize) -> BlockNames {
    [
        "input_layernorm",
        "self_attention.query_key_value",
        "self_attention.dense",
        "post_attention_layernorm",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ]
    .map(|n| format!("transformer.h.{l}.{n}"))
}

impl<'a, W: ?Sized> BloomOuterWeights<'a, W> {
    pub fn from_lookup(c: &ModelConfig, get: impl Lookup<'a, W>) -> Result<Self> {
        let word_embeddings = need(&get, "transformer.word_embeddings.weight".into())?;
        Ok(Self {
            word_embeddings,
            word_embeddings_layernorm: LinearWeights::from_lookup(
                &get,
                "transformer.word_embeddings_layernorm",
            )?,
            ln_f: LinearWeights::from_lookup(&get, "transformer.ln_f")?,
            lm_head: if c.tie_word_embeddings {
                word_embeddings
            } else {
                need(&get, "lm_head.weight".into())?
            },
        })
    }
}

/// Word embeddings, then their LayerNorm → `[rows, hidden]`.
pub(super) fn embed<B: Backend>(
    c: &ModelConfig,
    b: &B,
    w: &BloomOuterWeights<'_, B::Weight>,
    ids: &[u32],
) -> Result<B::Tensor> {
    let x = b.embed(w.word_embeddings, ids, c.hidden_size)?; // [rows, hidden]
    w.word_embeddings_layernorm.layer_norm(b, &x, c.rms_norm_eps) // [rows, hidden]
}
