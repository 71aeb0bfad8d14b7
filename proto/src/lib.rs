//! zeroshard's wire protocol: the `.proto` files of the `zeroshard.v1` services
//! and their generated tonic/prost code.
//!
//! - `Inference` (client → coordinator): `Generate`, `GenerateStream`, `ClusterStatus`.
//! - `Worker` (coordinator → worker): `InstallPlan`, `RunSequence`, `Cancel`, `Stats`.
//! - `Control` (worker → coordinator): `RegisterWorker`.
//! - `Shards` (worker ↔ worker, coordinator → worker): `FetchRanges`, 1 MiB chunks,
//!   each with a CRC-32C of its payload.
//!
//! Generated types stop at the RPC modules: each crate converts them to its domain
//! types in one `convert.rs`.
//!
//! ```ignore
//! use zeroshard_proto::v1::{shards_client::ShardsClient, FetchRangesRequest};
//! let mut client = ShardsClient::connect("http://127.0.0.1:50051").await?;
//! let mut chunks = client.fetch_ranges(FetchRangesRequest { epoch, ranges, chunk_bytes: 0 }).await?.into_inner();
//! ```

/// Package `zeroshard.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("zeroshard.v1");
}

/// Default payload size of a `ShardChunk` (1 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;
