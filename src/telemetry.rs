//! Prometheus metrics of this process: the recorder behind the `metrics`
//! facade the libraries record into (request latencies and outcomes in the
//! coordinator; step times and gathers in a worker), and the plain-HTTP
//! `/metrics` listener of a worker (`--metrics-listen`). The coordinator's
//! HTTP front serves its own `/metrics` and adds the cluster's state.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry_otlp::WithExportConfig as _;
use tokio::net::TcpListener;
use zeroshard_coordinator::server::RenderMetrics;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Logs to stderr (filtered by `RUST_LOG`, else `default_level`; coloured when
/// `ansi`; each line naming its module with `targets`) and, with `otlp`, spans exported over OTLP/HTTP as `service`: the
/// coordinator's and up's at info (a span per request), a worker's at debug
/// (a span per step). Returns the exporter's provider, to flush at exit.
pub(crate) fn init_logs(
    default_level: &str,
    ansi: bool,
    targets: bool,
    otlp: Option<&str>,
    service: &'static str,
) -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(targets)
        .with_filter(filter);
    let Some(endpoint) = otlp.filter(|e| !e.is_empty()) else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(None);
    };
    let url = traces_url(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .build()
        .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("zeroshard"))
        .with_filter(EnvFilter::new("zeroshard_coordinator=info,zeroshard_worker=debug,zeroshard=info"));
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Some(provider))
}

/// The collector's traces URL: `endpoint` as given when it has a path, else
/// with OTLP/HTTP's `/v1/traces`.
fn traces_url(endpoint: &str) -> Result<String> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        bail!("--otlp-endpoint {endpoint}: write http://HOST:PORT (OTLP over HTTP with protobuf; no TLS)");
    };
    Ok(match rest.split_once('/') {
        Some((_, path)) if !path.is_empty() => endpoint.to_string(),
        _ => format!("http://{}/v1/traces", rest.trim_end_matches('/')),
    })
}

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

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn the_traces_path_is_added_only_when_missing() {
        assert_eq!(traces_url("http://c:4318").expect("ok"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/").expect("ok"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/otlp/v1/traces").expect("ok"), "http://c:4318/otlp/v1/traces");
        assert!(traces_url("https://c:4318").expect_err("no TLS").to_string().contains("http://HOST:PORT"));
    }
}
