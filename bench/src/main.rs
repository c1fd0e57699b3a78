//! gpufleet's benchmarks. Each run starts its own nats-server and prints
//! one table; see the README's Benchmarks section for the commands and the
//! figures from our machines.

mod floor;
mod scale;

use std::time::Duration;

use clap::{Parser, Subcommand};
use gpufleet_testkit::NatsServer;

#[derive(Parser)]
#[command(about = "gpufleet benchmarks")]
struct Cli {
    /// Tiny sizes, to check that every scenario runs (CI)
    #[arg(long, global = true)]
    smoke: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Clone, Copy, PartialEq)]
enum What {
    /// Every scenario, then the ratios
    All,
    /// The bare NATS operations of one task, sequential and 64 in flight
    Floor,
    /// 1,000 simulated workers and 100,000 queued tasks against one coordinator
    Scale,
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
    let server = NatsServer::start();
    let url = server.url();
    println!("| scenario / figure {:<34} | {:>20} |", "", "value");
    println!("|{}|{}|", "-".repeat(54), "-".repeat(22));
    let mut floor_seq = None;
    let mut floor_par = None;
    if matches!(cli.what, What::All | What::Floor) {
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
    if matches!(cli.what, What::All | What::Scale) {
        let (workers, tasks, window) = if cli.smoke {
            (20, 200, Duration::from_secs(3))
        } else {
            (1_000, 100_000, Duration::from_secs(30))
        };
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
    let _ = (floor_seq, floor_par);
    Ok(())
}
