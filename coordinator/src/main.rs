use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use gpufleet_coordinator::CoordinatorConfig;
use gpufleet_natsutil::settings;
use gpufleet_natsutil::telemetry::LogFormat;

/// gpufleet coordinator: accepts jobs and places their tasks on workers.
///
/// Settings come from defaults, then the TOML file, then GPUFLEET_*
/// environment variables, then these flags.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// NATS server URL(s), comma-separated [env: GPUFLEET_NATS_URL]
    #[arg(long)]
    nats_url: Option<String>,
    /// NATS credentials file (JWT + NKey seed) [env: GPUFLEET_NATS_CREDS]
    #[arg(long)]
    nats_creds: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long, env = "GPUFLEET_CONFIG")]
    config: Option<PathBuf>,
    /// How long a reservation waits for its worker's claim, e.g. "30s"
    #[arg(long)]
    reservation_ttl: Option<String>,
    /// How long a running lease lives between renewals, e.g. "30s"
    #[arg(long)]
    lease_ttl: Option<String>,
    /// JetStream replicas for the stores it creates (3 on a cluster)
    #[arg(long)]
    replicas: Option<u32>,
    /// Log lines as `text` or `json` [env: GPUFLEET_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics here, or `off` [env: GPUFLEET_METRICS_ADDR] [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR|off")]
    metrics_addr: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg: CoordinatorConfig = settings::load(
        &CoordinatorConfig::default(),
        args.config.as_deref(),
        vec![
            ("nats_url", args.nats_url.map(Into::into)),
            (
                "nats_creds",
                args.nats_creds.map(|p| p.display().to_string().into()),
            ),
            ("reservation_ttl", args.reservation_ttl.map(Into::into)),
            ("lease_ttl", args.lease_ttl.map(Into::into)),
            ("replicas", args.replicas.map(|r| (r as u64).into())),
            ("log_format", args.log_format.map(|f| f.to_string().into())),
            ("metrics_addr", args.metrics_addr.map(Into::into)),
        ],
    )?;
    gpufleet_natsutil::telemetry::init(cfg.log_format);
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async {
        gpufleet_coordinator::run(cfg, gpufleet_natsutil::telemetry::shutdown_signal())
            .await
            .context("coordinator failed")
    })
}
