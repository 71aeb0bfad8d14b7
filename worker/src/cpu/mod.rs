//! The CPU backend: f16 weights, f32 activations and accumulation. It is the
//! reference every other backend is held to.
//!
//! Large ops split across the rayon pool; the small ones of tiny models run on the
//! calling thread, since a fork/join costs more than they do.
mod attention;
pub mod matmul;
mod ops;

use half::f16;

use crate::backend::{AttentionShape, Backend, BatchLayout};

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

/// The CPU backend. Stateless: weights are host f16 slices.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// Work (multiply-adds) below which an op stays on the calling thread.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 16;

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = [f16];
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn new_kv_cache(&self, num_layers: usize, kv_dim: usize) -> CpuKvCache {
        CpuKvCache {
            kv_dim,
            k: vec![Vec::new(); num_layers],
            v: vec![Vec::new(); num_layers],
        }
    }

    fn kv_len(&self, cache: &CpuKvCache) -> usize {
        cache.len()
    }

    fn embed(&self, table: &[f16], ids: &[u32], dim: usize) -> CpuTensor {
        let mut data = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let row = &table[id as usize * dim..(id as usize + 1) * dim];
            data.extend(row.iter().map(|x| x.to_f32()));
        }
        CpuTensor::new(data, ids.len(), dim)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &[f16], eps: f32) -> CpuTensor {
        let mut out = x.clone();
        for row in out.data.chunks_exact_mut(x.cols) {
            ops::rms_norm_row(row, w, eps);
        }
        out
    }

    fn linear(&self, x: &CpuTensor, w: &[f16], bias: Option<&[f16]>, out_dim: usize) -> CpuTensor {
        let mut out = vec![0f32; x.rows * out_dim];
        matmul::matmul_f16(&x.data, w, bias, &mut out, x.rows, x.cols, out_dim);
        CpuTensor::new(out, x.rows, out_dim)
    }

    fn rope(&self, x: &mut CpuTensor, head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for (r, row) in x.data.chunks_exact_mut(x.cols).enumerate() {
            let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            for head in row.chunks_exact_mut(head_dim) {
                ops::rotate_half(head, c, s);
            }
        }
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        caches: &mut [&mut CpuKvCache],
        layer: usize,
        layout: &BatchLayout,
        shape: AttentionShape,
    ) -> CpuTensor {
        attention::attention(q, k, v, caches, layer, layout, shape)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> CpuTensor {
        let data = gate.data.iter().zip(&up.data).map(|(g, u)| ops::silu(*g) * u).collect();
        CpuTensor::new(data, gate.rows, gate.cols)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add of mismatched shapes");
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let data = rows.iter().flat_map(|&r| x.row(r).iter().copied()).collect();
        CpuTensor::new(data, rows.len(), x.cols)
    }

    fn to_host(&self, x: &CpuTensor) -> Vec<f32> {
        x.data.clone()
    }
}
