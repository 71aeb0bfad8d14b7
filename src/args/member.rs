//! Flags of the cluster members: `up`, `coordinator` and `worker`, and the
//! groups they share (the cluster, TLS, etcd, placement, admission, health and
//! metrics listeners; the worker's test hooks with the `fault-injection` feature).
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::Args;

use super::ModelArg;
use zeroshard_engine::local::Device;

/// A cluster member's TLS credentials (`zeroshard certs`). Without them a
/// member serves plaintext, which it does only on a loopback address unless
/// `--insecure` is given.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct MemberTlsArgs {
    /// The cluster CA's certificate (PEM).
    #[arg(long, env = "ZEROSHARD_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This member's certificate (PEM; reloaded on SIGHUP or when the file changes).
    #[arg(long, env = "ZEROSHARD_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This member's private key (PEM).
    #[arg(long, env = "ZEROSHARD_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// Revoked certificates: one key per line (`sha256:…`, as `zeroshard certs
    /// show` prints it; `#` comments). A listed key fails every handshake with
    /// this member and every call on a connection it opened before. Reloaded
    /// with the certificates (SIGHUP, or within 2 s of a change).
    #[arg(long, env = "ZEROSHARD_DENY_CERTS", requires = "tls_ca")]
    pub deny_certs: Option<PathBuf>,
    /// Serve plaintext, with no authentication of members, even on a
    /// non-loopback address (logs a warning).
    #[arg(long, env = "ZEROSHARD_INSECURE", conflicts_with = "tls_ca", value_parser = BoolishValueParser::new())]
    pub insecure: bool,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Tensors smaller than this many bytes (f16) are replicated on every worker.
    #[arg(long, default_value_t = 65536, env = "ZEROSHARD_PERSISTENCE_THRESHOLD_BYTES")]
    pub persistence_threshold_bytes: u64,
    /// Workers receive their ranges from the coordinator instead of reading the checkpoint.
    #[arg(long, env = "ZEROSHARD_PULL", value_parser = BoolishValueParser::new())]
    pub pull: bool,
    /// Every range is held by this many workers: with 2, losing a worker causes
    /// no reload (gathers fail over to the other holder). With `--placement
    /// tensor`: this many tensor-parallel groups.
    #[arg(long, default_value_t = 1, env = "ZEROSHARD_REPLICAS")]
    pub replicas: u32,
    #[command(flatten)]
    pub placement: PlacementChoice,
    /// A worker that misses its keep-alives for this long is lost (lease TTL;
    /// keep-alives go every third of it).
    #[arg(long, default_value_t = 5, env = "ZEROSHARD_LEASE_TTL_SECS")]
    pub lease_ttl_secs: u64,
    /// A worker that has not installed a new plan within this many seconds,
    /// plus 1 s per 50 MB of ranges it loads, is evicted and the epoch is
    /// planned without it (requests go on under the current epoch meanwhile).
    #[arg(long, default_value_t = 30, env = "ZEROSHARD_INSTALL_TIMEOUT_SECS")]
    pub install_timeout_secs: u64,
    /// The fraction of finished sequences re-checked on another worker (or
    /// tensor-parallel group) with one prefill over prompt + generated tokens:
    /// a member whose tokens the model would not have chosen is banned by its
    /// certificate's key and planned around. 0 turns audits off.
    #[arg(long, default_value_t = 0.02, env = "ZEROSHARD_AUDIT_FRACTION")]
    pub audit_fraction: f64,
    #[command(flatten)]
    pub limits: RequestLimitArgs,
    /// On SIGTERM: refuse new requests (UNAVAILABLE, so clients retry
    /// elsewhere) and give running ones this long to finish; then those still
    /// running end with UNAVAILABLE and the process exits 0. A second signal
    /// exits at once.
    #[arg(long, default_value_t = 30, env = "ZEROSHARD_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
}

/// What the coordinator takes in: each bound refuses at once, before any work.
#[derive(Args, Debug, Clone)]
pub(crate) struct RequestLimitArgs {
    /// Requests waiting for a worker with room, at most; past it a request
    /// gets RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = 256, env = "ZEROSHARD_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: usize,
    /// Bytes of prompt text, at most; checked before tokenizing (default: 64
    /// bytes per position of the model's context).
    #[arg(long, env = "ZEROSHARD_MAX_PROMPT_BYTES")]
    pub max_prompt_bytes: Option<usize>,
    /// A running sequence whose worker sends nothing for this long (or eight
    /// times its measured step time, if longer, plus its prompt's measured
    /// prefill time) resumes on another worker.
    #[arg(long, default_value_t = 10_000, env = "ZEROSHARD_STEP_DEADLINE_MS")]
    pub step_deadline_ms: u64,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct EtcdArgs {
    /// etcd endpoints, comma-separated (http://10.0.0.5:2379,...): workers
    /// register there and the coordinator keeps the plan there. Without it,
    /// membership is embedded in the coordinator.
    #[arg(long, value_delimiter = ',', env = "ZEROSHARD_ETCD")]
    pub etcd: Vec<String>,
    /// Name of this cluster: its keys live under /zeroshard/NAME/ in etcd.
    #[arg(long, default_value = "default", env = "ZEROSHARD_CLUSTER")]
    pub cluster: String,
    /// etcd's CA certificate: connect over TLS (endpoints https://).
    #[arg(long, env = "ZEROSHARD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd (when it asks for one).
    #[arg(long, env = "ZEROSHARD_ETCD_CERT", requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "ZEROSHARD_ETCD_KEY", requires_all = ["etcd_ca", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd `auth enable`); its password comes from --etcd-password-file.
    #[arg(long, env = "ZEROSHARD_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "ZEROSHARD_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

/// Where the engine computes and how it places weights: one group for
/// `generate`, `bench`, `up` and `worker`.
#[derive(Args, Debug, Clone, PartialEq)]
pub(crate) struct PlacementArgs {
    /// Where to compute: auto (CUDA device 0 when CUDA is present, else the
    /// CPU), cpu, cuda[:N].
    #[arg(long, default_value = "auto", env = "ZEROSHARD_DEVICE")]
    pub device: Device,
    /// GPU: device memory to use in all, in bytes: resident layers, KV cache
    /// and staging are sized from it; refused, with the numbers, when not even
    /// one layer fits (default: 90% of the free device memory).
    #[arg(long, env = "ZEROSHARD_GPU_MEMORY")]
    pub gpu_memory: Option<u64>,
    /// Bytes of layers kept resident. One process (`generate`, `bench`): on a
    /// GPU, device bytes of resident layers (default: all that fit; 0: stream
    /// every layer from pinned host memory each step). Cluster workers:
    /// gathered layers kept resident per worker (default 0: re-gather every
    /// step; on a GPU, the device bytes of them).
    #[arg(long, env = "ZEROSHARD_MAX_LIVE_BYTES")]
    pub max_live_bytes: Option<u64>,
    /// Layers copied to the device, or gathered from peers, ahead of the one computing.
    #[arg(long, default_value_t = 2, env = "ZEROSHARD_PREFETCH_LAYERS")]
    pub prefetch_layers: usize,
    /// CPU compute threads (default: one per core this process may run on; `up` and
    /// `bench --workers N` give each of their N local CPU workers an equal share).
    #[arg(long, env = "ZEROSHARD_THREADS", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub threads: Option<u64>,
}

impl PlacementArgs {
    /// Sizes this process's compute pool from `--threads` (before any engine exists).
    pub(crate) fn apply_threads(&self) {
        zeroshard_engine::engine::set_compute_threads(self.threads.map(|t| t as usize));
    }
}

/// How a cluster worker gathers from its peers.
#[derive(Args, Debug, Clone, PartialEq)]
pub(crate) struct GatherArgs {
    /// Bytes gathered ahead beyond the first prefetched layer (keeps a large
    /// head or layer from stacking with the next ones in memory).
    #[arg(long, default_value_t = 24 << 20, env = "ZEROSHARD_PREFETCH_BYTES")]
    pub prefetch_bytes: u64,
    /// A peer that sends nothing for this long during a fetch has failed: the
    /// fetch moves to another holder of the range, or is retried.
    #[arg(long, default_value_t = 2000, env = "ZEROSHARD_FETCH_TIMEOUT_MS")]
    pub fetch_timeout_ms: u64,
}

/// What a cluster worker admits.
#[derive(Args, Debug, Clone, PartialEq)]
pub(crate) struct AdmissionArgs {
    /// KV-cache bytes the sequences running on a worker may reserve together:
    /// a sequence is admitted only when its prompt + max_new_tokens fits
    /// (default: on the CPU, half the memory available at the first plan less
    /// the ranges it holds, or under `up` half the host's available memory
    /// split between its workers; on a GPU, what the device placement reserves).
    #[arg(long, env = "ZEROSHARD_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Sequences a worker runs at once, at most.
    #[arg(long, default_value_t = 64, env = "ZEROSHARD_MAX_ACTIVE_SEQUENCES")]
    pub max_active_sequences: usize,
}

/// What every worker of a cluster is started with (`up`, `worker`, `bench --workers`).
#[derive(Args, Debug, Clone, PartialEq)]
pub(crate) struct WorkerTuning {
    #[command(flatten)]
    pub placement: PlacementArgs,
    #[command(flatten)]
    pub gather: GatherArgs,
    #[command(flatten)]
    pub admission: AdmissionArgs,
}

impl WorkerTuning {
    /// The arguments that give a `worker` process these options, with the
    /// device already resolved (`cpu` or `cuda:N`). Every field is written;
    /// a test parses them back into an equal value, so a field added here and
    /// not carried fails it.
    pub(crate) fn to_args(&self, cuda: Option<usize>) -> Vec<String> {
        let WorkerTuning {
            placement: PlacementArgs { device: _, gpu_memory, max_live_bytes, prefetch_layers, threads },
            gather: GatherArgs { prefetch_bytes, fetch_timeout_ms },
            admission: AdmissionArgs { kv_cache_bytes, max_active_sequences },
        } = self;
        let mut args = vec![
            format!("--device={}", cuda.map_or_else(|| "cpu".into(), |n| format!("cuda:{n}"))),
            format!("--prefetch-layers={prefetch_layers}"),
            format!("--prefetch-bytes={prefetch_bytes}"),
            format!("--fetch-timeout-ms={fetch_timeout_ms}"),
            format!("--max-active-sequences={max_active_sequences}"),
        ];
        args.extend(gpu_memory.map(|b| format!("--gpu-memory={b}")));
        args.extend(max_live_bytes.map(|b| format!("--max-live-bytes={b}")));
        args.extend(kv_cache_bytes.map(|b| format!("--kv-cache-bytes={b}")));
        args.extend(threads.map(|t| format!("--threads={t}")));
        args
    }

    /// [`Self::to_args`] for `workers` CPU workers sharing this host: without
    /// `--threads`, each gets an equal share of this process's cores, so that their
    /// compute pools together never outnumber the cores.
    pub(crate) fn to_local_args(&self, cuda: Option<usize>, workers: usize) -> Vec<String> {
        let mut args = self.to_args(cuda);
        if self.placement.threads.is_none() && cuda.is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            args.push(format!("--threads={}", (cores / workers.max(1)).max(1)));
        }
        args
    }
}

/// Plaintext health for launchers' probes.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct HealthArgs {
    /// Also serve grpc.health.v1, and nothing else, in plaintext on this
    /// address (Kubernetes' gRPC probes speak no TLS): SERVING while this
    /// member serves (coordinator: the cluster is ready; worker: registered),
    /// NOT_SERVING once it drains.
    #[arg(long, env = "ZEROSHARD_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

/// A worker's Prometheus endpoint.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct MetricsArgs {
    /// Serve this worker's metrics (step times, batch sizes, gather bytes and
    /// times, fail-overs, rejected chunks) as plain HTTP `GET /metrics` here.
    #[arg(long, env = "ZEROSHARD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2, env = "ZEROSHARD_WORKERS")]
    pub workers: usize,
    /// Address of the client API (port 0: the OS picks; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:50051", env = "ZEROSHARD_LISTEN")]
    pub listen: String,
    #[command(flatten)]
    pub tuning: WorkerTuning,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Plaintext between all members and for clients, instead of mTLS with
    /// an ephemeral CA (logs a warning).
    #[arg(long, env = "ZEROSHARD_INSECURE", value_parser = BoolishValueParser::new())]
    pub insecure: bool,
    /// Client API keys, one per line: clients present one instead of the
    /// client certificate (the bundle `up` leaves then holds only the CA).
    /// Without it, --http-listen makes a key of its own: the file `api-key` in
    /// the client bundle folder (the `credentials` line names it).
    #[arg(long, env = "ZEROSHARD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Serve --http-listen (on loopback only) without any API key: every
    /// local user may call it (logs a warning).
    #[arg(long, env = "ZEROSHARD_HTTP_OPEN", value_parser = BoolishValueParser::new())]
    pub http_open: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CoordinatorArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Workers to wait for before planning the partition.
    #[arg(long, env = "ZEROSHARD_WORKERS")]
    pub workers: usize,
    /// Address to serve on (a non-loopback one needs TLS credentials, or --insecure).
    #[arg(long, default_value = "127.0.0.1:50051", env = "ZEROSHARD_LISTEN")]
    pub listen: String,
    /// Address workers and clients reach this coordinator at, HOST:PORT or
    /// grpc(s)://HOST:PORT (default: the bound address).
    #[arg(long, env = "ZEROSHARD_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Once the cluster is ready, write its endpoint (grpcs://HOST:PORT) to
    /// this file (replaced atomically) as well as printing it.
    #[arg(long, env = "ZEROSHARD_ENDPOINT_FILE")]
    pub endpoint_file: Option<PathBuf>,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: MemberTlsArgs,
    /// Client API keys, one per line: a client presents one (or a client certificate).
    #[arg(long, env = "ZEROSHARD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// The coordinator to register with (embedded membership), e.g.
    /// http://10.0.0.1:50051. Not needed with --etcd.
    #[arg(long, env = "ZEROSHARD_COORDINATOR", required_unless_present = "etcd")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// etcd lease TTL: the worker is lost when it misses keep-alives this long.
    #[arg(long, default_value_t = 5, env = "ZEROSHARD_LEASE_TTL_SECS")]
    pub lease_ttl_secs: u64,
    /// Address to serve peers and the coordinator on (port 0: the OS picks; a
    /// non-loopback one needs TLS credentials, or --insecure).
    #[arg(long, default_value = "127.0.0.1:0", env = "ZEROSHARD_WORKER_LISTEN")]
    pub listen: String,
    /// HOST or HOST:PORT that peers and the coordinator dial this worker at
    /// (default: the bound address; needed when listening on 0.0.0.0).
    #[arg(long, env = "ZEROSHARD_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// The checkpoint folder, when its path here differs from the coordinator's
    /// (or a Hub id org/name[@revision], as for the coordinator).
    #[arg(long, env = "ZEROSHARD_WORKER_MODEL")]
    pub model: Option<PathBuf>,
    /// Receive owned ranges from the coordinator instead of reading the checkpoint.
    #[arg(long, env = "ZEROSHARD_PULL", value_parser = BoolishValueParser::new())]
    pub pull: bool,
    #[command(flatten)]
    pub tuning: WorkerTuning,
    #[command(flatten)]
    pub tls: MemberTlsArgs,
    #[cfg(feature = "fault-injection")]
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// The worker's test hooks (built only with the `fault-injection` feature, which
/// the test command enables; see `zeroshard_worker::node::Faults`).
#[cfg(feature = "fault-injection")]
#[derive(Args, Debug)]
pub(crate) struct FaultArgs {
    /// Test hook: corrupt one chunk of every Nth shard fetch this worker serves.
    #[arg(
        long = "fault-corrupt-every",
        default_value_t = 0,
        hide = true,
        env = "ZEROSHARD_FAULT_CORRUPT_EVERY"
    )]
    pub corrupt_every: u64,
    /// Test hook: flip a byte of every chunk this worker serves to peers, under a
    /// valid CRC-32C (a lying holder only the checkpoint's digests catch).
    #[arg(long = "fault-serve-corrupt", hide = true, env = "ZEROSHARD_FAULT_SERVE_CORRUPT", value_parser = BoolishValueParser::new())]
    pub serve_corrupt: bool,
    /// Test hook: refuse to load any plan.
    #[arg(long = "fault-fail-load", hide = true, env = "ZEROSHARD_FAULT_FAIL_LOAD", value_parser = BoolishValueParser::new())]
    pub fail_load: bool,
    /// Test hook: never answer a plan installation (keeping the lease).
    #[arg(long = "fault-stall-install", hide = true, env = "ZEROSHARD_FAULT_STALL_INSTALL", value_parser = BoolishValueParser::new())]
    pub stall_install: bool,
    /// Test hook (CPU backend): `linear` call number N (counted from 0 over
    /// the worker's life) fails, as a device error in the middle of a step would.
    #[arg(long = "fault-backend-error-after", hide = true, env = "ZEROSHARD_FAULT_BACKEND_ERROR_AFTER")]
    pub backend_error_after: Option<u64>,
    /// Test hook: the injected step error is fatal (and every later call fails).
    #[arg(long = "fault-backend-error-fatal", hide = true, env = "ZEROSHARD_FAULT_BACKEND_ERROR_FATAL", value_parser = BoolishValueParser::new())]
    pub backend_error_fatal: bool,
    /// Test hook: sleep this many milliseconds after every batching step.
    #[arg(
        long = "fault-step-delay-ms",
        default_value_t = 0,
        hide = true,
        env = "ZEROSHARD_FAULT_STEP_DELAY_MS"
    )]
    pub step_delay_ms: u64,
    /// Test hook: stop stepping after this many steps, keeping the lease and
    /// answering every RPC (a stuck worker).
    #[arg(long = "fault-hang-after-steps", hide = true, env = "ZEROSHARD_FAULT_HANG_AFTER_STEPS")]
    pub hang_after_steps: Option<u64>,
    /// Test hook: send another token than the one computed for every Nth
    /// generated token of each sequence (a member lying about its outputs).
    #[arg(long = "fault-alter-every", default_value_t = 0, hide = true, env = "ZEROSHARD_FAULT_ALTER_EVERY")]
    pub alter_every: u64,
}

#[cfg(feature = "fault-injection")]
impl FaultArgs {
    pub(crate) fn faults(&self) -> zeroshard_worker::node::Faults {
        zeroshard_worker::node::Faults {
            corrupt_every: self.corrupt_every,
            serve_corrupt: self.serve_corrupt,
            fail_load: self.fail_load,
            stall_install: self.stall_install,
            step_fault: self.backend_error_after.map(|after_calls| zeroshard_engine::cpu::StepFault {
                after_calls,
                fatal: self.backend_error_fatal,
            }),
            step_delay: std::time::Duration::from_millis(self.step_delay_ms),
            hang_after_steps: self.hang_after_steps,
            alter_every: self.alter_every,
        }
    }
}

/// The OpenAI-compatible HTTP front of `up` and `coordinator`.
#[derive(Args, Debug, Clone)]
pub(crate) struct HttpArgs {
    /// Also serve the OpenAI-compatible HTTP API here (/v1/completions,
    /// /v1/chat/completions, /v1/models, /health, /metrics). Plain HTTP: off
    /// loopback it needs --api-key-file (clients send `Authorization: Bearer
    /// KEY`); put TLS in front of it (a proxy or ingress) across networks.
    #[arg(long, env = "ZEROSHARD_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// The model id clients name in requests and /v1/models lists (default:
    /// the Hub id given to --model, else the folder's name).
    #[arg(long, env = "ZEROSHARD_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// The most HTTP connections open at once (default: a quarter of the
    /// open-file limit, at most 4096). Past it a new connection closes the
    /// oldest one that has not sent a request yet; a request head must arrive
    /// within 10 s, a body within 30 s.
    #[arg(long, env = "ZEROSHARD_MAX_HTTP_CONNECTIONS")]
    pub max_http_connections: Option<usize>,
}

/// What moves between workers each step.
#[derive(Args, Debug, Clone)]
pub(crate) struct PlacementChoice {
    /// `auto`: each epoch, the placement predicted to decode fastest at the
    /// batch the workers admit (--max-active-sequences), from each worker's
    /// compute (calibrated at start) and the link measured between workers;
    /// `status` says which and why. `gather`: every worker holds 1/N of each
    /// tensor and gathers each layer's other ranges from its peers every step
    /// (weights move; good for large batches on fast links). `tensor`:
    /// `--replicas` groups of workers, each computing its tensor-parallel
    /// shard of every layer (whole KV-head groups, ffn rows, vocabulary rows)
    /// and summing activations twice per layer (activations move; good for
    /// interactive serving). Tensor takes Llama-family models and a group
    /// size the KV heads divide; otherwise the epoch is planned as gather and
    /// `status` says why.
    #[arg(long = "placement", value_enum, default_value = "auto", env = "ZEROSHARD_PLACEMENT")]
    pub kind: PlacementKind,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlacementKind {
    Auto,
    Gather,
    Tensor,
}

impl PlacementKind {
    pub(crate) fn to_config(self) -> zeroshard_coordinator::server::Placement {
        use zeroshard_coordinator::server::Placement;
        match self {
            Self::Auto => Placement::Auto,
            Self::Gather => Placement::Gather,
            Self::Tensor => Placement::Tensor,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    #[test]
    fn worker_tuning_reaches_the_worker_intact() {
        let tuning = WorkerTuning {
            placement: PlacementArgs {
                device: Device::Cuda(3),
                gpu_memory: Some(7 << 30),
                max_live_bytes: Some(123_456),
                prefetch_layers: 5,
                threads: Some(3),
            },
            gather: GatherArgs { prefetch_bytes: 9 << 20, fetch_timeout_ms: 777 },
            admission: AdmissionArgs { kv_cache_bytes: Some(5 << 30), max_active_sequences: 17 },
        };
        let mut argv = vec!["zeroshard".to_string(), "worker".into(), "--coordinator=http://c:1".into()];
        argv.extend(tuning.to_args(Some(3)));
        let Command::Worker(w) = Cli::try_parse_from(argv).expect("parses").command else {
            panic!("not the worker command")
        };
        assert_eq!(w.tuning, tuning);
        // Unset options stay unset, and the resolved device is what is passed.
        let plain = WorkerTuning {
            placement: PlacementArgs {
                gpu_memory: None,
                max_live_bytes: None,
                threads: None,
                ..tuning.placement.clone()
            },
            admission: AdmissionArgs { kv_cache_bytes: None, ..tuning.admission.clone() },
            ..tuning
        };
        let mut argv = vec!["zeroshard".to_string(), "worker".into(), "--coordinator=http://c:1".into()];
        argv.extend(plain.to_args(None));
        let Command::Worker(w) = Cli::try_parse_from(argv).expect("parses").command else {
            panic!("not the worker command")
        };
        assert_eq!(
            w.tuning,
            WorkerTuning { placement: PlacementArgs { device: Device::Cpu, ..plain.placement }, ..plain }
        );
    }

    #[test]
    fn up_and_coordinator_choose_the_placement_unless_told() {
        if std::env::var_os("ZEROSHARD_PLACEMENT").is_some() {
            zeroshard_offload::errln!(
                "skipped: ZEROSHARD_PLACEMENT is set in this environment, so the default does not apply"
            );
            return;
        }
        let Command::Up(u) =
            Cli::try_parse_from(["zeroshard", "up", "--model", "m"]).expect("parses").command
        else {
            panic!("not the up command")
        };
        assert_eq!(u.cluster.placement.kind, PlacementKind::Auto);
        let Command::Up(u) =
            Cli::try_parse_from(["zeroshard", "up", "--model", "m", "--placement", "gather"])
                .expect("parses")
                .command
        else {
            panic!("not the up command")
        };
        assert_eq!(u.cluster.placement.kind, PlacementKind::Gather);
    }

    #[test]
    fn local_cpu_workers_share_the_cores() {
        let Command::Up(up) =
            Cli::try_parse_from(["zeroshard", "up", "--model=m", "--workers=2"]).expect("parses").command
        else {
            panic!("not the up command")
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = format!("--threads={}", (cores / 2).max(1));
        assert!(up.tuning.to_local_args(None, 2).contains(&share));
        // CUDA workers, and a --threads given, are left alone.
        assert!(!up.tuning.to_local_args(Some(0), 2).iter().any(|a| a.starts_with("--threads")));
        let given = WorkerTuning {
            placement: PlacementArgs { threads: Some(5), ..up.tuning.placement.clone() },
            ..up.tuning.clone()
        };
        let args = given.to_local_args(None, 2);
        assert_eq!(args.iter().filter(|a| a.starts_with("--threads")).collect::<Vec<_>>(), ["--threads=5"]);
    }
}
