//! What GPT-2 and BLOOM share: the keys of layers, heads and LayerNorm ε (each
//! with its transformers alias), and the shape of the config they become —
//! multi-head attention, biases on every linear, LayerNorm, no RoPE, a head tied
//! to the embedding unless `tie_word_embeddings` says otherwise.
use serde::Deserialize;

use super::{Ctx, RopeConfig, RopeScaling, MAX_HEADS, MAX_LAYERS, MAX_VOCAB};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;

/// The keys both families read besides the width (flattened into each
/// family's raw config).
#[derive(Deserialize, Default)]
pub(super) struct FusedKeys {
    pub n_layer: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub n_head: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub vocab_size: Option<usize>,
    pub layer_norm_epsilon: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
}

/// The config of a fused-block model of width `hidden_size` (read under
/// `hidden_key`), with its MLP width and position limit given by the family.
pub(super) fn fused_config(
    cx: &Ctx,
    architecture: Architecture,
    hidden_size: usize,
    keys: FusedKeys,
    intermediate_size: usize,
    max_position_embeddings: usize,
) -> Result<ModelConfig> {
    let (k, v) = cx.alias(&[("n_layer", keys.n_layer), ("num_hidden_layers", keys.num_hidden_layers)])?;
    let num_layers = cx.req(v, &k, MAX_LAYERS)?;
    let (heads_key, v) =
        cx.alias(&[("n_head", keys.n_head), ("num_attention_heads", keys.num_attention_heads)])?;
    let num_heads = cx.req(v, &heads_key, MAX_HEADS)?;
    let head_dim = cx.head_dim(hidden_size, num_heads, &heads_key)?;
    let eps = cx.eps(keys.layer_norm_epsilon.unwrap_or(1e-5), "layer_norm_epsilon")?;
    Ok(ModelConfig {
        architecture,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size,
        vocab_size: cx.req(keys.vocab_size, "vocab_size", MAX_VOCAB)?,
        max_position_embeddings,
        rms_norm_eps: eps,
        rope: RopeConfig { theta: 10000.0, scaling: RopeScaling::None },
        tie_word_embeddings: keys.tie_word_embeddings.unwrap_or(true),
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}
