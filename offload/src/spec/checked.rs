//! A config checked against the checkpoint it came with, before any list is
//! sized by the config's numbers.
use std::collections::BTreeSet;

use super::{tensor_specs, TensorSpec};
use crate::error::{OffloadError, Result};
use crate::{Architecture, Checkpoint, ModelConfig};

/// The stored name prefix of decoder layer `i` is `{prefix}{i}.`.
fn layer_prefix(a: Architecture) -> &'static str {
    match a {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => "model.layers.",
        Architecture::Gpt2 | Architecture::Bloom => "transformer.h.",
    }
}

/// The layer indices the checkpoint's tensor names hold (at most one per tensor).
pub fn stored_layers(a: Architecture, ckpt: &Checkpoint) -> BTreeSet<usize> {
    let prefix = layer_prefix(a);
    ckpt.tensors()
        .filter_map(|t| {
            let (index, _) = t.name.strip_prefix(prefix)?.split_once('.')?;
            index.bytes().all(|b| b.is_ascii_digit()).then(|| index.parse().ok())?
        })
        .collect()
}

/// [`tensor_specs`] of `config`, each checked against `ckpt` (present, with the
/// stored shape). The layer count is compared with the layers the checkpoint
/// holds first, so a config claiming a billion layers is refused before a
/// billion specs are built.
pub fn checked_specs(config: &ModelConfig, ckpt: &Checkpoint) -> Result<Vec<TensorSpec>> {
    let layers = stored_layers(config.architecture, ckpt);
    let contiguous = layers.last().is_none_or(|last| last + 1 == layers.len());
    if config.num_layers != layers.len() || !contiguous {
        let held = match (layers.first(), layers.last()) {
            (Some(first), Some(last)) if contiguous => format!("{} layers ({first}..={last})", layers.len()),
            (Some(first), Some(last)) => format!("{} layers with gaps ({first}..={last})", layers.len()),
            _ => "no layers".to_string(),
        };
        let key = match config.architecture {
            Architecture::Gpt2 | Architecture::Bloom => "n_layer",
            _ => "num_hidden_layers",
        };
        return Err(OffloadError::Config {
            path: ckpt.dir().join("config.json"),
            key: key.to_string(),
            message: format!("{} layers, but the checkpoint holds {held}", config.num_layers),
        });
    }
    let specs = tensor_specs(config);
    for s in &specs {
        ckpt.expect_shape(&s.name, &s.shape)?;
    }
    Ok(specs)
}
