//! Loading the ranges a worker owns into host memory: from the checkpoint on
//! disk (only those byte ranges of the mapping are read), or pulled from a
//! `Shards` endpoint (`--pull`, no shared filesystem).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use half::f16;
use zeroshard_offload::digest::{covering, BlockDigests, DigestError, BLOCK_BYTES};
use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_offload::Checkpoint;
use zeroshard_security::Security;

use zeroshard_offload::shards::{Assembler, HostSlices, TensorRange};

use crate::error::{Result, WorkerError};
use crate::rpc::peer::{FetchPolicy, PeerClient};

/// The coordinator reads what it serves from disk: allow it a slow disk.
const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes per element of the host store (f16).
pub(super) const ELEM_BYTES: usize = 2;

/// `me`'s ranges of `plan`, split into what `held` (the ranges of the epoch
/// before) already has — copied into the returned slices, so the old epoch's
/// buffers can be freed — and the ranges still to load. Returns the reused bytes.
pub(super) fn reuse(
    plan: &Plan,
    me: WorkerId,
    held: Option<&HostSlices>,
) -> Result<(HostSlices, Vec<TensorRange>, u64)> {
    let mut slices = HostSlices::new(ELEM_BYTES);
    let mut missing = Vec::new();
    let mut reused = 0u64;
    for r in plan.owned_ranges(me)? {
        let name = &r.tensor.meta.name;
        let mut at = r.elements.start;
        for (part, bytes) in held.map(|h| h.held_parts(name, r.elements.clone())).unwrap_or_default() {
            if part.start > at {
                missing.push(TensorRange::new(name.clone(), at..part.start));
            }
            reused += bytes.len() as u64;
            slices.insert(name.clone(), part.clone(), Bytes::copy_from_slice(&bytes))?;
            at = part.end;
        }
        if at < r.elements.end || r.elements.is_empty() {
            missing.push(TensorRange::new(name.clone(), at..r.elements.end));
        }
    }
    Ok((slices, missing, reused))
}

/// Reads `ranges` from `ckpt` into `slices`, each through the whole blocks that
/// cover it, every one checked against `digests`: a copy of the checkpoint that
/// differs from the coordinator's is refused, naming the tensor and block.
/// `progress` counts the bytes read.
pub(super) fn read_ranges(
    ckpt: &Checkpoint,
    ranges: &[TensorRange],
    digests: &BlockDigests,
    slices: &mut HostSlices,
    progress: &AtomicU64,
) -> Result<()> {
    let start = Instant::now();
    for r in ranges {
        let numel = ckpt.info(&r.tensor)?.numel() as u64;
        let blocks = covering(numel, ELEM_BYTES as u64, r.elements.clone());
        let data = ckpt.read_f16(&r.tensor, blocks.start as usize..blocks.end as usize)?;
        let bytes = bytemuck::cast_slice::<f16, u8>(&data);
        check(digests, &r.tensor, blocks.start, bytes).map_err(|source| {
            tracing::error!("refusing the checkpoint at {}: {source}", ckpt.dir().display());
            WorkerError::CorruptCopy { path: ckpt.dir().to_path_buf(), source }
        })?;
        let part = keep(r, blocks.start, bytes);
        progress.fetch_add(part.len() as u64, Ordering::Relaxed);
        slices.insert(r.tensor.clone(), r.elements.clone(), part)?;
    }
    log_loaded(ranges, start);
    Ok(())
}

/// Ok when every block of `bytes` (tensor `tensor` from element `first`, a
/// block boundary) matches its digest; else the first that does not.
pub(super) fn check(
    digests: &BlockDigests,
    tensor: &str,
    first: u64,
    bytes: &[u8],
) -> std::result::Result<(), DigestError> {
    let first_block = first * ELEM_BYTES as u64 / BLOCK_BYTES as u64;
    for (k, block) in bytes.chunks(BLOCK_BYTES).enumerate() {
        digests.verify(tensor, first_block + k as u64, block)?;
    }
    Ok(())
}

/// The bytes of `r` out of `bytes`, the whole blocks from element `first` on.
fn keep(r: &TensorRange, first: u64, bytes: &[u8]) -> Bytes {
    let from = ((r.elements.start - first) as usize) * ELEM_BYTES;
    Bytes::copy_from_slice(&bytes[from..from + r.len() as usize * ELEM_BYTES])
}

/// Receives `ranges` under `epoch` from the `Shards` service at `endpoint` into
/// `slices`, each through the whole blocks that cover it, every one checked
/// against `digests`; `progress` counts the bytes received.
pub(super) async fn pull_ranges(
    security: &Security,
    endpoint: &str,
    epoch: u64,
    ranges: &[TensorRange],
    digests: &BlockDigests,
    slices: &mut HostSlices,
    progress: &AtomicU64,
) -> Result<()> {
    let start = Instant::now();
    let mut client = PeerClient::connect(security, endpoint).await?;
    // A few tensors per request keeps memory bounded and the stream busy.
    for batch in ranges.chunks(16) {
        let mut blocks = Vec::with_capacity(batch.len());
        for r in batch {
            let numel = digests.tensor(&r.tensor).map_or(0, |t| t.bytes) / ELEM_BYTES as u64;
            let elements = covering(numel, ELEM_BYTES as u64, r.elements.clone());
            blocks.push(TensorRange::new(r.tensor.clone(), elements));
        }
        let mut bufs: Vec<Vec<u8>> =
            blocks.iter().map(|r| vec![0u8; r.len() as usize * ELEM_BYTES]).collect();
        pull(&mut client, epoch, &blocks, &mut bufs).await?;
        for ((r, b), buf) in batch.iter().zip(&blocks).zip(bufs) {
            check(digests, &r.tensor, b.elements.start, &buf).map_err(|source| {
                tracing::error!("refusing what {endpoint} sent: {source}");
                WorkerError::Gather(format!("pulling from {endpoint}: {source}"))
            })?;
            let part = keep(r, b.elements.start, &buf);
            progress.fetch_add(part.len() as u64, Ordering::Relaxed);
            slices.insert(r.tensor.clone(), r.elements.clone(), part)?;
        }
    }
    log_loaded(ranges, start);
    Ok(())
}

async fn pull(
    client: &mut PeerClient,
    epoch: u64,
    ranges: &[TensorRange],
    bufs: &mut [Vec<u8>],
) -> Result<()> {
    let dests = ranges.iter().cloned().zip(bufs.iter_mut().map(|b| b.as_mut_slice())).collect();
    let mut asm = Assembler::new(dests, ELEM_BYTES)?;
    let rejected = std::sync::atomic::AtomicU64::new(0);
    let policy = FetchPolicy { attempts: super::gather::FETCH_ATTEMPTS, timeout: PULL_TIMEOUT };
    client.fetch_into("pull", epoch, &mut asm, &rejected, policy, None).await.map_err(WorkerError::Gather)?;
    Ok(asm.finish()?)
}

fn log_loaded(ranges: &[TensorRange], start: Instant) {
    let bytes: u64 = ranges.iter().map(|r| r.len() * ELEM_BYTES as u64).sum();
    let s = start.elapsed().as_secs_f64();
    tracing::info!(
        "loaded {:.1} MB of owned ranges in {:.2} s ({:.2} GB/s)",
        bytes as f64 / 1e6,
        s,
        bytes as f64 / s.max(1e-9) / 1e9
    );
}

#[cfg(test)]
mod tests {
    use zeroshard_offload::plan::{plan, PlanOptions, TensorMeta};

    use super::*;

    /// The bytes of `tensor[elements]` in a made-up checkpoint.
    fn content(tensor: &str, elements: std::ops::Range<u64>) -> Bytes {
        let seed = tensor.len() as u64;
        elements.flat_map(|e| ((e * 7 + seed) as u16).to_le_bytes()).collect::<Vec<u8>>().into()
    }

    #[test]
    fn a_new_epoch_copies_what_was_held_and_loads_only_the_rest() {
        // Whole blocks are placed: 8 and 3 blocks.
        let block = (zeroshard_offload::digest::BLOCK_BYTES / ELEM_BYTES) as u64;
        let meta = vec![
            TensorMeta::new("w", vec![8, block], Some(0)),
            TensorMeta::new("head", vec![3, block], None),
        ];
        let opts = |epoch| PlanOptions { epoch, persistence_threshold_bytes: 64, ..PlanOptions::default() };
        let three: Vec<WorkerId> = (1..=3).map(WorkerId).collect();
        let old = plan(&meta, &three, &opts(1)).expect("plan");
        let me = WorkerId(2);
        let mut held = HostSlices::new(ELEM_BYTES);
        for r in old.owned_ranges(me).expect("owned") {
            held.insert(
                r.tensor.meta.name.clone(),
                r.elements.clone(),
                content(&r.tensor.meta.name, r.elements.clone()),
            )
            .expect("insert");
        }
        // Worker 3 is lost: worker 2 now owns half of everything.
        let new = plan(&meta, &[WorkerId(1), me], &opts(2)).expect("plan");
        let (mut slices, missing, reused) = reuse(&new, me, Some(&held)).expect("reuse");
        assert!(reused > 0 && !missing.is_empty());
        let loaded: u64 = missing.iter().map(|r| r.len() * ELEM_BYTES as u64).sum();
        let owned = new.owned_bytes(me).expect("owned").total();
        assert_eq!(reused + loaded, owned, "every owned byte is reused or loaded, once");
        for r in &missing {
            slices
                .insert(r.tensor.clone(), r.elements.clone(), content(&r.tensor, r.elements.clone()))
                .expect("insert");
        }
        for r in new.owned_ranges(me).expect("owned") {
            let range = TensorRange::new(r.tensor.meta.name.clone(), r.elements.clone());
            let got: Vec<u8> = slices.pieces(&range).expect("held").concat();
            assert_eq!(got, content(&r.tensor.meta.name, r.elements.clone()), "{}", r.tensor.meta.name);
        }
        // Nothing held: everything is loaded.
        let (_, all, none) = reuse(&new, me, None).expect("reuse");
        assert_eq!(none, 0);
        assert_eq!(all.iter().map(|r| r.len() * ELEM_BYTES as u64).sum::<u64>(), owned);
    }
}
