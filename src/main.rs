//! The `zeroshard` command line: parses arguments, sets up tracing, and calls
//! into the library crates. No engine logic lives here.
mod args;
mod bench_fronts;
mod cluster;
mod cuda;
mod generate;
mod hub;
mod launch;
mod plan;
mod security;
mod telemetry;

use std::io::{IsTerminal, Write};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches};
use generate::LocalModel;
use zeroshard_coordinator::chat;
use zeroshard_coordinator::request::{
    FinishReason, GenerateOutput, GenerateRequest, GenerationParams, Prompt, SamplingParams,
};
use zeroshard_engine::bench;
use zeroshard_engine::engine::Engine;
use zeroshard_engine::local::{self, AnyEngine, GpuOptions, Workload};
use zeroshard_engine::Backend;

use args::{BenchArgs, Cli, Command, GenerateArgs};

/// This process's open-file limits (soft and hard).
pub(crate) fn open_files() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit on this process with a valid struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// Servers hold a socket per client and per peer: raise the soft limit on
/// open files (often 1024) to the hard one, and say the figure (`up`'s
/// workers inherit it). 1,100 idle connections against 1024 left every
/// front refusing with "Too many open files".
fn raise_open_files() {
    let Some(mut lim) = open_files() else { return };
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit on this process with a valid struct.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0;
    if ok && before != lim.rlim_max {
        tracing::info!("open files: raised the limit from {before} to {}", lim.rlim_max);
    } else if ok {
        tracing::debug!("open files: the limit is {before} (the hard limit)");
    } else {
        tracing::warn!("open files: the limit stays {before} (raising it to {} failed)", lim.rlim_max);
    }
}

/// What `up` logs without `-v`: warnings, and the placement each epoch runs
/// (with the numbers it chose by).
const UP_QUIET: &str = "warn,zeroshard_coordinator::server::choose=info";

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == chat::sandbox::CHILD_ARG) {
        std::process::exit(chat::sandbox::serve());
    }
    // A panic aborts (no destructors run): the private keys `up` wrote go first.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        zeroshard_security::bundle::remove_now();
        report(info);
    }));
    // Chat templates come from model folders: render them in capped children.
    if let Ok(program) = std::env::current_exe() {
        chat::render_in_children_of(program);
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Fleet roles log their progress; `up` (a person at a terminal) and
    // one-shot commands only warnings, and `up` the placement it chose.
    let up = matches!(cli.command, Command::Up(_));
    let default_level = match (&cli.command, cli.verbose) {
        (_, 2..) => "debug",
        (Command::Up(_), 0) => UP_QUIET,
        (Command::Coordinator(_) | Command::Worker(_), _) | (_, 1) => "info",
        _ => "warn",
    };
    let rust_log = std::env::var_os("RUST_LOG").is_some();
    let service = match cli.command {
        Command::Up(_) | Command::Coordinator(_) => "zeroshard-coordinator",
        Command::Worker(_) => "zeroshard-worker",
        _ => "zeroshard",
    };
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    let targets = cli.verbose > 0 || rust_log;
    let traces =
        match telemetry::init_logs(default_level, ansi, targets, cli.otlp_endpoint.as_deref(), service) {
            Ok(t) => t,
            Err(e) => {
                zeroshard_offload::errln!("error: {}", one_line(&e));
                std::process::exit(1);
            }
        };
    if up && !rust_log {
        // The workers `up` starts log as it does. Still one thread here.
        let level = ["warn", "info", "debug"][usize::from(cli.verbose.min(2))];
        std::env::set_var("RUST_LOG", level);
    }
    if matches!(cli.command, Command::Generate(_) | Command::Bench(_) | Command::Worker(_)) {
        keep_freed_buffers();
    }
    if matches!(cli.command, Command::Up(_) | Command::Coordinator(_) | Command::Worker(_)) {
        raise_open_files();
    }
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Bench(a) => run_bench(a),
        Command::Up(a) => cluster::up(a),
        Command::Coordinator(a) => cluster::coordinator(a),
        Command::Worker(a) => cluster::worker(a),
        Command::Query(a) => cluster::query(a),
        Command::BenchFronts(a) => security::client(&a.auth).and_then(|auth| bench_fronts::run(a, auth)),
        Command::Status(a) => cluster::status(a),
        Command::Certs(c) => security::certs(c),
        Command::Launch(a) => launch::launch(a),
        Command::Plan(a) => plan::run(a),
        Command::Cuda(c) => cuda::run(c),
    };
    // Spans still batched go out before the process ends.
    if let Some(t) = traces {
        let _ = t.shutdown();
    }
    if let Err(e) = result {
        // One line: what failed and where (the error chain, outermost first).
        zeroshard_offload::errln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// Whether logs are coloured: only on a terminal, and not when `NO_COLOR` is
/// set to anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The error chain on one line, outermost first; a cause whose text an outer
/// message already carries (many errors print their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    zeroshard_security::tls::error_chain(e.as_ref())
}

/// The sampling flags as a request's parameters, checked here so that a bad
/// value is named by its flag (`--top-p`), not by its field.
pub(crate) fn sampling(a: &args::SamplingArgs) -> Result<GenerationParams> {
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            repetition_penalty: a.repetition_penalty,
            ..SamplingParams::default()
        },
        max_new_tokens: a.max_new_tokens,
        ignore_eos: a.ignore_eos,
    };
    if let Err(why) = params.sampling.validate() {
        let flagged = ["temperature", "top_p", "repetition_penalty"]
            .into_iter()
            .fold(why, |m, field| m.replacen(field, &format!("--{}", field.replace('_', "-")), 1));
        bail!("{flagged}");
    }
    Ok(params)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let prompts: Vec<Prompt> = if let Some(chat) = &a.prompt.chat {
        vec![Prompt::Chat(args::parse_chat(chat)?)]
    } else if a.prompt.prompt_ids.is_empty() {
        a.prompt.prompt.iter().cloned().map(Prompt::Text).collect()
    } else {
        a.prompt.prompt_ids.iter().map(|ids| args::parse_ids(ids).map(Prompt::Ids)).collect::<Result<_>>()?
    };
    // Size the KV cache for every prompt at its longest (text: bytes bound tokens, + BOS).
    let max_new = a.sampling.max_new_tokens;
    let prompt_len = |p: &Prompt| match p {
        Prompt::Text(t) => t.len() + 2,
        Prompt::Ids(ids) => ids.len(),
        // The template adds its markers: a margin per message and for the whole.
        Prompt::Chat(m) => m.iter().map(|m| m.role.len() + m.content.len() + 32).sum::<usize>() + 256,
    };
    let work = Workload {
        seqs: prompts.len(),
        tokens_per_seq: prompts.iter().map(prompt_len).max().unwrap_or(1) + max_new,
        max_rows: prompts.iter().map(prompt_len).sum::<usize>().max(1),
    };
    let model_dir = hub::resolve(&a.model.model)?;
    a.placement.apply_threads();
    let model = LocalModel::load(&model_dir, a.placement.device, &gpu_options(&a.placement), work)?;
    let params = sampling(&a.sampling)?;
    let reqs: Vec<GenerateRequest> = prompts
        .into_iter()
        .map(|prompt| GenerateRequest::new(prompt, params.clone(), a.sampling.stop.clone()))
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
    for (i, out) in outs.iter().enumerate() {
        if a.json {
            writeln!(stdout, "{}", serde_json::to_string(out)?)?;
        } else if stream {
            writeln!(stdout)?;
        } else {
            // Several answers: each under a line naming its prompt.
            if outs.len() > 1 {
                writeln!(stdout, "== {} of {}", i + 1, outs.len())?;
            }
            writeln!(stdout, "{}", out.text)?;
        }
        note_context_end(out, a.sampling.max_new_tokens, (outs.len() > 1).then_some(i));
    }
    Ok(())
}

/// Says on stderr when an answer ended short of `--max-new-tokens` because
/// the prompt and the answer filled the model's context (the answer's
/// `finish_reason` is `length` either way). `which`: its prompt, of several.
pub(crate) fn note_context_end(out: &GenerateOutput, max_new_tokens: usize, which: Option<usize>) {
    let generated = out.token_ids.len();
    if out.finish_reason == FinishReason::Length.as_str() && generated < max_new_tokens {
        let which = which.map_or(String::new(), |i| format!(" {}", i + 1));
        zeroshard_offload::errln!(
            "zeroshard: answer{which} stopped at the model's context after {generated} new tokens \
             (its prompt has {}), short of --max-new-tokens {max_new_tokens}",
            out.prompt_token_ids.len()
        );
    }
}

/// The placement flags as the one-process engine takes them.
fn gpu_options(p: &args::PlacementArgs) -> GpuOptions {
    GpuOptions {
        gpu_memory: p.gpu_memory,
        max_live_bytes: p.max_live_bytes,
        prefetch_layers: p.prefetch_layers,
    }
}

/// Processes that compute allocate and free multi-MB activations every op. glibc maps
/// buffers over its (adaptive) threshold afresh and returns freed heap tops to the OS,
/// so each op paid its page faults again (measured: 543k faults for the prefill and 16
/// decode steps of the 270M-parameter bench model, 282k with this). Buffers up to 64 MiB
/// now come from the heap and up to 256 MiB of freed heap is kept for reuse.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, under the allocator's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

fn run_bench(mut a: BenchArgs) -> Result<()> {
    a.source.model = a.source.model.as_deref().map(hub::resolve).transpose()?;
    if let (Some(dir), Some(spec)) = (&a.write_checkpoint, &a.source.synthetic) {
        let config = zeroshard_offload::synthetic::synthetic_config(spec)?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--write-checkpoint: creating {}", dir.display()))?;
        let bytes = zeroshard_offload::synthetic::write_synthetic_checkpoint(&config, dir)?;
        zeroshard_offload::outln!(
            "wrote a {:.1} MB checkpoint of {spec} to {}",
            bytes as f64 / 1e6,
            dir.display()
        );
        return Ok(());
    }
    if a.workers > 0 {
        return cluster::bench(a);
    }
    a.tuning.placement.apply_threads();
    let batches = args::parse_list(&a.batch).context("--batch")?;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let work = Workload {
        seqs: max_batch,
        tokens_per_seq: a.prompt_len + a.new_tokens + 1,
        max_rows: max_batch * a.prompt_len.max(1),
    };
    let gpu = gpu_options(&a.tuning.placement);
    let ((config, weights), label) = match (&a.source.model, &a.source.synthetic) {
        (Some(dir), None) => (local::load_weights(dir)?, dir.display().to_string()),
        (None, Some(spec)) => (bench::synthetic_model(spec)?, spec.clone()),
        _ => bail!("give exactly one of --model or --synthetic"),
    };
    let placed = local::place(config, weights, a.tuning.placement.device, &gpu, work)?;
    let engine = &placed.engine;
    let weight_bytes = engine.weight_bytes();
    zeroshard_offload::outln!("model: {label}");
    zeroshard_offload::outln!(
        "weights: {:.1} MB f16 · backend: {} · prompt {} tokens, {} decode steps",
        weight_bytes as f64 / 1e6,
        engine.backend_name(),
        a.prompt_len,
        a.new_tokens
    );
    let (bw, streamed, peak) = match engine {
        AnyEngine::Cpu(_) => {
            let pool = zeroshard_engine::engine::compute_pool();
            let bw = pool.install(bench::measure_bandwidth);
            zeroshard_offload::outln!(
                "memory bandwidth: memcpy {:.1} GB/s (1 thread) · read {:.1} GB/s (all threads; the bound below)",
                bw.memcpy_gbs, bw.read_gbs
            );
            let peak = pool.install(|| zeroshard_engine::cpu::matmul::peak_gflops(200));
            zeroshard_offload::outln!(
                "arithmetic peak: {peak:.1} GFLOP/s f32 FMA (all threads; the FLOP bound below) · {:.3} GFLOP per token in products",
                bench::matmul_flops_per_token(engine.config()) / 1e9
            );
            (bw, bench::Streamed::default(), peak)
        }
        AnyEngine::Cuda(e) => {
            let (dtod, htod) = e.backend().copy_bandwidth()?;
            let (dtod, htod) = (dtod / 1e9, htod / 1e9);
            if let Some(s) = &placed.gpu_summary {
                zeroshard_offload::outln!("placement: {s}");
            }
            zeroshard_offload::outln!(
                "device copy bandwidth {dtod:.0} GB/s (read + write; the bound below) · pinned host→device {htod:.1} GB/s"
            );
            let bw = bench::Bandwidth { memcpy_gbs: dtod, read_gbs: dtod };
            (bw, bench::Streamed { bytes_per_step: placed.streamed_bytes_per_step, h2d_gbs: htod }, 0.0)
        }
    };
    let rows = match engine {
        AnyEngine::Cpu(e) => bench_rows(e, &batches, &a, bw, streamed, peak)?,
        AnyEngine::Cuda(e) => bench_rows(e, &batches, &a, bw, streamed, peak)?,
    };
    zeroshard_offload::outln!(
        "{:>5} {:>14} {:>13} {:>10} {:>13} {:>12} {:>16} {:>15}",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "step ms",
        "MB read/step",
        "of bw bound",
        "prefill of FLOPs",
        "decode of FLOPs"
    );
    let of_peak = |r: f64| if peak > 0.0 { format!("{r:.2}") } else { "-".into() };
    for r in &rows {
        zeroshard_offload::outln!(
            "{:>5} {:>14.0} {:>13.1} {:>10.3} {:>13.2} {:>12.2} {:>16} {:>15}",
            r.batch,
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_step_ms,
            r.bytes_per_step as f64 / 1e6,
            r.bound_ratio,
            of_peak(r.prefill_flops_ratio),
            of_peak(r.decode_flops_ratio),
        );
    }
    if streamed.bytes_per_step > 0 {
        let bound = rows.first().map_or(0.0, |r| r.streamed_bound_ms);
        zeroshard_offload::outln!(
            "streamed: {:.1} MB host→device per step; pinned-copy bound {bound:.3} ms per step; \
             step time over it: {}",
            streamed.bytes_per_step as f64 / 1e6,
            rows.iter()
                .map(|r| format!("batch {} {:.2}", r.batch, r.decode_step_ms / bound))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if a.json {
        let summary = serde_json::json!({
            "model": label,
            "backend": engine.backend_name(),
            "weight_bytes": weight_bytes,
            "bound_gbs": bw.read_gbs,
            "peak_gflops": peak,
            "pinned_h2d_gbs": streamed.h2d_gbs,
            "streamed_bytes_per_step": streamed.bytes_per_step,
            "placement": placed.gpu_summary,
            "rows": rows,
        });
        zeroshard_offload::outln!("{summary}");
    }
    Ok(())
}

fn bench_rows<B: Backend>(
    e: &Engine<B>,
    batches: &[usize],
    a: &BenchArgs,
    bw: bench::Bandwidth,
    streamed: bench::Streamed,
    peak_gflops: f64,
) -> Result<Vec<bench::BenchRow>> {
    Ok(bench::run(e, batches, a.prompt_len, a.new_tokens, bw, streamed, peak_gflops)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn an_error_chain_is_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        // A source whose text its wrapper already prints, then a context that adds to it.
        let e = anyhow::Error::new(zeroshard_offload::OffloadError::Io {
            path: "m/config.json".into(),
            source: io,
        })
        .context("loading the model");
        assert_eq!(one_line(&e), "loading the model: m/config.json: No such file or directory (os error 2)");
    }
}
