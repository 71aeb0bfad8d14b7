//! The decode loop shared by every instruction set: which weight rows meet the activation
//! rows, in what order. Each instruction set only supplies [`Dots`], a block of dot products.
use super::OutCols;
use half::f16;
use std::array;

/// A block of dot products: the one operation each instruction set implements.
pub(super) trait Dots {
    /// `d[i][r] = x[i] · w[r]` for `N` activation rows and `R` weight rows, all of the same
    /// length, with `U` partial sums per pair in flight.
    ///
    /// # Safety
    /// The CPU must support the implementation's instruction set.
    unsafe fn dots<const N: usize, const R: usize, const U: usize>(
        x: [&[f32]; N],
        w: [&[f16]; R],
    ) -> [[f32; R]; N];
}

/// `out = x · wᵀ` for `N = n` activation rows `x[N, k]` (decode), reading every weight row of
/// the window `w[rows, k]` once.
///
/// The rows are walked as `R` contiguous lanes side by side (rows `j`, `j + lane`, ...),
/// each lane one sequential stream. The hardware prefetcher follows such streams; `R`
/// adjacent rows interleaved inside one page it does not (half the bandwidth on Zen 5).
///
/// # Safety
/// The CPU must support `D`'s instruction set.
pub(super) unsafe fn decode<D: Dots, const N: usize, const R: usize, const U: usize>(
    x: &[f32],
    w: &[f16],
    out: &mut OutCols<'_>,
    k: usize,
) {
    assert_eq!(x.len(), N * k, "decode: x is not [{N}, {k}]");
    let xs: [&[f32]; N] = array::from_fn(|i| &x[i * k..(i + 1) * k]);
    let rows = w.len() / k;
    let lane = rows / R;
    for j in 0..lane {
        let at: [usize; R] = array::from_fn(|r| r * lane + j);
        // SAFETY: the caller guarantees `D`'s instruction set.
        let d = unsafe { D::dots::<N, R, U>(xs, at.map(|row| &w[row * k..(row + 1) * k])) };
        store(out, 0, at, d);
    }
    for row in R * lane..rows {
        // SAFETY: as above.
        let d = unsafe { D::dots::<N, 1, U>(xs, [&w[row * k..(row + 1) * k]]) };
        store(out, 0, [row], d);
    }
}

/// `out[i0 + i, at[r]] = d[i][r]`.
#[inline(always)]
fn store<const N: usize, const R: usize>(out: &mut OutCols<'_>, i0: usize, at: [usize; R], d: [[f32; R]; N]) {
    for (i, d_i) in d.iter().enumerate() {
        for (col, v) in at.iter().zip(d_i) {
            out.set(i0 + i, *col, *v);
        }
    }
}
