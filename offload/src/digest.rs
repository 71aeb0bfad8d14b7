//! Block digests: what a worker checks every weight byte against, whoever sent it.
//!
//! The coordinator reads the checkpoint once and computes the BLAKE3 digest of
//! every 1 MiB block of every tensor's *host-store* bytes (the f16
//! little-endian bytes [`Checkpoint::read_f16`] gives, whatever the dtype on
//! disk): block `k` of a tensor is bytes `[k MiB, (k+1) MiB)` of it, the last
//! one maybe short. The digests travel with the plan; a worker verifies every
//! block it loads or receives from a peer, so a buggy or compromised member
//! (or a corrupted local copy) cannot hand it wrong weights. The planner puts
//! shard boundaries on block boundaries, so one holder serves whole blocks.
//!
//! - [`BlockDigests`]: per tensor, its host byte length and one 32-byte digest per block.
//! - [`compute`]: one parallel pass over the checkpoint (rayon, block by block).
//! - [`covering`]: the block-aligned element range that contains a range.
//! - [`StreamCheck`]: blocks checked as a fetch's chunks arrive, on a thread of its own.
//!
//! ```ignore
//! let digests = digest::compute(&ckpt)?;
//! let range = digest::covering(numel, 2, wanted.clone());     // whole blocks
//! let bytes = fetch(range.clone());
//! for (k, block) in bytes.chunks(BLOCK_BYTES).enumerate() {
//!     digests.verify(tensor, range.start * 2 / BLOCK_BYTES as u64 + k as u64, block)?;
//! }
//! ```
mod stream;

pub use stream::{RangeVerdict, StreamCheck};

use std::collections::BTreeMap;
use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::plan::Plan;

/// Bytes per digested block: 1 MiB of host-store bytes.
pub const BLOCK_BYTES: usize = 1 << 20;

/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// One tensor's digests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TensorDigests {
    /// Host-store bytes of the tensor (`numel × 2`).
    pub bytes: u64,
    /// Block `k` covers bytes `[k · BLOCK_BYTES, min((k+1) · BLOCK_BYTES, bytes))`.
    pub blocks: Vec<Digest>,
}

impl TensorDigests {
    /// Blocks a tensor of `bytes` host bytes has.
    pub fn blocks_for(bytes: u64) -> u64 {
        bytes.div_ceil(BLOCK_BYTES as u64)
    }

    /// The host byte range of block `k`.
    pub fn block_range(&self, k: u64) -> Range<u64> {
        let start = k * BLOCK_BYTES as u64;
        start..(start + BLOCK_BYTES as u64).min(self.bytes)
    }
}

/// Why a block (or a set of digests) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The bytes are not the checkpoint's.
    #[error("tensor `{tensor}` block {block} (bytes {start}..{end}) does not match the checkpoint's digest")]
    Mismatch { tensor: String, block: u64, start: u64, end: u64 },
    #[error("no digests for tensor `{0}`")]
    Unknown(String),
    #[error("tensor `{tensor}` block {block}: expected {expected} bytes, got {got}")]
    Length { tensor: String, block: u64, expected: u64, got: u64 },
    #[error("invalid digests: {0}")]
    Invalid(String),
}

/// The digests of every block of every tensor of one checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockDigests {
    tensors: BTreeMap<String, TensorDigests>,
}

impl BlockDigests {
    /// From per-tensor digests, checked: each has exactly the blocks its size needs.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, TensorDigests)>,
    ) -> std::result::Result<Self, DigestError> {
        let mut map = BTreeMap::new();
        for (name, t) in tensors {
            if t.blocks.len() as u64 != TensorDigests::blocks_for(t.bytes) {
                return Err(DigestError::Invalid(format!(
                    "tensor `{name}` of {} bytes has {} block digests, expected {}",
                    t.bytes,
                    t.blocks.len(),
                    TensorDigests::blocks_for(t.bytes)
                )));
            }
            if map.insert(name.clone(), t).is_some() {
                return Err(DigestError::Invalid(format!("tensor `{name}` is listed twice")));
            }
        }
        Ok(Self { tensors: map })
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorDigests)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorDigests> {
        self.tensors.get(name)
    }

    /// Blocks in all.
    pub fn block_count(&self) -> u64 {
        self.tensors.values().map(|t| t.blocks.len() as u64).sum()
    }

    /// Checks `bytes` as block `block` of `tensor`.
    pub fn verify(&self, tensor: &str, block: u64, bytes: &[u8]) -> std::result::Result<(), DigestError> {
        let t = self.tensors.get(tensor).ok_or_else(|| DigestError::Unknown(tensor.to_string()))?;
        if block >= t.blocks.len() as u64 {
            return Err(DigestError::Invalid(format!(
                "tensor `{tensor}` has {} blocks; block {block} is outside it",
                t.blocks.len()
            )));
        }
        let range = t.block_range(block);
        if bytes.len() as u64 != range.end - range.start {
            return Err(DigestError::Length {
                tensor: tensor.to_string(),
                block,
                expected: range.end - range.start,
                got: bytes.len() as u64,
            });
        }
        if *blake3::hash(bytes).as_bytes() != t.blocks[block as usize] {
            return Err(DigestError::Mismatch {
                tensor: tensor.to_string(),
                block,
                start: range.start,
                end: range.end,
            });
        }
        Ok(())
    }

    /// Checks `bytes`, the host bytes of `tensor` from byte `start` (a block
    /// boundary) on, block by block; returns the blocks that do not match.
    /// Errors (unknown tensor, misaligned range) are not mismatches.
    pub fn bad_blocks(
        &self,
        tensor: &str,
        start: u64,
        bytes: &[u8],
    ) -> std::result::Result<Vec<u64>, DigestError> {
        if !start.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(DigestError::Invalid(format!(
                "tensor `{tensor}`: byte {start} is not on a block boundary"
            )));
        }
        let first = start / BLOCK_BYTES as u64;
        let mut bad = Vec::new();
        for (k, block) in bytes.chunks(BLOCK_BYTES).enumerate() {
            match self.verify(tensor, first + k as u64, block) {
                Ok(()) => {}
                Err(DigestError::Mismatch { block, .. }) => bad.push(block),
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    /// Ok when every tensor of `plan` has digests of its host size.
    pub fn check_plan(&self, plan: &Plan) -> std::result::Result<(), DigestError> {
        for t in plan.tensors() {
            let d =
                self.tensors.get(&t.meta.name).ok_or_else(|| DigestError::Unknown(t.meta.name.clone()))?;
            let bytes = t.numel() * u64::from(plan.elem_bytes());
            if d.bytes != bytes {
                return Err(DigestError::Invalid(format!(
                    "tensor `{}` has digests for {} bytes, the plan holds {bytes}",
                    t.meta.name, d.bytes
                )));
            }
        }
        Ok(())
    }
}

/// The smallest element range of whole blocks (the last clamped to the tensor's
/// `numel` elements) containing `elements`, for `elem_bytes`-byte elements.
pub fn covering(numel: u64, elem_bytes: u64, elements: Range<u64>) -> Range<u64> {
    let per_block = BLOCK_BYTES as u64 / elem_bytes;
    if elements.is_empty() {
        return elements;
    }
    let start = elements.start / per_block * per_block;
    let end = elements.end.div_ceil(per_block).saturating_mul(per_block).min(numel);
    start..end
}

/// The digests of every tensor of `ckpt`, over its f16 host bytes: one pass,
/// blocks hashed in parallel.
pub fn compute(ckpt: &Checkpoint) -> Result<BlockDigests> {
    let per_block = BLOCK_BYTES / 2;
    let jobs: Vec<(&str, usize, usize)> = ckpt
        .tensors()
        .flat_map(|t| {
            let numel = t.numel();
            (0..numel.div_ceil(per_block)).map(move |k| (t.name.as_str(), k, numel))
        })
        .collect();
    let hashes = jobs
        .par_iter()
        .map_init(
            || vec![f16::ZERO; per_block],
            |buf, &(name, k, numel)| {
                let range = k * per_block..((k + 1) * per_block).min(numel);
                let out = &mut buf[..range.len()];
                ckpt.read_f16_into(name, range, out)?;
                Ok(*blake3::hash(bytemuck::cast_slice::<f16, u8>(out)).as_bytes())
            },
        )
        .collect::<Result<Vec<Digest>>>()?;
    let mut tensors: BTreeMap<String, TensorDigests> = BTreeMap::new();
    for ((name, _, numel), hash) in jobs.into_iter().zip(hashes) {
        let t = tensors
            .entry(name.to_string())
            .or_insert_with(|| TensorDigests { bytes: numel as u64 * 2, blocks: Vec::new() });
        t.blocks.push(hash);
    }
    // Tensors with no elements have no blocks.
    for t in ckpt.tensors().filter(|t| t.numel() == 0) {
        tensors.entry(t.name.clone()).or_default();
    }
    Ok(BlockDigests { tensors })
}

/// What identifies a checkpoint's contents cheaply: each file's name, size and
/// modification time, as the checkpoint opened it (the identity its reads are
/// checked against). Stored digests are reused only under the same identity.
pub fn identity(ckpt: &Checkpoint) -> String {
    const NS: i128 = 1_000_000_000;
    let parts: Vec<String> = ckpt
        .file_stamps()
        .map(|(path, len, mtime_ns)| {
            let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            // Before the epoch (never on real files) reads as the epoch.
            let mtime_ns = mtime_ns.max(0);
            format!("{name}:{len}:{}.{:09}", mtime_ns / NS, mtime_ns % NS)
        })
        .collect();
    parts.join(",")
}

#[cfg(test)]
mod tests;
