//! The zeroshard engine: one process's forward pass. Model definitions written
//! once against the [`Backend`] op trait, the CPU and CUDA backends, the KV
//! cache, the batching step and sampling. No tokio, no tonic: the cluster
//! worker (`zeroshard-worker`) and the binary's `generate` and `bench` drive it.
//!
//! Public: [`engine`] (sequences and the batched step), [`local`] (a whole
//! model in this process on a chosen [`Device`](local::Device), for
//! `generate`), [`bench`], [`cpu`] (the reference backend, and its fault
//! injector for tests), [`cuda`] (cudarc, loaded at run time; [`cuda::probe`]
//! first), [`source`] (where a step's weights come from: [`WeightSource`]),
//! [`weights`] (weights in host memory), [`placement`] (sizing device memory),
//! [`model`] (Llama, GPT-2, BLOOM computing a layer from borrowed weights),
//! [`tensor`] (a tensor-parallel member's shard and the group it sums with).
//! Private: `backend` (the op trait, re-exported), `sampling`, `pinned`.
//!
//! ```ignore
//! let engine = Engine::new(CpuBackend::new(), config, weights);
//! let mut seq = engine.new_sequence(prompt, params)?;
//! let tokens = engine.step(&mut [&mut seq])?;
//! ```
mod backend;

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod engine;
mod error;
pub mod local;
pub mod model;
mod pinned;
pub mod placement;
mod sampling;
pub mod source;
pub mod tensor;
pub mod weights;

pub use backend::Backend;
pub use error::{BoxError, EngineError, Result};
pub use source::WeightSource;
