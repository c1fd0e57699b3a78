//! The command line's own settings: defaults < `--config` file <
//! `GPUFLEET_*` environment < flags, like every gpufleet program.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CliConfig {
    /// One URL or several, comma-separated.
    pub nats_url: String,
    /// How long to keep trying to reach NATS before giving up.
    pub connect_timeout: gpufleet_schema::Dur,
}

impl Default for CliConfig {
    fn default() -> Self {
        CliConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            connect_timeout: gpufleet_schema::Dur::secs(5),
        }
    }
}

pub fn load(file: Option<&Path>, nats_url: Option<String>) -> anyhow::Result<CliConfig> {
    Ok(gpufleet_natsutil::settings::load(
        &CliConfig::default(),
        file,
        vec![("nats_url", nats_url.map(Into::into))],
    )?)
}
