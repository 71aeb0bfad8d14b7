//! BLOOM (`BloomForCausalLM`): no position embeddings but an ALiBi bias on the
//! attention scores, a LayerNorm right after the word embeddings, pre-LayerNorm
//! blocks, fused q|k|v attention, GELU (tanh) MLP, biases everywhere, tied LM head.
//!
//! The checkpoint's `query_key_value` interleaves q, k and v per head
//! (`[heads, 3, head_dim]` along its output); its specs carry
//! [`Layout::QkvPerHead`], so it reaches the model as q rows, then k, then v, and
//! one `[rows, 3 * hidden]` projection is split into q, k and v in the forward.
use zeroshard_offload::ModelConfig;

use super::{need, split_qkv, LayerNormWeights, Layout, LinearWeights, Step, TensorSpec};
use crate::backend::{AttentionShape, Backend};
use crate::error::Result;

/// Borrowed weights of one BLOOM block, in compute layout.
pub struct BloomLayerWeights<'a, W: ?Sized> {
    pub input_layernorm: LayerNormWeights<'a, W>,          // [hidden]
    pub query_key_value: LinearWeights<'a, W>, // [3 * hidden, hidden] (q | k | v rows), [3 * hidden]
    pub dense: LinearWeights<'a, W>,           // [hidden, hidden], [hidden]
    pub post_attention_layernorm: LayerNormWeights<'a, W>, // [hidden]
    pub dense_h_to_4h: LinearWeights<'a, W>,   // [4 * hidden, hidden], [4 * hidden]
    pub dense_4h_to_h: LinearWeights<'a, W>,   // [hidden, 4 * hidden], [hidden]
}

/// Borrowed weights outside the blocks.
pub struct BloomOuterWeights<'a, W: ?Sized> {
    pub word_embeddings: &'a W,                             // [vocab, hidden]
    pub word_embeddings_layernorm: LayerNormWeights<'a, W>, // [hidden]
    pub ln_f: LayerNormWeights<'a, W>,                      // [hidden]
    pub lm_head: &'a W,                                     // [vocab, hidden] (`word_embeddings` when tied)
}

impl<'a, W: ?Sized> BloomLayerWeights<'a, W> {
    /// Looks up block `l`'s tensors by their checkpoint names.
    pub fn from_lookup(l: usize, get: impl Fn(&str) -> Option<&'a W>) -> Result<Self> {
        let p = format!("transformer.h.{l}");
        Ok(Self {
            input_layernorm: LayerNormWeights::from_lookup(&get, &format!("{p}.input_layernorm"))?,
            query_key_value: LinearWeights::from_lookup(
                &get,
                &format!("{p}.self_attention.query_key_value"),
            )?,
            dense: LinearWeights::from_lookup(&get, &format!("{p}.self_attention.dense"))?,
            post_attention_layernorm: LayerNormWeights::from_lookup(
                &get,
                &format!("{p}.post_attention_layernorm"),
            )?,
            dense_h_to_4h: LinearWeights::from_lookup(&get, &format!("{p}.mlp.dense_h_to_4h"))?,
            dense_4h_to_h: LinearWeights::from_lookup(&get, &format!("{p}.mlp.dense_4h_to_h"))?,
        })
    }
}

impl<'a, W: ?Sized> BloomOuterWeights<'a, W> {
    pub fn from_lookup(c: &ModelConfig, get: impl Fn(&str) -> Option<&'a W>) -> Result<Self> {
        let word_embeddings = need(&get, "transformer.word_embeddings.weight".into())?;
        Ok(Self {
            word_embeddings,
            word_embeddings_layernorm: LayerNormWeights::from_lookup(
                &get,
                "transformer.word_embeddings_layernorm",
            )?,
            ln_f: LayerNormWeights::from_lookup(&get, "transformer.ln_f")?,
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
) -> B::Tensor {
    let x = b.embed(w.word_embeddings, ids, c.hidden_size); // [rows, hidden]
    w.word_embeddings_layernorm.forward(b, &x, c.rms_norm_eps)
}

/// `x + attn(ln(x))` with ALiBi, then `+ mlp(ln(·))`. `x`: `[rows, hidden]`.
/// (`apply_residual_connection_post_layernorm` is refused by the config: the
/// residual is always the block's input.)
pub(super) fn block<B: Backend>(
    c: &ModelConfig,
    b: &B,
    layer: usize,
    w: &BloomLayerWeights<'_, B::Weight>,
    alibi_slopes: &[f32],
    x: B::Tensor,
    step: &mut Step<'_, B>,
) -> B::Tensor {
    let (hidden, eps) = (c.hidden_size, c.rms_norm_eps);
    let mut residual = x;
    let h = w.input_layernorm.forward(b, &residual, eps); // [rows, hidden]
    let qkv = w.query_key_value.forward(b, &h, 3 * hidden); // [rows, 3 * hidden]
    let (q, k, v) = split_qkv(b, &qkv, hidden, hidden); // each [rows, heads * head_dim]
    let shape = AttentionShape {
        num_heads: c.num_heads,
        num_kv_heads: c.num_heads,
        head_dim: c.head_dim,
        sliding_window: None,
        alibi_slopes: Some(alibi_slopes),
    };
    let attn = b.attention(&q, &k, &v, &mut step.caches, layer, step.layout, shape); // [rows, hidden]
    let attn_out = w.dense.forward(b, &attn, hidden); // [rows, hidden]
    b.add_assign(&mut residual, &attn_out);

    let h = w.post_attention_layernorm.forward(b, &residual, eps); // [rows, hidden]
    let act = b.gelu_tanh(&w.dense_h_to_4h.forward(b, &h, c.intermediate_size)); // [rows, 4 * hidden]
    let mlp_out = w.dense_4h_to_h.forward(b, &act, hidden); // [rows, hidden]
    b.add_assign(&mut residual, &mlp_out);
    residual
}

/// Every tensor of a BLOOM model as stored, in forward order.
pub(super) fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, ffn) = (c.hidden_size, c.intermediate_size);
    let outer = |name: &str, shape: Vec<usize>| TensorSpec::new(name, shape, None);
    let mut specs = vec![
        outer("transformer.word_embeddings.weight", vec![c.vocab_size, h]),
        outer("transformer.word_embeddings_layernorm.weight", vec![h]),
        outer("transformer.word_embeddings_layernorm.bias", vec![h]),
    ];
    let qkv = Layout::QkvPerHead { heads: c.num_heads, head_dim: c.head_dim };
    for l in 0..c.num_layers {
        let p = format!("transformer.h.{l}");
        let one = |name: &str, shape: Vec<usize>| TensorSpec::new(format!("{p}.{name}"), shape, Some(l));
        let linear = |name: &str, out: usize, inp: usize| {
            [one(&format!("{name}.weight"), vec![out, inp]), one(&format!("{name}.bias"), vec![out])]
        };
        let norm =
            |name: &str| [one(&format!("{name}.weight"), vec![h]), one(&format!("{name}.bias"), vec![h])];
        specs.extend(norm("input_layernorm"));
        specs.extend(linear("self_attention.query_key_value", 3 * h, h).map(|s| s.with_layout(qkv)));
        specs.extend(linear("self_attention.dense", h, h));
        specs.extend(norm("post_attention_layernorm"));
        specs.extend(linear("mlp.dense_h_to_4h", ffn, h));
        specs.extend(linear("mlp.dense_4h_to_h", h, ffn));
    }
    specs.push(outer("transformer.ln_f.weight", vec![h]));
    specs.push(outer("transformer.ln_f.bias", vec![h]));
    if !c.tie_word_embeddings {
        specs.push(outer("lm_head.weight", vec![c.vocab_size, h]));
    }
    specs
}
