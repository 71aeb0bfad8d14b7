//! Clients of other members' `Shards` service: a peer holding ranges this
//! worker gathers, or the coordinator serving ranges to a `--pull` worker.
//! [`PeerClient::fetch_into`] fills an [`Assembler`] from a `FetchRanges`
//! stream, verifying every chunk, refetching what is missing after a bad chunk
//! or a broken stream.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::transport::Channel;
use zeroshard_offload::shards::{Assembler, Chunk};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::shards_client::ShardsClient;
use zeroshard_security::Security;

use crate::error::{Result, WorkerError};

/// How hard one fetch tries before it gives up on a source.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FetchPolicy {
    /// Attempts in a row without progress.
    pub attempts: usize,
    /// Longest wait for the stream to start or for its next chunk.
    pub timeout: Duration,
}

/// A `Shards` client of one member.
#[derive(Clone)]
pub(crate) struct PeerClient {
    client: ShardsClient<Channel>,
}

impl PeerClient {
    /// A client for `uri` that connects on first use.
    pub(crate) fn lazy(security: &Security, uri: &str) -> Result<Self> {
        Ok(Self::new(connect_lazy(security, uri)?))
    }

    /// A client for `uri`, connected now.
    pub(crate) async fn connect(security: &Security, uri: &str) -> Result<Self> {
        Ok(Self::new(connect(security, uri).await?))
    }

    fn new(ch: Channel) -> Self {
        Self {
            client: ShardsClient::new(ch)
                .max_decoding_message_size(zeroshard_proto::transport::MAX_MESSAGE_BYTES),
        }
    }

    /// Fills `asm` from this member's `FetchRanges` stream under `epoch`. A rejected
    /// chunk (counted in `rejected`) or a broken stream restarts the fetch from what
    /// is still missing; it gives up after `policy.attempts` tries in a row without
    /// progress, or at once on a stale epoch. A source silent
    /// for `policy.timeout` counts as a broken stream. Errors name `source`.
    pub(crate) async fn fetch_into(
        &mut self,
        source: &str,
        epoch: u64,
        asm: &mut Assembler<'_>,
        rejected: &AtomicU64,
        policy: FetchPolicy,
    ) -> std::result::Result<(), String> {
        let mut last_error = String::new();
        let mut failures = 0;
        let silent = || format!("{source}: nothing received for {:?}", policy.timeout);
        while failures < policy.attempts {
            let before = asm.received_bytes();
            let ranges = asm.request().iter().map(pb::TensorRange::from).collect();
            let call = self.client.fetch_ranges(pb::FetchRangesRequest { epoch, ranges, chunk_bytes: 0 });
            let mut stream = match tokio::time::timeout(policy.timeout, call).await {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                    return Err(format!("{source}: {}", status.message()));
                }
                Ok(Err(status)) => {
                    last_error = format!("{source}: {}", status.message());
                    failures += 1;
                    continue;
                }
                Err(_) => {
                    last_error = silent();
                    failures += 1;
                    continue;
                }
            };
            let broke = loop {
                let Ok(next) = tokio::time::timeout(policy.timeout, stream.message()).await else {
                    break Some(silent());
                };
                match next {
                    Ok(Some(c)) => {
                        if let Err(e) = asm.accept(&Chunk::from(c)) {
                            rejected.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("zeroshard_rejected_chunks_total").increment(1);
                            tracing::warn!("chunk from {source} rejected, refetching: {e}");
                            break Some(e.to_string());
                        }
                    }
                    Ok(None) => break None,
                    Err(status) => break Some(format!("{source}: stream broke: {}", status.message())),
                }
            };
            match broke {
                None if asm.is_complete() => return Ok(()),
                None => last_error = format!("{source}: stream ended early"),
                Some(e) => last_error = e,
            }
            failures = if asm.received_bytes() > before { 1 } else { failures + 1 };
            asm.restart();
        }
        Err(format!("gave up after {} attempt(s) without progress: {last_error}", policy.attempts))
    }
}

/// A channel to `uri`, connected now, with the bulk-transfer HTTP/2 settings
/// and `security`'s credentials.
pub(crate) async fn connect(security: &Security, uri: &str) -> Result<Channel> {
    security
        .endpoint(uri)
        .map_err(|e| WorkerError::rpc(uri, e))?
        .connect()
        .await
        .map_err(|e| WorkerError::rpc(uri, e))
}

/// A channel to `uri` that connects on first use.
fn connect_lazy(security: &Security, uri: &str) -> Result<Channel> {
    Ok(security.endpoint(uri).map_err(|e| WorkerError::rpc(uri, e))?.connect_lazy())
}
