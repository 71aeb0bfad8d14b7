//! The safetensors header and the shard index, on the same bytes.
use std::path::Path;

use zeroshard_offload::{model_file, parse_header, parse_index};

/// `data` as a whole safetensors file, and as an index.
pub fn safetensors(data: &[u8]) {
    if let Ok(tensors) = parse_header(Path::new("fuzz.safetensors"), data, 0) {
        let mut ranges = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let bytes = t.shape.iter().try_fold(t.dtype.size_bytes(), |a, d| a.checked_mul(*d));
            let bytes = bytes.expect("an accepted shape has a byte size");
            let end = t.offset.checked_add(bytes).expect("an accepted range ends");
            assert!(end <= data.len(), "tensor `{}` ends at {end}, beyond the {} bytes", t.name, data.len());
            assert!(t.offset >= 8, "tensor `{}` starts inside the length prefix", t.name);
            if bytes > 0 {
                ranges.push((t.offset, end));
            }
            // The conversion every load runs, on the accepted bytes (bounded work).
            if bytes <= 1 << 16 {
                let mut out = vec![half::f16::ZERO; bytes / t.dtype.size_bytes()];
                t.dtype.convert_to_f16(&data[t.offset..end], &mut out);
            }
        }
        ranges.sort_unstable();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "accepted overlapping tensors");
    }
    if let Ok(names) = parse_index(Path::new("model.safetensors.index.json"), data) {
        assert!(names.windows(2).all(|w| w[0] < w[1]), "names sorted and unique");
        assert!(names.iter().all(|n| model_file::is_plain_name(n)), "{names:?}");
        for n in &names {
            let p = Path::new(n);
            assert!(!p.is_absolute() && !p.components().any(|c| c == std::path::Component::ParentDir));
        }
    }
}
