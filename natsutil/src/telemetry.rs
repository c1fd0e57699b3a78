//! Logging set-up and shutdown signals, the same for every binary.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr: the `log_format` setting
/// (`--log-format`, `GPUFLEET_LOG_FORMAT`) of every program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LogFormat {
    /// For people: one line per event, colours on a terminal.
    #[default]
    Text,
    /// For log collectors: one JSON object per line, with `timestamp`,
    /// `level`, `target`, `message` and each field of the event (`job_id`,
    /// `task_id`, `attempt`, ...) at the top level.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log_format: {0:?} is neither \"text\" nor \"json\"")]
pub struct BadLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = BadLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(BadLogFormat(s.to_string())),
        }
    }
}

impl TryFrom<String> for LogFormat {
    type Error = BadLogFormat;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LogFormat> for String {
    fn from(f: LogFormat) -> String {
        f.to_string()
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Logs to stderr in `format`; `RUST_LOG` picks what (default `info`).
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// [`init`] with another default level, for programs whose stderr is
/// mostly for people (the command line logs only warnings by default).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only where someone reads them, not in log files.
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => fmt.json().flatten_event(true).try_init(),
    };
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_bad_ones_name_the_setting() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!(" Text ".parse(), Ok(LogFormat::Text));
        let err = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(err.contains("log_format") && err.contains("yaml"), "{err}");
        let v: LogFormat = serde_json::from_str("\"JSON\"").unwrap();
        assert_eq!(v, LogFormat::Json);
        let err = serde_json::from_str::<LogFormat>("\"xml\"").unwrap_err();
        assert!(err.to_string().contains("log_format"), "{err}");
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
