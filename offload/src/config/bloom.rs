//! BLOOM (`BloomForCausalLM`) keys → [`ModelConfig`].
//!
//! transformers' `BloomConfig` reads the width from `hidden_size` (or the older
//! `n_embed`), layers from `n_layer` (alias `num_hidden_layers`) and heads from
//! `n_head` (alias `num_attention_heads`). The MLP is always `4 * hidden`. BLOOM has
//! no position limit of its own: [`BLOOM_MAX_POSITIONS`](super::BLOOM_MAX_POSITIONS).
use serde::Deserialize;
use serde_json::Value;

use super::fused::{fused_config, FusedKeys};
use super::{Ctx, BLOOM_MAX_POSITIONS, MAX_HIDDEN};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;

#[derive(Deserialize, Default)]
struct RawBloomConfig {
    hidden_size: Option<usize>,
    n_embed: Option<usize>,
    apply_residual_connection_post_layernorm: Option<bool>,
    #[serde(flatten)]
    fused: FusedKeys,
}

pub(super) fn parse(cx: &Ctx, config: &Value) -> Result<ModelConfig> {
    let raw: RawBloomConfig = cx.raw(config)?;
    let (k, v) = cx.alias(&[("hidden_size", raw.hidden_size), ("n_embed", raw.n_embed)])?;
    let hidden_size = cx.req(v, &k, MAX_HIDDEN)?;
    if raw.apply_residual_connection_post_layernorm == Some(true) {
        return Err(cx.err(
            "apply_residual_connection_post_layernorm",
            "true is not supported (the residual is taken before the norm)",
        ));
    }
    fused_config(cx, Architecture::Bloom, hidden_size, raw.fused, 4 * hidden_size, BLOOM_MAX_POSITIONS)
}
