//! Causal grouped-query attention over each sequence's KV cache (CPU).
use rayon::prelude::*;

use super::{ops, CpuKvCache, CpuTensor, PARALLEL_MIN_WORK};
use crate::backend::{AttentionShape, BatchLayout};

/// Appends this step's `k`, `v` (`[rows, kv_dim]`) to the caches, then computes
/// `softmax(q·kᵀ / √d) · v` per head over positions `0..=pos` (or the sliding
/// window) of the row's own sequence. Returns `[rows, heads * head_dim]`.
pub fn attention(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    caches: &mut [&mut CpuKvCache],
    layer: usize,
    layout: &BatchLayout,
    shape: AttentionShape,
) -> CpuTensor {
    let hd = shape.head_dim;
    let kv_dim = shape.num_kv_heads * hd;
    let q_dim = shape.num_heads * hd;
    assert_eq!(caches.len(), layout.seqs.len(), "one cache per sequence");
    for (cache, slot) in caches.iter_mut().zip(&layout.seqs) {
        let rows = slot.start * kv_dim..(slot.start + slot.len) * kv_dim;
        cache.k[layer].extend_from_slice(&k.data[rows.clone()]);
        cache.v[layer].extend_from_slice(&v.data[rows]);
    }
    // Which sequence and position each row is.
    let mut row_info = Vec::with_capacity(q.rows);
    let mut work = 0usize;
    for (s, slot) in layout.seqs.iter().enumerate() {
        for i in 0..slot.len {
            row_info.push((s, slot.past + i));
            work += (slot.past + i + 1) * q_dim * 2;
        }
    }
    let caches: Vec<&CpuKvCache> = caches.iter().map(|c| &**c).collect();
    let mut out = vec![0f32; q.rows * q_dim];
    let scale = 1.0 / (hd as f32).sqrt();
    let group = shape.num_heads / shape.num_kv_heads;
    let one_row = |(r, o): (usize, &mut [f32])| {
        let (s, pos) = row_info[r];
        let lo = shape.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let (ck, cv) = (&caches[s].k[layer], &caches[s].v[layer]);
        let mut scores = vec![0f32; pos + 1 - lo];
        for h in 0..shape.num_heads {
            let qh = &q.data[r * q_dim + h * hd..r * q_dim + (h + 1) * hd];
            let kvh = (h / group) * hd;
            for (j, sc) in (lo..=pos).zip(scores.iter_mut()) {
                let kj = &ck[j * kv_dim + kvh..j * kv_dim + kvh + hd];
                *sc = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            ops::softmax(&mut scores);
            let oh = &mut o[h * hd..(h + 1) * hd];
            for (j, p) in (lo..=pos).zip(&scores) {
                let vj = &cv[j * kv_dim + kvh..j * kv_dim + kvh + hd];
                oh.iter_mut().zip(vj).for_each(|(a, b)| *a += p * b);
            }
        }
    };
    if work >= PARALLEL_MIN_WORK && q.rows > 1 || work >= 4 * PARALLEL_MIN_WORK {
        out.par_chunks_mut(q_dim).enumerate().for_each(one_row);
    } else {
        out.chunks_mut(q_dim).enumerate().for_each(one_row);
    }
    CpuTensor::new(out, q.rows, q_dim)
}
