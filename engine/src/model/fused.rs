//! The decoder block GPT-2 and BLOOM share: pre-LayerNorm, one fused q|k|v
//! projection split into q, k and v, multi-head attention (with ALiBi for
//! BLOOM), a GELU (tanh) MLP, and a bias on every linear. The families differ
//! only in their tensor names (and BLOOM's ALiBi), given by each family's file.
use zeroshard_offload::ModelConfig;

use super::{split_qkv, LinearWeights, Lookup, Step};
use crate::backend::{AttentionShape, Backend};
use crate::error::Result;

/// Borrowed weights of one block, in compute layout (`[out, in]`).
pub struct FusedBlockWeights<'a, W: ?Sized> {
    pub ln_attn: LinearWeights<'a, W>,  // LayerNorm [hidden], [hidden]
    pub qkv: LinearWeights<'a, W>,      // [3 * hidden, hidden] (q | k | v rows), [3 * hidden]
    pub attn_out: LinearWeights<'a, W>, // [hidden, hidden], [hidden]
    pub ln_mlp: LinearWeights<'a, W>,   // LayerNorm [hidden], [hidden]
    pub mlp_up: LinearWeights<'a, W>,   // [ffn, hidden], [ffn]
    pub mlp_down: LinearWeights<'a, W>, // [hidden, ffn], [hidden]
}

/// The checkpoint names (without `.weight` / `.bias`) of a block's six parts,
/// in the order of [`FusedBlockWeights`]'s fields.
pub(super) type BlockNames = [String; 6];

impl<'a, W: ?Sized> FusedBlockWeights<'a, W> {
    /// Looks the block's tensors up by `names`.
    pub(super) fn from_lookup(names: &BlockNames, get: impl Lookup<'a, W>) -> Result<Self> {
        let [ln_attn, qkv, attn_out, ln_mlp, mlp_up, mlp_down] = names;
        Ok(Self {
            ln_attn: LinearWeights::from_lookup(&get, ln_attn)?,
            qkv: LinearWeights::from_lookup(&get, qkv)?,
            attn_out: LinearWeights::from_lookup(&get, attn_out)?,
            ln_mlp: LinearWeights::from_lookup(&get, ln_mlp)?,
            mlp_up: LinearWeights::from_lookup(&get, mlp_up)?,
            mlp_down: LinearWeights::from_lookup(&get, mlp_down)?,
        })
    }
}

/// `x + attn(ln(x))`, then `+ mlp(ln(·))`. `x`: `[rows, hidden]`. With
/// `alibi_slopes` (BLOOM) the attention scores get ALiBi biases; the residual is
/// always the block's input.
pub(super) fn block<B: Backend>(
    c: &ModelConfig,
    b: &B,
    layer: usize,
    w: &FusedBlockWeights<'_, B::Weight>,
    alibi_slopes: Option<&[f32]>,
    x: B::Tensor,
    step: &mut Step<'_, B>,
) -> Result<B::Tensor> {
    let (hidden, eps) = (c.hidden_size, c.rms_norm_eps);
    let mut residual = x;
    let h = w.ln_attn.layer_norm(b, &residual, eps)?; // [rows, hidden]
    let qkv = w.qkv.linear(b, &h, 3 * hidden)?; // [rows, 3 * hidden]
    let (q, k, v) = split_qkv(b, &qkv, hidden, hidden)?; // each [rows, heads * head_dim]
    let shape = AttentionShape {
        num_heads: c.num_heads,
        num_kv_heads: c.num_heads,
        head_dim: c.head_dim,
        sliding_window: None,
        alibi_slopes,
    };
    let attn = b.attention(&q, &k, &v, &mut step.caches, layer, step.layout, shape)?; // [rows, hidden]
    let attn_out = w.attn_out.linear(b, &attn, hidden)?; // [rows, hidden]
    b.add_assign(&mut residual, &attn_out)?;

    let h = w.ln_mlp.layer_norm(b, &residual, eps)?; // [rows, hidden]
    let up = w.mlp_up.linear(b, &h, c.intermediate_size)?; // [rows, ffn]
    let act = b.gelu_tanh(&up)?; // [rows, ffn]
    let mlp_out = w.mlp_down.linear(b, &act, hidden)?; // [rows, hidden]
    b.add_assign(&mut residual, &mlp_out)?;
    Ok(residual)
}
