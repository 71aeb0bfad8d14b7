//! Memory-mapped safetensors checkpoints (single file or sharded with an index).
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{io_err, OffloadError, Result};

/// Where one tensor lives: file, absolute byte offset, dtype and shape.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Row-major shape as stored.
    pub shape: Vec<usize>,
    /// Index into the checkpoint's files.
    pub file: usize,
    /// Absolute byte offset of the first element in that file.
    pub offset: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened checkpoint: every file mapped, every header validated.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed by
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if single.is_file() {
            vec!["model.safetensors".to_string()]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let raw: RawIndex = serde_json::from_str(&text)
                .map_err(|e| OffloadError::Json { path: index.clone(), message: e.to_string() })?;
            let mut names: Vec<String> = raw.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else {
            return Err(OffloadError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json in the model folder",
                ),
            });
        };
        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = BTreeMap::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the mapping is read-only and checkpoint files are not modified
            // while a worker serves them (the same contract as safetensors/candle).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            for info in parse_header(&path, &mmap, file_idx)? {
                if let Some(prev) = tensors.insert(info.name.clone(), info) {
                    return Err(OffloadError::Format {
                        path: path.clone(),
                        message: format!("tensor `{}` appears in more than one file", prev.name),
                    });
                }
            }
            files.push((path, mmap));
        }
        Ok(Self { dir: dir.to_path_buf(), files, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checkpoint's files, in the order tensors index them.
    pub fn file_paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The tensor's info, or an error naming it.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| OffloadError::MissingTensor { path: self.dir.clone(), tensor: name.to_string() })
    }

    /// Checks that `name` exists with exactly `expected` shape.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo> {
        let info = self.info(name)?;
        if info.shape != expected {
            return Err(OffloadError::Shape {
                path: self.files[info.file].0.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(info)
    }

    /// Reads elements `range` (flat, row-major) of tensor `name` into `out`,
    /// converted to f16. Only those bytes of the mapping are touched.
    pub fn read_f16_into(&self, name: &str, range: Range<usize>, out: &mut [f16]) -> Result<()> {
        let info = self.info(name)?;
        let len = info.numel();
        if range.start > range.end || range.end > len {
            return Err(OffloadError::Range {
                tensor: name.to_string(),
                start: range.start,
                end: range.end,
                len,
            });
        }
        assert_eq!(out.len(), range.len(), "output buffer must hold the requested range");
        let size = info.dtype.size_bytes();
        let start = info.offset + range.start * size;
        let map = &self.files[info.file].1;
        info.dtype.convert_to_f16(&map[start..start + range.len() * size], out);
        // The bytes now live, converted, in `out`: let the kernel drop the file
        // pages from this process, so loading 1/N of a model does not leave the
        // mapped 1/N resident on top of the copy (a worker's RSS stays ≈ its share).
        // SAFETY: the mapping is private and read-only and no reference into it
        // outlives this call; a later read of these pages faults them back in
        // from the unchanged file.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, range.len() * size)
        };
        Ok(())
    }

    /// [`Self::read_f16_into`] into a new vector.
    pub fn read_f16(&self, name: &str, range: Range<usize>) -> Result<Vec<f16>> {
        let mut out = vec![f16::ZERO; range.end.saturating_sub(range.start)];
        self.read_f16_into(name, range, &mut out)?;
        Ok(out)
    }
}

/// Parses and validates one safetensors header: `u64` little-endian header length,
/// the JSON header, then the data; every tensor must lie inside the data.
fn parse_header(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<TensorInfo>> {
    let fmt = |message: String| OffloadError::Format { path: path.to_path_buf(), message };
    if bytes.len() < 8 {
        return Err(fmt(format!("file is {} bytes, too short for a safetensors header", bytes.len())));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8usize.checked_add(header_len).filter(|end| *end <= bytes.len()).ok_or_else(|| {
        fmt(format!("header length {header_len} exceeds the file size {} (truncated file?)", bytes.len()))
    })?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| fmt(format!("invalid safetensors header JSON: {e}")))?;
    let data_len = bytes.len() - data_start;
    let mut out = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| fmt(format!("tensor `{name}`: malformed header entry: {e}")))?;
        let dtype = DType::from_safetensors(&raw.dtype).ok_or_else(|| OffloadError::UnsupportedDType {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype: raw.dtype.clone(),
        })?;
        let [begin, end] = raw.data_offsets;
        let numel = raw
            .shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| fmt(format!("tensor `{name}`: shape {:?} overflows", raw.shape)))?;
        if end < begin || end - begin != numel * dtype.size_bytes() {
            return Err(fmt(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] hold {} bytes, but shape {:?} of {} needs {}",
                end.saturating_sub(begin),
                raw.shape,
                raw.dtype,
                numel * dtype.size_bytes()
            )));
        }
        if end > data_len {
            return Err(fmt(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] go beyond the file's {data_len} data bytes (truncated file?)"
            )));
        }
        out.push(TensorInfo { name, dtype, shape: raw.shape, file, offset: data_start + begin });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a safetensors file from (name, dtype, shape, bytes) entries.
    fn write_st(path: &Path, entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in entries {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(bytes);
        }
        let h = serde_json::to_vec(&header).expect("json");
        let mut f = File::create(path).expect("create");
        f.write_all(&(h.len() as u64).to_le_bytes()).expect("write");
        f.write_all(&h).expect("write");
        f.write_all(&data).expect("write");
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_element_ranges() {
        let dir = tempfile::tempdir().expect("tmp");
        let vals: Vec<f32> = (0..24).map(|i| i as f32).collect();
        write_st(&dir.path().join("model.safetensors"), &[("w", "F32", vec![4, 6], f32_bytes(&vals))]);
        let ck = Checkpoint::open(dir.path()).expect("open");
        let part = ck.read_f16("w", 5..11).expect("read");
        assert_eq!(part, (5..11).map(|i| f16::from_f32(i as f32)).collect::<Vec<_>>());
        assert!(matches!(ck.read_f16("w", 20..25), Err(OffloadError::Range { .. })));
        assert!(ck.expect_shape("w", &[4, 6]).is_ok());
        let err = ck.expect_shape("w", &[6, 4]).expect_err("shape error").to_string();
        assert!(err.contains("`w`") && err.contains("[6, 4]"), "{err}");
        let err = ck.read_f16("nope", 0..1).expect_err("missing").to_string();
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn rejects_truncated_and_bad_headers() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("model.safetensors");
        write_st(&p, &[("w", "F32", vec![8], f32_bytes(&[1.0; 8]))]);
        let full = std::fs::read(&p).expect("read");
        std::fs::write(&p, &full[..full.len() - 4]).expect("truncate");
        let err = Checkpoint::open(dir.path()).expect_err("error").to_string();
        assert!(err.contains("beyond") && err.contains("`w`"), "{err}");

        std::fs::write(&p, &full[..20]).expect("truncate header");
        let err = Checkpoint::open(dir.path()).expect_err("error").to_string();
        assert!(err.contains("header length"), "{err}");

        write_st(&p, &[("q", "I8", vec![4], vec![0; 4])]);
        let err = Checkpoint::open(dir.path()).expect_err("error").to_string();
        assert!(err.contains("`q`") && err.contains("I8"), "{err}");

        write_st(&p, &[("w", "F32", vec![3], f32_bytes(&[1.0; 4]))]);
        let err = Checkpoint::open(dir.path()).expect_err("error").to_string();
        assert!(err.contains("needs 12"), "{err}");
    }

    #[test]
    fn missing_files_name_the_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = Checkpoint::open(dir.path()).expect_err("error").to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn sharded_checkpoints_follow_the_index() {
        let dir = tempfile::tempdir().expect("tmp");
        write_st(&dir.path().join("a.safetensors"), &[("x", "BF16", vec![2], vec![0x80, 0x3f, 0x00, 0x40])]);
        write_st(
            &dir.path().join("b.safetensors"),
            &[("y", "F16", vec![1], f16::from_f32(3.0).to_le_bytes().to_vec())],
        );
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
        )
        .expect("index");
        let ck = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ck.read_f16("x", 0..2).expect("x"), vec![f16::from_f32(1.0), f16::from_f32(2.0)]);
        assert_eq!(ck.read_f16("y", 0..1).expect("y"), vec![f16::from_f32(3.0)]);
    }
}
