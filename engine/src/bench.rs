//! `zeroshard bench`: prefill and decode throughput of the engine per batch size,
//! against this machine's memory-bandwidth bound (on a GPU: the device copy
//! bandwidth when weights are resident, the pinned host → device bandwidth for
//! the layers streamed each step).
use std::time::Instant;

use serde::Serialize;
use zeroshard_offload::synthetic::synthetic_config;
use zeroshard_offload::ModelConfig;

use crate::engine::{Engine, GenerationParams, Sequence};
use crate::error::Result;
use crate::model::tensor_specs;
use crate::sampling::SamplingParams;
use crate::weights::HostWeights;
use crate::Backend;

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

/// Multiply-add flops (2 per weight) of the products one decoded token costs: every matrix
/// of every layer, and the head (`vocab × hidden`, tied or not).
pub fn matmul_flops_per_token(config: &ModelConfig) -> f64 {
    layer_flops_per_token(config) + head_flops(config)
}

/// Multiply-add flops of every matrix of every layer, per position.
fn layer_flops_per_token(config: &ModelConfig) -> f64 {
    let layers: usize = tensor_specs(config)
        .iter()
        .filter(|s| s.layer.is_some() && s.shape.len() == 2)
        .map(|s| s.numel())
        .sum();
    2.0 * layers as f64
}

/// Multiply-add flops of the head for one position (a prefill applies it to the last
/// position of each sequence only).
fn head_flops(config: &ModelConfig) -> f64 {
    2.0 * (config.vocab_size * config.hidden_size) as f64
}

/// Attention flops (scores and the weighted sum of values, 4 per key per query channel)
/// of `batch` sequences each computing positions `from..to`.
pub fn attention_flops(config: &ModelConfig, batch: usize, from: usize, to: usize) -> f64 {
    let keys: usize = (from..to).map(|p| config.sliding_window.map_or(p + 1, |w| (p + 1).min(w))).sum();
    4.0 * (batch * keys * config.num_heads * config.head_dim * config.num_layers) as f64
}

/// Measured host memory bandwidth.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth {
    /// `memcpy` of a 256 MiB buffer, bytes copied per second, one thread.
    pub memcpy_gbs: f64,
    /// Reading a 256 MiB buffer with every rayon thread, bytes per second.
    pub read_gbs: f64,
}

/// Measures [`Bandwidth`] over 256 MiB buffers (best of 4 runs).
pub fn measure_bandwidth() -> Bandwidth {
    const BYTES: usize = 256 << 20;
    let src = vec![1u64; BYTES / 8];
    let mut dst = vec![0u64; BYTES / 8];
    let mut memcpy_gbs: f64 = 0.0;
    let mut read_gbs: f64 = 0.0;
    for _ in 0..4 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        memcpy_gbs = memcpy_gbs.max(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
        read_gbs = read_gbs.max(read_rate(&src));
        std::hint::black_box(&dst);
    }
    Bandwidth { memcpy_gbs, read_gbs }
}

/// GB/s every thread of the calling rayon pool reads `src` at, one pass.
fn read_rate(src: &[u64]) -> f64 {
    use rayon::prelude::*;
    let t = Instant::now();
    let sum: u64 = src
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
        .reduce(|| 0, u64::wrapping_add);
    let gbs = std::mem::size_of_val(src) as f64 / t.elapsed().as_secs_f64() / 1e9;
    std::hint::black_box(sum);
    gbs
}

/// What one process computes at, from a short probe (~0.1 s): the FMA peak
/// of its compute threads and the rate they read memory at. A worker runs it
/// once at start and reports it; `--placement auto` predicts from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// Multiply-add GFLOP/s at the f32 FMA peak, every compute thread.
    pub peak_gflops: f64,
    /// GB/s every compute thread reads memory at (a 64 MiB buffer: past the
    /// last-level caches of the machines this runs on).
    pub read_gbs: f64,
}

/// Runs the [`Calibration`] probe in the calling rayon pool.
pub fn calibrate() -> Calibration {
    let peak_gflops = crate::cpu::matmul::peak_gflops(15);
    let src = vec![1u64; (64 << 20) / 8];
    let read_gbs = (0..3).map(|_| read_rate(&src)).fold(0.0, f64::max);
    Calibration { peak_gflops, read_gbs }
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
    /// Achieved GFLOP/s (products and attention) over the measured arithmetic peak, in the
    /// prefill and in decode (0 when no peak was measured).
    pub prefill_flops_ratio: f64,
    pub decode_flops_ratio: f64,
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
    peak_gflops: f64,
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
        let per_token = matmul_flops_per_token(c);
        let prefill_flops = (batch * prompt_len) as f64 * layer_flops_per_token(c)
            + batch as f64 * head_flops(c)
            + attention_flops(c, batch, 0, prompt_len);
        let decode_flops = (batch * new_tokens) as f64 * per_token
            + attention_flops(c, batch, prompt_len, prompt_len + new_tokens);
        let of_peak =
            |flops: f64, secs: f64| if peak_gflops > 0.0 { flops / secs / 1e9 / peak_gflops } else { 0.0 };
        rows.push(BenchRow {
            batch,
            prefill_tokens_per_s: (batch * prompt_len) as f64 / prefill_s,
            decode_tokens_per_s: decode_tps,
            decode_step_ms: decode_s * 1e3 / new_tokens as f64,
            bytes_per_step: bytes,
            bound_ratio: decode_tps / bound,
            prefill_flops_ratio: of_peak(prefill_flops, prefill_s),
            decode_flops_ratio: of_peak(decode_flops, decode_s),
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
    fn decode_reads_every_weight_but_the_unused_embedding_rows() {
        let c = synthetic_config("llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000")
            .expect("valid");
        // 16 layers of (2·1024² + 2·1024·256 + 3·1024·2816) + norms, head, 1 embedding row.
        let per_layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816 + 2 * 1024;
        let expect = 2 * (16 * per_layer + 1024 + 32000 * 1024 + 1024);
        assert_eq!(decode_bytes_per_step(&c, 1), expect);
    }
}
