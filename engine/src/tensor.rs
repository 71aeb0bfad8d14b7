//! The tensor placement's shard of a model, and the collective its members
//! compute through.
//!
//! Member `rank` of a group of `degree` holds, of every decoder layer, whole
//! KV-head groups of attention (the q/k/v rows of its heads, the o_proj columns
//! of those heads) and a slice of the MLP's ffn rows (gate/up rows, down
//! columns); of the embedding and the LM head a slice of vocabulary rows;
//! norms replicated. It computes its part of every sequence of a step; the
//! partial outputs of o_proj and down_proj are summed across the group
//! ([`Collective::all_reduce_sum`], twice per layer), the embedding's rows
//! too (each member contributes the rows of the ids it holds), and the
//! logits' vocabulary slices are assembled on rank 0, which samples.
//!
//! The model code is the same as in one process: a shard is a model with
//! fewer heads and a narrower MLP ([`TensorShard::config`]), and the sums are
//! a hook in [`Step`](crate::model) that is a no-op without a group.
//!
//! Exactness: the sums run in f32 in rank order (0 + 1 + …), the same bits on
//! every member, so a member's result never depends on timing. They differ from
//! one process's by the rounding of a split dot product (a sum of two partial
//! sums instead of one running sum): ~1e-6 relative, below what changes a
//! greedy token on the reference fixtures.
//!
//! ```ignore
//! let shard = TensorShard::new(&config, rank, degree)?;
//! let engine = Engine::tensor_member(backend, &config, shard, shard.weights(&config, &full)?);
//! engine.step_in_group(&mut seqs, &group)?;  // every member, in lockstep
//! ```
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

use half::f16;
use zeroshard_offload::{Checkpoint, ModelConfig};

use crate::error::{EngineError, Result};
use crate::model::TensorSpec;
use crate::weights::HostWeights;

/// Member `rank` of a tensor-parallel group of `degree`, for one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShard {
    pub rank: usize,
    pub degree: usize,
    /// Its KV heads (and the query heads that attend with them).
    pub kv_heads: Range<usize>,
    /// Its rows of the MLP's `intermediate_size`.
    pub ffn: Range<usize>,
    /// Its rows of the vocabulary (embedding and LM head).
    pub vocab: Range<usize>,
}

/// Part `i` of `n` near-equal parts of `0..len`.
fn part(len: usize, n: usize, i: usize) -> Range<usize> {
    i * len / n..(i + 1) * len / n
}

/// Whether `degree` members can split `c` (one line saying why not; see
/// [`ModelConfig::check_tensor_degree`], which the coordinator plans with).
pub fn check_degree(c: &ModelConfig, degree: usize) -> Result<()> {
    c.check_tensor_degree(degree).map_err(EngineError::InvalidRequest)
}

impl TensorShard {
    /// Member `rank` of `degree`, refused where `degree` cannot split `c`.
    pub fn new(c: &ModelConfig, rank: usize, degree: usize) -> Result<Self> {
        check_degree(c, degree)?;
        if rank >= degree {
            return Err(EngineError::InvalidRequest(format!("rank {rank} of a group of {degree}")));
        }
        let per = c.num_kv_heads / degree;
        Ok(Self {
            rank,
            degree,
            kv_heads: rank * per..(rank + 1) * per,
            ffn: part(c.intermediate_size, degree, rank),
            vocab: part(c.vocab_size, degree, rank),
        })
    }

    /// Every member's vocabulary rows, in rank order.
    pub fn vocab_parts(c: &ModelConfig, degree: usize) -> Vec<Range<usize>> {
        (0..degree).map(|r| part(c.vocab_size, degree, r)).collect()
    }

    /// Query heads per KV head.
    fn group(c: &ModelConfig) -> usize {
        c.num_heads / c.num_kv_heads.max(1)
    }

    /// Its query heads.
    pub fn heads(&self, c: &ModelConfig) -> Range<usize> {
        let g = Self::group(c);
        self.kv_heads.start * g..self.kv_heads.end * g
    }

    /// The model this member computes: its heads, its MLP rows (vocabulary,
    /// positions and everything else as the model's).
    pub fn config(&self, c: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_heads: self.heads(c).len(),
            num_kv_heads: self.kv_heads.len(),
            intermediate_size: self.ffn.len(),
            ..c.clone()
        }
    }

    /// Its part of one tensor of the model, in compute layout (`None`: the
    /// tensor is whole on every member). A bias added after a sum (o_proj's,
    /// down_proj's) is rank 0's; the others hold zeros, so it is added once.
    fn cut(
        &self,
        c: &ModelConfig,
        name: &str,
        shape: &[usize],
        data: &[f16],
    ) -> Option<(Vec<usize>, Vec<f16>)> {
        let hd = c.head_dim;
        let rows = |r: Range<usize>| {
            let cols: usize = shape[1..].iter().product::<usize>().max(1);
            let mut s = shape.to_vec();
            s[0] = r.len();
            (s, data[r.start * cols..r.end * cols].to_vec())
        };
        let cols = |r: Range<usize>| {
            let (out, inp) = (shape[0], shape[1]);
            let mut d = Vec::with_capacity(out * r.len());
            for row in data.chunks_exact(inp) {
                d.extend_from_slice(&row[r.clone()]);
            }
            (vec![out, r.len()], d)
        };
        let once = || {
            let d = if self.rank == 0 { data.to_vec() } else { vec![f16::ZERO; data.len()] };
            (shape.to_vec(), d)
        };
        let heads = self.heads(c);
        let (q, kv) = (heads.start * hd..heads.end * hd, self.kv_heads.start * hd..self.kv_heads.end * hd);
        let end = |s: &str| name.ends_with(s);
        Some(if end("self_attn.q_proj.weight") || end("self_attn.q_proj.bias") {
            rows(q)
        } else if end("self_attn.k_proj.weight")
            || end("self_attn.k_proj.bias")
            || end("self_attn.v_proj.weight")
            || end("self_attn.v_proj.bias")
        {
            rows(kv)
        } else if end("self_attn.o_proj.weight") {
            cols(q)
        } else if end("mlp.gate_proj.weight")
            || end("mlp.gate_proj.bias")
            || end("mlp.up_proj.weight")
            || end("mlp.up_proj.bias")
        {
            rows(self.ffn.clone())
        } else if end("mlp.down_proj.weight") {
            cols(self.ffn.clone())
        } else if end("self_attn.o_proj.bias") || end("mlp.down_proj.bias") {
            once()
        } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            rows(self.vocab.clone())
        } else {
            return None;
        })
    }

    fn insert(&self, c: &ModelConfig, store: &mut HostWeights, spec: &TensorSpec, whole: Vec<f16>) {
        match self.cut(c, &spec.name, &spec.shape, &whole) {
            Some((shape, data)) => {
                let part = TensorSpec { shape, ..spec.clone() };
                store.insert(&part, data);
            }
            None => store.insert(spec, whole),
        }
    }

    /// This member's weights, cut from a whole model in host memory.
    pub fn weights(&self, c: &ModelConfig, whole: &HostWeights) -> Result<HostWeights> {
        let mut store = HostWeights::default();
        for spec in crate::model::tensor_specs(c) {
            let data = whole.get(&spec.name).ok_or_else(|| EngineError::MissingWeight(spec.name.clone()))?;
            self.insert(c, &mut store, &spec, data.to_vec());
        }
        Ok(store)
    }

    /// This member's weights, read from a checkpoint one tensor at a time
    /// (checked against `c` first, as [`HostWeights::load`] does).
    pub fn load(&self, ckpt: &Checkpoint, c: &ModelConfig) -> Result<HostWeights> {
        self.load_checked(ckpt, c, |_, _| Ok(()))
    }

    /// [`Self::load`], handing each whole tensor as stored (f16) to `check`
    /// before it is cut (a worker verifies the checkpoint's block digests).
    pub fn load_checked(
        &self,
        ckpt: &Checkpoint,
        c: &ModelConfig,
        check: impl Fn(&str, &[f16]) -> Result<()>,
    ) -> Result<HostWeights> {
        let mut store = HostWeights::default();
        for spec in zeroshard_offload::spec::checked_specs(c, ckpt)? {
            let stored = ckpt.read_f16(&spec.name, 0..spec.numel())?;
            check(&spec.name, &stored)?;
            let whole = spec.to_compute_layout(stored);
            self.insert(c, &mut store, &spec, whole);
        }
        Ok(store)
    }
}

/// The operations the members of a tensor-parallel group do together. Every
/// member calls them in the same order; each call returns once the group has
/// made it.
pub trait Collective: Send + Sync {
    /// This member's rank (0 samples).
    fn rank(&self) -> usize;
    /// Members in the group.
    fn degree(&self) -> usize;
    /// Replaces `x` with the elementwise sum of every member's `x`, added in
    /// rank order (the same bits on every member).
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()>;
    /// Every member's `part`, in rank order, on rank 0 (`None` elsewhere).
    fn gather(&self, part: Vec<f32>) -> Result<Option<Vec<Vec<f32>>>>;
    /// Rank 0's `tokens` on every member.
    fn broadcast_tokens(&self, tokens: &mut Vec<u32>) -> Result<()>;
}

/// Sums `parts` elementwise in their order into `out`.
pub fn sum_in_order(out: &mut [f32], parts: &[&[f32]]) {
    out.fill(0.0);
    for p in parts {
        out.iter_mut().zip(p.iter()).for_each(|(o, v)| *o += v);
    }
}

/// A group of members that are threads of one process (tests; a benchmark of
/// the split's cost without a network).
pub struct LocalGroup {
    rank: usize,
    shared: Arc<LocalShared>,
}

struct LocalShared {
    degree: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
    tokens: Mutex<Vec<u32>>,
}

impl LocalGroup {
    /// One handle per member, rank order.
    pub fn new(degree: usize) -> Vec<Self> {
        let shared = Arc::new(LocalShared {
            degree,
            barrier: Barrier::new(degree),
            slots: Mutex::new(vec![Vec::new(); degree]),
            tokens: Mutex::new(Vec::new()),
        });
        (0..degree).map(|rank| Self { rank, shared: shared.clone() }).collect()
    }

    fn put(&self, v: Vec<f32>) {
        zeroshard_offload::sync::lock(&self.shared.slots)[self.rank] = v;
        self.shared.barrier.wait();
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn degree(&self) -> usize {
        self.shared.degree
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        self.put(x.to_vec());
        {
            let slots = zeroshard_offload::sync::lock(&self.shared.slots);
            let parts: Vec<&[f32]> = slots.iter().map(Vec::as_slice).collect();
            sum_in_order(x, &parts);
        }
        // Nobody writes a slot again before every member has read them all.
        self.shared.barrier.wait();
        Ok(())
    }

    fn gather(&self, part: Vec<f32>) -> Result<Option<Vec<Vec<f32>>>> {
        self.put(part);
        let out = (self.rank == 0).then(|| zeroshard_offload::sync::lock(&self.shared.slots).clone());
        self.shared.barrier.wait();
        Ok(out)
    }

    fn broadcast_tokens(&self, tokens: &mut Vec<u32>) -> Result<()> {
        if self.rank == 0 {
            *zeroshard_offload::sync::lock(&self.shared.tokens) = tokens.clone();
        }
        self.shared.barrier.wait();
        if self.rank != 0 {
            *tokens = zeroshard_offload::sync::lock(&self.shared.tokens).clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cpu::CpuBackend;
    use crate::engine::{Engine, GenerationParams};
    use zeroshard_offload::Architecture;

    fn params(max_new_tokens: usize) -> GenerationParams {
        GenerationParams { sampling: Default::default(), max_new_tokens, ignore_eos: true }
    }

    /// Each member on its own thread with its own one-thread pool (they wait on
    /// each other inside their steps): the greedy tokens of `prompts`, batched,
    /// and rank 0's logits of the first step.
    fn group_greedy(
        c: &ModelConfig,
        whole: &HostWeights,
        degree: usize,
        prompts: &[Vec<u32>],
        new: usize,
    ) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
        let members = super::tests_support::members(c, whole, degree, 1);
        std::thread::scope(|s| {
            let runs: Vec<_> = members
                .iter()
                .map(|(g, e)| {
                    s.spawn(move || {
                        let mut seqs: Vec<_> = prompts
                            .iter()
                            .map(|p| e.new_sequence(p.clone(), params(new)).expect("seq"))
                            .collect();
                        let mut first = Vec::new();
                        while seqs.iter().any(|s| s.finished().is_none()) {
                            let mut refs: Vec<_> = seqs.iter_mut().collect();
                            let (_, logits) = e.step_in_group(&mut refs, g, first.is_empty()).expect("step");
                            if first.is_empty() {
                                first = logits;
                            }
                        }
                        (seqs.iter().map(|s| s.generated().to_vec()).collect::<Vec<_>>(), first)
                    })
                })
                .collect();
            let mut out: Vec<_> = runs.into_iter().map(|r| r.join().expect("member")).collect();
            for (r, (tokens, _)) in out.iter().enumerate() {
                assert_eq!(tokens, &out[0].0, "member {r} appended other tokens than rank 0");
            }
            out.swap_remove(0)
        })
    }

    fn single_greedy(
        c: &ModelConfig,
        whole: HostWeights,
        prompts: &[Vec<u32>],
        new: usize,
    ) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
        let e = Engine::new(CpuBackend::new(), c.clone(), whole);
        let mut seqs: Vec<_> =
            prompts.iter().map(|p| e.new_sequence(p.clone(), params(new)).expect("seq")).collect();
        let mut first = Vec::new();
        while seqs.iter().any(|s| s.finished().is_none()) {
            let mut refs: Vec<_> = seqs.iter_mut().collect();
            let (_, logits) = e.step_with_logits(&mut refs, first.is_empty()).expect("step");
            if first.is_empty() {
                first = logits;
            }
        }
        (seqs.iter().map(|s| s.generated().to_vec()).collect(), first)
    }

    fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
        let largest = a.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        (diff, largest)
    }

    #[test]
    fn a_group_computes_what_one_process_does_with_every_bias_and_uneven_slices() {
        // GQA 8/4, an ffn of 90 rows and a vocabulary of 61 (uneven slices for
        // 4), every bias on (o_proj's and down_proj's are added once).
        let c = ModelConfig {
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            ..ModelConfig::synthetic(Architecture::Llama, 32, 2, 8, 4, 90, 61)
        };
        let whole = HostWeights::random(&c, 11);
        let prompts = vec![vec![3, 14, 15, 9, 26], vec![7], vec![60, 0, 2]];
        let (tokens, logits) = single_greedy(&c, HostWeights::random(&c, 11), &prompts, 12);
        for degree in [1, 2, 4] {
            let (t, l) = group_greedy(&c, &whole, degree, &prompts, 12);
            assert_eq!(t, tokens, "degree {degree}");
            let (diff, largest) = max_abs_diff(&logits, &l);
            assert!(
                diff <= 1e-4 * largest.max(1.0),
                "degree {degree}: logits differ by {diff} (largest {largest})"
            );
        }
    }

    #[test]
    fn a_group_scores_a_sequence_as_one_process_does() {
        use crate::engine::ScoreRequest;
        let c = ModelConfig::synthetic(Architecture::Llama, 32, 2, 8, 4, 90, 61);
        let whole = HostWeights::random(&c, 5);
        let tokens: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35, 8];
        let req = ScoreRequest { from: 2, top: 2, tolerance: 0.01, sampled: true };
        let e = Engine::new(CpuBackend::new(), c.clone(), HostWeights::random(&c, 5));
        let mut one = e.new_sequence(tokens.clone(), params(1)).expect("seq").scoring(req.clone());
        let want = e.step(&mut [&mut one]).expect("step").remove(0).scores;
        assert_eq!(want.len(), tokens.len() - 2);
        let members = super::tests_support::members(&c, &whole, 2, 1);
        let got: Vec<_> = std::thread::scope(|s| {
            let runs: Vec<_> = members
                .iter()
                .map(|(g, e)| {
                    let (tokens, req) = (tokens.clone(), req.clone());
                    s.spawn(move || {
                        let mut seq = e.new_sequence(tokens, params(1)).expect("seq").scoring(req);
                        e.step_in_group(&mut [&mut seq], g, false).expect("step").0.remove(0).scores
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().expect("member")).collect()
        });
        assert!(got[1].is_empty(), "only rank 0 holds the assembled logits");
        assert_eq!(got[0].len(), want.len());
        for (g, w) in got[0].iter().zip(&want) {
            assert_eq!((g.token, g.kept), (w.token, w.kept));
            assert_eq!(
                g.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                w.top.iter().map(|t| t.0).collect::<Vec<_>>()
            );
            assert!(g.logprob.is_nan() && w.logprob.is_nan() || (g.logprob - w.logprob).abs() < 1e-3);
        }
    }

    #[test]
    fn a_degree_the_kv_heads_do_not_divide_or_a_fused_model_is_refused_in_one_line() {
        let c = ModelConfig::synthetic(Architecture::Llama, 32, 2, 8, 4, 90, 61);
        let e = check_degree(&c, 3).expect_err("3 of 4 KV heads").to_string();
        assert!(e.contains("3 tensor-parallel workers") && e.contains("4 KV heads"), "{e}");
        assert!(!e.contains('\n'));
        let gpt2 = ModelConfig::synthetic(Architecture::Gpt2, 32, 2, 4, 4, 64, 61);
        let e = check_degree(&gpt2, 2).expect_err("gpt2").to_string();
        assert!(e.contains("Gpt2") && e.contains("--placement gather"), "{e}");
        assert!(TensorShard::new(&c, 2, 2).is_err());
    }

    #[test]
    fn members_hold_a_share_of_the_weights_and_of_the_kv_cache() {
        let c = ModelConfig::synthetic(Architecture::Llama, 64, 2, 8, 4, 256, 512);
        let whole = HostWeights::random(&c, 3);
        for degree in [2, 4] {
            let held: Vec<usize> = (0..degree)
                .map(|r| {
                    TensorShard::new(&c, r, degree).and_then(|s| s.weights(&c, &whole)).expect("cut").bytes()
                })
                .collect();
            // Everything but the replicated norms is split.
            let norms = (2 * c.num_layers + 1) * c.hidden_size * 2;
            assert_eq!(
                held.iter().sum::<usize>(),
                whole.bytes() + (degree - 1) * norms,
                "{degree}: {held:?}"
            );
            let member = TensorShard::new(&c, 0, degree).expect("shard").config(&c);
            assert_eq!(member.kv_dim() * degree, c.kv_dim());
        }
    }

    fn shared() -> PathBuf {
        std::env::var_os("ZEROSHARD_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
    }

    fn load(dir: &std::path::Path) -> (ModelConfig, HostWeights) {
        let missing = |e: String| -> ! { panic!("fixture {}: {e} (set ZEROSHARD_SHARED)", dir.display()) };
        let c = ModelConfig::from_dir(dir).unwrap_or_else(|e| missing(e.to_string()));
        let ckpt = Checkpoint::open(dir).unwrap_or_else(|e| missing(e.to_string()));
        let w = HostWeights::load(&ckpt, &c).unwrap_or_else(|e| missing(e.to_string()));
        (c, w)
    }

    fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
    }

    /// The reference greedy tokens (transformers, fp32) through groups of every
    /// degree the KV heads allow, and loading a member from the checkpoint
    /// gives the same weights as cutting it from the whole model.
    #[test]
    fn groups_reproduce_the_reference_greedy_tokens_of_every_llama_family_fixture() {
        let root = shared();
        let mut checked = Vec::new();
        for name in
            ["llama-gqa-tied", "llama-rope-scaled", "qwen2", "mistral", "llama-f16", "llama-sharded-bf16"]
        {
            let dir = root.join("models/fixtures").join(name);
            let refs: serde_json::Value = serde_json::from_slice(
                &std::fs::read(root.join(format!("refs/arch/{name}.json")))
                    .unwrap_or_else(|e| panic!("refs/arch/{name}.json: {e} (set ZEROSHARD_SHARED)")),
            )
            .expect("json");
            let (c, whole) = load(&dir);
            let cases: Vec<_> = refs["prompts"].as_array().expect("prompts").iter().take(3).collect();
            let prompts: Vec<Vec<u32>> = cases.iter().map(|p| ids(&p["input_ids"])).collect();
            let want: Vec<Vec<u32>> = cases.iter().map(|p| ids(&p["new_token_ids"])).collect();
            let new = want.iter().map(Vec::len).min().expect("a case");
            let want: Vec<Vec<u32>> = want.into_iter().map(|w| w[..new].to_vec()).collect();
            for degree in (1..=c.num_kv_heads).filter(|d| c.num_kv_heads.is_multiple_of(*d)) {
                let (got, _) = group_greedy(&c, &whole, degree, &prompts, new);
                assert_eq!(got, want, "{name}, degree {degree}");
                checked.push(format!("{name}×{degree}"));
            }
            let ckpt = Checkpoint::open(&dir).expect("open");
            let shard = TensorShard::new(&c, c.num_kv_heads - 1, c.num_kv_heads).expect("shard");
            let (a, b) = (shard.load(&ckpt, &c).expect("load"), shard.weights(&c, &whole).expect("cut"));
            for spec in crate::model::tensor_specs(&c) {
                assert_eq!(a.get(&spec.name), b.get(&spec.name), "{name}: {}", spec.name);
            }
        }
        // stories260K (trained; 4 KV heads): the references' greedy tokens.
        let refs: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("refs/stories260K_greedy_sample.json")).expect("stories refs"),
        )
        .expect("json");
        let (c, whole) = load(&root.join("models/stories260K"));
        for case in refs["cases"].as_array().expect("cases") {
            let prompt = ids(&case["input_ids"]);
            let want = ids(&case["new_token_ids"]);
            let want = &want[..want.len().min(32)];
            for degree in [2, 4] {
                let (got, _) = group_greedy(&c, &whole, degree, std::slice::from_ref(&prompt), want.len());
                assert_eq!(got[0], want, "stories260K {}, degree {degree}", case["name"]);
            }
        }
        assert!(checked.len() >= 10, "{checked:?}");
    }
}

#[cfg(test)]
mod timing {
    use super::tests_support::*;

    /// `cargo test --profile ci -p zeroshard-engine --lib tensor::timing -- --ignored --nocapture`:
    /// decode steps of the 270M shape split over in-process members (no network):
    /// the cost of the split itself.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn in_process_split_decode() {
        let c = zeroshard_offload::synthetic::synthetic_config(
            "llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000",
        )
        .expect("shape");
        let whole = crate::weights::HostWeights::random(&c, 1);
        for batch in [1, 8] {
            for degree in [1, 2] {
                let threads = 2 / degree;
                let prompts: Vec<Vec<u32>> =
                    (0..batch).map(|b| (0..16).map(|i| (b * 31 + i * 7 + 3) as u32).collect()).collect();
                let t = timed_group_decode(&c, &whole, degree, threads, &prompts, 17);
                println!(
                    "batch {batch} degree {degree} × {threads} threads: {:.1} ms per decode step",
                    t * 1e3
                );
            }
        }
    }
}

#[cfg(test)]
mod tests_support {
    use std::sync::Arc;

    use super::*;
    use crate::cpu::CpuBackend;
    use crate::engine::{Engine, GenerationParams};

    /// `degree` in-process members of a group for `c` cut from `whole`, each
    /// with its own pool of `threads` (they wait on each other inside a step).
    pub(super) fn members(
        c: &ModelConfig,
        whole: &HostWeights,
        degree: usize,
        threads: usize,
    ) -> Vec<(LocalGroup, Engine<CpuBackend>)> {
        LocalGroup::new(degree)
            .into_iter()
            .map(|g| {
                let shard = TensorShard::new(c, g.rank(), degree).expect("shard");
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
                let weights = shard.weights(c, whole).expect("cut");
                let e = Engine::tensor_member(CpuBackend::new(), c, shard, weights)
                    .with_compute_pool(Arc::new(pool));
                (g, e)
            })
            .collect()
    }

    /// Seconds per decode step (after the prefill) of `degree` in-process
    /// members with `threads` compute threads each.
    pub(super) fn timed_group_decode(
        c: &ModelConfig,
        whole: &HostWeights,
        degree: usize,
        threads: usize,
        prompts: &[Vec<u32>],
        new: usize,
    ) -> f64 {
        let members = members(c, whole, degree, threads);
        std::thread::scope(|s| {
            let runs: Vec<_> = members
                .iter()
                .map(|(g, e)| {
                    s.spawn(move || {
                        let params = GenerationParams {
                            sampling: Default::default(),
                            max_new_tokens: new,
                            ignore_eos: true,
                        };
                        let mut seqs: Vec<_> = prompts
                            .iter()
                            .map(|p| e.new_sequence(p.clone(), params.clone()).expect("seq"))
                            .collect();
                        let mut started = None;
                        let mut steps = 0;
                        while seqs.iter().any(|s| s.finished().is_none()) {
                            let mut refs: Vec<_> = seqs.iter_mut().collect();
                            e.step_in_group(&mut refs, g, false).expect("step");
                            if started.is_none() {
                                started = Some(std::time::Instant::now());
                            } else {
                                steps += 1;
                            }
                        }
                        started.map_or(0.0, |t| t.elapsed().as_secs_f64() / steps.max(1) as f64)
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().expect("member")).fold(0f64, f64::max)
        })
    }
}
