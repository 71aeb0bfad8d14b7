//! Token sampling (placeholder, being written).
