//! Conversions between the worker's domain types and their protobuf form
//! (`zeroshard.v1`), in one place. Incoming messages are validated.
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

/// Carries the fields over unchecked: the [`Assembler`](crate::shards::Assembler)
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

/// Sampling parameters from the wire, with the CLI's defaults for unset fields
/// (greedy, 128 new tokens). Validated later, with the prompt.
pub fn generation_params(p: Option<pb::SamplingParams>) -> crate::engine::GenerationParams {
    let p = p.unwrap_or_default();
    crate::engine::GenerationParams {
        sampling: crate::sampling::SamplingParams {
            temperature: p.temperature.unwrap_or(0.0),
            top_k: p.top_k.unwrap_or(0) as usize,
            top_p: p.top_p.unwrap_or(1.0),
            seed: p.seed.unwrap_or(0),
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            resume_draws: 0,
        },
        max_new_tokens: p.max_new_tokens.unwrap_or(128) as usize,
        ignore_eos: p.ignore_eos,
    }
}

impl From<&crate::engine::GenerationParams> for pb::SamplingParams {
    fn from(p: &crate::engine::GenerationParams) -> Self {
        Self {
            max_new_tokens: Some(p.max_new_tokens as u32),
            temperature: Some(p.sampling.temperature),
            top_k: Some(p.sampling.top_k as u32),
            top_p: Some(p.sampling.top_p),
            seed: Some(p.sampling.seed),
            repetition_penalty: Some(p.sampling.repetition_penalty),
            ignore_eos: p.ignore_eos,
        }
    }
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
