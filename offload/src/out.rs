//! Lines for a person (stdout and stderr) that can never kill the process.
//!
//! `println!` and `eprintln!` panic when the write fails, and a write to a
//! pipe whose reader went away (`up … 2>&1 | head`, a log shipper that
//! restarts) fails with EPIPE: the panic aborts the process (`panic =
//! "abort"`), and `up` takes its workers with it. [`outln!`](crate::outln) and
//! [`errln!`](crate::errln) write the same lines but drop a line that cannot
//! be written, counting it ([`dropped`]). Tracing's own writer already
//! ignores write errors.
//!
//! ```ignore
//! zeroshard_offload::outln!("ready {endpoint}");
//! zeroshard_offload::errln!("warning: {why}");
//! ```
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines that could not be written (their reader had gone).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Writes one line to stdout (`err`: stderr); a failed write is counted, not fatal.
pub fn line(err: bool, args: std::fmt::Arguments<'_>) {
    let written =
        if err { put(&mut std::io::stderr().lock(), args) } else { put(&mut std::io::stdout().lock(), args) };
    if !written {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes and flushes one line; whether it went out.
fn put(w: &mut impl Write, args: std::fmt::Arguments<'_>) -> bool {
    writeln!(w, "{args}").and_then(|()| w.flush()).is_ok()
}

/// `println!` that never panics (see the module docs).
#[macro_export]
macro_rules! outln {
    () => { $crate::out::line(false, format_args!("")) };
    ($($arg:tt)*) => { $crate::out::line(false, format_args!($($arg)*)) };
}

/// `eprintln!` that never panics (see the module docs).
#[macro_export]
macro_rules! errln {
    () => { $crate::out::line(true, format_args!("")) };
    ($($arg:tt)*) => { $crate::out::line(true, format_args!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind, Write};

    /// A pipe whose reader went away.
    struct Gone;

    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(Error::from(ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(Error::from(ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_line_nobody_reads_is_dropped_not_a_panic() {
        assert!(!super::put(&mut Gone, format_args!("nobody reads {}", "this")));
        let mut kept = Vec::new();
        assert!(super::put(&mut kept, format_args!("ready {}", 1)));
        assert_eq!(kept, b"ready 1\n");
    }
}
