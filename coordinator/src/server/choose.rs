//! Which placement an epoch runs: the one `--placement` names, or under
//! `auto` the one [`cost::choose`] predicts decodes fastest at the batch the
//! workers admit, from measured facts: each worker's calibration (reported in
//! its `Stats`), whether workers share a machine, and the link between them
//! (`Worker.MeasureLink` over the connection gathers use, measured once per
//! pair of workers and kept).
use std::collections::HashMap;
use std::time::Duration;

use zeroshard_offload::cost::{self, Hardware};
use zeroshard_offload::plan::WorkerId;
use zeroshard_offload::ModelConfig;

use super::config::Placement;
use super::state::WorkerEntry;
use super::supervisor::Supervisor;
use crate::status::WorkerStats;

/// Longest one link measurement may take (a few ms on a LAN).
const MEASURE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a worker's `Stats` may take when it calibrates first (~0.1 s of
/// compute, after the step in progress).
const CALIBRATE_TIMEOUT: Duration = Duration::from_secs(10);
/// The prompt length the prefill predictions in the log are for.
const PROMPT: usize = 128;

/// A link between two workers as measured: the fastest gRPC round trip,
/// seconds, the bulk rate with a gather's checks, bytes per second, and the
/// median round trip of a small frame over a tensor group's kind of socket,
/// seconds (0: not measured).
#[derive(Clone, Copy, Debug)]
pub(super) struct Link {
    pub round_trip_s: f64,
    pub bytes_per_s: f64,
    pub exchange_s: f64,
}

/// The links measured so far, by (measuring worker, peer).
pub(super) type Links = HashMap<(WorkerId, WorkerId), Link>;

/// An epoch's placement: the tensor-parallel group size (0: gather) and why.
pub(super) struct Chosen {
    pub tensor_degree: u32,
    pub reason: String,
}

impl Supervisor {
    /// The placement of the next epoch over `live` workers in `groups` groups.
    pub(super) async fn choose_placement(&mut self, live: &[WorkerId], groups: u32, epoch: u64) -> Chosen {
        let config = self.coord.model().config.clone();
        let groups = groups.max(1) as usize;
        let chosen = match self.coord.cfg().placement {
            Placement::Gather => Chosen { tensor_degree: 0, reason: "--placement gather".into() },
            Placement::Tensor => match group_size(&config, live.len(), groups) {
                Ok(g) => Chosen { tensor_degree: g, reason: "--placement tensor".into() },
                Err(why) => Chosen { tensor_degree: 0, reason: format!("gather instead of tensor: {why}") },
            },
            Placement::Auto if self.coord.cfg().pull => Chosen {
                tensor_degree: 0,
                reason: "auto: gather, as --pull needs (tensor shards are read from the checkpoint)".into(),
            },
            Placement::Auto => match group_size(&config, live.len(), groups) {
                Err(why) => {
                    Chosen { tensor_degree: 0, reason: format!("auto: gather, tensor is refused: {why}") }
                }
                Ok(g) => self.auto(&config, live, g).await,
            },
        };
        if chosen.tensor_degree > 0 {
            tracing::info!(
                "epoch {epoch}: tensor placement, {groups} group(s) of {} ({})",
                chosen.tensor_degree,
                chosen.reason
            );
        } else {
            tracing::info!("epoch {epoch}: gather placement ({})", chosen.reason);
        }
        chosen
    }

    /// `--placement auto` over `live` workers in groups of `g` the model allows.
    async fn auto(&mut self, config: &ModelConfig, live: &[WorkerId], g: u32) -> Chosen {
        let workers: Vec<_> = {
            let st = self.coord.lock();
            live.iter().filter_map(|w| st.members.get(w).cloned()).collect()
        };
        // Every worker measures its compute now, all at once: workers sharing
        // a machine each get the share they compute at when all of them run
        // (at start they measured while the others were still loading).
        let stats =
            futures::future::join_all(workers.iter().map(|w| w.client.calibrated_stats(CALIBRATE_TIMEOUT)))
                .await;
        let mut reported = Vec::new();
        for (w, s) in workers.iter().zip(stats) {
            match s {
                Ok(s) if s.calibrated_gflops > 0.0 => reported.push(s),
                // A CUDA worker measures no CPU: the cost model does not apply.
                Ok(_) => {
                    return Chosen {
                        tensor_degree: g,
                        reason: format!(
                            "auto: tensor, as {} reports no CPU calibration (a GPU worker) and tensor moves activations only",
                            w.id
                        ),
                    };
                }
                Err(e) => {
                    return Chosen {
                        tensor_degree: 0,
                        reason: format!("auto: gather, {} did not report its calibration: {e}", w.id),
                    };
                }
            }
        }
        // Two workers have one link; more, a ring of them. The slowest
        // link paces every exchange.
        let n = workers.len();
        let pairs = match n {
            0 | 1 => 0,
            2 => 1,
            n => n,
        };
        let mut link: Option<Link> = None;
        for (i, w) in workers.iter().enumerate().take(pairs) {
            let measured = match self.link(w, &workers[(i + 1) % n]).await {
                Ok(l) => l,
                Err(reason) => return Chosen { tensor_degree: 0, reason },
            };
            link = Some(match link {
                None => measured,
                Some(l) => Link {
                    round_trip_s: l.round_trip_s.max(measured.round_trip_s),
                    bytes_per_s: l.bytes_per_s.min(measured.bytes_per_s),
                    exchange_s: l.exchange_s.max(measured.exchange_s),
                },
            });
        }
        let batch = reported.iter().map(|s| s.max_active_sequences as usize).min().unwrap_or(1).max(1);
        let (hw, facts) = hardware(&reported, link);
        let predictions = cost::predict(config, g as usize, &hw, &[1, 8, batch], PROMPT);
        let (pick, why) = cost::choose(&predictions, batch);
        let rates: Vec<String> = predictions
            .iter()
            .filter(|p| p.refused.is_none())
            .map(|p| {
                let at =
                    |b: usize| p.decode_tokens_per_s.iter().find(|(x, _)| *x == b).map_or(0.0, |(_, r)| *r);
                format!("{} b1 {:.1} b8 {:.1} tok/s", p.placement, at(1), at(8))
            })
            .collect();
        Chosen {
            tensor_degree: if pick == "tensor" { g } else { 0 },
            reason: format!(
                "auto: {why} (--max-active-sequences {batch}); predicted {}; measured {facts}",
                rates.join(", ")
            ),
        }
    }

    /// The link `from` → `to`, measured once and kept; else why auto falls back to gather.
    async fn link(&mut self, from: &WorkerEntry, to: &WorkerEntry) -> Result<Link, String> {
        if let Some(l) = self.links.get(&(from.id, to.id)) {
            return Ok(*l);
        }
        let l =
            from.client.measure_link(&to.address, MEASURE_TIMEOUT).await.map_err(|e| {
                format!("auto: gather, the link {} → {} was not measured: {e}", from.id, to.id)
            })?;
        tracing::info!(
            "link {} → {}: {:.2} Gb/s checked, {:.0} µs gRPC round trip, {:.0} µs exchange",
            from.id,
            to.id,
            l.bytes_per_s * 8.0 / 1e9,
            l.round_trip_s * 1e6,
            l.exchange_s * 1e6
        );
        self.links.insert((from.id, to.id), l);
        Ok(l)
    }
}

/// The group size for `live` workers in `groups` groups, if the model allows it.
fn group_size(config: &ModelConfig, live: usize, groups: usize) -> Result<u32, String> {
    if !live.is_multiple_of(groups) {
        return Err(format!("{live} workers do not make {groups} equal groups (--replicas)"));
    }
    config.check_tensor_degree(live / groups)?;
    Ok((live / groups) as u32)
}

/// The cost model's hardware from what the workers reported and the slowest
/// link, and those facts in words.
fn hardware(reported: &[WorkerStats], link: Option<Link>) -> (Hardware, String) {
    let peak = reported.iter().map(|s| s.calibrated_gflops).fold(f64::INFINITY, f64::min);
    let read = reported.iter().map(|s| s.calibrated_read_gbs).fold(f64::INFINITY, f64::min);
    let mut hosts: Vec<&str> = reported.iter().map(|s| s.host_id.as_str()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let shared = hosts.len() < reported.len();
    // One worker: nothing moves; any link will do.
    let link = link.unwrap_or(Link { round_trip_s: 0.0, bytes_per_s: f64::INFINITY, exchange_s: 0.0 });
    // A sum waits for a frame over the group's socket, not a gRPC call.
    let exchange = if link.exchange_s > 0.0 { link.exchange_s } else { link.round_trip_s };
    let hw = Hardware {
        peak_flops: peak * 1e9,
        read_bytes_per_s: read * 1e9,
        link_bytes_per_s: link.bytes_per_s,
        round_trip_s: exchange,
        // Measured with a gather's checks: the rate a gather assembles at.
        gather_bytes_per_s: link.bytes_per_s,
        shared_cores: shared,
    };
    let facts = format!(
        "{peak:.0} GFLOP/s and {read:.1} GB/s per worker{}, link {:.2} Gb/s checked and {:.0} µs exchange round trip",
        if shared { " (sharing a machine)" } else { "" },
        link.bytes_per_s * 8.0 / 1e9,
        exchange * 1e6
    );
    (hw, facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(gflops: f64, read: f64, host: &str) -> WorkerStats {
        WorkerStats {
            calibrated_gflops: gflops,
            calibrated_read_gbs: read,
            host_id: host.into(),
            max_active_sequences: 8,
            ..WorkerStats::default()
        }
    }

    #[test]
    fn the_slowest_worker_and_a_shared_machine_set_the_hardware() {
        let link = Link { round_trip_s: 300e-6, bytes_per_s: 1e9, exchange_s: 120e-6 };
        let (hw, facts) = hardware(&[stats(90.0, 10.0, "a"), stats(60.0, 12.0, "a")], Some(link));
        assert_eq!((hw.peak_flops, hw.read_bytes_per_s), (60e9, 10e9));
        assert!(hw.shared_cores);
        assert_eq!((hw.link_bytes_per_s, hw.gather_bytes_per_s, hw.round_trip_s), (1e9, 1e9, 120e-6));
        assert!(facts.contains("60 GFLOP/s and 10.0 GB/s per worker (sharing a machine)"), "{facts}");
        assert!(facts.contains("link 8.00 Gb/s checked and 120 µs exchange"), "{facts}");
        // Without an exchange measured, the gRPC round trip stands in.
        let (hw, _) = hardware(&[stats(90.0, 10.0, "a")], Some(Link { exchange_s: 0.0, ..link }));
        assert_eq!(hw.round_trip_s, 300e-6);
        let (hw, _) = hardware(&[stats(90.0, 10.0, "a"), stats(90.0, 10.0, "b")], Some(link));
        assert!(!hw.shared_cores);
    }

    #[test]
    fn groups_the_heads_do_not_divide_are_named() {
        let c = zeroshard_offload::synthetic::synthetic_config(
            "llama:hidden=64,layers=2,heads=4,kv_heads=2,ffn=128,vocab=64",
        )
        .expect("shape");
        assert_eq!(group_size(&c, 4, 2), Ok(2));
        assert_eq!(group_size(&c, 3, 2), Err("3 workers do not make 2 equal groups (--replicas)".into()));
        let three = group_size(&c, 3, 1).expect_err("3 does not divide 2 KV heads");
        assert!(three.contains('3') && three.contains('2'), "{three}");
    }
}
