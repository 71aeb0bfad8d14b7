//! The receiving side: verify each chunk's checksum and write it into place.
use super::{checksum, Chunk, Result, ShardError, TensorRange};

/// One requested range and where its bytes go.
#[derive(Debug)]
struct Target<'a> {
    range: TensorRange,
    dest: &'a mut [u8],
    /// Bytes written so far, from the start of `dest`, all verified.
    received: u64,
}

/// Assembles the chunks of one fetch into destination buffers, one per range.
///
/// Chunks of a range must arrive in order; a chunk that fails its checksum, or
/// does not continue its range, is rejected with an error and leaves the
/// assembler unchanged. The caller then drops the stream, asks
/// [`restart`](Self::restart) for a request covering exactly what is missing,
/// and feeds the new stream's chunks (whose range indices refer to that
/// request) to the same assembler.
#[derive(Debug)]
pub struct Assembler<'a> {
    elem_bytes: u64,
    targets: Vec<Target<'a>>,
    /// Range index on the wire (current request) → target, and the target's
    /// byte offset at which that wire range starts.
    wire: Vec<(usize, u64)>,
}

impl<'a> Assembler<'a> {
    /// Each range's destination must be exactly `range.len() × elem_bytes` long.
    pub fn new(ranges: Vec<(TensorRange, &'a mut [u8])>, elem_bytes: usize) -> Result<Self> {
        assert!(elem_bytes > 0, "elements have a size");
        let elem_bytes = elem_bytes as u64;
        let mut targets = Vec::with_capacity(ranges.len());
        for (index, (range, dest)) in ranges.into_iter().enumerate() {
            let Some(len) = range.elements.end.checked_sub(range.elements.start) else {
                let (start, end) = (range.elements.start, range.elements.end);
                return Err(ShardError::InvalidRange { tensor: range.tensor, start, end });
            };
            if dest.len() as u64 != len * elem_bytes {
                return Err(ShardError::DestinationSize {
                    index,
                    tensor: range.tensor,
                    expected: len * elem_bytes,
                    actual: dest.len() as u64,
                });
            }
            targets.push(Target { range, dest, received: 0 });
        }
        let wire = (0..targets.len()).map(|t| (t, 0)).collect();
        Ok(Self { elem_bytes, targets, wire })
    }

    /// The ranges of the request whose chunks `accept` expects now.
    pub fn request(&self) -> Vec<TensorRange> {
        self.wire
            .iter()
            .map(|&(t, base)| {
                let r = &self.targets[t].range;
                TensorRange::new(r.tensor.clone(), r.elements.start + base / self.elem_bytes..r.elements.end)
            })
            .collect()
    }

    /// Verifies `chunk` and writes it into its destination; returns which
    /// range it belongs to (an index into the ranges given to [`new`](Self::new))
    /// and the byte of that range it starts at.
    pub fn accept(&mut self, chunk: &Chunk) -> Result<(usize, u64)> {
        let unexpected =
            |reason: String| ShardError::UnexpectedChunk { range_index: chunk.range_index, reason };
        let &(t, base) = self
            .wire
            .get(chunk.range_index as usize)
            .ok_or_else(|| unexpected(format!("the request has {} ranges", self.wire.len())))?;
        let target = &mut self.targets[t];
        let at = base + chunk.offset;
        if at != target.received {
            return Err(unexpected(format!(
                "`{}` byte {} expected next, chunk starts at byte {at}",
                target.range.tensor, target.received
            )));
        }
        let end = at + chunk.data.len() as u64;
        if end > target.dest.len() as u64 {
            return Err(unexpected(format!(
                "`{}` has {} bytes, chunk ends at byte {end}",
                target.range.tensor,
                target.dest.len()
            )));
        }
        let computed = checksum(&chunk.data);
        if computed != chunk.crc32c {
            return Err(ShardError::Checksum {
                tensor: target.range.tensor.clone(),
                offset: at,
                sent: chunk.crc32c,
                computed,
            });
        }
        target.dest[at as usize..end as usize].copy_from_slice(&chunk.data);
        target.received = end;
        Ok((t, at))
    }

    /// After an error or a broken stream: the request for everything still
    /// missing (whole elements, so a partial element is fetched again). The
    /// range indices of later chunks refer to this request.
    pub fn restart(&mut self) -> Vec<TensorRange> {
        let eb = self.elem_bytes;
        self.wire.clear();
        for (t, target) in self.targets.iter_mut().enumerate() {
            target.received -= target.received % eb;
            if target.received < target.dest.len() as u64 {
                self.wire.push((t, target.received));
            }
        }
        self.request()
    }

    /// Bytes received and verified so far, over all ranges.
    pub fn received_bytes(&self) -> u64 {
        self.targets.iter().map(|t| t.received).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.targets.iter().all(|t| t.received == t.dest.len() as u64)
    }

    /// The destinations back, in request order, to check or split what was received.
    pub fn into_targets(self) -> Vec<(TensorRange, &'a mut [u8])> {
        self.targets.into_iter().map(|t| (t.range, t.dest)).collect()
    }

    /// Succeeds when every range has all its bytes.
    pub fn finish(self) -> Result<()> {
        match self.targets.into_iter().find(|t| t.received != t.dest.len() as u64) {
            None => Ok(()),
            Some(t) => Err(ShardError::Incomplete {
                tensor: t.range.tensor,
                received: t.received,
                expected: t.dest.len() as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::shards::{HostSlices, CHUNK_BYTES};

    /// A tensor of `n` f16-sized elements with distinct bytes.
    fn tensor(n: u64, seed: u64) -> Bytes {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Bytes::from(
            (0..n * 2)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<_>>(),
        )
    }

    /// A peer holding `t[0..n]` of tensor "a" and `u[0..m]` of tensor "b".
    fn peer(a: &Bytes, b: &Bytes) -> HostSlices {
        let mut s = HostSlices::new(2);
        s.insert("a", 0..a.len() as u64 / 2, a.clone()).expect("a");
        s.insert("b", 0..b.len() as u64 / 2, b.clone()).expect("b");
        s
    }

    #[test]
    fn round_trip_into_separate_destinations() {
        let (a, b) = (tensor(1_500_000, 1), tensor(10, 2));
        let src = peer(&a, &b);
        let req = vec![TensorRange::new("a", 1000..1_200_000), TensorRange::new("b", 3..9)];
        let mut da = vec![0u8; 2 * 1_199_000];
        let mut db = vec![0u8; 12];
        let mut asm = Assembler::new(vec![(req[0].clone(), &mut da[..]), (req[1].clone(), &mut db[..])], 2)
            .expect("sizes match");
        assert_eq!(asm.request(), req);
        for chunk in src.chunks(&req, CHUNK_BYTES).expect("held") {
            asm.accept(&chunk).expect("intact");
        }
        assert!(asm.is_complete());
        assert_eq!(asm.received_bytes(), 2 * 1_199_000 + 12);
        asm.finish().expect("complete");
        assert_eq!(da, a[2000..2_400_000]);
        assert_eq!(db, b[6..18]);
    }

    #[test]
    fn gather_a_whole_tensor_from_several_peers() {
        // Three peers own thirds of one tensor; the receiver assembles it in one buffer.
        let n = 1_000_001u64;
        let full = tensor(n, 7);
        let chunk = n.div_ceil(3);
        let mut dest = vec![0u8; full.len()];
        let mut rest = &mut dest[..];
        let mut parts = Vec::new();
        for r in 0..3 {
            let range = r * chunk..((r + 1) * chunk).min(n);
            let (head, tail) = rest.split_at_mut(((range.end - range.start) * 2) as usize);
            rest = tail;
            let mut peer = HostSlices::new(2);
            peer.insert("w", range.clone(), full.slice((range.start * 2) as usize..(range.end * 2) as usize))
                .expect("own range");
            parts.push((peer, TensorRange::new("w", range), head));
        }
        for (peer, range, dest) in parts {
            let mut asm = Assembler::new(vec![(range.clone(), dest)], 2).expect("sizes");
            for c in peer.chunks(&[range], 0).expect("held") {
                asm.accept(&c).expect("intact");
            }
            asm.finish().expect("complete");
        }
        assert_eq!(dest, full);
    }

    #[test]
    fn a_corrupted_chunk_is_rejected_then_refetched() {
        let (a, b) = (tensor(2_000_000, 3), tensor(100, 4));
        let src = peer(&a, &b);
        let req = vec![TensorRange::new("b", 0..100), TensorRange::new("a", 0..2_000_000)];
        let mut db = vec![0u8; 200];
        let mut da = vec![0u8; 4_000_000];
        let mut asm = Assembler::new(vec![(req[0].clone(), &mut db[..]), (req[1].clone(), &mut da[..])], 2)
            .expect("sizes");
        let mut chunks = src.chunks(&req, 0).expect("held");
        asm.accept(&chunks.next().expect("b")).expect("b intact");
        asm.accept(&chunks.next().expect("a 0")).expect("a first MiB intact");
        // The second MiB of `a` flips a bit in transit.
        let good = chunks.next().expect("a 1");
        let mut bad = good.data.to_vec();
        bad[12345] ^= 0x10;
        let bad = Chunk { data: Bytes::from(bad), ..good.clone() };
        let err = asm.accept(&bad).expect_err("checksum");
        assert_eq!(
            err,
            ShardError::Checksum {
                tensor: "a".into(),
                offset: 1 << 20,
                sent: good.crc32c,
                computed: checksum(&bad.data)
            }
        );
        assert!(err.to_string().contains("refetch"), "{err}");
        assert_eq!(asm.received_bytes(), 200 + (1 << 20), "nothing of the bad chunk was used");
        // Refetch exactly what is missing: `a` from element 2^19 on; `b` is done.
        let again = asm.restart();
        assert_eq!(again, vec![TensorRange::new("a", (1 << 19)..2_000_000)]);
        for c in src.chunks(&again, 0).expect("held") {
            asm.accept(&c).expect("intact");
        }
        asm.finish().expect("complete");
        assert_eq!(da, a[..]);
        assert_eq!(db, b[..]);
    }

    #[test]
    fn restart_after_a_broken_stream_refetches_partial_elements() {
        let a = tensor(1000, 5);
        let src = peer(&a, &tensor(1, 6));
        let req = vec![TensorRange::new("a", 10..1000)];
        let mut dest = vec![0u8; 1980];
        let mut asm = Assembler::new(vec![(req[0].clone(), &mut dest[..])], 2).expect("sizes");
        // A (misbehaving) sender cut a chunk mid-element; then the stream broke.
        let whole: Vec<Chunk> = src.chunks(&req, 0).expect("held").collect();
        let data = whole[0].data.slice(0..101);
        asm.accept(&Chunk { range_index: 0, offset: 0, crc32c: checksum(&data), data }).expect("valid");
        assert!(!asm.is_complete());
        assert_eq!(asm.restart(), vec![TensorRange::new("a", 60..1000)]);
        for c in src.chunks(&asm.request(), 64).expect("held") {
            asm.accept(&c).expect("intact");
        }
        asm.finish().expect("complete");
        assert_eq!(dest, a[20..2000]);
    }

    #[test]
    fn chunks_out_of_order_out_of_bounds_or_unknown_are_rejected() {
        let a = tensor(1000, 8);
        let src = peer(&a, &tensor(1, 9));
        let req = vec![TensorRange::new("a", 0..1000)];
        let mut dest = vec![0u8; 2000];
        let mut asm = Assembler::new(vec![(req[0].clone(), &mut dest[..])], 2).expect("sizes");
        let chunks: Vec<Chunk> = src.chunks(&req, 512).expect("held").collect();
        let skip = asm.accept(&chunks[1]).expect_err("gap");
        assert!(matches!(skip, ShardError::UnexpectedChunk { range_index: 0, .. }), "{skip}");
        asm.accept(&chunks[0]).expect("first");
        assert!(asm.accept(&chunks[0]).is_err(), "duplicate");
        let stray = Chunk { range_index: 1, ..chunks[1].clone() };
        assert!(matches!(asm.accept(&stray), Err(ShardError::UnexpectedChunk { range_index: 1, .. })));
        let data = Bytes::from(vec![0u8; 2000]);
        let long = Chunk { range_index: 0, offset: 512, crc32c: checksum(&data), data };
        assert!(asm.accept(&long).is_err(), "past the end");
        let err = asm.finish().expect_err("incomplete");
        assert_eq!(err, ShardError::Incomplete { tensor: "a".into(), received: 512, expected: 2000 });
    }

    #[test]
    fn destination_sizes_are_checked() {
        let mut d = [0u8; 7];
        let err = Assembler::new(vec![(TensorRange::new("a", 0..4), &mut d[..])], 2).expect_err("7 != 8");
        assert_eq!(err, ShardError::DestinationSize { index: 0, tensor: "a".into(), expected: 8, actual: 7 });
        let mut e: Vec<u8> = Vec::new();
        let mut asm = Assembler::new(vec![(TensorRange::new("a", 4..4), &mut e[..])], 2).expect("empty");
        assert!(asm.is_complete());
        assert_eq!(asm.restart(), Vec::<TensorRange>::new());
    }
}
