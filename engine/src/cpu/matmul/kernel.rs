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

/// `out = x · wᵀ` for `N` to `N + min(N, 4)` activation rows `x[n, k]` (decode), reading
/// every weight row of the window `w[rows, k]` once.
///
/// The rows are walked as `R` contiguous lanes side by side (rows `j`, `j + lane`, ...),
/// each lane one sequential stream. The hardware prefetcher follows such streams; `R`
/// adjacent rows interleaved inside one page it does not (half the bandwidth on Zen 5).
///
/// Rows past the first `N` are a second tile: both tiles meet each group of `R` weight rows
/// in turn, the second while the group is still in L1, so the weights stream from memory
/// once and without pause. (A tile at a time over the whole window would read them from
/// memory, then again from L2, and the memory would stand idle during the second pass.)
///
/// # Safety
/// The CPU must support `D`'s instruction set.
/// `at` = (first output row, first output column of the window) that `x` and `w` stand for.
pub(super) unsafe fn decode<D: Dots, const N: usize, const R: usize, const U: usize>(
    x: &[f32],
    w: &[f16],
    out: &mut OutCols<'_>,
    k: usize,
    at: (usize, usize),
) {
    let n = x.len() / k;
    assert!(
        x.len() == n * k && n >= N && n - N <= N.min(4),
        "decode: {n} rows of {k} for a tile of {N} and one of at most {}",
        N.min(4)
    );
    let xs: [&[f32]; N] = array::from_fn(|i| &x[i * k..(i + 1) * k]);
    let rest = Rest { x: &x[N * k..], rows: n - N };
    let rows = w.len() / k;
    let lane = rows / R;
    for j in 0..lane {
        let group: [usize; R] = array::from_fn(|r| r * lane + j);
        // SAFETY: the caller guarantees `D`'s instruction set.
        unsafe { meet::<D, N, R, U>(xs, rest, group.map(|row| &w[row * k..(row + 1) * k]), out, at, group) };
    }
    for row in R * lane..rows {
        // SAFETY: as above.
        unsafe { meet::<D, N, 1, U>(xs, rest, [&w[row * k..(row + 1) * k]], out, at, [row]) };
    }
}

/// [`decode`]'s second tile: `rows` activation rows (at most four) of `x`.
#[derive(Clone, Copy)]
struct Rest<'a> {
    x: &'a [f32],
    rows: usize,
}

/// One group of weight rows `ws` (at window rows `group`) against both tiles of
/// [`decode`]: `xs`, then the rest's rows.
///
/// # Safety
/// As [`decode`].
#[inline(always)]
unsafe fn meet<D: Dots, const N: usize, const R: usize, const U: usize>(
    xs: [&[f32]; N],
    rest: Rest<'_>,
    ws: [&[f16]; R],
    out: &mut OutCols<'_>,
    (i0, j0): (usize, usize),
    group: [usize; R],
) {
    let k = xs[0].len();
    let r = |i: usize| &rest.x[i * k..(i + 1) * k];
    let cols = group.map(|c| j0 + c);
    // SAFETY (every call): the caller guarantees `D`'s instruction set.
    unsafe {
        store(out, i0, cols, D::dots::<N, R, U>(xs, ws));
        let i0 = i0 + N;
        match rest.rows {
            0 => {}
            1 => store(out, i0, cols, D::dots::<1, R, U>([r(0)], ws)),
            2 => store(out, i0, cols, D::dots::<2, R, U>([r(0), r(1)], ws)),
            3 => store(out, i0, cols, D::dots::<3, R, U>([r(0), r(1), r(2)], ws)),
            4 => store(out, i0, cols, D::dots::<4, R, U>([r(0), r(1), r(2), r(3)], ws)),
            n => unreachable!("a second tile of {n} rows: at most four"),
        }
    }
}

/// Weight bytes per block of [`blocked`]: read from memory once, then from L2 for every
/// further tile of activation rows.
const BLOCK_BYTES: usize = 192 * 1024;

/// `out = x · wᵀ` for any number of activation rows, as [`decode`] tiles of at most
/// `tile_rows` rows: the weight rows are taken a block that fits L2 at a time, and every
/// tile meets the block, so each weight is read from memory once. `tile(x, w, out, at)`
/// computes one tile (its rows `x`, the block `w`, `at` as in [`decode`]).
pub(super) fn blocked(
    x: &[f32],
    w: &[f16],
    out: &mut OutCols<'_>,
    k: usize,
    tile_rows: usize,
    mut tile: impl FnMut(&[f32], &[f16], &mut OutCols<'_>, (usize, usize)),
) {
    let (n, rows) = (x.len() / k, w.len() / k);
    let block = (BLOCK_BYTES / (2 * k)).max(1);
    for j0 in (0..rows).step_by(block) {
        let w = &w[j0 * k..(j0 + block).min(rows) * k];
        for i0 in (0..n).step_by(tile_rows) {
            tile(&x[i0 * k..(i0 + tile_rows).min(n) * k], w, out, (i0, j0));
        }
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
