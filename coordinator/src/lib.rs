//! The coordinator: tokenizer, request handling around the engine, and (later)
//! the partition planner, membership and the client API.
//!
//! - [`tokenizer`]: `tokenizer.json`, incremental detokenization, stop strings.
//! - [`local`]: [`LocalModel`](local::LocalModel), a whole model on this node:
//!   text in, streamed text and token ids out.
pub mod bench;
pub mod convert;
pub mod launcher;
mod error;
pub mod local;
pub mod plan;
pub mod tokenizer;

pub use error::{CoordinatorError, Result};
