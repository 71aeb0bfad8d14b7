//! A host store of named f16 tensors: the whole model for a single node, or the
//! gathered tensors of one layer in the cluster. Tensors live in
//! [`HostBuffer`]s: heap memory, or pinned memory once [`HostWeights::move_to`]
//! a pinned allocator (when a GPU streams them).
use std::collections::HashMap;

use half::f16;
use zeroshard_offload::synthetic::SyntheticWeights;
use zeroshard_offload::{Checkpoint, ModelConfig};

use crate::pinned::{HostAlloc, HostBuffer};

use crate::error::Result;
use crate::model::{tensor_specs, LayerWeights, OuterWeights, TensorSpec};

/// Named f16 tensors in host memory.
#[derive(Default)]
pub struct HostWeights {
    tensors: HashMap<String, HostTensor>,
    /// Second names of held tensors (alias → name).
    aliases: HashMap<String, String>,
}

/// One tensor in compute layout: row-major f16 data.
pub(crate) struct HostTensor {
    pub data: HostBuffer,
}

impl HostWeights {
    /// Loads every tensor `config` needs from `ckpt`, checking the config
    /// against the checkpoint (layer count, then each tensor's stored shape)
    /// before anything is sized by it, and puts each tensor in compute layout.
    pub fn load(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let mut store = Self::default();
        for spec in zeroshard_offload::spec::checked_specs(config, ckpt)? {
            let data = ckpt.read_f16(&spec.name, 0..spec.numel())?;
            store.insert(&spec, data);
        }
        Ok(store)
    }

    /// A model of `config`'s shape with random weights (normal-ish, std `0.02`,
    /// norms near 1), from a fixed seed: for benchmarks without files.
    pub fn random(config: &ModelConfig, seed: u64) -> Self {
        let mut rng = SyntheticWeights::new(seed);
        let mut store = Self::default();
        for spec in tensor_specs(config) {
            let data = rng.tensor(&spec);
            store.insert(&spec, data);
        }
        store
    }

    /// Stores a whole tensor given in its *stored* layout (as loaded or gathered),
    /// rearranged into compute layout ([`TensorSpec::to_compute_layout`]).
    pub fn insert(&mut self, spec: &TensorSpec, stored: Vec<f16>) {
        assert_eq!(stored.len(), spec.numel(), "tensor `{}` data length", spec.name);
        let data = spec.to_compute_layout(stored);
        self.tensors.insert(spec.name.clone(), HostTensor { data: data.into() });
    }

    /// Moves every tensor into memory from `alloc` (pinned host memory for a GPU
    /// that streams the weights), one tensor at a time.
    pub fn move_to(&mut self, alloc: &HostAlloc) {
        for t in self.tensors.values_mut() {
            t.data = alloc.copy_f16(&t.data);
        }
    }

    /// Whether every tensor is in pinned memory.
    pub fn is_pinned(&self) -> bool {
        self.tensors.values().all(|t| t.data.is_pinned() || t.data.is_empty())
    }

    pub fn get(&self, name: &str) -> Option<&[f16]> {
        let name = self.aliases.get(name).map_or(name, String::as_str);
        self.tensors.get(name).map(|t| &t.data[..])
    }

    /// Makes `alias` name the tensor `target` too (a lookup that names a tensor
    /// the computation at hand never reads, without holding a copy).
    pub fn alias(&mut self, alias: &str, target: &str) {
        self.aliases.insert(alias.to_string(), target.to_string());
    }

    /// Total bytes held.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.data.len() * 2).sum()
    }

    pub fn layer(&self, config: &ModelConfig, l: usize) -> Result<LayerWeights<'_, [f16]>> {
        LayerWeights::from_lookup(config, l, |n| Ok(self.get(n)))
    }

    pub fn outer(&self, config: &ModelConfig) -> Result<OuterWeights<'_, [f16]>> {
        OuterWeights::from_lookup(config, |n| Ok(self.get(n)))
    }
}
