//! The integration tests: one test binary (one link instead of fifteen), one
//! module per area. Each drives the real `zeroshard` binary as separate
//! processes on loopback ports (and real etcd and Slurm where membership or a
//! launch is under test). `common` holds the shared helpers: where the fixtures
//! are, the greedy query, clusters and fleets.
//!
//! Run one area with a filter: `cargo test --release --test integration cluster::`.
//! Fault injection (`--fault-*` flags of `worker`) needs the binary built with
//! the `fault-injection` feature, as `scripts/test.sh` does.

mod common;

mod checkpoints;
mod cluster;
mod completions;
mod device;
mod digests;
mod errors;
mod etcd;
mod failover;
mod hub;
mod kernels;
mod limits;
mod liveness;
mod openai;
mod refs;
mod sampling;
mod security;
mod slurm;
mod tensor;
