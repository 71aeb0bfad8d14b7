//! Synthetic models for benchmarks: a config from a short spec
//! ([`synthetic_config`]), deterministic random weights ([`SyntheticWeights`]),
//! and a Hugging Face folder written from them ([`write_synthetic_checkpoint`])
//! for a cluster's workers to map.
//!
//! ```no_run
//! # fn main() -> zeroshard_offload::Result<()> {
//! let config = zeroshard_offload::synthetic::synthetic_config("llama:hidden=256,layers=2,heads=4,ffn=512,vocab=1000")?;
//! zeroshard_offload::synthetic::write_synthetic_checkpoint(&config, std::path::Path::new("/tmp/synthetic"))?;
//! # Ok(()) }
//! ```
use std::io::Write;
use std::path::Path;

use half::f16;
use serde_json::json;

use crate::error::{io_err, OffloadError, Result};
use crate::spec::{tensor_specs, TensorSpec};
use crate::{Architecture, ModelConfig};

/// Parses a synthetic model spec such as
/// `llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000`
/// (optional: `head_dim`, `max_pos`).
pub fn synthetic_config(spec: &str) -> Result<ModelConfig> {
    let bad = |m: String| OffloadError::InvalidRequest(format!("--synthetic {spec:?}: {m}"));
    let (family, rest) = spec.split_once(':').ok_or_else(|| bad("expected FAMILY:key=value,...".into()))?;
    if family != "llama" {
        return Err(bad(format!("family \"{family}\" is not supported (supported: llama)")));
    }
    let mut get = std::collections::HashMap::new();
    for kv in rest.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("\"{kv}\" is not key=value")))?;
        let n: usize = v.parse().map_err(|_| bad(format!("{k}={v} is not a positive integer")))?;
        if n == 0 {
            return Err(bad(format!("{k} must be > 0")));
        }
        if !["hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "head_dim", "max_pos"].contains(&k) {
            return Err(bad(format!("unknown key \"{k}\"")));
        }
        get.insert(k.to_string(), n);
    }
    let need = |k: &str| get.get(k).copied().ok_or_else(|| bad(format!("missing key \"{k}\"")));
    let (hidden, heads) = (need("hidden")?, need("heads")?);
    let kv_heads = get.get("kv_heads").copied().unwrap_or(heads);
    if heads % kv_heads != 0 {
        return Err(bad(format!("kv_heads {kv_heads} does not divide heads {heads}")));
    }
    let c = ModelConfig::synthetic(
        Architecture::Llama,
        hidden,
        need("layers")?,
        heads,
        kv_heads,
        need("ffn")?,
        need("vocab")?,
    );
    Ok(ModelConfig {
        head_dim: get.get("head_dim").copied().unwrap_or(hidden / heads),
        max_position_embeddings: get.get("max_pos").copied().unwrap_or(4096),
        ..c
    })
}

/// Writes `config` as a Hugging Face folder (config.json + one f16
/// model.safetensors) with random weights, tensor by tensor.
pub fn write_synthetic_checkpoint(config: &ModelConfig, dir: &Path) -> Result<u64> {
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope.theta, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    });
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, cfg.to_string()).map_err(io_err(&config_path))?;
    let specs = tensor_specs(config);
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for s in &specs {
        let bytes = s.numel() as u64 * 2;
        header.insert(
            s.name.clone(),
            json!({"dtype": "F16", "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let h = serde_json::to_vec(&header).expect("a JSON map of strings and numbers serialises");
    let path = dir.join("model.safetensors");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        let mut rng = SyntheticWeights::new(1);
        for s in &specs {
            f.write_all(bytemuck::cast_slice(&rng.tensor(s)))?;
        }
        f.flush()
    };
    write().map_err(io_err(&path))?;
    Ok(offset)
}

/// Deterministic random weights for benchmarks: uniform, ±0.035 for matrices,
/// 1 ± 0.1 for norm scales, drawn tensor after tensor from one xorshift64* stream.
pub struct SyntheticWeights {
    state: u64,
}

impl SyntheticWeights {
    pub fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    /// The next tensor of `spec`'s stored shape.
    pub fn tensor(&mut self, spec: &TensorSpec) -> Vec<f16> {
        let is_norm = spec.shape.len() == 1
            && spec.name.ends_with(".weight")
            && (spec.name.contains("norm") || spec.name.contains(".ln_"));
        (0..spec.numel())
            .map(|_| {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let r = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
                let u = (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                f16::from_f32(if is_norm { 1.0 + 0.1 * u } else { 0.035 * u })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synthetic_specs_and_refuses_bad_ones() {
        let c = synthetic_config("llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000")
            .expect("valid");
        assert_eq!((c.head_dim, c.kv_dim(), c.num_layers), (64, 256, 16));
        for bad in [
            "gpt:hidden=1",
            "llama:hidden=64",
            "llama:hidden=x",
            "llama:hidden=64,layers=1,heads=8,kv_heads=3,ffn=1,vocab=1",
            "llama:foo=1",
        ] {
            assert!(synthetic_config(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_written_checkpoint_reads_back_as_the_same_weights() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c =
            synthetic_config("llama:hidden=64,layers=2,heads=4,kv_heads=2,ffn=96,vocab=50").expect("valid");
        let bytes = write_synthetic_checkpoint(&c, dir.path()).expect("written");
        let read = ModelConfig::from_dir(dir.path()).expect("config reads back");
        assert_eq!((read.hidden_size, read.num_layers, read.kv_dim()), (64, 2, 32));
        let ckpt = crate::Checkpoint::open(dir.path()).expect("checkpoint reads back");
        let mut rng = SyntheticWeights::new(1);
        let mut total = 0;
        for s in tensor_specs(&c) {
            assert_eq!(ckpt.read_f16(&s.name, 0..s.numel()).expect("tensor"), rng.tensor(&s), "{}", s.name);
            total += s.numel() as u64 * 2;
        }
        assert_eq!(bytes, total);
    }
}
