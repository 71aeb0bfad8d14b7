//! `zeroshard plan`: each placement's predicted cost for a model over N
//! workers ([`zeroshard_offload::cost`]), from this machine's measured
//! compute (or the one given) and the link given, and the choice.
use anyhow::{bail, Context, Result};
use zeroshard_offload::cost::{self, Hardware};
use zeroshard_offload::ModelConfig;

use crate::args::{self, PlanArgs};

pub(crate) fn run(a: PlanArgs) -> Result<()> {
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if a.link_gbps <= 0.0 || a.gather_gbps <= 0.0 || a.link_latency_us < 0.0 {
        bail!("--link-gbps and --gather-gbps must be positive, --link-latency-us not negative");
    }
    let (config, label) = match (&a.source.model, &a.source.synthetic) {
        (Some(m), None) => {
            let dir = crate::hub::resolve(m)?;
            (
                ModelConfig::from_dir(&dir).with_context(|| format!("--model {}", m.display()))?,
                m.display().to_string(),
            )
        }
        (None, Some(s)) => {
            (zeroshard_offload::synthetic::synthetic_config(s).context("--synthetic")?, s.clone())
        }
        _ => bail!("give exactly one of --model or --synthetic"),
    };
    let batches = args::parse_list(&a.batch).context("--batch")?;
    let (gflops, read_gbs, measured) = match (a.worker_gflops, a.worker_read_gbs) {
        (Some(f), Some(r)) => (f, r, false),
        _ => {
            let pool = zeroshard_engine::engine::compute_pool();
            let bw = pool.install(zeroshard_engine::bench::measure_bandwidth);
            let peak = pool.install(|| zeroshard_engine::cpu::matmul::peak_gflops(200));
            let share = if a.colocated { a.workers as f64 } else { 1.0 };
            (peak / share, bw.read_gbs / share, true)
        }
    };
    let hw = Hardware {
        peak_flops: gflops * 1e9,
        read_bytes_per_s: read_gbs * 1e9,
        link_bytes_per_s: a.link_gbps * 1e9 / 8.0,
        round_trip_s: a.link_latency_us * 1e-6,
        gather_bytes_per_s: a.gather_gbps * 1e9 / 8.0,
        shared_cores: a.colocated,
    };
    let predictions = cost::predict(&config, a.workers, &hw, &batches, a.prompt_len);
    let (choice, why) = cost::choose(&predictions, a.choose_at);
    if a.json {
        let rows: Vec<serde_json::Value> = predictions
            .iter()
            .map(|p| {
                serde_json::json!({
                    "placement": p.placement,
                    "refused": p.refused,
                    "decode_step_bytes": p.decode_step_bytes,
                    "prefill_token_bytes": p.prefill_token_bytes,
                    "memory_per_worker_bytes": p.memory_per_worker,
                    "prefill_tokens_per_s": p.prefill_tokens_per_s,
                    "decode_tokens_per_s": p.decode_tokens_per_s.iter()
                        .map(|(b, r)| serde_json::json!({"batch": b, "tokens_per_s": r}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        zeroshard_offload::outln!(
            "{}",
            serde_json::json!({"model": label, "workers": a.workers, "choice": choice, "reason": why,
                "worker_gflops": gflops, "worker_read_gbs": read_gbs, "link_gbps": a.link_gbps,
                "link_latency_us": a.link_latency_us, "placements": rows})
        );
        return Ok(());
    }
    zeroshard_offload::outln!(
        "model: {label} · {} workers · each {gflops:.0} GFLOP/s peak, reads {read_gbs:.1} GB/s ({}) · link {} Gb/s, {} µs round trip",
        a.workers,
        if measured { if a.colocated { "this machine's, shared" } else { "measured on this machine" } } else { "given" },
        a.link_gbps,
        a.link_latency_us
    );
    let mb = |b: f64| b / 1e6;
    let mut head = format!(
        "{:<9} {:>16} {:>16} {:>13} {:>14}",
        "placement", "MB/decode step", "KB/prefill tok", "GB/worker", "prefill tok/s"
    );
    for b in &batches {
        head.push_str(&format!(" {:>12}", format!("decode b{b}")));
    }
    zeroshard_offload::outln!("{head}");
    for p in &predictions {
        if let Some(r) = &p.refused {
            zeroshard_offload::outln!("{:<9} refused: {r}", p.placement);
            continue;
        }
        let mut row = format!(
            "{:<9} {:>16.3} {:>16.1} {:>13.2} {:>14.1}",
            p.placement,
            mb(p.decode_step_bytes),
            p.prefill_token_bytes / 1e3,
            p.memory_per_worker / 1e9,
            p.prefill_tokens_per_s
        );
        for (_, r) in &p.decode_tokens_per_s {
            row.push_str(&format!(" {r:>12.1}"));
        }
        zeroshard_offload::outln!("{row}");
    }
    zeroshard_offload::outln!("choice: {choice}: {why}");
    Ok(())
}
