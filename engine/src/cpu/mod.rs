//! The CPU backend: f16 weights, f32 activations and accumulation. It is the
//! reference every other backend is held to.
//!
//! Large ops split across the rayon pool; the small ones of tiny models run on the
//! calling thread, since a fork/join costs more than they do.
//!
//! Its ops cannot fail on a device, so tests inject failures instead
//! ([`CpuBackend::with_fault`], [`StepFault`]).
mod attention;
mod fault;
pub mod matmul;
mod ops;

use std::sync::Arc;

use half::f16;

pub use fault::{InjectedFault, StepFault};

use crate::backend::{AttentionShape, Backend, BatchLayout, Piece};
use crate::error::{EngineError, Result};
use crate::weights::HostWeights;
use fault::FaultInjector;

/// Row-major f32 activations `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "tensor data must hold rows * cols values");
        Self { data, rows, cols }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// One sequence's cache: per layer, keys and values `[tokens, kv_dim]`.
#[derive(Clone, Debug, Default)]
pub struct CpuKvCache {
    pub(crate) kv_dim: usize,
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    fn len(&self) -> usize {
        self.k.first().map_or(0, |k| k.len() / self.kv_dim.max(1))
    }
}

/// The CPU backend: weights are host f16 slices. It holds nothing but an
/// optional injected fault, whose call count its clones share.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    fault: Option<FaultInjector>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend whose `linear` fails as `fault` says, with a
    /// [`EngineError::Device`] (tests of the step error path).
    pub fn with_fault(fault: StepFault) -> Self {
        Self { fault: Some(FaultInjector::new(fault)) }
    }

    /// Calls to `linear` so far, failed ones included; counted only with a fault.
    pub fn linear_calls(&self) -> Option<u64> {
        self.fault.as_ref().map(FaultInjector::calls)
    }
}

/// Work (multiply-adds) below which an op stays on the calling thread.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Elements from which a row-wise or elementwise op splits its rows over the pool.
const ROWS_PARALLEL_MIN: usize = 1 << 15;

/// `f(r, row)` for every row of `data` (`cols` wide): over the current pool when there are
/// several rows and enough elements, else on this thread.
fn for_each_row(data: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if cols == 0 {
        return;
    }
    if data.len() >= ROWS_PARALLEL_MIN && data.len() > cols {
        use rayon::prelude::*;
        data.par_chunks_exact_mut(cols).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        data.chunks_exact_mut(cols).enumerate().for_each(|(r, row)| f(r, row));
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = [f16];
    type KvCache = CpuKvCache;
    type Staged = Arc<HostWeights>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", crate::engine::compute_pool().current_num_threads())
    }

    /// Host memory is read where it is.
    fn stage(&self, host: &Arc<HostWeights>, _piece: Piece, _names: &[String]) -> Result<Arc<HostWeights>> {
        Ok(host.clone())
    }

    fn weight<'a>(&self, staged: &'a Arc<HostWeights>, name: &str) -> Result<Option<&'a [f16]>> {
        Ok(staged.get(name))
    }

    /// Each layer's keys and values reserved at once (no doubling past the
    /// reservation; untouched pages cost nothing until written).
    fn new_kv_cache(&self, num_layers: usize, kv_dim: usize, max_tokens: usize) -> CpuKvCache {
        let empty = || (0..num_layers).map(|_| Vec::with_capacity(max_tokens * kv_dim)).collect();
        CpuKvCache { kv_dim, k: empty(), v: empty() }
    }

    fn kv_element_bytes(&self) -> usize {
        std::mem::size_of::<f32>()
    }

    fn kv_len(&self, cache: &CpuKvCache) -> usize {
        cache.len()
    }

    fn embed(&self, table: &[f16], ids: &[u32], dim: usize) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let row = &table[id as usize * dim..(id as usize + 1) * dim];
            data.extend(row.iter().map(|x| x.to_f32()));
        }
        Ok(CpuTensor::new(data, ids.len(), dim))
    }

    fn add_position_embeddings(&self, x: &mut CpuTensor, table: &[f16], positions: &[usize]) -> Result<()> {
        assert_eq!(positions.len(), x.rows, "one position per row");
        let max = table.len() / x.cols.max(1);
        if let Some(p) = positions.iter().find(|p| **p >= max) {
            return Err(EngineError::InvalidRequest(format!(
                "position {p} is outside the {max}-position table"
            )));
        }
        for (row, &p) in x.data.chunks_exact_mut(x.cols).zip(positions) {
            let t = &table[p * x.cols..(p + 1) * x.cols];
            row.iter_mut().zip(t).for_each(|(v, e)| *v += e.to_f32());
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &[f16], eps: f32) -> Result<CpuTensor> {
        let mut out = x.clone();
        for_each_row(&mut out.data, x.cols, |_, row| ops::rms_norm_row(row, w, eps));
        Ok(out)
    }

    fn layer_norm(&self, x: &CpuTensor, w: &[f16], b: &[f16], eps: f32) -> Result<CpuTensor> {
        let mut out = x.clone();
        for_each_row(&mut out.data, x.cols, |_, row| ops::layer_norm_row(row, w, b, eps));
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, w: &[f16], bias: Option<&[f16]>, out_dim: usize) -> Result<CpuTensor> {
        if let Some(fault) = &self.fault {
            fault.linear_call()?;
        }
        let mut out = vec![0f32; x.rows * out_dim];
        matmul::matmul_f16(&x.data, w, bias, &mut out, x.rows, x.cols, out_dim);
        Ok(CpuTensor::new(out, x.rows, out_dim))
    }

    fn rope(&self, x: &mut CpuTensor, head_dim: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
        let half = head_dim / 2;
        for_each_row(&mut x.data, x.cols, |r, row| {
            let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            for head in row.chunks_exact_mut(head_dim) {
                ops::rotate_half(head, c, s);
            }
        });
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        caches: &mut [&mut CpuKvCache],
        layer: usize,
        layout: &BatchLayout,
        shape: AttentionShape<'_>,
    ) -> Result<CpuTensor> {
        Ok(attention::attention(q, k, v, caches, layer, layout, shape))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols), "silu_mul of mismatched shapes");
        let mut out = gate.clone();
        for_each_row(&mut out.data, gate.cols, |r, row| ops::silu_mul_row(row, up.row(r)));
        Ok(out)
    }

    fn gelu_tanh(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let mut out = x.clone();
        for_each_row(&mut out.data, x.cols, |_, row| row.iter_mut().for_each(|v| *v = ops::gelu_tanh(*v)));
        Ok(out)
    }

    fn split_cols(&self, x: &CpuTensor, widths: &[usize]) -> Result<Vec<CpuTensor>> {
        assert_eq!(widths.iter().sum::<usize>(), x.cols, "split widths must add up to the columns");
        let mut start = 0;
        Ok(widths
            .iter()
            .map(|&w| {
                let data =
                    x.data.chunks_exact(x.cols).flat_map(|row| &row[start..start + w]).copied().collect();
                start += w;
                CpuTensor::new(data, x.rows, w)
            })
            .collect())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add of mismatched shapes");
        for_each_row(&mut x.data, x.cols, |r, row| row.iter_mut().zip(y.row(r)).for_each(|(a, b)| *a += b));
        Ok(())
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let data = rows.iter().flat_map(|&r| x.row(r).iter().copied()).collect();
        Ok(CpuTensor::new(data, rows.len(), x.cols))
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn on_host(&self, x: &mut CpuTensor, f: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        f(&mut x.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|x| f16::from_f32(*x)).collect()
    }

    #[test]
    fn add_position_embeddings_adds_each_rows_table_row() -> Result<()> {
        let b = CpuBackend::new();
        let table = h(&[0.0, 0.5, 10.0, 20.0, -1.0, -2.0]); // 3 positions, 2 cols
        let mut x = CpuTensor::new(vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0], 3, 2);
        b.add_position_embeddings(&mut x, &table, &[2, 0, 1])?;
        assert_eq!(x.data, vec![0.0, -1.0, 2.0, 2.5, 13.0, 23.0]);
        Ok(())
    }

    #[test]
    fn add_position_embeddings_refuses_a_position_past_the_table() {
        let mut x = CpuTensor::new(vec![0.0; 2], 1, 2);
        let err =
            CpuBackend::new().add_position_embeddings(&mut x, &h(&[0.0; 6]), &[3]).expect_err("refused");
        assert!(matches!(err, EngineError::InvalidRequest(_)), "{err:?}");
        assert!(err.to_string().contains("outside the 3-position table"), "{err}");
        assert_eq!(x.data, vec![0.0; 2], "nothing added");
    }

    #[test]
    fn layer_norm_normalises_each_row() -> Result<()> {
        let b = CpuBackend::new();
        let x = CpuTensor::new(vec![1.0, 3.0, -2.0, 2.0], 2, 2);
        // Each row: mean m, deviations ±d, variance d²: output ±d/√(d²+eps) · w + b.
        let out = b.layer_norm(&x, &h(&[2.0, 1.0]), &h(&[0.5, -0.5]), 0.0)?;
        assert_eq!(out.data, vec![-2.0 + 0.5, 1.0 - 0.5, -2.0 + 0.5, 1.0 - 0.5]);
        Ok(())
    }

    #[test]
    fn gelu_tanh_is_elementwise() -> Result<()> {
        let out = CpuBackend::new().gelu_tanh(&CpuTensor::new(vec![0.0, 1.0, -2.0, 20.0], 2, 2))?;
        let expect = [0.0, 0.841_192, -0.045_402_3, 20.0];
        for (a, e) in out.data.iter().zip(expect) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        Ok(())
    }

    #[test]
    fn split_cols_splits_every_row() -> Result<()> {
        let x = CpuTensor::new((0..12).map(|v| v as f32).collect(), 2, 6);
        let parts = CpuBackend::new().split_cols(&x, &[1, 2, 3])?;
        assert_eq!(parts[0], CpuTensor::new(vec![0.0, 6.0], 2, 1));
        assert_eq!(parts[1], CpuTensor::new(vec![1.0, 2.0, 7.0, 8.0], 2, 2));
        assert_eq!(parts[2], CpuTensor::new(vec![3.0, 4.0, 5.0, 9.0, 10.0, 11.0], 2, 3));
        Ok(())
    }

    /// `linear` of `[1, 2]` by `[2, 2]` on `b`: the result, or the injected error.
    fn one_linear(b: &CpuBackend) -> Result<CpuTensor> {
        b.linear(&CpuTensor::new(vec![1.0, 2.0], 1, 2), &h(&[1.0, 0.0, 0.0, 1.0]), None, 2)
    }

    /// Which of `n` consecutive `linear` calls fail, and whether each failure is fatal.
    fn failures(b: &CpuBackend, n: usize) -> Vec<Option<bool>> {
        (0..n)
            .map(|_| match one_linear(b) {
                Ok(y) => {
                    assert_eq!(y.data, vec![1.0, 2.0], "a call that succeeds computes");
                    None
                }
                Err(e) => Some(e.is_fatal()),
            })
            .collect()
    }

    #[test]
    fn no_fault_means_no_failure_and_no_count() {
        let b = CpuBackend::new();
        assert_eq!(failures(&b, 4), vec![None; 4]);
        assert_eq!(b.linear_calls(), None);
    }

    #[test]
    fn a_fault_fires_at_the_given_call() {
        for after_calls in [0, 1, 5] {
            let b = CpuBackend::with_fault(StepFault { after_calls, fatal: false });
            let got = failures(&b, 7);
            let want: Vec<_> = (0..7).map(|i| (i == after_calls as usize).then_some(false)).collect();
            assert_eq!(got, want, "after {after_calls} calls");
            assert_eq!(b.linear_calls(), Some(7));
        }
    }

    #[test]
    fn a_transient_fault_fires_once_then_ops_succeed_again() {
        let b = CpuBackend::with_fault(StepFault { after_calls: 2, fatal: false });
        assert_eq!(failures(&b, 6), vec![None, None, Some(false), None, None, None]);
        let err = CpuBackend::with_fault(StepFault { after_calls: 0, fatal: false })
            .linear(&CpuTensor::new(vec![1.0], 1, 1), &h(&[1.0]), None, 1)
            .expect_err("the fault fires");
        let EngineError::Device { op, fatal: false, source } = &err else { panic!("{err:?}") };
        assert_eq!(op, "linear (injected fault)");
        let injected = source.downcast_ref::<InjectedFault>().expect("the injected fault is the source");
        assert_eq!((injected.call, injected.fatal), (0, false));
        assert_eq!(err.to_string(), "linear (injected fault): injected transient fault at call 0");
    }

    #[test]
    fn a_fatal_fault_persists() {
        let b = CpuBackend::with_fault(StepFault { after_calls: 1, fatal: true });
        assert_eq!(failures(&b, 5), vec![None, Some(true), Some(true), Some(true), Some(true)]);
    }

    #[test]
    fn clones_share_the_call_count() {
        let a = CpuBackend::with_fault(StepFault { after_calls: 2, fatal: false });
        let b = a.clone();
        assert_eq!(failures(&a, 1), vec![None]);
        assert_eq!(failures(&b, 1), vec![None]);
        assert_eq!(failures(&a, 1), vec![Some(false)], "the third call across both clones fails");
        assert_eq!((a.linear_calls(), b.linear_calls()), (Some(3), Some(3)));
    }
}
