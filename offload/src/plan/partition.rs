//! [`Plan`]: the placement of every tensor, and the queries workers and the
//! coordinator ask of it.
use std::collections::HashSet;
use std::ops::Range;

use super::{check_workers, PlanError, PlanOptions, Result, TensorMeta, WorkerId};

/// How a tensor is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// One shard per worker, in rank order.
    Partitioned,
    /// One shard, the whole tensor, held by every worker.
    Persistent,
}

/// A contiguous element range of a tensor and the workers holding it; the
/// first holder is the primary owner, the others replicas.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    pub elements: Range<u64>,
    pub holders: Vec<WorkerId>,
}

/// One tensor's placement. `shards` are sorted, contiguous and cover
/// `[0, numel)`; a partitioned tensor has one per worker (some maybe empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorPlan {
    pub meta: TensorMeta,
    pub placement: Placement,
    pub shards: Vec<Shard>,
}

impl TensorPlan {
    pub fn numel(&self) -> u64 {
        self.meta.numel()
    }
}

/// A range a worker holds (to load, serve to peers, and count).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRange<'a> {
    pub tensor: &'a TensorPlan,
    pub elements: Range<u64>,
    /// The worker is the shard's first holder (always, for a persistent tensor).
    pub primary: bool,
}

/// A sub-range of a requested range and the workers that can serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece<'a> {
    pub elements: Range<u64>,
    /// Primary owner first.
    pub holders: &'a [WorkerId],
}

/// Host bytes one worker holds under a plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnedBytes {
    /// Shards of partitioned tensors (its own ranges and replicas).
    pub partitioned: u64,
    /// Whole persistent tensors.
    pub persistent: u64,
}

impl OwnedBytes {
    pub fn total(&self) -> u64 {
        self.partitioned + self.persistent
    }
}

/// The partition of a checkpoint across workers at one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Plan {
    epoch: u64,
    /// Rank order.
    workers: Vec<WorkerId>,
    replicas: u32,
    elem_bytes: u32,
    persistence_threshold_bytes: u64,
    /// 0: the gather placement; else the tensor placement's group size.
    tensor_degree: u32,
    /// Sorted by name, names unique.
    tensors: Vec<TensorPlan>,
}

impl Plan {
    /// Assembled by the planner, which upholds every invariant.
    pub(super) fn from_parts_unchecked(
        options: &PlanOptions,
        workers: Vec<WorkerId>,
        tensors: Vec<TensorPlan>,
    ) -> Self {
        Self {
            epoch: options.epoch,
            workers,
            replicas: options.replicas,
            elem_bytes: options.elem_bytes,
            persistence_threshold_bytes: options.persistence_threshold_bytes,
            tensor_degree: options.tensor_degree,
            tensors,
        }
    }

    /// A plan from its parts (e.g. received over the wire), checked: unique
    /// workers and tensor names; every tensor's shards sorted, contiguous and
    /// covering it, each held by distinct workers of the plan; a persistent
    /// tensor held whole by every worker. Tensors may come in any order.
    pub fn from_parts(
        options: &PlanOptions,
        workers: Vec<WorkerId>,
        mut tensors: Vec<TensorPlan>,
    ) -> Result<Self> {
        check_workers(&workers)?;
        if options.replicas == 0 || options.replicas as usize > workers.len() {
            return Err(PlanError::InvalidReplicas { replicas: options.replicas, workers: workers.len() });
        }
        if options.elem_bytes == 0 {
            return Err(PlanError::InvalidElemBytes);
        }
        super::check_groups(options, workers.len())?;
        tensors.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        if let Some(w) = tensors.windows(2).find(|w| w[0].meta.name == w[1].meta.name) {
            return Err(PlanError::DuplicateTensor(w[0].meta.name.clone()));
        }
        let known: HashSet<WorkerId> = workers.iter().copied().collect();
        for t in &tensors {
            check_tensor(t, &known, workers.len())?;
        }
        Ok(Self::from_parts_unchecked(options, workers, tensors))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Workers in rank order.
    pub fn workers(&self) -> &[WorkerId] {
        &self.workers
    }

    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    pub fn elem_bytes(&self) -> u32 {
        self.elem_bytes
    }

    pub fn persistence_threshold_bytes(&self) -> u64 {
        self.persistence_threshold_bytes
    }

    /// The options that, with the same tensors and workers, reproduce this plan.
    pub fn options(&self) -> PlanOptions {
        PlanOptions {
            epoch: self.epoch,
            persistence_threshold_bytes: self.persistence_threshold_bytes,
            replicas: self.replicas,
            elem_bytes: self.elem_bytes,
            tensor_degree: self.tensor_degree,
        }
    }

    /// The tensor placement's group size (`None`: the gather placement).
    pub fn tensor_degree(&self) -> Option<usize> {
        (self.tensor_degree > 0).then_some(self.tensor_degree as usize)
    }

    /// Under the tensor placement, `worker`'s group (its members in rank
    /// order) and its rank in it.
    pub fn tensor_group(&self, worker: WorkerId) -> Option<(&[WorkerId], usize)> {
        let d = self.tensor_degree()?;
        let r = self.rank(worker)?;
        Some((&self.workers[r / d * d..(r / d + 1) * d], r % d))
    }

    /// The workers sequences are routed to: every worker under the gather
    /// placement, each group's rank 0 under the tensor placement.
    pub fn routable(&self) -> Vec<WorkerId> {
        match self.tensor_degree() {
            None => self.workers.clone(),
            Some(d) => self.workers.iter().step_by(d).copied().collect(),
        }
    }

    /// A worker's rank (its position in [`workers`](Self::workers)).
    pub fn rank(&self, worker: WorkerId) -> Option<usize> {
        self.workers.iter().position(|&w| w == worker)
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> &[TensorPlan] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorPlan> {
        self.tensors.binary_search_by(|t| t.meta.name.as_str().cmp(name)).ok().map(|i| &self.tensors[i])
    }

    /// The non-empty ranges `worker` holds, tensor by tensor (sorted by name).
    pub fn owned_ranges(&self, worker: WorkerId) -> Result<Vec<OwnedRange<'_>>> {
        self.rank(worker).ok_or(PlanError::UnknownWorker(worker))?;
        let mut owned = Vec::new();
        for t in &self.tensors {
            for s in &t.shards {
                if s.elements.is_empty() {
                    continue;
                }
                if let Some(i) = s.holders.iter().position(|&h| h == worker) {
                    let primary = i == 0 || t.placement == Placement::Persistent;
                    owned.push(OwnedRange { tensor: t, elements: s.elements.clone(), primary });
                }
            }
        }
        Ok(owned)
    }

    /// Who holds `elements` of `tensor`: the non-empty pieces of the shards it
    /// overlaps, in order, tiling `elements` exactly (none for an empty range).
    pub fn owners(&self, tensor: &str, elements: Range<u64>) -> Result<Vec<Piece<'_>>> {
        let t = self.tensor(tensor).ok_or_else(|| PlanError::UnknownTensor(tensor.to_string()))?;
        let numel = t.numel();
        if elements.start > elements.end || elements.end > numel {
            return Err(PlanError::OutOfRange {
                name: tensor.to_string(),
                numel,
                start: elements.start,
                end: elements.end,
            });
        }
        // First shard ending after `start`; shards are contiguous and sorted.
        let first = t.shards.partition_point(|s| s.elements.end <= elements.start);
        let pieces = t.shards[first..]
            .iter()
            .take_while(|s| s.elements.start < elements.end)
            .map(|s| Piece {
                elements: s.elements.start.max(elements.start)..s.elements.end.min(elements.end),
                holders: &s.holders,
            })
            .filter(|p| !p.elements.is_empty())
            .collect();
        Ok(pieces)
    }

    /// Host bytes `worker` holds.
    pub fn owned_bytes(&self, worker: WorkerId) -> Result<OwnedBytes> {
        let mut bytes = OwnedBytes::default();
        for r in self.owned_ranges(worker)? {
            let b = (r.elements.end - r.elements.start) * u64::from(self.elem_bytes);
            match r.tensor.placement {
                Placement::Partitioned => bytes.partitioned += b,
                Placement::Persistent => bytes.persistent += b,
            }
        }
        Ok(bytes)
    }

    /// Bytes of all partitioned tensors and of all persistent tensors (each once).
    /// Whether every element is still held by one of `live` (a plan with
    /// replicas survives the loss of fewer workers than it has replicas).
    pub fn covered_by(&self, live: &[WorkerId]) -> bool {
        self.tensors.iter().all(|t| {
            t.shards.iter().all(|s| s.elements.is_empty() || s.holders.iter().any(|h| live.contains(h)))
        })
    }

    pub fn model_bytes(&self) -> OwnedBytes {
        let mut bytes = OwnedBytes::default();
        for t in &self.tensors {
            let b = t.numel() * u64::from(self.elem_bytes);
            match t.placement {
                Placement::Partitioned => bytes.partitioned += b,
                Placement::Persistent => bytes.persistent += b,
            }
        }
        bytes
    }
}

/// The invariants of one received tensor plan.
fn check_tensor(t: &TensorPlan, known: &HashSet<WorkerId>, n_workers: usize) -> Result<()> {
    let name = &t.meta.name;
    let invalid = |what: String| PlanError::Invalid(format!("tensor `{name}`: {what}"));
    let numel = t.meta.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let numel =
        numel.ok_or_else(|| PlanError::TooLarge { name: name.clone(), shape: t.meta.shape.clone() })?;
    let mut at = 0;
    for s in &t.shards {
        if s.elements.start != at || s.elements.end < s.elements.start {
            return Err(invalid(format!("shard {:?} does not continue at element {at}", s.elements)));
        }
        at = s.elements.end;
        if s.holders.is_empty() {
            return Err(invalid(format!("shard {:?} has no holder", s.elements)));
        }
        let mut seen = HashSet::new();
        for h in &s.holders {
            if !known.contains(h) {
                return Err(invalid(format!("shard {:?} is held by {h}, not in the plan", s.elements)));
            }
            if !seen.insert(*h) {
                return Err(invalid(format!("shard {:?} lists {h} twice", s.elements)));
            }
        }
    }
    if at != numel {
        return Err(invalid(format!("shards cover {at} of {numel} elements")));
    }
    if t.placement == Placement::Persistent && (t.shards.len() != 1 || t.shards[0].holders.len() != n_workers)
    {
        return Err(invalid("a persistent tensor is one shard held by every worker".into()));
    }
    Ok(())
}
