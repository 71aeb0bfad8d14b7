//! Where a forward pass gets its weights, one piece at a time.
//!
//! A step asks for the embedding (for the ids it feeds), then each decoder
//! layer in order, then the head. The local source hands out the whole model
//! it holds; the cluster's source gathers each piece from peers, prefetching
//! the next ones and keeping some resident (see `zeroshard_worker::node`).
use std::ops::Range;
use std::sync::Arc;

use crate::error::Result;
use crate::weights::HostWeights;

/// Weights for one forward step, piece by piece, in forward order.
pub trait WeightSource: Send + Sync {
    /// Weights for the embedding pass over `ids`, and the ids to look up in them:
    /// a source may hold only the table rows `ids` need, renumbered.
    fn embedding(&self, ids: &[u32]) -> Result<(Arc<HostWeights>, Vec<u32>)>;
    /// Decoder layer `l`'s weights.
    fn layer(&self, l: usize) -> Result<Arc<HostWeights>>;
    /// Final norm and LM head.
    fn head(&self) -> Result<Arc<HostWeights>>;
    /// In how many vocabulary slices the LM head comes ([`Self::head_slice`]);
    /// 0: whole, with [`Self::head`].
    fn head_slices(&self) -> usize {
        0
    }
    /// Slice `i` of the LM head: weights holding [`HEAD_SLICE`] `[rows, hidden]`,
    /// and which vocabulary rows those are.
    fn head_slice(&self, i: usize) -> Result<(Arc<HostWeights>, Range<usize>)> {
        Err(crate::error::EngineError::MissingWeight(format!("head slice {i}: this source has none")))
    }
}

/// The name under which a head slice's rows are held.
pub const HEAD_SLICE: &str = "lm_head.slice";

/// A whole model held in host memory.
impl WeightSource for Arc<HostWeights> {
    fn embedding(&self, ids: &[u32]) -> Result<(Arc<HostWeights>, Vec<u32>)> {
        Ok((self.clone(), ids.to_vec()))
    }

    fn layer(&self, _l: usize) -> Result<Arc<HostWeights>> {
        Ok(self.clone())
    }

    fn head(&self) -> Result<Arc<HostWeights>> {
        Ok(self.clone())
    }
}
