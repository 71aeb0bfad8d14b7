//! The two parsers of a checkpoint's metadata, on bytes (no I/O, so they can be
//! fuzzed): the safetensors header ([`parse_header`]) and the shard index
//! ([`parse_index`]). Neither trusts a number it reads: lengths are checked
//! against the bytes present before anything is allocated for them, sizes are
//! computed with checked arithmetic, and tensors may not share bytes.
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::TensorInfo;
use crate::dtype::DType;
use crate::error::{OffloadError, Result};
use crate::model_file;

/// The largest safetensors header read: ~110 bytes per tensor, so 16 MiB holds
/// ~150k tensors in one file, more than the largest real checkpoints have in
/// all their shards together (~92k).
pub const MAX_HEADER_BYTES: usize = 16 << 20;
/// The most tensors one safetensors file may declare (see [`MAX_HEADER_BYTES`]);
/// each costs ~100 bytes of memory once parsed.
pub const MAX_TENSORS_PER_FILE: usize = 1 << 18;

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// The header's entries in file order, `__metadata__` skipped, parsed one at a
/// time (no intermediate JSON tree: the peak is the entries themselves),
/// refused past [`MAX_TENSORS_PER_FILE`].
struct Entries;

impl<'de> DeserializeSeed<'de> for Entries {
    type Value = Vec<(String, RawEntry)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Entries {
    type Value = Vec<(String, RawEntry)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if out.len() == MAX_TENSORS_PER_FILE {
                return Err(serde::de::Error::custom(format!(
                    "more than {MAX_TENSORS_PER_FILE} tensors in one file"
                )));
            }
            let entry = map.next_value::<RawEntry>().map_err(|e| {
                serde::de::Error::custom(format!("tensor `{name}`: malformed header entry: {e}"))
            })?;
            out.push((name, entry));
        }
        Ok(out)
    }
}

/// The distinct values of an index's `weight_map` (the tensor names, the keys,
/// are not kept); other fields are skipped.
struct ShardNames;

impl<'de> Visitor<'de> for ShardNames {
    type Value = BTreeSet<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with a `weight_map` of tensor name to file name")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut names = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "weight_map" && names.is_none() {
                names = Some(map.next_value_seed(WeightMap)?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        names.ok_or_else(|| serde::de::Error::missing_field("weight_map"))
    }
}

struct WeightMap;

impl<'de> DeserializeSeed<'de> for WeightMap {
    type Value = BTreeSet<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for WeightMap {
    type Value = BTreeSet<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor name to file name")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut names = BTreeSet::new();
        while map.next_key::<IgnoredAny>()?.is_some() {
            let file = map.next_value::<std::borrow::Cow<'de, str>>()?;
            if !names.contains(file.as_ref()) {
                names.insert(file.into_owned());
            }
        }
        Ok(names)
    }
}

/// Parses and validates one safetensors file's header: `u64` little-endian
/// header length, the JSON header, then the data. Every tensor must lie inside
/// the data, hold exactly `numel × dtype size` bytes and share none of them with
/// another tensor. `path` is only used in messages; `file` is stored in each
/// [`TensorInfo`].
pub fn parse_header(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<TensorInfo>> {
    let prefix = bytes.get(..8).unwrap_or(bytes);
    let data_start = data_start(path, prefix, bytes.len() as u64)?;
    parse_entries(path, &bytes[8..data_start], data_start, bytes.len(), file)
}

/// Where the data of a safetensors file of `file_len` bytes starts, from its
/// first 8 bytes (`prefix`): checked against the file's size and
/// [`MAX_HEADER_BYTES`] before anything is read or allocated for the header.
pub(crate) fn data_start(path: &Path, prefix: &[u8], file_len: u64) -> Result<usize> {
    let fmt = |message: String| OffloadError::Format { path: path.to_path_buf(), message };
    let Ok(prefix) = <[u8; 8]>::try_from(prefix) else {
        return Err(fmt(format!("file is {file_len} bytes, too short for a safetensors header")));
    };
    let header_len = u64::from_le_bytes(prefix);
    let data_start = header_len
        .checked_add(8)
        .filter(|end| *end <= file_len)
        .and_then(|end| usize::try_from(end).ok())
        .ok_or_else(|| {
            fmt(format!("header length {header_len} exceeds the file size {file_len} (truncated file?)"))
        })?;
    if header_len as usize > MAX_HEADER_BYTES {
        return Err(fmt(format!("header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit")));
    }
    Ok(data_start)
}

/// The tensors of a header `json` whose data starts at byte `data_start` of a
/// file of `file_len` bytes (see [`parse_header`]).
pub(crate) fn parse_entries(
    path: &Path,
    json: &[u8],
    data_start: usize,
    file_len: usize,
    file: usize,
) -> Result<Vec<TensorInfo>> {
    let fmt = |message: String| OffloadError::Format { path: path.to_path_buf(), message };
    let mut de = serde_json::Deserializer::from_slice(json);
    let mut header = Entries
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
        .map_err(|e| fmt(format!("invalid safetensors header: {e}")))?;
    // Names sort as the map of the file format does; a repeated name is refused.
    header.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = header.windows(2).find(|p| p[0].0 == p[1].0) {
        return Err(fmt(format!("tensor `{}` is declared twice", pair[0].0)));
    }
    let data_len = file_len - data_start;
    let mut out = Vec::with_capacity(header.len());
    let mut ranges = Vec::with_capacity(header.len());
    for (name, raw) in header {
        let dtype = DType::from_safetensors(&raw.dtype).ok_or_else(|| OffloadError::UnsupportedDType {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype: raw.dtype.clone(),
        })?;
        let [begin, end] = raw.data_offsets;
        let needed = raw
            .shape
            .iter()
            .try_fold(dtype.size_bytes(), |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| fmt(format!("tensor `{name}`: shape {:?} overflows", raw.shape)))?;
        if end < begin || end - begin != needed {
            return Err(fmt(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] hold {} bytes, but shape {:?} of {} needs {needed}",
                end.saturating_sub(begin),
                raw.shape,
                raw.dtype,
            )));
        }
        if end > data_len {
            return Err(fmt(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] go beyond the file's {data_len} data bytes (truncated file?)"
            )));
        }
        if begin < end {
            ranges.push((begin, end, out.len()));
        }
        out.push(TensorInfo { name, dtype, shape: raw.shape, file, offset: data_start + begin });
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, prev_end, a), (begin, _, b)) = (pair[0], pair[1]);
        if begin < prev_end {
            return Err(fmt(format!(
                "tensors `{}` and `{}` overlap (data_offsets {begin} < {prev_end})",
                out[a].name, out[b].name
            )));
        }
    }
    Ok(out)
}

/// The shard file names a `model.safetensors.index.json` lists, sorted and
/// deduplicated; each must be a plain file name inside the model folder.
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let names: Vec<String> = de
        .deserialize_map(ShardNames)
        .and_then(|n| de.end().map(|()| n))
        .map_err(|e| OffloadError::Json { path: path.to_path_buf(), message: e.to_string() })?
        .into_iter()
        .collect();
    if let Some(bad) = names.iter().find(|n| !model_file::is_plain_name(n)) {
        return Err(OffloadError::Format {
            path: path.to_path_buf(),
            message: format!("`weight_map` names \"{bad}\", which is not a file inside the model folder"),
        });
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A safetensors file of `header` (as JSON) followed by `data_len` zero bytes.
    fn file(header: serde_json::Value, data_len: usize) -> Vec<u8> {
        let h = serde_json::to_vec(&header).expect("json");
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&h);
        b.resize(b.len() + data_len, 0);
        b
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("m.safetensors"), bytes, 0).expect_err("must refuse").to_string()
    }

    #[test]
    fn refuses_overlapping_tensors() {
        let h = json!({
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]},
            "e": {"dtype": "F16", "shape": [0], "data_offsets": [8, 8]},
        });
        let e = err(&file(h, 16));
        assert!(e.contains("`a` and `b` overlap"), "{e}");
        let ok = json!({
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]},
            "e": {"dtype": "F16", "shape": [0], "data_offsets": [8, 8]},
            "__metadata__": {"format": "pt"},
        });
        let t = parse_header(Path::new("m"), &file(ok, 16), 3).expect("adjacent ranges");
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|t| t.file == 3));
    }

    #[test]
    fn refuses_sizes_that_overflow_or_disagree() {
        // numel fits a usize but numel × 4 does not.
        let big = usize::MAX / 2;
        let h = json!({"w": {"dtype": "F32", "shape": [big], "data_offsets": [0, 8]}});
        assert!(err(&file(h, 8)).contains("overflows"));
        let h = json!({"w": {"dtype": "F32", "shape": [3], "data_offsets": [8, 4]}});
        assert!(err(&file(h, 8)).contains("hold 0 bytes"));
        // The fuzzer's input against the unchecked `numel * size` (2^62 - 1 × 4
        // elements fit a usize, their bytes do not): fuzz/corpus/safetensors/regress-size-overflow.
        let h = json!({"w": {"data_offsets": [0, 0], "dtype": "F32", "shape": [4611686018427387903u64, 4]}});
        assert!(err(&file(h, 0)).contains("overflows"));
        // A header length of 2^64 - 1.
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(err(&b).contains("exceeds the file size"));
    }

    #[test]
    fn index_names_stay_in_the_folder() {
        let p = Path::new("model.safetensors.index.json");
        for bad in ["../../../../etc/passwd", "/etc/passwd", "a/../../b", ""] {
            let idx = json!({"weight_map": {"x": "ok.safetensors", "y": bad}}).to_string();
            let e = parse_index(p, idx.as_bytes()).expect_err("must refuse").to_string();
            assert!(e.contains("not a file inside the model folder"), "{bad}: {e}");
        }
        let idx = br#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#;
        assert_eq!(parse_index(p, idx).expect("index"), ["a.safetensors", "b.safetensors"]);
    }

    #[test]
    fn bounds_the_tensor_count_and_refuses_repeated_names() {
        // One past the limit of empty tensors, written as a real bomb would be.
        let mut h = String::from("{");
        for i in 0..=MAX_TENSORS_PER_FILE {
            h.push_str(&format!("\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}},"));
        }
        h.pop();
        h.push('}');
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        assert!(err(&b).contains(&format!("more than {MAX_TENSORS_PER_FILE} tensors")));
        let twice = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let mut b = (twice.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(twice);
        b.resize(b.len() + 8, 0);
        assert!(err(&b).contains("`w` is declared twice"));
        // A header longer than the limit is refused before it is parsed.
        let mut b = ((MAX_HEADER_BYTES + 1) as u64).to_le_bytes().to_vec();
        b.resize(8 + MAX_HEADER_BYTES + 1, b' ');
        assert!(err(&b).contains("-byte limit"));
        // Trailing bytes after the object are not a header.
        let h = json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).to_string() + "x";
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.resize(b.len() + 4, 0);
        assert!(err(&b).contains("invalid safetensors header"));
    }

    #[test]
    fn an_index_without_a_weight_map_is_refused() {
        let p = Path::new("model.safetensors.index.json");
        let e = parse_index(p, br#"{"metadata": {"total_size": 1}}"#).expect_err("no map").to_string();
        assert!(e.contains("weight_map"), "{e}");
        let names =
            parse_index(p, br#"{"metadata": {"a": [1, {"b": 2}]}, "weight_map": {"x": "a.safetensors"}}"#);
        assert_eq!(names.expect("extra fields skipped"), ["a.safetensors"]);
    }
}
