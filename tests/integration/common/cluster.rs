//! A local cluster under test: `zeroshard up` as a child process, its endpoint
//! read from the `ready grpc://HOST:PORT` line, stopped (and checked to leave no
//! worker behind) on drop.
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::bin;

pub(crate) struct Cluster {
    child: Child,
    pub endpoint: String,
    /// The stdout lines after the ready line.
    after: Option<mpsc::Receiver<String>>,
}

impl Cluster {
    /// Starts `zeroshard up --listen 127.0.0.1:0 <args>` and waits (≤ 120 s) for
    /// its ready line.
    pub(crate) fn up(args: &[&str]) -> Self {
        Self::up_with(bin(), args)
    }

    /// [`Self::up`] from a prepared command (environment, e.g. fault injection).
    pub(crate) fn up_with(mut cmd: std::process::Command, args: &[&str]) -> Self {
        let mut child = cmd
            .arg("up")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn zeroshard up");
        let (endpoint, after) = match ready_lines(&mut child) {
            Some(r) => r,
            None => {
                let _ = child.kill();
                panic!("zeroshard up {args:?}: no ready line within 120 s");
            }
        };
        Self { child, endpoint, after: Some(after) }
    }

    /// The HTTP front's base URL, from the `http http://HOST:PORT` line that
    /// follows the ready line (`--http-listen`).
    pub(crate) fn http(&mut self) -> String {
        let lines = self.after.as_ref().expect("stdout lines");
        loop {
            let line = lines.recv_timeout(Duration::from_secs(10)).expect("an `http` line after `ready`");
            if let Some(url) = line.strip_prefix("http ") {
                return url.trim().to_string();
            }
        }
    }

    /// The `Authorization` header line with the HTTP front's key `up` made
    /// (the file `api-key` in the folder its `credentials` line names, read
    /// after [`Self::http`]).
    pub(crate) fn http_auth(&mut self) -> String {
        let lines = self.after.as_ref().expect("stdout lines");
        loop {
            let line =
                lines.recv_timeout(Duration::from_secs(10)).expect("a `credentials` line after `ready`");
            if let Some(rest) = line.strip_prefix("credentials ") {
                let dir = rest.split(" (").next().expect("a folder");
                let file = std::path::Path::new(dir).join("api-key");
                let mode = std::os::unix::fs::PermissionsExt::mode(
                    &std::fs::metadata(&file)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
                        .permissions(),
                );
                assert_eq!(mode & 0o077, 0, "{} is readable by others: {mode:o}", file.display());
                let key =
                    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                return format!("Authorization: Bearer {}", key.trim());
            }
        }
    }

    /// `up` that is expected to fail: returns (exit code, stderr).
    pub(crate) fn up_fails_with(mut cmd: std::process::Command, args: &[&str]) -> (Option<i32>, String) {
        let out = cmd
            .arg("up")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .output()
            .expect("spawn zeroshard up");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// No audit of this cluster failed (every sequence of the suite's
    /// clusters is audited: see [`bin`]); clusters whose `status` needs more
    /// than the endpoint (keys, certificates) are not asked.
    fn assert_no_failed_audit(&self) {
        let out = super::run(&["status", "--endpoint", &self.endpoint, "--json"]);
        let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return };
        assert_eq!(
            s["audits_failed_total"].as_u64(),
            Some(0),
            "an honest worker failed an output audit: {s}"
        );
    }

    /// SIGTERM, and wait for a clean exit.
    pub(crate) fn stop(mut self) -> std::process::ExitStatus {
        self.assert_no_failed_audit();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait up");
        std::mem::forget(self);
        status
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_no_failed_audit();
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The endpoint of the `ready grpc://HOST:PORT` line `child` prints on its piped
/// stdout, within 120 s.
pub(crate) fn ready_line(child: &mut Child) -> Option<String> {
    ready_lines(child).map(|(ep, _)| ep)
}

/// [`ready_line`], and the stdout lines after it.
pub(crate) fn ready_lines(child: &mut Child) -> Option<(String, mpsc::Receiver<String>)> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    let (after_tx, after) = mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if ready {
                let _ = after_tx.send(line);
            } else if let Some(ep) = line.strip_prefix("ready ") {
                let _ = tx.send(ep.trim().to_string());
                ready = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120)).ok().map(|ep| (ep, after))
}

/// The pid among `pids` that listens on TCP `port` (the socket's inode in
/// `/proc/net/tcp{,6}`, then the process holding that inode).
pub(crate) fn listener_among(pids: &[u32], port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|row| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = row.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            (local_port == port && f.get(3) == Some(&"0A")).then(|| f.get(9).map(|s| s.to_string()))?
        })
    })?;
    let want = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == want))
        })
    })
}

/// Pids of live processes whose parent is `parent`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // pid (comm) state ppid ...
                if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    if fields.len() > 1 && fields[1].parse::<u32>().ok() == Some(parent) && fields[0] != "Z" {
                        out.push(pid);
                    }
                }
            }
        }
    }
    out
}
