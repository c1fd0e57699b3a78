//! A watchdog outside the worker: a frozen worker (SIGSTOP, a stall)
//! cannot stop its own tasks, so a process of its own does.
//!
//! The in-process fence ([`crate::fence`]) stops a task once no renewal of
//! its lease (or of the advert) was confirmed for nearly their TTL. It runs
//! inside the worker, so it stops with it. The watchdog is the worker's
//! binary run again in a mode of its own ([`serve_if_asked`]), in a
//! process group of its own (so a SIGSTOP of the worker, or of the worker's
//! whole group, does not reach it), with nothing of the worker's
//! environment and no NATS. Over a pipe the worker tells it, for each
//! task, its process group and cgroup and the deadline by which it must be
//! gone unless a confirmed renewal moves it ([`wire`]); the watchdog
//! SIGTERMs the task's group and cgroup the fence grace before that and
//! SIGKILLs them at it ([`table`]). Every confirmed renewal and advert
//! moves the deadlines, computed as the in-process fence computes its own
//! ([`crate::core::fence_margin`]), so that a healthy worker cut off from
//! NATS stops its task by itself at the same moment.
//!
//! When the worker dies (kill -9, a crash) the pipe ends and the watchdog
//! kills every task it watches, with what they started (their groups and
//! cgroups), where `PR_SET_PDEATHSIG` reaches only each main process.
//!
//! A task's end: before the worker reaps the group leader it asks the
//! watchdog to forget the task, and learns whether the watchdog signalled
//! it (the end is then reported as the watchdog's, never as the task's
//! own). Until the leader is reaped its pid cannot be reused; the watchdog
//! holds a pidfd of it and signals nothing once it is reaped.
//!
//! A watchdog that dies (killed, out of memory) is started again, after a
//! pause that doubles up to [`RESTART_MAX`] while it keeps dying, and told
//! what its predecessor knew: the newest advert and every watched task
//! with its newest deadline ([`Told`]). Tasks stay unguarded only for that
//! pause.
//!
//! Not covered: a freeze of the whole machine or container (cgroup freezer,
//! VM pause) stops the watchdog with the tasks; on thaw both run, and the
//! watchdog, its deadlines past, kills at once.

mod serve;
pub mod table;
pub mod wire;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::fence::Confirmed;
pub use serve::monotonic_now;
use wire::Msg;

/// The argument that makes the worker's binary a watchdog.
const ARG: &str = "--gpufleet-watchdog";

/// The watchdog's process name (`comm`, at most 15 bytes), as `ps` and
/// `top` show it.
pub const NAME: &str = "worker-watchdog";

/// Lines waiting for the watchdog. Only a watchdog that stopped reading
/// fills it; what does not fit then is dropped.
const QUEUE: usize = 4096;

/// How long a task's end waits for the watchdog to answer.
const FORGET_WAIT: Duration = Duration::from_secs(2);

static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Call first thing in the worker binary's `main`: run as the watchdog
/// if asked to (never returns then), else note that this binary can be
/// one. A program that embeds the worker without calling this (a test, a
/// benchmark) runs without a watchdog.
pub fn serve_if_asked() {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(ARG)) {
        std::process::exit(serve::serve());
    }
    AVAILABLE.store(true, Ordering::SeqCst);
}

/// Nanoseconds of `CLOCK_MONOTONIC` at `at` (tokio's instants are on it,
/// but do not say their value).
fn monotonic(at: Instant) -> u64 {
    let (now, mono) = (Instant::now(), monotonic_now());
    if at >= now {
        mono.saturating_add((at - now).as_nanos() as u64)
    } else {
        mono.saturating_sub((now - at).as_nanos() as u64)
    }
}

/// Until when an entry with `ttl` whose last confirmed write was sent at
/// `sent` is sure to live, less the fence's margin.
fn until(sent: Instant, ttl: Duration) -> u64 {
    let margin = crate::core::fence_margin(ttl);
    monotonic(sent).saturating_add(ttl.saturating_sub(margin).as_nanos() as u64)
}

/// The first pause before a watchdog that died is started again.
const RESTART_FIRST: Duration = Duration::from_secs(1);

/// The longest pause between restarts of a watchdog that keeps dying.
const RESTART_MAX: Duration = Duration::from_secs(30);

/// A watchdog that lived this long was fine: the next restart pauses
/// [`RESTART_FIRST`] again.
const RESTART_RESET: Duration = Duration::from_secs(60);

/// What the watchdog has been told that still holds, for telling a new
/// one: the newest advert deadline and each watched task's `Watch` with
/// its newest deadline.
#[derive(Debug, Default)]
struct Told {
    advert: Option<u64>,
    watched: HashMap<u64, Msg>,
}

impl Told {
    fn note(&mut self, msg: &Msg) {
        match msg {
            Msg::Advert { until } => {
                self.advert = Some(self.advert.map_or(*until, |a| a.max(*until)));
            }
            Msg::Watch { id, .. } => {
                self.watched.insert(*id, msg.clone());
            }
            Msg::Lease { id, until } => {
                if let Some(Msg::Watch { until: u, .. }) = self.watched.get_mut(id) {
                    *u = (*u).max(*until);
                }
            }
            Msg::Forget { id } => {
                self.watched.remove(id);
            }
        }
    }

    /// The messages that tell a new watchdog all of it.
    fn replay(&self) -> Vec<Msg> {
        let advert = self.advert.map(|until| Msg::Advert { until });
        advert
            .into_iter()
            .chain(self.watched.values().cloned())
            .collect()
    }
}

/// Puts a message on the queue without waiting, and notes it for a
/// watchdog started again.
#[derive(Clone)]
struct Lines {
    tx: mpsc::Sender<Vec<u8>>,
    told: Arc<Mutex<Told>>,
}

impl Lines {
    fn send(&self, msg: &Msg) {
        let Some(line) = wire::encode(msg) else {
            tracing::warn!(?msg, "a message the watchdog cannot take");
            return;
        };
        // Noted and queued under one lock: a restart that takes the lock
        // finds every queued line already in what it replays.
        let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
        told.note(msg);
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(line) {
            tracing::warn!("the watchdog is not reading: a message to it was dropped");
        }
    }
}

/// One running watchdog process and its pipes.
struct Process {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: BufReader<tokio::process::ChildStdout>,
    started: Instant,
}

impl Process {
    fn spawn() -> std::io::Result<Process> {
        // /proc/self/exe: the binary running now, even if replaced on disk.
        let mut child = tokio::process::Command::new("/proc/self/exe")
            .arg0("gpufleet-worker")
            .arg(ARG)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Not frozen, nor stopped, with the worker's process group.
            .process_group(0)
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("the watchdog's pipes are missing"));
        };
        tracing::info!(pid = child.id(), "watchdog started");
        Ok(Process {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            started: Instant::now(),
        })
    }

    /// Passes queued lines to the watchdog and its answers to those
    /// waiting, until it exits or its pipes break (true), or until nobody
    /// can queue a line any more (false: the worker is done with it).
    async fn serve(&mut self, rx: &mut mpsc::Receiver<Vec<u8>>, answers: &Pending) -> bool {
        let mut line = Vec::new();
        loop {
            tokio::select! {
                queued = rx.recv() => {
                    let Some(queued) = queued else { return false };
                    if let Err(e) = self.stdin.write_all(&queued).await {
                        tracing::error!(error = %e, "cannot write to the watchdog");
                        return true;
                    }
                }
                read = self.stdout.read_until(b'\n', &mut line) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        return true;
                    }
                    if let Some((id, signalled)) = wire::decode_forgotten(line.trim_ascii_end()) {
                        let waiting = answers.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        if let Some(w) = waiting {
                            let _ = w.send(signalled);
                        }
                    }
                    line.clear();
                }
            }
        }
    }

    /// Tells a new watchdog what its predecessor knew. The lines queued
    /// meanwhile are dropped: what they said is in `told` already (see
    /// [`Lines::send`]), and an old deadline written after the replay
    /// would set a watched task back.
    async fn replay(&mut self, rx: &mut mpsc::Receiver<Vec<u8>>, told: &Mutex<Told>) -> bool {
        let lines: Vec<Vec<u8>> = {
            let told = told.lock().unwrap_or_else(|e| e.into_inner());
            while rx.try_recv().is_ok() {}
            told.replay().iter().filter_map(wire::encode).collect()
        };
        for line in lines {
            if let Err(e) = self.stdin.write_all(&line).await {
                tracing::error!(error = %e, "cannot write to the watchdog");
                return false;
            }
        }
        true
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<bool>>>>;

/// Serves the watchdog `first`, and starts another each time one dies.
async fn supervise(
    first: Process,
    mut rx: mpsc::Receiver<Vec<u8>>,
    answers: Pending,
    told: Arc<Mutex<Told>>,
) {
    let mut process = first;
    let mut pause = RESTART_FIRST;
    loop {
        let exited = process.serve(&mut rx, &answers).await;
        // Those waiting for an answer get none.
        answers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if !exited {
            // A watchdog whose stdin closes stops what it still watches,
            // as when the worker is gone, and exits: reap it.
            let Process {
                mut child, stdin, ..
            } = process;
            drop(stdin);
            let _ = child.wait().await;
            return;
        }
        let _ = process.child.start_kill();
        let status = process.child.wait().await;
        if process.started.elapsed() >= RESTART_RESET {
            pause = RESTART_FIRST;
        }
        tracing::error!(
            ?status,
            restart_in = ?pause,
            "the watchdog exited: the tasks of a frozen worker run on unguarded until another is started"
        );
        process = loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RESTART_MAX);
            match Process::spawn() {
                Ok(mut p) => {
                    if p.replay(&mut rx, &told).await {
                        break p;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, restart_in = ?pause, "cannot start the watchdog again");
                }
            }
        };
    }
}

/// The worker's end of its watchdog.
pub struct Watchdog {
    lines: Lines,
    pending: Pending,
    next: AtomicU64,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog, if this binary can be one, and keeps it told
    /// of `advert` (stored with `advert_ttl`). `None` (and a warning) if
    /// it cannot be started.
    pub fn start_if_available(advert: Arc<Confirmed>, advert_ttl: Duration) -> Option<Watchdog> {
        if !AVAILABLE.load(Ordering::SeqCst) {
            return None;
        }
        match Watchdog::start(advert, advert_ttl) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the watchdog: the tasks of a frozen worker will run on until it resumes");
                None
            }
        }
    }

    fn start(advert: Arc<Confirmed>, advert_ttl: Duration) -> std::io::Result<Watchdog> {
        let first = Process::spawn()?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let pending: Pending = Arc::default();
        let told: Arc<Mutex<Told>> = Arc::default();
        let supervisor = tokio::spawn(supervise(first, rx, pending.clone(), told.clone()));
        let lines = Lines { tx, told };
        let told = lines.clone();
        let follow = tokio::spawn(async move {
            advert
                .follow(|sent| {
                    told.send(&Msg::Advert {
                        until: until(sent, advert_ttl),
                    })
                })
                .await
        });
        Ok(Watchdog {
            lines,
            pending,
            next: AtomicU64::new(1),
            _tasks: vec![
                AbortOnDropHandle::new(supervisor),
                AbortOnDropHandle::new(follow),
            ],
        })
    }

    /// A fence for one attempt, whose lease (stored with `ttl`) is
    /// `confirmed`, to be asked to stop `grace` before its deadline.
    pub fn fence(&self, confirmed: Arc<Confirmed>, ttl: Duration, grace: Duration) -> Fence {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(FenceState {
            until: until(confirmed.last(), ttl),
            watched: false,
        }));
        let (lines, shared) = (self.lines.clone(), state.clone());
        let follow = tokio::spawn(async move {
            confirmed
                .follow(|sent| {
                    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    s.until = until(sent, ttl);
                    if s.watched {
                        lines.send(&Msg::Lease { id, until: s.until });
                    }
                })
                .await
        });
        Fence {
            id,
            grace: grace.as_nanos() as u64,
            lines: self.lines.clone(),
            pending: self.pending.clone(),
            state,
            _follow: AbortOnDropHandle::new(follow),
        }
    }
}

struct FenceState {
    /// Until when the lease is confirmed, on `CLOCK_MONOTONIC`.
    until: u64,
    /// Whether the watchdog watches the task's process group now.
    watched: bool,
}

/// One attempt's entry in the watchdog. Dropped while watched, it tells
/// the watchdog to forget the task.
pub struct Fence {
    id: u64,
    grace: u64,
    lines: Lines,
    pending: Pending,
    state: Arc<Mutex<FenceState>>,
    _follow: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("id", &self.id).finish()
    }
}

impl Fence {
    /// The task runs: its process group `pgid` (whose leader's pid it is)
    /// and its `cgroup` are to be stopped by the deadline.
    pub fn watch(&self, pgid: i32, cgroup: Option<&Path>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.watched = true;
        self.lines.send(&Msg::Watch {
            id: self.id,
            pgid,
            until: s.until,
            grace: self.grace,
            cgroup: cgroup.map(Path::to_path_buf),
        });
    }

    /// The task's group leader has exited and is not reaped yet: the
    /// watchdog forgets it. Returns whether the watchdog had signalled it
    /// (false if the watchdog does not answer).
    pub async fn forget(&self) -> bool {
        let answer = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !std::mem::replace(&mut s.watched, false) {
                return false;
            }
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.id, tx);
            self.lines.send(&Msg::Forget { id: self.id });
            rx
        };
        let signalled = tokio::time::timeout(FORGET_WAIT, answer).await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        matches!(signalled, Ok(Ok(true)))
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.watched {
            self.lines.send(&Msg::Forget { id: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(id: u64, until: u64) -> Msg {
        Msg::Watch {
            id,
            pgid: 100 + id as i32,
            until,
            grace: 5,
            cgroup: None,
        }
    }

    #[test]
    fn a_new_watchdog_is_told_the_newest_advert_and_each_watched_task_s_newest_deadline() {
        let mut told = Told::default();
        for msg in [
            Msg::Advert { until: 50 },
            watch(1, 10),
            watch(2, 20),
            watch(3, 30),
            Msg::Lease { id: 1, until: 40 },
            // A renewal confirmed late says nothing new.
            Msg::Lease { id: 2, until: 15 },
            Msg::Forget { id: 3 },
            Msg::Advert { until: 45 },
            // A lease of a task no longer watched is not watched again.
            Msg::Lease { id: 3, until: 60 },
        ] {
            told.note(&msg);
        }
        let mut replay = told.replay();
        replay.sort_by_key(|m| match m {
            Msg::Advert { .. } => 0,
            Msg::Watch { id, .. } => *id,
            other => panic!("{other:?} replayed"),
        });
        assert_eq!(
            replay,
            vec![Msg::Advert { until: 50 }, watch(1, 40), watch(2, 20)]
        );
    }

    #[test]
    fn nothing_told_replays_nothing() {
        assert!(Told::default().replay().is_empty());
    }
}
