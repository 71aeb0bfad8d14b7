//! Causal grouped-query attention over each sequence's KV cache (CPU).
use rayon::prelude::*;

use super::{ops, CpuKvCache, CpuTensor, PARALLEL_MIN_WORK};
use crate::backend::{AttentionShape, BatchLayout};

/// Appends this step's `k`, `v` (`[rows, kv_dim]`) to the caches, then computes
/// `softmax(q·kᵀ / √d + slope_h · j) · v` per head over key positions
/// `j ∈ 0..=pos` (or the sliding window) of the row's own sequence; the ALiBi term
/// is there only with `shape.alibi_slopes` (as BLOOM's `baddbmm`: scaled score plus
/// `slope · j`, `j` the absolute key position). Returns `[rows, heads * head_dim]`.
pub(super) fn attention(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    caches: &mut [&mut CpuKvCache],
    layer: usize,
    layout: &BatchLayout,
    shape: AttentionShape<'_>,
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
    if let Some(slopes) = shape.alibi_slopes {
        assert_eq!(slopes.len(), shape.num_heads, "one ALiBi slope per head");
    }
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
            if let Some(slopes) = shape.alibi_slopes {
                let slope = slopes[h];
                for (j, sc) in (lo..=pos).zip(scores.iter_mut()) {
                    *sc += slope * j as f32;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(alibi_slopes: Option<&[f32]>) -> AttentionShape<'_> {
        AttentionShape { num_heads: 2, num_kv_heads: 1, head_dim: 2, sliding_window: None, alibi_slopes }
    }

    /// One sequence of 3 tokens, 2 query heads sharing 1 kv head (dim 2).
    fn run(alibi: Option<&[f32]>) -> CpuTensor {
        let q = CpuTensor::new(vec![0.0; 12], 3, 4); // zero queries: scores are the bias alone
        let k = CpuTensor::new(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3, 2);
        let v = CpuTensor::new(vec![1.0, 0.0, 0.0, 1.0, 2.0, 2.0], 3, 2);
        let mut cache = CpuKvCache { kv_dim: 2, k: vec![vec![]], v: vec![vec![]] };
        let layout = BatchLayout::new([(3, 0)]);
        attention(&q, &k, &v, &mut [&mut cache], 0, &layout, shape(alibi))
    }

    #[test]
    fn alibi_adds_slope_times_key_position() {
        // Without a bias, zero queries average the visible values uniformly.
        let plain = run(None);
        assert_eq!(plain.row(1), &[0.5, 0.5, 0.5, 0.5]);
        // Slopes ln 2 and 0: at the last row head 0 weighs keys 0, 1, 2 as 1 : 2 : 4
        // (e^(ln2 · j)), head 1 uniformly.
        let ln2 = std::f32::consts::LN_2;
        let out = run(Some(&[ln2, 0.0]));
        let (w0, w1, w2) = (1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0);
        let head0 = [w0 * 1.0 + w2 * 2.0, w1 * 1.0 + w2 * 2.0];
        let head1 = [(1.0 + 2.0) / 3.0, (1.0 + 2.0) / 3.0];
        for (a, e) in out.row(2).iter().zip(head0.iter().chain(&head1)) {
            assert!((a - e).abs() < 1e-6, "{:?}", out.row(2));
        }
        // Row 0 sees only key 0, whatever the bias.
        assert_eq!(out.row(0), &[1.0, 0.0, 1.0, 0.0]);
        // Row 1, head 0: keys 0 and 1 weighed 1 : 2.
        let r1 = [1.0 / 3.0, 2.0 / 3.0];
        assert!(out.row(1)[..2].iter().zip(r1).all(|(a, e)| (a - e).abs() < 1e-6), "{:?}", out.row(1));
    }

    #[test]
    fn alibi_positions_are_absolute_across_cached_steps() {
        // Prefill 2 tokens, then decode the third: same result as one 3-token pass.
        let ln2 = std::f32::consts::LN_2;
        let slopes = [ln2, 0.0];
        let k = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
        let mut cache = CpuKvCache { kv_dim: 2, k: vec![vec![]], v: vec![vec![]] };
        let t = |d: &[f32], rows, cols| CpuTensor::new(d.to_vec(), rows, cols);
        let first = BatchLayout::new([(2, 0)]);
        attention(
            &t(&[0.0; 8], 2, 4),
            &t(&k[..4], 2, 2),
            &t(&v[..4], 2, 2),
            &mut [&mut cache],
            0,
            &first,
            shape(Some(&slopes)),
        );
        let second = BatchLayout::new([(1, 2)]);
        let out = attention(
            &t(&[0.0; 4], 1, 4),
            &t(&k[4..], 1, 2),
            &t(&v[4..], 1, 2),
            &mut [&mut cache],
            0,
            &second,
            shape(Some(&slopes)),
        );
        assert_eq!(out.row(0), run(Some(&slopes)).row(2));
    }
}
