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

use super::fused::{fused_config, FusedKeys};
use super::{Ctx, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_POSITIONS};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;

#[derive(Deserialize, Default)]
struct RawGpt2Config {
    n_embd: Option<usize>,
    hidden_size: Option<usize>,
    n_positions: Option<usize>,
    max_position_embeddings: Option<usize>,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
    #[serde(flatten)]
    fused: FusedKeys,
}

/// The GELU tanh approximation under its transformers names (`gelu_fast` and
/// `gelu_pytorch_tanh` compute the same function as `gelu_new`, rounded in another
/// order).
const GELU_TANH_NAMES: [&str; 3] = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

pub(super) fn parse(cx: &Ctx, config: &Value) -> Result<ModelConfig> {
    let raw: RawGpt2Config = cx.raw(config)?;
    let (k, v) = cx.alias(&[("n_embd", raw.n_embd), ("hidden_size", raw.hidden_size)])?;
    let hidden_size = cx.req(v, &k, MAX_HIDDEN)?;
    let (k, v) = cx.alias(&[
        ("n_positions", raw.n_positions),
        ("max_position_embeddings", raw.max_position_embeddings),
    ])?;
    let n_positions = cx.req(v, &k, MAX_POSITIONS)?;
    let intermediate_size = match raw.n_inner {
        None => 4 * hidden_size,
        Some(n) => cx.req(Some(n), "n_inner", MAX_INTERMEDIATE)?,
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
    fused_config(cx, Architecture::Gpt2, hidden_size, raw.fused, intermediate_size, n_positions)
}
