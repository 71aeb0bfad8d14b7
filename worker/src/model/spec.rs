//! The tensors a model needs: names and shapes as stored in the checkpoint.
use zeroshard_offload::ModelConfig;

/// One tensor of the model as stored in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// The decoder layer it belongs to; `None` for embedding, final norm, head.
    pub layer: Option<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor the model reads, in forward order.
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let outer = |name: &str, shape: Vec<usize>| TensorSpec {
        name: name.to_string(),
        shape,
        layer: None,
    };
    let mut specs = vec![outer("model.embed_tokens.weight", vec![c.vocab_size, h])];
    for l in 0..c.num_layers {
        let mut add = |suffix: &str, shape: Vec<usize>| {
            specs.push(TensorSpec {
                name: format!("model.layers.{l}.{suffix}"),
                shape,
                layer: Some(l),
            })
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
        for (proj, shape) in [("gate_proj", vec![ffn, h]), ("up_proj", vec![ffn, h]), ("down_proj", vec![h, ffn])] {
            let out = shape[0];
            add(&format!("mlp.{proj}.weight"), shape);
            if c.mlp_bias {
                add(&format!("mlp.{proj}.bias"), vec![out]);
            }
        }
    }
    specs.push(outer("model.norm.weight", vec![h]));
    if !c.tie_word_embeddings {
        specs.push(outer("lm_head.weight", vec![c.vocab_size, h]));
    }
    specs
}
