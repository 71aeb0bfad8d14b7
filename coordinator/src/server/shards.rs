//! `Shards` on the coordinator: serves element ranges straight from the
//! memory-mapped checkpoint, for workers started with `--pull`.
use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};
use zeroshard_offload::shards::{checksum, probe_chunks, ShardError, CHUNK_BYTES};
use zeroshard_proto::v1 as pb;

use super::Coordinator;
use crate::error::CoordinatorError;

pub(super) struct CheckpointShards(pub Coordinator);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ShardChunk, Status>> + Send>>;

#[tonic::async_trait]
impl zeroshard_proto::v1::shards_server::Shards for CheckpointShards {
    type FetchRangesStream = ChunkStream;
    type ProbeStream = ChunkStream;

    /// The same link probe a worker serves (a `--pull` worker's link to the coordinator).
    async fn probe(&self, req: Request<pb::ProbeRequest>) -> Result<Response<ChunkStream>, Status> {
        let chunks = probe_chunks(req.into_inner().bytes).map_err(CoordinatorError::from)?;
        Ok(Response::new(Box::pin(futures::stream::iter(chunks.map(|c| Ok(pb::ShardChunk::from(c)))))))
    }

    async fn fetch_ranges(
        &self,
        req: Request<pb::FetchRangesRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let r = req.into_inner();
        // Pulling happens while an epoch is being installed: accept that one
        // (the latest planned) and the active one.
        let (planned, active) = {
            let st = self.0.lock();
            (st.planned_epoch, st.plan.as_ref().map_or(0, |p| p.epoch()))
        };
        if r.epoch == 0 || (r.epoch != planned && r.epoch != active) {
            return Err(CoordinatorError::Precondition(format!(
                "epoch {} is neither the coordinator's planned epoch {planned} nor its active epoch {active}",
                r.epoch
            ))
            .into());
        }
        let ckpt = &self.0.model().ckpt;
        for t in &r.ranges {
            let info = ckpt.info(&t.tensor).map_err(CoordinatorError::from)?;
            if t.start > t.end || t.end > info.numel() as u64 {
                let (tensor, start, end) = (t.tensor.clone(), t.start, t.end);
                return Err(CoordinatorError::from(ShardError::InvalidRange { tensor, start, end }).into());
            }
        }
        let chunk_bytes = if r.chunk_bytes == 0 { CHUNK_BYTES } else { r.chunk_bytes as usize };
        let per_chunk = (chunk_bytes / 2).max(1) as u64;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let coord = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let ckpt = &coord.model().ckpt;
            for (i, t) in r.ranges.iter().enumerate() {
                let mut at = t.start;
                while at < t.end {
                    let end = (at + per_chunk).min(t.end);
                    let msg = match ckpt.read_f16(&t.tensor, at as usize..end as usize) {
                        Ok(v) => {
                            let data = bytes::Bytes::from(bytemuck::cast_slice::<half::f16, u8>(&v).to_vec());
                            Ok(pb::ShardChunk {
                                range_index: i as u32,
                                offset: (at - t.start) * 2,
                                crc32c: checksum(&data),
                                data,
                            })
                        }
                        Err(e) => Err(Status::from(CoordinatorError::from(e))),
                    };
                    let failed = msg.is_err();
                    if tx.blocking_send(msg).is_err() || failed {
                        return;
                    }
                    at = end;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
