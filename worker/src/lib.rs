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
//! - [`local`]: a whole model in this process on a chosen [`Device`](local::Device)
//!   (`generate`); [`bench`]: its throughput per batch size.
//! - [`node`]: a cluster worker: plans, gathers, the batching loop; its gRPC
//!   edge is the private `rpc` module, the only one naming protobuf types.
//! - [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty.
pub mod backend;

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod engine;
mod error;
pub mod local;
pub mod model;
pub mod node;
pub mod pinned;
pub mod placement;
mod rpc;
pub mod sampling;
pub mod source;
mod sync;
pub mod weights;

pub use backend::Backend;
pub use error::{Result, WorkerError};
