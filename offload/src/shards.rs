//! Shard transfer, the pure part: cutting owned tensor slices into checksummed
//! chunks ([`ChunkStream`]), and verifying and assembling them on the receiving
//! side ([`Assembler`]). No I/O: the `Shards` gRPC service feeds the chunks into
//! its response stream, and the gather feeds the received ones to an assembler.
//!
//! - [`TensorRange`]: a half-open element range of one named tensor.
//! - [`HostSlices`]: the host bytes of the slices this worker holds.
//! - [`Chunk`]: at most [`CHUNK_BYTES`] of one requested range, with its CRC-32C.
//! - [`Assembler`]: writes verified chunks into destination buffers; after a bad
//!   chunk or a broken stream, [`Assembler::restart`] gives the request for
//!   what is still missing.
//!
//! ```ignore
//! // Sender (a peer).
//! let chunks = slices.chunks(&requests, CHUNK_BYTES)?;   // validates every range first
//! for chunk in chunks { tx.send(chunk.into()).await?; }
//! // Receiver.
//! let mut asm = Assembler::new(requests, dests, elem_bytes)?;
//! while let Some(chunk) = stream.next().await { asm.accept(&chunk?)?; }  // on error: asm.restart()
//! asm.finish()?;
//! ```
mod assemble;
mod slices;

use std::ops::Range;

use bytes::Bytes;

pub use assemble::Assembler;
pub use slices::{ChunkStream, HostSlices};

/// Default chunk payload (1 MiB), defined once with the transport settings.
pub use zeroshard_proto::CHUNK_BYTES;

/// A half-open element range `[start, end)` of one named tensor (flattened).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorRange {
    pub tensor: String,
    pub elements: Range<u64>,
}

impl TensorRange {
    pub fn new(tensor: impl Into<String>, elements: Range<u64>) -> Self {
        Self { tensor: tensor.into(), elements }
    }

    pub fn len(&self) -> u64 {
        self.elements.end.saturating_sub(self.elements.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A piece of one requested range, as sent on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index into the request's ranges.
    pub range_index: u32,
    /// Byte offset of `data` within that range's bytes.
    pub offset: u64,
    pub data: Bytes,
    /// CRC-32C of `data`.
    pub crc32c: u32,
}

/// The largest link probe (`Shards.Probe`), bytes.
pub const MAX_PROBE_BYTES: u64 = 64 << 20;

/// Ok when a link probe of `bytes` is allowed (at most [`MAX_PROBE_BYTES`]).
pub fn check_probe(bytes: u64) -> Result<()> {
    if bytes > MAX_PROBE_BYTES {
        return Err(ShardError::ProbeTooLarge { bytes });
    }
    Ok(())
}

/// `bytes` of filler as chunks like a fetch's (at most [`CHUNK_BYTES`] each,
/// checksummed): what `Shards.Probe` streams for a link measurement; refused
/// above [`MAX_PROBE_BYTES`] ([`check_probe`]).
pub fn probe_chunks(bytes: u64) -> Result<impl Iterator<Item = Chunk> + Send + 'static> {
    check_probe(bytes)?;
    let filler = Bytes::from(vec![0x5au8; CHUNK_BYTES]);
    let crc = checksum(&filler);
    Ok((0..bytes.div_ceil(CHUNK_BYTES as u64)).map(move |i| {
        let offset = i * CHUNK_BYTES as u64;
        let data = filler.slice(..(bytes - offset).min(CHUNK_BYTES as u64) as usize);
        let crc32c = if data.len() == CHUNK_BYTES { crc } else { checksum(&data) };
        Chunk { range_index: 0, offset, data, crc32c }
    }))
}

/// The checksum of a chunk's payload: CRC-32C (Castagnoli), hardware-accelerated
/// (SSE 4.2 / ARMv8 CRC) by the pure-Rust `crc32c` crate.
pub fn checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// What can go wrong serving or receiving shard ranges.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// A requested range is not (wholly) held by this worker.
    #[error("tensor `{tensor}` elements {start}..{end} are not held here")]
    NotHeld { tensor: String, start: u64, end: u64 },
    /// A range whose end precedes its start.
    #[error("tensor `{tensor}`: invalid element range {start}..{end}")]
    InvalidRange { tensor: String, start: u64, end: u64 },
    /// Host slices that do not fit their element ranges, or overlap.
    #[error("host slice of `{tensor}` elements {start}..{end}: {reason}")]
    BadSlice { tensor: String, start: u64, end: u64, reason: String },
    /// A destination buffer whose length is not the range's byte length.
    #[error("destination {index} has {actual} bytes, range `{tensor}` needs {expected}")]
    DestinationSize { index: usize, tensor: String, expected: u64, actual: u64 },
    /// A chunk whose payload fails its checksum: it was not used; refetch.
    #[error(
        "chunk of `{tensor}` at byte {offset} failed its CRC-32C (sent {sent:#010x}, computed {computed:#010x}); \
         it was discarded, refetch the rest of the range"
    )]
    Checksum { tensor: String, offset: u64, sent: u32, computed: u32 },
    /// A chunk that does not continue its range where the previous one ended.
    #[error("chunk for range {range_index} out of order or out of bounds: {reason}")]
    UnexpectedChunk { range_index: u32, reason: String },
    /// The stream ended before every range was complete.
    #[error("transfer incomplete: `{tensor}` has {received} of {expected} bytes")]
    Incomplete { tensor: String, received: u64, expected: u64 },
    /// A link probe larger than [`MAX_PROBE_BYTES`].
    #[error("a probe of {bytes} bytes is above the largest, {MAX_PROBE_BYTES}")]
    ProbeTooLarge { bytes: u64 },
}

pub type Result<T> = std::result::Result<T, ShardError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_crc32c() {
        // RFC 3720 B.4 test vector: 32 bytes of zeros.
        assert_eq!(checksum(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_probe_is_checksummed_chunks_of_the_bytes_asked_for_up_to_the_largest() {
        let bytes = 2 * CHUNK_BYTES as u64 + 123;
        let chunks: Vec<Chunk> = probe_chunks(bytes).expect("allowed").collect();
        assert_eq!(chunks.iter().map(|c| c.data.len()).collect::<Vec<_>>(), [CHUNK_BYTES, CHUNK_BYTES, 123]);
        assert_eq!(
            chunks.iter().map(|c| c.offset).collect::<Vec<_>>(),
            [0, CHUNK_BYTES as u64, 2 * CHUNK_BYTES as u64]
        );
        assert!(chunks.iter().all(|c| checksum(&c.data) == c.crc32c));
        assert_eq!(probe_chunks(0).expect("allowed").count(), 0);
        assert!(probe_chunks(MAX_PROBE_BYTES).is_ok());
        assert_eq!(
            probe_chunks(MAX_PROBE_BYTES + 1).err(),
            Some(ShardError::ProbeTooLarge { bytes: MAX_PROBE_BYTES + 1 })
        );
    }

    /// `cargo test -p zeroshard-worker --release -- --ignored checksum_throughput --nocapture`
    #[test]
    #[ignore = "measurement, not a test"]
    fn checksum_throughput() {
        let data: Vec<u8> = (0..256u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut best = f64::MAX;
        let mut acc = 0u32;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for chunk in data.chunks(CHUNK_BYTES) {
                acc = acc.wrapping_add(checksum(chunk));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("crc32c over 1 MiB chunks: {:.1} GB/s (sum {acc:#x})", data.len() as f64 / best / 1e9);
    }
}
