//! Rendering a chat template in a child process with bounded memory and CPU.
//!
//! A template is a program from the model folder. Its fuel limit bounds the
//! instructions it runs, not the memory they take: `{% set s = s ~ s %}` forty
//! times asks for 2^40 bytes in forty instructions, and one filter call can ask
//! for gigabytes at once. No allocator can refuse that and let the caller go on,
//! so the binary renders in a child of itself (`zeroshard` started with
//! [`CHILD_ARG`]) whose address space and CPU time are capped by `setrlimit`: a
//! template that outgrows them ends the child, not the server, and the request
//! gets one line saying so. The child stays up between renders (one per
//! template, renders one at a time) and is started again after it ended.
//!
//! Wire: the parent writes one JSON line [`Setup`] when it starts the child,
//! then one JSON line of messages per render; the child answers each with one
//! JSON line [`Reply`].
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{ChatError, ChatMessage, ChatTemplate, OUTPUT_LIMIT_BYTES};

/// The first argument that makes the binary a renderer ([`serve`]).
pub const CHILD_ARG: &str = "__render-chat-template";
/// The renderer's address-space limit: the binary itself maps ~24 MB, the rest
/// is the template's (a real template over a 2 MiB conversation needs ~20 MB).
pub const MEMORY_LIMIT_BYTES: u64 = 96 << 20;
/// The renderer's CPU limit per child (the fuel limit ends a runaway template
/// within ~5 s).
pub const CPU_LIMIT_SECONDS: u64 = 30;

#[derive(Serialize, Deserialize)]
struct Setup {
    source: PathBuf,
    template: String,
    tokens: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Text(String),
    Error(String),
}

/// Renders through children of `program`.
pub(super) struct Renderer {
    program: PathBuf,
    setup: String,
    child: Mutex<Option<Running>>,
}

struct Running {
    process: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Renderer {
    pub(super) fn new(program: PathBuf, source: &Path, template: &str, tokens: &[(&str, String)]) -> Self {
        let setup = Setup {
            source: source.to_path_buf(),
            template: template.to_string(),
            tokens: tokens.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        };
        let setup = serde_json::to_string(&setup).expect("the setup serializes");
        Self { program, setup, child: Mutex::new(None) }
    }

    pub(super) fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let mut running = match slot.take() {
            Some(r) => r,
            None => self.start()?,
        };
        match exchange(&mut running, messages) {
            Ok(Reply::Text(text)) => {
                *slot = Some(running);
                Ok(text)
            }
            Ok(Reply::Error(message)) => {
                *slot = Some(running);
                Err(ChatError::Render(message))
            }
            Err(e) => Err(ChatError::Render(ended(running, &e))),
        }
    }

    fn start(&self) -> Result<Running, ChatError> {
        let fail = |e: std::io::Error| {
            ChatError::Render(format!("cannot start the template renderer {}: {e}", self.program.display()))
        };
        let mut cmd = Command::new(&self.program);
        cmd.arg(CHILD_ARG).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (setrlimit, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = |resource, value: u64| {
                    let l = libc::rlimit { rlim_cur: value, rlim_max: value };
                    if libc::setrlimit(resource, &l) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                limit(libc::RLIMIT_AS, MEMORY_LIMIT_BYTES)?;
                limit(libc::RLIMIT_CPU, CPU_LIMIT_SECONDS)?;
                limit(libc::RLIMIT_CORE, 0)?;
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut process = cmd.spawn().map_err(fail)?;
        let mut stdin = process.stdin.take().expect("piped");
        let stdout = BufReader::new(process.stdout.take().expect("piped"));
        writeln!(stdin, "{}", self.setup).map_err(fail)?;
        Ok(Running { process, stdin, stdout })
    }
}

/// One request and its reply; an error means the child is gone or garbled.
fn exchange(running: &mut Running, messages: &[ChatMessage]) -> std::io::Result<Reply> {
    let line = serde_json::to_string(messages).map_err(std::io::Error::other)?;
    writeln!(running.stdin, "{line}")?;
    running.stdin.flush()?;
    // JSON escaping at most sextuples the text (`\u00XX`).
    let cap = 6 * OUTPUT_LIMIT_BYTES as u64 + 1024;
    let mut reply = String::new();
    (&mut running.stdout).take(cap).read_line(&mut reply)?;
    if !reply.ends_with('\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the renderer ended"));
    }
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

/// Why the child `running` stopped answering, ending it.
fn ended(mut running: Running, e: &std::io::Error) -> String {
    let _ = running.process.kill();
    let status = running.process.wait();
    match status.as_ref().ok().and_then(|s| s.signal()) {
        Some(libc::SIGXCPU) => format!("stopped after {CPU_LIMIT_SECONDS} s of CPU (the renderer's limit)"),
        // An allocation refused by the address-space limit aborts; a stack
        // that cannot grow faults.
        Some(libc::SIGABRT | libc::SIGSEGV) => format!(
            "stopped: it needed more than {} MiB of memory (the renderer's limit)",
            MEMORY_LIMIT_BYTES >> 20
        ),
        _ => match status {
            Ok(s) => format!("the renderer ended ({s}): {e}"),
            Err(w) => format!("the renderer failed: {e} ({w})"),
        },
    }
}

/// The child's side: reads the setup, then renders each line of messages
/// until its input ends. Returns the process's exit code.
pub fn serve() -> i32 {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut line = String::new();
    if input.read_line(&mut line).unwrap_or(0) == 0 {
        return 2;
    }
    let Ok(setup) = serde_json::from_str::<Setup>(&line) else { return 2 };
    let tokens: Vec<(&'static str, String)> = setup
        .tokens
        .into_iter()
        .filter_map(|(k, v)| super::SPECIAL_TOKENS.iter().find(|t| **t == k).map(|t| (*t, v)))
        .collect();
    let template = match ChatTemplate::in_process(setup.source, setup.template, tokens) {
        Ok(t) => t,
        Err(_) => return 2,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => return 0,
            Ok(_) => {}
        }
        let reply = match serde_json::from_str::<Vec<ChatMessage>>(&line) {
            Ok(messages) => match template.render_here(&messages) {
                Ok(text) => Reply::Text(text),
                Err(ChatError::Render(message)) => Reply::Error(message),
                Err(e) => Reply::Error(e.to_string()),
            },
            Err(e) => Reply::Error(format!("bad request to the renderer: {e}")),
        };
        let Ok(reply) = serde_json::to_string(&reply) else { return 2 };
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            return 0;
        }
    }
}
