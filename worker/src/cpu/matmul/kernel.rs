//! The loops shared by every instruction set: which activation rows meet which weight rows,
//! in what order. Each instruction set only supplies [`Dots`], a block of dot products.
use super::OutCols;
use half::f16;
use std::array;

/// Activation rows kept together per block in the tiled loop (f32 bytes): they are re-read
/// for every block of weight rows, so they must stay in L2 (1 MiB here, 256 KiB or more on
/// most x86 cores).
const X_BLOCK_BYTES: usize = 384 * 1024;

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

/// `out = x · wᵀ` for any number of activation rows `x[n, k]` (prefill, batches).
///
/// Activation rows are taken a block at a time, sized to stay in L2. Within a block, each
/// group of `R` adjacent weight rows (in L1 after its first use) meets every tile of `N`
/// activation rows, so each weight is widened `n / N` times and read from memory
/// `n / block` times.
///
/// # Safety
/// The CPU must support `D`'s instruction set.
pub(super) unsafe fn tiled<D: Dots, const N: usize, const R: usize, const U: usize>(
    x: &[f32],
    w: &[f16],
    out: &mut OutCols<'_>,
    k: usize,
) {
    let n = x.len() / k;
    let rows = w.len() / k;
    let block = (X_BLOCK_BYTES / (4 * k)).max(N) / N * N;
    let lane = rows / R;
    for i0 in (0..n).step_by(block) {
        let x = &x[i0 * k..(i0 + block).min(n) * k];
        for j in 0..lane {
            let at: [usize; R] = array::from_fn(|r| r * lane + j);
            let ws = at.map(|row| &w[row * k..(row + 1) * k]);
            // SAFETY: the caller guarantees `D`'s instruction set.
            unsafe { tile_column::<D, N, R, U>(x, ws, out, i0, at) };
        }
        for row in R * lane..rows {
            // SAFETY: as above.
            unsafe { tile_column::<D, N, 1, U>(x, [&w[row * k..(row + 1) * k]], out, i0, [row]) };
        }
    }
}

/// Every activation row of `x` (output rows from `i0`) against the weight rows `ws`
/// (output columns `at`), `N` activation rows at a time.
///
/// # Safety
/// The CPU must support `D`'s instruction set.
unsafe fn tile_column<D: Dots, const N: usize, const R: usize, const U: usize>(
    x: &[f32],
    ws: [&[f16]; R],
    out: &mut OutCols<'_>,
    i0: usize,
    at: [usize; R],
) {
    let k = ws[0].len();
    let n = x.len() / k;
    let rows = |i: usize, len: usize| &x[i * k..(i + len) * k];
    let mut i = 0;
    while i + N <= n {
        let tile = rows(i, N);
        // SAFETY: the caller guarantees `D`'s instruction set.
        let d = unsafe { D::dots::<N, R, U>(array::from_fn(|t| &tile[t * k..(t + 1) * k]), ws) };
        store(out, i0 + i, at, d);
        i += N;
    }
    macro_rules! rest {
        ($($len:literal)*) => {
            match n - i {
                0 => {}
                $($len => {
                    let tile = rows(i, $len);
                    let xs = array::from_fn(|t| &tile[t * k..(t + 1) * k]);
                    // SAFETY: as above.
                    let d = unsafe { D::dots::<$len, R, U>(xs, ws) };
                    store(out, i0 + i, at, d);
                })*
                len => unreachable!("tile of {len} rows left over from tiles of {N}"),
            }
        };
    }
    rest!(1 2 3 4 5 6 7);
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
