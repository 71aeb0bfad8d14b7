//! Loading the ranges a worker owns into host memory: from the checkpoint on
//! disk (only those byte ranges of the mapping are read), or pulled from a
//! `Shards` endpoint (`--pull`, no shared filesystem).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use half::f16;
use tonic::transport::Channel;
use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_offload::Checkpoint;
use zeroshard_proto::v1::shards_client::ShardsClient;

use crate::error::{Result, WorkerError};
use crate::shards::{Assembler, HostSlices, TensorRange};

/// The coordinator reads what it serves from disk: allow it a slow disk.
const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes per element of the host store (f16).
pub const ELEM_BYTES: usize = 2;

/// Reads `me`'s ranges of `plan` from `ckpt`.
/// `progress` counts the bytes loaded so far.
pub fn load_from_checkpoint(
    ckpt: &Checkpoint,
    plan: &Plan,
    me: WorkerId,
    progress: &AtomicU64,
) -> Result<HostSlices> {
    let start = Instant::now();
    let mut slices = HostSlices::new(ELEM_BYTES);
    for r in plan.owned_ranges(me).map_err(|e| WorkerError::Load(format!("plan: {e}")))? {
        let range = r.elements.start as usize..r.elements.end as usize;
        let data = ckpt.read_f16(&r.tensor.meta.name, range)?;
        progress.fetch_add((data.len() * ELEM_BYTES) as u64, Ordering::Relaxed);
        slices
            .insert(r.tensor.meta.name.clone(), r.elements.clone(), f16_bytes(data))
            .map_err(|e| WorkerError::Load(e.to_string()))?;
    }
    log_loaded(&slices, start);
    Ok(slices)
}

/// Receives `me`'s ranges of `plan` from the `Shards` service at `endpoint`.
/// `progress` counts the bytes received so far.
pub async fn load_from_pull(
    endpoint: &str,
    plan: &Plan,
    me: WorkerId,
    progress: &AtomicU64,
) -> Result<HostSlices> {
    let start = Instant::now();
    let channel = super::connect(endpoint).await?;
    let mut client = ShardsClient::new(channel);
    let owned = plan.owned_ranges(me).map_err(|e| WorkerError::Load(format!("plan: {e}")))?;
    let mut slices = HostSlices::new(ELEM_BYTES);
    // A few tensors per request keeps memory bounded and the stream busy.
    for batch in owned.chunks(16) {
        let ranges: Vec<TensorRange> =
            batch.iter().map(|r| TensorRange::new(r.tensor.meta.name.clone(), r.elements.clone())).collect();
        let mut bufs: Vec<Vec<u8>> =
            ranges.iter().map(|r| vec![0u8; r.len() as usize * ELEM_BYTES]).collect();
        pull(&mut client, plan.epoch(), &ranges, &mut bufs).await?;
        for (r, b) in ranges.into_iter().zip(bufs) {
            progress.fetch_add(b.len() as u64, Ordering::Relaxed);
            slices
                .insert(r.tensor, r.elements, Bytes::from(b))
                .map_err(|e| WorkerError::Load(e.to_string()))?;
        }
    }
    log_loaded(&slices, start);
    Ok(slices)
}

async fn pull(
    client: &mut ShardsClient<Channel>,
    epoch: u64,
    ranges: &[TensorRange],
    bufs: &mut [Vec<u8>],
) -> Result<()> {
    let dests = ranges.iter().cloned().zip(bufs.iter_mut().map(|b| b.as_mut_slice())).collect();
    let mut asm = Assembler::new(dests, ELEM_BYTES).map_err(|e| WorkerError::Load(e.to_string()))?;
    let rejected = std::sync::atomic::AtomicU64::new(0);
    let policy =
        super::gather::FetchPolicy { attempts: super::gather::FETCH_ATTEMPTS, timeout: PULL_TIMEOUT };
    super::gather::fetch_into(client, "pull", epoch, &mut asm, &rejected, policy)
        .await
        .map_err(WorkerError::Load)?;
    asm.finish().map_err(|e| WorkerError::Load(e.to_string()))
}

/// An f16 vector as little-endian bytes.
pub fn f16_bytes(data: Vec<f16>) -> Bytes {
    Bytes::from(bytemuck::cast_slice::<f16, u8>(&data).to_vec())
}

fn log_loaded(slices: &HostSlices, start: Instant) {
    let bytes = slices.held_bytes();
    let s = start.elapsed().as_secs_f64();
    tracing::info!(
        "loaded {:.1} MB of owned ranges in {:.2} s ({:.2} GB/s)",
        bytes as f64 / 1e6,
        s,
        bytes as f64 / s.max(1e-9) / 1e9
    );
}
