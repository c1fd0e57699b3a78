//! Runs one attempt of one task as a child process, from start to end, and
//! reports its output. It knows nothing of NATS: the caller ships each
//! [`Output`] and the [`Finished`] record.
//!
//! # Layout
//! `dir/work` is the task's working directory and its output directory
//! (`GPUFLEET_OUTPUT_DIR`, whose files the caller uploads as artifacts);
//! `dir/meta/result.json` and `dir/meta/events.jsonl` sit outside it so they
//! are never mistaken for artifacts. `dir/owner` names the worker that made
//! the directory; `work/` and `meta/` belong to the task's user.
//!
//! # Processes and signals
//! The task runs in its own process group and, where the worker may make
//! one, its own cgroup (see `isolation::cgroup`); every signal goes to the
//! whole group and to everything in the cgroup, so the processes it starts
//! go with it, also those that left the group. The direct child gets
//! `PR_SET_PDEATHSIG = SIGKILL`, so it dies if the worker dies (it is
//! started from a thread that never exits, since the signal follows the
//! starting thread; see `spawn.rs` for how it is started without forking
//! the worker); that does not reach grandchildren, which survive a worker
//! crash until someone kills their group (or the restarted worker empties
//! their cgroup). When the task has ended, whatever is left of it is
//! killed: everything in its cgroup; without a cgroup, every process whose
//! environment carries the attempt's `GPUFLEET_OUTPUT_DIR` (which a
//! process that rewrites its environment escapes). The exit is observed with
//! `waitid(WNOWAIT)` so that the leader stays a zombie, and its pid cannot be
//! reused as a group id, until the rest of the group has been signalled.
//!
//! Ending a task (timeout, stop): SIGTERM to the group, then SIGKILL after
//! `kill_grace`; a task whose lease is lost is killed at once. After the
//! main process exits, whatever is left of the group gets a moment to
//! finish writing to the pipes, then SIGKILL.
//!
//! # Who runs it, and what it sees
//! The task runs as `isolation`'s user, with the allowlisted environment
//! (see `crate::isolation`); its directories are that user's. The files
//! the worker reads back from them (result, progress, artifacts) are opened
//! without following links, so a task cannot make the worker read
//! something of the worker's for it.
//!
//! # How an end is named
//! See `classify.rs`.
//!
//! # Memory
//! The host memory limit is enforced by sampling, not by an address-space
//! rlimit (which breaks CUDA's large virtual mappings); see `memory.rs` for
//! what is measured and where a cgroup v2 implementation would fit.
//!
//! # Output
//! See `output.rs`: the task is never slowed down by a slow caller; output
//! that cannot be kept is dropped and counted.

mod classify;
mod dirs;
mod memory;
mod output;
mod progress;
mod spawn;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use gpufleet_schema::{
    Dur, GpuGrant, JobId, LogStream, Rendezvous, TaskId, TaskSpec, TaskState, TaskUsage,
};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use self::classify::OomKills;
use self::output::{Hub, STDERR_TAIL};
use crate::config::WorkerConfig;
use crate::isolation::cgroup::{SharedOomCounter, TaskCgroup};
use crate::isolation::Isolation;
use crate::procs;
pub use dirs::{open_task_file, open_task_file_with, DirPool};

/// How long the pipes may stay open after the main process exited, before
/// the rest of the group is killed.
const PIPE_GRACE: Duration = Duration::from_secs(1);
/// How long to wait for a killed group to be gone before giving up.
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Knobs, with sane defaults in `Default`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// SIGTERM -> SIGKILL grace.
    pub kill_grace: Duration,
    /// The grace of a task stopped because its lease could not be
    /// renewed: short enough for it to be gone before the lease lapses.
    pub fence_grace: Duration,
    /// The largest `GPUFLEET_RESULT` file accepted.
    pub max_result_bytes: u64,
    /// A log batch is sent when it reaches this size...
    pub log_batch_bytes: usize,
    /// ... or when its oldest byte has waited this long.
    pub log_batch_interval: Duration,
    /// Output shipped per task; past it, output is dropped and counted.
    pub max_log_bytes: u64,
    /// Output held in memory while the caller's channel is full (beyond the
    /// one batch in hand); past it, output is dropped and counted.
    pub max_pending_log_bytes: usize,
    /// How often the task's memory is measured.
    pub memory_poll: Duration,
    /// How often what the task uses is sampled (see `crate::usage`).
    pub usage_poll: Duration,
    /// How often the `GPUFLEET_EVENTS` file is read.
    pub progress_poll: Duration,
    /// After the task ended, how long [`run`] waits for the caller to take
    /// the output still queued before dropping it.
    pub final_flush: Duration,
}

impl Default for Limits {
    /// The worker's default settings.
    fn default() -> Self {
        Limits::from_config(&WorkerConfig::default())
    }
}

impl Limits {
    /// The knobs the worker's settings give; the rest are fixed.
    pub fn from_config(cfg: &WorkerConfig) -> Limits {
        Limits {
            kill_grace: cfg.kill_grace.0,
            fence_grace: cfg.kill_grace.0,
            max_result_bytes: cfg.max_result_size.0,
            log_batch_bytes: cfg.log_batch_size.0 as usize,
            log_batch_interval: cfg.log_batch_interval.0,
            max_log_bytes: cfg.max_log_size.0,
            max_pending_log_bytes: 4 << 20,
            memory_poll: Duration::from_millis(250),
            usage_poll: Duration::from_millis(500),
            progress_poll: Duration::from_millis(100),
            final_flush: Duration::from_secs(5),
        }
    }

    /// Zero periods would make tokio's intervals panic.
    fn sanitized(mut self) -> Limits {
        let floor = Duration::from_millis(1);
        self.log_batch_interval = self.log_batch_interval.max(floor);
        self.memory_poll = self.memory_poll.max(floor);
        self.usage_poll = self.usage_poll.max(floor);
        self.progress_poll = self.progress_poll.max(floor);
        self.log_batch_bytes = self.log_batch_bytes.max(1);
        self
    }
}

#[derive(Debug, Clone)]
pub struct TaskRun {
    pub job_id: JobId,
    pub task_id: TaskId,
    pub attempt: u32,
    /// Command, env, timeout and `resources.memory` are used.
    pub spec: TaskSpec,
    /// The GPUs granted, in the order the task should see them.
    pub gpus: Vec<GpuGrant>,
    pub rendezvous: Option<Rendezvous>,
    /// This attempt's directory; created (with its subdirectories) by [`run`].
    pub dir: PathBuf,
    pub limits: Limits,
    /// Who it runs as, in what cgroup, with what environment.
    pub isolation: Arc<Isolation>,
    /// Where what the task uses is counted, if anywhere.
    pub usage: Option<crate::usage::Meter>,
    /// Filled with the main process's pid while it runs (cleared before it
    /// is reaped, so the pid is never one reused by another process), for
    /// whoever signals it about a message (`crate::mail`).
    pub pid: Option<crate::mail::PidSlot>,
    /// The watchdog outside the worker that stops the task by its
    /// deadline should the worker freeze (see `crate::watchdog`).
    pub fence: Option<Arc<crate::watchdog::Fence>>,
}

/// Why the caller wants the task stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancel,
    Drain,
    /// The lease could not be renewed for so long that it may lapse
    /// soon: stop (with the grace) before it can.
    LostContact,
    /// The lease is gone, or may be: a newer attempt may run elsewhere.
    /// Killed at once.
    Fenced,
    /// Preempted for waiting work of a higher priority: SIGTERM, then
    /// SIGKILL after `grace` (the coordinator's `preempt_grace`).
    Preempt {
        grace: Duration,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Log {
        stream: LogStream,
        text: String,
        /// Bytes of this stream dropped since its previous batch.
        dropped_bytes: u64,
    },
    Progress(serde_json::Value),
    /// A message the task wrote to its outbox, checked.
    Message(gpufleet_schema::message::OutboxLine),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// SUCCEEDED, FAILED, INTERRUPTED, TIMED_OUT or CANCELLED.
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub result: Option<serde_json::Value>,
    /// Human words when not SUCCEEDED, or a result-file problem.
    pub error: Option<String>,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: OffsetDateTime,
    /// `GPUFLEET_OUTPUT_DIR`, for the caller's artifact upload.
    pub output_dir: PathBuf,
    /// False if the program could not be started at all.
    pub launched: bool,
    /// Output bytes (both streams) that never reached the caller: those
    /// reported in `Output::Log::dropped_bytes` and those that could not be
    /// reported because the caller stopped taking output.
    pub log_dropped_bytes: u64,
    /// What it used, when the program ran and a meter was given.
    pub usage: Option<TaskUsage>,
}

/// The paths a task's directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPaths {
    pub root: PathBuf,
    /// Working and output directory.
    pub work: PathBuf,
    pub result: PathBuf,
    pub events: PathBuf,
    /// Messages to the task, one JSON line each (`GPUFLEET_INBOX`): the
    /// worker appends, the task reads. Made with the first message.
    pub inbox: PathBuf,
    /// Messages from the task to others of its job, one JSON line each
    /// (`GPUFLEET_OUTBOX`): the task appends, the worker reads.
    pub outbox: PathBuf,
    /// A two-phase task's control file (`GPUFLEET_CONTROL`): the task
    /// appends that it is ready, the worker its GPUs (see `control.rs`).
    pub control: PathBuf,
}

/// The files of `meta/` a task or the worker may make; a spare directory
/// holds none of them (see `dirs.rs`).
pub(crate) const META_FILES: [&str; 5] = [
    "events.jsonl",
    "result.json",
    "inbox.jsonl",
    "outbox.jsonl",
    "control.jsonl",
];

impl TaskPaths {
    pub fn new(dir: &Path) -> TaskPaths {
        let meta = dir.join("meta");
        TaskPaths {
            root: dir.to_path_buf(),
            work: dir.join("work"),
            result: meta.join(META_FILES[1]),
            events: meta.join(META_FILES[0]),
            inbox: meta.join(META_FILES[2]),
            outbox: meta.join(META_FILES[3]),
            control: meta.join(META_FILES[4]),
        }
    }

    fn meta(&self) -> PathBuf {
        self.root.join("meta")
    }

    /// Names the worker whose attempt this is. Beside `meta/` and `work/`
    /// rather than in them: those are the task user's to change.
    fn owner(&self) -> PathBuf {
        self.root.join("owner")
    }
}

/// Why we ended the task ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ender {
    Timeout(Duration),
    Stop(StopReason),
    Memory {
        used: u64,
        limit: u64,
    },
    /// The watchdog outside the worker: the worker did not confirm a
    /// renewal in time and could not stop the task itself (frozen).
    Watchdog,
}

/// Runs the attempt to its end. Never panics on anything the task does.
///
/// `output` never blocks the task: what the channel cannot take is queued up
/// to `max_pending_log_bytes`, then dropped and counted, and the count is
/// reported in that stream's next `Log`. Every `Output` has been sent (or
/// counted as dropped) when this returns, so the caller can publish the
/// result after the last log line. Should the caller stop taking output, the
/// end waits at most `final_flush` for it.
///
/// A stop already requested before the start means the program is not
/// started (`launched` is false).
pub async fn run(
    task: TaskRun,
    output: mpsc::Sender<Output>,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Finished {
    let dir = std::path::absolute(&task.dir).unwrap_or_else(|_| task.dir.clone());
    let paths = TaskPaths::new(&dir);
    let limits = task.limits.clone().sanitized();
    let isolation = task.isolation.clone();
    let not_launched = |state, error: String| Finished {
        state,
        exit_code: None,
        signal: None,
        result: None,
        error: Some(error),
        started_at: None,
        finished_at: OffsetDateTime::now_utc(),
        output_dir: paths.work.clone(),
        launched: false,
        log_dropped_bytes: 0,
        usage: None,
    };

    let cgroup = match prepare(&paths, &isolation).await {
        Ok(cgroup) => cgroup,
        Err(e) => {
            return not_launched(
                TaskState::Failed,
                format!("cannot prepare the task directory {}: {e}", dir.display()),
            );
        }
    };
    let stopped_early = *stop.borrow_and_update();
    if let Some(reason) = stopped_early {
        let (state, error) = describe_end(&Ender::Stop(reason));
        return not_launched(state, error);
    }
    let Some(program) = task.spec.command.first() else {
        return not_launched(TaskState::Failed, "the task has no command".into());
    };

    let oom = OomWatch::start(&isolation, cgroup.as_ref());
    let mut exit_watch = spawn::ExitWatch::new();
    let spec = process_spec(&task, &paths, cgroup.as_ref());
    let started = match start(spec).await {
        Ok(started) => started,
        Err(e) => {
            return not_launched(
                TaskState::Failed,
                format!("cannot start program {program:?}: {e}"),
            );
        }
    };
    let started_at = OffsetDateTime::now_utc();
    let mut leader = spawn::Leader::new(started.pid);
    let pid = leader.pid();
    exit_watch.attach(pid);
    if let Some(slot) = &task.pid {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
    }
    let pgid = Pid::from_raw(pid);
    let mut group = Group {
        pgid,
        cgroup: cgroup.map(|mut c| {
            c.started();
            Arc::new(c)
        }),
        armed: true,
    };
    if let Some(fence) = &task.fence {
        fence.watch(pid, group.cgroup.as_deref().map(TaskCgroup::dir));
    }
    tracing::debug!(task_id = %task.task_id, attempt = task.attempt, pid, "task started");

    let capped = Arc::new(AtomicBool::new(false));
    let (hub_tx, hub_rx) = mpsc::channel(16);
    let hub = tokio::spawn(output::run_hub(
        hub_rx,
        Hub::new(output, &limits, capped.clone()),
        limits.final_flush,
    ));
    // Should `run` itself be dropped, the helpers below must end too.
    let stop_reading = CancellationToken::new();
    let _stop_reading_on_drop = stop_reading.clone().drop_guard();
    let stdout = reader(started.stdout).map(|pipe| {
        tokio::spawn(output::read_pipe(
            pipe,
            LogStream::Stdout,
            hub_tx.clone(),
            stop_reading.clone(),
            0,
        ))
    });
    let stderr = reader(started.stderr).map(|pipe| {
        tokio::spawn(output::read_pipe(
            pipe,
            LogStream::Stderr,
            hub_tx.clone(),
            stop_reading.clone(),
            STDERR_TAIL,
        ))
    });
    let progress_done = CancellationToken::new();
    let _progress_done_on_drop = progress_done.clone().drop_guard();
    // The progress file and the outbox, read together.
    let progress = tokio::spawn(progress::follow(
        vec![
            progress::EventsTail::new(paths.events.clone()),
            progress::EventsTail::outbox(paths.outbox.clone()),
        ],
        limits.progress_poll,
        hub_tx.clone(),
        progress_done.clone(),
        capped,
    ));
    drop(hub_tx);

    let sampler = task.usage.as_ref().map(|meter| {
        AbortOnDropHandle::new(tokio::spawn(crate::usage::follow(
            meter.clone(),
            pid,
            limits.usage_poll,
        )))
    });
    let memory_limit = task.spec.resources.memory.map(|m| m.0).filter(|&m| m > 0);
    let monitor = memory_limit.map(|limit| {
        AbortOnDropHandle::new(tokio::spawn(watch_memory(pgid, limit, limits.memory_poll)))
    });

    let ender = supervise(
        &group,
        &mut stop,
        task.spec.timeout.map(|t| t.0),
        (limits.kill_grace, limits.fence_grace),
        monitor,
        exit_watch,
    )
    .await;
    if let Some(slot) = &task.pid {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    // The main process has exited and is still a zombie. Let what is left
    // of its group finish writing, but not for long.
    let readers = async {
        let _ = join_opt(stdout).await;
        join_opt(stderr).await.unwrap_or_default()
    };
    tokio::pin!(readers);
    let stderr_tail = match tokio::time::timeout(PIPE_GRACE, &mut readers).await {
        Ok(tail) => tail,
        Err(_) => {
            group.signal(Signal::SIGKILL);
            match tokio::time::timeout(PIPE_GRACE, &mut readers).await {
                Ok(tail) => tail,
                Err(_) => {
                    // Someone outside the group holds the pipes open.
                    tracing::warn!(task_id = %task.task_id, "task pipes still open after its group was killed; closing them");
                    stop_reading.cancel();
                    readers.await
                }
            }
        }
    };
    group.signal(Signal::SIGKILL);
    // Before the reap, while the group id is still this task's.
    let ender = match &task.fence {
        Some(fence) if fence.forget().await && ender.is_none() => Some(Ender::Watchdog),
        _ => ender,
    };
    // Reaping the leader only now keeps its pid (the group's id) from
    // being reused while the group is signalled.
    let status = leader.wait().await;
    wait_group_gone(pgid).await;
    let swept = sweep(&group, &paths).await;
    if swept > 0 {
        tracing::info!(task_id = %task.task_id, killed = swept, "killed processes the task left outside its process group");
    }
    group.armed = false;
    let oom_kills = oom.end(group.cgroup.as_deref());
    drop(group);
    drop(sampler);
    if let (Some(meter), Some(counted)) = (&task.usage, leader.counted()) {
        meter.reaped(counted.cpu, counted.max_rss);
    }

    progress_done.cancel();
    let _ = progress.await;
    let log_dropped_bytes = hub.await.unwrap_or(0);

    let (mut state, exit_code, signal, mut error) =
        classify(ender.as_ref(), status.as_ref(), &stderr_tail, oom_kills);
    let result = match read_result(&paths.result, limits.max_result_bytes).await {
        Ok(value) => value,
        Err(problem) => {
            if state == TaskState::Succeeded {
                state = TaskState::Failed;
                error = Some(problem);
            } else {
                tracing::debug!(task_id = %task.task_id, %problem, "ignoring the result file of a task that did not succeed");
            }
            None
        }
    };
    tracing::debug!(task_id = %task.task_id, attempt = task.attempt, %state, ?exit_code, ?signal, "task ended");
    Finished {
        state,
        exit_code,
        signal,
        result,
        error,
        started_at: Some(started_at),
        finished_at: OffsetDateTime::now_utc(),
        output_dir: paths.work.clone(),
        launched: true,
        log_dropped_bytes,
        usage: task.usage.as_ref().map(crate::usage::Meter::usage),
    }
}

/// What the kernel counts of out-of-memory kills, from the task's start.
enum OomWatch {
    /// The task's own cgroup counts (read from it at the end).
    Own,
    /// The memory cgroup it shares with the worker, and its count at the
    /// start.
    Shared {
        counter: SharedOomCounter,
        before: u64,
    },
    Unknown,
}

impl OomWatch {
    fn start(isolation: &Isolation, cgroup: Option<&TaskCgroup>) -> OomWatch {
        if cgroup.is_some_and(|c| c.oom_kills().is_some()) {
            return OomWatch::Own;
        }
        let Some(counter) = isolation.shared_oom.clone() else {
            return OomWatch::Unknown;
        };
        match counter.read() {
            Some(before) => OomWatch::Shared { counter, before },
            None => OomWatch::Unknown,
        }
    }

    fn end(self, cgroup: Option<&TaskCgroup>) -> Option<OomKills> {
        match self {
            OomWatch::Own => Some(OomKills {
                count: cgroup?.oom_kills()?,
                own: true,
            }),
            OomWatch::Shared { counter, before } => Some(OomKills {
                count: counter.read()?.saturating_sub(before),
                own: false,
            }),
            OomWatch::Unknown => None,
        }
    }
}

/// Kills what the task left outside its process group: everything in its
/// cgroup, or (without one) every process carrying its output directory
/// in its environment. Returns how many.
async fn sweep(group: &Group, paths: &TaskPaths) -> usize {
    match &group.cgroup {
        // Almost always empty by now: one read of `cgroup.procs`.
        Some(c) if c.members().is_empty() => 0,
        Some(c) => {
            let c = c.clone();
            tokio::task::spawn_blocking(move || c.kill_all())
                .await
                .unwrap_or(0)
        }
        None => {
            let work: HashSet<Vec<u8>> =
                [paths.work.as_os_str().as_encoded_bytes().to_vec()].into();
            tokio::task::spawn_blocking(move || kill_leftovers(Path::new(procs::ROOT), &work))
                .await
                .unwrap_or(0)
        }
    }
}

/// What [`clean_up_earlier_run`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CleanedUp {
    /// Processes of earlier attempts that were still running, killed.
    pub killed: usize,
    /// Attempt directories removed.
    pub removed: usize,
}

/// Deals with what an earlier run of this worker, killed before it could
/// clean up, left in `work_dir`. Its attempts are over (their leases are
/// gone or will be abandoned), but the processes their tasks started may
/// still run: `PR_SET_PDEATHSIG` took only each task's main process. Those
/// are killed, recognised by the `GPUFLEET_OUTPUT_DIR` in their environment;
/// then, if `remove_dirs`, the attempt directories are removed. Only
/// attempt directories that a [`DirPool`] of `owner`'s made are touched.
pub async fn clean_up_earlier_run(work_dir: &Path, owner: &str, remove_dirs: bool) -> CleanedUp {
    let work_dir = std::path::absolute(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let owner = owner.to_string();
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&work_dir) else {
            return CleanedUp::default();
        };
        let attempts: Vec<TaskPaths> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| TaskPaths::new(&e.path()))
            .filter(|p| {
                p.work.is_dir() && std::fs::read_to_string(p.owner()).is_ok_and(|o| o == owner)
            })
            .collect();
        let mut done = CleanedUp::default();
        if attempts.is_empty() {
            return done;
        }
        let works: HashSet<Vec<u8>> = attempts
            .iter()
            .map(|p| p.work.as_os_str().as_encoded_bytes().to_vec())
            .collect();
        done.killed = kill_leftovers(Path::new(procs::ROOT), &works);
        if remove_dirs {
            for p in &attempts {
                match remove_tree(&p.root) {
                    Ok(()) => done.removed += 1,
                    Err(e) => {
                        tracing::warn!(dir = %p.root.display(), error = %e, "cannot remove a stale task directory")
                    }
                }
            }
        }
        done
    })
    .await
    .unwrap_or_default()
}

/// SIGKILLs every live process whose `GPUFLEET_OUTPUT_DIR` is one of
/// `works`: the processes a task starts inherit it. Rescans, since a process
/// may fork while a scan runs. Returns how many were killed. Blocking.
fn kill_leftovers(proc_root: &Path, works: &HashSet<Vec<u8>>) -> usize {
    const VAR: &[u8] = b"GPUFLEET_OUTPUT_DIR=";
    let me = std::process::id() as i32;
    let mut killed = HashSet::new();
    for _ in 0..5 {
        let Ok(processes) = procs::processes(proc_root) else {
            break;
        };
        let mut found = 0;
        for (pid, dir) in processes {
            if pid == me {
                continue;
            }
            let Some(environ) = procs::environ(&dir) else {
                continue;
            };
            let ours = environ
                .split(|&b| b == 0)
                .filter_map(|var| var.strip_prefix(VAR))
                .any(|dir| works.contains(dir));
            if !ours {
                continue;
            }
            let dead = procs::stat(&dir).is_some_and(|s| s.is_dead());
            if !dead && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                found += 1;
                killed.insert(pid);
            }
        }
        if found == 0 {
            break;
        }
    }
    killed.len()
}

/// Removes an attempt's directory; one already gone is fine.
pub async fn remove_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || remove_tree(&dir))
        .await
        .map_err(io::Error::other)?
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            // A task may leave directories without write permission.
            make_dirs_writable(dir);
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
        Err(e) => Err(e),
    }
}

fn make_dirs_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // symlink_metadata: never follow a link out of the tree.
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mut perms = meta.permissions();
    perms.set_mode(perms.mode() | 0o700);
    let _ = std::fs::set_permissions(dir, perms);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_dirs_writable(&entry.path());
        }
    }
}

/// Makes the task's directories (the task user's), clears a result left
/// from before, and takes the task's cgroup, in one trip to the blocking
/// pool: each trip is a handful of context switches, which short tasks
/// notice.
async fn prepare(paths: &TaskPaths, isolation: &Arc<Isolation>) -> io::Result<Option<TaskCgroup>> {
    let paths = paths.clone();
    let isolation = isolation.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&paths.work)?;
        std::fs::create_dir_all(paths.meta())?;
        // A result left by an earlier run in the same directory must not count.
        match std::fs::remove_file(&paths.result) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Created empty so that the task may simply append to it.
        let events = dirs::create_task_file(&paths.events)?;
        if let Some(u) = &isolation.user {
            let (uid, gid) = (Some(u.uid), Some(u.gid));
            std::os::unix::fs::lchown(&paths.work, uid, gid)?;
            std::os::unix::fs::lchown(paths.meta(), uid, gid)?;
            std::os::unix::fs::fchown(&events, uid, gid)?;
        }
        isolation
            .cgroups
            .as_ref()
            .map(|c| {
                c.take()
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot make its cgroup: {e}")))
            })
            .transpose()
    })
    .await
    .map_err(io::Error::other)?
}

fn join_list<T: ToString>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// What to start for a task: its program, looked up on the task's `PATH`,
/// as the task's user, in its cgroup, with the environment of the contract:
/// the allowlisted variables of the worker's, the job's, then ours.
fn process_spec(task: &TaskRun, paths: &TaskPaths, cgroup: Option<&TaskCgroup>) -> spawn::Spec {
    use std::os::fd::AsRawFd;
    let spec = &task.spec;
    let isolation = &task.isolation;
    let mut env = isolation.base_env.clone();
    if let Some(u) = &isolation.user {
        // The worker's HOME is not the task user's.
        let home = u.home.clone().unwrap_or_else(|| paths.work.clone());
        env.insert("HOME".into(), home.into_os_string());
    }
    let mut set = |k: &str, v: &str| {
        env.insert(k.into(), v.into());
    };
    for (k, v) in &spec.env {
        set(k, v);
    }
    set("GPUFLEET_JOB_ID", task.job_id.as_str());
    set("GPUFLEET_TASK_ID", task.task_id.as_str());
    set("GPUFLEET_ATTEMPT", &task.attempt.to_string());
    // Empty, not unset: unset would show a CPU task every GPU.
    set(
        "CUDA_VISIBLE_DEVICES",
        &join_list(task.gpus.iter().map(|g| g.index)),
    );
    set("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    set(
        "GPUFLEET_GPUS",
        &join_list(task.gpus.iter().map(|g| &g.uuid)),
    );
    if let Some(r) = &task.rendezvous {
        set("GPUFLEET_RANK", &r.rank.to_string());
        set("GPUFLEET_WORLD_SIZE", &r.world_size.to_string());
        set("MASTER_ADDR", &r.master_addr);
        set("MASTER_PORT", &r.master_port.to_string());
    }
    for (k, p) in [
        ("GPUFLEET_RESULT", &paths.result),
        ("GPUFLEET_EVENTS", &paths.events),
        ("GPUFLEET_INBOX", &paths.inbox),
        ("GPUFLEET_OUTBOX", &paths.outbox),
        ("GPUFLEET_CONTROL", &paths.control),
        ("GPUFLEET_OUTPUT_DIR", &paths.work),
    ] {
        env.insert(k.into(), p.clone().into_os_string());
    }
    spawn::Spec {
        program: PathBuf::from(&spec.command[0]),
        search_path: env.get(std::ffi::OsStr::new("PATH")).cloned(),
        args: spec.command.iter().map(Into::into).collect(),
        env: env.into_iter().collect(),
        cwd: paths.work.clone(),
        user: isolation.user.as_ref().map(|u| (u.uid, u.gid)),
        max_processes: isolation.max_processes,
        cgroup_procs: cgroup.and_then(|c| c.procs_fd()).map(|fd| fd.as_raw_fd()),
    }
}

/// A request to the spawner thread.
struct SpawnJob {
    spec: spawn::Spec,
    reply: tokio::sync::oneshot::Sender<io::Result<spawn::Started>>,
}

/// Starts a task's process from one thread that lives as long as the
/// process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that started the child exits,
/// not the process. A runtime thread can end while its children run (a
/// worker thread turned into a blocking one by `block_in_place` retires
/// after idling), which would kill healthy tasks. Starting also blocks
/// until the exec, which this keeps off the runtime.
async fn start(spec: spawn::Spec) -> io::Result<spawn::Started> {
    static SPAWNER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("gpufleet-spawner".into())
            .spawn(move || {
                for job in rx {
                    let spawned = spawn::spawn(&job.spec);
                    if let Err(Ok(started)) = job.reply.send(spawned) {
                        // The caller is gone: nobody will supervise it.
                        let _ = killpg(Pid::from_raw(started.pid), Signal::SIGKILL);
                        let _ = spawn::wait_blocking(started.pid);
                    }
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the spawner thread; tasks are started from runtime threads");
                None
            }
        }
    });
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = SpawnJob { spec, reply };
    let job = match spawner {
        Some(tx) => match tx.send(job) {
            Ok(()) => {
                return answer
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")))
            }
            Err(std::sync::mpsc::SendError(job)) => job,
        },
        None => job,
    };
    spawn::spawn(&job.spec)
}

/// The read end of a task's pipe, for the runtime. `None` (and the pipe
/// closed, so the task gets EPIPE rather than blocking) if it cannot be.
fn reader(fd: std::os::fd::OwnedFd) -> Option<tokio::net::unix::pipe::Receiver> {
    match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a task's output pipe");
            None
        }
    }
}

/// The task's process group and cgroup; SIGKILLs them if dropped while
/// armed, so that a cancelled [`run`] leaves nothing behind.
struct Group {
    pgid: Pid,
    cgroup: Option<Arc<TaskCgroup>>,
    armed: bool,
}

impl Group {
    fn signal(&self, sig: Signal) {
        match killpg(self.pgid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pgid = self.pgid.as_raw(), signal = %sig, error = %e, "cannot signal task group")
            }
        }
        if let Some(c) = &self.cgroup {
            c.signal(sig);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Whether the group leader has exited, without reaping it.
fn leader_exited(pgid: Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(pgid), flags) {
        Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => false,
        Ok(_) => true,
        Err(e) => {
            // ECHILD: someone else reaped it; there is nothing to wait for.
            tracing::warn!(pid = pgid.as_raw(), error = %e, "cannot wait for the task process");
            true
        }
    }
}

/// Escalation state: what ended the task and when SIGKILL is due.
struct Ending<'a> {
    group: &'a Group,
    grace: Duration,
    /// The grace when the lease could not be renewed.
    fence_grace: Duration,
    ender: Option<Ender>,
    kill_at: Option<Instant>,
}

impl Ending<'_> {
    fn begin(&mut self, why: Ender) {
        if why == Ender::Stop(StopReason::Fenced) {
            // Another attempt may run: no grace.
            self.kill_now(why);
            return;
        }
        if why == Ender::Stop(StopReason::LostContact) {
            // Gone before the lease can lapse, whatever stop is under way.
            let by = Instant::now().checked_add(self.fence_grace);
            match self.ender {
                None => {
                    self.ender = Some(why);
                    if self.fence_grace.is_zero() {
                        self.group.signal(Signal::SIGKILL);
                    } else {
                        self.group.signal(Signal::SIGTERM);
                        self.kill_at = by;
                    }
                }
                // Already killed.
                Some(_) if self.kill_at.is_none() => {}
                Some(_) => self.kill_at = self.kill_at.map(|k| by.map_or(k, |b| k.min(b))),
            }
            return;
        }
        match self.ender {
            None => {}
            // A cancel is final, unlike a drain that will retry the task;
            // a preemption says why (the task was already told to stop).
            Some(Ender::Stop(StopReason::Drain))
                if matches!(
                    why,
                    Ender::Stop(StopReason::Cancel | StopReason::Preempt { .. })
                ) =>
            {
                self.ender = Some(why);
                return;
            }
            Some(_) => return,
        }
        self.ender = Some(why);
        let grace = match why {
            Ender::Stop(StopReason::Preempt { grace }) => grace,
            _ => self.grace,
        };
        if grace.is_zero() {
            self.group.signal(Signal::SIGKILL);
        } else {
            self.group.signal(Signal::SIGTERM);
            self.kill_at = Instant::now().checked_add(grace);
        }
    }

    fn kill_now(&mut self, why: Ender) {
        match self.ender {
            // Losing the lease outranks whatever stop was under way.
            Some(_) if why == Ender::Stop(StopReason::Fenced) => self.ender = Some(why),
            Some(_) => {}
            None => self.ender = Some(why),
        }
        self.kill_at = None;
        self.group.signal(Signal::SIGKILL);
    }
}

/// Waits for the main process to exit, ending it on timeout, stop or
/// memory; returns what made us end it, if anything.
async fn supervise(
    group: &Group,
    stop: &mut watch::Receiver<Option<StopReason>>,
    timeout: Option<Duration>,
    (grace, fence_grace): (Duration, Duration),
    mut monitor: Option<AbortOnDropHandle<Option<(u64, u64)>>>,
    mut exit_watch: spawn::ExitWatch,
) -> Option<Ender> {
    // A timeout too long to add to the clock is no timeout at all.
    let timeout_at = timeout.and_then(|t| Some((Instant::now().checked_add(t)?, t)));
    // The poll only guards against a missed wake-up.
    let poll = exit_watch.poll_every();
    let mut ending = Ending {
        group,
        grace,
        fence_grace,
        ender: None,
        kill_at: None,
    };
    let mut stop_open = true;
    while !leader_exited(group.pgid) {
        let timing_out = timeout_at.filter(|_| ending.ender.is_none());
        let kill_at = ending.kill_at;
        tokio::select! {
            _ = exit_watch.changed() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = sleep_until_opt(timing_out.map(|(at, _)| at)), if timing_out.is_some() => {
                if let Some((_, t)) = timing_out {
                    ending.begin(Ender::Timeout(t));
                }
            }
            changed = stop.changed(), if stop_open => match changed {
                Ok(()) => {
                    let reason = *stop.borrow_and_update();
                    if let Some(reason) = reason {
                        ending.begin(Ender::Stop(reason));
                    }
                }
                // Nobody can ask us to stop any more.
                Err(_) => stop_open = false,
            },
            _ = sleep_until_opt(kill_at), if kill_at.is_some() => {
                ending.kill_at = None;
                group.signal(Signal::SIGKILL);
            }
            over = join_opt_mut(&mut monitor), if monitor.is_some() => {
                monitor = None;
                if let Some(Some((used, limit))) = over {
                    ending.kill_now(Ender::Memory { used, limit });
                }
            }
        }
    }
    ending.ender
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The task's output, `None` if it panicked or was aborted.
async fn join_opt<T>(h: Option<JoinHandle<T>>) -> Option<T> {
    h?.await.ok()
}

async fn join_opt_mut<T>(h: &mut Option<AbortOnDropHandle<T>>) -> Option<T> {
    match h {
        Some(h) => h.await.ok(),
        None => std::future::pending().await,
    }
}

/// Samples the group's memory until it is over `limit`; returns
/// `(used, limit)` then, or `None` if it cannot be measured.
async fn watch_memory(pgid: Pid, limit: u64, every: Duration) -> Option<(u64, u64)> {
    let probe: Arc<dyn memory::MemoryProbe> = Arc::from(memory::probe_for_group(pgid));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = probe.clone();
        match tokio::task::spawn_blocking(move || p.usage()).await {
            Ok(Ok(used)) if used > limit => return Some((used, limit)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(pgid = pgid.as_raw(), error = %e, "cannot measure task memory; its memory limit is not enforced");
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// Waits until no live process is left in the group (zombies do not count:
/// they hold no resources and go when reaped).
async fn wait_group_gone(pgid: Pid) {
    // Most tasks leave nobody behind: with the leader reaped, an empty
    // group answers ESRCH at once, without scanning /proc.
    if killpg(pgid, None) == Err(nix::errno::Errno::ESRCH) {
        return;
    }
    let deadline = Instant::now() + GROUP_EXIT_WAIT;
    loop {
        let scan = tokio::task::spawn_blocking(move || {
            procs::group_members(Path::new(procs::ROOT), pgid.as_raw())
        })
        .await;
        let alive = match scan {
            Ok(Ok(members)) => members.iter().any(|m| m.state != 'Z' && m.state != 'X'),
            _ => return,
        };
        if !alive {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                pgid = pgid.as_raw(),
                "task processes still alive after SIGKILL"
            );
            return;
        }
        // Dying takes the kernel a moment; there is no event to wait on.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// State and words for an end we caused.
fn describe_end(ender: &Ender) -> (TaskState, String) {
    match *ender {
        Ender::Timeout(t) => (TaskState::TimedOut, format!("timed out after {}", Dur(t))),
        Ender::Stop(StopReason::Cancel) => (TaskState::Cancelled, "cancelled".into()),
        Ender::Stop(StopReason::Drain) => (TaskState::Interrupted, "worker is draining".into()),
        Ender::Stop(StopReason::Fenced) => (TaskState::Cancelled, "lease lost".into()),
        Ender::Stop(StopReason::Preempt { .. }) => (
            TaskState::Interrupted,
            "preempted: stopped for waiting work of a higher priority".into(),
        ),
        Ender::Stop(StopReason::LostContact) => (
            TaskState::Interrupted,
            "the worker lost contact with NATS and could not renew the lease, so it stopped the task before the lease could lapse".into(),
        ),
        Ender::Watchdog => (
            TaskState::Interrupted,
            "the worker did not renew the lease in time (it was frozen, or cut off from NATS), so its watchdog stopped the task before the lease could lapse".into(),
        ),
        Ender::Memory { used, limit } => (
            TaskState::Interrupted,
            format!(
                "memory limit exceeded: the task used {used} bytes, more than its limit of {limit} bytes"
            ),
        ),
    }
}

/// The end state, exit code, signal and error of a finished task: ours to
/// name if we ended it, else by what it did (see `classify.rs`).
fn classify(
    ender: Option<&Ender>,
    status: Result<&ExitStatus, &io::Error>,
    stderr_tail: &[u8],
    oom_kills: Option<OomKills>,
) -> (TaskState, Option<i32>, Option<i32>, Option<String>) {
    let Some(ender) = ender else {
        return classify::classify_exit(status, stderr_tail, oom_kills);
    };
    let (state, error) = describe_end(ender);
    let (code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    (state, code, signal, Some(error))
}

/// The task's result: `Ok(None)` when it wrote none, `Err` with words when
/// the file is unusable.
async fn read_result(path: &Path, max: u64) -> Result<Option<serde_json::Value>, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || read_result_blocking(&path, max))
        .await
        .map_err(|e| format!("cannot read the result file: {e}"))?
}

fn read_result_blocking(path: &Path, max: u64) -> Result<Option<serde_json::Value>, String> {
    use std::io::Read;
    let file = match open_task_file(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the result file: {e}")),
    };
    let too_big = |n: u64| format!("result file is {n} bytes, more than the limit of {max}");
    let len = file.metadata().map_or(0, |m| m.len());
    if len > max {
        return Err(too_big(len));
    }
    let mut bytes = Vec::new();
    // The task may still be growing it through a stray process.
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the result file: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("result file is not valid JSON: {e}"))
}
