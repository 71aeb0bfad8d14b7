//! The CPU backend: f16 weights, f32 activations and accumulation.
pub mod matmul;
