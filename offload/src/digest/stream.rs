//! Checking blocks as their bytes arrive: [`StreamCheck`] hashes each
//! accepted chunk on a thread of its own, so a gather's BLAKE3 work overlaps
//! receiving (and decrypting) the rest instead of following it on the
//! receiving thread.
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;

use super::{BlockDigests, DigestError, BLOCK_BYTES};

/// One range being checked: its tensor, the host byte its bytes start at (a
/// block boundary), its length, and how far it has been hashed.
struct Range {
    tensor: String,
    start: u64,
    len: u64,
    /// Bytes of the range hashed so far, in order.
    hashed: u64,
    hasher: blake3::Hasher,
    /// Bytes arrived out of order (a refetch started again inside a block):
    /// the caller checks this range from its destination instead.
    unordered: bool,
    bad: Vec<u64>,
}

/// What [`StreamCheck::finish`] found for one range.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RangeVerdict {
    /// Blocks (indices within the tensor) whose bytes do not match their digest.
    pub bad: Vec<u64>,
    /// Not checked here (bytes arrived out of order, or not all of them):
    /// check the range's destination instead.
    pub unchecked: bool,
}

/// Hashes the bytes of ranges of whole blocks as they arrive, on its own
/// thread, against the checkpoint's digests. Feed each chunk once its
/// checksum passed, in the order a range's bytes are written; then
/// [`finish`](Self::finish). Dropping it stops the thread.
pub struct StreamCheck {
    tx: Option<mpsc::Sender<(usize, u64, Bytes)>>,
    done: Option<std::thread::JoinHandle<Result<Vec<RangeVerdict>, DigestError>>>,
}

impl StreamCheck {
    /// Checks `ranges` (tensor, host start byte on a block boundary, length in bytes).
    pub fn start(digests: Arc<BlockDigests>, ranges: Vec<(String, u64, u64)>) -> Result<Self, DigestError> {
        if let Some((tensor, start, _)) =
            ranges.iter().find(|(_, s, _)| !s.is_multiple_of(BLOCK_BYTES as u64))
        {
            return Err(DigestError::Invalid(format!(
                "tensor `{tensor}`: byte {start} is not on a block boundary"
            )));
        }
        let (tx, rx) = mpsc::channel::<(usize, u64, Bytes)>();
        let mut state: Vec<Range> = ranges
            .into_iter()
            .map(|(tensor, start, len)| Range {
                tensor,
                start,
                len,
                hashed: 0,
                hasher: blake3::Hasher::new(),
                unordered: false,
                bad: Vec::new(),
            })
            .collect();
        let done = std::thread::Builder::new()
            .name("block-check".into())
            .spawn(move || {
                for (index, at, data) in rx {
                    let Some(r) = state.get_mut(index) else { continue };
                    if r.unordered {
                        continue;
                    }
                    if at != r.hashed || at + data.len() as u64 > r.len {
                        r.unordered = true;
                        continue;
                    }
                    hash(&digests, r, &data)?;
                }
                Ok(state
                    .into_iter()
                    .map(|r| RangeVerdict { unchecked: r.unordered || r.hashed != r.len, bad: r.bad })
                    .collect())
            })
            .map_err(|e| DigestError::Invalid(format!("starting the block-check thread: {e}")))?;
        Ok(Self { tx: Some(tx), done: Some(done) })
    }

    /// Bytes `data` of range `index`, from byte `at` of it.
    pub fn feed(&self, index: usize, at: u64, data: Bytes) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((index, at, data));
        }
    }

    /// Waits for every byte fed to be hashed; one verdict per range, in order.
    pub fn finish(mut self) -> Result<Vec<RangeVerdict>, DigestError> {
        drop(self.tx.take());
        let done = self.done.take().expect("finished once");
        done.join().map_err(|_| DigestError::Invalid("the block-check thread panicked".into()))?
    }
}

impl Drop for StreamCheck {
    fn drop(&mut self) {
        // The thread ends once the channel closes; nobody waits for it.
        drop(self.tx.take());
    }
}

/// Hashes `data`, the next bytes of `r`, closing each block it completes.
fn hash(digests: &BlockDigests, r: &mut Range, mut data: &[u8]) -> Result<(), DigestError> {
    let t = digests.tensor(&r.tensor).ok_or_else(|| DigestError::Unknown(r.tensor.clone()))?;
    while !data.is_empty() {
        let at = r.start + r.hashed;
        let block = at / BLOCK_BYTES as u64;
        if block >= t.blocks.len() as u64 {
            return Err(DigestError::Invalid(format!(
                "tensor `{}` has {} blocks; block {block} is outside it",
                r.tensor,
                t.blocks.len()
            )));
        }
        let end = t.block_range(block).end.min(r.start + r.len);
        let take = ((end - at) as usize).min(data.len());
        r.hasher.update(&data[..take]);
        r.hashed += take as u64;
        data = &data[take..];
        if r.start + r.hashed == end {
            // A block ends here (its last bytes, or the range's last).
            if end == t.block_range(block).end && *r.hasher.finalize().as_bytes() != t.blocks[block as usize]
            {
                r.bad.push(block);
            } else if end != t.block_range(block).end {
                // The range ends inside a block: it is not whole, check it elsewhere.
                r.unordered = true;
            }
            r.hasher.reset();
        }
    }
    Ok(())
}
