//! The watchdog process: reads the worker's messages on stdin, signals
//! each task's process group (and cgroup) when its deadline comes, and
//! kills every task it knows when stdin reaches its end (the worker is
//! gone). One thread, `poll(2)` with the next deadline as its timeout; no
//! runtime, no NATS.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::table::{Act, Table};
use super::wire::{self, Msg, MAX_LINE};

/// Garbage lines logged before the watchdog stops saying so.
const BAD_LINES_LOGGED: u64 = 20;

/// What is signalled for one task.
struct Target {
    pgid: i32,
    cgroup: Option<PathBuf>,
    /// The group leader's pidfd: while it still names a process (a zombie
    /// counts), the worker has not reaped the leader, so the group id and
    /// the cgroup are still this task's and not reused by another.
    leader: Option<OwnedFd>,
    /// Whether a signal of ours reached the leader while it still ran:
    /// only then did the watchdog end the task (one that had exited on
    /// its own just before its deadline did not).
    ended: bool,
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn log(what: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "gpufleet-worker watchdog: {what}");
}

/// Runs the watchdog on stdin and stdout until stdin ends; returns the
/// exit code.
pub fn serve() -> i32 {
    // Nothing here is secret, but a task of the worker's user has no
    // business reading it either.
    let _ = crate::isolation::make_non_dumpable();
    // Named for `ps`, rather than after `/proc/self/exe`.
    if let Ok(name) = std::ffi::CString::new(super::NAME) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of ours.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    }
    // Answers must never block the watchdog: one the worker cannot take
    // now is dropped (the worker then stops waiting for it).
    // SAFETY: fcntl on our own stdout.
    unsafe {
        let flags = libc::fcntl(1, libc::F_GETFL);
        libc::fcntl(1, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut table: Table<Target> = Table::default();
    let mut buf = vec![0u8; 2 * MAX_LINE];
    let mut len = 0;
    // Inside a line too long to be a message: skipped to its end.
    let mut skipping = false;
    let mut bad = 0u64;
    loop {
        let now = monotonic_now();
        for (act, target) in table.due(now) {
            log(format_args!(
                "no renewal confirmed in time: {} task group {}",
                if act == Act::Term {
                    "stopping"
                } else {
                    "killing"
                },
                target.pgid
            ));
            signal(target, act);
        }
        let timeout = match table.next_due() {
            None => -1,
            Some(at) => {
                let ms = at.saturating_sub(monotonic_now()).div_ceil(1_000_000);
                ms.min(i32::MAX as u64) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if ready <= 0 {
            // A deadline (or EINTR): back to the top.
            continue;
        }
        // SAFETY: reading into the free end of our buffer.
        let n = unsafe { libc::read(0, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            // The worker is gone (or its end of the pipe is): nobody will
            // renew these leases or stop these tasks.
            let all = table.kill_all();
            if !all.is_empty() {
                log(format_args!(
                    "the worker is gone: killing its {} tasks",
                    all.len()
                ));
            }
            for target in all {
                signal(target, Act::Kill);
            }
            return 0;
        }
        len += n as usize;
        let mut start = 0;
        while let Some(nl) = buf[start..len].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if std::mem::take(&mut skipping) {
                continue;
            }
            match wire::decode(line) {
                Ok(msg) => handle(&mut table, msg),
                Err(e) => {
                    bad += 1;
                    if bad <= BAD_LINES_LOGGED {
                        log(format_args!("ignoring a line that is not a message: {e}"));
                    }
                }
            }
        }
        buf.copy_within(start..len, 0);
        len -= start;
        if len == buf.len() {
            // No message is this long.
            len = 0;
            skipping = true;
            bad += 1;
        }
    }
}

fn handle(table: &mut Table<Target>, msg: Msg) {
    match msg {
        Msg::Advert { until } => table.advert(until),
        Msg::Lease { id, until } => table.lease(id, until),
        Msg::Watch {
            id,
            pgid,
            until,
            grace,
            cgroup,
        } => {
            let leader = match pidfd_open(pgid) {
                Ok(fd) => Some(fd),
                // Already reaped: nothing of it is left to guard.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
                // An older kernel: signalled by group id alone.
                Err(_) => None,
            };
            let target = Target {
                pgid,
                cgroup,
                leader,
                ended: false,
            };
            if !table.watch(id, until, grace, target) {
                log(format_args!(
                    "cannot watch task group {pgid}: already watching {} tasks",
                    table.len()
                ));
            }
        }
        Msg::Forget { id } => {
            let signalled = match table.forget(id) {
                // Without a pidfd (an older kernel) whether it still ran is
                // unknown: it counts as ended by the watchdog if signalled.
                Some((t, signalled)) => t.ended || (signalled && t.leader.is_none()),
                None => false,
            };
            // Dropped if the pipe is full: the worker stops waiting.
            let answer = wire::encode_forgotten(id, signalled);
            // SAFETY: writing our own buffer to our own stdout.
            unsafe { libc::write(1, answer.as_ptr().cast(), answer.len()) };
        }
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process `pidfd` names has exited (a zombie has).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// Whether the process `pidfd` names has not been reaped.
fn unreaped(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 checks without sending; a NULL info is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn signal(target: &mut Target, act: Act) {
    if let Some(leader) = &target.leader {
        if !unreaped(leader) {
            // The task ended and was reaped while its forget was on its way.
            return;
        }
        target.ended |= !exited(leader);
    }
    let sig = match act {
        Act::Term => libc::SIGTERM,
        Act::Kill => libc::SIGKILL,
    };
    // SAFETY: a plain kill of a process group we were told to guard.
    unsafe { libc::killpg(target.pgid, sig) };
    if let Some(c) = &target.cgroup {
        signal_cgroup(c, act, sig);
    }
}

/// Signals what the task's cgroup holds: processes that left its group
/// are still in it.
fn signal_cgroup(dir: &Path, act: Act, sig: i32) {
    // `cgroup.kill` (v2) also takes what forks while it works.
    if act == Act::Kill {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    }
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if pid > 1 {
            // SAFETY: a plain kill of a process in the task's cgroup.
            unsafe { libc::kill(pid, sig) };
        }
    }
}
