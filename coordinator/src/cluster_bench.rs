//! `zeroshard bench --workers N`: a local cluster under batched load, with
//! per-worker step, compute and gather times, gather throughput, the overlap
//! ratio `step / max(compute, gather)`, and each worker's peak RSS.
use std::sync::Arc;
use std::time::Instant;

use crate::error::{CoordinatorError, Result};
use crate::request::{GenerateRequest, GenerationParams, Prompt, SamplingParams};
use crate::status::WorkerStats;
use crate::up::{LocalCluster, UpConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One worker's figures over one batch size.
#[derive(Clone, Debug)]
/// One worker's decode steps (after every request of the batch had its
/// first token).
pub struct WorkerRow {
    pub worker: u64,
    pub steps: u64,
    pub step_ms: f64,
    pub compute_ms: f64,
    pub gather_ms: f64,
    pub gathered_mb_per_step: f64,
    pub gather_gbs: f64,
    /// `step / max(compute, gather)`; 1.0 is perfect overlap.
    pub overlap: f64,
    /// The tensor placement: activation bytes sent to and received from the group.
    pub group_sent_kb_per_step: f64,
    pub group_received_kb_per_step: f64,
}

#[derive(Clone, Debug)]
pub struct BatchReport {
    pub batch: usize,
    /// Every generated token over the wall time (prefill included).
    pub tokens_per_s: f64,
    /// The batch's prompt tokens over the time until every request had its
    /// first token (requests that arrive while a prefill runs join the next
    /// step, so this can span two prefill steps).
    pub prefill_tokens_per_s: f64,
    /// Tokens that arrived after every request had its first one, over that
    /// time: steady-state decode of the whole batch, as `bench` reports it.
    pub decode_tokens_per_s: f64,
    pub workers: Vec<WorkerRow>,
}

#[derive(Clone, Debug)]
pub struct ClusterReport {
    pub batches: Vec<BatchReport>,
    /// Peak resident set (VmHWM) of each worker process, bytes.
    pub peak_rss: Vec<u64>,
    pub owned: Vec<(u64, u64)>,
    /// The placement the cluster planned (`gather`, `tensor`) and why.
    pub placement: String,
    pub placement_reason: String,
}

/// A worker that does not answer `Stats` this fast shows zeros.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn stats(cluster: &LocalCluster) -> Vec<WorkerStats> {
    let mut out = Vec::new();
    for w in cluster.coord.workers() {
        out.push(w.client.stats(STATS_TIMEOUT).await.unwrap_or_default());
    }
    out
}

/// A greedy request of `max_new_tokens` that goes on past end-of-sequence.
fn greedy(prompt: Prompt, max_new_tokens: usize) -> GenerateRequest {
    let params = GenerationParams { sampling: SamplingParams::default(), max_new_tokens, ignore_eos: true };
    GenerateRequest::new(prompt, params, vec![])
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Starts the cluster, runs `batches` (each: `batch` concurrent greedy requests
/// of `prompt_len` random ids and `new_tokens` new tokens), stops it.
pub async fn run(
    up: &UpConfig,
    vocab: usize,
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
) -> Result<ClusterReport> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("bind: {e}")))?;
    let (_stop_tx, stop) = watch::channel(false);
    let cluster = LocalCluster::start(up, listener, None, stop).await?;
    let status = crate::client::status(&cluster.endpoint, &cluster.client).await;
    let result = drive(&cluster, vocab, batches, prompt_len, new_tokens).await;
    let peak = cluster.fleet.pids().into_iter().map(|p| p.map_or(0, peak_rss)).collect();
    let owned =
        stats(&cluster).await.iter().map(|s| (s.owned_partitioned_bytes, s.owned_persistent_bytes)).collect();
    cluster.stop().await;
    let status = status?;
    Ok(ClusterReport {
        batches: result?,
        peak_rss: peak,
        owned,
        placement: status.placement,
        placement_reason: status.placement_reason,
    })
}

async fn drive(
    cluster: &LocalCluster,
    vocab: usize,
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
) -> Result<Vec<BatchReport>> {
    let endpoint = cluster.endpoint.clone();
    let mut reports = Vec::new();
    for &batch in batches {
        let start = Instant::now();
        // Counts requests that have their first token; at `batch` the workers'
        // figures are read, so the rows below are of decode steps only.
        let first = Arc::new((std::sync::atomic::AtomicUsize::new(0), tokio::sync::Notify::new()));
        let tasks: Vec<_> = (0..batch)
            .map(|b| {
                let prompt: Vec<u32> = (0..prompt_len)
                    .map(|i| ((b * 7919 + i * 104_729 + 3) % (vocab - 3) + 3) as u32)
                    .collect();
                let endpoint = endpoint.clone();
                let auth = cluster.client.clone();
                let first = first.clone();
                tokio::spawn(async move {
                    let mut client = crate::client::connect(&endpoint, &auth).await?;
                    let req = greedy(Prompt::Ids(prompt), new_tokens);
                    let mut arrivals = Vec::new();
                    crate::client::generate(&mut client, &req, true, |tokens, _| {
                        if !tokens.is_empty() {
                            if arrivals.is_empty() {
                                first.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                first.1.notify_one();
                            }
                            arrivals.push((Instant::now(), tokens.len()));
                        }
                    })
                    .await
                    .map(|out| (out.timings, arrivals))
                    .map_err(|e| CoordinatorError::Unavailable(e.to_string()))
                })
            })
            .collect();
        while first.0.load(std::sync::atomic::Ordering::SeqCst) < batch {
            tokio::select! {
                _ = first.1.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
            if tasks.iter().all(|t| t.is_finished()) {
                break;
            }
        }
        let before = stats(cluster).await;
        let mut timings = Vec::with_capacity(batch);
        for t in tasks {
            timings.push(t.await.map_err(|e| CoordinatorError::Unavailable(e.to_string()))??);
        }
        let tokens: usize = timings.iter().map(|(t, _)| t.generated_tokens).sum();
        let prompt_tokens: usize = timings.iter().map(|(t, _)| t.prompt_tokens).sum();
        // Every request has its first token at `all_first`; decode is measured after it.
        let all_first = timings.iter().filter_map(|(_, a)| a.first().map(|f| f.0)).max().unwrap_or(start);
        let last = timings.iter().filter_map(|(_, a)| a.last().map(|l| l.0)).max().unwrap_or(start);
        let decoded: usize = timings
            .iter()
            .flat_map(|(_, a)| a.iter())
            .filter(|(at, _)| *at > all_first)
            .map(|(_, n)| n)
            .sum();
        let wall = start.elapsed().as_secs_f64();
        let after = stats(cluster).await;
        let workers = before
            .iter()
            .zip(&after)
            .map(|(a, b)| {
                let steps = (b.steps_total - a.steps_total).max(1);
                let per = |x: u64| x as f64 / steps as f64 / 1e6;
                let step_ns = b.step_nanos_total - a.step_nanos_total;
                let wait_ns = b.gather_wait_nanos_total - a.gather_wait_nanos_total;
                let busy_ns = b.gather_busy_nanos_total - a.gather_busy_nanos_total;
                let bytes = b.gathered_bytes_total - a.gathered_bytes_total;
                let (step_ms, compute_ms, gather_ms) =
                    (per(step_ns), per(step_ns.saturating_sub(wait_ns)), per(busy_ns));
                WorkerRow {
                    worker: b.id,
                    steps,
                    step_ms,
                    compute_ms,
                    gather_ms,
                    gathered_mb_per_step: bytes as f64 / steps as f64 / 1e6,
                    group_sent_kb_per_step: (b.group_sent_bytes_total - a.group_sent_bytes_total) as f64
                        / steps as f64
                        / 1e3,
                    group_received_kb_per_step: (b.group_received_bytes_total - a.group_received_bytes_total)
                        as f64
                        / steps as f64
                        / 1e3,
                    gather_gbs: if busy_ns > 0 { bytes as f64 / busy_ns as f64 } else { 0.0 },
                    overlap: step_ms / compute_ms.max(gather_ms).max(1e-9),
                }
            })
            .collect();
        reports.push(BatchReport {
            batch,
            tokens_per_s: tokens as f64 / wall,
            prefill_tokens_per_s: prompt_tokens as f64 / (all_first - start).as_secs_f64().max(1e-9),
            decode_tokens_per_s: decoded as f64 / (last - all_first).as_secs_f64().max(1e-9),
            workers,
        });
    }
    Ok(reports)
}

/// One greedy request of `max_tokens` tokens over gRPC on an open client
/// (`bench-fronts`): the time to the first message with tokens (streamed) or
/// to the whole answer.
pub async fn grpc_request(
    client: &mut crate::client::Client,
    prompt: &str,
    max_tokens: u32,
    stream: bool,
) -> Result<std::time::Duration> {
    let req = greedy(Prompt::Text(prompt.to_string()), max_tokens as usize);
    let started = Instant::now();
    let failed = |e: CoordinatorError| CoordinatorError::Unavailable(format!("bench request: {e}"));
    let mut first = None;
    crate::client::generate(client, &req, stream, |tokens, _| {
        if first.is_none() && !tokens.is_empty() {
            first = Some(started.elapsed());
        }
    })
    .await
    .map_err(failed)?;
    if !stream {
        return Ok(started.elapsed());
    }
    first.ok_or_else(|| CoordinatorError::Unavailable("bench request: no token came".into()))
}
