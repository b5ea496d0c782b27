//! Logging set-up. Levels come from `RUST_LOG` (default `info`).

use std::io::{self, BufWriter, IsTerminal as _};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber; call once, first thing in `main`, and
/// keep the returned guard until the end: dropping it writes out the lines
/// still queued.
///
/// Lines go to stderr from a thread of their own, which writes whatever has
/// queued up in one go. A busy server logs every change of usage, and one
/// write call per line on the threads that serve requests cost it a few
/// percent of its CPU. No line is dropped: when the queue is full, the
/// logging call waits.
pub fn init(format: LogFormat) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("usage-log")
        .finish(BufWriter::new(io::stderr()));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: escape codes in a file or a
    // log collector are noise, and styling every field of every span costs
    // CPU on each call.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}
