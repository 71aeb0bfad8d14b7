//! The worker's gRPC edge, the only place in this crate that names generated
//! protobuf types or `tonic::Status`:
//! - [`service`]: the `Worker` and `Shards` services and [`run`](service::run),
//!   which serves them and registers the worker;
//! - [`convert`]: domain types ↔ messages, and the one `match` from
//!   [`WorkerError`](crate::WorkerError) to a status code;
//! - [`group`]: the tensor placement's connections (`TensorGroup.Follow`, both
//!   ends) and the frames its sockets carry;
//! - [`peer`]: the `Shards` client a gather (or a `--pull` load) reads through;
//! - [`control`]: the registrar of embedded membership (the coordinator's
//!   `Control` service).
pub(crate) mod control;
pub(crate) mod convert;
pub(crate) mod group;
pub(crate) mod peer;
pub(crate) mod service;
