//! The Llama family decoder layer (Llama, Mistral, Qwen2): pre-RMSNorm,
//! grouped-query attention with RoPE, SwiGLU MLP.
use zeroshard_offload::ModelConfig;

use super::{need, Lookup, Step};
use crate::backend::{AttentionShape, Backend};
use crate::error::Result;

/// Borrowed weights of one decoder layer. Shapes as stored (`[out, in]`).
pub struct LlamaLayerWeights<'a, W: ?Sized> {
    pub input_norm: &'a W,        // [hidden]
    pub q: &'a W,                 // [heads * head_dim, hidden]
    pub q_bias: Option<&'a W>,    // [heads * head_dim]
    pub k: &'a W,                 // [kv_heads * head_dim, hidden]
    pub k_bias: Option<&'a W>,    // [kv_heads * head_dim]
    pub v: &'a W,                 // [kv_heads * head_dim, hidden]
    pub v_bias: Option<&'a W>,    // [kv_heads * head_dim]
    pub o: &'a W,                 // [hidden, heads * head_dim]
    pub o_bias: Option<&'a W>,    // [hidden]
    pub post_norm: &'a W,         // [hidden]
    pub gate: &'a W,              // [ffn, hidden]
    pub gate_bias: Option<&'a W>, // [ffn]
    pub up: &'a W,                // [ffn, hidden]
    pub up_bias: Option<&'a W>,   // [ffn]
    pub down: &'a W,              // [hidden, ffn]
    pub down_bias: Option<&'a W>, // [hidden]
}

/// Borrowed weights outside the decoder layers.
pub struct LlamaOuterWeights<'a, W: ?Sized> {
    pub embed_tokens: &'a W, // [vocab, hidden]
    pub norm: &'a W,         // [hidden]
    pub lm_head: &'a W,      // [vocab, hidden] (the embedding when tied)
}

impl<'a, W: ?Sized> LlamaLayerWeights<'a, W> {
    /// Looks up layer `l`'s tensors by their checkpoint names.
    pub fn from_lookup(c: &ModelConfig, l: usize, get: impl Lookup<'a, W>) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let w = |s: &str| need(&get, format!("{p}.{s}.weight"));
        let b = |s: &str, on: bool| -> Result<Option<&'a W>> {
            if on {
                need(&get, format!("{p}.{s}.bias")).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            input_norm: w("input_layernorm")?,
            q: w("self_attn.q_proj")?,
            q_bias: b("self_attn.q_proj", c.qkv_bias)?,
            k: w("self_attn.k_proj")?,
            k_bias: b("self_attn.k_proj", c.qkv_bias)?,
            v: w("self_attn.v_proj")?,
            v_bias: b("self_attn.v_proj", c.qkv_bias)?,
            o: w("self_attn.o_proj")?,
            o_bias: b("self_attn.o_proj", c.o_bias)?,
            post_norm: w("post_attention_layernorm")?,
            gate: w("mlp.gate_proj")?,
            gate_bias: b("mlp.gate_proj", c.mlp_bias)?,
            up: w("mlp.up_proj")?,
            up_bias: b("mlp.up_proj", c.mlp_bias)?,
            down: w("mlp.down_proj")?,
            down_bias: b("mlp.down_proj", c.mlp_bias)?,
        })
    }
}

impl<'a, W: ?Sized> LlamaOuterWeights<'a, W> {
    pub fn from_lookup(c: &ModelConfig, get: impl Lookup<'a, W>) -> Result<Self> {
        let embed_tokens = need(&get, "model.embed_tokens.weight".into())?;
        let lm_head = if c.tie_word_embeddings { embed_tokens } else { need(&get, "lm_head.weight".into())? };
        Ok(Self { embed_tokens, norm: need(&get, "model.norm.weight".into())?, lm_head })
    }
}

/// `x + attn(norm(x))`, then `+ mlp(norm(·))`. `x`: `[rows, hidden]`.
pub(super) fn decoder_layer<B: Backend>(
    c: &ModelConfig,
    b: &B,
    layer: usize,
    w: &LlamaLayerWeights<'_, B::Weight>,
    x: B::Tensor,
    step: &mut Step<'_, B>,
) -> Result<B::Tensor> {
    let mut residual = x;
    let h = b.rms_norm(&residual, w.input_norm, c.rms_norm_eps)?; // [rows, hidden]
    let mut q = b.linear(&h, w.q, w.q_bias, c.q_dim())?; // [rows, heads * head_dim]
    let mut k = b.linear(&h, w.k, w.k_bias, c.kv_dim())?; // [rows, kv_heads * head_dim]
    let v = b.linear(&h, w.v, w.v_bias, c.kv_dim())?; // [rows, kv_heads * head_dim]
    b.rope(&mut q, c.head_dim, &step.cos, &step.sin)?;
    b.rope(&mut k, c.head_dim, &step.cos, &step.sin)?;
    let shape = AttentionShape {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        sliding_window: c.sliding_window,
        alibi_slopes: None,
    };
    let attn = b.attention(&q, &k, &v, &mut step.caches, layer, step.layout, shape)?; // [rows, heads * head_dim]
    let mut attn_out = b.linear(&attn, w.o, w.o_bias, c.hidden_size)?; // [rows, hidden]
    step.all_reduce(b, &mut attn_out)?; // the heads of every tensor-parallel member
    b.add_assign(&mut residual, &attn_out)?;

    let h = b.rms_norm(&residual, w.post_norm, c.rms_norm_eps)?; // [rows, hidden]
    let gate = b.linear(&h, w.gate, w.gate_bias, c.intermediate_size)?; // [rows, ffn]
    let up = b.linear(&h, w.up, w.up_bias, c.intermediate_size)?; // [rows, ffn]
    let act = b.silu_mul(&gate, &up)?; // [rows, ffn]
    let mut mlp_out = b.linear(&act, w.down, w.down_bias, c.hidden_size)?; // [rows, hidden]
    step.all_reduce(b, &mut mlp_out)?; // the ffn rows of every tensor-parallel member
    b.add_assign(&mut residual, &mlp_out)?;
    Ok(residual)
}

/// Final RMSNorm of the given rows → `[rows.len(), hidden]`.
pub(super) fn head_norm<B: Backend>(
    c: &ModelConfig,
    b: &B,
    w: &LlamaOuterWeights<'_, B::Weight>,
    x: &B::Tensor,
    rows: &[usize],
) -> Result<B::Tensor> {
    let last = b.select_rows(x, rows)?; // [seqs, hidden]
    b.rms_norm(&last, w.norm, c.rms_norm_eps) // [seqs, hidden]
}
