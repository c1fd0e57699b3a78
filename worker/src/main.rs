use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use gpufleet_natsutil::settings;
use gpufleet_natsutil::telemetry::LogFormat;
use gpufleet_worker::config::parse_labels;
use gpufleet_worker::WorkerConfig;

/// gpufleet worker: offers this machine's CPUs, memory and GPUs to the
/// fleet and runs the tasks placed on it.
///
/// Settings come from defaults, then the TOML file, then GPUFLEET_*
/// environment variables, then these flags. SIGTERM drains: no new work,
/// running tasks get `drain_timeout` to finish, then the worker exits 0.
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
    /// Worker name, unique in the fleet (default: the host name) [env: GPUFLEET_NAME]
    #[arg(long)]
    name: Option<String>,
    /// Labels as k=v,k=v [env: GPUFLEET_LABELS]
    #[arg(long)]
    labels: Option<String>,
    /// Offer simulated GPUs instead of NVML's: COUNTxMEMORY[:MODEL], e.g. 2x24GiB:L4
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Directory for task working directories
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// CPUs to offer (default: those available to this process)
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to offer, e.g. 64GiB (default: the machine's total)
    #[arg(long)]
    memory: Option<String>,
    /// Address other workers reach this one at (gang rendezvous)
    #[arg(long)]
    addr: Option<String>,
    /// Heartbeat interval, e.g. 2s
    #[arg(long)]
    heartbeat: Option<String>,
    /// Advert lifetime without heartbeats, e.g. 10s
    #[arg(long)]
    advert_ttl: Option<String>,
    /// Log lines as `text` or `json` [env: GPUFLEET_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics here, or `off` [env: GPUFLEET_METRICS_ADDR] [default: 127.0.0.1:9465]
    #[arg(long, value_name = "ADDR|off")]
    metrics_addr: Option<String>,
}

fn main() -> anyhow::Result<()> {
    // Before anything else: this binary is also the worker's watchdog.
    gpufleet_worker::watchdog::serve_if_asked();
    let args = Args::parse();
    let labels = match args
        .labels
        .or_else(|| std::env::var("GPUFLEET_LABELS").ok())
    {
        Some(l) => Some(parse_labels(&l).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let mut cfg: WorkerConfig = settings::load(
        &WorkerConfig::default(),
        args.config.as_deref(),
        vec![
            ("nats_url", args.nats_url.map(Into::into)),
            (
                "nats_creds",
                args.nats_creds.map(|p| p.display().to_string().into()),
            ),
            ("name", args.name.map(Into::into)),
            ("simulate_gpus", args.simulate_gpus.map(Into::into)),
            (
                "work_dir",
                args.work_dir.map(|p| p.display().to_string().into()),
            ),
            ("cpus", args.cpus.map(Into::into)),
            ("memory", args.memory.map(Into::into)),
            ("addr", args.addr.map(Into::into)),
            ("heartbeat", args.heartbeat.map(Into::into)),
            ("advert_ttl", args.advert_ttl.map(Into::into)),
            ("log_format", args.log_format.map(|f| f.to_string().into())),
            ("metrics_addr", args.metrics_addr.map(Into::into)),
        ],
    )?;
    if let Some(labels) = labels {
        cfg.labels = labels;
    }
    gpufleet_natsutil::telemetry::init(cfg.log_format);
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async {
        gpufleet_worker::run(cfg, gpufleet_natsutil::telemetry::shutdown_signal())
            .await
            .context("worker failed")
    })
}
