//! Starting a task's main process, and reaping it.
//!
//! The main process must die with the worker, which takes
//! `PR_SET_PDEATHSIG`, set in the child between fork and exec. Forking the
//! multi-threaded worker copies its page tables and then faults them back
//! in, which costs more than a short task itself; exec'ing a shim that sets
//! the signal (util-linux `setpriv`) costs a whole extra exec. So, as glibc's
//! `posix_spawn` does, the child shares the worker's memory
//! (`CLONE_VM | CLONE_VFORK`: the calling thread waits until the child has
//! exec'd or died) on a stack of its own, makes only system calls, and
//! execs.
//!
//! Rules for the child, which shares every byte of the worker's memory:
//! no allocation, no lock, no handler of the worker's may run (signals are
//! blocked across `clone` and their handlers reset to the default in the
//! child before they are unblocked), and failures are passed back through
//! an atomic in [`ChildArgs`], not a pipe. The user is changed by raw
//! system calls: glibc's `setuid` and friends signal every thread of the
//! process to change along, and the process whose thread list the child
//! would walk is the worker.
//!
//! Before the exec the child joins the task's cgroup, takes its process
//! limit, drops to the task's user and only then enters the working
//! directory (as that user) and asks for `PR_SET_PDEATHSIG` (a change of
//! user clears it).

use std::ffi::{c_char, c_int, c_void, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The child's stack. It runs a handful of system call wrappers.
const STACK_SIZE: usize = 64 * 1024;

/// What to start.
#[derive(Debug, Clone)]
pub(super) struct Spec {
    /// The program: a path if it holds a '/', else a name to look up on
    /// `search_path`, as `execvp` does.
    pub program: PathBuf,
    pub search_path: Option<OsString>,
    /// `argv`, from `argv[0]`.
    pub args: Vec<OsString>,
    /// The whole environment.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// `(uid, gid)` to run as, without supplementary groups; `None`: the
    /// worker's own.
    pub user: Option<(u32, u32)>,
    /// Its `RLIMIT_NPROC` (soft and hard), at most the worker's own hard
    /// limit.
    pub max_processes: Option<u64>,
    /// A cgroup's `cgroup.procs`, open for writing: the process joins that
    /// cgroup. It must stay open until [`spawn`] returns.
    pub cgroup_procs: Option<c_int>,
}

/// A started process: the leader of a new process group whose id is its
/// pid, with stdin on `/dev/null` and stdout and stderr on pipes.
#[derive(Debug)]
pub(super) struct Started {
    pub pid: libc::pid_t,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Everything the child reads, prepared by the parent (the child must not
/// allocate). Lives on the parent's stack until `clone` returns, which is
/// after the child has exec'd or exited.
struct ChildArgs {
    /// Where the program may be, in order, NULL-terminated.
    paths: *const *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    stdin: c_int,
    stdout: c_int,
    stderr: c_int,
    parent: libc::pid_t,
    /// The signal mask to exec with: the caller's own.
    mask: libc::sigset_t,
    /// -1, or the cgroup to join.
    cgroup_procs: c_int,
    /// `RLIMIT_NPROC`, when `set_nproc`.
    nproc: libc::rlimit,
    set_nproc: bool,
    /// The user to become, when `set_user`.
    uid: libc::uid_t,
    gid: libc::gid_t,
    set_user: bool,
    /// errno of the step that failed, or 0 once exec succeeded.
    error: AtomicI32,
}

fn c_string(s: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} holds a NUL byte: {s:?}"),
        )
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `spec`. Blocks until the child has exec'd (or failed to), which
/// takes a few tens of microseconds.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that started the child exits,
/// so call this from a thread that lives as long as the process.
pub(super) fn spawn(spec: &Spec) -> io::Result<Started> {
    // Looked up by the child, as the task's user: a directory on the
    // worker's PATH that user may not enter is skipped, as `execvp` would.
    let candidates = candidates(&spec.program, spec.search_path.as_deref(), &spec.cwd)
        .iter()
        .map(|p| c_string(p.as_os_str(), "the program"))
        .collect::<io::Result<Vec<_>>>()?;
    let paths: Vec<*const c_char> = candidates
        .iter()
        .map(|p| p.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let args = spec
        .args
        .iter()
        .map(|a| c_string(a, "a command argument"))
        .collect::<io::Result<Vec<_>>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            c_string(&kv, "an environment variable")
        })
        .collect::<io::Result<Vec<_>>>()?;
    let cwd = c_string(spec.cwd.as_os_str(), "the working directory")?;
    let argv: Vec<*const c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let stdin = OwnedFd::from(std::fs::File::open("/dev/null")?);
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut stack: Vec<u8> = Vec::with_capacity(STACK_SIZE);
    // The stack grows down from its end, kept 16-byte aligned as the ABI
    // wants. Only the child touches this memory.
    let top = {
        let end = stack.as_mut_ptr() as usize + STACK_SIZE;
        (end & !15) as *mut c_void
    };

    // SAFETY: plain C structures, initialised by the calls below before use.
    let (mut all, mut mask): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: both sets are valid for writes.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut mask);
    }
    let nproc = spec.max_processes.map(|n| {
        let mut own = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: `own` is valid for writes.
        unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut own) };
        // Raising the hard limit would fail for a worker that is not root.
        let n = (n as libc::rlim_t).min(own.rlim_max);
        libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        }
    });
    let child_args = ChildArgs {
        paths: paths.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd.as_ptr(),
        stdin: stdin.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        // SAFETY: getpid cannot fail.
        parent: unsafe { libc::getpid() },
        mask,
        cgroup_procs: spec.cgroup_procs.unwrap_or(-1),
        set_nproc: nproc.is_some(),
        nproc: nproc.unwrap_or(libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        }),
        set_user: spec.user.is_some(),
        uid: spec.user.map_or(0, |u| u.0),
        gid: spec.user.map_or(0, |u| u.1),
        error: AtomicI32::new(0),
    };
    // SAFETY: `top` ends a live allocation of STACK_SIZE bytes, and
    // CLONE_VFORK keeps `stack`, `child_args` and everything they point
    // to alive and untouched until the child has exec'd or exited.
    // `child_main` keeps to the rules in the module's documentation.
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &child_args as *const ChildArgs as *mut c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    let failed = child_args.error.load(Ordering::Acquire);
    if failed != 0 {
        // It exited at once (127); reap it so it leaves no zombie.
        let _ = wait_blocking(pid);
        return Err(io::Error::from_raw_os_error(failed));
    }
    Ok(Started {
        pid,
        stdout: out_r,
        stderr: err_r,
    })
}

/// Where `program` may be, in the order `execvp` looks: as given when it
/// holds a '/' (relative to `cwd`), else in each directory of `path`.
fn candidates(program: &Path, path: Option<&OsStr>, cwd: &Path) -> Vec<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        return vec![cwd.join(program)];
    }
    std::env::split_paths(path.unwrap_or_default())
        .map(|dir| cwd.join(dir).join(program))
        .collect()
}

/// Runs in the child, on its own stack, in the worker's memory.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive until we exec or exit.
    let a = unsafe { &*(arg as *const ChildArgs) };
    let fail = |errno: c_int| -> c_int {
        a.error.store(errno.max(1), Ordering::Release);
        // SAFETY: ends the child without running anything of the worker's.
        unsafe { libc::_exit(127) }
    };
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: only system call wrappers, on data the parent prepared.
    unsafe {
        // A handler of the worker's must not run here (it would run in the
        // worker's memory), and the task must start with default handlers,
        // SIGPIPE included (the Rust runtime ignores it in the worker).
        // Signals stay blocked until just before the exec.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let handled = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
            if handled || (sig == libc::SIGPIPE && old.sa_sigaction == libc::SIG_IGN) {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(errno());
        }
        // "0" is the writer itself; everything it starts stays in there.
        if a.cgroup_procs >= 0
            && libc::write(a.cgroup_procs, b"0".as_ptr() as *const c_void, 1) != 1
        {
            return fail(errno());
        }
        for (from, to) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            // dup2 onto itself would keep close-on-exec (a worker started
            // with its own 0, 1 or 2 closed).
            let done = if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if done < 0 {
                return fail(errno());
            }
        }
        if a.set_nproc && libc::setrlimit(libc::RLIMIT_NPROC, &a.nproc) != 0 {
            return fail(errno());
        }
        if a.set_user
            && (libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, a.gid, a.gid, a.gid) != 0
                || libc::syscall(libc::SYS_setresuid, a.uid, a.uid, a.uid) != 0)
        {
            return fail(errno());
        }
        if libc::chdir(a.cwd) != 0 {
            return fail(errno());
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return fail(errno());
        }
        // The worker died before the line above took effect.
        if libc::getppid() != a.parent {
            return fail(libc::ESRCH);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut());
        // As `execvp`: not there, go on; there but not ours to run,
        // remember and go on; anything else is the answer.
        let mut denied = false;
        let mut p = a.paths;
        while !(*p).is_null() {
            libc::execve(*p, a.argv, a.envp);
            match errno() {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                e => return fail(e),
            }
            p = p.add(1);
        }
        fail(if denied { libc::EACCES } else { libc::ENOENT })
    }
}

/// What the kernel counted for a reaped process and every child it reaped
/// in turn (`wait4`'s rusage).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Counted {
    /// User and system CPU time.
    pub cpu: Duration,
    /// The largest resident size of it or of any one of those children.
    pub max_rss: u64,
}

/// Reaps `pid`, waiting for it to exit if `block`; `None` while it runs
/// (never when blocking).
fn reap(pid: libc::pid_t, block: bool) -> io::Result<Option<(ExitStatus, Counted)>> {
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status: c_int = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are valid for writes.
        match unsafe { libc::wait4(pid, &mut status, flags, &mut usage) } {
            0 => return Ok(None),
            p if p == pid => {
                let time = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec.max(0) as u64)
                        + Duration::from_micros(t.tv_usec.max(0) as u64)
                };
                let counted = Counted {
                    cpu: time(usage.ru_utime) + time(usage.ru_stime),
                    // Linux gives it in KiB.
                    max_rss: (usage.ru_maxrss.max(0) as u64) << 10,
                };
                return Ok(Some((ExitStatus::from_raw(status), counted)));
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Reaps `pid` if it has exited; `None` while it runs.
pub(super) fn try_wait(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    Ok(reap(pid, false)?.map(|(status, _)| status))
}

/// Reaps `pid`, waiting for it to exit.
pub(super) fn wait_blocking(pid: libc::pid_t) -> io::Result<ExitStatus> {
    reap(pid, true)?
        .map(|(status, _)| status)
        .ok_or_else(|| io::Error::other("wait4 returned without a child"))
}

/// A started process until it is reaped. Dropped before that, it kills the
/// process and reaps it in the background, so that no zombie is left.
#[derive(Debug)]
pub(super) struct Leader {
    pid: libc::pid_t,
    reaped: bool,
    counted: Option<Counted>,
}

impl Leader {
    pub fn new(pid: libc::pid_t) -> Leader {
        Leader {
            pid,
            reaped: false,
            counted: None,
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// What the kernel counted for it, once [`Leader::wait`] reaped it.
    pub fn counted(&self) -> Option<Counted> {
        self.counted
    }

    /// Reaps the process, waiting for it to exit.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some((status, counted)) = reap(self.pid, false)? {
            self.reaped = true;
            self.counted = Some(counted);
            return Ok(status);
        }
        let pid = self.pid;
        // The blocking wait reaps it even if this future is dropped: the
        // pid must not be signalled after that.
        self.reaped = true;
        let (status, counted) = tokio::task::spawn_blocking(move || reap(pid, true))
            .await
            .map_err(io::Error::other)??
            .ok_or_else(|| io::Error::other("wait4 returned without a child"))?;
        self.counted = Some(counted);
        Ok(status)
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: not reaped, so the pid is still ours.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let pid = self.pid;
        if !matches!(try_wait(pid), Ok(Some(_)) | Err(_)) {
            let _ = std::thread::Builder::new()
                .name("gpufleet-reaper".into())
                .spawn(move || wait_blocking(pid));
        }
    }
}

/// What wakes the supervisor when a task's main process exits.
///
/// Its pidfd (Linux 5.3 and later) wakes only that task's supervisor.
/// SIGCHLD, the fallback, wakes every running task's supervisor at every
/// child's exit: with many short tasks that was a storm of wake-ups.
#[derive(Debug)]
pub(super) struct ExitWatch(Watch);

#[derive(Debug)]
enum Watch {
    Pidfd(tokio::io::unix::AsyncFd<OwnedFd>),
    Sigchld(tokio::signal::unix::Signal),
    Poll,
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the fd it returns is ours alone.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as c_int) })
}

fn pidfds_work() -> bool {
    static WORK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: getpid cannot fail.
    *WORK.get_or_init(|| pidfd_open(unsafe { libc::getpid() }).is_ok())
}

impl ExitWatch {
    /// Made before the process starts, so that its exit cannot be missed.
    pub fn new() -> ExitWatch {
        if pidfds_work() {
            // Upgraded by `attach`; a pidfd of an exited child still works.
            return ExitWatch(Watch::Poll);
        }
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(s) => ExitWatch(Watch::Sigchld(s)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGCHLD; polling for task exit");
                ExitWatch(Watch::Poll)
            }
        }
    }

    /// Watches `pid`, the process just started.
    pub fn attach(&mut self, pid: libc::pid_t) {
        if !matches!(self.0, Watch::Poll) || !pidfds_work() {
            return;
        }
        let watched = pidfd_open(pid).and_then(|fd| {
            // SAFETY: an OwnedFd keeps its descriptor open and unchanged
            // for as long as it lives, which is as long as the AsyncFd.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .map_err(io::Error::from)
        });
        match watched {
            Ok(fd) => self.0 = Watch::Pidfd(fd),
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot watch a task's pidfd; polling for its exit")
            }
        }
    }

    /// How often to look anyway: often only when nothing wakes us.
    pub fn poll_every(&self) -> std::time::Duration {
        match self.0 {
            Watch::Poll => std::time::Duration::from_millis(50),
            _ => std::time::Duration::from_secs(1),
        }
    }

    /// Returns when the process may have exited. Once it has, returns at
    /// once every time.
    pub async fn changed(&mut self) {
        match &mut self.0 {
            Watch::Pidfd(fd) => {
                if fd.readable().await.is_err() {
                    self.0 = Watch::Poll;
                }
            }
            Watch::Sigchld(sig) => {
                if sig.recv().await.is_none() {
                    self.0 = Watch::Poll;
                }
            }
            Watch::Poll => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sh(script: &str, env: &[(&str, &str)], cwd: &std::path::Path) -> Spec {
        Spec {
            program: "/bin/sh".into(),
            search_path: None,
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            cwd: cwd.to_path_buf(),
            user: None,
            max_processes: None,
            cgroup_procs: None,
        }
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    }

    /// Runs `spec` to its end: (stdout, stderr, status).
    fn run(spec: &Spec) -> (String, String, ExitStatus) {
        let started = spawn(spec).unwrap();
        let out = read_all(started.stdout);
        let err = read_all(started.stderr);
        (out, err, wait_blocking(started.pid).unwrap())
    }

    #[test]
    fn the_child_gets_its_args_env_directory_and_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let (out, err, status) = run(&sh(
            r#"echo "$A|$0|$(pwd)"; read x; echo "stdin:$?"; echo oops >&2; exit 3"#,
            &[("A", "a b")],
            dir.path(),
        ));
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(out, format!("a b|sh|{}\nstdin:1\n", cwd.display()));
        assert_eq!(err, "oops\n");
        assert_eq!(status.code(), Some(3));
    }

    fn program(args: &[&str], cwd: &std::path::Path) -> Spec {
        Spec {
            program: args[0].into(),
            search_path: Some("/usr/bin:/bin".into()),
            args: args.iter().map(Into::into).collect(),
            env: vec![],
            cwd: cwd.to_path_buf(),
            user: None,
            max_processes: None,
            cgroup_procs: None,
        }
    }

    #[test]
    fn the_child_leads_its_own_group_with_default_signals_and_nothing_blocked() {
        let dir = tempfile::tempdir().unwrap();
        // Read by the started process itself: a shell may block signals
        // for a moment while it forks.
        let (out, _, status) = run(&program(
            &["cut", "-d ", "-f1,5", "/proc/self/stat"],
            dir.path(),
        ));
        assert!(status.success());
        let ids: Vec<&str> = out.trim().split(' ').collect();
        assert_eq!(ids.len(), 2, "{out}");
        assert_eq!(ids[0], ids[1], "its pid is its group's id: {out}");

        let (out, _, status) = run(&program(
            &["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"],
            dir.path(),
        ));
        assert!(status.success());
        let mask = |name: &str| {
            let line = out.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk"), 0, "{out}");
        // The test harness ignores SIGPIPE, as every Rust program does.
        assert_eq!(mask("SigIgn") & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[test]
    fn what_fails_before_the_exec_is_an_error_and_leaves_no_child() {
        let dir = tempfile::tempdir().unwrap();
        let mut missing = sh("true", &[], dir.path());
        missing.program = dir.path().join("no-such-program");
        let e = spawn(&missing).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");

        let gone = sh("true", &[], &dir.path().join("no-such-dir"));
        let e = spawn(&gone).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");

        let mut nul = sh("true", &[], dir.path());
        nul.args.push("a\0b".into());
        let e = spawn(&nul).unwrap_err();
        assert!(e.to_string().contains("NUL byte"), "{e}");
    }

    #[tokio::test]
    async fn the_exit_watch_wakes_when_the_process_exits_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = ExitWatch::new();
        let started = spawn(&sh("exec sleep 600", &[], dir.path())).unwrap();
        watch.attach(started.pid);
        assert!(
            matches!(watch.0, Watch::Pidfd(_)),
            "this kernel has pidfds: {watch:?}"
        );
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), watch.changed());
        assert!(early.await.is_err(), "woke while the process ran");
        // SAFETY: our child, not reaped.
        unsafe { libc::kill(started.pid, libc::SIGKILL) };
        tokio::time::timeout(std::time::Duration::from_secs(10), watch.changed())
            .await
            .expect("woke when it died");
        let status = wait_blocking(started.pid).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_dropped_leader_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let started = spawn(&sh("exec sleep 600", &[], dir.path())).unwrap();
        let pid = started.pid;
        drop(Leader::new(pid));
        // Reaped by the background thread; until then it is a zombie or
        // dying. Either way it is gone from /proc within the deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < deadline, "{pid} still there");
            std::thread::yield_now();
        }
    }
}
