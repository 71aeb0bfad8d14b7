//! [`OutCols`]: disjoint column windows of the output matrix, one per parallel task.
use std::marker::PhantomData;

/// A window of whole columns `[start, end)` of a row-major `out[n, m]`.
///
/// Splitting the weight rows over threads splits the output by columns, which are not
/// contiguous. Windows cut from one `&mut` borrow never overlap, so each may be written
/// from its own thread; every write is bounds-checked against the window.
pub(super) struct OutCols<'a> {
    /// `out.as_mut_ptr()`: the whole matrix, of which only this window's columns are touched.
    base: *mut f32,
    n: usize,
    m: usize,
    start: usize,
    end: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: an `OutCols` is an exclusive borrow of its columns (no other window or borrow of
// the matrix reaches them while it lives), so sending it to another thread is like sending
// a `&mut [f32]`.
unsafe impl Send for OutCols<'_> {}

impl<'a> OutCols<'a> {
    /// The whole of `out[n, m]` as one window.
    pub(super) fn whole(out: &'a mut [f32], n: usize, m: usize) -> Self {
        assert_eq!(out.len(), n * m, "OutCols: out is not [{n}, {m}]");
        OutCols { base: out.as_mut_ptr(), n, m, start: 0, end: m, _out: PhantomData }
    }

    /// `out[n, m]` cut into disjoint windows of `width` columns (the last may be narrower).
    pub(super) fn split(out: &'a mut [f32], n: usize, m: usize, width: usize) -> Vec<Self> {
        assert!(width > 0, "OutCols: zero window width");
        let whole = OutCols::whole(out, n, m);
        (0..m).step_by(width).map(|start| OutCols { start, end: (start + width).min(m), ..whole }).collect()
    }

    /// Rows of the matrix (`n`).
    pub(super) fn rows(&self) -> usize {
        self.n
    }

    /// First column of the window.
    pub(super) fn start(&self) -> usize {
        self.start
    }

    /// One past the last column of the window.
    pub(super) fn end(&self) -> usize {
        self.end
    }

    /// `out[i, start + j] = v`.
    #[inline(always)]
    pub(super) fn set(&mut self, i: usize, j: usize, v: f32) {
        let at = self.index(i, j);
        // SAFETY: `index` checked that the element lies in this window, which `&mut self`
        // borrows exclusively; `base` points at `n * m` elements alive for `'a`.
        unsafe { *self.base.add(at) = v };
    }

    /// The window's part of row `i`: `out[i, start..end]`.
    #[inline(always)]
    pub(super) fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.n, "OutCols: row {i} outside a window of {} rows", self.n);
        // SAFETY: the columns `start..end` of row `i` lie in this window, which `&mut self`
        // borrows exclusively; `base` points at `n * m` elements alive for `'a`.
        unsafe {
            std::slice::from_raw_parts_mut(self.base.add(i * self.m + self.start), self.end - self.start)
        }
    }

    /// A raw pointer to `out[i, start + j]` for a block of `rows × cols` elements from there,
    /// whose rows lie [`stride`](Self::stride) elements apart; the block is checked against
    /// the window. Valid while `self` is borrowed mutably.
    #[inline(always)]
    pub(super) fn block_ptr(&mut self, i: usize, j: usize, rows: usize, cols: usize) -> *mut f32 {
        assert!(
            rows > 0 && cols > 0 && i + rows <= self.n && j + cols <= self.end - self.start,
            "OutCols: block of {rows}×{cols} at ({i}, {j}) outside a window of {} rows and {} columns",
            self.n,
            self.end - self.start
        );
        // SAFETY: the block's first element lies in the window (checked above), inside the
        // `n * m` elements `base` points at.
        unsafe { self.base.add(i * self.m + self.start + j) }
    }

    /// Elements from one row of the matrix to the next (`m`).
    pub(super) fn stride(&self) -> usize {
        self.m
    }

    /// Flat index of `out[i, start + j]`, checked against the window.
    #[inline(always)]
    fn index(&self, i: usize, j: usize) -> usize {
        assert!(
            i < self.n && j < self.end - self.start,
            "OutCols: ({i}, {j}) outside a window of {} rows and {} columns",
            self.n,
            self.end - self.start
        );
        i * self.m + self.start + j
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_column_once() {
        let (n, m) = (3, 10);
        let mut out = vec![0f32; n * m];
        let windows = OutCols::split(&mut out, n, m, 4);
        assert_eq!(
            windows.iter().map(|w| (w.start(), w.end())).collect::<Vec<_>>(),
            [(0, 4), (4, 8), (8, 10)]
        );
        for mut w in windows {
            for i in 0..n {
                for j in 0..w.end() - w.start() {
                    w.set(i, j, (i * m + w.start() + j) as f32 + 1.0);
                }
            }
        }
        assert_eq!(out, (1..=n * m).map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "outside a window")]
    fn writes_outside_the_window_panic() {
        let mut out = vec![0f32; 6];
        let mut windows = OutCols::split(&mut out, 2, 3, 2);
        windows[0].set(0, 2, 1.0);
    }
}
