//! Checkpoints and host memory.
//!
//! This crate owns everything between a Hugging Face model folder and f16 bytes in
//! host memory:
//! - [`ModelConfig`]: `config.json` (+ `generation_config.json`) parsed into a raw
//!   serde struct, then validated once into the runtime config; errors name the key.
//! - [`Checkpoint`]: `model.safetensors` or sharded `model-0000x-of-0000N.safetensors`
//!   with its index, memory-mapped; the primitive is
//!   [`Checkpoint::read_f16_into`]: "elements `[a, b)` of tensor `T`, converted to
//!   f16", so a worker can load just the slice of every tensor it owns.
//! - [`model_file`]: how any file of a model folder is opened (a regular file,
//!   inside the folder, of bounded size).
//! - [`spec`]: the tensors each architecture stores (names, shapes, layers) and how
//!   each becomes the layout the model computes with.
//! - [`plan`]: the partition planner (a pure function of the checkpoint's tensors,
//!   the workers and the options).
//! - [`shards`]: owned slices in host memory, cut into checksummed chunks and
//!   assembled again on the receiving side (no I/O).
//! - [`digest`]: BLAKE3 digests of every 1 MiB block of every tensor's host bytes,
//!   computed from the checkpoint by the coordinator and checked by every worker.
//! - [`request`]: generation parameters, their validation, and finish reasons:
//!   what the coordinator checks and the worker runs.
//! - [`synthetic`]: random-weight models for benchmarks.
//! - [`staging`]: the bookkeeping of the device staging ring (`--prefetch-layers` deep).
//! - [`gpu_budget`]: splitting `--gpu-memory` into resident layers, KV cache and staging.
//!
//! ```no_run
//! # fn main() -> zeroshard_offload::Result<()> {
//! use zeroshard_offload::{Checkpoint, ModelConfig};
//! let dir = std::path::Path::new("models/stories260K");
//! let config = ModelConfig::from_dir(dir)?;
//! let ckpt = Checkpoint::open(dir)?;
//! let first_row = ckpt.read_f16("model.embed_tokens.weight", 0..config.hidden_size)?;
//! # Ok(()) }
//! ```
mod checkpoint;
mod config;
pub mod convert;
pub mod cost;
pub mod digest;
mod dtype;
mod error;
pub mod gpu_budget;
pub mod model_file;
pub mod out;
pub mod plan;
pub mod request;
pub mod shards;
pub mod spec;
pub mod staging;
pub mod sync;
pub mod synthetic;

pub use checkpoint::{
    parse_header, parse_index, Checkpoint, TensorInfo, MAX_HEADER_BYTES, MAX_TENSORS_PER_FILE,
};
pub use config::{
    Activation, Architecture, ModelConfig, Norm, PositionEncoding, RopeConfig, RopeScaling,
    BLOOM_MAX_POSITIONS, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS,
    MAX_VOCAB,
};
pub use dtype::DType;
pub use error::{OffloadError, Result};
