//! The stored plan's encoding (a prost-encoded `zeroshard.v1.StoredPlan`):
//! the only module of this crate that names generated types.
use prost::Message;
use zeroshard_offload::convert::{digests_from_pb, digests_to_pb};
use zeroshard_offload::digest::BlockDigests;
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

/// A part holds tensors' digests up to about this many bytes (etcd's default
/// request limit is 1.5 MiB).
const PART_BYTES: usize = 900 << 10;

/// The digests' header value and their parts' values.
pub(crate) fn encode_digests(identity: &str, d: &BlockDigests) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut parts: Vec<Vec<pb::TensorDigests>> = vec![Vec::new()];
    let mut size = 0;
    for t in digests_to_pb(d) {
        let len = t.blocks.len() + t.tensor.len() + 16;
        if size + len > PART_BYTES && !parts.last().is_some_and(Vec::is_empty) {
            parts.push(Vec::new());
            size = 0;
        }
        size += len;
        parts.last_mut().expect("one part at least").push(t);
    }
    let values = parts
        .into_iter()
        .map(|tensors| pb::StoredDigestPart { identity: identity.to_string(), tensors }.encode_to_vec())
        .collect::<Vec<_>>();
    let head = pb::StoredDigests { identity: identity.to_string(), parts: values.len() as u32 };
    (head.encode_to_vec(), values)
}

/// The number of parts when the header names `identity`, else `None`.
pub(crate) fn digest_parts(head: &[u8], identity: &str) -> Result<Option<u32>> {
    let head = pb::StoredDigests::decode(head).map_err(|e| MembershipError::Invalid(e.to_string()))?;
    Ok((head.identity == identity).then_some(head.parts))
}

/// The digests from their parts' values; `None` when a part is of another checkpoint.
pub(crate) fn decode_digests(parts: &[Vec<u8>], identity: &str) -> Result<Option<BlockDigests>> {
    let mut tensors = Vec::new();
    for p in parts {
        let part =
            pb::StoredDigestPart::decode(&p[..]).map_err(|e| MembershipError::Invalid(e.to_string()))?;
        if part.identity != identity {
            return Ok(None);
        }
        tensors.extend(part.tensors);
    }
    digests_from_pb(tensors).map(Some).map_err(|e| MembershipError::Invalid(e.to_string()))
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
