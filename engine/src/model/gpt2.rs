//! GPT-2 (`GPT2LMHeadModel`): learned absolute positions, pre-LayerNorm blocks,
//! fused q|k|v attention, GELU (tanh) MLP, a bias on every linear, tied LM head.
//!
//! The checkpoint's `Conv1D` weights are stored `[in, out]`; their specs carry
//! [`Layout::Transposed`], so they reach the model as `[out, in]` and the math is a
//! plain `linear`. `c_attn` stays fused: one `[rows, 3 * hidden]` projection (q, k,
//! v side by side, as `Conv1D` lays them out), split into q, k and v in the forward.
use zeroshard_offload::ModelConfig;

use super::fused::BlockNames;
use super::{need, LinearWeights, Lookup};
use crate::backend::{Backend, BatchLayout};
use crate::error::{EngineError, Result};

/// Borrowed weights outside the blocks.
pub struct Gpt2OuterWeights<'a, W: ?Sized> {
    pub wte: &'a W,                 // [vocab, hidden]
    pub wpe: &'a W,                 // [n_positions, hidden]
    pub ln_f: LinearWeights<'a, W>, // LayerNorm [hidden], [hidden]
    pub lm_head: &'a W,             // [vocab, hidden] (`wte` when tied)
}

/// Block `l`'s tensor names, in the order of [`FusedBlockWeights`](super::fused::FusedBlockWeights).
pub(super) fn block_names(l: usize) -> BlockNames {
    ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
        .map(|n| format!("transformer.h.{l}.{n}"))
}

impl<'a, W: ?Sized> Gpt2OuterWeights<'a, W> {
    pub fn from_lookup(c: &ModelConfig, get: impl Lookup<'a, W>) -> Result<Self> {
        let wte = need(&get, "transformer.wte.weight".into())?;
        Ok(Self {
            wte,
            wpe: need(&get, "transformer.wpe.weight".into())?,
            ln_f: LinearWeights::from_lookup(&get, "transformer.ln_f")?,
            lm_head: if c.tie_word_embeddings { wte } else { need(&get, "lm_head.weight".into())? },
        })
    }
}

/// Token plus position embeddings → `[rows, hidden]`. Refuses a position past the
/// learned table (`n_positions`).
pub(super) fn embed<B: Backend>(
    c: &ModelConfig,
    b: &B,
    w: &Gpt2OuterWeights<'_, B::Weight>,
    ids: &[u32],
    layout: &BatchLayout,
) -> Result<B::Tensor> {
    let positions = layout.positions();
    if let Some(p) = positions.iter().find(|p| **p >= c.max_position_embeddings) {
        return Err(EngineError::InvalidRequest(format!(
            "position {p} is past the model's {} learned positions (n_positions)",
            c.max_position_embeddings
        )));
    }
    let mut x = b.embed(w.wte, ids, c.hidden_size)?; // [rows, hidden]
    b.add_position_embeddings(&mut x, w.wpe, &positions)?;
    Ok(x)
}
