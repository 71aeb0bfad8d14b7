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
use zeroshard_offload::ModelConfig;

use super::gather::Gatherer;
use crate::error::{Result, WorkerError};
use crate::model::{tensor_specs, TensorSpec};
use crate::shards::TensorRange;
use crate::source::WeightSource;
use crate::weights::HostWeights;

/// A piece of the model gathered as a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Unit {
    Layer(usize),
    Head,
}

type Pending = JoinHandle<Result<Arc<HostWeights>>>;

/// Bytes of weights gathered ahead of the unit computing, beyond the first.
const PREFETCH_BYTES: usize = 64 << 20;

/// Gathers layers on demand, with prefetch and a resident budget.
pub struct ClusterWeights {
    handle: Handle,
    gatherer: Arc<Gatherer>,
    num_layers: usize,
    /// Per decoder layer, its tensors.
    layers: Vec<Vec<TensorSpec>>,
    /// Embedding, final norm, head, learned positions… (layer `None`).
    outer: Vec<TensorSpec>,
    /// The token embedding table (`[vocab, hidden]`, first in forward order).
    embed: TensorSpec,
    tied: bool,
    prefetch: usize,
    max_live_bytes: u64,
    state: Mutex<State>,
    resident_bytes: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    pending: HashMap<Unit, Pending>,
    resident: HashMap<Unit, Arc<HostWeights>>,
}

impl ClusterWeights {
    pub fn new(
        handle: Handle,
        gatherer: Arc<Gatherer>,
        config: &ModelConfig,
        prefetch: usize,
        max_live_bytes: u64,
        resident_bytes: Arc<AtomicU64>,
    ) -> Self {
        let specs = tensor_specs(config);
        let mut layers = vec![Vec::new(); config.num_layers];
        let mut outer = Vec::new();
        for s in specs {
            match s.layer {
                Some(l) => layers[l].push(s),
                None => outer.push(s),
            }
        }
        let embed = outer.first().cloned().expect("every model has a token embedding");
        Self {
            handle,
            gatherer,
            num_layers: config.num_layers,
            layers,
            outer,
            embed,
            tied: config.tie_word_embeddings,
            prefetch,
            max_live_bytes,
            state: Mutex::new(State::default()),
            resident_bytes,
        }
    }

    /// Tensors of a unit. The head needs every outer tensor but the embedding
    /// table, unless the head is the embedding (tied).
    fn unit_specs(&self, unit: Unit) -> Vec<TensorSpec> {
        match unit {
            Unit::Layer(l) => self.layers[l].clone(),
            Unit::Head => {
                self.outer.iter().filter(|s| self.tied || s.name != self.embed.name).cloned().collect()
            }
        }
    }

    /// The `prefetch` units after `unit`, wrapping to the next step's layers.
    fn next_units(&self, unit: Unit) -> Vec<Unit> {
        let order = |u: Unit| match u {
            Unit::Layer(l) => l,
            Unit::Head => self.num_layers,
        };
        let at = |i: usize| if i == self.num_layers { Unit::Head } else { Unit::Layer(i) };
        (1..=self.prefetch).map(|k| at((order(unit) + k) % (self.num_layers + 1))).collect()
    }

    fn spawn_gather(&self, unit: Unit) -> Pending {
        let specs = self.unit_specs(unit);
        let gatherer = self.gatherer.clone();
        let (tied, embed_name) = (self.tied, self.embed.name.clone());
        self.handle.spawn(async move {
            let requests: Vec<TensorRange> =
                specs.iter().map(|s| TensorRange::new(s.name.clone(), 0..s.numel() as u64)).collect();
            let data = gatherer.gather(&requests).await?;
            let mut store = HostWeights::default();
            for (spec, d) in specs.iter().zip(data) {
                store.insert(spec, d);
            }
            if unit == Unit::Head && !tied {
                // The untied head never reads the embedding table; the lookup
                // that assembles the outer weights still names it.
                store.alias(&embed_name, "lm_head.weight");
            }
            Ok(Arc::new(store))
        })
    }

    fn unit_bytes(&self, unit: Unit) -> usize {
        self.unit_specs(unit).iter().map(|s| s.numel() * 2).sum()
    }

    /// Gets `unit`, first starting the gathers of the units after it: up to
    /// `prefetch` units, and no further than [`PREFETCH_BYTES`] ahead (always at
    /// least one), so that a large head does not stack on two layers.
    fn get(&self, unit: Unit) -> Result<Arc<HostWeights>> {
        let pending = {
            let mut st = self.state.lock().expect("weights state lock");
            let mut ahead = 0;
            for (k, next) in self.next_units(unit).into_iter().enumerate() {
                ahead += self.unit_bytes(next);
                if k > 0 && ahead > PREFETCH_BYTES {
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
        let weights = weights.map_err(|e| WorkerError::Gather(format!("gather task failed: {e}")))??;
        let bytes = weights.bytes() as u64;
        let resident = self.resident_bytes.load(Ordering::Relaxed);
        if resident + bytes <= self.max_live_bytes {
            let mut st = self.state.lock().expect("weights state lock");
            if st.resident.insert(unit, weights.clone()).is_none() {
                self.resident_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        Ok(weights)
    }

    /// Drops in-flight gathers and resident layers (the plan changed).
    pub fn clear(&self) {
        let mut st = self.state.lock().expect("weights state lock");
        for (_, p) in st.pending.drain() {
            p.abort();
        }
        st.resident.clear();
        self.resident_bytes.store(0, Ordering::Relaxed);
    }
}

impl WeightSource for ClusterWeights {
    /// Only the rows `ids` use are fetched, renumbered `0..distinct`; the other
    /// outer tensors (learned positions, embedding norms) come whole.
    fn embedding(&self, ids: &[u32]) -> Result<(Arc<HostWeights>, Vec<u32>)> {
        let mut distinct: Vec<u32> = ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let hidden = self.embed.shape[1] as u64;
        let rows: Vec<TensorRange> = distinct
            .iter()
            .map(|&id| {
                TensorRange::new(
                    self.embed.name.clone(),
                    u64::from(id) * hidden..(u64::from(id) + 1) * hidden,
                )
            })
            .collect();
        let others: Vec<&TensorSpec> =
            self.outer.iter().skip(1).filter(|s| s.name != "lm_head.weight").collect();
        let mut requests = rows.clone();
        requests.extend(others.iter().map(|s| TensorRange::new(s.name.clone(), 0..s.numel() as u64)));
        let gatherer = self.gatherer.clone();
        let waited = std::time::Instant::now();
        let data = self.handle.block_on(async move { gatherer.gather(&requests).await });
        self.gatherer.stats.wait_nanos.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut data = data?;
        let tail = data.split_off(rows.len());
        let table: Vec<f16> = data.concat();
        let mut store = HostWeights::default();
        let mut table_spec = self.embed.clone();
        table_spec.shape = vec![distinct.len(), hidden as usize];
        store.insert(&table_spec, table);
        for (spec, d) in others.into_iter().zip(tail) {
            store.insert(spec, d);
        }
        if !self.tied {
            // Never read by the embedding pass; named by the outer-weights lookup.
            store.alias("lm_head.weight", &self.embed.name);
        }
        let renumbered = ids
            .iter()
            .map(|id| distinct.binary_search(id).expect("every id is in distinct") as u32)
            .collect();
        Ok((Arc::new(store), renumbered))
    }

    fn layer(&self, l: usize) -> Result<Arc<HostWeights>> {
        self.get(Unit::Layer(l))
    }

    fn head(&self) -> Result<Arc<HostWeights>> {
        self.get(Unit::Head)
    }
}
