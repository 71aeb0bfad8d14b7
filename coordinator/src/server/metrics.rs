//! The cluster's state in the Prometheus text format, computed when
//! `/metrics` is scraped from what `status` shows: the plan, the queue, the
//! failure counters, and every worker's own figures (labelled `worker`).
//! Per-request histograms and counters (time to first token, inter-token
//! latency, request duration, tokens, outcomes) are recorded where requests
//! run, through the `metrics` facade; the binary's recorder renders them.
use std::fmt::Write;

use crate::status::{ClusterStatus, WorkerStatus};

/// One metric family: HELP, TYPE, then its samples.
struct Family<'a> {
    out: &'a mut String,
    model: &'a str,
}

impl Family<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(Option<u64>, f64)]) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (worker, value) in samples {
            let _ = write!(self.out, "{name}{{model=\"{}\"", escape(self.model));
            if let Some(w) = worker {
                let _ = write!(self.out, ",worker=\"{w}\"");
            }
            let _ = writeln!(self.out, "}} {}", number(*value));
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help, &[(None, value)]);
    }

    fn per_worker(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        s: &ClusterStatus,
        f: fn(&WorkerStatus) -> f64,
    ) {
        let samples: Vec<(Option<u64>, f64)> = s.workers.iter().map(|w| (Some(w.id), f(w))).collect();
        self.family(name, kind, help, &samples);
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

/// Each worker's figures, labelled `worker`: name, type, help, value.
type PerWorker = (&'static str, &'static str, &'static str, fn(&WorkerStatus) -> f64);
const PER_WORKER: [PerWorker; 10] = [
    ("zeroshard_worker_active_sequences", "gauge", "Sequences generating on this worker.", |w| {
        f64::from(w.active_sequences)
    }),
    (
        "zeroshard_worker_audits_failed_total",
        "counter",
        "Output audits that found tokens of this worker the model would not have chosen.",
        |w| w.audits_failed_total as f64,
    ),
    (
        "zeroshard_worker_gather_bytes_per_second",
        "gauge",
        "Bytes per second this worker received from peers, averaged over its gathers.",
        |w| w.gather_bytes_per_s,
    ),
    ("zeroshard_worker_steps_total", "counter", "Forward steps this worker ran.", |w| w.steps_total as f64),
    (
        "zeroshard_worker_rejected_chunks_total",
        "counter",
        "Chunks this worker received that failed their checksum and were fetched again.",
        |w| w.rejected_chunks_total as f64,
    ),
    (
        "zeroshard_worker_gather_failovers_total",
        "counter",
        "Gathers of this worker served by a replica after the first holder failed.",
        |w| w.failovers_total as f64,
    ),
    (
        "zeroshard_worker_rejected_blocks_total",
        "counter",
        "Blocks this worker served that failed the checkpoint's digest at the receiver.",
        |w| w.rejected_blocks_total as f64,
    ),
    ("zeroshard_worker_resident_bytes", "gauge", "Gathered layers this worker keeps alive.", |w| {
        w.resident_bytes as f64
    }),
    ("zeroshard_worker_kv_reserved_bytes", "gauge", "KV-cache bytes reserved for admitted sequences.", |w| {
        w.kv_reserved_bytes as f64
    }),
    ("zeroshard_worker_kv_cache_bytes", "gauge", "This worker's KV-cache budget.", |w| {
        w.kv_cache_bytes as f64
    }),
];

/// The cluster's gauges and counters for `model`, from `s` and the requests
/// running now.
pub(super) fn cluster_text(s: &ClusterStatus, model: &str, in_flight: usize) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out, model };
    f.one(
        "zeroshard_ready",
        "gauge",
        "1 when a plan is active and requests are served.",
        f64::from(u8::from(s.ready)),
    );
    f.one("zeroshard_epoch", "gauge", "The active plan's epoch (0 before the first plan).", s.epoch as f64);
    f.one("zeroshard_workers", "gauge", "Workers registered now.", s.workers.len() as f64);
    f.one(
        "zeroshard_tensor_parallel_degree",
        "gauge",
        "Workers in each tensor-parallel group of the active plan (0: the gather placement).",
        f64::from(s.tensor_degree),
    );
    if !s.placement.is_empty() {
        let _ = writeln!(
            f.out,
            "# HELP zeroshard_placement 1 for the active plan's placement (gather or tensor)."
        );
        let _ = writeln!(f.out, "# TYPE zeroshard_placement gauge");
        let _ = writeln!(
            f.out,
            "zeroshard_placement{{model=\"{}\",placement=\"{}\"}} 1",
            escape(f.model),
            escape(&s.placement)
        );
    }
    f.one(
        "zeroshard_workers_lost_total",
        "counter",
        "Workers lost since the coordinator started.",
        s.workers_lost_total as f64,
    );
    f.one(
        "zeroshard_sequences_resumed_total",
        "counter",
        "Sequences resumed on another worker after theirs failed (fail-overs).",
        s.sequences_resumed_total as f64,
    );
    f.one(
        "zeroshard_sequences_moved_total",
        "counter",
        "Sequences handed back by draining workers and continued elsewhere.",
        s.sequences_moved_total as f64,
    );
    f.one(
        "zeroshard_install_deadlines_missed_total",
        "counter",
        "Workers that did not install a plan within their install deadline (evicted).",
        s.install_deadlines_missed_total as f64,
    );
    for (name, help, n) in [
        ("zeroshard_audits_passed_total", "whose every token held", s.audits_passed_total),
        (
            "zeroshard_audits_failed_total",
            "with tokens the model would not have chosen",
            s.audits_failed_total,
        ),
        (
            "zeroshard_audits_skipped_total",
            "that found no other worker to audit them",
            s.audits_skipped_total,
        ),
    ] {
        let help = format!("Finished sequences re-checked on another worker (--audit-fraction) {help}.");
        f.one(name, "counter", &help, n as f64);
    }
    f.one(
        "zeroshard_audit_bans_total",
        "counter",
        "Workers banned because audits found tokens the model would not have chosen.",
        s.audit_bans_total as f64,
    );
    f.one(
        "zeroshard_step_deadlines_missed_total",
        "counter",
        "Sequences moved off a worker that held them past the step deadline.",
        s.step_deadlines_missed_total as f64,
    );
    f.one(
        "zeroshard_output_lines_dropped_total",
        "counter",
        "Lines for stdout or stderr this process dropped because nothing read them (EPIPE).",
        zeroshard_offload::out::dropped() as f64,
    );
    f.one(
        "zeroshard_queue_length",
        "gauge",
        "Requests waiting for room on a worker.",
        f64::from(s.queued_requests),
    );
    f.one(
        "zeroshard_queue_capacity",
        "gauge",
        "The queue's bound (--max-queued-requests).",
        f64::from(s.max_queued_requests),
    );
    f.one(
        "zeroshard_requests_queue_full_total",
        "counter",
        "Requests refused because the queue was full.",
        s.requests_rejected_total as f64,
    );
    f.one(
        "zeroshard_requests_in_flight",
        "gauge",
        "Client requests running now (queued or generating).",
        in_flight as f64,
    );
    f.one(
        "zeroshard_active_sequences",
        "gauge",
        "Sequences generating on the workers now.",
        s.workers.iter().map(|w| f64::from(w.active_sequences)).sum(),
    );
    for (name, kind, help, value) in PER_WORKER {
        f.per_worker(name, kind, help, s, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_carry_the_model_and_worker_labels_escaped() {
        let s = ClusterStatus {
            epoch: 3,
            ready: true,
            workers: vec![WorkerStatus {
                id: 7,
                steps_total: 42,
                gather_bytes_per_s: 1.5e9,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = cluster_text(&s, "acme/\"x\"", 2);
        assert!(text.contains("zeroshard_epoch{model=\"acme/\\\"x\\\"\"} 3\n"), "{text}");
        assert!(
            text.contains("zeroshard_worker_steps_total{model=\"acme/\\\"x\\\"\",worker=\"7\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE zeroshard_worker_steps_total counter\n"), "{text}");
        assert!(text.contains("zeroshard_requests_in_flight{model=\"acme/\\\"x\\\"\"} 2\n"), "{text}");
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
