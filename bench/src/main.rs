//! gpufleet's benchmarks. Each run starts its own nats-server and prints
//! one table; see the README's Benchmarks section for the commands and the
//! figures from our machines.

mod control;
mod fairshare;
mod floor;
mod history;
mod scale;
mod twophase;

use std::time::Duration;

use clap::{Parser, Subcommand};
use gpufleet_natsutil::telemetry::LogFormat;
use gpufleet_testkit::NatsServer;

#[derive(Parser)]
#[command(about = "gpufleet benchmarks")]
struct Cli {
    /// Tiny sizes, to check that every scenario runs (CI)
    #[arg(long, global = true)]
    smoke: bool,
    /// How many single-task jobs the control scenario runs (100,000)
    #[arg(long, global = true)]
    single_jobs: Option<usize>,
    /// Run the control scenario with roles and signed reservations: every
    /// member with its own key and least privilege, as `gpufleet auth`
    /// writes them
    #[arg(long, global = true)]
    secure: bool,
    /// Log lines as `text` or `json`
    #[arg(long, global = true, env = "GPUFLEET_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Clone, Copy, PartialEq)]
enum What {
    /// Every scenario, then the ratios
    All,
    /// The bare NATS operations of one task, sequential and 64 in flight
    Floor,
    /// The real coordinator and 100 workers (8 one-CPU slots each) whose tasks end at once
    Control,
    /// Two workers running /bin/true
    Processes,
    /// 1,000 simulated workers and 100,000 queued tasks against one coordinator
    Scale,
    /// A coordinator restarted over 100,000 finished and 10,000 waiting jobs
    History,
    /// Two users (weights 2:1) on 24 GPUs on simulated time: the share each gets over time
    Fairshare,
    /// 4 tasks that load 2 s, then train 2 s on one GPU: two-phase and plain
    Twophase,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn row(name: &str, value: String) {
    println!("| {name:<52} | {value:>20} |");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    gpufleet_natsutil::telemetry::init(cli.log_format);
    // Each scenario gets a fresh server, so that none sees another's data.
    let fresh = || {
        let server = NatsServer::start();
        let url = server.url();
        (server, url)
    };
    println!("| scenario / figure {:<34} | {:>20} |", "", "value");
    println!("|{}|{}|", "-".repeat(54), "-".repeat(22));
    let mut floor_seq = None;
    let mut floor_par = None;
    if matches!(cli.what, What::All | What::Floor) {
        let (_server, url) = fresh();
        let n = if cli.smoke { 50 } else { 2_000 };
        let seq = floor::run(&url, n, 1).await?;
        row("floor, sequential: cycles/s", format!("{:.0}", seq.rate()));
        row("floor, sequential: p50", ms(seq.latency.quantile(0.5)));
        row("floor, sequential: p99", ms(seq.latency.quantile(0.99)));
        let n = if cli.smoke { 200 } else { 20_000 };
        let par = floor::run(&url, n, 64).await?;
        row(
            "floor, 64 in flight: cycles/s",
            format!("{:.0}", par.rate()),
        );
        row("floor, 64 in flight: p50", ms(par.latency.quantile(0.5)));
        row("floor, 64 in flight: p99", ms(par.latency.quantile(0.99)));
        floor_seq = Some(seq);
        floor_par = Some(par);
    }
    let mut control_rate = None;
    let mut control_p50 = None;
    if matches!(cli.what, What::All | What::Control) {
        let (mut single, jobs, per_job, seq) = if cli.smoke {
            (200, 5, 20, 20)
        } else {
            (100_000, 1_000, 100, 1_000)
        };
        if let Some(n) = cli.single_jobs {
            single = n;
        }
        let workers = 100;
        let dir = tempfile::tempdir()?;
        let (_server, access) = if cli.secure {
            control::Access::secure(workers, dir.path())?
        } else {
            let (server, url) = fresh();
            (server, control::Access::open(&url))
        };
        let fleet = control::Fleet::start(
            &access,
            workers,
            8.0,
            std::sync::Arc::new(gpufleet_worker::launcher::Instant),
        )
        .await?;
        // With roles the coordinator serves no `$SRV` statistics.
        let stats_client = if access.is_secure() {
            None
        } else {
            Some(async_nats::connect(access.url.as_str()).await?)
        };
        let stats = |c: &Option<async_nats::Client>| {
            let c = c.clone();
            async move {
                match c {
                    Some(c) => scale::coordinator_stats(&c).await.map(Some),
                    None => Ok(None),
                }
            }
        };
        let lat = control::latency(&access, seq).await?;
        for (to, h) in [("running", &lat.to_running), ("result", &lat.to_result)] {
            for (p, q) in [("p50", 0.5), ("p99", 0.99)] {
                row(&format!("control: submit to {to} {p}"), ms(h.quantile(q)));
            }
        }
        let s0 = stats(&stats_client).await?;
        let one = control::throughput(&access, single, 1, 1.0).await?;
        let s1 = stats(&stats_client).await?;
        row(
            &format!("control: {single} single-task jobs, tasks/s"),
            format!("{:.0}", one.rate()),
        );
        let writes = |s: &serde_json::Value| {
            ["job", "lease", "event", "checkpoint"]
                .iter()
                .map(|k| s["writes"][k].as_f64().unwrap_or(0.0))
                .sum::<f64>()
        };
        if let (Some(s0), Some(s1)) = (&s0, &s1) {
            row(
                "control: coordinator JetStream writes per task",
                format!("{:.2}", (writes(s1) - writes(s0)) / single as f64),
            );
        }
        let many = control::throughput(&access, jobs, per_job, 1.0).await?;
        row(
            &format!("control: {jobs} jobs x {per_job} tasks, tasks/s"),
            format!("{:.0}", many.rate()),
        );
        if let Some(s2) = stats(&stats_client).await? {
            row(
                "control: placement per task p50 / p99",
                format!(
                    "{:.1} / {:.1} us",
                    s2["placement_us"]["p50"].as_f64().unwrap_or(0.0),
                    s2["placement_us"]["p99"].as_f64().unwrap_or(0.0)
                ),
            );
        }
        fleet.stop().await;
        control_rate = Some(one.rate());
        control_p50 = Some(lat.to_result.quantile(0.5));
    }
    if matches!(cli.what, What::All | What::Processes) {
        let (jobs, per_job) = if cli.smoke { (1, 50) } else { (50, 100) };
        let n = jobs * per_job;
        let (_server, url) = fresh();
        let access = control::Access::open(&url);
        let fleet = control::Fleet::start(
            &access,
            2,
            2.0,
            std::sync::Arc::new(gpufleet_worker::launcher::Processes),
        )
        .await?;
        let r = control::throughput(&access, jobs, per_job, 0.1).await?;
        row(
            &format!("real processes: {n} /bin/true tasks on 2 workers, tasks/s"),
            format!("{:.0}", r.rate()),
        );
        fleet.stop().await;
    }
    if matches!(cli.what, What::All | What::Scale) {
        let (workers, tasks, window) = if cli.smoke {
            (20, 200, Duration::from_secs(3))
        } else {
            (1_000, 100_000, Duration::from_secs(30))
        };
        let (_server, url) = fresh();
        let r = scale::run(&url, workers, tasks, window).await?;
        row(
            &format!("scale: {} workers, {} queued tasks", r.workers, r.tasks),
            format!("{:.0} s window", r.window.as_secs_f64()),
        );
        row("scale: coordinator CPU", format!("{:.0} %", r.cpu_percent));
        row(
            "scale: coordinator RSS (peak)",
            format!("{:.0} MiB ({:.0})", r.rss_mib, r.hwm_mib),
        );
        row(
            "scale: placement per task p50",
            format!("{:.1} us", r.placement_p50_us),
        );
        row(
            "scale: placement per task p99",
            format!("{:.1} us", r.placement_p99_us),
        );
        row(
            "scale: schedule pass p99",
            format!("{:.1} ms", r.pass_p99_ms),
        );
        row(
            "scale: tasks placed (reservations made)",
            format!("{}", r.placed),
        );
        row(
            "scale: adverts sent / handled per s",
            format!(
                "{:.0} / {:.0}",
                r.adverts_sent_per_s, r.adverts_handled_per_s
            ),
        );
        row(
            "scale: input backlog at start / end",
            format!("{} / {}", r.backlog_start, r.backlog_end),
        );
    }
    if matches!(cli.what, What::All | What::History) {
        let (finished, waiting) = if cli.smoke {
            (500, 100)
        } else {
            (100_000, 10_000)
        };
        let (_server, url) = fresh();
        let r = history::run(&url, finished, waiting).await?;
        row(
            &format!(
                "history: restart over {} finished, {} waiting jobs",
                r.finished, r.waiting
            ),
            ms(r.takeover),
        );
        row(
            "history: coordinator RSS before / after restart",
            format!("{:.0} / {:.0} MiB", r.rss_before_mib, r.rss_after_mib),
        );
        row(
            "history: jobs held in memory after restart",
            format!("{}", r.held),
        );
    }
    if matches!(cli.what, What::All | What::Fairshare) {
        let minute = Duration::from_secs(60);
        let settings = fairshare::Settings {
            workers: 3,
            weights: (2.0, 1.0),
            task: minute,
            bob_at: 2 * minute,
            tasks: (2_000, 60),
            until: if cli.smoke { 4 * minute } else { 11 * minute },
            sample_every: Duration::from_secs(30),
        };
        let o = fairshare::run(&settings)?;
        // Once every task running when bob came has ended (they run up
        // to 4/3 of a task length).
        let settled = (settings.bob_at + settings.task.mul_f64(4.0 / 3.0)).as_secs();
        let s = o
            .samples
            .iter()
            .find(|s| s.at >= settled)
            .expect("a sample after bob came");
        row(
            "fairshare: alice / bob GPUs 80 s after bob came (fair)",
            format!(
                "{} / {} ({:.0} / {:.0})",
                s.alice, s.bob, o.fair.0, o.fair.1
            ),
        );
        println!("\n{}", fairshare::chart(&o));
    }
    if matches!(cli.what, What::All | What::Twophase) {
        let (tasks, load, train) = if cli.smoke {
            (2, Duration::from_millis(300), Duration::from_millis(300))
        } else {
            (4, Duration::from_secs(2), Duration::from_secs(2))
        };
        let (_server, url) = fresh();
        let o = twophase::run(&url, tasks, load, train).await?;
        let n = tasks as u32;
        row(
            &format!(
                "twophase: {tasks} tasks, 1 GPU, two-phase (ideal {:.1} s)",
                (load + train * n).as_secs_f64()
            ),
            format!("{:.1} s", o.two_phase.as_secs_f64()),
        );
        row(
            &format!(
                "twophase: {tasks} tasks, 1 GPU, plain (ideal {:.1} s)",
                ((load + train) * n).as_secs_f64()
            ),
            format!("{:.1} s", o.plain.as_secs_f64()),
        );
    }
    if let (Some(par), Some(rate)) = (&floor_par, control_rate) {
        row(
            "ratio: control tasks/s / floor cycles/s (64 in flight)",
            format!("{:.2}", rate / par.rate()),
        );
    }
    if let (Some(seq), Some(p50)) = (&floor_seq, control_p50) {
        row(
            "ratio: control submit-to-result p50 / floor p50",
            format!(
                "{:.2}",
                p50.as_secs_f64() / seq.latency.quantile(0.5).as_secs_f64()
            ),
        );
    }
    Ok(())
}
