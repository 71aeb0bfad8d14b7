//! The coordinator: tokenizer and (later) planner, membership and client API.
pub mod tokenizer;
