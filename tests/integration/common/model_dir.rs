//! Model folders to break in one way, and running the binary on them with a
//! deadline (a hostile folder must not hang it) and its peak memory measured.
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bin, model};

/// A copy of the regular files of fixture `name` in a temp dir.
pub(crate) fn copy_of(name: &str) -> tempfile::TempDir {
    let src = model(name);
    let dir = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(&src).expect("fixture dir").flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
    }
    dir
}

/// A copy of stories260K.
pub(crate) fn copy_model() -> tempfile::TempDir {
    copy_of("stories260K")
}

/// Splits a safetensors file into (header JSON, data).
pub(crate) fn read_st(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    (header, bytes[8 + n..].to_vec())
}

pub(crate) fn write_st(path: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) {
    let h = serde_json::to_vec(header).expect("json");
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).expect("write");
}

/// Sets `key` of the JSON file `dir/file` to `value`.
pub(crate) fn patch_json(dir: &Path, file: &str, key: &str, value: Value) {
    let path = dir.join(file);
    let mut v = super::read_json(&path);
    v[key] = value;
    std::fs::write(&path, serde_json::to_string(&v).expect("json")).expect("write");
}

/// Makes `path` a FIFO (after removing what is there).
pub(crate) fn make_fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("cstr");
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// How a run ended.
pub(crate) struct Finished {
    pub code: Option<i32>,
    pub stderr: String,
    /// Peak resident set of the process, in kB (`ru_maxrss` from wait4: an
    /// upper bound, as Linux starts it at this test process's resident set when
    /// it forks; tests that measure build their inputs in files, not in memory).
    pub max_rss_kb: i64,
}

/// Runs `cmd` to its end (killing it after `deadline`, which fails the test),
/// under an address-space limit of `max_vm_bytes` so a regression fails fast
/// instead of eating the machine; returns its exit code, stderr and peak RSS.
pub(crate) fn run_bounded(mut cmd: Command, deadline: Duration, max_vm_bytes: u64) -> Finished {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit(2) is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: max_vm_bytes, rlim_max: max_vm_bytes };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Reaped by wait4 below, which also reports its peak RSS.
    #[allow(clippy::zombie_processes)]
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut pipe = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    loop {
        // SAFETY: wait4(2) on our own child, with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if start.elapsed() > deadline {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} still running after {deadline:?} (hung on a hostile input?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Finished { code, stderr: reader.join().expect("reader"), max_rss_kb: usage.ru_maxrss }
}

/// Runs `zeroshard generate` on `dir` (≤ 60 s, ≤ 4 GiB of address space) and
/// checks for exit code 1 and one line `error: …` containing every needle.
pub(crate) fn expect_error(dir: &Path, extra: &[&str], needles: &[&str]) -> Finished {
    let mut args = vec!["generate", "--model", dir.to_str().expect("path"), "--max-new-tokens", "4"];
    if !extra.iter().any(|a| a.starts_with("--prompt") || *a == "--chat") {
        args.extend(["--prompt", "Once upon a time"]);
    }
    args.extend_from_slice(extra);
    let mut cmd = bin();
    cmd.args(&args);
    let done = run_bounded(cmd, Duration::from_secs(60), 4 << 30);
    expect_one_line(&done, needles);
    done
}

/// Exit code 1 and one line on stderr, starting `error: `, with every needle.
pub(crate) fn expect_one_line(done: &Finished, needles: &[&str]) {
    let err = &done.stderr;
    assert_eq!(done.code, Some(1), "exit code 1 expected, stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}
