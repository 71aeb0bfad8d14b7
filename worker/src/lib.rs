//! The cluster worker: a process that holds its slice of every weight, serves
//! it to peers (`Shards`), takes its plan and sequences from the coordinator
//! (`Worker`), and runs the continuous-batching loop of the engine
//! (`zeroshard-engine`) over layers it gathers.
//!
//! Public: [`node`] (the worker: [`node::run`], its config, its test hooks).
//! Private: `rpc`, the gRPC edge and the only module that names protobuf
//! types; `error` ([`WorkerError`], which wraps the engine's).
//!
//! ```ignore
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let registrar = Arc::new(ControlRegistrar::new("http://127.0.0.1:7000"));
//! node::run(NodeConfig::default(), registrar, listener, shutdown).await?;
//! ```
mod error;
pub mod node;
mod rpc;

pub use error::{Result, WorkerError};
