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
    /// A file holding a bare NKey seed (as `gpufleet auth` writes them).
    pub nats_nkey: Option<std::path::PathBuf>,
    /// A client certificate and its key (PEM), for mutual TLS.
    pub nats_tls_cert: Option<std::path::PathBuf>,
    pub nats_tls_key: Option<std::path::PathBuf>,
    /// The CA (PEM) the server's certificate must chain to.
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// The user this command line acts as, on a fleet with roles: its
    /// requests go to `gpufleet.api.<user>.…` and its replies to its own
    /// inbox, as its NATS permissions allow. Unset: the subjects without a
    /// user (a fleet without roles).
    pub user: Option<gpufleet_schema::UserId>,
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
            nats_nkey: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_ca: None,
            user: None,
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
            nkey: self.nats_nkey.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            inbox_prefix: self
                .user
                .as_ref()
                .map(|u| gpufleet_schema::roles::inbox_prefix(u.as_str())),
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
