//! What each placement costs, predicted from the model's shape, what one
//! worker computes at, and the link between workers: bytes moved per step,
//! memory per worker, prefill and decode tokens per second. `zeroshard plan`
//! prints it and says which placement it would choose.
//!
//! The model of one worker computing `rows` tokens of `seqs` sequences over
//! `w` bytes of weights: reading them, `w / read`, and the products, `(rows ·
//! layer FLOPs + seqs · head FLOPs) / (peak · efficiency)` (at the share of the
//! FMA peak the kernels reach: [`KERNEL_EFFICIENCY`]; the head runs on each
//! sequence's last position only), overlapping in part: the longer of the two
//! plus [`UNHIDDEN`] of the shorter.
//!
//! - **gather**: a worker computes the whole model for its share of the
//!   batch, after gathering the other workers' ranges of every layer (moved
//!   while the previous layer computes): a step takes the longer of the two,
//!   or on workers sharing a machine's cores their sum, with the gather rate
//!   shared by the workers gathering at once.
//! - **tensor**: every worker computes its 1/N of every layer for the whole
//!   batch; per layer two sums (and one for the embedding) each cost a round
//!   trip plus `rows · hidden` f32 values from and to each other member at
//!   rank 0, then the logits' vocabulary rows go to rank 0.
//!
//! Attention over the cache and the KV cache itself are left out (short
//! contexts: a few percent of a step).
use crate::config::ModelConfig;

/// The share of the FMA peak the matrix kernels reach at batch ≥ 8 and in
/// prefill (measured: 0.51–0.63 on AVX2 and AVX-512, `docs/benchmarks.md`).
pub const KERNEL_EFFICIENCY: f64 = 0.6;

/// The share of the shorter of reading and multiplying that the longer does
/// not hide: a kernel streams a matrix while it multiplies, but not at both
/// peaks at once. Fitted on the 270M shape on a 2-core AVX2 machine
/// (`docs/benchmarks.md`, issue 29): one process and 2 tensor workers, decode
/// batch 1 and 8 and prefill 128, all within 25% at 0.5; adding both (1.0)
/// put memory-bound batch 1 of 2 workers 40% low, the longer alone (0.0) batch
/// 8 over 30% high.
pub const UNHIDDEN: f64 = 0.5;

/// What one worker and the link between workers can do.
#[derive(Clone, Copy, Debug)]
pub struct Hardware {
    /// Multiply-add FLOP/s at the f32 FMA peak, one worker.
    pub peak_flops: f64,
    /// Bytes/s one worker reads its weights at.
    pub read_bytes_per_s: f64,
    /// Bytes/s between two workers, each way.
    pub link_bytes_per_s: f64,
    /// A message's round trip between two workers, seconds.
    pub round_trip_s: f64,
    /// The rate a gather assembles ranges at (checks and copies included),
    /// when it is below the link's.
    pub gather_bytes_per_s: f64,
    /// The workers share one machine's cores: a gather's decrypting, hashing
    /// and copying takes the cores the products need, so the two add up
    /// instead of overlapping, and workers gathering at once share the rate
    /// (measured: 0.78 GB/s for one, 0.36–0.41 each for two).
    pub shared_cores: bool,
}

/// A placement, as predicted.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// `gather` or `tensor`.
    pub placement: &'static str,
    /// Why the model cannot be placed so (`None`: it can).
    pub refused: Option<String>,
    /// Bytes a worker moves (sends and receives) per decode step at batch 1.
    pub decode_step_bytes: f64,
    /// Bytes moved per prompt token of a prefill.
    pub prefill_token_bytes: f64,
    /// Bytes of weights each worker holds.
    pub memory_per_worker: f64,
    /// Prefill of one `prompt`-token prompt, tokens/s.
    pub prefill_tokens_per_s: f64,
    /// Decode tokens/s at each batch size asked for.
    pub decode_tokens_per_s: Vec<(usize, f64)>,
}

/// The model's shape as the cost model needs it.
struct Shape {
    /// f16 bytes of all weights, and of the matrices a token is multiplied by.
    weight_bytes: f64,
    /// f16 bytes of the token embedding table (untied: the head is another such table).
    embed_bytes: f64,
    /// Multiply-add FLOPs of every layer's products per token, and of the head per sequence.
    layer_flops: f64,
    head_flops: f64,
    hidden: f64,
    layers: f64,
    vocab: f64,
}

fn shape(c: &ModelConfig) -> Shape {
    let (h, q, kv, ffn, v, l) = (
        c.hidden_size as f64,
        c.q_dim() as f64,
        c.kv_dim() as f64,
        c.intermediate_size as f64,
        c.vocab_size as f64,
        c.num_layers as f64,
    );
    let layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * ffn;
    let tables = v * h * if c.tie_word_embeddings { 1.0 } else { 2.0 };
    Shape {
        weight_bytes: 2.0 * (l * (layer + 2.0 * h) + tables + h),
        // Tied, the table is the head too: gathered whole.
        embed_bytes: if c.tie_word_embeddings { 0.0 } else { 2.0 * v * h },
        layer_flops: 2.0 * l * layer,
        head_flops: 2.0 * v * h,
        hidden: h,
        layers: l,
        vocab: v,
    }
}

/// One worker computing `share` of the model (1/N under the tensor
/// placement) for `rows` tokens of `seqs` sequences.
fn compute_s(hw: &Hardware, s: &Shape, share: f64, rows: f64, seqs: f64) -> f64 {
    let flops = share * (rows * s.layer_flops + seqs * s.head_flops);
    let read = share * s.weight_bytes / hw.read_bytes_per_s;
    let multiply = flops / (hw.peak_flops * KERNEL_EFFICIENCY);
    read.max(multiply) + UNHIDDEN * read.min(multiply)
}

/// Predictions for `workers` workers (one group for the tensor placement),
/// decode at each of `batches`, prefill of `prompt` tokens.
pub fn predict(
    c: &ModelConfig,
    workers: usize,
    hw: &Hardware,
    batches: &[usize],
    prompt: usize,
) -> Vec<Prediction> {
    let s = shape(c);
    let n = workers.max(1) as f64;
    let others = n - 1.0;
    // Gather: the other workers' ranges of every layer and the head, every
    // step (of the embedding table only the rows of the step's ids).
    let moved = (s.weight_bytes - s.embed_bytes) * others / n;
    let gather_rate = hw.link_bytes_per_s.min(hw.gather_bytes_per_s);
    // `gathering`: workers with sequences in the step, each gathering.
    let gather_step = |rows: f64, seqs: f64, gathering: f64| {
        let shared = if hw.shared_cores { gathering } else { 1.0 };
        let fetch = if others > 0.0 { moved / gather_rate * shared } else { 0.0 };
        let compute = compute_s(hw, &s, 1.0, rows, seqs);
        if hw.shared_cores {
            fetch + compute
        } else {
            fetch.max(compute)
        }
    };
    let gather = Prediction {
        placement: "gather",
        refused: None,
        decode_step_bytes: moved,
        prefill_token_bytes: moved / prompt.max(1) as f64,
        memory_per_worker: s.weight_bytes / n,
        prefill_tokens_per_s: prompt as f64 / gather_step(prompt as f64, 1.0, 1.0),
        decode_tokens_per_s: batches
            .iter()
            .map(|&b| {
                // Each worker steps its share of the batch, all at once.
                let share = (b as f64 / n).ceil();
                (b, b as f64 / gather_step(share, share, (b as f64).min(n)))
            })
            .collect(),
    };
    // Tensor: 2 sums per layer and one for the embedding, then the logits.
    let sums = 2.0 * s.layers + 1.0;
    let sum_bytes = |rows: f64| 2.0 * others * rows * s.hidden * 4.0;
    let logits_bytes = |seqs: f64| others / n * seqs * s.vocab * 4.0;
    let tensor_step = |rows: f64, seqs: f64| {
        let exchange = if others > 0.0 {
            sums * (hw.round_trip_s + sum_bytes(rows) / 2.0 / hw.link_bytes_per_s)
                + hw.round_trip_s
                + logits_bytes(seqs) / hw.link_bytes_per_s
        } else {
            0.0
        };
        compute_s(hw, &s, 1.0 / n, rows, seqs) + exchange
    };
    let tensor = Prediction {
        placement: "tensor",
        refused: c.check_tensor_degree(workers).err(),
        decode_step_bytes: sums * sum_bytes(1.0) + logits_bytes(1.0),
        prefill_token_bytes: sums * sum_bytes(1.0),
        memory_per_worker: s.weight_bytes / n,
        prefill_tokens_per_s: prompt as f64 / tensor_step(prompt as f64, 1.0),
        decode_tokens_per_s: batches
            .iter()
            .map(|&b| (b, b as f64 / tensor_step(b as f64, b as f64)))
            .collect(),
    };
    vec![gather, tensor]
}

/// The placement to run at `batch` sequences (the decode batch the cluster
/// expects, e.g. `--max-active-sequences`), and why: the one with the higher
/// predicted decode rate among those the model allows.
pub fn choose(predictions: &[Prediction], batch: usize) -> (&'static str, String) {
    let rate = |p: &Prediction| {
        p.decode_tokens_per_s.iter().min_by_key(|(b, _)| b.abs_diff(batch)).map_or(0.0, |(_, r)| *r)
    };
    let allowed: Vec<&Prediction> = predictions.iter().filter(|p| p.refused.is_none()).collect();
    let Some(best) = allowed.iter().copied().max_by(|a, b| rate(a).total_cmp(&rate(b))) else {
        return ("gather", "no placement allowed: gather".into());
    };
    let refused: Vec<String> = predictions
        .iter()
        .filter_map(|p| p.refused.as_ref().map(|r| format!("{}: {r}", p.placement)))
        .collect();
    let others: Vec<String> = allowed
        .iter()
        .filter(|p| p.placement != best.placement)
        .map(|p| format!("{} {:.1}", p.placement, rate(p)))
        .collect();
    let mut why = format!("{} decodes {:.1} tok/s at batch {batch}", best.placement, rate(best));
    if !others.is_empty() {
        why.push_str(&format!(" against {}", others.join(", ")));
    }
    if !refused.is_empty() {
        why.push_str(&format!(" ({})", refused.join("; ")));
    }
    (best.placement, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c270m() -> ModelConfig {
        crate::synthetic::synthetic_config(
            "llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000",
        )
        .expect("shape")
    }

    /// This 2-core machine's figures for one of 2 colocated workers.
    fn hw() -> Hardware {
        Hardware {
            peak_flops: 93e9,
            read_bytes_per_s: 11e9,
            link_bytes_per_s: 2e9,
            round_trip_s: 100e-6,
            gather_bytes_per_s: 0.6e9,
            shared_cores: true,
        }
    }

    #[test]
    fn tensor_moves_a_thousandth_of_what_gather_moves_and_wins_on_slow_links() {
        let p = predict(&c270m(), 2, &hw(), &[1, 8, 32], 128);
        let (gather, tensor) = (&p[0], &p[1]);
        // ~492 MB of weights: gather moves half of all but the embedding table
        // (65.5 MB) per step; tensor
        // ~2 × 33 sums × 4 KB plus half the logits.
        assert!((gather.decode_step_bytes - 213e6).abs() < 2e6, "{}", gather.decode_step_bytes);
        assert!(
            tensor.decode_step_bytes < 0.5e6 && tensor.decode_step_bytes > 0.2e6,
            "{}",
            tensor.decode_step_bytes
        );
        assert!(tensor.decode_tokens_per_s[0].1 > 5.0 * gather.decode_tokens_per_s[0].1);
        assert_eq!(choose(&p, 8).0, "tensor");
        // One worker: nothing moves, both the same.
        let one = predict(&c270m(), 1, &hw(), &[1], 128);
        assert_eq!(one[0].decode_step_bytes, 0.0);
        assert!((one[0].decode_tokens_per_s[0].1 - one[1].decode_tokens_per_s[0].1).abs() < 1e-9);
    }

    #[test]
    fn reading_and_multiplying_overlap_in_part() {
        let (hw, s) = (hw(), shape(&c270m()));
        for (rows, seqs) in [(1.0, 1.0), (8.0, 8.0), (128.0, 1.0)] {
            let read = s.weight_bytes / hw.read_bytes_per_s;
            let multiply = (rows * s.layer_flops + seqs * s.head_flops) / (hw.peak_flops * KERNEL_EFFICIENCY);
            let t = compute_s(&hw, &s, 1.0, rows, seqs);
            assert!(
                t > read.max(multiply) && t < read + multiply,
                "{rows} rows: {t} against {read} and {multiply}"
            );
        }
    }

    #[test]
    fn a_fast_link_and_big_batches_favour_gather_and_a_refused_tensor_is_named() {
        let fast =
            Hardware { link_bytes_per_s: 400e9, gather_bytes_per_s: 400e9, round_trip_s: 2e-3, ..hw() };
        let p = predict(&c270m(), 2, &fast, &[256], 128);
        assert_eq!(choose(&p, 256).0, "gather", "{p:?}");
        let three = predict(&c270m(), 3, &hw(), &[8], 128);
        let (pick, why) = choose(&three, 8);
        assert_eq!(pick, "gather");
        assert!(
            why.contains("tensor: 3 tensor-parallel workers do not divide the model's 4 KV heads"),
            "{why}"
        );
    }
}
