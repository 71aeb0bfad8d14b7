//! The product for many activation rows (prefill, batches of more than four sequences):
//! a register-blocked outer-product micro-kernel over packed panels.
//!
//! - The activations `x[n, k]` are packed once per call, `MR` rows at a time, as
//!   `[k][MR]` (row tiles zero-padded), so a tile's column `kk` is `MR` adjacent floats.
//! - Each window's weight rows are taken `NR` at a time (a panel) and `KC` columns at a
//!   time; each such block is widened to f32 and transposed into `[KC][NR]` (L1-sized),
//!   then every row tile meets it: `MR × NR` accumulators stay in registers while `kk`
//!   walks the block (one broadcast of `x` per row, `NR / lanes` FMAs per broadcast).
//! - Every weight is read from memory and widened once per call, whatever `n`.
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
    /// Columns of `k` per packed block (the block, `KC × NR` f32, should sit in L1).
    const KC: usize;

    /// `c[MR][NR] = a[kc][MR] · b[kc][NR]` (sums over `kc`), overwriting `c`.
    ///
    /// # Safety
    /// The CPU must support the implementation's instruction set; `a` holds `kc * MR`
    /// and `b` `kc * NR` floats; `c` holds `MR * NR`.
    unsafe fn tile(a: &[f32], b: &[f32], kc: usize, c: &mut [f32]);
}

/// Writes `unsafe fn $name<const MR: usize, const NV: usize>(a, b, kc, c)` for one vector
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
            c: &mut [f32],
        ) {
            const LANES: usize = $lanes;
            let nr = NV * LANES;
            assert!(
                a.len() >= kc * MR && b.len() >= kc * nr && c.len() >= MR * nr,
                "microkernel: operands shorter than the tile"
            );
            let (a, b) = (a.as_ptr(), b.as_ptr());
            let mut acc: [[$vec; NV]; MR] = [[$zero(); NV]; MR];
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
                    // SAFETY: `i * nr + v * LANES + LANES <= MR * nr <= c.len()`.
                    unsafe { $store(c.as_mut_ptr().add(i * nr + v * LANES), *acc_iv) };
                }
            }
        }
    };
}
pub(super) use microkernel;

/// `x[n, k]` packed as row tiles of `mr` rows, each `[k][mr]`, zero-padded to whole tiles.
pub(super) fn pack_activations(x: &[f32], n: usize, k: usize, mr: usize) -> Vec<f32> {
    let tiles = n.div_ceil(mr);
    let mut packed = vec![0f32; tiles * k * mr];
    for (i, row) in x.chunks_exact(k).enumerate() {
        let tile = &mut packed[(i / mr) * k * mr..][..k * mr];
        for (kk, v) in row.iter().enumerate() {
            tile[kk * mr + i % mr] = *v;
        }
    }
    packed
}

thread_local! {
    /// Each thread's packed weight block (`KC × NR` f32), kept between calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out = x · wᵀ` for the window's weight rows `w[width, k]`, given the activations packed
/// by [`pack_activations`] with `G::MR` rows per tile.
///
/// # Safety
/// The CPU must support `G`'s instruction set, and AVX2 with F16C (weight packing).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn gemm<G: Gemm>(packed_x: &[f32], n: usize, w: &[f16], out: &mut OutCols<'_>, k: usize) {
    let (mr, nr) = (G::MR, G::NR);
    let width = w.len() / k;
    let tiles = n.div_ceil(mr);
    assert_eq!(packed_x.len(), tiles * k * mr, "gemm: activations not packed in tiles of {mr}");
    let mut c = vec![0f32; mr * nr];
    PANEL.with_borrow_mut(|panel| {
        panel.resize(G::KC * nr, 0.0);
        for p0 in (0..width).step_by(nr) {
            let cols = nr.min(width - p0);
            let rows = &w[p0 * k..(p0 + cols) * k];
            for pc in (0..k).step_by(G::KC) {
                let kc = G::KC.min(k - pc);
                // SAFETY: the caller guarantees AVX2 and F16C.
                unsafe { super::avx2::pack_panel(rows, k, cols, nr, pc, kc, panel) };
                for t in 0..tiles {
                    let a = &packed_x[t * k * mr + pc * mr..][..kc * mr];
                    // SAFETY: the caller guarantees `G`'s instruction set; the operands have
                    // the lengths the tile needs.
                    unsafe { G::tile(a, panel, kc, &mut c) };
                    for r in 0..mr.min(n - t * mr) {
                        let dst = &mut out.row_mut(t * mr + r)[p0..p0 + cols];
                        let src = &c[r * nr..r * nr + cols];
                        if pc == 0 {
                            dst.copy_from_slice(src);
                        } else {
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            }
        }
    });
}
