//! Steps that fail on a device error: a fault injected into the CPU backend's
//! `linear` ([`StepFault`]) at each point of a step, for each block kind.
use zeroshard_offload::Architecture;

use super::*;
use crate::cpu::{CpuBackend, StepFault};

fn config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        ..ModelConfig::synthetic(architecture, 16, 2, 4, 4, 32, 40)
    }
}

fn params() -> GenerationParams {
    GenerationParams { sampling: Default::default(), max_new_tokens: 8, ignore_eos: true }
}

const PROMPT: [u32; 4] = [3, 14, 15, 9];

/// An engine over `weights` whose backend fails as `fault` says.
fn engine(c: &ModelConfig, weights: &Arc<HostWeights>, fault: Option<StepFault>) -> Engine<CpuBackend> {
    let backend = fault.map_or_else(CpuBackend::new, CpuBackend::with_fault);
    Engine::with_shared_weights(backend, c.clone(), weights.clone())
}

/// `linear` calls of the first step over [`PROMPT`] (a fault that never fires counts them).
fn linears_per_step(c: &ModelConfig, weights: &Arc<HostWeights>) -> u64 {
    let e = engine(c, weights, Some(StepFault { after_calls: u64::MAX, fatal: false }));
    let mut s = e.new_sequence(PROMPT.to_vec(), params()).expect("seq");
    e.step(&mut [&mut s]).expect("step");
    e.backend().linear_calls().expect("counted with a fault")
}

/// Three steps of a new sequence on `e`, and on a clean engine: the same tokens and logits.
fn runs_like_a_clean_engine(e: &Engine<CpuBackend>, clean: &Engine<CpuBackend>) {
    let mut a = e.new_sequence(vec![7, 1, 2], params()).expect("seq");
    let mut b = clean.new_sequence(vec![7, 1, 2], params()).expect("seq");
    for step in 0..3 {
        let got = e.step_with_logits(&mut [&mut a], true).expect("a step after the fault");
        let want = clean.step_with_logits(&mut [&mut b], true).expect("clean step");
        assert_eq!(got, want, "step {step}");
    }
}

#[test]
fn a_transient_fault_anywhere_in_a_step_fails_only_that_step() {
    for arch in [Architecture::Llama, Architecture::Gpt2, Architecture::Bloom] {
        let c = config(arch);
        let weights = Arc::new(HostWeights::random(&c, 7));
        let clean = engine(&c, &weights, None);
        let calls = linears_per_step(&c, &weights);
        assert!(calls > c.num_layers as u64, "{arch:?}: {calls} linear calls per step");
        for after_calls in 0..calls {
            let e = engine(&c, &weights, Some(StepFault { after_calls, fatal: false }));
            let mut s = e.new_sequence(PROMPT.to_vec(), params()).expect("seq");
            let err = e.step(&mut [&mut s]).expect_err("the injected fault fails the step");
            assert!(matches!(err, EngineError::Device { fatal: false, .. }), "{arch:?}: {err:?}");
            assert!(!err.is_fatal());
            assert!(s.generated().is_empty() && s.finished().is_none(), "nothing sampled");
            // The failed sequence's cache may hold part of the step: it is refused.
            let again = e.step(&mut [&mut s]).expect_err("a failed sequence is refused");
            assert!(matches!(again, EngineError::InvalidRequest(_)), "{again:?}");
            assert!(again.to_string().contains("failed before"), "{again}");
            // New sequences run, unaffected.
            runs_like_a_clean_engine(&e, &clean);
        }
    }
}

#[test]
fn a_fault_fails_the_whole_batch_but_not_the_next_one() {
    let c = config(Architecture::Llama);
    let weights = Arc::new(HostWeights::random(&c, 7));
    let calls = linears_per_step(&c, &weights);
    let e = engine(&c, &weights, Some(StepFault { after_calls: calls + 2, fatal: false }));
    let (mut a, mut b) = (
        e.new_sequence(PROMPT.to_vec(), params()).expect("seq"),
        e.new_sequence(vec![5, 6], params()).expect("seq"),
    );
    e.step(&mut [&mut a, &mut b]).expect("the first step runs");
    let err = e.step(&mut [&mut a, &mut b]).expect_err("the second step fails");
    assert!(!err.is_fatal(), "{err}");
    for s in [&mut a, &mut b] {
        assert_eq!(s.generated().len(), 1, "the failed step sampled nothing");
        e.step(&mut [s]).expect_err("each sequence of the failed batch is refused");
    }
    let mut fresh = e.new_sequence(PROMPT.to_vec(), params()).expect("seq");
    e.step(&mut [&mut fresh]).expect("a new batch runs");
}

#[test]
fn a_fatal_fault_fails_every_later_step() {
    let c = config(Architecture::Bloom);
    let weights = Arc::new(HostWeights::random(&c, 7));
    let calls = linears_per_step(&c, &weights);
    // The first step runs; the second fails half way.
    let e = engine(&c, &weights, Some(StepFault { after_calls: calls + calls / 2, fatal: true }));
    let mut s = e.new_sequence(PROMPT.to_vec(), params()).expect("seq");
    e.step(&mut [&mut s]).expect("the first step runs");
    let err = e.step(&mut [&mut s]).expect_err("the fault fires");
    assert!(err.is_fatal(), "{err:?}");
    assert!(err.to_string().starts_with("linear (injected fault): "), "{err}");
    for _ in 0..3 {
        let mut fresh = e.new_sequence(PROMPT.to_vec(), params()).expect("seq");
        let err = e.step(&mut [&mut fresh]).expect_err("a broken device stays broken");
        assert!(err.is_fatal(), "{err:?}");
    }
}
