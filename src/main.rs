//! The `zeroshard` command line: parses arguments, sets up tracing, and calls
//! into the library crates. No engine logic lives here.
mod args;
mod cluster;

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Parser;
use zeroshard_coordinator::bench;
use zeroshard_coordinator::local::{GenerateRequest, LocalModel, Prompt};
use zeroshard_worker::engine::GenerationParams;
use zeroshard_worker::sampling::SamplingParams;

use args::{BenchArgs, Cli, Command, GenerateArgs};

fn main() {
    let cli = Cli::parse();
    // Long-running roles log their progress; one-shot commands only warnings.
    let default_level = match cli.command {
        Command::Up(_) | Command::Coordinator(_) | Command::Worker(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Bench(a) => run_bench(a),
        Command::Up(a) => cluster::up(a),
        Command::Coordinator(a) => cluster::coordinator(a),
        Command::Worker(a) => cluster::worker(a),
        Command::Query(a) => cluster::query(a),
        Command::Status(a) => cluster::status(a),
    };
    if let Err(e) = result {
        // One line: what failed and where (the error chain, outermost first).
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

pub(crate) fn sampling(a: &args::SamplingArgs) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            repetition_penalty: a.repetition_penalty,
            resume_draws: 0,
        },
        max_new_tokens: a.max_new_tokens,
        ignore_eos: a.ignore_eos,
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let prompts: Vec<Prompt> = if a.prompt.prompt_ids.is_empty() {
        a.prompt.prompt.iter().cloned().map(Prompt::Text).collect()
    } else {
        a.prompt.prompt_ids.iter().map(|ids| args::parse_ids(ids).map(Prompt::Ids)).collect::<Result<_>>()?
    };
    let model = LocalModel::load(&a.model, a.device)?;
    let reqs: Vec<GenerateRequest> = prompts
        .into_iter()
        .map(|prompt| GenerateRequest {
            prompt,
            params: sampling(&a.sampling),
            stop: a.sampling.stop.clone(),
        })
        .collect();
    let mut stdout = std::io::stdout().lock();
    // A single prompt streams its text; several are printed once done.
    let stream = !a.json && reqs.len() == 1;
    let outs = model.generate_batch(&reqs, a.logits_out.is_some(), |_, text| {
        if stream {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if let Some(path) = &a.logits_out {
        let logits: Vec<&Vec<f32>> = outs.iter().filter_map(|o| o.prompt_logits.as_ref()).collect();
        let json = match logits.as_slice() {
            [one] => serde_json::to_string(one)?,
            many => serde_json::to_string(many)?,
        };
        std::fs::write(path, json).with_context(|| format!("writing --logits-out {}", path.display()))?;
    }
    for out in &outs {
        if a.json {
            writeln!(stdout, "{}", serde_json::to_string(out)?)?;
        } else if stream {
            writeln!(stdout)?;
        } else {
            writeln!(stdout, "{}", out.text)?;
        }
    }
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    if a.workers > 0 {
        return cluster::bench(a);
    }
    let engine = match (&a.model, &a.synthetic) {
        (Some(dir), None) => {
            let m = LocalModel::load(dir, a.device)?;
            (m.into_engine(), dir.display().to_string())
        }
        (None, Some(spec)) => (bench::synthetic_engine(spec)?, spec.clone()),
        _ => bail!("give exactly one of --model or --synthetic"),
    };
    let (engine, label) = engine;
    let batches = args::parse_list(&a.batch).context("--batch")?;
    let bw = bench::measure_bandwidth();
    let weight_bytes = engine.weights().bytes();
    println!("model: {label}");
    println!(
        "weights: {:.1} MB f16 · backend: {} · prompt {} tokens, {} decode steps",
        weight_bytes as f64 / 1e6,
        zeroshard_worker::Backend::name(engine.backend()),
        a.prompt_len,
        a.new_tokens
    );
    println!(
        "memory bandwidth: memcpy {:.1} GB/s (1 thread) · read {:.1} GB/s (all threads; the bound below)",
        bw.memcpy_gbs, bw.read_gbs
    );
    println!(
        "{:>5} {:>14} {:>13} {:>14} {:>14} {:>14}",
        "batch", "prefill tok/s", "decode tok/s", "step ms", "MB read/step", "of bw bound"
    );
    for r in bench::run(&engine, &batches, a.prompt_len, a.new_tokens, bw)? {
        println!(
            "{:>5} {:>14.0} {:>13.1} {:>14.3} {:>14.2} {:>14.2}",
            r.batch,
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_step_ms,
            r.bytes_per_step as f64 / 1e6,
            r.bound_ratio
        );
    }
    Ok(())
}
