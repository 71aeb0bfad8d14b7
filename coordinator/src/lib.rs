//! The coordinator: plans the partition, keeps membership, serves clients.
//! It never links the engine (`zeroshard-engine`), the cluster worker
//! (`zeroshard-worker`) or CUDA: a coordinator host needs no GPU libraries
//! (`scripts/check-edges.sh` fails the test command if it does).
//!
//! - [`server`]: the gRPC services (`Inference` for clients, `Control` for
//!   workers of embedded membership, `Shards` for `--pull`), request
//!   validation, routing to the least loaded worker, resumption, and the
//!   supervisor that re-plans on joins and losses.
//! - [`membership`]: who is in the cluster ([`zeroshard_membership`], plus the
//!   embedded in-process implementation `zeroshard up` uses).
//! - [`tokenizer`] and [`text_stream`]: `tokenizer.json`, incremental
//!   detokenization, stop strings.
//! - [`request`]: a client's request and the answer, as `generate` and `query` share them;
//!   [`status`]: the cluster as `status` and `/metrics` show it.
//! - [`client`]: `query` and `status` against a running cluster;
//! - [`run`]: a coordinator's lifecycle (serve, wait ready, drain, close),
//!   for every command that runs one.
//! - [`up`] and [`launcher`]: a coordinator plus N local worker processes.
//! - [`cluster_bench`]: `bench --workers N`.
pub mod chat;
pub mod client;
pub mod cluster_bench;
mod convert;
mod error;
pub mod launcher;
pub mod membership;
pub mod request;
pub mod run;
pub mod server;
pub mod status;
pub mod text_stream;
pub mod tokenizer;
pub mod up;

pub use error::{CoordinatorError, ErrorKind, Result};
/// The partition planner (a pure function; lives with the host-memory types).
pub use zeroshard_offload::plan;
