//! Prometheus metrics of this process: the recorder behind the `metrics`
//! facade the libraries record into (request latencies and outcomes in the
//! coordinator; step times and gathers in a worker), and the plain-HTTP
//! `/metrics` listener of a worker (`--metrics-listen`). The coordinator's
//! HTTP front serves its own `/metrics` and adds the cluster's state.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use zeroshard_coordinator::server::RenderMetrics;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: 1 ms to 2 min.
const SECONDS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Sequences per step.
const BATCH: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the recorder once per process; `model` labels every series.
pub(crate) fn install(model: Option<&str>) -> Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let mut b = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .context("metrics buckets")?
        .set_buckets_for_metric(Matcher::Full("zeroshard_step_batch_size".into()), &BATCH)
        .context("metrics buckets")?;
    if let Some(m) = model {
        b = b.add_global_label("model", m);
    }
    let handle = b.install_recorder().context("installing the metrics recorder")?;
    describe();
    let _ = HANDLE.set(handle.clone());
    // Histograms are drained into their buckets by upkeep.
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            handle.run_upkeep();
        })
        .context("starting the metrics upkeep thread")?;
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "zeroshard_requests_total",
        "Client requests by outcome (ok, cancelled, invalid, rejected, unavailable, error)."
    );
    describe_histogram!(
        "zeroshard_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its end."
    );
    describe_histogram!(
        "zeroshard_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its first token (queue, tokenization and prefill)."
    );
    describe_histogram!(
        "zeroshard_inter_token_latency_seconds",
        Unit::Seconds,
        "Time between tokens of a stream, per token."
    );
    describe_counter!("zeroshard_prompt_tokens_total", "Prompt tokens of admitted requests.");
    describe_counter!("zeroshard_generated_tokens_total", "Tokens generated and sent to clients.");
    describe_histogram!(
        "zeroshard_step_seconds",
        Unit::Seconds,
        "Time of one forward step of this worker (every sequence of the batch)."
    );
    describe_histogram!("zeroshard_step_batch_size", "Sequences in one forward step of this worker.");
    describe_counter!(
        "zeroshard_gather_bytes_total",
        Unit::Bytes,
        "Bytes this worker received from peers in gathers."
    );
    describe_histogram!(
        "zeroshard_gather_seconds",
        Unit::Seconds,
        "Time of one gather that fetched from peers."
    );
    describe_counter!(
        "zeroshard_gather_failovers_total",
        "Gathers served by a replica after the first holder failed."
    );
    describe_counter!(
        "zeroshard_rejected_chunks_total",
        "Chunks that failed their checksum and were fetched again."
    );
}

/// This process's metrics in the Prometheus text format (empty before `install`).
pub(crate) fn render() -> RenderMetrics {
    Arc::new(|| HANDLE.get().map(PrometheusHandle::render).unwrap_or_default())
}

/// Serves `GET /metrics` on `listener` (a worker's `--metrics-listen`).
pub(crate) fn serve(listener: TcpListener) {
    let render = render();
    let app =
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = render();
                async move {
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("--metrics-listen: {e}");
        }
    });
}
