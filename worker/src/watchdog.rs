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

/// Puts a message on the queue without waiting.
#[derive(Clone)]
struct Lines(mpsc::Sender<Vec<u8>>);

impl Lines {
    fn send(&self, msg: &Msg) {
        let Some(line) = wire::encode(msg) else {
            tracing::warn!(?msg, "a message the watchdog cannot take");
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.0.try_send(line) {
            tracing::warn!("the watchdog is not reading: a message to it was dropped");
        }
    }
}

/// The worker's end of its watchdog.
pub struct Watchdog {
    lines: Lines,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<bool>>>>,
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
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("the watchdog's pipes are missing"));
        };
        tracing::info!(pid = child.id(), "watchdog started");
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if let Err(e) = stdin.write_all(&line).await {
                    tracing::error!(error = %e, "cannot write to the watchdog");
                    return;
                }
            }
        });
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<bool>>>> = Arc::default();
        let answers = pending.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Some((id, signalled)) = wire::decode_forgotten(line.trim_ascii_end()) else {
                    continue;
                };
                let waiting = answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(w) = waiting {
                    let _ = w.send(signalled);
                }
            }
            // Those waiting for an answer get none.
            answers.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let status = child.wait().await;
            tracing::error!(
                ?status,
                "the watchdog exited: the tasks of a frozen worker will run on until it resumes"
            );
        });
        let lines = Lines(tx);
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
                AbortOnDropHandle::new(writer),
                AbortOnDropHandle::new(reader),
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
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<bool>>>>,
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
