//! zeroshard's wire protocol: the `.proto` files of the `zeroshard.v1` services
//! and their generated tonic/prost code.
//!
//! - `Inference` (client → coordinator): `Generate`, `GenerateStream`, `ClusterStatus`.
//! - `Worker` (coordinator → worker): `InstallPlan`, `ActivatePlan` (the two
//!   phases of a plan), `RunSequence`, `Cancel`, `Stats`.
//! - `Control` (worker → coordinator, embedded membership): `RegisterWorker`,
//!   `KeepAlive`, `Leave`.
//! - `Shards` (worker ↔ worker, coordinator → worker): `FetchRanges`, 1 MiB chunks,
//!   each with a CRC-32C of its payload.
//! - `TensorGroup` (worker → worker, the tensor placement): `Follow`, the
//!   rendezvous after which rank 0 and each member exchange step orders,
//!   activations and chosen tokens over one socket (framed by the worker).
//!
//! [`transport`] holds the HTTP/2 settings both ends use for bulk streams,
//! [`CHUNK_BYTES`] the payload of one `ShardChunk`, [`health`] the plaintext
//! `grpc.health.v1` server. TLS, roles and certificates are the
//! `zeroshard-security` crate's, built on these settings.
//!
//! Generated types stop at the RPC modules: each crate converts them to its domain
//! types in one `convert.rs`.
//!
//! ```ignore
//! use zeroshard_proto::v1::{shards_client::ShardsClient, FetchRangesRequest};
//! let mut client = ShardsClient::connect("http://127.0.0.1:50051").await?;
//! let mut chunks = client.fetch_ranges(FetchRangesRequest { epoch, ranges, chunk_bytes: 0 }).await?.into_inner();
//! ```

pub mod codec;
pub mod health;

/// Package `zeroshard.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("zeroshard.v1");
}

/// The metadata key an ABORTED step carries when the worker ended it only
/// because its plan epoch was replaced under it (a gather from a holder that
/// left, or a new role for the worker): value [`EPOCH_REPLACED`]. The
/// coordinator continues such a sequence at once, on any worker, and counts it
/// as moved, not as a failure.
pub const INTERRUPTED_KEY: &str = "zeroshard-interrupted";
/// See [`INTERRUPTED_KEY`].
pub const EPOCH_REPLACED: &str = "epoch-replaced";

/// Default payload size of a `ShardChunk` (1 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;

/// HTTP/2 settings for bulk tensor streams, on both ends: 1 MiB frames, large
/// windows, `tcp_nodelay` (measured on loopback: ~2 GB/s against ~1 GB/s with
/// tonic's defaults).
pub mod transport {
    use std::time::Duration;

    use tonic::transport::{Endpoint, Server};

    const FRAME: u32 = 1 << 20;
    const STREAM_WINDOW: u32 = 16 << 20;
    const CONN_WINDOW: u32 = 64 << 20;
    /// Largest message a client decodes: a chunk plus headroom.
    pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

    /// Streams one client may have open on one connection (a worker's peers
    /// fetch a few dozen ranges at once at most).
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

    /// A server tuned as above, with its connections bounded: at most
    /// [`MAX_STREAMS_PER_CONNECTION`] streams each, and a connection whose
    /// peer stops answering HTTP/2 pings (30 s apart, 10 s to answer) closed.
    pub fn server() -> Server {
        Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_frame_size(FRAME)
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONN_WINDOW))
            .tcp_nodelay(true)
    }

    /// Accepted connections of `listener`, with `TCP_NODELAY` (a server fed its
    /// own listener does not apply `Server::tcp_nodelay`).
    pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
    }

    /// An endpoint for `uri` (`http://host:port`), tuned the same way.
    pub fn endpoint(uri: &str) -> Result<Endpoint, tonic::transport::Error> {
        Ok(Endpoint::from_shared(uri.to_string())?
            .max_frame_size(FRAME)
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONN_WINDOW))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5)))
    }
}
