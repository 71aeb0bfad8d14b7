//! The tensors a model needs: names and shapes as stored in the checkpoint, and
//! how each becomes the layout the model computes with.
//!
//! The partitioner splits *stored* elements, so a spec always describes the
//! tensor as the checkpoint holds it. Layout changes ([`Layout`]) apply to the
//! whole tensor once it is loaded or gathered ([`TensorSpec::to_compute_layout`]).
mod bloom;
mod checked;
mod gpt2;
mod llama;

pub use checked::{checked_specs, stored_layers};

use crate::plan::TensorMeta;
use crate::{Architecture, ModelConfig};

/// One tensor of the model as stored in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// Row-major shape as stored.
    pub shape: Vec<usize>,
    /// The decoder layer it belongs to; `None` for embedding, final norm, head.
    pub layer: Option<usize>,
    /// How the stored tensor becomes the compute layout.
    pub layout: Layout,
}

/// How a stored tensor is rearranged before the model uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Used as stored (`[out, in]` for a linear weight).
    AsStored,
    /// A GPT-2 `Conv1D` weight stored `[in, out]`: transposed to `[out, in]`.
    Transposed,
    /// A BLOOM fused `query_key_value` weight `[heads * 3 * head_dim, in]` or bias
    /// `[heads * 3 * head_dim]`, stored per head (`[heads, 3, head_dim, …]`):
    /// regrouped to q rows, then k rows, then v rows (`[3, heads, head_dim, …]`).
    QkvPerHead { heads: usize, head_dim: usize },
}

impl TensorSpec {
    pub(crate) fn new(name: impl Into<String>, shape: Vec<usize>, layer: Option<usize>) -> Self {
        Self { name: name.into(), shape, layer, layout: Layout::AsStored }
    }

    pub(crate) fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The shape the model computes with.
    pub fn compute_shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::Transposed => vec![self.shape[1], self.shape[0]],
            Layout::AsStored | Layout::QkvPerHead { .. } => self.shape.clone(),
        }
    }

    /// Rearranges the whole stored tensor into the compute layout.
    pub fn to_compute_layout<T: Copy>(&self, stored: Vec<T>) -> Vec<T> {
        assert_eq!(stored.len(), self.numel(), "tensor `{}`: data length", self.name);
        match self.layout {
            Layout::AsStored => stored,
            Layout::Transposed => {
                let (rows, cols) = (self.shape[0], self.shape[1]); // stored [in, out]
                let mut out = Vec::with_capacity(stored.len());
                for c in 0..cols {
                    out.extend((0..rows).map(|r| stored[r * cols + c]));
                }
                out
            }
            Layout::QkvPerHead { heads, head_dim } => {
                let inner = stored.len() / (heads * 3 * head_dim); // `in` for a weight, 1 for a bias
                let mut out = Vec::with_capacity(stored.len());
                for part in 0..3 {
                    for head in 0..heads {
                        let row = (head * 3 + part) * head_dim;
                        out.extend_from_slice(&stored[row * inner..(row + head_dim) * inner]);
                    }
                }
                out
            }
        }
    }
}

/// Every tensor the model reads, in forward order.
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    match c.architecture {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => llama::tensor_specs(c),
        Architecture::Gpt2 => gpt2::tensor_specs(c),
        Architecture::Bloom => bloom::tensor_specs(c),
    }
}

/// What the planner needs of a tensor: its stored name and shape, its layer.
impl From<&TensorSpec> for TensorMeta {
    fn from(s: &TensorSpec) -> Self {
        TensorMeta::new(
            s.name.clone(),
            s.shape.iter().map(|&d| d as u64).collect(),
            s.layer.map(|l| l as u32),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, Placement, PlanOptions, WorkerId};
    use crate::Checkpoint;
    use std::path::{Path, PathBuf};

    /// The shared folder: `$ZEROSHARD_SHARED`, else `../../shared` from this crate.
    fn shared_dir() -> PathBuf {
        std::env::var_os("ZEROSHARD_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
    }

    #[test]
    fn specs_list_exactly_the_stored_tensors_of_the_fixtures() {
        for model in [
            "fixtures/gpt2",
            "fixtures/bloom",
            "tiny-random-gpt2",
            "fixtures/llama-gqa-tied",
            "fixtures/llama-rope-scaled",
            "fixtures/qwen2",
            "fixtures/mistral",
        ] {
            let dir = shared_dir().join("models").join(model);
            assert!(dir.is_dir(), "test fixture {} is missing (set ZEROSHARD_SHARED)", dir.display());
            let config = ModelConfig::from_dir(&dir).expect("config");
            let ckpt = Checkpoint::open(&dir).expect("checkpoint");
            let specs = tensor_specs(&config);
            for s in &specs {
                ckpt.expect_shape(&s.name, &s.shape).unwrap_or_else(|e| panic!("{model}: {e}"));
            }
            let mut stored: Vec<&str> = ckpt.tensors().map(|t| t.name.as_str()).collect();
            let mut listed: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            stored.sort_unstable();
            listed.sort_unstable();
            assert_eq!(stored, listed, "{model}");
        }
    }

    #[test]
    fn checked_specs_compare_the_layer_count_first() {
        let dir = shared_dir().join("models/stories260K");
        let ckpt = Checkpoint::open(&dir).expect("checkpoint");
        let good = ModelConfig::from_dir(&dir).expect("config");
        assert_eq!(checked_specs(&good, &ckpt).expect("matches"), tensor_specs(&good));
        for (layers, needle) in
            [(1_000_000_000, "1000000000 layers, but the checkpoint holds 5 layers (0..=4)"), (4, "4 layers")]
        {
            let c = ModelConfig { num_layers: layers, ..good.clone() };
            let e = checked_specs(&c, &ckpt).expect_err("must refuse").to_string();
            assert!(e.contains("`num_hidden_layers`") && e.contains(needle), "{e}");
        }
        let c = ModelConfig { vocab_size: 7, ..good };
        let e = checked_specs(&c, &ckpt).expect_err("must refuse").to_string();
        assert!(e.contains("model.embed_tokens.weight"), "{e}");
    }

    #[test]
    fn transposed_turns_in_out_into_out_in() {
        // Stored [in 2, out 3].
        let s = TensorSpec::new("w", vec![2, 3], None).with_layout(Layout::Transposed);
        assert_eq!(s.compute_shape(), vec![3, 2]);
        assert_eq!(s.to_compute_layout(vec![1, 2, 3, 4, 5, 6]), vec![1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn qkv_per_head_groups_q_then_k_then_v() {
        // 2 heads, head_dim 1, in 2: stored rows q0 k0 v0 q1 k1 v1.
        let layout = Layout::QkvPerHead { heads: 2, head_dim: 1 };
        let w = TensorSpec::new("w", vec![6, 2], None).with_layout(layout);
        let stored = vec![10, 11, 20, 21, 30, 31, 12, 13, 22, 23, 32, 33];
        assert_eq!(w.to_compute_layout(stored), vec![10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]);
        // 1 head of head_dim 2 is already q|k|v; a bias of 2 heads, head_dim 2.
        let b =
            TensorSpec::new("b", vec![12], None).with_layout(Layout::QkvPerHead { heads: 2, head_dim: 2 });
        let stored: Vec<u32> = (0..12).collect(); // q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1
        assert_eq!(b.to_compute_layout(stored), vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        assert_eq!(b.compute_shape(), vec![12]);
    }

    #[test]
    fn plans_a_real_model_from_its_tensor_specs() {
        let dir = shared_dir().join("models/stories260K");
        let config = crate::ModelConfig::from_dir(&dir).expect("stories260K config");
        let specs = tensor_specs(&config);
        let meta: Vec<TensorMeta> = specs.iter().map(TensorMeta::from).collect();
        assert_eq!(meta.len(), specs.len());
        for n in 1..=4u64 {
            let workers: Vec<WorkerId> = (1..=n).map(WorkerId).collect();
            let options = PlanOptions { persistence_threshold_bytes: 1024, ..Default::default() };
            let p = plan(&meta, &workers, &options).expect("plan");
            let norm = p.tensor("model.norm.weight").expect("final norm");
            assert_eq!(norm.placement, Placement::Persistent);
            let embed = p.tensor("model.embed_tokens.weight").expect("embedding");
            assert_eq!(embed.placement, Placement::Partitioned);
            assert_eq!(embed.meta.layer, None);
            let layer0: Vec<_> = p.tensors().iter().filter(|t| t.meta.layer == Some(0)).collect();
            assert!(!layer0.is_empty());
            // Each worker owns (partitioned bytes) / N ± one block per tensor
            // (every tensor of this model is smaller than a block: whole tensors).
            let model = p.model_bytes();
            let slack: u64 = p
                .tensors()
                .iter()
                .filter(|t| t.placement == Placement::Partitioned)
                .map(|t| (t.numel() * 2).min(crate::digest::BLOCK_BYTES as u64))
                .sum();
            for &w in &workers {
                let b = p.owned_bytes(w).expect("known");
                let ideal = model.partitioned as f64 / n as f64;
                assert!((b.partitioned as f64 - ideal).abs() <= slack as f64);
                assert_eq!(b.persistent, model.persistent);
            }
        }
    }
}
