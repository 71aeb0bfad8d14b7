//! Flags of the operator commands: `launch` (under Slurm), `certs` and `cuda`.
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};

/// Launchers `launch` reads a task's place from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Launcher {
    /// SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURMD_NODENAME.
    Slurm,
}

#[derive(Args, Debug)]
pub(crate) struct LaunchArgs {
    /// The launcher whose environment describes this task.
    #[arg(long, value_enum)]
    pub from: Launcher,
    /// The coordinator's port on the first host of the job.
    #[arg(long, default_value_t = 50051, env = "ZEROSHARD_PORT")]
    pub port: u16,
    /// Rank 0 runs a worker too (with one task per GPU, its GPU would
    /// otherwise idle).
    #[arg(long, env = "ZEROSHARD_HEAD_WORKER", value_parser = BoolishValueParser::new())]
    pub head_worker: bool,
    /// Members' TLS: ca.pem, coordinator.pem/.key and worker.pem/.key (from
    /// `zeroshard certs`, with every host's name as a SAN). Without it,
    /// ZEROSHARD_INSECURE=1 must say that plaintext is meant.
    #[arg(long, env = "ZEROSHARD_CERTS_DIR")]
    pub certs_dir: Option<PathBuf>,
    /// The host workers dial the coordinator at (default: the first host of
    /// the job's node list).
    #[arg(long, env = "ZEROSHARD_COORDINATOR_HOST")]
    pub coordinator_host: Option<String>,
    /// Print this task's role and exit.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum CertsCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key (owner-only).
    Init {
        #[arg(long, env = "ZEROSHARD_CERTS_DIR")]
        dir: PathBuf,
    },
    /// Issue a certificate signed by DIR's CA: DIR/NAME.pem and DIR/NAME.key.
    Issue {
        #[arg(long, env = "ZEROSHARD_CERTS_DIR")]
        dir: PathBuf,
        /// coordinator, worker or client: what the holder may call.
        #[arg(long)]
        role: String,
        /// The holder's name (one per machine: each certificate's key is an
        /// identity of its own).
        #[arg(long)]
        name: String,
        /// A DNS name or IP address others dial the holder by (repeatable;
        /// members default to localhost, 127.0.0.1 and ::1).
        #[arg(long)]
        san: Vec<String>,
        /// Replace DIR/NAME.pem and .key if they exist, with a NEW key: a new
        /// identity, which the ids the old one registered are not handed to
        /// (to extend a certificate, `certs renew`).
        #[arg(long)]
        force: bool,
    },
    /// Re-sign DIR/NAME.pem with its own key for another year, in place
    /// (the identity stays: members it registered keep their ids); members
    /// reload it on SIGHUP or within 2 s.
    Renew {
        #[arg(long, env = "ZEROSHARD_CERTS_DIR")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Replace the certificate's DNS names and IP addresses (default: keep them).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Print a certificate's identity: its role, name and key
    /// (`sha256:…`, what bans and `--deny-certs` name).
    Show {
        /// A PEM certificate file.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CudaCommand {
    /// One JSON line: the CUDA driver, NVRTC and cuBLAS versions found, the
    /// devices, and why CUDA cannot be used when it cannot.
    Info,
    /// Compile every kernel with NVRTC for each architecture, to PTX and CUBIN;
    /// fails on any error or warning.
    Kernels(CudaKernelsArgs),
}

#[derive(Args, Debug)]
pub(crate) struct CudaKernelsArgs {
    /// Architectures, comma-separated (default: sm_80,sm_86,sm_89,sm_90, and
    /// sm_100 where this NVRTC has it).
    #[arg(long, value_delimiter = ',')]
    pub arch: Option<Vec<String>>,
    /// Write `<source>-compute_XY.ptx`, `<source>-sm_XY.cubin` and
    /// `launch.tsv` (each kernel's block size) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Text appended to every source (tests break a kernel on purpose with it).
    #[arg(long, hide = true)]
    pub append_source: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    /// The model (only its config.json is read), or its shape.
    #[command(flatten)]
    pub source: super::ModelOrShape,
    /// Workers the model is split over.
    #[arg(long)]
    pub workers: usize,
    /// Each way, between two workers, Gbit/s (default: 10).
    #[arg(long, default_value_t = 10.0)]
    pub link_gbps: f64,
    /// A message's round trip between two workers, µs (default: 50).
    #[arg(long, default_value_t = 50.0)]
    pub link_latency_us: f64,
    /// The rate a gather assembles ranges at when below the link's, Gbit/s
    /// (checks and copies; 6.2 measured with mTLS and digests on a 2-core
    /// machine, one worker gathering, `docs/benchmarks.md`).
    #[arg(long, default_value_t = 6.2)]
    pub gather_gbps: f64,
    /// One worker's compute, as measured on this machine (default), or given:
    /// multiply-add GFLOP/s at the f32 FMA peak, and GB/s it reads weights at.
    #[arg(long, requires = "worker_read_gbs")]
    pub worker_gflops: Option<f64>,
    #[arg(long, requires = "worker_gflops")]
    pub worker_read_gbs: Option<f64>,
    /// All workers on this machine (they share its cores and memory
    /// bandwidth: each gets 1/N of what is measured).
    #[arg(long)]
    pub colocated: bool,
    /// Comma-separated decode batch sizes.
    #[arg(long, default_value = "1,8,32")]
    pub batch: String,
    /// Prompt tokens of the predicted prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// The decode batch the choice is made for (a cluster's expected load).
    #[arg(long, default_value_t = 8)]
    pub choose_at: usize,
    /// Print the predictions as one JSON object.
    #[arg(long)]
    pub json: bool,
}
