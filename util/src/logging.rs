//! Log output of both binaries: human-readable lines or JSON on stderr.

use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): JSON lines with `json`, text
/// otherwise, coloured only on a terminal (a log file or the journal gets plain text).
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
