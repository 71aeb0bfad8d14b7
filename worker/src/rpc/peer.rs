//! Clients of other members' `Shards` service: a peer holding ranges this
//! worker gathers, or the coordinator serving ranges to a `--pull` worker.
//! [`PeerClient::fetch_into`] fills an [`Assembler`] from a `FetchRanges`
//! stream, verifying every chunk, refetching what is missing after a bad chunk
//! or a broken stream.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::transport::Channel;
use zeroshard_offload::digest::StreamCheck;
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
    /// for `policy.timeout` counts as a broken stream. Errors name `source`. Each
    /// accepted chunk also goes to `check`, when given.
    pub(crate) async fn fetch_into(
        &mut self,
        source: &str,
        epoch: u64,
        asm: &mut Assembler<'_>,
        rejected: &AtomicU64,
        policy: FetchPolicy,
        check: Option<&StreamCheck>,
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
                        let chunk = Chunk::from(c);
                        match asm.accept(&chunk) {
                            Ok((range, at)) => {
                                if let Some(check) = check {
                                    check.feed(range, at, chunk.data);
                                }
                            }
                            Err(e) => {
                                rejected.fetch_add(1, Ordering::Relaxed);
                                metrics::counter!("zeroshard_rejected_chunks_total").increment(1);
                                tracing::warn!("chunk from {source} rejected, refetching: {e}");
                                break Some(e.to_string());
                            }
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
/// and `security`'s credentials ([`Security::bulk_channel`]).
pub(crate) async fn connect(security: &Security, uri: &str) -> Result<Channel> {
    security.bulk_channel(uri).await.map_err(|e| WorkerError::rpc(uri, e))
}

/// A channel to `uri` that connects on first use.
fn connect_lazy(security: &Security, uri: &str) -> Result<Channel> {
    security.bulk_channel_lazy(uri).map_err(|e| WorkerError::rpc(uri, e))
}

/// A link as [`measure_link`] found it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkMeasure {
    /// The fastest empty round trip.
    pub round_trip_s: f64,
    /// The fastest bulk probe, received and checked, bytes per second.
    pub bytes_per_s: f64,
}

/// Empty round trips, and bulk probes, one measurement takes (the fastest of each counts).
const ROUND_TRIPS: usize = 8;
const BULK_PROBES: usize = 2;
/// Longest wait for one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Measures the link to the worker at `uri` over a connection like the ones
/// gathers use: the fastest of [`ROUND_TRIPS`] empty `Probe`s, then of
/// [`BULK_PROBES`] probes of `bulk_bytes`, each chunk checked as a gathered
/// one is (CRC-32C) and hashed as its blocks are (BLAKE3), so the rate is the
/// one a gather can assemble at.
pub(crate) async fn measure_link(security: &Security, uri: &str, bulk_bytes: u64) -> Result<LinkMeasure> {
    let fail = |why: String| WorkerError::rpc(uri, why);
    let mut client = tokio::time::timeout(PROBE_TIMEOUT, PeerClient::connect(security, uri))
        .await
        .map_err(|_| fail(format!("no connection within {PROBE_TIMEOUT:?}")))??
        .client;
    let mut probe = async |bytes: u64| -> Result<Duration> {
        let start = std::time::Instant::now();
        let run = async {
            let mut stream = client.probe(pb::ProbeRequest { bytes }).await?.into_inner();
            let mut received = 0u64;
            while let Some(c) = stream.message().await? {
                if zeroshard_offload::shards::checksum(&c.data) != c.crc32c {
                    return Err(tonic::Status::data_loss("a probe chunk failed its CRC-32C"));
                }
                std::hint::black_box(blake3::hash(&c.data));
                received += c.data.len() as u64;
            }
            if received != bytes {
                return Err(tonic::Status::data_loss(format!("the probe sent {received} bytes of {bytes}")));
            }
            Ok(())
        };
        match tokio::time::timeout(PROBE_TIMEOUT, run).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(status)) => Err(fail(status.message().to_string())),
            Err(_) => Err(fail(format!("a probe of {bytes} bytes took over {PROBE_TIMEOUT:?}"))),
        }
    };
    let mut round_trip = Duration::MAX;
    for _ in 0..ROUND_TRIPS {
        round_trip = round_trip.min(probe(0).await?);
    }
    let mut bulk = Duration::MAX;
    for _ in 0..BULK_PROBES {
        bulk = bulk.min(probe(bulk_bytes).await?);
    }
    Ok(LinkMeasure {
        round_trip_s: round_trip.as_secs_f64(),
        bytes_per_s: bulk_bytes as f64 / bulk.as_secs_f64().max(1e-9),
    })
}
