//! Shard ranges and chunks on the wire. Incoming ranges are validated; chunks
//! are carried over as they are (the [`Assembler`](crate::shards::Assembler)
//! verifies index, offset and checksum).
use zeroshard_proto::v1 as pb;

use crate::shards::{Chunk, ShardError, TensorRange};

impl From<&TensorRange> for pb::TensorRange {
    fn from(r: &TensorRange) -> Self {
        Self { tensor: r.tensor.clone(), start: r.elements.start, end: r.elements.end }
    }
}

/// Rejects a nameless tensor and a range whose end precedes its start.
impl TryFrom<pb::TensorRange> for TensorRange {
    type Error = ShardError;

    fn try_from(r: pb::TensorRange) -> Result<Self, ShardError> {
        if r.tensor.is_empty() || r.end < r.start {
            return Err(ShardError::InvalidRange { tensor: r.tensor, start: r.start, end: r.end });
        }
        Ok(Self { tensor: r.tensor, elements: r.start..r.end })
    }
}

/// Zero-copy: the payload `Bytes` moves into the message.
impl From<Chunk> for pb::ShardChunk {
    fn from(c: Chunk) -> Self {
        Self { range_index: c.range_index, offset: c.offset, data: c.data, crc32c: c.crc32c }
    }
}

/// Carries the fields over unchecked: the [`Assembler`](zeroshard_offload::shards::Assembler)
/// verifies the index, the offset and the checksum.
impl From<pb::ShardChunk> for Chunk {
    fn from(c: pb::ShardChunk) -> Self {
        Self { range_index: c.range_index, offset: c.offset, data: c.data, crc32c: c.crc32c }
    }
}

/// The ranges of a `FetchRangesRequest`, validated.
pub fn fetch_ranges(ranges: Vec<pb::TensorRange>) -> Result<Vec<TensorRange>, ShardError> {
    ranges.into_iter().map(TensorRange::try_from).collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::shards::{checksum, Assembler, HostSlices};

    #[test]
    fn ranges_round_trip_and_bad_ones_are_rejected() {
        let r = TensorRange::new("model.norm.weight", 3..9);
        assert_eq!(TensorRange::try_from(pb::TensorRange::from(&r)), Ok(r));
        let reversed = pb::TensorRange { tensor: "t".into(), start: 5, end: 4 };
        assert!(matches!(TensorRange::try_from(reversed), Err(ShardError::InvalidRange { .. })));
        let nameless = pb::TensorRange { tensor: String::new(), start: 0, end: 4 };
        assert!(fetch_ranges(vec![nameless]).is_err());
    }

    #[test]
    fn chunks_cross_the_wire_encoding_intact_and_zero_copy() {
        let data = Bytes::from((0..4096u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut slices = HostSlices::new(2);
        slices.insert("t", 0..2048, data.clone()).expect("held");
        let req = [TensorRange::new("t", 0..2048)];
        let wire_req = pb::FetchRangesRequest {
            epoch: 1,
            ranges: req.iter().map(pb::TensorRange::from).collect(),
            chunk_bytes: 1000,
        };
        let ranges = fetch_ranges(wire_req.ranges).expect("valid");
        let mut dest = vec![0u8; 4096];
        let mut asm = Assembler::new(vec![(req[0].clone(), &mut dest[..])], 2).expect("sizes");
        for chunk in slices.chunks(&ranges, wire_req.chunk_bytes as usize).expect("held") {
            let ptr = chunk.data.as_ptr();
            let msg = pb::ShardChunk::from(chunk);
            assert_eq!(msg.data.as_ptr(), ptr, "no copy into the message");
            let bytes = prost::Message::encode_to_vec(&msg);
            let back: pb::ShardChunk = prost::Message::decode(Bytes::from(bytes)).expect("decodes");
            assert_eq!(back.crc32c, checksum(&back.data));
            asm.accept(&Chunk::from(back)).expect("intact");
        }
        asm.finish().expect("complete");
        assert_eq!(dest, data);
    }
}
