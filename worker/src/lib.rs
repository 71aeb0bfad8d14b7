//! The zeroshard engine: model definitions written once against the [`Backend`]
//! op trait, the CPU backend, the KV cache, the batching step and sampling.
//!
//! - [`backend`]: the op trait and the batch layout.
//! - [`cpu`]: the CPU backend (the reference).
//! - [`cuda`]: the CUDA backend (cudarc, loaded at run time; [`cuda::probe`] first).
//! - [`placement`]: sizing device memory and placing a model, or a cluster
//!   worker, on a GPU.
//! - [`model`]: the Llama family, computing a layer from borrowed weights.
//! - [`weights`]: a host store of f16 tensors (whole model, or gathered layers).
//! - [`engine`]: sequences, the batched step, sampling and stop conditions.
//! - [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty.
pub mod backend;
pub mod convert;
pub mod cpu;
pub mod cuda;
pub mod engine;
mod error;
pub mod model;
pub mod node;
pub mod placement;
pub mod sampling;
pub mod shards;
pub mod source;
pub mod weights;

pub use backend::Backend;
pub use error::{Result, WorkerError};
