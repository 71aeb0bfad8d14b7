//! Safetensors checkpoints (single file or sharded with an index).
//!
//! [`Checkpoint::open`] opens every file and validates every header
//! ([`header`]); [`Checkpoint::read_f16_into`] is the one primitive every load
//! goes through (the local engine, a worker's slices, the coordinator's digest
//! pass and its shard service), and refuses NaN and infinite weights there.
//!
//! Files are read with `pread`, never mapped: a checkpoint rewritten in place
//! under a running cluster (`cp new.safetensors model.safetensors` truncates
//! the file the coordinator serves from) must fail the reads that meet it with
//! an error naming the file, where a mapping would kill the process with
//! SIGBUS. Each file's identity (device, inode, size, modification time) is
//! taken at open and checked around every read, so bytes of a different
//! checkpoint are never mixed with the validated header's offsets.
mod header;

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use half::f16;

pub use self::header::{parse_header, parse_index, MAX_HEADER_BYTES, MAX_TENSORS_PER_FILE};
use crate::dtype::DType;
use crate::error::{io_err, OffloadError, Result};
use crate::model_file;

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

/// An opened checkpoint: every file open, every header validated.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<CheckpointFile>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// One file of a checkpoint, with what identified it when it was opened.
struct CheckpointFile {
    path: PathBuf,
    file: File,
    identity: Identity,
}

/// What tells a file apart from the same name rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

impl CheckpointFile {
    /// Refuses to go on when the file is no longer what was opened: the open
    /// handle's size or modification time changed (rewritten in place), or the
    /// name now leads to another file (replaced).
    fn check(&self) -> Result<()> {
        let changed = |now: String| OffloadError::Changed { path: self.path.clone(), what: now };
        let now = Identity::of(&self.file.metadata().map_err(io_err(&self.path))?);
        if now != self.identity {
            return Err(changed(describe_change(&self.identity, &now)));
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) if Identity::of(&meta) == self.identity => Ok(()),
            Ok(meta) => Err(changed(format!(
                "it was replaced ({})",
                describe_change(&self.identity, &Identity::of(&meta))
            ))),
            Err(e) => Err(changed(format!("it is gone ({e})"))),
        }
    }

    /// `buf.len()` bytes at `offset`; a file shorter than at open is a change.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => OffloadError::Changed {
                path: self.path.clone(),
                what: format!(
                    "it ends before byte {} of the {} it had when opened",
                    offset + buf.len() as u64,
                    self.identity.len
                ),
            },
            _ => OffloadError::Io { path: self.path.clone(), source: e },
        })
    }
}

fn describe_change(was: &Identity, now: &Identity) -> String {
    if was.dev != now.dev || was.ino != now.ino {
        "another file now has its name".into()
    } else if was.len != now.len {
        format!("its size went from {} to {} bytes", was.len, now.len)
    } else {
        "it was modified".into()
    }
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

/// GPT-2 and BLOOM checkpoints saved from the base model (`GPT2Model`,
/// `BloomModel`: `openai-community/gpt2`, `bigscience/bloom-560m` on the Hub)
/// name their tensors `h.0.…`, `wte.weight`, `word_embeddings.weight` where
/// the language-model class has `transformer.h.0.…`; transformers adds the
/// base model's prefix when it loads them, and so does this. A checkpoint
/// with any `transformer.` name, or without the base layers' `h.0.`, is left
/// as it is.
fn with_base_prefix(tensors: BTreeMap<String, TensorInfo>) -> BTreeMap<String, TensorInfo> {
    const PREFIX: &str = "transformer.";
    let base =
        tensors.keys().any(|k| k.starts_with("h.0.")) && !tensors.keys().any(|k| k.starts_with(PREFIX));
    if !base {
        return tensors;
    }
    tensors
        .into_values()
        .map(|mut t| {
            if !t.name.starts_with("lm_head.") {
                t.name = format!("{PREFIX}{}", t.name);
            }
            (t.name.clone(), t)
        })
        .collect()
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed by
    /// `dir/model.safetensors.index.json`. Every file is opened through
    /// [`model_file::open`] (a regular file inside the model folder) and every
    /// header validated ([`parse_header`]).
    pub fn open(dir: &Path) -> Result<Self> {
        const SINGLE: &str = "model.safetensors";
        const INDEX: &str = "model.safetensors.index.json";
        let file_names: Vec<String> = if model_file::exists(dir, SINGLE) {
            vec![SINGLE.to_string()]
        } else if model_file::exists(dir, INDEX) {
            let bytes = model_file::read(dir, INDEX)?;
            parse_index(&dir.join(INDEX), &bytes)?
        } else {
            return Err(OffloadError::Io {
                path: dir.join(SINGLE),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json in the model folder",
                ),
            });
        };
        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = BTreeMap::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            let (path, file, len) = model_file::open(dir, name)?;
            let identity = Identity::of(&file.metadata().map_err(io_err(&path))?);
            let opened = CheckpointFile { path: path.clone(), file, identity };
            let mut prefix = vec![0u8; len.min(8) as usize];
            opened.read_at(&mut prefix, 0)?;
            let data_start = header::data_start(&path, &prefix, len)?;
            let mut json = vec![0u8; data_start - 8];
            opened.read_at(&mut json, 8)?;
            for info in header::parse_entries(&path, &json, data_start, len as usize, file_idx)? {
                if let Some(prev) = tensors.insert(info.name.clone(), info) {
                    return Err(OffloadError::Format {
                        path: path.clone(),
                        message: format!("tensor `{}` appears in more than one file", prev.name),
                    });
                }
            }
            files.push(opened);
        }
        Ok(Self { dir: dir.to_path_buf(), files, tensors: with_base_prefix(tensors) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether every file is still what was opened (see the module docs): an
    /// error names the first that changed.
    pub fn verify(&self) -> Result<()> {
        self.files.iter().try_for_each(CheckpointFile::check)
    }

    /// The checkpoint's files, in the order tensors index them.
    pub fn file_paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Each file's path, size and modification time (ns since the epoch) as
    /// it was opened: the bytes every read is checked against.
    pub fn file_stamps(&self) -> impl Iterator<Item = (&Path, u64, i128)> {
        self.files.iter().map(|f| (f.path.as_path(), f.identity.len, f.identity.mtime_ns))
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
                path: self.files[info.file].path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(info)
    }

    /// Reads elements `range` (flat, row-major) of tensor `name` into `out`,
    /// converted to f16. Only those bytes of the file are read; a file that
    /// changed since [`Self::open`] is an error naming it.
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
        let file = &self.files[info.file];
        file.check()?;
        let size = info.dtype.size_bytes();
        let start = (info.offset + range.start * size) as u64;
        // Read a chunk at a time, converted and scanned block by block while
        // each block is in cache; f16 is read straight into `out`.
        const BLOCK: usize = 16 << 10;
        const CHUNK: usize = 16 * BLOCK;
        let mut staging = Vec::new();
        for (c, o) in out.chunks_mut(CHUNK).enumerate() {
            let at = start + (c * CHUNK * size) as u64;
            let src: &[u8] = if info.dtype == DType::F16 {
                file.read_at(bytemuck::cast_slice_mut(o), at)?;
                bytemuck::cast_slice(o)
            } else {
                staging.resize(o.len() * size, 0);
                file.read_at(&mut staging, at)?;
                for (dst, src) in o.chunks_mut(BLOCK).zip(staging.chunks(BLOCK * size)) {
                    info.dtype.convert_to_f16(src, dst);
                }
                &staging
            };
            if let Some(i) = first_non_finite(o) {
                return Err(OffloadError::NonFinite {
                    path: file.path.clone(),
                    tensor: name.to_string(),
                    index: range.start + c * CHUNK + i,
                    value: info.dtype.describe(&src[i * size..(i + 1) * size]),
                });
            }
        }
        // A change during the reads may have mixed old and new bytes.
        file.check()
    }

    /// [`Self::read_f16_into`] into a new vector.
    pub fn read_f16(&self, name: &str, range: Range<usize>) -> Result<Vec<f16>> {
        let mut out = vec![f16::ZERO; range.end.saturating_sub(range.start)];
        self.read_f16_into(name, range, &mut out)?;
        Ok(out)
    }
}

/// The index of the first NaN or infinite value (exponent bits all ones). Each
/// block is reduced without branches (a max of the magnitude bits), so the scan
/// vectorises; only a block with a hit is searched again.
fn first_non_finite(values: &[f16]) -> Option<usize> {
    const EXPONENT: u16 = 0x7c00;
    const BLOCK: usize = 4096;
    let bits: &[u16] = bytemuck::cast_slice(values);
    bits.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
        // Largest magnitude bits of the block: at least 0x7c00 iff a NaN or Inf.
        let max = chunk.iter().fold(0u16, |acc, &x| acc.max(x & 0x7fff));
        (max >= EXPONENT)
            .then(|| b * BLOCK + chunk.iter().position(|&x| x & EXPONENT == EXPONENT).expect("a hit"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
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
    fn a_file_changed_after_open_fails_its_reads_naming_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("model.safetensors");
        let vals: Vec<f32> = (0..200_000).map(|i| i as f32 / 1000.0).collect();
        write_st(&p, &[("w", "F32", vec![200_000], f32_bytes(&vals)), ("h", "F16", vec![4], vec![0; 8])]);
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ckpt.read_f16("w", 0..10).expect("read")[3], f16::from_f32(0.003));
        // `cp other model.safetensors` truncates the same inode, then writes.
        let f = std::fs::OpenOptions::new().write(true).open(&p).expect("open for writing");
        f.set_len(100).expect("truncate");
        for (name, range) in [("w", 150_000..200_000), ("w", 0..10), ("h", 0..4)] {
            let e = ckpt.read_f16(name, range).expect_err("a shrunk file must fail, not SIGBUS").to_string();
            assert!(
                e.contains("model.safetensors changed while in use") && e.contains("size went from"),
                "{e}"
            );
        }
        // Written back to the same size: the modification time still tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_st(&p, &[("w", "F32", vec![200_000], f32_bytes(&vals)), ("h", "F16", vec![4], vec![0; 8])]);
        let e = ckpt.read_f16("w", 0..10).expect_err("rewritten").to_string();
        assert!(e.contains("it was modified"), "{e}");
        // Replaced by rename (the right way): the old handle still reads the old
        // bytes, but the name now leads elsewhere, so this checkpoint says so.
        let q = dir.path().join("new.safetensors");
        write_st(&q, &[("w", "F32", vec![200_000], f32_bytes(&vals)), ("h", "F16", vec![4], vec![0; 8])]);
        let fresh = Checkpoint::open(dir.path()).expect("reopen");
        std::fs::rename(&q, &p).expect("rename");
        let e = fresh.read_f16("w", 0..10).expect_err("replaced").to_string();
        assert!(e.contains("another file now has its name"), "{e}");
        // Opening again reads the new file.
        assert_eq!(Checkpoint::open(dir.path()).expect("open").read_f16("w", 0..10).expect("read").len(), 10);
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

    #[test]
    fn refuses_nan_and_inf_weights_naming_the_tensor() {
        let dir = tempfile::tempdir().expect("tmp");
        let f16s = |v: &[f16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bf16s =
            |v: &[f32]| v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
        let mut long = vec![f16::ONE; 10_000];
        long[9_000] = f16::NEG_INFINITY;
        write_st(
            &dir.path().join("model.safetensors"),
            &[
                ("h_nan", "F16", vec![3], f16s(&[f16::ONE, f16::NAN, f16::ONE])),
                ("h_inf", "F16", vec![10_000], f16s(&long)),
                ("s_nan", "F32", vec![2], f32_bytes(&[0.0, f32::NAN])),
                ("s_big", "F32", vec![2], f32_bytes(&[1e5, 0.0])),
                ("b_inf", "BF16", vec![2], bf16s(&[0.0, f32::INFINITY])),
                ("fine", "F32", vec![2], f32_bytes(&[65504.0, -1e-9])),
            ],
        );
        let ck = Checkpoint::open(dir.path()).expect("open");
        for (name, len, needle) in [
            ("h_nan", 3, "element 1 is NaN"),
            ("h_inf", 10_000, "element 9000 is -inf"),
            ("s_nan", 2, "element 1 is NaN"),
            ("s_big", 2, "element 0 is 1e5 in F32, beyond f16's range"),
            ("b_inf", 2, "element 1 is inf"),
        ] {
            let e = ck.read_f16(name, 0..len).expect_err("non-finite").to_string();
            assert!(e.contains(&format!("`{name}`")) && e.contains(needle), "{e}");
        }
        // A range that skips the bad element reads, and the index is the tensor's.
        assert!(ck.read_f16("h_inf", 0..9_000).is_ok());
        let e = ck.read_f16("h_inf", 8_999..9_001).expect_err("non-finite").to_string();
        assert!(e.contains("element 9000"), "{e}");
        assert!(ck.read_f16("fine", 0..2).is_ok());
    }

    #[test]
    fn non_finite_scan_finds_the_first_hit_in_any_block() {
        let mut v = vec![f16::from_f32(-3.5); 3 * 4096 + 5];
        assert_eq!(first_non_finite(&v), None);
        for at in [0, 4095, 4096, 3 * 4096 + 4] {
            v[at] = f16::NAN;
            assert_eq!(first_non_finite(&v), Some(at));
            v[at] = f16::MAX;
        }
    }

    /// `cargo test --release -p zeroshard-offload -- --ignored --nocapture non_finite_scan_cost`
    #[test]
    #[ignore = "a timing, not a check"]
    fn non_finite_scan_cost() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = 32 << 20;
        let vals: Vec<u8> =
            (0..n).flat_map(|i| f16::from_f32((i % 1000) as f32 * 1e-3).to_le_bytes()).collect();
        write_st(&dir.path().join("model.safetensors"), &[("w", "F16", vec![n], vals)]);
        let ck = Checkpoint::open(dir.path()).expect("open");
        let mut out = vec![f16::ZERO; n];
        ck.read_f16_into("w", 0..n, &mut out).expect("warm");
        let t = std::time::Instant::now();
        for _ in 0..5 {
            ck.read_f16_into("w", 0..n, &mut out).expect("read");
        }
        let read = t.elapsed().as_secs_f64() / 5.0;
        let t = std::time::Instant::now();
        for _ in 0..5 {
            assert_eq!(first_non_finite(std::hint::black_box(&out)), None);
        }
        let scan = t.elapsed().as_secs_f64() / 5.0;
        let in_cache = &out[..16 << 10];
        let t = std::time::Instant::now();
        for _ in 0..2000 {
            assert_eq!(first_non_finite(std::hint::black_box(in_cache)), None);
        }
        let hot = t.elapsed().as_secs_f64() / 2000.0;
        println!("a 32 KiB block in cache: {:.1} GB/s", (2 << 14) as f64 / hot / 1e9);
        println!(
            "64 MiB f16: read_f16_into (convert + scan) {:.1} ms; the scan alone, from memory {:.1} ms ({:.1} GB/s)",
            read * 1e3,
            scan * 1e3,
            (2 * n) as f64 / scan / 1e9
        );
    }
}
