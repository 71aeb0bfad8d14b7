//! Unit and property tests of the planner.

use super::*;

fn ids(n: u64) -> Vec<WorkerId> {
    (0..n).map(|i| WorkerId(100 + i)).collect()
}

fn t(name: &str, shape: &[u64]) -> TensorMeta {
    TensorMeta::new(name, shape.to_vec(), None)
}

/// f16 elements per digest block.
const P: u64 = (crate::digest::BLOCK_BYTES / 2) as u64;

fn opts(threshold: u64, replicas: u32) -> PlanOptions {
    PlanOptions {
        epoch: 3,
        persistence_threshold_bytes: threshold,
        replicas,
        elem_bytes: 2,
        tensor_degree: 0,
    }
}

/// SplitMix64: a small deterministic generator for the property loops.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Sizes that stress the split: tiny (below N), around multiples of N, large.
    fn numel(&mut self) -> u64 {
        match self.below(5) {
            0 => self.below(10),
            1 => 8 * self.below(100) + self.below(3),
            2 => self.below(5000),
            3 => P * self.below(20) + self.below(3),
            _ => self.below(3_000_000),
        }
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

fn random_tensors(rng: &mut Rng) -> Vec<TensorMeta> {
    let count = 1 + rng.below(12);
    (0..count)
        .map(|i| {
            let n = rng.numel();
            // Some 2-D shapes, some 1-D.
            let shape =
                if n > 0 && n.is_multiple_of(4) && rng.below(2) == 0 { vec![4, n / 4] } else { vec![n] };
            TensorMeta::new(format!("t{i:02}.{}", rng.below(1000)), shape, Some(i as u32))
        })
        .collect()
}

// ---- the split ----------------------------------------------------------------

#[test]
fn splits_into_contiguous_ranges_in_rank_order() {
    let w = ids(4);
    // 10 blocks over 4 ranks: 3, 3, 2, 2 blocks.
    let p = plan(&[t("w", &[10 * P])], &w, &opts(0, 1)).expect("plan");
    let shards = &p.tensor("w").expect("w").shards;
    let ranges: Vec<_> = shards.iter().map(|s| s.elements.clone()).collect();
    assert_eq!(ranges, vec![0..3 * P, 3 * P..6 * P, 6 * P..8 * P, 8 * P..10 * P]);
    let holders: Vec<_> = shards.iter().map(|s| s.holders.clone()).collect();
    assert_eq!(holders, vec![vec![w[0]], vec![w[1]], vec![w[2]], vec![w[3]]]);
    assert_eq!(p.epoch(), 3);
    assert_eq!(p.tensor("w").expect("w").placement, Placement::Partitioned);
}

#[test]
fn fewer_blocks_than_workers_leaves_empty_ranges() {
    let w = ids(5);
    // 2.5 blocks: three ranges, the last one short.
    let p = plan(&[t("w", &[5 * P / 2])], &w, &opts(0, 1)).expect("plan");
    let ranges: Vec<_> = p.tensor("w").expect("w").shards.iter().map(|s| s.elements.clone()).collect();
    let end = 5 * P / 2;
    assert_eq!(ranges, vec![0..P, P..2 * P, 2 * P..end, end..end, end..end]);
    assert_eq!(p.owned_ranges(w[4]).expect("known"), vec![], "empty ranges are not owned");
    assert_eq!(p.owned_bytes(w[3]).expect("known"), OwnedBytes::default());
}

#[test]
fn shard_boundaries_fall_on_block_boundaries() {
    let w = ids(3);
    // 7.5 blocks: 3, 3, 2 blocks (the last one short); never a split inside a block.
    let numel = 15 * P / 2;
    let p = plan(&[t("w", &[numel])], &w, &opts(0, 1)).expect("plan");
    let ranges: Vec<_> = p.tensor("w").expect("w").shards.iter().map(|s| s.elements.clone()).collect();
    assert_eq!(ranges, vec![0..3 * P, 3 * P..6 * P, 6 * P..numel]);
    // Wider elements, smaller blocks: 4-byte elements give P / 2 per block.
    let wide = PlanOptions { elem_bytes: 4, ..opts(0, 1) };
    let p = plan(&[t("w", &[3 * P / 2])], &w, &wide).expect("plan");
    let ranges: Vec<_> = p.tensor("w").expect("w").shards.iter().map(|s| s.elements.clone()).collect();
    assert_eq!(ranges, vec![0..P / 2, P / 2..P, P..3 * P / 2]);
}

#[test]
fn the_extra_blocks_rotate_with_the_tensor_index() {
    let w = ids(3);
    // Tensors of one block each (in name order a, b, c, d) land on ranks 0, 1, 2, 0.
    let meta = [t("a", &[P]), t("b", &[10]), t("c", &[P / 2]), t("d", &[P])];
    let p = plan(&meta, &w, &opts(0, 1)).expect("plan");
    let owner = |name: &str| {
        let shards = &p.tensor(name).expect("tensor").shards;
        let held: Vec<usize> = (0..3).filter(|&r| !shards[r].elements.is_empty()).collect();
        assert_eq!(held.len(), 1, "{name}: one block, one holder");
        held[0]
    };
    assert_eq!([owner("a"), owner("b"), owner("c"), owner("d")], [0, 1, 2, 0]);
    // 4 blocks on 3 ranks: tensor 1 gives its extra block to rank 1.
    let p = plan(&[t("a", &[1]), t("b", &[4 * P])], &w, &opts(0, 1)).expect("plan");
    let lens: Vec<u64> =
        p.tensor("b").expect("b").shards.iter().map(|s| s.elements.end - s.elements.start).collect();
    assert_eq!(lens, vec![P, 2 * P, P]);
}

#[test]
fn small_tensors_are_persistent_on_every_worker() {
    let w = ids(3);
    // 2-byte elements: 100 elements = 200 bytes.
    let meta = [t("norm", &[99]), t("edge", &[100]), t("big", &[1000])];
    let p = plan(&meta, &w, &opts(200, 1)).expect("plan");
    let norm = p.tensor("norm").expect("norm");
    assert_eq!(norm.placement, Placement::Persistent);
    assert_eq!(norm.shards, vec![Shard { elements: 0..99, holders: w.clone() }]);
    assert_eq!(p.tensor("edge").expect("edge").placement, Placement::Partitioned, "under, not at");
    for &worker in &w {
        let b = p.owned_bytes(worker).expect("known");
        assert_eq!(b.persistent, 198);
        assert!(p
            .owned_ranges(worker)
            .expect("known")
            .iter()
            .any(|r| r.tensor.meta.name == "norm" && r.primary));
    }
    assert_eq!(p.model_bytes(), OwnedBytes { partitioned: 2200, persistent: 198 });
    // Threshold 0: nothing is persistent, not even an empty tensor.
    let p0 = plan(&[t("e", &[0]), t("s", &[])], &w, &opts(0, 1)).expect("plan");
    assert!(p0.tensors().iter().all(|t| t.placement == Placement::Partitioned));
    assert_eq!(p0.tensor("s").expect("scalar").numel(), 1);
}

#[test]
fn replicas_hold_each_range_on_the_next_ranks() {
    let w = ids(3);
    let p = plan(&[t("w", &[9 * P]), t("n", &[1])], &w, &opts(4, 2)).expect("plan");
    let holders: Vec<_> = p.tensor("w").expect("w").shards.iter().map(|s| s.holders.clone()).collect();
    assert_eq!(holders, vec![vec![w[0], w[1]], vec![w[1], w[2]], vec![w[2], w[0]]]);
    let owned = p.owned_ranges(w[0]).expect("known");
    let partitioned: Vec<_> =
        owned.iter().filter(|r| r.tensor.meta.name == "w").map(|r| (r.elements.clone(), r.primary)).collect();
    assert_eq!(partitioned, vec![(0..3 * P, true), (6 * P..9 * P, false)]);
    assert_eq!(p.owned_bytes(w[0]).expect("known"), OwnedBytes { partitioned: 12 * P, persistent: 2 });
    assert_eq!(p.tensor("n").expect("n").shards[0].holders, w, "persistent: all, not R");
    // R = N: everyone holds everything.
    let full = plan(&[t("w", &[9 * P])], &w, &opts(0, 3)).expect("plan");
    for &worker in &w {
        assert_eq!(full.owned_bytes(worker).expect("known").partitioned, 18 * P);
    }
}

// ---- queries ------------------------------------------------------------------

#[test]
fn owners_tile_the_requested_range() {
    let w = ids(4);
    let p = plan(&[t("w", &[10 * P])], &w, &opts(0, 1)).expect("plan");
    let pieces = p.owners("w", 2 * P + 1..9 * P - 1).expect("in range");
    let got: Vec<_> = pieces.iter().map(|x| (x.elements.clone(), x.holders.to_vec())).collect();
    assert_eq!(
        got,
        vec![
            (2 * P + 1..3 * P, vec![w[0]]),
            (3 * P..6 * P, vec![w[1]]),
            (6 * P..8 * P, vec![w[2]]),
            (8 * P..9 * P - 1, vec![w[3]])
        ]
    );
    assert_eq!(p.owners("w", 4 * P..5 * P).expect("inside one").len(), 1);
    assert!(p.owners("w", 5..5).expect("empty").is_empty());
    assert!(p.owners("w", 10 * P..10 * P).expect("empty at end").is_empty());
    let whole = p.owners("w", 0..10 * P).expect("all");
    assert_eq!(whole.len(), 4);
}

#[test]
fn owners_errors_name_the_problem() {
    let p = plan(&[t("w", &[10])], &ids(2), &opts(0, 1)).expect("plan");
    assert_eq!(p.owners("x", 0..1), Err(PlanError::UnknownTensor("x".into())));
    let err = p.owners("w", 5..11).expect_err("past the end");
    assert_eq!(err, PlanError::OutOfRange { name: "w".into(), numel: 10, start: 5, end: 11 });
    assert!(err.to_string().contains("10 elements"), "{err}");
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = p.owners("w", 6..5);
    assert!(matches!(reversed, Err(PlanError::OutOfRange { .. })));
    assert_eq!(p.owned_ranges(WorkerId(7)), Err(PlanError::UnknownWorker(WorkerId(7))));
    assert_eq!(p.owned_bytes(WorkerId(7)), Err(PlanError::UnknownWorker(WorkerId(7))));
    assert_eq!(p.rank(WorkerId(101)), Some(1));
}

// ---- bad input ----------------------------------------------------------------

#[test]
fn errors_for_bad_input() {
    let meta = [t("a", &[10])];
    assert_eq!(plan(&meta, &[], &opts(0, 1)), Err(PlanError::NoWorkers));
    let dup = [WorkerId(1), WorkerId(2), WorkerId(1)];
    assert_eq!(plan(&meta, &dup, &opts(0, 1)), Err(PlanError::DuplicateWorker(WorkerId(1))));
    let twice = [t("a", &[10]), t("b", &[1]), t("a", &[3])];
    let err = plan(&twice, &ids(2), &opts(0, 1)).expect_err("duplicate");
    assert_eq!(err, PlanError::DuplicateTensor("a".into()));
    assert_eq!(err.to_string(), "tensor `a` is listed twice");
    for replicas in [0, 3] {
        let err = plan(&meta, &ids(2), &opts(0, replicas)).expect_err("replicas");
        assert_eq!(err, PlanError::InvalidReplicas { replicas, workers: 2 });
    }
    let zero = PlanOptions { elem_bytes: 0, ..opts(0, 1) };
    assert_eq!(plan(&meta, &ids(2), &zero), Err(PlanError::InvalidElemBytes));
    let huge = [t("h", &[u64::MAX, 2])];
    assert!(matches!(plan(&huge, &ids(2), &opts(0, 1)), Err(PlanError::TooLarge { .. })));
    let bytes_overflow = [t("h", &[u64::MAX / 2 + 1])];
    assert!(matches!(plan(&bytes_overflow, &ids(2), &opts(0, 1)), Err(PlanError::TooLarge { .. })));
}

#[test]
fn from_parts_rejects_broken_plans() {
    let w = ids(2);
    let good = plan(&[t("a", &[10]), t("n", &[2])], &w, &opts(8, 1)).expect("plan");
    let rebuilt =
        Plan::from_parts(&good.options(), w.clone(), good.tensors().iter().rev().cloned().collect());
    assert_eq!(rebuilt.as_ref(), Ok(&good), "tensor order does not matter");

    let mutate = |f: &dyn Fn(&mut Vec<TensorPlan>)| {
        let mut tensors = good.tensors().to_vec();
        f(&mut tensors);
        Plan::from_parts(&good.options(), w.clone(), tensors)
    };
    let invalid = |r: Result<Plan>| matches!(r, Err(PlanError::Invalid(_)));
    assert!(invalid(mutate(&|t| t[0].shards[1].elements.start = 6)), "gap");
    assert!(invalid(mutate(&|t| t[0].shards[1].elements.end = 9)), "short");
    assert!(invalid(mutate(&|t| t[0].shards[0].holders.clear())), "no holder");
    assert!(invalid(mutate(&|t| t[0].shards[0].holders = vec![WorkerId(9)])), "unknown holder");
    assert!(invalid(mutate(&|t| t[0].shards[0].holders = vec![w[0], w[0]])), "holder twice");
    assert!(invalid(mutate(&|t| t[1].shards[0].holders.truncate(1))), "persistent on one");
    assert!(invalid(mutate(&|t| t[0].shards[0].elements = 0..6)), "overlap");
    assert_eq!(
        mutate(&|t| t.push(t[0].clone())),
        Err(PlanError::DuplicateTensor("a".into())),
        "duplicate tensor"
    );
    assert_eq!(Plan::from_parts(&good.options(), vec![], vec![]), Err(PlanError::NoWorkers));
}

// ---- properties over random checkpoints ------------------------------------------

/// Checks every invariant of a plan made with `replicas` = R.
fn check_plan(meta: &[TensorMeta], workers: &[WorkerId], options: &PlanOptions, p: &Plan) {
    let n = workers.len() as u64;
    let per_block = crate::digest::BLOCK_BYTES as u64 / u64::from(options.elem_bytes);
    let r = u64::from(options.replicas);
    assert_eq!(p.tensors().len(), meta.len());
    assert!(p.tensors().windows(2).all(|w| w[0].meta.name < w[1].meta.name), "sorted by name");
    let mut expect_owned = vec![OwnedBytes::default(); workers.len()];
    for (index, tp) in p.tensors().iter().enumerate() {
        let numel = tp.numel();
        let bytes = numel * u64::from(options.elem_bytes);
        // Every element held exactly R times (partitioned) or N times (persistent).
        let mut holds = vec![0u64; workers.len()];
        if bytes < options.persistence_threshold_bytes {
            assert_eq!(tp.placement, Placement::Persistent, "{}", tp.meta.name);
            assert_eq!(tp.shards, vec![Shard { elements: 0..numel, holders: workers.to_vec() }]);
            for e in expect_owned.iter_mut() {
                e.persistent += bytes;
            }
            continue;
        }
        assert_eq!(tp.placement, Placement::Partitioned);
        assert_eq!(tp.shards.len() as u64, n, "one range per worker");
        let blocks = numel.div_ceil(per_block);
        let (lo, hi) = (blocks / n, blocks.div_ceil(n));
        let mut at = 0;
        for (rank, s) in tp.shards.iter().enumerate() {
            assert_eq!(s.elements.start, at, "contiguous");
            at = s.elements.end;
            let len = s.elements.end - s.elements.start;
            assert!(
                s.elements.start.is_multiple_of(per_block) || s.elements.start == numel,
                "starts on a block"
            );
            assert!(s.elements.end.is_multiple_of(per_block) || s.elements.end == numel, "ends on a block");
            let len_blocks = len.div_ceil(per_block);
            assert!(
                len_blocks == lo || len_blocks == hi,
                "balance within one block: {len_blocks} not in {lo}..={hi}"
            );
            // The ranks from the tensor's index on take the extra blocks.
            let extra = (rank as u64 + n - index as u64 % n) % n < blocks % n;
            assert_eq!(len_blocks, lo + u64::from(extra), "rank {rank} of tensor {index}");
            assert_eq!(s.holders[0], workers[rank], "worker r owns range r");
            assert_eq!(s.holders.len() as u64, r);
            for (k, h) in s.holders.iter().enumerate() {
                assert_eq!(*h, workers[(rank + k) % workers.len()]);
                let hr = p.rank(*h).expect("a worker of the plan");
                holds[hr] += len;
                expect_owned[hr].partitioned += len * u64::from(options.elem_bytes);
            }
        }
        assert_eq!(at, numel, "covers the tensor");
        assert_eq!(holds.iter().sum::<u64>(), numel * r, "every element held R times");
    }
    for (rank, &w) in workers.iter().enumerate() {
        assert_eq!(p.owned_bytes(w).expect("known"), expect_owned[rank], "owned bytes of rank {rank}");
        let ranges = p.owned_ranges(w).expect("known");
        assert!(ranges.iter().all(|o| !o.elements.is_empty()));
        let sum: u64 = ranges.iter().map(|o| (o.elements.end - o.elements.start) * 2).sum();
        assert_eq!(sum, expect_owned[rank].total());
    }
    let model = p.model_bytes();
    let total_owned: u64 = expect_owned.iter().map(|o| o.partitioned).sum();
    assert_eq!(total_owned, model.partitioned * r);
}

/// Random sub-ranges: owners() tiles them, and each element's holders are its shard's.
fn check_owners(p: &Plan, rng: &mut Rng) {
    for tp in p.tensors() {
        let numel = tp.numel();
        for _ in 0..4 {
            let a = rng.below(numel + 1);
            let b = a + rng.below(numel - a + 1);
            let pieces = p.owners(&tp.meta.name, a..b).expect("in range");
            let mut at = a;
            for piece in &pieces {
                assert_eq!(piece.elements.start, at, "tiles the range");
                assert!(!piece.elements.is_empty());
                at = piece.elements.end;
                let shard = tp
                    .shards
                    .iter()
                    .find(|s| {
                        s.elements.start <= piece.elements.start && piece.elements.end <= s.elements.end
                    })
                    .expect("a piece lies within one shard");
                assert_eq!(piece.holders, &shard.holders[..]);
            }
            assert_eq!(at, b);
        }
    }
}

#[test]
fn property_every_element_owned_exactly_once_and_balanced() {
    let mut rng = Rng(0x5eed);
    for case in 0..400 {
        let n_workers = 1 + case % 8;
        let workers: Vec<WorkerId> = (0..n_workers).map(|_| WorkerId(rng.next())).collect();
        let meta = random_tensors(&mut rng);
        let options = PlanOptions {
            epoch: rng.next(),
            persistence_threshold_bytes: [0, 64, 4096, 1 << 16][rng.below(4) as usize],
            replicas: 1,
            elem_bytes: 2,
            tensor_degree: 0,
        };
        let p = plan(&meta, &workers, &options).expect("plan");
        check_plan(&meta, &workers, &options, &p);
        check_owners(&p, &mut rng);
    }
}

#[test]
fn property_replicas_hold_every_element_r_times() {
    let mut rng = Rng(0xab5e);
    for case in 0..300 {
        let n_workers = 1 + case % 8;
        let workers = ids(n_workers);
        let meta = random_tensors(&mut rng);
        let replicas = 1 + rng.below(n_workers) as u32;
        let options = PlanOptions { replicas, ..opts([0, 4096][rng.below(2) as usize], replicas) };
        let p = plan(&meta, &workers, &options).expect("plan");
        check_plan(&meta, &workers, &options, &p);
        check_owners(&p, &mut rng);
    }
}

#[test]
fn property_deterministic_and_independent_of_tensor_order() {
    let mut rng = Rng(0xde7e);
    for case in 0..200 {
        let workers = ids(1 + case % 8);
        let mut meta = random_tensors(&mut rng);
        let options = opts(4096, 1 + (case % 2) as u32).clone();
        let options = PlanOptions { replicas: options.replicas.min(workers.len() as u32), ..options };
        let first = plan(&meta, &workers, &options).expect("plan");
        assert_eq!(plan(&meta, &workers, &options).expect("again"), first, "same input, same plan");
        rng.shuffle(&mut meta);
        assert_eq!(plan(&meta, &workers, &options).expect("shuffled"), first, "order of tensors");
        // Round trip through its parts.
        let again = Plan::from_parts(&first.options(), workers.clone(), first.tensors().to_vec());
        assert_eq!(again, Ok(first));
    }
}

#[test]
fn coverage_survives_fewer_losses_than_replicas() {
    // 4 blocks: one per worker.
    let meta = vec![TensorMeta::new("w", vec![4, P], Some(0)), TensorMeta::new("n", vec![64], None)];
    let ws: Vec<WorkerId> = (1..=4).map(WorkerId).collect();
    let one = plan(&meta, &ws, &opts(256, 1)).expect("plan");
    let two = plan(&meta, &ws, &opts(256, 2)).expect("plan");
    assert!(one.covered_by(&ws) && two.covered_by(&ws));
    for lost in &ws {
        let live: Vec<WorkerId> = ws.iter().copied().filter(|w| w != lost).collect();
        assert!(!one.covered_by(&live), "R=1 loses {lost}'s range");
        assert!(two.covered_by(&live), "R=2 survives losing {lost}");
    }
    // Neighbours 1 and 2 both hold rank 0's range under R=2: losing both loses it.
    assert!(!two.covered_by(&[WorkerId(3), WorkerId(4)]));
    assert!(two.covered_by(&[WorkerId(1), WorkerId(3)]));
}

#[test]
fn a_tensor_plan_groups_consecutive_workers_and_routes_to_each_rank_0() {
    let meta = vec![t("w", &[8, 8])];
    let workers: Vec<WorkerId> = [5, 3, 9, 7].into_iter().map(WorkerId).collect();
    let options = PlanOptions { tensor_degree: 2, replicas: 2, ..opts(0, 2) };
    let p = plan(&meta, &workers, &options).expect("plan");
    assert_eq!(p.tensor_degree(), Some(2));
    assert_eq!(p.tensor_group(WorkerId(9)), Some((&workers[2..4], 0)));
    assert_eq!(p.tensor_group(WorkerId(3)), Some((&workers[0..2], 1)));
    assert_eq!(p.routable(), vec![WorkerId(5), WorkerId(9)]);
    // Groups must be exactly the workers.
    let odd = PlanOptions { tensor_degree: 3, replicas: 1, ..opts(0, 1) };
    let e = plan(&meta, &workers, &odd).expect_err("3 of 4").to_string();
    assert!(e.contains("1 tensor-parallel groups of 3 workers are not the plan's 4 workers"), "{e}");
    let gather = plan(&meta, &workers, &opts(0, 1)).expect("plan");
    assert_eq!((gather.tensor_degree(), gather.routable().len()), (None, 4));
}
