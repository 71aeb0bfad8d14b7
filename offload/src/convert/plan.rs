//! The plan and its assignments on the wire. Messages coming in are validated:
//! absent message fields, unknown enum values and broken plan invariants are errors.
use zeroshard_proto::v1 as pb;

use crate::plan::{
    Assignment, Placement, Plan, PlanError, PlanOptions, Shard, TensorMeta, TensorPlan, WorkerId,
};

impl From<Placement> for pb::Placement {
    fn from(p: Placement) -> Self {
        match p {
            Placement::Partitioned => Self::Partitioned,
            Placement::Persistent => Self::Persistent,
        }
    }
}

impl TryFrom<i32> for Placement {
    type Error = PlanError;

    fn try_from(v: i32) -> Result<Self, PlanError> {
        match pb::Placement::try_from(v) {
            Ok(pb::Placement::Partitioned) => Ok(Self::Partitioned),
            Ok(pb::Placement::Persistent) => Ok(Self::Persistent),
            Ok(pb::Placement::Unspecified) => Err(PlanError::MissingField("TensorPlacement.placement")),
            Err(_) => Err(PlanError::Invalid(format!("unknown placement {v}"))),
        }
    }
}

impl From<&Shard> for pb::Shard {
    fn from(s: &Shard) -> Self {
        Self {
            start: s.elements.start,
            end: s.elements.end,
            holders: s.holders.iter().map(|w| w.0).collect(),
        }
    }
}

impl From<pb::Shard> for Shard {
    fn from(s: pb::Shard) -> Self {
        Self { elements: s.start..s.end, holders: s.holders.into_iter().map(WorkerId).collect() }
    }
}

impl From<&TensorPlan> for pb::TensorPlacement {
    fn from(t: &TensorPlan) -> Self {
        Self {
            name: t.meta.name.clone(),
            shape: t.meta.shape.clone(),
            layer: t.meta.layer,
            placement: pb::Placement::from(t.placement).into(),
            shards: t.shards.iter().map(pb::Shard::from).collect(),
        }
    }
}

impl TryFrom<pb::TensorPlacement> for TensorPlan {
    type Error = PlanError;

    fn try_from(t: pb::TensorPlacement) -> Result<Self, PlanError> {
        if t.name.is_empty() {
            return Err(PlanError::MissingField("TensorPlacement.name"));
        }
        Ok(Self {
            placement: Placement::try_from(t.placement)?,
            meta: TensorMeta { name: t.name, shape: t.shape, layer: t.layer },
            shards: t.shards.into_iter().map(Shard::from).collect(),
        })
    }
}

impl From<&Plan> for pb::PartitionPlan {
    fn from(p: &Plan) -> Self {
        Self {
            epoch: p.epoch(),
            workers: p.workers().iter().map(|w| w.0).collect(),
            replicas: p.replicas(),
            elem_bytes: p.elem_bytes(),
            persistence_threshold_bytes: p.persistence_threshold_bytes(),
            tensors: p.tensors().iter().map(pb::TensorPlacement::from).collect(),
            tensor_degree: p.tensor_degree().unwrap_or(0) as u32,
        }
    }
}

/// Validates every invariant (see [`Plan::from_parts`]).
impl TryFrom<pb::PartitionPlan> for Plan {
    type Error = PlanError;

    fn try_from(p: pb::PartitionPlan) -> Result<Self, PlanError> {
        let options = PlanOptions {
            epoch: p.epoch,
            persistence_threshold_bytes: p.persistence_threshold_bytes,
            replicas: p.replicas,
            elem_bytes: p.elem_bytes,
            tensor_degree: p.tensor_degree,
        };
        let tensors = p.tensors.into_iter().map(TensorPlan::try_from).collect::<Result<Vec<_>, _>>()?;
        Plan::from_parts(&options, p.workers.into_iter().map(WorkerId).collect(), tensors)
    }
}

impl From<&Assignment> for pb::InstallPlanRequest {
    fn from(a: &Assignment) -> Self {
        Self {
            plan: Some(pb::PartitionPlan::from(&a.plan)),
            worker_id: a.worker.0,
            peers: a
                .peers
                .iter()
                .map(|(id, address)| pb::Peer { id: id.0, address: address.clone() })
                .collect(),
            pull_from: a.pull_from.clone(),
            model: None,
            digests: super::digests_to_pb(&a.digests),
            coordinator_shards: a.coordinator_shards.clone(),
        }
    }
}

/// Requires the plan, a worker of the plan, exactly one address per worker,
/// and digests of every tensor of the plan.
impl TryFrom<pb::InstallPlanRequest> for Assignment {
    type Error = PlanError;

    fn try_from(r: pb::InstallPlanRequest) -> Result<Self, PlanError> {
        let plan = Plan::try_from(r.plan.ok_or(PlanError::MissingField("InstallPlanRequest.plan"))?)?;
        let worker = WorkerId(r.worker_id);
        plan.rank(worker).ok_or(PlanError::UnknownWorker(worker))?;
        let mut peers = Vec::with_capacity(plan.workers().len());
        for &w in plan.workers() {
            let mut found = r.peers.iter().filter(|p| p.id == w.0);
            let address = match (found.next(), found.next()) {
                (Some(p), None) if !p.address.is_empty() => p.address.clone(),
                (None, _) | (Some(_), None) => return Err(PlanError::Invalid(format!("no address for {w}"))),
                (Some(_), Some(_)) => return Err(PlanError::Invalid(format!("two addresses for {w}"))),
            };
            peers.push((w, address));
        }
        if let Some(p) = r.peers.iter().find(|p| plan.rank(WorkerId(p.id)).is_none()) {
            return Err(PlanError::UnknownWorker(WorkerId(p.id)));
        }
        let pull_from = r.pull_from.filter(|s| !s.is_empty());
        let coordinator_shards = r.coordinator_shards.filter(|s| !s.is_empty());
        let invalid = |e: crate::digest::DigestError| PlanError::Invalid(e.to_string());
        let digests = super::digests_from_pb(r.digests).map_err(invalid)?;
        digests.check_plan(&plan).map_err(invalid)?;
        Ok(Self { plan, worker, peers, pull_from, digests: std::sync::Arc::new(digests), coordinator_shards })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;

    fn sample(replicas: u32) -> Plan {
        let meta = [
            TensorMeta::new("model.layers.0.mlp.up_proj.weight", vec![64, 48], Some(0)),
            TensorMeta::new("model.norm.weight", vec![48], None),
            TensorMeta::new("model.embed_tokens.weight", vec![100, 48], None),
            TensorMeta::new("tiny", vec![2], Some(1)),
        ];
        let options = PlanOptions {
            epoch: 42,
            persistence_threshold_bytes: 200,
            replicas,
            elem_bytes: 2,
            tensor_degree: 0,
        };
        plan(&meta, &[WorkerId(5), WorkerId(9), WorkerId(7)], &options).expect("plan")
    }

    #[test]
    fn plan_round_trips_through_protobuf() {
        for replicas in 1..=3 {
            let p = sample(replicas);
            let wire = pb::PartitionPlan::from(&p);
            assert_eq!(wire.epoch, 42);
            assert_eq!(wire.workers, vec![5, 9, 7]);
            assert_eq!(wire.tensors[0].placement, pb::Placement::Partitioned as i32);
            // Through the encoded bytes, as on the wire.
            let bytes = prost::Message::encode_to_vec(&wire);
            let decoded: pb::PartitionPlan = prost::Message::decode(&bytes[..]).expect("decodes");
            assert_eq!(Plan::try_from(decoded), Ok(p));
        }
    }

    #[test]
    fn invalid_messages_are_rejected() {
        let wire = pb::PartitionPlan::from(&sample(1));
        let mut unspecified = wire.clone();
        unspecified.tensors[1].placement = pb::Placement::Unspecified as i32;
        assert_eq!(Plan::try_from(unspecified), Err(PlanError::MissingField("TensorPlacement.placement")));
        let mut unknown = wire.clone();
        unknown.tensors[1].placement = 17;
        assert!(matches!(Plan::try_from(unknown), Err(PlanError::Invalid(_))));
        let mut nameless = wire.clone();
        nameless.tensors[0].name.clear();
        assert_eq!(Plan::try_from(nameless), Err(PlanError::MissingField("TensorPlacement.name")));
        let mut gap = wire.clone();
        gap.tensors[0].shards[1].start += 1;
        assert!(matches!(Plan::try_from(gap), Err(PlanError::Invalid(_))));
        let mut stranger = wire.clone();
        stranger.tensors[0].shards[0].holders = vec![1234];
        assert!(matches!(Plan::try_from(stranger), Err(PlanError::Invalid(_))));
        let mut no_workers = wire.clone();
        no_workers.workers.clear();
        assert_eq!(Plan::try_from(no_workers), Err(PlanError::NoWorkers));
        assert_eq!(Plan::try_from(pb::PartitionPlan::default()), Err(PlanError::NoWorkers));
        let mut replicas = wire;
        replicas.replicas = 0;
        assert!(matches!(Plan::try_from(replicas), Err(PlanError::InvalidReplicas { .. })));
    }

    #[test]
    fn assignment_round_trips_and_requires_its_fields() {
        let plan = sample(2);
        let peers: Vec<_> =
            plan.workers().iter().map(|w| (*w, format!("http://127.0.0.1:{}", 5000 + w.0))).collect();
        let digests = plan
            .tensors()
            .iter()
            .map(|t| {
                let bytes = t.numel() * 2;
                let blocks = vec![[7u8; 32]; crate::digest::TensorDigests::blocks_for(bytes) as usize];
                (t.meta.name.clone(), crate::digest::TensorDigests { bytes, blocks })
            })
            .collect::<Vec<_>>();
        let digests = std::sync::Arc::new(crate::digest::BlockDigests::from_tensors(digests).expect("valid"));
        let a = Assignment {
            plan,
            worker: WorkerId(9),
            peers,
            pull_from: Some("http://127.0.0.1:4000".into()),
            digests,
            coordinator_shards: Some("http://127.0.0.1:4001".into()),
        };
        let wire = pb::InstallPlanRequest::from(&a);
        assert_eq!(Assignment::try_from(wire.clone()), Ok(a.clone()));

        let missing = pb::InstallPlanRequest { plan: None, ..wire.clone() };
        assert_eq!(Assignment::try_from(missing), Err(PlanError::MissingField("InstallPlanRequest.plan")));
        let stranger = pb::InstallPlanRequest { worker_id: 1, ..wire.clone() };
        assert_eq!(Assignment::try_from(stranger), Err(PlanError::UnknownWorker(WorkerId(1))));
        let mut no_address = wire.clone();
        no_address.peers.remove(1);
        assert!(matches!(Assignment::try_from(no_address), Err(PlanError::Invalid(_))));
        let mut twice = wire.clone();
        twice.peers.push(twice.peers[0].clone());
        assert!(matches!(Assignment::try_from(twice), Err(PlanError::Invalid(_))));
        let mut extra = wire.clone();
        extra.peers.push(pb::Peer { id: 77, address: "http://x".into() });
        assert_eq!(Assignment::try_from(extra), Err(PlanError::UnknownWorker(WorkerId(77))));
        let mut no_digest = wire.clone();
        no_digest.digests.pop();
        assert!(
            matches!(Assignment::try_from(no_digest), Err(PlanError::Invalid(_))),
            "every tensor needs digests"
        );
        let no_pull = pb::InstallPlanRequest { pull_from: Some(String::new()), ..wire };
        assert_eq!(Assignment::try_from(no_pull).map(|a| a.pull_from), Ok(None));
    }

    #[test]
    fn a_tensor_plan_keeps_its_groups_over_the_wire() {
        let meta = vec![TensorMeta { name: "w".into(), shape: vec![8, 8], layer: Some(0) }];
        let workers: Vec<WorkerId> = [5, 3, 9, 7].into_iter().map(WorkerId).collect();
        let options = PlanOptions { tensor_degree: 2, replicas: 2, ..PlanOptions::default() };
        let p = crate::plan::plan(&meta, &workers, &options).expect("plan");
        let back = Plan::try_from(pb::PartitionPlan::from(&p)).expect("wire");
        assert_eq!(back.tensor_group(WorkerId(7)), Some((&workers[2..4], 1)));
        assert_eq!(back.routable(), vec![WorkerId(5), WorkerId(9)]);
    }
}
