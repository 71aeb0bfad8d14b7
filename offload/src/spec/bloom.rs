//! The stored tensors of BLOOM (fused per-head `query_key_value`).
use super::{Layout, TensorSpec};
use crate::ModelConfig;

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
