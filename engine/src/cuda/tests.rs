//! Every CUDA op against the CPU backend (the reference), then whole models:
//! resident, streamed through the ring, and CPU logits. Each test runs where a
//! CUDA device is present and is skipped, saying why, where it is not.
use std::sync::Arc;

use half::f16;
use zeroshard_offload::{Architecture, ModelConfig};

use super::*;
use crate::backend::Backend;
use crate::cpu::{CpuBackend, CpuKvCache, CpuTensor};
use crate::engine::{Engine, GenerationParams};
use crate::error::{EngineError, Result};
use crate::sampling::SamplingParams;
use zeroshard_offload::spec::{Layout, TensorSpec};

fn gpu(opts: CudaOptions) -> Option<CudaBackend> {
    match probe() {
        CudaProbe::Devices(_) => {
            Some(CudaBackend::new(&opts).expect("a CUDA device is present: the backend must open"))
        }
        CudaProbe::Unavailable(why) => {
            eprintln!("no CUDA device: {why}; skipping");
            None
        }
    }
}

/// Deterministic values in [-scale, scale], exactly representable in f16.
fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            f16::from_f32(u * scale).to_f32()
        })
        .collect()
}

fn h(v: &[f32]) -> Vec<f16> {
    v.iter().map(|x| f16::from_f32(*x)).collect()
}

/// A host store of 1-D tensors by name, staged whole on the device.
fn staged(b: &CudaBackend, tensors: &[(&str, &[f32])]) -> (Arc<HostWeights>, CudaStaged) {
    let mut w = HostWeights::default();
    let mut names = Vec::new();
    for (name, data) in tensors {
        let spec = TensorSpec {
            name: name.to_string(),
            shape: vec![data.len()],
            layer: None,
            layout: Layout::AsStored,
        };
        w.insert(&spec, h(data));
        names.push(name.to_string());
    }
    let w = Arc::new(w);
    let s = b.stage(&w, Piece::Head, &names).expect("stage");
    (w, s)
}

/// Tensor `name` of a staged piece.
fn weight<'a>(b: &CudaBackend, s: &'a CudaStaged, name: &str) -> Result<&'a CudaWeight> {
    Ok(b.weight(s, name)?.expect("staged"))
}

/// `cuda` within f16 rounding of `cpu`: 4e-3 of the larger of 1 and the value.
fn close(what: &str, cuda: &[f32], cpu: &[f32]) {
    assert_eq!(cuda.len(), cpu.len(), "{what}: length");
    for (i, (a, e)) in cuda.iter().zip(cpu).enumerate() {
        assert!((a - e).abs() <= 4e-3 * e.abs().max(1.0), "{what}[{i}]: cuda {a} vs cpu {e}");
    }
}

fn pair(b: &CudaBackend, data: &[f32], rows: usize, cols: usize) -> Result<(CudaTensor, CpuTensor)> {
    Ok((b.tensor_from_host(data, rows, cols)?, CpuTensor::new(data.to_vec(), rows, cols)))
}

#[test]
fn elementwise_ops_match_the_cpu() -> Result<()> {
    let Some(b) = gpu(CudaOptions::resident(0)) else { return Ok(()) };
    let cpu = CpuBackend::new();
    let (rows, cols) = (3, 1000);
    let (x, xc) = pair(&b, &vals(rows * cols, 1, 4.0), rows, cols)?;
    let (y, yc) = pair(&b, &vals(rows * cols, 2, 4.0), rows, cols)?;
    close("silu_mul", &b.to_host(&b.silu_mul(&x, &y)?)?, &cpu.silu_mul(&xc, &yc)?.data);
    close("gelu_tanh", &b.to_host(&b.gelu_tanh(&x)?)?, &cpu.gelu_tanh(&xc)?.data);
    let (mut x2, mut xc2) = pair(&b, &vals(rows * cols, 1, 4.0), rows, cols)?;
    b.add_assign(&mut x2, &y)?;
    cpu.add_assign(&mut xc2, &yc)?;
    close("add_assign", &b.to_host(&x2)?, &xc2.data);
    Ok(())
}

#[test]
fn row_ops_match_the_cpu() -> Result<()> {
    let Some(b) = gpu(CudaOptions::resident(0)) else { return Ok(()) };
    let cpu = CpuBackend::new();
    let (vocab, dim) = (50, 72);
    let table = vals(vocab * dim, 3, 1.0);
    let pos_table = vals(16 * dim, 4, 1.0);
    let (_w, s) = staged(&b, &[("table", &table), ("pos", &pos_table)]);
    let ids = [7u32, 0, 49, 7];
    let mut e = b.embed(weight(&b, &s, "table")?, &ids, dim)?;
    let mut ec = cpu.embed(&h(&table), &ids, dim)?;
    close("embed", &b.to_host(&e)?, &ec.data);
    b.add_position_embeddings(&mut e, weight(&b, &s, "pos")?, &[3, 15, 0, 4])?;
    cpu.add_position_embeddings(&mut ec, &h(&pos_table), &[3, 15, 0, 4])?;
    close("add_position_embeddings", &b.to_host(&e)?, &ec.data);
    let refused = b.add_position_embeddings(&mut e, weight(&b, &s, "pos")?, &[3, 16, 0, 4]);
    assert!(matches!(refused, Err(EngineError::InvalidRequest(_))), "{refused:?}");
    let picked = [3, 0, 3];
    close("select_rows", &b.to_host(&b.select_rows(&e, &picked)?)?, &cpu.select_rows(&ec, &picked)?.data);
    let widths = [8, 40, 24];
    for (i, (p, pc)) in b.split_cols(&e, &widths)?.iter().zip(cpu.split_cols(&ec, &widths)?).enumerate() {
        close(&format!("split_cols[{i}]"), &b.to_host(p)?, &pc.data);
    }
    Ok(())
}

#[test]
fn norms_and_rope_match_the_cpu() -> Result<()> {
    let Some(b) = gpu(CudaOptions::resident(0)) else { return Ok(()) };
    let cpu = CpuBackend::new();
    let (rows, cols, hd) = (5, 96, 32);
    let (w, bias) = (vals(cols, 5, 1.5), vals(cols, 6, 0.5));
    let (_host, s) = staged(&b, &[("w", &w), ("b", &bias)]);
    let (x, xc) = pair(&b, &vals(rows * cols, 7, 3.0), rows, cols)?;
    let (ww, bb) = (weight(&b, &s, "w")?, weight(&b, &s, "b")?);
    close("rms_norm", &b.to_host(&b.rms_norm(&x, ww, 1e-5)?)?, &cpu.rms_norm(&xc, &h(&w), 1e-5)?.data);
    let ln = b.to_host(&b.layer_norm(&x, ww, bb, 1e-5)?)?;
    close("layer_norm", &ln, &cpu.layer_norm(&xc, &h(&w), &h(&bias), 1e-5)?.data);
    let half = hd / 2;
    let angles: Vec<f32> = (0..rows * half).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    let (mut r, mut rc) = pair(&b, &vals(rows * cols, 8, 2.0), rows, cols)?;
    b.rope(&mut r, hd, &cos, &sin)?;
    cpu.rope(&mut rc, hd, &cos, &sin)?;
    close("rope", &b.to_host(&r)?, &rc.data);
    Ok(())
}

#[test]
fn linear_matches_the_cpu_with_and_without_bias() -> Result<()> {
    let Some(b) = gpu(CudaOptions::resident(0)) else { return Ok(()) };
    let cpu = CpuBackend::new();
    for (rows, inp, out) in [(1, 64, 48), (5, 100, 37), (33, 256, 512)] {
        let (w, bias) = (vals(out * inp, 9, 0.1), vals(out, 10, 0.5));
        let (_host, s) = staged(&b, &[("w", &w), ("b", &bias)]);
        let (x, xc) = pair(&b, &vals(rows * inp, 11, 1.0), rows, inp)?;
        let (ww, bb) = (weight(&b, &s, "w")?, weight(&b, &s, "b")?);
        let got = b.to_host(&b.linear(&x, ww, None, out)?)?;
        close("linear", &got, &cpu.linear(&xc, &h(&w), None, out)?.data);
        let got = b.to_host(&b.linear(&x, ww, Some(bb), out)?)?;
        close("linear+bias", &got, &cpu.linear(&xc, &h(&w), Some(&h(&bias)), out)?.data);
    }
    Ok(())
}

/// Two sequences (one with a cached past), prefill then a decode step, for each
/// kind of attention: plain GQA, sliding window, ALiBi.
#[test]
fn attention_over_the_cache_matches_the_cpu() -> Result<()> {
    let Some(b) = gpu(CudaOptions::resident(0)) else { return Ok(()) };
    let cpu = CpuBackend::new();
    let slopes = crate::model::alibi_slopes(6);
    // (heads, kv heads, head_dim, sliding window, ALiBi slopes)
    type Case<'a> = (usize, usize, usize, Option<usize>, Option<&'a [f32]>);
    let cases: [Case<'_>; 4] = [
        (4, 2, 16, None, None),
        (4, 1, 64, Some(3), None),
        (6, 6, 8, None, Some(&slopes)),
        (2, 2, 256, None, None),
    ];
    for (heads, kv_heads, hd, window, alibi) in cases {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            sliding_window: window,
            alibi_slopes: alibi,
        };
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let mut caches = [b.new_kv_cache(2, kvd, 0), b.new_kv_cache(2, kvd, 0)];
        let mut cpu_caches = [cpu.new_kv_cache(2, kvd, 0), cpu.new_kv_cache(2, kvd, 0)];
        // Step 1: 5 and 300 new tokens (past the 256-key chunk); step 2: one token each.
        for (step, lens) in [[5usize, 300], [1, 1]].iter().enumerate() {
            let past: Vec<usize> = caches.iter().map(|c| b.kv_len(c)).collect();
            let layout = BatchLayout::new(lens.iter().copied().zip(past));
            let rows = layout.rows();
            let seed = 20 + step as u64;
            let (q, qc) = pair(&b, &vals(rows * qd, seed, 1.0), rows, qd)?;
            let (k, kc) = pair(&b, &vals(rows * kvd, seed + 1, 1.0), rows, kvd)?;
            let (v, vc) = pair(&b, &vals(rows * kvd, seed + 2, 1.0), rows, kvd)?;
            for layer in 0..2 {
                let [c0, c1] = &mut caches;
                let got = b.attention(&q, &k, &v, &mut [c0, c1], layer, &layout, shape)?;
                let [p0, p1]: &mut [CpuKvCache; 2] = &mut cpu_caches;
                let want = cpu.attention(&qc, &kc, &vc, &mut [p0, p1], layer, &layout, shape)?;
                close(
                    &format!("attention {heads}/{kv_heads}×{hd} w{window:?} step {step} layer {layer}"),
                    &b.to_host(&got)?,
                    &want.data,
                );
            }
        }
        assert_eq!(b.kv_len(&caches[1]), 301);
    }
    Ok(())
}

fn config(architecture: Architecture, heads: usize, kv_heads: usize) -> ModelConfig {
    let hidden = 16 * heads;
    ModelConfig {
        max_position_embeddings: 64,
        tie_word_embeddings: architecture != Architecture::Llama,
        qkv_bias: architecture != Architecture::Llama,
        o_bias: architecture != Architecture::Llama,
        mlp_bias: architecture != Architecture::Llama,
        bos_token_id: None,
        eos_token_ids: vec![],
        ..ModelConfig::synthetic(architecture, hidden, 3, heads, kv_heads, 3 * hidden, 97)
    }
}

/// Prefill of two prompts, then decode steps: CUDA logits within 1% of the
/// largest CPU logit, and the same greedy tokens.
fn model_matches_the_cpu(c: ModelConfig, opts: CudaOptions) {
    let Some(b) = gpu(opts) else { return };
    let weights = Arc::new(HostWeights::random(&c, 3));
    let cpu = Engine::with_shared_weights(CpuBackend::new(), c.clone(), weights.clone());
    let cuda = Engine::with_shared_weights(b, c, weights);
    let params =
        GenerationParams { sampling: SamplingParams::default(), max_new_tokens: 6, ignore_eos: true };
    let prompts = [vec![5u32, 17, 3, 88, 41], vec![9, 2]];
    let mut a: Vec<_> =
        prompts.iter().map(|p| cpu.new_sequence(p.clone(), params.clone()).expect("seq")).collect();
    let mut g: Vec<_> =
        prompts.iter().map(|p| cuda.new_sequence(p.clone(), params.clone()).expect("seq")).collect();
    for step in 0..6 {
        let (ta, la) = cpu.step_with_logits(&mut a.iter_mut().collect::<Vec<_>>(), true).expect("cpu step");
        let (tg, lg) = cuda.step_with_logits(&mut g.iter_mut().collect::<Vec<_>>(), true).expect("cuda step");
        for (want, got) in la.iter().zip(&lg) {
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = want.iter().zip(got).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 0.01 * scale, "step {step}: logits off by {err} (scale {scale})");
        }
        assert_eq!(ta, tg, "step {step}: greedy tokens");
    }
}

#[test]
fn llama_gqa_matches_the_cpu_resident() {
    model_matches_the_cpu(config(Architecture::Llama, 4, 2), CudaOptions::resident(0));
}

#[test]
fn llama_streamed_through_the_ring_matches_the_cpu() {
    let c = config(Architecture::Llama, 4, 2);
    let slot = layer_bytes(&c).into_iter().max().expect("layers");
    for prefetch in [0, 1, 2] {
        let opts =
            CudaOptions { ordinal: 0, max_live_layer_bytes: 0, prefetch_layers: prefetch, slot_bytes: slot };
        model_matches_the_cpu(c.clone(), opts);
    }
    // One layer resident, the others streamed.
    let opts = CudaOptions { ordinal: 0, max_live_layer_bytes: slot, prefetch_layers: 1, slot_bytes: slot };
    model_matches_the_cpu(c, opts);
}

#[test]
fn gpt2_and_bloom_match_the_cpu() {
    model_matches_the_cpu(config(Architecture::Gpt2, 4, 4), CudaOptions::resident(0));
    model_matches_the_cpu(config(Architecture::Bloom, 6, 6), CudaOptions::resident(0));
}

#[test]
fn layer_bytes_pack_each_tensor_aligned() {
    let c = config(Architecture::Llama, 4, 2); // hidden 64, kv 32, ffn 192: all multiples of 128 elements
                                               // Two norms [64] (128 bytes, each rounded up to 256), q and o [64, 64], k and v
                                               // [32, 64], gate, up and down [192, 64] or [64, 192].
    let per = 2 * 256 + 2 * (64 * 64 * 2) + 2 * (32 * 64 * 2) + 3 * (192 * 64 * 2);
    assert_eq!(layer_bytes(&c), vec![per; 3]);
}
