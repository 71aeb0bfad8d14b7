//! The stored plan's encoding (a prost-encoded `zeroshard.v1.StoredPlan`):
//! the only module of this crate that names generated types.
use prost::Message;
use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_proto::v1 as pb;

use crate::error::{MembershipError, Result};
use crate::StoredPlan;

pub(crate) fn encode_plan(plan: &StoredPlan) -> Vec<u8> {
    pb::StoredPlan {
        plan: Some(pb::PartitionPlan::from(&plan.plan)),
        peers: plan
            .peers
            .iter()
            .map(|(id, address)| pb::Peer { id: id.0, address: address.clone() })
            .collect(),
        pull: plan.pull,
    }
    .encode_to_vec()
}

/// A stored plan; `Invalid` when the bytes do not decode or lack the plan.
pub(crate) fn decode_plan(bytes: &[u8]) -> Result<StoredPlan> {
    let stored = pb::StoredPlan::decode(bytes).map_err(|e| MembershipError::Invalid(e.to_string()))?;
    let plan = stored.plan.ok_or_else(|| MembershipError::Invalid("no plan in StoredPlan".into()))?;
    Ok(StoredPlan {
        plan: Plan::try_from(plan)?,
        peers: stored.peers.into_iter().map(|p| (WorkerId(p.id), p.address)).collect(),
        pull: stored.pull,
    })
}
