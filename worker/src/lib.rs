//! The zeroshard engine: model definitions written once against the [`Backend`]
//! op trait, the CPU and CUDA backends, the KV cache, the batching step and
//! sampling; and the cluster worker built on it.
//!
//! Public: [`engine`] (sequences and the batched step), [`local`] (a whole
//! model in this process on a chosen [`Device`](local::Device), for
//! `generate`), [`bench`], [`cpu`] (the reference backend, and its fault
//! injector for tests), [`cuda`] (cudarc, loaded at run time; [`cuda::probe`]
//! first), [`node`] (a cluster worker: plans, gathers, the batching loop).
//! Private: `backend` (the op trait), `model` (Llama, GPT-2, BLOOM computing a
//! layer from borrowed weights), `weights` and `source` (where a step's weights
//! come from), `placement` (sizing device memory), `sampling`, `pinned`, and
//! `rpc`, the gRPC edge: the only module that names protobuf types.
mod backend;

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod engine;
mod error;
pub mod local;
mod model;
pub mod node;
mod pinned;
mod placement;
mod rpc;
mod sampling;
mod source;
mod sync;
mod weights;

pub use backend::Backend;
pub use error::{Result, WorkerError};
