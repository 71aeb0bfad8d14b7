//! Causal grouped-query attention over each sequence's KV cache (CPU).
use rayon::prelude::*;

use super::{ops, CpuKvCache, CpuTensor, PARALLEL_MIN_WORK};
use crate::backend::{AttentionShape, BatchLayout};

/// Keys scored at a time per query row and head: the scores of a long prompt are never
/// held for all positions at once.
const KEY_BLOCK: usize = 64;

/// Σ a·b with eight partial sums, which the compiler keeps in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum::<f32>()
}

/// `[q·k[0], .., q·k[N-1]]` for four or eight keys: `N` independent sums of fused
/// multiply-adds, so that one key's sum does not wait on the last addition of another
/// (with eight in flight, the FMA units rather than their latency set the pace; the
/// compiler, left to [`dot`] per key, vectorizes across the keys instead).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const N: usize>(q: &[f32], k: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let n = q.len();
    assert!(N == 4 || N == 8, "dots_avx2: four or eight keys, not {N}");
    assert!(k.iter().all(|k| k.len() == n), "dots_avx2: keys of another length than the query");
    let n8 = n / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); N];
    for c in (0..n8).step_by(8) {
        // SAFETY: `c + 8 <= n8 <= n`, inside the query and every key.
        let x = unsafe { _mm256_loadu_ps(q.as_ptr().add(c)) };
        for (acc, k) in acc.iter_mut().zip(k) {
            // SAFETY: as above.
            *acc = _mm256_fmadd_ps(x, unsafe { _mm256_loadu_ps(k.as_ptr().add(c)) }, *acc);
        }
    }
    // Pairwise sums of the accumulators' lanes, four at a time: in `h`, lane `t` of each
    // 128-bit half is a partial sum of key `t` (of that group of four).
    let mut d = [0f32; N];
    for (d, a) in d.chunks_exact_mut(4).zip(acc.chunks_exact(4)) {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        // SAFETY: `d` holds four floats.
        unsafe { _mm_storeu_ps(d.as_mut_ptr(), s) };
    }
    for (d, k) in d.iter_mut().zip(k) {
        *d += q[n8..].iter().zip(&k[n8..]).map(|(x, y)| x * y).sum::<f32>();
    }
    d
}

/// `scores[t] = q·k(t)` for a block of keys: eight, then four at a time where the CPU has
/// AVX2.
#[inline(always)]
fn score<'k>(q: &[f32], scores: &mut [f32], k: impl Fn(usize) -> &'k [f32]) {
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::matmul::vectorized() {
        while t + 8 <= scores.len() {
            // SAFETY: `vectorized` means AVX2, FMA and F16C were detected.
            let d = unsafe { dots_avx2::<8>(q, std::array::from_fn(|i| k(t + i))) };
            scores[t..t + 8].copy_from_slice(&d);
            t += 8;
        }
        if t + 4 <= scores.len() {
            // SAFETY: as above.
            let d = unsafe { dots_avx2::<4>(q, std::array::from_fn(|i| k(t + i))) };
            scores[t..t + 4].copy_from_slice(&d);
            t += 4;
        }
    }
    for (t, sc) in scores.iter_mut().enumerate().skip(t) {
        *sc = dot(q, k(t));
    }
}

/// Columns of a head's output summed at a time in registers over a block of keys.
const OUT_COLS: usize = 64;

/// `out += Σ_j p[j] · v(j)` over a block of keys: [`OUT_COLS`] columns at a time held in
/// registers for the whole block, where adding one key at a time would load and store
/// `out` for every key; with AVX2, one fused multiply-add per eight columns and key.
#[inline(always)]
fn add_weighted<'v>(out: &mut [f32], p: &[f32], v: impl Fn(usize) -> &'v [f32]) {
    for (c, out) in out.chunks_mut(OUT_COLS).enumerate() {
        let cols = c * OUT_COLS..c * OUT_COLS + out.len();
        if let Ok(out) = <&mut [f32; OUT_COLS]>::try_from(&mut *out) {
            let v = |j: usize| -> &[f32; OUT_COLS] { v(j)[cols.clone()].try_into().expect("a full chunk") };
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::matmul::vectorized() {
                // SAFETY: `vectorized` means AVX2, FMA and F16C were detected.
                unsafe { add_weighted_avx2(out, p, v) };
                continue;
            }
            let mut acc = *out;
            for (j, p) in p.iter().enumerate() {
                let v = v(j);
                for l in 0..OUT_COLS {
                    acc[l] += p * v[l];
                }
            }
            *out = acc;
        } else {
            for (j, p) in p.iter().enumerate() {
                out.iter_mut().zip(&v(j)[cols.clone()]).for_each(|(a, b)| *a += p * b);
            }
        }
    }
}

/// [`add_weighted`] for one whole chunk of columns: eight accumulators in `ymm` registers.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn add_weighted_avx2<'v>(
    out: &mut [f32; OUT_COLS],
    p: &[f32],
    v: impl Fn(usize) -> &'v [f32; OUT_COLS],
) {
    use std::arch::x86_64::*;
    // SAFETY (every load and store): `i * 8 + 8 <= OUT_COLS`, inside `out` and each row of `v`.
    let mut acc: [__m256; OUT_COLS / 8] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(out.as_ptr().add(i * 8)) });
    for (j, p) in p.iter().enumerate() {
        let (p, v) = (_mm256_set1_ps(*p), v(j));
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(p, unsafe { _mm256_loadu_ps(v.as_ptr().add(i * 8)) }, *acc);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i * 8), *acc) };
    }
}

/// One query head of one row against its keys.
struct Head<'a> {
    /// The query, `head_dim` values.
    q: &'a [f32],
    /// The sequence's cached keys and values, `[tokens, kv_dim]`.
    k: &'a [f32],
    v: &'a [f32],
    kv_dim: usize,
    /// Where this head's key-value head starts in a cached row.
    at: usize,
    /// Key positions to attend to.
    keys: std::ops::RangeInclusive<usize>,
    /// `1 / √head_dim`.
    scale: f32,
    /// ALiBi slope of this head, if any.
    slope: Option<f32>,
}

ops::avx2_version! {
    /// `out = softmax(q·kᵀ · scale + slope · j) · v` for one head.
    fn attend = attend_portable, (head: &Head<'_>, out: &mut [f32])
}

/// [`attend`]: an online softmax over blocks of [`KEY_BLOCK`] keys. `max` is the largest
/// score so far and `sum` the sum of exp(score - max); `out` holds Σ exp(score - max) · v.
#[inline(always)]
fn attend_portable(head: &Head<'_>, out: &mut [f32]) {
    let hd = head.q.len();
    let at = |j: usize| j * head.kv_dim + head.at..j * head.kv_dim + head.at + hd;
    let mut scores = [0f32; KEY_BLOCK];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    out.fill(0.0);
    for j0 in head.keys.clone().step_by(KEY_BLOCK) {
        let keys = j0..(j0 + KEY_BLOCK).min(head.keys.end() + 1);
        let block = &mut scores[..keys.len()];
        score(head.q, block, |t| &head.k[at(keys.start + t)]);
        for (j, sc) in keys.clone().zip(block.iter_mut()) {
            *sc *= head.scale;
            if let Some(slope) = head.slope {
                *sc += slope * j as f32;
            }
        }
        let block_max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if block_max > max {
            // Rescale what was summed under the old maximum (nothing, the first time).
            let fix = (max - block_max).exp();
            sum *= fix;
            out.iter_mut().for_each(|a| *a *= fix);
            max = block_max;
        }
        block.iter_mut().for_each(|sc| *sc = ops::exp(*sc - max));
        sum += block.iter().sum::<f32>();
        add_weighted(out, block, |j| &head.v[at(keys.start + j)]);
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|a| *a *= inv);
}

/// Appends this step's `k`, `v` (`[rows, kv_dim]`) to the caches, then computes
/// `softmax(q·kᵀ / √d + slope_h · j) · v` per head over key positions
/// `j ∈ 0..=pos` (or the sliding window) of the row's own sequence, [`KEY_BLOCK`] keys at a
/// time with an online softmax; the ALiBi term
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
        for h in 0..shape.num_heads {
            let head = Head {
                q: &q.data[r * q_dim + h * hd..r * q_dim + (h + 1) * hd],
                k: &caches[s].k[layer],
                v: &caches[s].v[layer],
                kv_dim,
                at: (h / group) * hd,
                keys: lo..=pos,
                scale,
                slope: shape.alibi_slopes.map(|s| s[h]),
            };
            attend(&head, &mut o[h * hd..(h + 1) * hd]);
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
    fn blocked_online_softmax_matches_the_direct_formula() {
        // 150 positions (three key blocks, the last partial), 4 query heads over 2 kv heads,
        // a sliding window of 100, and scores large enough that an unstable softmax overflows.
        // Head sizes: below one vector, 64 (whole vectors and one register block of
        // columns), and with a tail of vectors and of values.
        for hd in [5, 64, 67, 136] {
            let (rows, heads, kv_heads) = (150, 4, 2);
            let mut seed = 7u64;
            let mut next = || {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            };
            let q = CpuTensor::new((0..rows * heads * hd).map(|_| 30.0 * next()).collect(), rows, heads * hd);
            let k = CpuTensor::new((0..rows * kv_heads * hd).map(|_| next()).collect(), rows, kv_heads * hd);
            let v = CpuTensor::new((0..rows * kv_heads * hd).map(|_| next()).collect(), rows, kv_heads * hd);
            for window in [None, Some(100)] {
                let shape = AttentionShape {
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim: hd,
                    sliding_window: window,
                    alibi_slopes: None,
                };
                let mut cache = CpuKvCache { kv_dim: kv_heads * hd, k: vec![vec![]], v: vec![vec![]] };
                let out = attention(&q, &k, &v, &mut [&mut cache], 0, &BatchLayout::new([(rows, 0)]), shape);
                for pos in [0usize, 63, 64, 99, 100, 149] {
                    for h in 0..heads {
                        let kvh = h / (heads / kv_heads);
                        let lo = window.map_or(0, |w: usize| (pos + 1).saturating_sub(w));
                        let s: Vec<f64> = (lo..=pos)
                            .map(|j| {
                                (0..hd)
                                    .map(|d| {
                                        f64::from(q.row(pos)[h * hd + d]) * f64::from(k.row(j)[kvh * hd + d])
                                    })
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                        let total: f64 = e.iter().sum();
                        for d in 0..hd {
                            let want: f64 = (lo..=pos)
                                .zip(&e)
                                .map(|(j, p)| p / total * f64::from(v.row(j)[kvh * hd + d]))
                                .sum();
                            let got = f64::from(out.row(pos)[h * hd + d]);
                            assert!(
                                (got - want).abs() < 1e-5,
                                "window {window:?} pos {pos} head {h} dim {d}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
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
