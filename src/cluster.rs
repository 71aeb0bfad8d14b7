//! The cluster subcommands: `up`, `coordinator`, `worker`, `query`, `status`.
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use zeroshard_coordinator::membership::embedded::EmbeddedMembership;
use zeroshard_coordinator::request::{GenerateRequest, Prompt};
use zeroshard_coordinator::run::{self, Listeners};
use zeroshard_coordinator::server::{self, ClusterConfig, Coordinator, Placement, RequestLimits};
use zeroshard_coordinator::{client, up as up_mod};
use zeroshard_membership::etcd::{EtcdMembership, EtcdRegistrar};
use zeroshard_membership::Membership;
use zeroshard_worker::node::{self, ControlRegistrar, NodeConfig, Registrar};

use zeroshard_security::{Role, Security};

use crate::args::{self, BenchArgs, ClusterArgs, CoordinatorArgs, QueryArgs, StatusArgs, UpArgs, WorkerArgs};
use crate::{hub, security, telemetry};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Signals within this long of the first are the same request to stop: a
/// launcher that signals every process of a task (Slurm's scancel) and a
/// parent that forwards it deliver two at once.
const SAME_STOP: Duration = Duration::from_secs(1);

/// Turns true on SIGINT or SIGTERM (a member then drains); another one, later
/// than [`SAME_STOP`], ends the process at once (exit 143), as the launcher's
/// grace period would.
fn stop_signal() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn(async move {
        let mut first: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            match first {
                Some(t) if t.elapsed() >= SAME_STOP => {
                    zeroshard_offload::errln!("second stop signal: exiting now");
                    zeroshard_security::bundle::remove_now();
                    std::process::exit(143);
                }
                Some(_) => {}
                None => {
                    first = Some(std::time::Instant::now());
                    let _ = tx.send(true);
                }
            }
        }
    });
    Ok(rx)
}

fn cluster_config(c: &ClusterArgs, workers: usize, security: Security) -> Result<ClusterConfig> {
    if c.lease_ttl_secs == 0 {
        bail!("--lease-ttl-secs must be at least 1");
    }
    if c.install_timeout_secs == 0 {
        bail!("--install-timeout-secs must be at least 1");
    }
    if !(0.0..=1.0).contains(&c.audit_fraction) {
        bail!("--audit-fraction must be between 0 and 1, got {}", c.audit_fraction);
    }
    let l = &c.limits;
    if l.step_deadline_ms == 0 {
        bail!("--step-deadline-ms must be at least 1");
    }
    if l.max_prompt_bytes == Some(0) {
        bail!("--max-prompt-bytes must be at least 1");
    }
    let placement = c.placement.kind.to_config();
    if c.pull && placement == Placement::Tensor {
        bail!(
            "--placement tensor reads each worker's shard from the checkpoint: it does not work with --pull"
        );
    }
    Ok(ClusterConfig {
        model_dir: c.model.model.clone(),
        workers,
        persistence_threshold_bytes: c.persistence_threshold_bytes,
        pull: c.pull,
        replicas: c.replicas,
        lease_ttl: Duration::from_secs(c.lease_ttl_secs),
        security,
        api_keys: None,
        limits: RequestLimits {
            max_queued_requests: l.max_queued_requests,
            max_prompt_bytes: l.max_prompt_bytes,
            step_deadline: Duration::from_millis(l.step_deadline_ms),
        },
        drain_timeout: Duration::from_secs(c.drain_timeout_secs),
        placement,
        install_timeout: Duration::from_secs(c.install_timeout_secs),
        audit_fraction: c.audit_fraction,
    })
}

async fn bind(addr: &str) -> Result<TcpListener> {
    bind_flag("--listen", addr).await
}

/// The admission flags a worker takes, checked where they are given.
fn check_admission(a: &args::AdmissionArgs) -> Result<()> {
    if a.max_active_sequences == 0 {
        bail!("--max-active-sequences must be at least 1");
    }
    if a.kv_cache_bytes == Some(0) {
        bail!("--kv-cache-bytes must be at least 1");
    }
    Ok(())
}

pub(crate) fn up(mut a: UpArgs) -> Result<()> {
    check_admission(&a.tuning.admission)?;
    let cuda = a.tuning.placement.device.resolve()?;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let served = served_name(&a.http, &a.cluster.model.model);
    telemetry::install(Some(&served))?;
    a.cluster.model.model = hub::resolve(&a.cluster.model.model)?;
    let mut worker_args = a.tuning.to_local_args(cuda, a.workers);
    if a.tuning.admission.kv_cache_bytes.is_none() && cuda.is_none() {
        // The workers share this host: half of its available memory, split between them.
        let share = node::available_memory() / 2 / a.workers as u64;
        worker_args.push(format!("--kv-cache-bytes={}", share.max(64 << 20)));
    }
    if a.cluster.pull {
        worker_args.push("--pull".into());
    }
    let mut cluster = cluster_config(&a.cluster, a.workers, Security::plaintext())?;
    cluster.api_keys = security::api_keys(a.api_key_file.as_deref())?;
    let http = http_front(&a.http, cluster.api_keys.is_some(), served)?;
    if a.http_open && a.http.http_listen.is_none() {
        bail!("--http-open needs --http-listen");
    }
    if a.http_open && a.api_key_file.is_some() {
        bail!("--http-open and --api-key-file contradict each other: the front would take the keys anyway");
    }
    // The HTTP front is secure by default too: a key of its own, in the
    // client bundle (under --insecure there is no bundle to leave it in).
    let http_key = match &http {
        Some((addr, _, _)) if cluster.api_keys.is_none() && (a.http_open || a.insecure) => {
            zeroshard_offload::errln!(
                "warning: {}: the HTTP front on {addr} takes requests from every local user, without an API key",
                if a.http_open { "--http-open" } else { "--insecure" }
            );
            None
        }
        Some(_) if cluster.api_keys.is_none() => {
            let key = zeroshard_security::bundle::new_api_key()?;
            cluster.api_keys = Some(std::sync::Arc::new(zeroshard_security::ApiKeys::parse(&key)));
            Some(key)
        }
        _ => None,
    };
    let cfg = up_mod::UpConfig {
        cluster,
        exe: std::env::current_exe().context("locating the zeroshard binary")?,
        worker_args,
        insecure: a.insecure,
        http_key,
    };
    runtime()?.block_on(async {
        let listener = bind(&a.listen).await?;
        let http = match http {
            Some((addr, name, max_connections)) => Some(server::HttpFront {
                listener: bind_flag("--http-listen", &addr).await?,
                model: name,
                metrics: Some(telemetry::render()),
                max_connections,
            }),
            None => None,
        };
        up_mod::run(cfg, listener, http, stop_signal()?).await?;
        Ok(())
    })
}

pub(crate) fn coordinator(mut a: CoordinatorArgs) -> Result<()> {
    let sec = security::member(&a.tls, Role::Coordinator, &a.listen)?;
    let api_keys = security::api_keys(a.api_key_file.as_deref())?;
    let etcd_credentials = security::etcd(&a.etcd)?;
    let served = served_name(&a.http, &a.cluster.model.model);
    telemetry::install(Some(&served))?;
    a.cluster.model.model = hub::resolve(&a.cluster.model.model)?;
    runtime()?.block_on(async {
        let listener = bind(&a.listen).await?;
        let local = listener.local_addr()?;
        let advertise = advertised_coordinator(a.advertise.as_deref(), &sec, local)?;
        let endpoint = format!("{}://{}", if sec.is_tls() { "grpcs" } else { "grpc" }, advertise.authority());
        let mut cfg = cluster_config(&a.cluster, a.workers, sec)?;
        cfg.api_keys = api_keys;
        let (membership, embedded): (Arc<dyn Membership>, _) = if a.etcd.etcd.is_empty() {
            let m = EmbeddedMembership::new(cfg.lease_ttl);
            (Arc::new(m.clone()), Some(m))
        } else {
            let m =
                EtcdMembership::connect_with(&a.etcd.etcd, &a.etcd.cluster, cfg.lease_ttl, &etcd_credentials)
                    .await
                    .with_context(|| format!("--etcd {}", a.etcd.etcd.join(",")))?;
            (Arc::new(m), None)
        };
        zeroshard_offload::errln!("membership: {}", membership.describe());
        let http = http_front(&a.http, cfg.api_keys.is_some(), served)?;
        if let (Some((addr, _, _)), None) = (&http, &cfg.api_keys) {
            zeroshard_offload::errln!(
                "warning: the HTTP front on {addr} takes requests from every local user: \
                 give --api-key-file to require a key"
            );
        }
        let coord = Coordinator::start(cfg, advertise.uri(), membership, embedded)?;
        let listeners = Listeners {
            grpc: listener,
            http: match http {
                Some((addr, name, max_connections)) => Some(server::HttpFront {
                    listener: bind_flag("--http-listen", &addr).await?,
                    model: name,
                    metrics: Some(telemetry::render()),
                    max_connections,
                }),
                None => None,
            },
            health: match &a.health.health_listen {
                Some(at) => Some(bind_flag("--health-listen", at).await?),
                None => None,
            },
        };
        zeroshard_offload::errln!("coordinator on {local}, waiting for {} workers", a.workers);
        let endpoint_file = a.endpoint_file.clone();
        run::run(coord, listeners, stop_signal()?, |serving| {
            zeroshard_offload::outln!("ready {endpoint}");
            if let Some(h) = serving.http_addr {
                zeroshard_offload::outln!("http http://{h}");
            }
            if let Some(f) = &endpoint_file {
                write_atomically(f, &format!("{endpoint}\n"))
                    .map_err(|e| zeroshard_coordinator::CoordinatorError::Unavailable(format!("{e:#}")))?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    })
}

/// The coordinator's advertised address: `given` (HOST:PORT, or with a
/// scheme that must match this member's TLS) or the bound address.
fn advertised_coordinator(
    given: Option<&str>,
    sec: &Security,
    bound: std::net::SocketAddr,
) -> Result<zeroshard_security::Address> {
    let scheme = sec.scheme();
    let text = match given {
        None => format!("{scheme}://{bound}"),
        Some(a) if a.contains("://") => a.to_string(),
        Some(a) => format!("{scheme}://{a}"),
    };
    let addr = zeroshard_security::Address::parse(&text).with_context(|| "--advertise".to_string())?;
    if addr.tls != sec.is_tls() {
        bail!(
            "--advertise {text}: the scheme says {} but this coordinator serves {}",
            if addr.tls { "TLS" } else { "plaintext" },
            if sec.is_tls() { "TLS" } else { "plaintext" }
        );
    }
    Ok(addr)
}

/// The model id the HTTP front serves: --served-model-name, else the Hub id
/// `--model` names (without a revision), else the folder's name.
fn served_name(http: &args::HttpArgs, model: &std::path::Path) -> String {
    if let Some(name) = &http.served_model_name {
        return name.clone();
    }
    hub::id_of(model).unwrap_or_else(|| {
        model.file_name().map_or_else(|| model.display().to_string(), |n| n.to_string_lossy().to_string())
    })
}

/// The HTTP front's address and the model id it serves, refused off
/// loopback without API keys.
/// Where the HTTP front listens, its model name and its connection bound
/// (`--max-http-connections`, else a quarter of the open-file limit, at most
/// 4096: the rest stays for gRPC, workers and the checkpoint).
fn http_front(
    http: &args::HttpArgs,
    has_keys: bool,
    name: String,
) -> Result<Option<(String, String, usize)>> {
    let Some(addr) = http.http_listen.as_deref() else { return Ok(None) };
    let max = match http.max_http_connections {
        Some(0) => bail!("--max-http-connections must be at least 1"),
        Some(n) => n,
        None => {
            let soft =
                crate::open_files().map_or(1024, |l| usize::try_from(l.rlim_cur).unwrap_or(usize::MAX));
            (soft / 4).clamp(16, 4096)
        }
    };
    if !has_keys && !security::is_loopback(addr) {
        bail!(
            "--http-listen {addr} is not a loopback address: give --api-key-file (HTTP clients send \
             `Authorization: Bearer KEY`), or serve it on loopback behind a TLS proxy"
        );
    }
    Ok(Some((addr.to_string(), name, max)))
}

/// Writes `text` to `path` through a temporary file beside it and a rename,
/// so a reader never sees half of it.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn bind_flag(flag: &str, addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("{flag} {addr}"))
}

pub(crate) fn worker(a: WorkerArgs) -> Result<()> {
    check_admission(&a.tuning.admission)?;
    a.tuning.placement.apply_threads();
    let (p, g) = (&a.tuning.placement, &a.tuning.gather);
    let cuda = p.device.resolve()?;
    if a.lease_ttl_secs == 0 {
        bail!("--lease-ttl-secs must be at least 1");
    }
    let cfg = NodeConfig {
        gpu_memory: p.gpu_memory,
        model_dir: a.model.as_deref().map(hub::resolve).transpose()?,
        pull: a.pull,
        prefetch_layers: p.prefetch_layers,
        prefetch_bytes: g.prefetch_bytes,
        max_live_bytes: p.max_live_bytes.unwrap_or(0),
        kv_cache_bytes: a.tuning.admission.kv_cache_bytes,
        max_active_sequences: a.tuning.admission.max_active_sequences,
        fetch_timeout: Duration::from_millis(g.fetch_timeout_ms.max(1)),
        security: security::member(&a.tls, Role::Worker, &a.listen)?,
        advertise: a.advertise.clone(),
        health_listen: a.health.health_listen.clone(),
        #[cfg(feature = "fault-injection")]
        faults: a.faults.faults(),
        ..NodeConfig::default()
    }
    .on_device(cuda);
    let etcd_credentials = security::etcd(&a.etcd)?;
    runtime()?.block_on(async {
        let registrar: Arc<dyn Registrar> = match (&a.coordinator, a.etcd.etcd.is_empty()) {
            (_, false) => Arc::new(
                EtcdRegistrar::connect_with(
                    &a.etcd.etcd,
                    &a.etcd.cluster,
                    Duration::from_secs(a.lease_ttl_secs),
                    &etcd_credentials,
                )
                .await
                .with_context(|| format!("--etcd {}", a.etcd.etcd.join(",")))?,
            ),
            (Some(c), true) => Arc::new(ControlRegistrar::new(c.clone(), cfg.security.clone())),
            (None, true) => bail!("give --coordinator or --etcd"),
        };
        let listener = bind(&a.listen).await?;
        if let Some(at) = &a.metrics.metrics_listen {
            telemetry::install(None)?;
            telemetry::serve(bind_flag("--metrics-listen", at).await?);
        }
        let mut stop = stop_signal()?;
        node::run(cfg, registrar, listener, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
        Ok(())
    })
}

pub(crate) fn query(a: QueryArgs) -> Result<()> {
    let prompt = match (a.prompt.prompt, a.prompt.prompt_ids, a.prompt.chat) {
        (Some(text), None, None) => Prompt::Text(text),
        (None, Some(ids), None) => Prompt::Ids(args::parse_ids(&ids)?),
        (None, None, Some(chat)) => Prompt::Chat(args::parse_chat(&chat)?),
        _ => bail!("query takes one --prompt, --prompt-ids or --chat"),
    };
    let req = GenerateRequest::new(prompt, crate::sampling(&a.sampling)?, a.sampling.stop.clone());
    let stream_text = a.stream && !a.json;
    let auth = security::client(&a.auth)?;
    let out = runtime()?.block_on(client::query(
        &a.endpoint,
        &auth,
        &req,
        a.stream,
        Duration::from_secs(a.retry_for_secs),
        |t| {
            if stream_text {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(t.as_bytes());
                let _ = o.flush();
            }
        },
    ))?;
    let mut o = std::io::stdout().lock();
    if a.json {
        writeln!(o, "{}", serde_json::to_string(&out)?)?;
    } else if stream_text {
        writeln!(o)?;
    } else {
        writeln!(o, "{}", out.text)?;
    }
    crate::note_context_end(&out, a.sampling.max_new_tokens, None);
    Ok(())
}

pub(crate) fn status(a: StatusArgs) -> Result<()> {
    let auth = security::client(&a.auth)?;
    let s = runtime()?.block_on(client::status(&a.endpoint, &auth))?;
    if a.json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id, "address": w.address, "ready": w.ready,
                    "owned_partitioned_bytes": w.owned_partitioned_bytes,
                    "owned_persistent_bytes": w.owned_persistent_bytes,
                    "resident_bytes": w.resident_bytes, "active_sequences": w.active_sequences,
                    "gather_bytes_per_s": w.gather_bytes_per_s,
                    "rejected_chunks_total": w.rejected_chunks_total, "steps_total": w.steps_total,
                    "loads_total": w.loads_total, "failovers_total": w.failovers_total,
                    "rejected_blocks_total": w.rejected_blocks_total,
                    "kv_cache_bytes": w.kv_cache_bytes, "kv_reserved_bytes": w.kv_reserved_bytes,
                    "max_active_sequences": w.max_active_sequences,
                    "audits_failed_total": w.audits_failed_total,
                })
            })
            .collect();
        let v = serde_json::json!({
            "epoch": s.epoch, "ready": s.ready, "model": s.model, "replicas": s.replicas,
            "workers_lost_total": s.workers_lost_total, "sequences_resumed_total": s.sequences_resumed_total,
            "queued_requests": s.queued_requests, "max_queued_requests": s.max_queued_requests,
            "requests_admitted_total": s.requests_admitted_total,
            "requests_rejected_total": s.requests_rejected_total,
            "queue_ms_total": s.queue_ms_total, "queue_ms_max": s.queue_ms_max,
            "step_deadlines_missed_total": s.step_deadlines_missed_total,
            "sequences_moved_total": s.sequences_moved_total,
            "install_deadlines_missed_total": s.install_deadlines_missed_total,
            "audits_passed_total": s.audits_passed_total, "audits_failed_total": s.audits_failed_total,
            "audits_skipped_total": s.audits_skipped_total, "audit_bans_total": s.audit_bans_total,
            "placement": s.placement, "tensor_degree": s.tensor_degree,
            "placement_reason": s.placement_reason,
            "not_ready_reason": s.not_ready_reason,
            "workers": workers,
        });
        zeroshard_offload::outln!("{v}");
        return Ok(());
    }
    zeroshard_offload::outln!(
        "model {} · epoch {} · {} · replicas {} · {} · workers lost {} · sequences resumed {}",
        s.model,
        s.epoch,
        match (s.placement.as_str(), s.tensor_degree) {
            ("tensor", d) => format!("tensor placement, groups of {d}"),
            ("", _) => "no plan yet".to_string(),
            (p, _) => format!("{p} placement"),
        },
        s.replicas,
        if s.ready { "ready" } else { "not ready" },
        s.workers_lost_total,
        s.sequences_resumed_total
    );
    if !s.placement_reason.is_empty() {
        zeroshard_offload::outln!("placement: {}", s.placement_reason);
    }
    if !s.not_ready_reason.is_empty() {
        zeroshard_offload::outln!("not ready: {}", s.not_ready_reason);
    }
    let mean_queue_ms = s.queue_ms_total / (s.requests_admitted_total.max(1) as f64);
    zeroshard_offload::outln!(
        "queue {}/{} · admitted {} · refused (queue full) {} · queued {:.1} ms on average, {:.1} ms at most · \
         step deadlines missed {} · install deadlines missed {}",
        s.queued_requests,
        s.max_queued_requests,
        s.requests_admitted_total,
        s.requests_rejected_total,
        mean_queue_ms,
        s.queue_ms_max,
        s.step_deadlines_missed_total,
        s.install_deadlines_missed_total
    );
    zeroshard_offload::outln!(
        "audits passed {} · failed {} · skipped {} · workers banned for failed audits {}",
        s.audits_passed_total,
        s.audits_failed_total,
        s.audits_skipped_total,
        s.audit_bans_total
    );
    zeroshard_offload::outln!(
        "{:>4} {:<24} {:>14} {:>12} {:>12} {:>9} {:>17} {:>10} {:>6} {:>8} {:>9} {:>10} {:>15}",
        "id",
        "address",
        "owned MB",
        "persist MB",
        "resident MB",
        "active",
        "KV MB used/budget",
        "gather GB/s",
        "loads",
        "steps",
        "refetched",
        "fail-overs",
        "rejected blocks"
    );
    for w in &s.workers {
        zeroshard_offload::outln!(
            "{:>4} {:<24} {:>14.3} {:>12.3} {:>12.3} {:>9} {:>17} {:>11.2} {:>6} {:>8} {:>9} {:>10} {:>15}",
            w.id,
            w.address,
            w.owned_partitioned_bytes as f64 / 1e6,
            w.owned_persistent_bytes as f64 / 1e6,
            w.resident_bytes as f64 / 1e6,
            format!("{}/{}", w.active_sequences, w.max_active_sequences),
            format!("{:.1}/{:.1}", w.kv_reserved_bytes as f64 / 1e6, w.kv_cache_bytes as f64 / 1e6),
            w.gather_bytes_per_s / 1e9,
            w.loads_total,
            w.steps_total,
            w.rejected_chunks_total,
            w.failovers_total,
            w.rejected_blocks_total
        );
    }
    Ok(())
}

/// `bench --workers N`: a local cluster under load (see `cluster_bench`).
pub(crate) fn bench(a: BenchArgs) -> Result<()> {
    use zeroshard_coordinator::cluster_bench;
    use zeroshard_offload::synthetic;
    let cuda = a.tuning.placement.device.resolve()?;
    let max_live_bytes = a.tuning.placement.max_live_bytes.unwrap_or(0);
    let batches = args::parse_list(&a.batch).context("--batch")?;
    // A synthetic model is written to a temporary folder the workers map.
    let tmp = std::env::temp_dir().join(format!("zeroshard-bench-{}", std::process::id()));
    let (dir, config) = match (&a.source.model, &a.source.synthetic) {
        (Some(dir), None) => (dir.clone(), zeroshard_offload::ModelConfig::from_dir(dir)?),
        (None, Some(spec)) => {
            let config = synthetic::synthetic_config(spec)?;
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let bytes = synthetic::write_synthetic_checkpoint(&config, &tmp)?;
            zeroshard_offload::errln!(
                "wrote a {:.1} MB synthetic checkpoint to {}",
                bytes as f64 / 1e6,
                tmp.display()
            );
            (tmp.clone(), config)
        }
        _ => bail!("give exactly one of --model or --synthetic"),
    };
    let up = up_mod::UpConfig {
        cluster: ClusterConfig {
            model_dir: dir.clone(),
            workers: a.workers,
            persistence_threshold_bytes: a.persistence_threshold_bytes,
            pull: false,
            replicas: 1,
            lease_ttl: Duration::from_secs(5),
            security: Security::plaintext(),
            api_keys: None,
            limits: RequestLimits::default(),
            drain_timeout: Duration::from_secs(5),
            placement: a.placement_choice.kind.to_config(),
            install_timeout: Duration::from_secs(30),
            audit_fraction: 0.0,
        },
        exe: std::env::current_exe().context("locating the zeroshard binary")?,
        worker_args: a.tuning.to_local_args(cuda, a.workers),
        insecure: a.insecure,
        http_key: None,
    };
    let report =
        runtime()?.block_on(cluster_bench::run(&up, config.vocab_size, &batches, a.prompt_len, a.new_tokens));
    if a.source.synthetic.is_some() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let report = report?;
    let placement = &report.placement;
    zeroshard_offload::errln!("placement: {placement} ({})", report.placement_reason);
    zeroshard_offload::outln!(
        "model: {} · {} workers · placement {placement} · max-live {} B · prefetch {} layers · prompt {} tokens, {} new tokens",
        a.source.synthetic.clone().unwrap_or_else(|| dir.display().to_string()),
        a.workers,
        max_live_bytes,
        a.tuning.placement.prefetch_layers,
        a.prompt_len,
        a.new_tokens
    );
    for b in &report.batches {
        zeroshard_offload::outln!(
            "batch {}: prefill {:.1} tok/s · decode {:.1} tok/s · {:.1} tok/s over the wall time",
            b.batch,
            b.prefill_tokens_per_s,
            b.decode_tokens_per_s,
            b.tokens_per_s
        );
    }
    zeroshard_offload::outln!("per decode step (after every request had its first token), each worker:");
    zeroshard_offload::outln!(
        "{:>5} {:>6} {:>6} {:>9} {:>11} {:>9} {:>11} {:>10} {:>8} {:>9} {:>9}",
        "batch",
        "worker",
        "steps",
        "step ms",
        "compute ms",
        "wait ms",
        "gathered MB",
        "gather GB/s",
        "overlap",
        "sent KB",
        "recv KB"
    );
    for b in &report.batches {
        for w in &b.workers {
            zeroshard_offload::outln!(
                "{:>5} {:>6} {:>6} {:>9.2} {:>11.2} {:>9.2} {:>11.1} {:>10.2} {:>8.2} {:>9.1} {:>9.1}",
                b.batch,
                w.worker,
                w.steps,
                w.step_ms,
                w.compute_ms,
                w.step_ms - w.compute_ms,
                w.gathered_mb_per_step,
                w.gather_gbs,
                w.overlap,
                w.group_sent_kb_per_step,
                w.group_received_kb_per_step
            );
        }
    }
    let model_bytes: u64 = report.owned.iter().map(|o| o.0).sum();
    for (i, (rss, (part, pers))) in report.peak_rss.iter().zip(&report.owned).enumerate() {
        let bound = model_bytes / a.workers as u64 + pers + max_live_bytes + (128 << 20);
        zeroshard_offload::outln!(
            "worker {}: peak RSS {:.1} MB · owns {:.1} MB partitioned + {:.1} MB persistent · bound model/N + persistent + max-live + 128 MiB = {:.1} MB ({})",
            i + 1,
            *rss as f64 / 1e6,
            *part as f64 / 1e6,
            *pers as f64 / 1e6,
            bound as f64 / 1e6,
            if *rss < bound { "below" } else { "ABOVE" }
        );
    }
    if a.json {
        let rows: Vec<serde_json::Value> = report
            .batches
            .iter()
            .map(|b| {
                serde_json::json!({
                    "batch": b.batch,
                    "prefill_tokens_per_s": b.prefill_tokens_per_s,
                    "decode_tokens_per_s": b.decode_tokens_per_s,
                    "tokens_per_s_wall": b.tokens_per_s,
                    "workers": b.workers.iter().map(|w| serde_json::json!({
                        "worker": w.worker,
                        "decode_steps": w.steps,
                        "decode_step_ms": w.step_ms,
                        "wait_ms": w.step_ms - w.compute_ms,
                        "gathered_bytes_per_step": w.gathered_mb_per_step * 1e6,
                        "group_sent_bytes_per_step": w.group_sent_kb_per_step * 1e3,
                        "group_received_bytes_per_step": w.group_received_kb_per_step * 1e3,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        zeroshard_offload::outln!(
            "{}",
            serde_json::json!({
                "model": a.source.synthetic.clone().unwrap_or_else(|| dir.display().to_string()),
                "workers": a.workers,
                "placement": placement,
                "placement_reason": report.placement_reason,
                "prompt_len": a.prompt_len,
                "new_tokens": a.new_tokens,
                "rows": rows,
            })
        );
    }
    Ok(())
}
