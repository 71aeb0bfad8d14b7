//! GPT-2 (`GPT2LMHeadModel`) keys → [`ModelConfig`].
//!
//! transformers' `GPT2Config` maps `hidden_size`, `num_attention_heads`,
//! `num_hidden_layers` and `max_position_embeddings` onto `n_embd`, `n_head`,
//! `n_layer` and `n_positions`; both spellings are read. GPT-2 ignores the Llama
//! keys `intermediate_size` and `hidden_act` (tiny-random-gpt2 carries both with
//! values GPT-2 never uses): the MLP width is `n_inner` (default `4 * n_embd`) and
//! the activation `activation_function`.
use serde::Deserialize;
use serde_json::Value;

use super::{Ctx, RopeConfig, RopeScaling};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;

#[derive(Deserialize, Default)]
struct RawGpt2Config {
    n_embd: Option<usize>,
    hidden_size: Option<usize>,
    n_layer: Option<usize>,
    num_hidden_layers: Option<usize>,
    n_head: Option<usize>,
    num_attention_heads: Option<usize>,
    n_positions: Option<usize>,
    max_position_embeddings: Option<usize>,
    n_inner: Option<usize>,
    vocab_size: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

/// The GELU tanh approximation under its transformers names (`gelu_fast` and
/// `gelu_pytorch_tanh` compute the same function as `gelu_new`, rounded in another
/// order).
const GELU_TANH_NAMES: [&str; 3] = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

pub(super) fn parse(cx: &Ctx, config: &Value) -> Result<ModelConfig> {
    let raw: RawGpt2Config = cx.raw(config)?;
    let (k, v) = cx.alias(&[("n_embd", raw.n_embd), ("hidden_size", raw.hidden_size)])?;
    let hidden_size = cx.req(v, &k)?;
    let (k, v) = cx.alias(&[("n_layer", raw.n_layer), ("num_hidden_layers", raw.num_hidden_layers)])?;
    let num_layers = cx.req(v, &k)?;
    let (heads_key, v) =
        cx.alias(&[("n_head", raw.n_head), ("num_attention_heads", raw.num_attention_heads)])?;
    let num_heads = cx.req(v, &heads_key)?;
    let head_dim = cx.head_dim(hidden_size, num_heads, &heads_key)?;
    let (k, v) = cx.alias(&[
        ("n_positions", raw.n_positions),
        ("max_position_embeddings", raw.max_position_embeddings),
    ])?;
    let n_positions = cx.req(v, &k)?;
    let intermediate_size = match raw.n_inner {
        None => 4 * hidden_size,
        Some(n) => cx.req(Some(n), "n_inner")?,
    };
    let act = raw.activation_function.as_deref().unwrap_or("gelu_new");
    if !GELU_TANH_NAMES.contains(&act) {
        return Err(cx.err(
            "activation_function",
            format!("\"{act}\" is not supported (supported: {})", GELU_TANH_NAMES.join(", ")),
        ));
    }
    // Attention variants: only transformers' defaults are computed.
    for (key, value, default) in [
        ("scale_attn_weights", raw.scale_attn_weights, true),
        ("scale_attn_by_inverse_layer_idx", raw.scale_attn_by_inverse_layer_idx, false),
        ("reorder_and_upcast_attn", raw.reorder_and_upcast_attn, false),
    ] {
        if let Some(v) = value.filter(|v| *v != default) {
            return Err(cx.err(key, format!("{v} is not supported (only {default})")));
        }
    }
    let eps = raw.layer_norm_epsilon.unwrap_or(1e-5);
    if eps.is_nan() || eps < 0.0 {
        return Err(cx.err("layer_norm_epsilon", format!("{eps} must be ≥ 0")));
    }
    Ok(ModelConfig {
        architecture: Architecture::Gpt2,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size,
        vocab_size: cx.req(raw.vocab_size, "vocab_size")?,
        max_position_embeddings: n_positions,
        rms_norm_eps: eps as f32,
        rope: RopeConfig { theta: 10000.0, scaling: RopeScaling::None },
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}
