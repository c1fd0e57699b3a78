//! Waiting for a job: live progress (a bar per job, a spinner per running
//! task), streamed logs, and what Ctrl-C does.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use gpufleet_schema::{EventBody, JobId, JobState, JobStatus, LogStream, TaskState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::Api;

pub struct WaitOptions {
    /// Print the job's output as it comes.
    pub follow: bool,
    /// On Ctrl-C, leave the job running without asking.
    pub detach: bool,
    /// Draw progress bars (only on a terminal).
    pub progress: bool,
}

/// How waiting ended.
pub enum Waited {
    Finished(Box<JobStatus>),
    /// The user chose to leave the job running.
    Detached,
}

/// The process exit code that mirrors a job's outcome.
pub fn exit_code(status: JobState) -> i32 {
    match status {
        JobState::Completed => 0,
        JobState::Aborted => 3,
        _ => 1,
    }
}

struct Bars {
    multi: MultiProgress,
    job: ProgressBar,
    tasks: BTreeMap<String, ProgressBar>,
}

impl Bars {
    fn new(enabled: bool, job: &JobStatus) -> Option<Bars> {
        if !enabled {
            return None;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bar = multi.add(ProgressBar::new(job.counts.total() as u64));
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(job.name.clone().unwrap_or_else(|| job.job_id.to_string()));
        Some(Bars {
            multi,
            job: bar,
            tasks: BTreeMap::new(),
        })
    }

    fn update(&mut self, s: &JobStatus) {
        let c = &s.counts;
        self.job.set_length(c.total() as u64);
        self.job.set_position(c.finished() as u64);
        self.job.set_message(format!(
            "{} | queued {} running {} ok {} failed {}",
            s.status,
            c.queued + c.reserved,
            c.running,
            c.succeeded,
            c.failed + c.timed_out + c.lost + c.interrupted + c.cancelled
        ));
        let running: BTreeMap<String, String> = s
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .take(10)
            .map(|t| {
                let w = t.worker.as_ref().map(|w| w.to_string()).unwrap_or_default();
                (
                    t.task_id.to_string(),
                    format!("{} on {w} (attempt {})", t.name, t.attempt),
                )
            })
            .collect();
        self.tasks.retain(|id, bar| {
            let keep = running.contains_key(id);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for (id, msg) in running {
            let bar = self.tasks.entry(id).or_insert_with(|| {
                let b = self.multi.add(ProgressBar::new_spinner());
                b.enable_steady_tick(Duration::from_millis(120));
                b
            });
            bar.set_message(msg);
        }
    }

    fn finish(&mut self) {
        for b in self.tasks.values() {
            b.finish_and_clear();
        }
        self.job.finish();
    }
}

/// Waits until the job finishes, printing what `opts` asks for.
pub async fn wait(api: &Api, job: &JobId, opts: &WaitOptions) -> anyhow::Result<Waited> {
    let kinds: &[&str] = if opts.follow {
        &["state", "log", "result"]
    } else {
        &["state", "result"]
    };
    let (mut pending, mut events) = api.job_events(job, kinds).await?;
    let mut status = api.get(job).await?;
    let multi_task = status.counts.total() > 1;
    let names: BTreeMap<String, String> = status
        .tasks
        .iter()
        .map(|t| (t.task_id.to_string(), t.name.clone()))
        .collect();
    let mut bars = Bars::new(opts.progress && std::io::stderr().is_terminal(), &status);
    if let Some(b) = &mut bars {
        b.update(&status);
    }
    let mut interrupted = false;
    loop {
        if status.status.is_finished() && pending == 0 {
            break;
        }
        tokio::select! {
            next = events.next() => {
                let Some((ev, left)) = next else { break };
                pending = left;
                match ev.body {
                    EventBody::Log { stream, text, dropped_bytes } => {
                        let prefix = if multi_task {
                            format!("[{}] ", names.get(ev.task_id.as_str()).cloned().unwrap_or_else(|| ev.task_id.to_string()))
                        } else {
                            String::new()
                        };
                        let print = || print_log(stream, &prefix, &text, dropped_bytes);
                        match &bars {
                            Some(b) => b.multi.suspend(print),
                            None => print(),
                        }
                    }
                    _ => {
                        status = api.get(job).await?;
                        if let Some(b) = &mut bars {
                            b.update(&status);
                        }
                    }
                }
            }
            // A safety net if an event was lost to stream limits.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                status = api.get(job).await?;
                if let Some(b) = &mut bars {
                    b.update(&status);
                }
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                if let Some(b) = &bars {
                    b.multi.suspend(|| {});
                }
                if opts.detach || !std::io::stdin().is_terminal() || !ask_cancel(job).await {
                    if let Some(b) = &mut bars {
                        b.finish();
                    }
                    eprintln!("left job {job} running; follow it with: gpufleet status {job} --wait");
                    return Ok(Waited::Detached);
                }
                status = api.cancel(job).await?;
                eprintln!("cancelling job {job}...");
            }
        }
    }
    if let Some(b) = &mut bars {
        b.update(&status);
        b.finish();
    }
    Ok(Waited::Finished(Box::new(status)))
}

fn print_log(stream: LogStream, prefix: &str, text: &str, dropped: u64) {
    let mut out: Box<dyn Write> = match stream {
        LogStream::Stdout => Box::new(std::io::stdout().lock()),
        LogStream::Stderr => Box::new(std::io::stderr().lock()),
    };
    if dropped > 0 {
        let _ = writeln!(
            out,
            "{prefix}[gpufleet: {dropped} bytes of output dropped here]"
        );
    }
    for line in text.split_inclusive('\n') {
        let _ = write!(out, "{prefix}{line}");
    }
    if !text.ends_with('\n') && !text.is_empty() {
        let _ = writeln!(out);
    }
    let _ = out.flush();
}

async fn ask_cancel(job: &JobId) -> bool {
    eprint!("\ncancel job {job}? [y/N] ");
    let _ = std::io::stderr().flush();
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).ok();
        matches!(line.trim(), "y" | "Y" | "yes")
    })
    .await
    .unwrap_or(false)
}
