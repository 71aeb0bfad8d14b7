//! The stored tensors of the Llama family (Llama, Mistral, Qwen2).
use super::TensorSpec;
use crate::ModelConfig;

/// Every tensor of a Llama-family model, in forward order.
pub(super) fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut specs = vec![TensorSpec::new("model.embed_tokens.weight", vec![c.vocab_size, h], None)];
    for l in 0..c.num_layers {
        let mut add = |suffix: &str, shape: Vec<usize>| {
            specs.push(TensorSpec::new(format!("model.layers.{l}.{suffix}"), shape, Some(l)))
        };
        add("input_layernorm.weight", vec![h]);
        for (proj, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            add(&format!("self_attn.{proj}.weight"), vec![out, h]);
            if c.qkv_bias {
                add(&format!("self_attn.{proj}.bias"), vec![out]);
            }
        }
        add("self_attn.o_proj.weight", vec![h, q]);
        if c.o_bias {
            add("self_attn.o_proj.bias", vec![h]);
        }
        add("post_attention_layernorm.weight", vec![h]);
        for (proj, shape) in
            [("gate_proj", vec![ffn, h]), ("up_proj", vec![ffn, h]), ("down_proj", vec![h, ffn])]
        {
            let out = shape[0];
            add(&format!("mlp.{proj}.weight"), shape);
            if c.mlp_bias {
                add(&format!("mlp.{proj}.bias"), vec![out]);
            }
        }
    }
    specs.push(TensorSpec::new("model.norm.weight", vec![h], None));
    if !c.tie_word_embeddings {
        specs.push(TensorSpec::new("lm_head.weight", vec![c.vocab_size, h], None));
    }
    specs
}
