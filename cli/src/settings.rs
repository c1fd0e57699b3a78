//! The command line's own settings: defaults < `--config` file <
//! `GPUFLEET_*` environment < flags, like every gpufleet program.

use std::path::Path;

use gpufleet_natsutil::telemetry::LogFormat;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CliConfig {
    /// One URL or several, comma-separated.
    pub nats_url: String,
    /// A NATS credentials file (JWT and NKey seed), for secured servers.
    pub nats_creds: Option<std::path::PathBuf>,
    /// A NATS token, for servers that use one (prefer the environment
    /// variable `GPUFLEET_NATS_TOKEN` to a file).
    pub nats_token: Option<String>,
    /// How long to keep trying to reach NATS before giving up.
    pub connect_timeout: gpufleet_schema::Dur,
    /// How long one API request may wait for its answer.
    pub request_timeout: gpufleet_schema::Dur,
    /// How long a submit keeps trying while no coordinator answers (one
    /// taking over, say); it retries under the same job id, so a retry of
    /// a submit that was accepted returns the same job.
    pub submit_patience: gpufleet_schema::Dur,
    /// `text` or `json` for the warnings it logs on stderr.
    pub log_format: LogFormat,
}

impl Default for CliConfig {
    fn default() -> Self {
        CliConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds: None,
            nats_token: None,
            connect_timeout: gpufleet_schema::Dur::secs(5),
            request_timeout: gpufleet_schema::Dur::secs(10),
            submit_patience: gpufleet_schema::Dur::secs(60),
            log_format: LogFormat::Text,
        }
    }
}

impl CliConfig {
    pub fn auth(&self) -> gpufleet_natsutil::Auth {
        gpufleet_natsutil::Auth {
            creds: self.nats_creds.clone(),
            token: self.nats_token.clone(),
        }
    }
}

pub fn load(
    file: Option<&Path>,
    nats_url: Option<String>,
    nats_creds: Option<std::path::PathBuf>,
    log_format: Option<LogFormat>,
) -> anyhow::Result<CliConfig> {
    Ok(gpufleet_natsutil::settings::load(
        &CliConfig::default(),
        file,
        vec![
            ("nats_url", nats_url.map(Into::into)),
            (
                "nats_creds",
                nats_creds.map(|p| p.display().to_string().into()),
            ),
            ("log_format", log_format.map(|f| f.to_string().into())),
        ],
    )?)
}
