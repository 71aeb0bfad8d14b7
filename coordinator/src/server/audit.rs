//! Output audits (`--audit-fraction`): a member that computes honestly but
//! returns tokens of its choosing to clients passes every other check (its
//! blocks match the digests, it answers on time), so the coordinator re-checks
//! a random sample of finished sequences on a *different* worker — under the
//! tensor placement, a different group — with one prefill over the prompt and
//! the generated tokens ([`WorkerHandle::score`](super::worker_client::WorkerHandle::score)).
//! Every generated token must be one the sequence's sampling could have
//! chosen there: the auditor's argmax for greedy requests, inside its top-k /
//! top-p set for sampled ones, both within a tolerance for float noise
//! ([`TOLERANCE`], as `TokenScore::kept` defines it).
//!
//! A failed audit names the worker that produced the failing tokens (a
//! sequence that moved has several producers, each with its own tokens). The
//! same sequence is then audited again by another auditor where one exists:
//! a worker is banned once two different auditors failed its tokens, or,
//! where it has only one possible auditor, once that one failed it twice
//! ([`BAN_AFTER`]). A ban goes to the supervisor, which bans the worker's
//! certificate key (embedded membership) and plans around it. Under the
//! tensor placement the audit judges a group: it cannot tell which member
//! lied, so every member of a failing group is banned.
//!
//! What this does not catch: one auditor that lies can stall nothing but can
//! make a claim; with a second auditor available the claim is only counted as
//! disputed, with a single other member (two workers, or two groups) that
//! member's word decides. A cluster of one worker or one group has no
//! independent path: audits are skipped and counted so.
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_offload::request::{GenerationParams, ScoreRequest};

use super::faults::{Cause, Faulty};
use super::state::WorkerEntry;
use super::Coordinator;

/// Float noise allowed: 1% of a position's largest logit magnitude, the
/// references' own tolerance.
pub(super) const TOLERANCE: f32 = 0.01;

/// Failed audits of one worker that ban it (see the module docs).
const BAN_AFTER: usize = 2;

/// How long an auditor may take to answer.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Which worker produced which of a sequence's generated tokens.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Producer {
    pub worker: WorkerId,
    pub tokens: Range<usize>,
}

/// The audits' counters and who failed them.
#[derive(Default)]
pub(crate) struct Audits {
    pub passed: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
    /// Workers banned for failed audits, counted by the supervisor when it
    /// bans one (once per worker).
    pub banned: AtomicU64,
    /// For each worker whose tokens failed: the auditors that said so, and
    /// how many times.
    failures: Mutex<BTreeMap<WorkerId, (BTreeSet<WorkerId>, usize)>>,
}

/// A finished sequence to audit.
struct Sample {
    prompt: Vec<u32>,
    params: GenerationParams,
    produced: Vec<u32>,
    by: Vec<Producer>,
}

/// What one auditor found.
enum Verdict {
    Passed,
    /// Tokens (indices into the generated ones) that failed, by producer.
    Failed(BTreeMap<WorkerId, Vec<usize>>),
    /// The auditor gave no usable answer: why.
    Skipped(String),
}

/// A random number (std's per-process random hash keys, freshly drawn).
fn random() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// Audits the finished sequence with probability `--audit-fraction`, in the
/// background.
pub(super) fn consider(
    coord: &Coordinator,
    prompt: &[u32],
    params: &GenerationParams,
    produced: &[u32],
    by: &[Producer],
) {
    let fraction = coord.cfg().audit_fraction;
    if fraction <= 0.0 || produced.is_empty() || by.is_empty() {
        return;
    }
    if random() as f64 / u64::MAX as f64 >= fraction {
        return;
    }
    let sample = Sample {
        prompt: prompt.to_vec(),
        params: params.clone(),
        produced: produced.to_vec(),
        by: by.to_vec(),
    };
    let coord = coord.clone();
    tokio::spawn(async move { audit(&coord, &sample).await });
}

/// The members of `w`'s group under `plan` (itself under the gather placement).
fn group(plan: &Plan, w: WorkerId) -> Vec<WorkerId> {
    plan.tensor_group(w).map_or_else(|| vec![w], |(g, _)| g.to_vec())
}

/// Routable workers of the plan that are live and share no group with the
/// producers or with `exclude`.
fn auditors(coord: &Coordinator, plan: &Plan, s: &Sample, exclude: &[WorkerId]) -> Vec<WorkerEntry> {
    let taken: BTreeSet<WorkerId> =
        s.by.iter().map(|p| p.worker).chain(exclude.iter().copied()).flat_map(|w| group(plan, w)).collect();
    let live = coord.workers();
    plan.routable()
        .into_iter()
        .filter(|w| group(plan, *w).iter().all(|m| !taken.contains(m)))
        .filter_map(|w| live.iter().find(|e| e.id == w).cloned())
        .collect()
}

async fn audit(coord: &Coordinator, s: &Sample) {
    let counters = coord.audits();
    let mut asked = Vec::new();
    loop {
        let (auditor, verdict) = match one(coord, s, &asked).await {
            Ok(found) => found,
            Err(why) => {
                // No auditor: the sequence is not audited (a confirmation
                // that finds none leaves the first verdict as it is).
                if asked.is_empty() {
                    counters.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("audit skipped: {why}");
                }
                return;
            }
        };
        asked.push(auditor);
        match verdict {
            Verdict::Skipped(why) => {
                counters.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::info!("audit by {auditor} skipped: {why}");
                return;
            }
            Verdict::Passed => {
                counters.passed.fetch_add(1, Ordering::Relaxed);
                if asked.len() > 1 {
                    tracing::warn!(
                        "audits disagree: {auditor} finds the sequence {} failed correct; no ban",
                        asked[0]
                    );
                }
                return;
            }
            Verdict::Failed(culprits) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let only_one = coord.plan().is_ok_and(|p| auditors(coord, &p, s, &[]).len() <= 1);
                for (worker, tokens) in culprits {
                    tracing::warn!(
                        "audit by {auditor}: {} of the {} tokens {worker} produced are not what the model \
                         would choose there (generated tokens {:?})",
                        tokens.len(),
                        s.by.iter().filter(|p| p.worker == worker).map(|p| p.tokens.len()).sum::<usize>(),
                        &tokens[..tokens.len().min(8)]
                    );
                    if counters.record(worker, auditor, only_one) {
                        ban(coord, worker, auditor);
                    }
                }
                if asked.len() > 1 {
                    return;
                }
                // Confirmed by another auditor where there is one.
            }
        }
    }
}

impl Audits {
    /// Audits that failed `worker`'s tokens.
    pub(super) fn failed_of(&self, worker: WorkerId) -> u64 {
        zeroshard_offload::sync::lock(&self.failures).get(&worker).map_or(0, |f| f.1 as u64)
    }

    /// Records that `auditor` failed `worker`'s tokens; true when that bans it
    /// (see the module docs).
    fn record(&self, worker: WorkerId, auditor: WorkerId, only_one: bool) -> bool {
        let mut f = zeroshard_offload::sync::lock(&self.failures);
        let (by, n) = f.entry(worker).or_default();
        by.insert(auditor);
        *n += 1;
        by.len() >= BAN_AFTER || only_one && *n >= BAN_AFTER
    }
}

/// Bans `worker` (and its group) for failed audits.
fn ban(coord: &Coordinator, worker: WorkerId, auditor: WorkerId) {
    let Ok(plan) = coord.plan() else { return };
    let members = group(&plan, worker);
    for m in &members {
        let why = if members.len() > 1 {
            format!(
                "{m} is a member of the tensor-parallel group of {worker}, whose tokens failed output audits \
                 (last by {auditor})"
            )
        } else {
            format!("{m} returned tokens that failed output audits (last by {auditor})")
        };
        coord.report_faulty(Faulty { id: *m, why, cause: Cause::Audits });
    }
}

/// Audits `s` on one auditor not in `exclude` (nor a producer): who it was,
/// and what it found; or why there is none.
async fn one(coord: &Coordinator, s: &Sample, exclude: &[WorkerId]) -> Result<(WorkerId, Verdict), String> {
    let plan = coord.plan().map_err(|e| e.to_string())?;
    let choices = auditors(coord, &plan, s, exclude);
    if choices.is_empty() {
        return Err(
            "no live worker outside the producers' groups (a cluster of one worker or one group has \
                    no independent path)"
                .into(),
        );
    }
    let auditor = &choices[random() as usize % choices.len()];
    // The tokens fed back to the model: prompt + generated, within its positions.
    let max = coord.model().config.max_position_embeddings;
    let mut tokens = s.prompt.clone();
    tokens.extend_from_slice(&s.produced);
    tokens.truncate(max);
    let req = ScoreRequest { from: s.prompt.len() - 1, top: 0, tolerance: TOLERANCE, sampled: false };
    let id = coord.requests().next_seq.fetch_add(1, Ordering::Relaxed);
    let call = auditor.client.score(id, plan.epoch(), &tokens, &s.params, &req);
    let scores = match tokio::time::timeout(AUDIT_TIMEOUT, call).await {
        Ok(Ok(scores)) => scores,
        Ok(Err(i)) => return Ok((auditor.id, Verdict::Skipped(i.message().to_string()))),
        Err(_) => return Ok((auditor.id, Verdict::Skipped(format!("no answer within {AUDIT_TIMEOUT:?}")))),
    };
    let checked = tokens.len() - s.prompt.len();
    if scores.len() < checked {
        let why = format!("{} scores for {checked} generated tokens", scores.len());
        return Ok((auditor.id, Verdict::Skipped(why)));
    }
    let mut failed: BTreeMap<WorkerId, Vec<usize>> = BTreeMap::new();
    for (j, (score, &token)) in scores.iter().zip(&s.produced[..checked]).enumerate() {
        if score.token != Some(token) {
            let why =
                format!("the auditor scored token {:?} at generated token {j}, not {token}", score.token);
            return Ok((auditor.id, Verdict::Skipped(why)));
        }
        if !score.kept {
            let producer = s.by.iter().find(|p| p.tokens.contains(&j)).map_or(s.by[0].worker, |p| p.worker);
            failed.entry(producer).or_default().push(j);
        }
    }
    let verdict = if failed.is_empty() { Verdict::Passed } else { Verdict::Failed(failed) };
    Ok((auditor.id, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_banned_by_two_auditors_or_twice_by_its_only_one() {
        let a = Audits::default();
        let (w, x, y) = (WorkerId(1), WorkerId(2), WorkerId(3));
        assert!(!a.record(w, x, false), "one auditor's word is not enough where another exists");
        assert!(!a.record(w, x, false), "nor twice the same auditor's");
        assert!(a.record(w, y, false), "a second auditor confirms");
        let b = Audits::default();
        assert!(!b.record(w, x, true));
        assert!(b.record(w, x, true), "the only possible auditor, twice");
    }
}
