//! `zeroshard bench`: prefill and decode throughput of the engine per batch size,
//! against this machine's memory-bandwidth bound (on a GPU: the device copy
//! bandwidth when weights are resident, the pinned host → device bandwidth for
//! the layers streamed each step).
use std::time::Instant;

use serde::Serialize;
use zeroshard_offload::{Architecture, ModelConfig};
use zeroshard_worker::engine::{Engine, GenerationParams, Sequence};
use zeroshard_worker::model::tensor_specs;
use zeroshard_worker::sampling::SamplingParams;
use zeroshard_worker::weights::HostWeights;
use zeroshard_worker::Backend;

use crate::error::{CoordinatorError, Result};

/// Parses a synthetic model spec such as
/// `llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000`
/// (optional: `head_dim`, `max_pos`).
pub fn synthetic_config(spec: &str) -> Result<ModelConfig> {
    let bad = |m: String| CoordinatorError::InvalidRequest(format!("--synthetic {spec:?}: {m}"));
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

/// Bytes of weights one decode step reads: every tensor except the embedding
/// table, of which only one row per sequence is read (the head still reads the
/// whole table when it is tied).
pub fn decode_bytes_per_step(config: &ModelConfig, batch: usize) -> usize {
    tensor_specs(config)
        .iter()
        .map(|s| {
            if s.name == "model.embed_tokens.weight" {
                if config.tie_word_embeddings {
                    s.numel() * 2
                } else {
                    batch * config.hidden_size * 2
                }
            } else {
                s.numel() * 2
            }
        })
        .sum()
}

/// Measured host memory bandwidth.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth {
    /// `memcpy` of a 256 MiB buffer, bytes copied per second, one thread.
    pub memcpy_gbs: f64,
    /// Reading a 256 MiB buffer with every rayon thread, bytes per second.
    pub read_gbs: f64,
}

/// Measures [`Bandwidth`] (best of a few runs).
pub fn measure_bandwidth() -> Bandwidth {
    use rayon::prelude::*;
    const BYTES: usize = 256 << 20;
    let src = vec![1u64; BYTES / 8];
    let mut dst = vec![0u64; BYTES / 8];
    let mut memcpy_gbs: f64 = 0.0;
    let mut read_gbs: f64 = 0.0;
    for _ in 0..4 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        memcpy_gbs = memcpy_gbs.max(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        let sum: u64 = src
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .reduce(|| 0, u64::wrapping_add);
        read_gbs = read_gbs.max(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box((sum, &dst));
    }
    Bandwidth { memcpy_gbs, read_gbs }
}

/// One row of the bench table.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub batch: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub decode_step_ms: f64,
    pub bytes_per_step: usize,
    /// Decode tokens/s over the bandwidth bound (`batch · read_gbs / bytes_per_step`).
    pub bound_ratio: f64,
    /// Host → device bytes per decode step (layers streamed to a GPU), and the
    /// step time they bound: `streamed_bytes_per_step / pinned host → device bandwidth`.
    pub streamed_bytes_per_step: u64,
    pub streamed_bound_ms: f64,
}

/// Runs prefill (`prompt_len` tokens per sequence, batched) and `new_tokens`
/// decode steps for each batch size.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    bw: Bandwidth,
    streamed: Streamed,
) -> Result<Vec<BenchRow>> {
    let c = engine.config();
    let params = GenerationParams {
        sampling: SamplingParams::default(),
        max_new_tokens: new_tokens + 1,
        ignore_eos: true,
    };
    let mut rows = Vec::new();
    for &batch in batches {
        let mut seqs: Vec<Sequence<B>> = (0..batch)
            .map(|b| {
                let prompt = (0..prompt_len)
                    .map(|i| ((b * 7919 + i * 104_729 + 3) % (c.vocab_size - 3) + 3) as u32)
                    .collect();
                engine.new_sequence(prompt, params.clone())
            })
            .collect::<std::result::Result<_, _>>()?;
        let mut all: Vec<&mut Sequence<B>> = seqs.iter_mut().collect();
        let t = Instant::now();
        engine.step(&mut all)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..new_tokens {
            engine.step(&mut all)?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        let bytes = decode_bytes_per_step(c, batch);
        let decode_tps = (batch * new_tokens) as f64 / decode_s;
        let bound = batch as f64 * bw.read_gbs * 1e9 / bytes as f64;
        rows.push(BenchRow {
            batch,
            prefill_tokens_per_s: (batch * prompt_len) as f64 / prefill_s,
            decode_tokens_per_s: decode_tps,
            decode_step_ms: decode_s * 1e3 / new_tokens as f64,
            bytes_per_step: bytes,
            bound_ratio: decode_tps / bound,
            streamed_bytes_per_step: streamed.bytes_per_step,
            streamed_bound_ms: if streamed.h2d_gbs > 0.0 {
                streamed.bytes_per_step as f64 / (streamed.h2d_gbs * 1e9) * 1e3
            } else {
                0.0
            },
        });
    }
    Ok(rows)
}

/// Weights copied host → device each decode step, and the bandwidth they move at.
#[derive(Clone, Copy, Debug, Default)]
pub struct Streamed {
    pub bytes_per_step: u64,
    /// Pinned host → device, GB/s (0: nothing measured).
    pub h2d_gbs: f64,
}

/// A random-weight model for a synthetic spec.
pub fn synthetic_model(spec: &str) -> Result<(ModelConfig, HostWeights)> {
    let config = synthetic_config(spec)?;
    let weights = HostWeights::random(&config, 1);
    Ok((config, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synthetic_specs() {
        let c = synthetic_config("llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000")
            .expect("valid");
        assert_eq!((c.head_dim, c.kv_dim(), c.num_layers), (64, 256, 16));
        // 16 layers of (2·1024² + 2·1024·256 + 3·1024·2816) + norms, head, 1 embedding row.
        let per_layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816 + 2 * 1024;
        let expect = 2 * (16 * per_layer + 1024 + 32000 * 1024 + 1024);
        assert_eq!(decode_bytes_per_step(&c, 1), expect);
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
}
