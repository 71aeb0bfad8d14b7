//! The small op trait the model is written against.
//!
//! One model definition serves every device: the CPU backend here and the CUDA
//! backend implement the same dozen primitive ops. Each family uses a subset:
//! Llama `rms_norm`, `rope`, `silu_mul`; GPT-2 `layer_norm`, `add_position_embeddings`,
//! `gelu_tanh`; BLOOM `layer_norm`, `gelu_tanh` and ALiBi in `attention`. Activations are 2-D,
//! `[rows, cols]`, where the rows of one step are the new tokens of every
//! sequence in the batch, concatenated (see [`BatchLayout`]).

/// Which rows of a step's activations belong to which sequence.
#[derive(Clone, Debug, Default)]
pub struct BatchLayout {
    pub seqs: Vec<SeqSlot>,
}

/// One sequence's place in a step: rows `start..start + len` hold its new tokens,
/// which sit at positions `past..past + len` (after `past` cached tokens).
#[derive(Clone, Copy, Debug)]
pub struct SeqSlot {
    pub start: usize,
    pub len: usize,
    pub past: usize,
}

impl BatchLayout {
    /// Builds the layout from (new tokens, cached tokens) per sequence.
    pub fn new(parts: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut start = 0;
        let seqs = parts
            .into_iter()
            .map(|(len, past)| {
                let slot = SeqSlot { start, len, past };
                start += len;
                slot
            })
            .collect();
        Self { seqs }
    }

    /// Total rows (new tokens) in the step.
    pub fn rows(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.start + s.len)
    }

    /// Absolute position of every row.
    pub fn positions(&self) -> Vec<usize> {
        self.seqs.iter().flat_map(|s| s.past..s.past + s.len).collect()
    }

    /// The last row of every sequence (where its next-token logits come from).
    pub fn last_rows(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.start + s.len - 1).collect()
    }
}

/// Shape parameters of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape<'a> {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Attend only to the last `window` positions, if set.
    pub sliding_window: Option<usize>,
    /// ALiBi: one slope per head; head `h`'s score for key position `j` gains
    /// `slopes[h] * j` (BLOOM, see `model::alibi_slopes`).
    pub alibi_slopes: Option<&'a [f32]>,
}

/// Primitive ops over activations `Self::Tensor` and weights `Self::Weight`.
pub trait Backend: Send + Sync {
    /// Activations, `[rows, cols]`, f32 on the CPU.
    type Tensor;
    /// A weight as this backend reads it (CPU: a host f16 slice).
    type Weight: ?Sized;
    /// One sequence's keys and values for every layer.
    type KvCache: Send;

    fn name(&self) -> String;

    fn new_kv_cache(&self, num_layers: usize, kv_dim: usize) -> Self::KvCache;
    /// Tokens held by a cache.
    fn kv_len(&self, cache: &Self::KvCache) -> usize;

    /// Rows of `table` `[vocab, dim]` for each id → `[ids, dim]`.
    fn embed(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> Self::Tensor;
    /// `x += table[positions[r]]` for each row `r` (learned absolute positions;
    /// `table`: `[max_positions, cols]`; every position must be inside it).
    fn add_position_embeddings(&self, x: &mut Self::Tensor, table: &Self::Weight, positions: &[usize]);
    /// `x / rms(x) * w` per row (Llama RMSNorm, computed in f32).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `(x - mean(x)) / sqrt(var(x) + eps) * w + b` per row (`torch.nn.LayerNorm`,
    /// biased variance, computed in f32).
    fn layer_norm(&self, x: &Self::Tensor, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `x [rows, in] · wᵀ [out, in] (+ b)` → `[rows, out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out_dim: usize,
    ) -> Self::Tensor;
    /// Rotates each `head_dim` slice of each row by its row's angle table
    /// (`cos`/`sin`: `[rows, head_dim / 2]`, HF rotate-half layout).
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, cos: &[f32], sin: &[f32]);
    /// Appends `k`, `v` `[rows, kv_dim]` to each sequence's cache at `layer` and
    /// returns causal attention of `q` `[rows, heads * head_dim]` over the cache:
    /// `softmax(q·kᵀ / √head_dim + alibi) · v`.
    #[allow(clippy::too_many_arguments)] // q, k, v, caches, layer, layout and shape are all distinct
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        caches: &mut [&mut Self::KvCache],
        layer: usize,
        layout: &BatchLayout,
        shape: AttentionShape<'_>,
    ) -> Self::Tensor;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Self::Tensor;
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, elementwise (GELU's tanh
    /// approximation: GPT-2's `gelu_new`, BLOOM's `bloom_gelu_forward`).
    fn gelu_tanh(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Splits the columns of `x` `[rows, sum(widths)]` into `[rows, widths[i]]` pieces
    /// (a fused q|k|v projection into q, k and v).
    fn split_cols(&self, x: &Self::Tensor, widths: &[usize]) -> Vec<Self::Tensor>;
    /// `x += y`, elementwise.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    /// The given rows of `x`, in order.
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// Copies activations to host memory, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Vec<f32>;
}
