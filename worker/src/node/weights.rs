//! [`ClusterWeights`]: the cluster's [`WeightSource`]. Each piece of a step (a
//! decoder layer, the head) is gathered from the owners of its ranges; while
//! layer `l` computes, the next `prefetch` pieces are already being gathered;
//! pieces that fit in `max_live_bytes` stay resident and are gathered once.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use zeroshard_offload::plan::WorkerId;
use zeroshard_offload::ModelConfig;

use super::gather::Gatherer;
use crate::error::{Result, WorkerError};
use zeroshard_engine::source::{WeightSource, HEAD_SLICE};
use zeroshard_engine::weights::HostWeights;
use zeroshard_engine::{EngineError, Result as EngineResult};
use zeroshard_offload::shards::TensorRange;
use zeroshard_offload::spec::{tensor_specs, TensorSpec};
use zeroshard_offload::sync;

/// A piece of the model gathered as a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Unit {
    Layer(usize),
    /// The final norm (the tensors after the last layer, but the LM head).
    Head,
    /// Vocabulary rows `i·rows..` of the LM head.
    HeadSlice(usize),
}

type Pending = JoinHandle<Result<Arc<HostWeights>>>;

/// Largest LM head slice: the head is gathered and applied in slices of at
/// most this many bytes, so it never stands whole in memory.
const HEAD_SLICE_BYTES: usize = 16 << 20;

/// How far gathers run ahead of the unit computing: `layers` units, and at
/// most `bytes` beyond the first of them (`--prefetch-layers`, `--prefetch-bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Prefetch {
    pub layers: usize,
    pub bytes: u64,
}

/// Gathers layers on demand, with prefetch and a resident budget.
pub(super) struct ClusterWeights {
    handle: Handle,
    gatherer: Arc<Gatherer>,
    num_layers: usize,
    /// Per decoder layer, its tensors.
    layers: Vec<Vec<TensorSpec>>,
    /// Tensors before the first layer (token embedding first, learned
    /// positions, embedding norm).
    pre: Vec<TensorSpec>,
    /// Tensors after the last layer but the LM head (the final norm).
    post: Vec<TensorSpec>,
    /// Every tensor outside the layers, by name (what the outer-weights lookup names).
    outer_names: Vec<String>,
    /// The LM head as stored (`lm_head.weight`, or the embedding when tied).
    lm_head: TensorSpec,
    /// Rows per head slice, and how many slices.
    slice_rows: usize,
    slices: usize,
    prefetch: Prefetch,
    max_live_bytes: u64,
    state: Mutex<State>,
    resident_bytes: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    pending: HashMap<Unit, Pending>,
    resident: HashMap<Unit, Arc<HostWeights>>,
}

/// Makes every name in `names` that `store` lacks an alias of `target`: the
/// lookup that assembles the outer weights names tensors the pass at hand
/// (embedding, or final norm) never reads.
fn alias_missing(store: &mut HostWeights, names: &[String], target: &str) {
    for n in names {
        if store.get(n).is_none() {
            store.alias(n, target);
        }
    }
}

impl ClusterWeights {
    pub(super) fn new(
        handle: Handle,
        gatherer: Arc<Gatherer>,
        config: &ModelConfig,
        prefetch: Prefetch,
        max_live_bytes: u64,
        resident_bytes: Arc<AtomicU64>,
    ) -> Self {
        let specs = tensor_specs(config);
        let mut layers = vec![Vec::new(); config.num_layers];
        let (mut pre, mut post) = (Vec::new(), Vec::new());
        for s in specs {
            match s.layer {
                Some(l) => layers[l].push(s),
                // Specs come in forward order: outer tensors before any layer
                // feed the embedding, the ones after feed the head.
                None if layers.iter().all(Vec::is_empty) => pre.push(s),
                None => post.push(s),
            }
        }
        let embed = pre.first().cloned().expect("every model has a token embedding");
        let outer_names = pre.iter().chain(&post).map(|s| s.name.clone()).collect();
        let lm_head = match post.iter().position(|s| s.name == "lm_head.weight") {
            Some(i) => post.remove(i),
            None => embed,
        };
        let hidden = lm_head.shape[1];
        let slice_rows = (HEAD_SLICE_BYTES / (hidden * 2)).max(1);
        let slices = lm_head.shape[0].div_ceil(slice_rows);
        Self {
            handle,
            gatherer,
            num_layers: config.num_layers,
            layers,
            pre,
            post,
            outer_names,
            lm_head,
            slice_rows,
            slices,
            prefetch,
            max_live_bytes,
            state: Mutex::new(State::default()),
            resident_bytes,
        }
    }

    /// Units in forward order: layers, final norm, head slices.
    fn order(&self, i: usize) -> Unit {
        match i {
            i if i < self.num_layers => Unit::Layer(i),
            i if i == self.num_layers => Unit::Head,
            i => Unit::HeadSlice(i - self.num_layers - 1),
        }
    }

    fn position(&self, u: Unit) -> usize {
        match u {
            Unit::Layer(l) => l,
            Unit::Head => self.num_layers,
            Unit::HeadSlice(i) => self.num_layers + 1 + i,
        }
    }

    /// Vocabulary rows of head slice `i`.
    fn slice_range(&self, i: usize) -> std::ops::Range<usize> {
        let vocab = self.lm_head.shape[0];
        (i * self.slice_rows).min(vocab)..((i + 1) * self.slice_rows).min(vocab)
    }

    /// What a unit gathers: (stored spec, element range, spec to hold it as).
    fn unit_parts(&self, unit: Unit) -> Vec<(TensorSpec, std::ops::Range<u64>, TensorSpec)> {
        let whole = |s: &TensorSpec| (s.clone(), 0..s.numel() as u64, s.clone());
        match unit {
            Unit::Layer(l) => self.layers[l].iter().map(whole).collect(),
            Unit::Head => self.post.iter().map(whole).collect(),
            Unit::HeadSlice(i) => {
                let rows = self.slice_range(i);
                let hidden = self.lm_head.shape[1];
                let mut held = self.lm_head.clone();
                held.name = HEAD_SLICE.to_string();
                held.shape = vec![rows.len(), hidden];
                let elems = (rows.start * hidden) as u64..(rows.end * hidden) as u64;
                vec![(self.lm_head.clone(), elems, held)]
            }
        }
    }

    /// The `prefetch` units after `unit`, wrapping to the next step's layers.
    fn next_units(&self, unit: Unit) -> Vec<Unit> {
        let total = self.num_layers + 1 + self.slices;
        (1..=self.prefetch.layers).map(|k| self.order((self.position(unit) + k) % total)).collect()
    }

    fn spawn_gather(&self, unit: Unit) -> Pending {
        let parts = self.unit_parts(unit);
        let gatherer = self.gatherer.clone();
        let names = self.outer_names.clone();
        self.handle.spawn(async move {
            let requests: Vec<TensorRange> =
                parts.iter().map(|(s, range, _)| TensorRange::new(s.name.clone(), range.clone())).collect();
            let data = gatherer.gather(&requests).await?;
            let mut store = HostWeights::default();
            for ((_, _, held), d) in parts.iter().zip(data) {
                store.insert(held, d);
            }
            if unit == Unit::Head {
                if let Some((_, _, first)) = parts.first() {
                    alias_missing(&mut store, &names, &first.name);
                }
            }
            Ok(Arc::new(store))
        })
    }

    fn unit_bytes(&self, unit: Unit) -> usize {
        self.unit_parts(unit).iter().map(|(_, r, _)| (r.end - r.start) as usize * 2).sum()
    }

    /// Gets `unit`, first starting the gathers of the units after it: up to
    /// `prefetch.layers` units, and no further than `prefetch.bytes` ahead (always at
    /// least one), so that a large head does not stack on two layers.
    fn get(&self, unit: Unit) -> Result<Arc<HostWeights>> {
        let pending = {
            let mut st = sync::lock(&self.state);
            let mut ahead = 0;
            for (k, next) in self.next_units(unit).into_iter().enumerate() {
                ahead += self.unit_bytes(next);
                if k > 0 && ahead as u64 > self.prefetch.bytes {
                    break;
                }
                if !st.resident.contains_key(&next) && !st.pending.contains_key(&next) {
                    let p = self.spawn_gather(next);
                    st.pending.insert(next, p);
                }
            }
            if let Some(w) = st.resident.get(&unit) {
                return Ok(w.clone());
            }
            st.pending.remove(&unit)
        };
        let pending = pending.unwrap_or_else(|| self.spawn_gather(unit));
        let waited = std::time::Instant::now();
        let weights = self.handle.block_on(pending);
        self.gatherer.stats.wait_nanos.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let weights = match weights.map_err(|e| WorkerError::Task { what: "gather task", source: e.into() }) {
            Ok(Ok(w)) => w,
            Ok(Err(e)) | Err(e) => {
                // Prefetches started alongside likely failed the same way: start afresh next step.
                for (_, p) in sync::lock(&self.state).pending.drain() {
                    p.abort();
                }
                return Err(e);
            }
        };
        let bytes = weights.bytes() as u64;
        let resident = self.resident_bytes.load(Ordering::Relaxed);
        if resident + bytes <= self.max_live_bytes {
            let mut st = sync::lock(&self.state);
            if st.resident.insert(unit, weights.clone()).is_none() {
                self.resident_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        Ok(weights)
    }

    /// The plan changed to one over `kept` workers: fetches from holders it
    /// left out are abandoned (the step waiting on them fails at once), and
    /// in-flight gathers and resident layers are dropped.
    pub(super) fn retire(&self, kept: &[WorkerId]) {
        self.gatherer.abandon(kept);
        self.clear();
    }

    /// The workers of this epoch's plan.
    pub(super) fn workers(&self) -> Vec<WorkerId> {
        self.gatherer.workers().to_vec()
    }

    /// Drops in-flight gathers and resident layers (the plan changed).
    pub(super) fn clear(&self) {
        let mut st = sync::lock(&self.state);
        for (_, p) in st.pending.drain() {
            p.abort();
        }
        st.resident.clear();
        self.resident_bytes.store(0, Ordering::Relaxed);
    }
}

impl WeightSource for ClusterWeights {
    /// Only the rows `ids` use are fetched, renumbered `0..distinct`; the other
    /// tensors before the first layer (learned positions, embedding norms) come whole.
    fn embedding(&self, ids: &[u32]) -> EngineResult<(Arc<HostWeights>, Vec<u32>)> {
        let mut distinct: Vec<u32> = ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let embed = &self.pre[0];
        let hidden = embed.shape[1] as u64;
        let rows: Vec<TensorRange> = distinct
            .iter()
            .map(|&id| {
                TensorRange::new(embed.name.clone(), u64::from(id) * hidden..(u64::from(id) + 1) * hidden)
            })
            .collect();
        let others = &self.pre[1..];
        let mut requests = rows.clone();
        requests.extend(others.iter().map(|s| TensorRange::new(s.name.clone(), 0..s.numel() as u64)));
        let gatherer = self.gatherer.clone();
        let waited = std::time::Instant::now();
        let data = self.handle.block_on(async move { gatherer.gather(&requests).await });
        self.gatherer.stats.wait_nanos.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut data = data.map_err(EngineError::from)?;
        let tail = data.split_off(rows.len());
        let table: Vec<f16> = data.concat();
        let mut store = HostWeights::default();
        let mut table_spec = embed.clone();
        table_spec.shape = vec![distinct.len(), hidden as usize];
        store.insert(&table_spec, table);
        for (spec, d) in others.iter().zip(tail) {
            store.insert(spec, d);
        }
        alias_missing(&mut store, &self.outer_names, &embed.name);
        let renumbered = ids
            .iter()
            .map(|id| distinct.binary_search(id).expect("every id is in distinct") as u32)
            .collect();
        Ok((Arc::new(store), renumbered))
    }

    fn layer(&self, l: usize) -> EngineResult<Arc<HostWeights>> {
        Ok(self.get(Unit::Layer(l))?)
    }

    fn head(&self) -> EngineResult<Arc<HostWeights>> {
        Ok(self.get(Unit::Head)?)
    }

    fn head_slices(&self) -> usize {
        self.slices
    }

    fn head_slice(&self, i: usize) -> EngineResult<(Arc<HostWeights>, std::ops::Range<usize>)> {
        Ok((self.get(Unit::HeadSlice(i))?, self.slice_range(i)))
    }
}
