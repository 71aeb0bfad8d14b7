//! f16-weight matrix products with f32 activations (placeholder, being written).
