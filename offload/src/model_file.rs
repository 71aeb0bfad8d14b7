//! Opening the files of a model folder without trusting the folder.
//!
//! Every file zeroshard reads from a model folder (`config.json`,
//! `generation_config.json`, `tokenizer.json`, the safetensors index and its
//! shards) goes through [`open`] or [`read`]:
//! - the name is a plain relative path (no `..`, no root: an index's
//!   `weight_map` cannot point at `/etc/passwd`);
//! - the file, after following symlinks, is a regular file (a FIFO would block
//!   the reader forever, a device has no end) — checked before opening, and
//!   again on the opened handle, which is opened non-blocking so that a FIFO
//!   swapped in between cannot block either;
//! - it resolves inside the model folder, or inside the `blobs/` folder of a
//!   Hugging Face hub cache whose `snapshots/<rev>/` the model folder is (the hub
//!   stores every file of a snapshot as a symlink to `../../blobs/<hash>`);
//! - [`read`] refuses files larger than their limit ([`limit_bytes`]) before
//!   allocating for them.
//!
//! ```no_run
//! # fn main() -> zeroshard_offload::Result<()> {
//! let dir = std::path::Path::new("models/stories260K");
//! let bytes = zeroshard_offload::model_file::read(dir, "config.json")?;
//! # Ok(()) }
//! ```
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{io_err, OffloadError, Result};

/// The largest `config.json` / `generation_config.json`: real ones are 1–60 kB
/// (a classifier's `id2label` of thousands of labels stays in the hundreds of kB).
pub const CONFIG_LIMIT_BYTES: u64 = 1 << 20;
/// The largest `tokenizer.json`: the largest real vocabularies (256k tokens with
/// their merges) are ~35 MB; parsing costs ~8× the file.
pub const TOKENIZER_LIMIT_BYTES: u64 = 64 << 20;
/// The largest `tokenizer_config.json`: real ones are 1–200 kB (thousands of
/// added tokens and a chat template); it is parsed for a few fields only.
pub const TOKENIZER_CONFIG_LIMIT_BYTES: u64 = 4 << 20;
/// The largest `chat_template.jinja`: real templates are 1–20 kB.
pub const TEMPLATE_LIMIT_BYTES: u64 = 1 << 20;
/// The largest `model.safetensors.index.json`: ~90 bytes per tensor, so the
/// largest real checkpoints (~92k tensors) need ~9 MB; only the distinct shard
/// names are kept while parsing.
pub const INDEX_LIMIT_BYTES: u64 = 32 << 20;

/// How many bytes [`read`] accepts for the model-folder file `name` (one of
/// the limits above; another name gets the config limit).
pub fn limit_bytes(name: &str) -> u64 {
    match Path::new(name).file_name().and_then(|n| n.to_str()).unwrap_or(name) {
        "tokenizer.json" => TOKENIZER_LIMIT_BYTES,
        "tokenizer_config.json" => TOKENIZER_CONFIG_LIMIT_BYTES,
        "chat_template.jinja" => TEMPLATE_LIMIT_BYTES,
        "model.safetensors.index.json" => INDEX_LIMIT_BYTES,
        _ => CONFIG_LIMIT_BYTES,
    }
}

/// Does `dir/name` exist at all (a dangling symlink or a FIFO counts: they are
/// refused by [`open`], not taken for an absent file)?
pub fn exists(dir: &Path, name: &str) -> bool {
    std::fs::symlink_metadata(dir.join(name)).is_ok()
}

/// Is `name` a relative path that stays below its folder (no `..`, no root)?
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Opens `dir/name` for reading after the checks in the module doc; returns the
/// path (as joined, for messages), the file and its size in bytes.
pub fn open(dir: &Path, name: &str) -> Result<(PathBuf, File, u64)> {
    let path = dir.join(name);
    let refuse = |message: String| OffloadError::Format { path: path.clone(), message };
    if !is_plain_name(name) {
        return Err(refuse(format!("\"{name}\" is not a file name inside the model folder")));
    }
    let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
    if !meta.is_file() {
        return Err(refuse(format!("is {}, not a regular file", kind(&meta))));
    }
    let real = path.canonicalize().map_err(io_err(&path))?;
    let root = dir.canonicalize().map_err(io_err(dir))?;
    if !real.starts_with(&root) && !hub_blobs(&root).is_some_and(|blobs| real.starts_with(blobs)) {
        return Err(refuse(format!("resolves to {}, outside the model folder", real.display())));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(io_err(&path))?;
    let meta = file.metadata().map_err(io_err(&path))?;
    if !meta.is_file() {
        return Err(refuse(format!("is {}, not a regular file", kind(&meta))));
    }
    Ok((path, file, meta.len()))
}

/// The bytes of `dir/name`, checked as by [`open`], refused when larger than
/// its [`limit_bytes`].
pub fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    read_limited(dir, name, limit_bytes(name))
}

/// [`read`] with the limit given (a file whose name does not say what it is).
pub fn read_limited(dir: &Path, name: &str, limit_bytes: u64) -> Result<Vec<u8>> {
    let (path, file, len) = open(dir, name)?;
    if len > limit_bytes {
        return Err(OffloadError::Format {
            path,
            message: format!("is {len} bytes, more than the {limit_bytes} bytes a model folder's file of this kind may have"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // A file that grows while read is cut at the limit, not followed.
    file.take(limit_bytes + 1).read_to_end(&mut bytes).map_err(io_err(&path))?;
    if bytes.len() as u64 > limit_bytes {
        return Err(OffloadError::Format {
            path,
            message: format!("grew past the {limit_bytes} bytes allowed for this file while read"),
        });
    }
    Ok(bytes)
}

/// `…/blobs` when `root` is `…/snapshots/<rev>` of a Hugging Face hub cache.
fn hub_blobs(root: &Path) -> Option<PathBuf> {
    let snapshots = root.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    Some(snapshots.parent()?.join("blobs"))
}

fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a plain file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn err(dir: &Path, name: &str) -> String {
        open(dir, name).map(|_| ()).expect_err("must refuse").to_string()
    }

    #[test]
    fn refuses_names_that_leave_the_folder() {
        let dir = tempfile::tempdir().expect("tmp");
        for name in ["../../../../etc/passwd", "/etc/passwd", "a/../../x", ""] {
            let e = err(dir.path(), name);
            assert!(e.contains("not a file name inside the model folder"), "{name}: {e}");
        }
    }

    #[test]
    fn refuses_symlinks_that_escape_and_non_regular_files() {
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("secret"), b"x").expect("write");
        let dir = tempfile::tempdir().expect("tmp");
        symlink(outside.path().join("secret"), dir.path().join("config.json")).expect("symlink");
        assert!(err(dir.path(), "config.json").contains("outside the model folder"));
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert!(err(dir.path(), "sub").contains("a directory"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("cstr");
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(err(dir.path(), "fifo").contains("a FIFO"));
        assert!(exists(dir.path(), "fifo") && !exists(dir.path(), "none"));
        // Inside the folder, through a symlink: fine.
        std::fs::write(dir.path().join("real.json"), b"{}").expect("write");
        symlink("real.json", dir.path().join("link.json")).expect("symlink");
        assert_eq!(read_limited(dir.path(), "link.json", 16).expect("read"), b"{}");
        let e = read_limited(dir.path(), "real.json", 1).expect_err("too big").to_string();
        assert!(e.contains("2 bytes, more than the 1 bytes"), "{e}");
    }

    #[test]
    fn follows_hub_cache_symlinks_into_blobs() {
        let cache = tempfile::tempdir().expect("tmp");
        let blobs = cache.path().join("models--x--y/blobs");
        let snap = cache.path().join("models--x--y/snapshots/abc");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        std::fs::create_dir_all(&snap).expect("mkdir");
        std::fs::write(blobs.join("f00d"), b"{}").expect("write");
        symlink("../../blobs/f00d", snap.join("config.json")).expect("symlink");
        assert_eq!(read_limited(&snap, "config.json", 16).expect("hub layout"), b"{}");
    }
}
