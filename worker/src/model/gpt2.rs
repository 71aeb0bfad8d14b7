//! GPT-2 (`GPT2LMHeadModel`): learned absolute positions, pre-LayerNorm blocks,
//! fused q|k|v attention, GELU (tanh) MLP, a bias on every linear, tied LM head.
//!
//! The checkpoint's `Conv1D` weights are stored `[in, out]`; their specs carry
//! [`Layout::Transposed`], so they reach the model as `[out, in]` and the math is a
//! plain `linear`. `c_attn` stays fused: one `[rows, 3 * hidden]` projection (q, k,
//! v side by side, as `Conv1D` lays them out), split into q, k and v in the forward.
use zeroshard_offload::ModelConfig;

use super::fused::BlockNames;
use super::{need, Layout, LinearWeights, Lookup, TensorSpec};
use crate::backend::{Backend, BatchLayout};
use crate::error::{Result, WorkerError};

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
        return Err(WorkerError::InvalidRequest(format!(
            "position {p} is past the model's {} learned positions (n_positions)",
            c.max_position_embeddings
        )));
    }
    let mut x = b.embed(w.wte, ids, c.hidden_size)?; // [rows, hidden]
    b.add_position_embeddings(&mut x, w.wpe, &positions)?;
    Ok(x)
}

/// Every tensor of a GPT-2 model as stored, in forward order.
pub(super) fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, ffn) = (c.hidden_size, c.intermediate_size);
    let mut specs = vec![
        TensorSpec::new("transformer.wte.weight", vec![c.vocab_size, h], None),
        TensorSpec::new("transformer.wpe.weight", vec![c.max_position_embeddings, h], None),
    ];
    for l in 0..c.num_layers {
        let p = format!("transformer.h.{l}");
        let one = |name: &str, shape: Vec<usize>| TensorSpec::new(format!("{p}.{name}"), shape, Some(l));
        // Conv1D: weight stored [in, out], bias [out].
        let conv = |name: &str, inp: usize, out: usize| {
            [
                one(&format!("{name}.weight"), vec![inp, out]).with_layout(Layout::Transposed),
                one(&format!("{name}.bias"), vec![out]),
            ]
        };
        let norm =
            |name: &str| [one(&format!("{name}.weight"), vec![h]), one(&format!("{name}.bias"), vec![h])];
        specs.extend(norm("ln_1"));
        specs.extend(conv("attn.c_attn", h, 3 * h));
        specs.extend(conv("attn.c_proj", h, h));
        specs.extend(norm("ln_2"));
        specs.extend(conv("mlp.c_fc", h, ffn));
        specs.extend(conv("mlp.c_proj", ffn, h));
    }
    specs.push(TensorSpec::new("transformer.ln_f.weight", vec![h], None));
    specs.push(TensorSpec::new("transformer.ln_f.bias", vec![h], None));
    if !c.tie_word_embeddings {
        specs.push(TensorSpec::new("lm_head.weight", vec![c.vocab_size, h], None));
    }
    specs
}
