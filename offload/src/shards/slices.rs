//! The sending side: host slices this worker holds, cut into checksummed chunks.
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::{checksum, Chunk, Result, ShardError, TensorRange, CHUNK_BYTES};

/// One held slice: its element range, its bytes (`len × elem_bytes`), and the
/// checksum of each [`CHUNK_BYTES`] block from its start, computed once at
/// insert: a peer fetching the whole slice (every layer gather does) is served
/// those chunks without checksumming them again.
#[derive(Clone, Debug)]
struct HostSlice {
    elements: Range<u64>,
    bytes: Bytes,
    block_crcs: Arc<[u32]>,
}

/// Where a piece of a request lies in a held slice.
struct Origin {
    bytes: Bytes,
    /// Byte offset of `bytes` in the slice.
    at: usize,
    slice_len: usize,
    block_crcs: Arc<[u32]>,
}

/// The host bytes of the tensor slices a worker holds (its own ranges and
/// persistent tensors), shared zero-copy with the chunks cut from them.
#[derive(Clone, Debug)]
pub struct HostSlices {
    elem_bytes: usize,
    /// Per tensor, sorted by start, non-overlapping.
    tensors: HashMap<String, Vec<HostSlice>>,
}

impl HostSlices {
    /// An empty set of slices whose elements are `elem_bytes` wide (2 for f16).
    pub fn new(elem_bytes: usize) -> Self {
        assert!(elem_bytes > 0, "elements have a size");
        Self { elem_bytes, tensors: HashMap::new() }
    }

    pub fn elem_bytes(&self) -> usize {
        self.elem_bytes
    }

    /// Adds the bytes of `tensor[elements]`. Rejects a length that does not match
    /// the range, and a range overlapping one already held.
    pub fn insert(&mut self, tensor: impl Into<String>, elements: Range<u64>, bytes: Bytes) -> Result<()> {
        let tensor = tensor.into();
        let bad = |reason: String| ShardError::BadSlice {
            tensor: tensor.clone(),
            start: elements.start,
            end: elements.end,
            reason,
        };
        if elements.end < elements.start {
            return Err(bad("end precedes start".into()));
        }
        let expected = (elements.end - elements.start) * self.elem_bytes as u64;
        if bytes.len() as u64 != expected {
            return Err(bad(format!("{} bytes given, {expected} expected", bytes.len())));
        }
        let slices = self.tensors.entry(tensor.clone()).or_default();
        let at = slices.partition_point(|s| s.elements.start < elements.start);
        let overlaps_prev = at > 0 && slices[at - 1].elements.end > elements.start;
        let overlaps_next = at < slices.len() && slices[at].elements.start < elements.end;
        if overlaps_prev || overlaps_next {
            return Err(bad("overlaps a slice already held".into()));
        }
        let block_crcs = bytes.chunks(CHUNK_BYTES).map(checksum).collect();
        slices.insert(at, HostSlice { elements, bytes, block_crcs });
        Ok(())
    }

    /// Total bytes held.
    pub fn held_bytes(&self) -> u64 {
        self.tensors.values().flatten().map(|s| s.bytes.len() as u64).sum()
    }

    /// The parts of `tensor[elements]` held here, in order: each element range
    /// with its bytes (zero-copy). Gaps are simply absent.
    pub fn held_parts(&self, tensor: &str, elements: Range<u64>) -> Vec<(Range<u64>, Bytes)> {
        let eb = self.elem_bytes as u64;
        let Some(slices) = self.tensors.get(tensor) else { return Vec::new() };
        slices
            .iter()
            .filter_map(|s| {
                let (lo, hi) = (s.elements.start.max(elements.start), s.elements.end.min(elements.end));
                (lo < hi).then(|| {
                    let bytes = s.bytes.slice(
                        ((lo - s.elements.start) * eb) as usize..((hi - s.elements.start) * eb) as usize,
                    );
                    (lo..hi, bytes)
                })
            })
            .collect()
    }

    /// The bytes of `range` as zero-copy pieces (one per held slice it spans;
    /// none for an empty range). Errors unless every element is held.
    pub fn pieces(&self, range: &TensorRange) -> Result<Vec<Bytes>> {
        Ok(self.origins(range)?.into_iter().map(|o| o.bytes).collect())
    }

    /// [`Self::pieces`], each with where it lies in its held slice.
    fn origins(&self, range: &TensorRange) -> Result<Vec<Origin>> {
        let Range { start, end } = range.elements;
        if end < start {
            return Err(ShardError::InvalidRange { tensor: range.tensor.clone(), start, end });
        }
        if start == end {
            return Ok(Vec::new());
        }
        let not_held = || ShardError::NotHeld { tensor: range.tensor.clone(), start, end };
        let slices = self.tensors.get(&range.tensor).ok_or_else(not_held)?;
        // The last slice starting at or before `start`, then its contiguous successors.
        let first =
            slices.partition_point(|s| s.elements.start <= start).checked_sub(1).ok_or_else(not_held)?;
        let eb = self.elem_bytes as u64;
        let mut pieces = Vec::new();
        let mut at = start;
        for s in &slices[first..] {
            if s.elements.start > at || s.elements.end <= at {
                break;
            }
            let to = s.elements.end.min(end);
            let lo = ((at - s.elements.start) * eb) as usize;
            let hi = ((to - s.elements.start) * eb) as usize;
            pieces.push(Origin {
                bytes: s.bytes.slice(lo..hi),
                at: lo,
                slice_len: s.bytes.len(),
                block_crcs: s.block_crcs.clone(),
            });
            at = to;
            if at == end {
                return Ok(pieces);
            }
        }
        Err(not_held())
    }

    /// The chunks answering `requests`, in request order, each at most
    /// `chunk_bytes` (0 = [`CHUNK_BYTES`]; rounded down to whole elements).
    /// Every range is checked before the first chunk is cut, so a request for
    /// anything not held fails up front; checksums are computed lazily.
    pub fn chunks(&self, requests: &[TensorRange], chunk_bytes: usize) -> Result<ChunkStream> {
        let chunk_bytes = if chunk_bytes == 0 { CHUNK_BYTES } else { chunk_bytes };
        let chunk_bytes = (chunk_bytes / self.elem_bytes).max(1) * self.elem_bytes;
        let mut pieces = Vec::new();
        for (index, range) in requests.iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| ShardError::UnexpectedChunk {
                range_index: u32::MAX,
                reason: format!("{} ranges in one request", requests.len()),
            })?;
            let mut offset = 0u64;
            for o in self.origins(range)? {
                let len = o.bytes.len() as u64;
                pieces.push(Piece { range_index: index, offset, origin: o });
                offset += len;
            }
        }
        pieces.reverse(); // popped from the back
        Ok(ChunkStream { chunk_bytes, pieces })
    }
}

/// Bytes of one range that come from one held slice.
#[derive(Debug)]
struct Piece {
    range_index: u32,
    /// Byte offset of the rest of the piece within its range.
    offset: u64,
    /// The rest of the piece (`origin.bytes`, advanced as chunks are cut).
    origin: Origin,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes at {} of {}", self.bytes.len(), self.at, self.slice_len)
    }
}

/// The chunks of one fetch, cut on demand. A chunk never spans two ranges (nor
/// two held slices), and a range of zero elements yields none.
#[derive(Debug)]
pub struct ChunkStream {
    chunk_bytes: usize,
    /// Remaining pieces, the next one last.
    pieces: Vec<Piece>,
}

impl ChunkStream {
    /// Bytes still to be sent.
    pub fn remaining_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.origin.bytes.len() as u64).sum()
    }
}

impl Iterator for ChunkStream {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let piece = self.pieces.last_mut()?;
        let o = &mut piece.origin;
        let take = o.bytes.len().min(self.chunk_bytes);
        let data = o.bytes.split_to(take);
        // A chunk that is exactly one of the slice's blocks has its checksum already.
        let block = (o.at % CHUNK_BYTES == 0 && o.at + take == (o.at + CHUNK_BYTES).min(o.slice_len))
            .then(|| o.block_crcs.get(o.at / CHUNK_BYTES).copied())
            .flatten();
        let crc32c = block.unwrap_or_else(|| checksum(&data));
        o.at += take;
        let chunk = Chunk { range_index: piece.range_index, offset: piece.offset, crc32c, data };
        piece.offset += take as u64;
        if o.bytes.is_empty() {
            self.pieces.pop();
        }
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(n: usize, seed: u8) -> Bytes {
        Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
    }

    #[test]
    fn stored_block_checksums_match_the_chunks_they_serve() {
        let mut s = HostSlices::new(2);
        let n = CHUNK_BYTES * 5 / 2; // two whole blocks and a half one
        s.insert("t", 0..(n / 2) as u64, bytes_of(n, 7)).expect("held");
        let half = (n / 4) as u64;
        // The whole slice (cached checksums), and ranges not on block boundaries.
        for range in [0..(n / 2) as u64, 1..half, half..(n / 2) as u64] {
            let chunks: Vec<Chunk> =
                s.chunks(&[TensorRange::new("t", range.clone())], 0).expect("held").collect();
            assert!(!chunks.is_empty());
            for c in &chunks {
                assert_eq!(c.crc32c, checksum(&c.data), "{range:?} at {}", c.offset);
            }
        }
    }

    #[test]
    fn held_parts_clip_to_the_range_and_skip_gaps() {
        let mut s = HostSlices::new(2);
        let a = bytes_of(20, 1);
        s.insert("t", 0..10, a.clone()).expect("a");
        s.insert("t", 20..30, bytes_of(20, 2)).expect("b");
        let parts = s.held_parts("t", 5..25);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], (5..10, a.slice(10..20)));
        assert_eq!(parts[1].0, 20..25);
        assert!(s.held_parts("t", 10..20).is_empty());
        assert!(s.held_parts("u", 0..5).is_empty());
    }

    #[test]
    fn insert_validates_length_and_overlap() {
        let mut s = HostSlices::new(2);
        s.insert("t", 10..20, bytes_of(20, 0)).expect("fits");
        assert!(matches!(s.insert("t", 20..30, bytes_of(19, 0)), Err(ShardError::BadSlice { .. })));
        assert!(matches!(s.insert("t", 15..25, bytes_of(20, 0)), Err(ShardError::BadSlice { .. })));
        assert!(matches!(s.insert("t", 5..11, bytes_of(12, 0)), Err(ShardError::BadSlice { .. })));
        s.insert("t", 0..10, bytes_of(20, 1)).expect("adjacent before");
        s.insert("t", 20..30, bytes_of(20, 2)).expect("adjacent after");
        s.insert("u", 0..0, Bytes::new()).expect("empty slice");
        assert_eq!(s.held_bytes(), 60);
    }

    #[test]
    fn pieces_span_adjacent_slices_zero_copy() {
        let mut s = HostSlices::new(2);
        let a = bytes_of(20, 0);
        let b = bytes_of(20, 9);
        s.insert("t", 0..10, a.clone()).expect("a");
        s.insert("t", 10..20, b.clone()).expect("b");
        let p = s.pieces(&TensorRange::new("t", 5..15)).expect("held");
        assert_eq!(p, vec![a.slice(10..20), b.slice(0..10)]);
        assert_eq!(p[0].as_ptr(), a[10..].as_ptr(), "a slice of the held bytes, not a copy");
        assert_eq!(s.pieces(&TensorRange::new("t", 3..3)).expect("empty"), Vec::<Bytes>::new());
        assert_eq!(s.pieces(&TensorRange::new("absent", 3..3)).expect("empty"), Vec::<Bytes>::new());
    }

    #[test]
    fn pieces_reject_what_is_not_held() {
        let mut s = HostSlices::new(2);
        s.insert("t", 10..20, bytes_of(20, 0)).expect("a");
        s.insert("t", 30..40, bytes_of(20, 0)).expect("b");
        for r in [0..5, 5..15, 15..21, 15..35, 25..26, 39..41, 40..41] {
            let err = s.pieces(&TensorRange::new("t", r.clone())).expect_err("not held");
            assert_eq!(err, ShardError::NotHeld { tensor: "t".into(), start: r.start, end: r.end });
        }
        assert!(matches!(s.pieces(&TensorRange::new("u", 0..1)), Err(ShardError::NotHeld { .. })));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = TensorRange::new("t", 15..12);
        assert!(matches!(s.pieces(&reversed), Err(ShardError::InvalidRange { .. })));
    }

    #[test]
    fn chunks_are_bounded_ordered_and_checksummed() {
        let mut s = HostSlices::new(2);
        let t = bytes_of(2000, 3);
        s.insert("t", 0..600, t.slice(0..1200)).expect("a");
        s.insert("t", 600..1000, t.slice(1200..2000)).expect("b");
        s.insert("u", 0..7, bytes_of(14, 5)).expect("u");
        let req = [TensorRange::new("t", 100..900), TensorRange::new("u", 2..2), TensorRange::new("u", 1..7)];
        // 301 bytes rounds down to 300 (whole f16 elements).
        let chunks: Vec<Chunk> = s.chunks(&req, 301).expect("held").collect();
        let mut expect_offset = [0u64; 3];
        for c in &chunks {
            assert!(c.data.len() <= 300 && c.data.len() % 2 == 0 && !c.data.is_empty());
            assert_eq!(c.crc32c, checksum(&c.data));
            assert_eq!(c.offset, expect_offset[c.range_index as usize]);
            expect_offset[c.range_index as usize] += c.data.len() as u64;
        }
        assert_eq!(expect_offset, [1600, 0, 12]);
        let t_bytes: Vec<u8> =
            chunks.iter().filter(|c| c.range_index == 0).flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(t_bytes, t[200..1800]);
        // Slice boundary at element 600 = byte 1000 of the range cuts a chunk short.
        assert!(chunks.iter().any(|c| c.range_index == 0 && c.offset + c.data.len() as u64 == 1000));
        assert_eq!(chunks.last().map(|c| c.range_index), Some(2));
    }

    #[test]
    fn default_chunk_is_one_mebibyte() {
        let mut s = HostSlices::new(2);
        s.insert("big", 0..(3 << 19) + 1, Bytes::from(vec![7u8; (3 << 20) + 2])).expect("big");
        let stream = s.chunks(&[TensorRange::new("big", 0..(3 << 19) + 1)], 0).expect("held");
        assert_eq!(stream.remaining_bytes(), (3 << 20) + 2);
        let sizes: Vec<usize> = stream.map(|c| c.data.len()).collect();
        assert_eq!(sizes, vec![CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES, 2]);
    }

    #[test]
    fn a_request_for_anything_not_held_fails_before_any_chunk() {
        let mut s = HostSlices::new(2);
        s.insert("t", 0..10, bytes_of(20, 0)).expect("t");
        let err = s.chunks(&[TensorRange::new("t", 0..10), TensorRange::new("t", 5..11)], 0).expect_err("11");
        assert_eq!(err, ShardError::NotHeld { tensor: "t".into(), start: 5, end: 11 });
    }
}
