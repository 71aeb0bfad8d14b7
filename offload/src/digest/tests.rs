use std::path::Path;
use std::sync::Arc;

use super::*;

/// Writes `model.safetensors` in `dir` with F32 tensors `(name, values)`.
fn write_f32(dir: &Path, tensors: &[(&str, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, values) in tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&header).expect("json");
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    std::fs::write(dir.join("model.safetensors"), file).expect("write");
}

/// 700,000 elements: 1.4 MB of f16 host bytes, two blocks (the second short).
fn sample(dir: &Path) -> Checkpoint {
    let big: Vec<f32> = (0..700_000).map(|i| (i % 1000) as f32 * 0.25).collect();
    write_f32(dir, &[("big", big), ("small", vec![1.0, 2.0, 3.0])]);
    Checkpoint::open(dir).expect("open")
}

#[test]
fn digests_cover_the_f16_host_bytes_block_by_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = sample(dir.path());
    let d = compute(&ckpt).expect("digests");
    let big = d.tensor("big").expect("big");
    assert_eq!(big.bytes, 1_400_000);
    assert_eq!(big.blocks.len(), 2);
    assert_eq!(d.tensor("small").expect("small").blocks.len(), 1);
    assert_eq!(d.block_count(), 3);
    // Block k is bytes [k MiB, (k+1) MiB) of the f16 conversion, not of the f32 file.
    let host: Vec<u8> =
        bytemuck::cast_slice::<f16, u8>(&ckpt.read_f16("big", 0..700_000).expect("read")).to_vec();
    assert_eq!(big.blocks[0], *blake3::hash(&host[..BLOCK_BYTES]).as_bytes());
    assert_eq!(big.blocks[1], *blake3::hash(&host[BLOCK_BYTES..]).as_bytes());
    d.verify("big", 0, &host[..BLOCK_BYTES]).expect("block 0 verifies");
    d.verify("big", 1, &host[BLOCK_BYTES..]).expect("block 1 verifies");
    assert_eq!(d.bad_blocks("big", 0, &host), Ok(vec![]));
    // The same checkpoint hashed again gives the same digests.
    assert_eq!(compute(&ckpt).expect("again"), d);
}

#[test]
fn one_flipped_byte_fails_its_block_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = sample(dir.path());
    let d = compute(&ckpt).expect("digests");
    let mut host: Vec<u8> =
        bytemuck::cast_slice::<f16, u8>(&ckpt.read_f16("big", 0..700_000).expect("read")).to_vec();
    host[BLOCK_BYTES + 17] ^= 0x01;
    assert_eq!(d.bad_blocks("big", 0, &host), Ok(vec![1]));
    assert!(matches!(
        d.verify("big", 1, &host[BLOCK_BYTES..]),
        Err(DigestError::Mismatch { ref tensor, block: 1, start: 1_048_576, end: 1_400_000 }) if tensor == "big"
    ));
    let msg = d.verify("big", 1, &host[BLOCK_BYTES..]).expect_err("mismatch").to_string();
    assert!(msg.contains("`big`") && msg.contains("block 1"), "{msg}");
    // The wrong length, an unknown tensor, a misaligned start: errors, not mismatches.
    assert!(matches!(d.verify("big", 1, &host[..10]), Err(DigestError::Length { .. })));
    assert!(matches!(d.verify("nope", 0, &host[..10]), Err(DigestError::Unknown(_))));
    assert!(matches!(d.verify("big", 2, &host[..10]), Err(DigestError::Invalid(_))));
    assert!(matches!(d.bad_blocks("big", 2, &host), Err(DigestError::Invalid(_))));
}

#[test]
fn covering_expands_to_whole_blocks_within_the_tensor() {
    let per = (BLOCK_BYTES / 2) as u64; // f16 elements per block
    let numel = 3 * per + 100;
    assert_eq!(covering(numel, 2, 0..numel), 0..numel);
    assert_eq!(covering(numel, 2, 5..6), 0..per);
    assert_eq!(covering(numel, 2, per - 1..per + 1), 0..2 * per);
    assert_eq!(covering(numel, 2, 3 * per + 1..3 * per + 2), 3 * per..numel);
    assert_eq!(covering(numel, 2, per..2 * per), per..2 * per);
    assert_eq!(covering(numel, 2, 7..7), 7..7);
    // Exhaustively on a small grid: contains the range, starts and ends on boundaries.
    for start in (0..numel).step_by((per / 3) as usize) {
        for end in (start..=numel).step_by((per / 5) as usize) {
            let c = covering(numel, 2, start..end);
            if start == end {
                continue;
            }
            assert!(c.start <= start && c.end >= end, "{start}..{end} -> {c:?}");
            assert!(c.start.is_multiple_of(per));
            assert!(c.end.is_multiple_of(per) || c.end == numel);
            assert!(c.end - c.start < (end - start) + 2 * per);
        }
    }
}

#[test]
fn digests_are_checked_against_the_plan_and_their_sizes() {
    use crate::plan::{plan, PlanOptions, TensorMeta, WorkerId};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = compute(&sample(dir.path())).expect("digests");
    let meta = [TensorMeta::new("big", vec![700_000], None), TensorMeta::new("small", vec![3], None)];
    let p = plan(&meta, &[WorkerId(1)], &PlanOptions::default()).expect("plan");
    assert_eq!(d.check_plan(&p), Ok(()));
    let other = [TensorMeta::new("big", vec![700_001], None)];
    let p = plan(&other, &[WorkerId(1)], &PlanOptions::default()).expect("plan");
    assert!(matches!(d.check_plan(&p), Err(DigestError::Invalid(_))));
    let unknown = [TensorMeta::new("gone", vec![4], None)];
    let p = plan(&unknown, &[WorkerId(1)], &PlanOptions::default()).expect("plan");
    assert_eq!(d.check_plan(&p), Err(DigestError::Unknown("gone".into())));
    let bad = BlockDigests::from_tensors([(
        "t".to_string(),
        TensorDigests { bytes: BLOCK_BYTES as u64 + 1, blocks: vec![[0; 32]] },
    )]);
    assert!(matches!(bad, Err(DigestError::Invalid(_))));
}

#[test]
fn identity_changes_when_a_file_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = sample(dir.path());
    let before = identity(&ckpt);
    assert!(before.starts_with("model.safetensors:"), "{before}");
    drop(ckpt);
    write_f32(dir.path(), &[("small", vec![1.0, 2.0, 3.0, 4.0])]);
    let after = identity(&Checkpoint::open(dir.path()).expect("open"));
    assert_ne!(before, after);
}

#[test]
fn streamed_chunks_of_any_size_are_checked_block_by_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = sample(dir.path());
    let d = Arc::new(compute(&ckpt).expect("digests"));
    let host: Vec<u8> =
        bytemuck::cast_slice::<f16, u8>(&ckpt.read_f16("big", 0..700_000).expect("read")).to_vec();
    let mut bad = host.clone();
    bad[BLOCK_BYTES + 17] ^= 0x01;
    // Ranges: all of "big" intact (in 300 kB chunks that straddle the block
    // boundary), all of it with a flipped byte in block 1, its second block
    // alone, and one range fed out of order.
    let ranges = vec![
        ("big".to_string(), 0, host.len() as u64),
        ("big".to_string(), 0, host.len() as u64),
        ("big".to_string(), BLOCK_BYTES as u64, (host.len() - BLOCK_BYTES) as u64),
        ("big".to_string(), 0, host.len() as u64),
    ];
    let check = StreamCheck::start(d.clone(), ranges).expect("starts");
    for (i, c) in host.chunks(300_000).enumerate() {
        check.feed(0, (i * 300_000) as u64, bytes::Bytes::copy_from_slice(c));
        check.feed(1, (i * 300_000) as u64, bytes::Bytes::copy_from_slice(&bad[i * 300_000..][..c.len()]));
    }
    check.feed(2, 0, bytes::Bytes::copy_from_slice(&host[BLOCK_BYTES..]));
    check.feed(3, 0, bytes::Bytes::copy_from_slice(&host[..1000]));
    check.feed(3, 500, bytes::Bytes::copy_from_slice(&host[500..]));
    let v = check.finish().expect("finishes");
    assert_eq!(v[0], RangeVerdict { bad: vec![], unchecked: false });
    assert_eq!(v[1], RangeVerdict { bad: vec![1], unchecked: false });
    assert_eq!(v[2], RangeVerdict { bad: vec![], unchecked: false });
    assert!(v[3].unchecked, "{:?}", v[3]);
    // Not all bytes fed: unchecked, not passed.
    let check = StreamCheck::start(d.clone(), vec![("big".into(), 0, host.len() as u64)]).expect("starts");
    check.feed(0, 0, bytes::Bytes::copy_from_slice(&host[..BLOCK_BYTES]));
    assert_eq!(check.finish().expect("finishes"), vec![RangeVerdict { bad: vec![], unchecked: true }]);
    // A range that does not start on a block boundary is refused at once.
    assert!(StreamCheck::start(d, vec![("big".into(), 10, 100)]).is_err());
}
