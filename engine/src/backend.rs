//! The small op trait the model is written against.
//!
//! One model definition serves every device: the CPU backend here and the CUDA
//! backend implement the same dozen primitive ops. Each family uses a subset:
//! Llama `rms_norm`, `rope`, `silu_mul`; GPT-2 `layer_norm`, `add_position_embeddings`,
//! `gelu_tanh`; BLOOM `layer_norm`, `gelu_tanh` and ALiBi in `attention`. Activations are 2-D,
//! `[rows, cols]`, where the rows of one step are the new tokens of every
//! sequence in the batch, concatenated (see [`BatchLayout`]).
//!
//! Weights reach a backend one *piece* at a time ([`Piece`]: the embedding, a
//! decoder layer, the head): the engine hands each piece's host tensors to
//! [`Backend::stage`] and reads them back with [`Backend::weight`]. The CPU reads
//! host memory as is; the CUDA backend copies the piece to the device (into a
//! resident cache, or a staging ring slot while the previous layer computes).
//!
//! Every op that touches a device returns [`Result`]: the CPU backend's are `Ok`
//! (or refuse an input outside the op's contract), the CUDA backend's carry the
//! driver, cuBLAS or NVRTC error as [`EngineError::Device`]. When a step's op
//! fails, the caches of that step's sequences may hold part of it (see
//! [`Engine`](crate::engine::Engine), which refuses to step them again);
//! [`EngineError::is_fatal`] says whether the backend may run later steps at all.
//!
//! [`EngineError::Device`]: crate::error::EngineError::Device
//! [`EngineError::is_fatal`]: crate::error::EngineError::is_fatal
use std::sync::Arc;

use crate::error::Result;
use crate::weights::HostWeights;

/// Which part of the model a set of weights is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Piece {
    /// Token (and position) embeddings.
    Embedding,
    /// Decoder layer `l`.
    Layer(usize),
    /// Final norm and LM head.
    Head,
    /// Slice `i` of the LM head (a source that sends the head in vocabulary slices).
    HeadSlice(usize),
}

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
    /// One piece's weights made readable by this backend (CPU: the host store).
    type Staged;

    fn name(&self) -> String;

    /// Makes the tensors `names` of `host` (those present; a name may resolve to
    /// a tensor shared with another) readable as [`Self::Weight`]s for `piece`.
    /// May start copies that finish later: [`Self::weight`] orders the compute
    /// that reads them after the copies.
    fn stage(&self, host: &Arc<HostWeights>, piece: Piece, names: &[String]) -> Result<Self::Staged>;
    /// A tensor of a staged piece, by name (`None`: not in the piece). The first
    /// lookup orders later compute after the piece's copies, which can fail.
    fn weight<'a>(&self, staged: &'a Self::Staged, name: &str) -> Result<Option<&'a Self::Weight>>;
    /// How many layers the engine should stage ahead of the one computing
    /// (0: stage each layer just before it runs).
    fn prefetch_depth(&self) -> usize {
        0
    }

    /// An empty cache for at most `max_tokens` tokens (admission reserved
    /// them; memory is taken as the cache fills, never more than that).
    fn new_kv_cache(&self, num_layers: usize, kv_dim: usize, max_tokens: usize) -> Self::KvCache;
    /// Bytes of one cached key or value element (f32 on the CPU, f16 on a GPU).
    fn kv_element_bytes(&self) -> usize;
    /// Tokens held by a cache.
    fn kv_len(&self, cache: &Self::KvCache) -> usize;

    /// Rows of `table` `[vocab, dim]` for each id → `[ids, dim]`.
    fn embed(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> Result<Self::Tensor>;
    /// `x += table[positions[r]]` for each row `r` (learned absolute positions;
    /// `table`: `[max_positions, cols]`; a position outside it is refused).
    fn add_position_embeddings(
        &self,
        x: &mut Self::Tensor,
        table: &Self::Weight,
        positions: &[usize],
    ) -> Result<()>;
    /// `x / rms(x) * w` per row (Llama RMSNorm, computed in f32).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor>;
    /// `(x - mean(x)) / sqrt(var(x) + eps) * w + b` per row (`torch.nn.LayerNorm`,
    /// biased variance, computed in f32).
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `x [rows, in] · wᵀ [out, in] (+ b)` → `[rows, out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out_dim: usize,
    ) -> Result<Self::Tensor>;
    /// Rotates each `head_dim` slice of each row by its row's angle table
    /// (`cos`/`sin`: `[rows, head_dim / 2]`, HF rotate-half layout).
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, cos: &[f32], sin: &[f32]) -> Result<()>;
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
    ) -> Result<Self::Tensor>;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, elementwise (GELU's tanh
    /// approximation: GPT-2's `gelu_new`, BLOOM's `bloom_gelu_forward`).
    fn gelu_tanh(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Splits the columns of `x` `[rows, sum(widths)]` into `[rows, widths[i]]` pieces
    /// (a fused q|k|v projection into q, k and v).
    fn split_cols(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>>;
    /// `x += y`, elementwise.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// The given rows of `x`, in order.
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// Copies activations to host memory, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Hands `x`'s values, row-major in host memory, to `f`, which changes them
    /// in place (the tensor placement's sums across a group), and keeps the
    /// result as `x` (a GPU copies them out and back).
    fn on_host(&self, x: &mut Self::Tensor, f: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()>;
}
