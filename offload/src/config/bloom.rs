//! BLOOM (`BloomForCausalLM`) keys → [`ModelConfig`].
//!
//! transformers' `BloomConfig` reads the width from `hidden_size` (or the older
//! `n_embed`), layers from `n_layer` (alias `num_hidden_layers`) and heads from
//! `n_head` (alias `num_attention_heads`). The MLP is always `4 * hidden`. BLOOM has
//! no position limit of its own: [`BLOOM_MAX_POSITIONS`](super::BLOOM_MAX_POSITIONS).
use serde::Deserialize;
use serde_json::Value;

use super::{Ctx, RopeConfig, RopeScaling, BLOOM_MAX_POSITIONS};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;

#[derive(Deserialize, Default)]
struct RawBloomConfig {
    hidden_size: Option<usize>,
    n_embed: Option<usize>,
    n_layer: Option<usize>,
    num_hidden_layers: Option<usize>,
    n_head: Option<usize>,
    num_attention_heads: Option<usize>,
    vocab_size: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    apply_residual_connection_post_layernorm: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

pub(super) fn parse(cx: &Ctx, config: &Value) -> Result<ModelConfig> {
    let raw: RawBloomConfig = cx.raw(config)?;
    let (k, v) = cx.alias(&[("hidden_size", raw.hidden_size), ("n_embed", raw.n_embed)])?;
    let hidden_size = cx.req(v, &k)?;
    let (k, v) = cx.alias(&[("n_layer", raw.n_layer), ("num_hidden_layers", raw.num_hidden_layers)])?;
    let num_layers = cx.req(v, &k)?;
    let (heads_key, v) =
        cx.alias(&[("n_head", raw.n_head), ("num_attention_heads", raw.num_attention_heads)])?;
    let num_heads = cx.req(v, &heads_key)?;
    let head_dim = cx.head_dim(hidden_size, num_heads, &heads_key)?;
    if raw.apply_residual_connection_post_layernorm == Some(true) {
        return Err(cx.err(
            "apply_residual_connection_post_layernorm",
            "true is not supported (the residual is taken before the norm)",
        ));
    }
    let eps = raw.layer_norm_epsilon.unwrap_or(1e-5);
    if eps.is_nan() || eps < 0.0 {
        return Err(cx.err("layer_norm_epsilon", format!("{eps} must be ≥ 0")));
    }
    Ok(ModelConfig {
        architecture: Architecture::Bloom,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size: 4 * hidden_size,
        vocab_size: cx.req(raw.vocab_size, "vocab_size")?,
        max_position_embeddings: BLOOM_MAX_POSITIONS,
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
