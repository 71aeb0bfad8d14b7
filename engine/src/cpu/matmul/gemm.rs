//! The product for many activation rows (prefill, batches of more than four sequences):
//! a register-blocked outer-product micro-kernel over packed panels.
//!
//! - The activations `x[n, k]` are packed once per call, `MR` rows at a time, as
//!   `[k][MR]` (row tiles zero-padded), so a tile's column `kk` is `MR` adjacent floats.
//! - Each window's weight rows are taken `NR` at a time (a panel), widened to f32 and
//!   transposed into `[k][NR]` (L2-sized; each row read front to back, as the hardware
//!   prefetcher likes). Then, `KC` columns at a time (an L1-sized block), every row tile
//!   meets the block: `MR × NR` accumulators stay in registers while `kk` walks it (one
//!   broadcast of `x` per row, `NR / lanes` FMAs per broadcast), and are added to the
//!   output tile in place.
//! - Every weight is read from memory and widened once per call and row block (several
//!   hundred rows, [`ROW_BLOCK_BYTES`]), whatever `n`.
//!
//! [`microkernel!`] writes the inner loop once for every vector width; each instruction
//! set instantiates it with its own intrinsics ([`Gemm`]).
use super::OutCols;
use half::f16;
use std::cell::RefCell;

/// A register-blocked micro-kernel: `MR` activation rows × `NR` weight rows.
pub(super) trait Gemm {
    /// Activation rows per tile.
    const MR: usize;
    /// Weight rows per panel (a multiple of 8).
    const NR: usize;
    /// Columns of `k` per micro-kernel call (the panel's block, `KC × NR` f32, should sit in
    /// L1 with room to spare).
    const KC: usize;

    /// `c[i][j] = Σ_kk a[kk][i] · b[kk][j]` for `i < MR`, `j < NR` (plus what `c` holds when
    /// `accumulate`), row `i` of `c` at `c + i * ldc`.
    ///
    /// # Safety
    /// The CPU must support the implementation's instruction set; `a` holds `kc * MR`
    /// and `b` `kc * NR` floats; `c` points at `MR` rows of `NR` writable floats, `ldc` apart.
    unsafe fn tile(a: &[f32], b: &[f32], kc: usize, c: *mut f32, ldc: usize, accumulate: bool);
}

/// Writes `unsafe fn $name<const MR: usize, const NV: usize>(a, b, kc, c, ldc, accumulate)` for one vector
/// type: the [`Gemm::tile`] body with `NR = NV × lanes`.
macro_rules! microkernel {
    (
        $(#[$doc:meta])*
        $name:ident, $feature:literal, $vec:ty, $lanes:literal,
        zero: $zero:path, load: $load:path, splat: $splat:path, fma: $fma:path, store: $store:path
    ) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU must support the instruction set; `a` holds `kc * MR` floats, `b`
        /// `kc * NV * lanes` and `c` `MR * NV * lanes`.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $name<const MR: usize, const NV: usize>(
            a: &[f32],
            b: &[f32],
            kc: usize,
            c: *mut f32,
            ldc: usize,
            accumulate: bool,
        ) {
            const LANES: usize = $lanes;
            let nr = NV * LANES;
            assert!(a.len() >= kc * MR && b.len() >= kc * nr, "microkernel: operands shorter than the tile");
            let (a, b) = (a.as_ptr(), b.as_ptr());
            // SAFETY (every access to `c`): the caller guarantees `MR` rows of `nr` floats
            // from `c`, `ldc` apart; `v * LANES + LANES <= nr`.
            let at = |i: usize, v: usize| c.wrapping_add(i * ldc + v * LANES);
            let mut acc: [[$vec; NV]; MR] = if accumulate {
                std::array::from_fn(|i| std::array::from_fn(|v| unsafe { $load(at(i, v)) }))
            } else {
                [[$zero(); NV]; MR]
            };
            for kk in 0..kc {
                // SAFETY: `kk < kc`, so `kk * nr + nr <= b.len()` (asserted above).
                let bv: [$vec; NV] = std::array::from_fn(|v| unsafe { $load(b.add(kk * nr + v * LANES)) });
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    // SAFETY: `kk * MR + i < kc * MR <= a.len()`.
                    let av = $splat(unsafe { *a.add(kk * MR + i) });
                    for (acc_iv, bv) in acc_i.iter_mut().zip(&bv) {
                        *acc_iv = $fma(av, *bv, *acc_iv);
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                for (v, acc_iv) in acc_i.iter().enumerate() {
                    // SAFETY: inside the caller's `MR × nr` block of `c` (see `at`).
                    unsafe { $store(at(i, v), *acc_iv) };
                }
            }
        }
    };
}
pub(super) use microkernel;

/// `x[n, k]` packed as row tiles of `mr` rows, each `[k][mr]`, zero-padded to whole tiles;
/// the tiles in parallel on the current pool when there are many.
pub(super) fn pack_activations(x: &[f32], n: usize, k: usize, mr: usize) -> Vec<f32> {
    let tiles = n.div_ceil(mr);
    let mut packed = vec![0f32; tiles * k * mr];
    let pack = |(t, tile): (usize, &mut [f32])| {
        for (r, row) in x.chunks_exact(k).skip(t * mr).take(mr).enumerate() {
            for (kk, v) in row.iter().enumerate() {
                tile[kk * mr + r] = *v;
            }
        }
    };
    if n * k < super::PARALLEL_MIN_WORK {
        packed.chunks_exact_mut(k * mr).enumerate().for_each(pack);
    } else {
        use rayon::prelude::*;
        packed.par_chunks_exact_mut(k * mr).enumerate().for_each(pack);
    }
    packed
}

thread_local! {
    /// Each thread's packed weight panel (`k × NR` f32), kept between calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packed activations taken at a time: the row tiles of one block meet every weight
/// panel of the window before the next block starts, so that they are read from cache,
/// while each weight block is widened once per row block (at least a few hundred rows).
const ROW_BLOCK_BYTES: usize = 4 << 20;

/// `out = x · wᵀ` for the window's weight rows `w[width, k]`, given the activations packed
/// by [`pack_activations`] with `G::MR` rows per tile.
///
/// Whole tiles are summed in place in `out` (each `KC` block adds to the last); a tile cut
/// by the last rows or the window's edge goes through a small buffer.
///
/// # Safety
/// The CPU must support `G`'s instruction set, and AVX2 with F16C (weight packing).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn gemm<G: Gemm>(packed_x: &[f32], n: usize, w: &[f16], out: &mut OutCols<'_>, k: usize) {
    let (mr, nr) = (G::MR, G::NR);
    let width = w.len() / k;
    let tiles = n.div_ceil(mr);
    assert_eq!(packed_x.len(), tiles * k * mr, "gemm: activations not packed in tiles of {mr}");
    let tiles_per_block = (ROW_BLOCK_BYTES / (k * mr * 4)).max(1);
    let mut edge = vec![0f32; mr * nr];
    PANEL.with_borrow_mut(|panel| {
        panel.resize(k * nr, 0.0);
        for t0 in (0..tiles).step_by(tiles_per_block) {
            let block = t0..(t0 + tiles_per_block).min(tiles);
            for p0 in (0..width).step_by(nr) {
                let cols = nr.min(width - p0);
                // SAFETY: the caller guarantees AVX2 and F16C.
                unsafe { super::avx2::pack_panel(&w[p0 * k..(p0 + cols) * k], k, cols, nr, panel) };
                for pc in (0..k).step_by(G::KC) {
                    let kc = G::KC.min(k - pc);
                    let b = &panel[pc * nr..(pc + kc) * nr];
                    for t in block.clone() {
                        let a = &packed_x[t * k * mr + pc * mr..][..kc * mr];
                        let live = mr.min(n - t * mr);
                        if live == mr && cols == nr {
                            let c = out.block_ptr(t * mr, p0, mr, nr);
                            // SAFETY: the caller guarantees `G`'s instruction set; `block_ptr`
                            // checked the `mr × nr` block of `out`; `a` and `b` have the
                            // lengths the tile needs.
                            unsafe { G::tile(a, b, kc, c, out.stride(), pc > 0) };
                            continue;
                        }
                        // SAFETY: as above, with `edge` as the `mr × nr` block.
                        unsafe { G::tile(a, b, kc, edge.as_mut_ptr(), nr, false) };
                        for r in 0..live {
                            let dst = &mut out.row_mut(t * mr + r)[p0..p0 + cols];
                            let src = &edge[r * nr..r * nr + cols];
                            if pc == 0 {
                                dst.copy_from_slice(src);
                            } else {
                                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                            }
                        }
                    }
                }
            }
        }
    });
}
