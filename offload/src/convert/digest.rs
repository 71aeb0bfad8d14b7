//! Block digests on the wire: one `TensorDigests` per tensor, its digests
//! concatenated (32 bytes each). Messages coming in are validated.
use zeroshard_proto::v1 as pb;

use crate::digest::{BlockDigests, Digest, DigestError, TensorDigests};

/// The digests of every tensor, as `InstallPlanRequest.digests` carries them.
pub fn digests_to_pb(d: &BlockDigests) -> Vec<pb::TensorDigests> {
    d.tensors()
        .map(|(name, t)| pb::TensorDigests {
            tensor: name.to_string(),
            bytes: t.bytes,
            blocks: t.blocks.concat().into(),
        })
        .collect()
}

/// Checks every message: a name, whole 32-byte digests, as many as the size needs.
pub fn digests_from_pb(msgs: Vec<pb::TensorDigests>) -> Result<BlockDigests, DigestError> {
    let tensors = msgs
        .into_iter()
        .map(|m| {
            if m.tensor.is_empty() {
                return Err(DigestError::Invalid("a TensorDigests message has no tensor name".into()));
            }
            if m.blocks.len() % 32 != 0 {
                return Err(DigestError::Invalid(format!(
                    "tensor `{}`: {} digest bytes is not a multiple of 32",
                    m.tensor,
                    m.blocks.len()
                )));
            }
            let blocks: Vec<Digest> =
                m.blocks.chunks_exact(32).map(|c| c.try_into().expect("32-byte chunks")).collect();
            Ok((m.tensor, TensorDigests { bytes: m.bytes, blocks }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    BlockDigests::from_tensors(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_and_bad_ones_are_refused() {
        let d = BlockDigests::from_tensors([
            ("a".to_string(), TensorDigests { bytes: (1 << 20) + 3, blocks: vec![[1; 32], [2; 32]] }),
            ("b".to_string(), TensorDigests { bytes: 0, blocks: vec![] }),
        ])
        .expect("valid");
        let wire = digests_to_pb(&d);
        assert_eq!(wire[0].blocks.len(), 64);
        assert_eq!(digests_from_pb(wire.clone()), Ok(d));
        let mut torn = wire.clone();
        torn[0].blocks = torn[0].blocks.slice(..40);
        assert!(matches!(digests_from_pb(torn), Err(DigestError::Invalid(_))));
        let mut short = wire.clone();
        short[0].blocks = short[0].blocks.slice(..32);
        assert!(matches!(digests_from_pb(short), Err(DigestError::Invalid(_))));
        let mut nameless = wire;
        nameless[1].tensor.clear();
        assert!(matches!(digests_from_pb(nameless), Err(DigestError::Invalid(_))));
    }
}
