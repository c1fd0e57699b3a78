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
    /// Also run the control scenario with roles and signed reservations
    /// (every member with its own key and least privilege, as `gpufleet
    /// auth` writes them), and print the secure / open ratios
    #[arg(long, global = true)]
    secure: bool,
    /// Simulated workers in the scale scenario
    #[arg(long, global = true, default_value_t = 1_000)]
    scale_workers: usize,
    /// GPUs per simulated worker in the scale scenario
    #[arg(long, global = true, default_value_t = 8)]
    scale_gpus: u32,
    /// Queued one-GPU tasks in the scale scenario
    #[arg(long, global = true, default_value_t = 100_000)]
    scale_tasks: usize,
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

/// The JetStream writes of the workers in this process, by kind.
struct WorkerWrites(Vec<(&'static str, u64)>);

impl WorkerWrites {
    fn now() -> WorkerWrites {
        WorkerWrites(gpufleet_worker::metrics::writes_in_process())
    }

    /// Rows for the writes since `before`, per task of `tasks`: the tasks'
    /// own, then the adverts (per worker, sent when its work changes).
    fn rows(&self, tag: &str, before: &WorkerWrites, tasks: usize) {
        let since: Vec<(&str, u64)> = self
            .0
            .iter()
            .zip(&before.0)
            .map(|((k, n), (_, b))| (*k, n - b))
            .collect();
        let per_task = |n: u64| n as f64 / tasks.max(1) as f64;
        let (adverts, own): (Vec<_>, Vec<_>) = since.iter().partition(|(k, _)| *k == "advert");
        row(
            &format!("{tag}: worker JetStream writes per task"),
            format!("{:.2}", per_task(own.iter().map(|(_, n)| n).sum())),
        );
        let kinds: Vec<String> = own
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {:.2}", per_task(*n)))
            .collect();
        row(&format!("{tag}: ... of which"), kinds.join(", "));
        row(
            &format!("{tag}: worker adverts per task"),
            format!("{:.2}", per_task(adverts.iter().map(|(_, n)| n).sum())),
        );
    }
}

fn floor_rows(name: &str, mode: &str, r: &floor::FloorResult) {
    row(
        &format!("{name}, {mode}: cycles/s"),
        format!("{:.0}", r.rate()),
    );
    row(&format!("{name}, {mode}: p50"), ms(r.latency.quantile(0.5)));
    row(
        &format!("{name}, {mode}: p99"),
        ms(r.latency.quantile(0.99)),
    );
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
    let mut five_seq = None;
    let mut five_par = None;
    if matches!(cli.what, What::All | What::Floor) {
        let (_server, url) = fresh();
        let (n_seq, n_par) = if cli.smoke {
            (50, 200)
        } else {
            (2_000, 20_000)
        };
        let seq = floor::run(&url, n_seq, 1).await?;
        floor_rows("floor", "sequential", &seq);
        let par = floor::run(&url, n_par, 64).await?;
        floor_rows("floor", "64 in flight", &par);
        let five = floor::run_five(&url, n_seq, 1).await?;
        floor_rows("five-op floor", "sequential", &five);
        let five64 = floor::run_five(&url, n_par * 2, 64).await?;
        floor_rows("five-op floor", "64 in flight", &five64);
        floor_seq = Some(seq);
        floor_par = Some(par);
        five_seq = Some(five);
        five_par = Some(five64);
    }
    let mut control = None;
    let mut control_secure = None;
    if matches!(cli.what, What::All | What::Control) {
        let (mut single, jobs, per_job, seq) = if cli.smoke {
            (200, 5, 20, 20)
        } else {
            (100_000, 1_000, 100, 1_000)
        };
        if let Some(n) = cli.single_jobs {
            single = n;
        }
        let sizes = ControlSizes {
            single,
            jobs,
            per_job,
            seq,
        };
        control = Some(control_scenario(&sizes, false).await?);
        if cli.secure {
            control_secure = Some(control_scenario(&sizes, true).await?);
        }
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
        let w0 = WorkerWrites::now();
        let r = control::throughput(&access, jobs, per_job, 0.1).await?;
        row(
            &format!("real processes: {n} /bin/true tasks on 2 workers, tasks/s"),
            format!("{:.0}", r.rate()),
        );
        WorkerWrites::now().rows("real processes", &w0, n);
        fleet.stop().await;
    }
    if matches!(cli.what, What::All | What::Scale) {
        let (workers, tasks, window) = if cli.smoke {
            (20, 200, Duration::from_secs(3))
        } else {
            (cli.scale_workers, cli.scale_tasks, Duration::from_secs(30))
        };
        let (_server, url) = fresh();
        let r = scale::run(&url, workers, cli.scale_gpus, tasks, window).await?;
        row(
            &format!(
                "scale: {} workers x {} GPUs, {} queued tasks",
                r.workers, cli.scale_gpus, r.tasks
            ),
            format!("{:.0} s window", r.window.as_secs_f64()),
        );
        row(
            "scale: time to queue them, RSS per queued task then",
            format!(
                "{:.0} s, {:.0} B",
                r.queueing.as_secs_f64(),
                r.bytes_per_task
            ),
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
    if let Some(c) = &control {
        for (name, floor) in [("floor", &floor_par), ("five-op floor", &five_par)] {
            if let Some(f) = floor {
                row(
                    &format!("ratio: control tasks/s / {name} cycles/s (64)"),
                    format!("{:.2}", c.rate / f.rate()),
                );
            }
        }
        for (name, floor) in [("floor", &floor_seq), ("five-op floor", &five_seq)] {
            if let Some(f) = floor {
                row(
                    &format!("ratio: control result p50 / {name} p50 (seq)"),
                    format!(
                        "{:.2}",
                        c.p50.as_secs_f64() / f.latency.quantile(0.5).as_secs_f64()
                    ),
                );
            }
        }
    }
    if let (Some(open), Some(secure)) = (&control, &control_secure) {
        row(
            "ratio: secure / open, single-task jobs/s",
            format!("{:.2}", secure.rate / open.rate),
        );
        row(
            "ratio: secure / open, 100-task jobs tasks/s",
            format!("{:.2}", secure.many_rate / open.many_rate),
        );
        row(
            "ratio: secure / open, submit-to-result p50",
            format!("{:.2}", secure.p50.as_secs_f64() / open.p50.as_secs_f64()),
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct ControlSizes {
    single: usize,
    jobs: usize,
    per_job: usize,
    seq: usize,
}

/// The control scenario's figures, for the ratios at the end.
struct ControlFigures {
    rate: f64,
    many_rate: f64,
    p50: Duration,
}

/// The real coordinator and 100 in-process workers; with `secure`, every
/// member has its own key and least privilege and reservations are
/// signed, as `gpufleet auth` sets them up.
async fn control_scenario(sizes: &ControlSizes, secure: bool) -> anyhow::Result<ControlFigures> {
    let ControlSizes {
        single,
        jobs,
        per_job,
        seq,
    } = *sizes;
    let tag = if secure {
        "control (secure)"
    } else {
        "control"
    };
    let workers = 100;
    let dir = tempfile::tempdir()?;
    let (_server, access) = if secure {
        control::Access::secure(workers, dir.path())?
    } else {
        let server = NatsServer::start();
        let url = server.url();
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
    // No "submit to RUNNING": a task that ends at once sends none.
    for (p, q) in [("p50", 0.5), ("p99", 0.99)] {
        row(
            &format!("{tag}: submit to result {p}"),
            ms(lat.to_result.quantile(q)),
        );
    }
    let writes = |s: &serde_json::Value| {
        ["job", "lease", "event", "checkpoint"]
            .iter()
            .map(|k| s["writes"][k].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let s0 = stats(&stats_client).await?;
    let w0 = WorkerWrites::now();
    let one = control::throughput(&access, single, 1, 1.0).await?;
    // The last results are recorded a batch after they are seen: count
    // the coordinator's writes once they stop changing.
    let mut s1 = stats(&stats_client).await?;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = stats(&stats_client).await?;
        let same = match (&s1, &again) {
            (Some(a), Some(b)) => writes(a) == writes(b),
            _ => true,
        };
        s1 = again;
        if same {
            break;
        }
    }
    WorkerWrites::now().rows("control", &w0, single);
    row(
        &format!("{tag}: {single} single-task jobs, tasks/s"),
        format!("{:.0}", one.rate()),
    );
    if let (Some(s0), Some(s1)) = (&s0, &s1) {
        row(
            "control: coordinator JetStream writes per task",
            format!("{:.2}", (writes(s1) - writes(s0)) / single as f64),
        );
    }
    let many = control::throughput(&access, jobs, per_job, 1.0).await?;
    row(
        &format!("{tag}: {jobs} jobs x {per_job} tasks, tasks/s"),
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
    Ok(ControlFigures {
        rate: one.rate(),
        many_rate: many.rate(),
        p50: lat.to_result.quantile(0.5),
    })
}
