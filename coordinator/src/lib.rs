//! The coordinator: tokenizer, request handling around the engine, and (later)
//! the partition planner, membership and the client API.
//!
//! - [`tokenizer`]: `tokenizer.json`, incremental detokenization, stop strings.
//! - [`local`]: [`LocalModel`](local::LocalModel), a whole model on this node:
//!   text in, streamed text and token ids out.
pub mod bench;
pub mod client;
pub mod cluster_bench;
mod convert;
mod error;
pub mod launcher;
pub mod local;
pub mod membership;
pub mod server;
pub mod tokenizer;
pub mod up;

pub use error::{CoordinatorError, Result};
/// The partition planner (a pure function; lives with the host-memory types).
pub use zeroshard_offload::plan;
