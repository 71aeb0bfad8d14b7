//! The zeroshard engine: model definitions written once against the [`Backend`] op
//! trait, the CPU backend, the KV cache, the batching step and sampling.
pub mod cpu;
pub mod sampling;
