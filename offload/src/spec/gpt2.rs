//! The stored tensors of GPT-2 (`Conv1D` weights stored `[in, out]`).
use super::{Layout, TensorSpec};
use crate::ModelConfig;

/// Every tensor of a GPT-2 model as stored, in forward order.
pub(super) fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, ffn) = (c.hidden_size, c.intermediate_size);
    let mut specs = vec![
        TensorSpec::new("transformer.wte.weight", vec![c.vocab_size, h], None),
        TensorSpec::new("transformer.wpe.weight", vec![c.max_position_embeddings, h], None),
    ];
    for l in 0..c.num_layers {
        let p = format!("transformer.h.{l}");
        let one = |name: &str, shape: Vec<usize>| TensorSpec::new(format!("{p}.{name}"), shape, Some(l));
        // Conv1D: weight stored [in, out], bias [out].
        let conv = |name: &str, inp: usize, out: usize| {
            [
                one(&format!("{name}.weight"), vec![inp, out]).with_layout(Layout::Transposed),
                one(&format!("{name}.bias"), vec![out]),
            ]
        };
        let norm =
            |name: &str| [one(&format!("{name}.weight"), vec![h]), one(&format!("{name}.bias"), vec![h])];
        specs.extend(norm("ln_1"));
        specs.extend(conv("attn.c_attn", h, 3 * h));
        specs.extend(conv("attn.c_proj", h, h));
        specs.extend(norm("ln_2"));
        specs.extend(conv("mlp.c_fc", h, ffn));
        specs.extend(conv("mlp.c_proj", ffn, h));
    }
    specs.push(TensorSpec::new("transformer.ln_f.weight", vec![h], None));
    specs.push(TensorSpec::new("transformer.ln_f.bias", vec![h], None));
    if !c.tie_word_embeddings {
        specs.push(TensorSpec::new("lm_head.weight", vec![c.vocab_size, h], None));
    }
    specs
}
