//! Waiting for a job: live progress (a bar per job, a spinner per running
//! task), streamed logs and progress events, and what Ctrl-C does.
//!
//! Everything comes from the events stream, replayed from its start, so a
//! late follower sees the whole story. The job's status is re-read when a
//! state event arrives (and every few seconds as a safety net). A follower
//! stops only when the job has finished *and* it has seen the newest event
//! stored for the job, so the last lines of output are never cut off.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use gpufleet_natsutil::events::Until;
use gpufleet_schema::{subjects, Event, EventBody, EventKind, JobId, JobStatus, LogStream};
use gpufleet_schema::{TaskId, TaskState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::signal::unix::{signal, SignalKind};

use crate::client::{Api, Delivered};

/// What to show while waiting.
#[derive(Debug, Clone, Default)]
pub struct WaitOptions {
    /// Print the job's output and progress events as they come.
    pub follow: bool,
    /// Print a line per task state change (when there are no bars).
    pub states: bool,
    /// Print progress events (with `follow`).
    pub progress: bool,
    /// Draw progress bars on stderr.
    pub bars: bool,
    /// What Ctrl-C does.
    pub ctrl_c: CtrlC,
    /// Print events as JSON lines on stdout instead of text.
    pub json: bool,
    /// Only this task's output.
    pub task: Option<TaskId>,
}

/// What Ctrl-C does while waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CtrlC {
    /// Ask whether to cancel the job (on a terminal; else leave it running).
    #[default]
    Ask,
    /// Leave the job running, and say how to find it again.
    Detach,
    /// Just stop (following logs: the job is none of our business).
    Quit,
}

/// How waiting ended.
pub enum Waited {
    Finished(Box<JobStatus>),
    /// Ctrl-C: the job was left running (or left to finish its cancel).
    Detached,
}

/// How often the status is re-read when no event says it changed.
const SAFETY_REFRESH: Duration = Duration::from_secs(2);
/// While a backlog of state events is replayed, re-read at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(300);
/// A status read that takes longer is given up and tried again later (a
/// request to a coordinator that died in between gets no answer at all).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(3);
/// Running tasks drawn as spinners at most; the rest are counted.
const MAX_SPINNERS: usize = 8;

struct Names(BTreeMap<String, String>);

impl Names {
    fn of(&self, task: &TaskId) -> String {
        self.0
            .get(task.as_str())
            .cloned()
            .unwrap_or_else(|| task.to_string())
    }

    /// `[name] `, `[name#2] ` for a retry, or nothing for a lone first try.
    fn prefix(&self, ev: &Event, always: bool) -> String {
        let name = self.of(&ev.task_id);
        match (ev.attempt, always || self.0.len() > 1) {
            (a, _) if a > 1 => format!("[{name}#{a}] "),
            (_, true) => format!("[{name}] "),
            _ => String::new(),
        }
    }
}

struct Bars {
    multi: MultiProgress,
    job: ProgressBar,
    /// Each running task's spinner, and what it says before the progress.
    tasks: BTreeMap<String, (ProgressBar, String)>,
    more: Option<ProgressBar>,
    /// The newest progress event of each task, shown beside its spinner.
    progress: BTreeMap<String, String>,
}

/// A spinner's text: the task, and its newest progress if it has any.
fn spinner_text(base: &str, progress: Option<&String>) -> String {
    match progress {
        Some(p) => format!("{base} · {p}"),
        None => base.to_string(),
    }
}

impl Bars {
    fn new(job: &JobStatus) -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bar = multi.add(ProgressBar::new(job.counts.total() as u64));
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(job.name.clone().unwrap_or_else(|| job.job_id.to_string()));
        bar.enable_steady_tick(Duration::from_millis(200));
        Bars {
            multi,
            job: bar,
            tasks: BTreeMap::new(),
            more: None,
            progress: BTreeMap::new(),
        }
    }

    fn update(&mut self, s: &JobStatus) {
        let c = &s.counts;
        self.job.set_length(c.total() as u64);
        self.job.set_position(c.finished() as u64);
        let not_ok = c.failed + c.timed_out + c.lost + c.interrupted + c.cancelled;
        let mut msg = format!("{} · {} running", s.status, c.running);
        if c.queued + c.reserved > 0 {
            msg.push_str(&format!(" · {} waiting", c.queued + c.reserved));
        }
        msg.push_str(&format!(" · {} ok", c.succeeded));
        if not_ok > 0 {
            msg.push_str(&format!(" · {not_ok} not ok"));
        }
        if let (Some(r), true) = (&s.reason, c.running == 0 && !s.status.is_finished()) {
            msg.push_str(&format!(" · {r}"));
        }
        self.job.set_message(msg);

        let running: Vec<_> = s
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .collect();
        let shown: BTreeMap<String, String> = running
            .iter()
            .take(MAX_SPINNERS)
            .map(|t| {
                let w = t.worker.as_ref().map(|w| w.to_string()).unwrap_or_default();
                let mut m = format!("{} on {w}", t.name);
                if t.attempt > 1 {
                    m.push_str(&format!(" (attempt {})", t.attempt));
                }
                (t.task_id.to_string(), m)
            })
            .collect();
        self.tasks.retain(|id, (bar, _)| {
            let keep = shown.contains_key(id);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for (id, base) in shown {
            let multi = &self.multi;
            let more = &self.more;
            let text = spinner_text(&base, self.progress.get(&id));
            let (bar, shown_base) = self.tasks.entry(id).or_insert_with(|| {
                let b = ProgressBar::new_spinner();
                let b = match more {
                    Some(m) => multi.insert_before(m, b),
                    None => multi.add(b),
                };
                b.set_style(
                    ProgressStyle::with_template("  {spinner:.green} {msg} {elapsed:.dim}")
                        .expect("valid template"),
                );
                b.enable_steady_tick(Duration::from_millis(120));
                (b, String::new())
            });
            *shown_base = base;
            bar.set_message(text);
        }
        let hidden = running.len().saturating_sub(MAX_SPINNERS);
        match (&self.more, hidden) {
            (Some(m), 0) => {
                m.finish_and_clear();
                self.more = None;
            }
            (Some(m), n) => m.set_message(format!("  … and {n} more running")),
            (None, 0) => {}
            (None, n) => {
                let m = self.multi.add(ProgressBar::new_spinner());
                m.set_style(ProgressStyle::with_template("{msg}").expect("valid template"));
                m.set_message(format!("  … and {n} more running"));
                self.more = Some(m);
            }
        }
    }

    /// Records a task's newest progress and shows it on its spinner now:
    /// progress comes between status reads, which may be seconds apart.
    fn set_progress(&mut self, task: &TaskId, text: String) {
        if let Some((bar, base)) = self.tasks.get(task.as_str()) {
            bar.set_message(spinner_text(base, Some(&text)));
        }
        self.progress.insert(task.to_string(), text);
    }

    fn hide(&self) {
        self.multi.set_draw_target(ProgressDrawTarget::hidden());
    }

    fn show(&self) {
        self.multi.set_draw_target(ProgressDrawTarget::stderr());
    }

    fn finish(&mut self) {
        for (b, _) in self.tasks.values() {
            b.finish_and_clear();
        }
        if let Some(m) = &self.more {
            m.finish_and_clear();
        }
        self.job.finish();
    }
}

/// Runs `f` without the bars on screen, if there are any.
fn above(bars: &Option<Bars>, f: impl FnOnce()) {
    match bars {
        Some(b) => b.multi.suspend(f),
        None => f(),
    }
}

/// Waits until the job finishes, printing what `opts` asks for.
pub async fn wait(api: &Api, job: &JobId, opts: &WaitOptions) -> anyhow::Result<Waited> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut status = api.get(job).await?;
    // With output or progress, every event of the job (the newest one
    // stored tells when all output was seen, and the coordinator's state
    // events say whose output counts); without, its state changes.
    let filter = if opts.follow || opts.bars {
        subjects::job_events(&status.owner, job)
    } else {
        subjects::job_events_of_kind(&status.owner, job, EventKind::State)
    };
    let mut events = api.events(filter, Until::Live).await?;
    let names = Names(
        status
            .tasks
            .iter()
            .map(|t| (t.task_id.to_string(), t.name.clone()))
            .collect(),
    );
    let mut bars = opts.bars.then(|| Bars::new(&status));
    if let Some(b) = &mut bars {
        b.update(&status);
    }
    let mut refreshed = Instant::now();
    let mut dirty = false;
    let mut tail: Option<u64> = None;
    let mut cancelling = false;
    let mut unreachable = false;
    loop {
        if status.status.is_finished() {
            if !opts.follow {
                break;
            }
            let t = match tail {
                Some(t) => t,
                None => *tail.insert(events.stored_tail().await?),
            };
            if events.last_seq() >= t {
                break;
            }
        }
        tokio::select! {
            next = events.next() => {
                let Some(Delivered { event, pending }) = next else { break };
                if event.kind() == EventKind::State {
                    dirty = true;
                }
                show_event(&event, &names, opts, &mut bars);
                if dirty && (pending == 0 || refreshed.elapsed() > REFRESH_EVERY) {
                    dirty = !refresh(api, job, &mut status, &mut unreachable, &bars).await;
                    refreshed = Instant::now();
                    if let Some(b) = &mut bars {
                        b.update(&status);
                    }
                }
            }
            // From the last read, not the last event: a task whose output
            // never pauses must not put the re-read off for ever.
            _ = tokio::time::sleep_until((refreshed + SAFETY_REFRESH).into()) => {
                dirty = !refresh(api, job, &mut status, &mut unreachable, &bars).await;
                refreshed = Instant::now();
                if let Some(b) = &mut bars {
                    b.update(&status);
                }
            }
            _ = sigint.recv() => {
                if opts.ctrl_c == CtrlC::Quit {
                    return Ok(Waited::Detached);
                }
                if let Some(b) = &bars {
                    b.hide();
                }
                let leave = cancelling
                    || opts.ctrl_c == CtrlC::Detach
                    || !std::io::stdin().is_terminal()
                    || match ask_cancel(job, &mut sigint).await {
                        None => true,
                        Some(false) => {
                            eprintln!("still waiting for job {job} (Ctrl-C again to ask again)");
                            false
                        }
                        Some(true) => {
                            status = api.cancel(job).await?;
                            cancelling = true;
                            eprintln!(
                                "cancelling job {job}; waiting for its tasks to stop (Ctrl-C again to stop waiting)"
                            );
                            false
                        }
                    };
                if leave {
                    if let Some(b) = &mut bars {
                        b.finish();
                    }
                    if cancelling {
                        eprintln!("job {job} is being cancelled; see it with: gpufleet status {job}");
                    } else {
                        eprintln!("left job {job} running; follow it with: gpufleet status {job} --wait");
                    }
                    return Ok(Waited::Detached);
                }
                if let Some(b) = &mut bars {
                    b.show();
                    b.update(&status);
                }
            }
        }
    }
    if let Some(b) = &mut bars {
        b.update(&status);
        b.finish();
    }
    Ok(Waited::Finished(Box::new(status)))
}

/// Re-reads the job's status; true if it could. A coordinator that is away
/// for a while (restarting, say) is waited for, not an error: the job goes
/// on without it and the events keep coming.
async fn refresh(
    api: &Api,
    job: &JobId,
    status: &mut JobStatus,
    unreachable: &mut bool,
    bars: &Option<Bars>,
) -> bool {
    let got = match tokio::time::timeout(REFRESH_TIMEOUT, api.get(job)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {REFRESH_TIMEOUT:?}")),
    };
    match got {
        Ok(s) => {
            if *unreachable {
                above(bars, || eprintln!("the coordinator answers again"));
                *unreachable = false;
            }
            *status = s;
            true
        }
        Err(e) => {
            if !*unreachable {
                above(bars, || {
                    eprintln!("cannot read job {job} ({e}); still following its events")
                });
                *unreachable = true;
            }
            false
        }
    }
}

/// Prints the events stored for a job now (its output so far), then returns.
pub async fn print_stored(api: &Api, job: &JobId, opts: &WaitOptions) -> anyhow::Result<()> {
    let status = api.get(job).await?;
    let names = Names(
        status
            .tasks
            .iter()
            .map(|t| (t.task_id.to_string(), t.name.clone()))
            .collect(),
    );
    // The coordinator's state events come along: they say whose output
    // counts for each attempt.
    let filter = match &opts.task {
        Some(t) => subjects::task_events(&status.owner, job, t),
        None => subjects::job_events(&status.owner, job),
    };
    let mut events = api.events(filter, Until::CaughtUp).await?;
    let mut bars = None;
    while let Some(Delivered { event, .. }) = events.next().await {
        show_event(&event, &names, opts, &mut bars);
    }
    Ok(())
}

fn show_event(ev: &Event, names: &Names, opts: &WaitOptions, bars: &mut Option<Bars>) {
    if opts.task.as_ref().is_some_and(|t| *t != ev.task_id) {
        return;
    }
    if opts.json {
        let wanted = match ev.kind() {
            EventKind::Log => opts.follow,
            EventKind::Progress => opts.follow && opts.progress,
            EventKind::State => opts.follow && opts.states,
            EventKind::Result | EventKind::Message => opts.follow && opts.states,
        };
        if wanted {
            println!(
                "{}",
                serde_json::to_string(ev).expect("events serialize to JSON")
            );
        }
        return;
    }
    // One task's output needs no prefix.
    let one = opts.task.is_some();
    match &ev.body {
        EventBody::Log {
            stream,
            text,
            dropped_bytes,
        } if opts.follow => {
            let prefix = if one {
                String::new()
            } else {
                names.prefix(ev, false)
            };
            above(bars, || print_log(*stream, &prefix, text, *dropped_bytes));
        }
        EventBody::Progress { data } => {
            let compact = serde_json::to_string(data).unwrap_or_default();
            if let Some(b) = bars {
                b.set_progress(&ev.task_id, truncate(&compact, 60));
            }
            if opts.follow && opts.progress {
                let prefix = names.prefix(ev, true);
                above(bars, || eprintln!("{prefix}progress: {compact}"));
            }
        }
        // RESERVED is placement in flight; RUNNING says where it went.
        EventBody::State { state, reason, .. }
            if opts.states && bars.is_none() && *state != TaskState::Reserved =>
        {
            let prefix = names.prefix(ev, true);
            let mut line = format!("{prefix}{state}");
            if let (TaskState::Reserved | TaskState::Running, Some(w)) = (state, &ev.worker) {
                line.push_str(&format!(" on {w}"));
            }
            if let Some(r) = reason {
                line.push_str(&format!(": {r}"));
            }
            eprintln!("{line}");
        }
        _ => {}
    }
}

fn print_log(stream: LogStream, prefix: &str, text: &str, dropped: u64) {
    let mut out: Box<dyn Write> = match stream {
        LogStream::Stdout => Box::new(std::io::stdout().lock()),
        LogStream::Stderr => Box::new(std::io::stderr().lock()),
    };
    if dropped > 0 {
        let _ = writeln!(
            out,
            "{prefix}[gpufleet: {dropped} bytes of output were dropped here]"
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

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Asks on the terminal; `None` when a second Ctrl-C answers instead.
async fn ask_cancel(job: &JobId, sigint: &mut tokio::signal::unix::Signal) -> Option<bool> {
    eprint!("\ncancel job {job}? [y/N] ");
    let _ = std::io::stderr().flush();
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).ok();
        matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
    });
    tokio::select! {
        answer = read => Some(answer.unwrap_or(false)),
        _ = sigint.recv() => {
            eprintln!();
            None
        }
    }
}
