//! Logging. The subscriber takes its sink, so tests can stay quiet or capture output.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,h2=warn,tower=warn,hyper=warn";

/// Installs a global subscriber writing to `sink`, filtered by `RUST_LOG` or else
/// `default_filter`; colours only when `ansi` (a terminal) and `NO_COLOR` is unset. Returns false
/// if a subscriber was already installed.
pub fn init<W>(sink: W, default_filter: &str, ansi: bool) -> bool
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_target(false)
        .with_ansi(ansi && std::env::var_os("NO_COLOR").is_none())
        .try_init()
        .is_ok()
}

/// An error and its causes on one line, `outer: inner: root`, for logs and startup messages.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
