//! Waiting for a job: live progress (a bar per job, a spinner per running
//! task), streamed logs and progress events, and what Ctrl-C does.
//!
//! Everything comes from the events stream, replayed from its start, so a
//! late follower sees the whole story. The job's status is re-read when a
//! state event or a result arrives (and every few seconds as a safety net).
//! The coordinator publishes no state event for a success: the holder's
//! result says it, and the task is shown SUCCEEDED once the coordinator's
//! record says so too (a result is not the record: the lease may have
//! lapsed first). A follower stops only when the job has finished *and* it
//! has seen the newest event stored for the job, so the last lines of
//! output are never cut off.

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
/// After a successful result, the status is read again this often until
/// the coordinator's record has that attempt's end...
const SETTLE_EVERY: Duration = Duration::from_millis(50);
/// ...for at most this long; then the safety-net reads carry on.
const SETTLE_WITHIN: Duration = Duration::from_secs(5);

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
        self.prefix_of(&ev.task_id, ev.attempt, always)
    }

    fn prefix_of(&self, task: &TaskId, attempt: u32, always: bool) -> String {
        let name = self.of(task);
        match (attempt, always || self.0.len() > 1) {
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
    // Every event of the job: the newest one stored tells when all output
    // was seen, the coordinator's state events say whose output counts,
    // and a holder's result is the only word of a success (a consumer may
    // have one filter only, so state and result cannot be picked alone).
    let mut events = api
        .events(subjects::job_events(&status.owner, job), Until::Live)
        .await?;
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
    let mut settling = Settling::default();
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
                if matches!(event.kind(), EventKind::State | EventKind::Result) {
                    dirty = true;
                }
                settling.saw(&event);
                show_event(&event, &names, opts, &mut bars);
                if status.status.is_finished() {
                    // The final record: nothing to wait for.
                    settling.settle(&status, &names, opts, &bars);
                } else if dirty && (pending == 0 || refreshed.elapsed() > REFRESH_EVERY) {
                    dirty = !refresh(api, job, &mut status, &mut unreachable, &bars).await;
                    refreshed = Instant::now();
                    settling.settle(&status, &names, opts, &bars);
                    if let Some(b) = &mut bars {
                        b.update(&status);
                    }
                }
            }
            // From the last read, not the last event: a task whose output
            // never pauses must not put the re-read off for ever. A result
            // the record does not show yet is read for again soon.
            _ = tokio::time::sleep_until(settling.next_read(refreshed).into()) => {
                dirty = !refresh(api, job, &mut status, &mut unreachable, &bars).await;
                refreshed = Instant::now();
                settling.settle(&status, &names, opts, &bars);
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
    settling.settle(&status, &names, opts, &bars);
    if let Some(b) = &mut bars {
        b.update(&status);
        b.finish();
    }
    Ok(Waited::Finished(Box::new(status)))
}

/// Successful results whose end the coordinator's record does not show
/// yet, by task and attempt, with when each came. The coordinator sends
/// no state event for a success, so the SUCCEEDED line is printed when
/// the record says so; if the record says otherwise (the lease lapsed
/// before the result: LOST), the coordinator's state event says that.
#[derive(Default)]
struct Settling(BTreeMap<(TaskId, u32), Instant>);

impl Settling {
    /// Notes an event that `EventStream` let through: a result from the
    /// attempt's holder, for an attempt the coordinator has not ended.
    fn saw(&mut self, ev: &Event) {
        let key = (ev.task_id.clone(), ev.attempt);
        match &ev.body {
            EventBody::Result(o) if o.state == TaskState::Succeeded => {
                self.0.insert(key, Instant::now());
            }
            // The coordinator's own end of the attempt says it all.
            EventBody::State { state, .. } if ev.worker.is_none() && state.is_end() => {
                self.0.remove(&key);
            }
            _ => {}
        }
    }

    /// Drops what the record has settled, printing SUCCEEDED for each
    /// attempt it shows succeeded (where state lines are printed).
    fn settle(
        &mut self,
        status: &JobStatus,
        names: &Names,
        opts: &WaitOptions,
        bars: &Option<Bars>,
    ) {
        let lines = opts.states && !opts.json && bars.is_none();
        for (task, attempt) in self.settled(status) {
            if lines && opts.task.as_ref().is_none_or(|only| *only == task) {
                let prefix = names.prefix_of(&task, attempt, true);
                eprintln!("{prefix}{}", TaskState::Succeeded);
            }
        }
    }

    /// Drops the attempts whose end `status` has; returns those it says
    /// succeeded.
    fn settled(&mut self, status: &JobStatus) -> Vec<(TaskId, u32)> {
        // Most reads come with no result waiting: no index of a large job.
        if self.0.is_empty() {
            return Vec::new();
        }
        let by_id: BTreeMap<&TaskId, &gpufleet_schema::TaskStatus> =
            status.tasks.iter().map(|t| (&t.task_id, t)).collect();
        let mut succeeded = Vec::new();
        self.0.retain(|(task, attempt), _| {
            let Some(t) = by_id.get(task) else {
                return false;
            };
            let ended = t.attempt > *attempt || (t.attempt == *attempt && t.state.is_end());
            if ended && t.attempt == *attempt && t.state == TaskState::Succeeded {
                succeeded.push((task.clone(), *attempt));
            }
            !ended
        });
        succeeded
    }

    /// When to read the status next: soon while a result waits for the
    /// record (not for ever: a coordinator that is away is read for at
    /// the usual pace), else after the safety-net pause.
    fn next_read(&self, refreshed: Instant) -> Instant {
        let waiting = self.0.values().any(|at| at.elapsed() < SETTLE_WITHIN);
        refreshed
            + if waiting {
                SETTLE_EVERY
            } else {
                SAFETY_REFRESH
            }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::{event_of as event, succeeded};
    use gpufleet_schema::TaskStatus;

    fn status(attempt: u32, state: TaskState) -> JobStatus {
        let job = JobId::new("j").unwrap();
        JobStatus {
            owner: gpufleet_schema::UserId::default_user(),
            name: None,
            status: gpufleet_schema::JobState::Running,
            reason: None,
            priority: 0,
            submitted_at: time::OffsetDateTime::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            counts: Default::default(),
            tasks: vec![TaskStatus {
                task_id: TaskId::for_index(&job, 0),
                name: "t".into(),
                state,
                attempt,
                worker: None,
                gpus: vec![],
                exit_code: None,
                result: None,
                reason: None,
                started_at: None,
                finished_at: None,
                usage: None,
            }],
            errors: Vec::new(),
            error_count: 0,
            job_id: job,
        }
    }

    #[test]
    fn a_result_is_shown_succeeded_only_once_the_record_says_so() {
        let mut s = Settling::default();
        s.saw(&succeeded(1));
        // The coordinator has not taken the result yet: keep asking, soon.
        assert!(s.settled(&status(1, TaskState::Running)).is_empty());
        let now = Instant::now();
        assert_eq!(s.next_read(now), now + SETTLE_EVERY);
        let done = s.settled(&status(1, TaskState::Succeeded));
        assert_eq!(done, [(TaskId::new("j-0").unwrap(), 1)]);
        assert_eq!(s.next_read(now), now + SAFETY_REFRESH);
    }

    #[test]
    fn a_result_the_record_ended_otherwise_is_not_shown_succeeded() {
        // The lease lapsed before the result was taken: LOST, or retried.
        for record in [status(1, TaskState::Lost), status(2, TaskState::Queued)] {
            let mut s = Settling::default();
            s.saw(&succeeded(1));
            assert!(s.settled(&record).is_empty());
            assert!(s.0.is_empty(), "settled by {record:?}");
        }
        // The coordinator's own end of the attempt settles it as well.
        let mut s = Settling::default();
        s.saw(&succeeded(1));
        s.saw(&event(
            1,
            EventBody::State {
                state: TaskState::Lost,
                reason: None,
                holder: None,
            },
        ));
        assert!(s.settled(&status(1, TaskState::Succeeded)).is_empty());
    }
}
