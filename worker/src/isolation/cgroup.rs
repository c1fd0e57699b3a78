//! A cgroup of its own for each task, where the worker may make one: every
//! process the task starts is in it (one that leaves its process group or
//! session too), so all of them are found and killed when the task ends,
//! and their number is capped by the cgroup's `pids.max`.
//!
//! Where the worker makes them:
//! - cgroup v1: in the `pids` hierarchy, under the worker's own pids
//!   cgroup, in `gpufleet-<name>/`, where the name is the worker's and a
//!   digest of its work directory (two fleets on one host may each have a
//!   `w1`; only a worker's own restart is the same worker). Needs write access there (root, or a
//!   delegated subtree).
//! - cgroup v2: under the worker's own cgroup, when it is delegated to the
//!   worker and offers the `pids` controller. A cgroup with processes may
//!   not hand controllers to its children, so the worker first moves itself
//!   into a leaf of its own (`gpufleet-worker`), enables `pids` (and
//!   `memory`, when offered, for the task's own OOM-kill count) below, and
//!   makes the tasks' cgroups in `gpufleet-<name>/`.
//!
//! Anything else leaves tasks without cgroups; the worker says why at
//! start and the supervisor falls back to the process group and the
//! environment marker (see the supervisor's header).
//!
//! A task's first process joins its cgroup before it execs (it writes `0`
//! to `cgroup.procs`), so nothing the task starts is ever outside it. An
//! emptied cgroup is kept and reused. Cgroups left by an earlier run of the
//! worker (killed before it could clean up) are emptied and removed at
//! start.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::procs::{self, CgroupMount};

/// At most this many emptied cgroups are kept for reuse.
const MAX_SPARES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where this worker's task cgroups live, and the ones ready for reuse.
#[derive(Debug, Clone)]
pub struct Cgroups {
    inner: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    base: PathBuf,
    version: Version,
    max_pids: u64,
    /// The tasks' own `memory.events` (v2 with the memory controller).
    memory: bool,
    spares: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
}

impl Cgroups {
    /// Sets up task cgroups for worker `owner` on this machine, or says
    /// why it cannot.
    pub fn detect(owner: &str, max_pids: u64) -> Result<Cgroups, String> {
        let mounts = procs::cgroup_mounts().map_err(|e| format!("cannot read mountinfo: {e}"))?;
        let own =
            procs::own_cgroups().map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let v1 = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == "pids"));
        let own_v1 = own
            .iter()
            .find(|c| c.controllers.iter().any(|c| c == "pids"));
        let v2 = mounts.iter().find(|m| m.fstype == "cgroup2");
        let own_v2 = own.iter().find(|c| c.id == 0);
        let mut why = Vec::new();
        if let (Some(m), Some(c)) = (v1, own_v1) {
            match m.path_of(&c.path) {
                Some(own_dir) => match Cgroups::v1(&own_dir, owner, max_pids) {
                    Ok(c) => return Ok(c),
                    Err(e) => why.push(format!("cgroup v1 pids at {}: {e}", own_dir.display())),
                },
                None => why.push("the worker's pids cgroup is outside the mounted one".into()),
            }
        }
        if let (Some(m), Some(c)) = (v2, own_v2) {
            match m.path_of(&c.path) {
                Some(own_dir) => match Cgroups::v2(&own_dir, owner, max_pids) {
                    Ok(c) => return Ok(c),
                    Err(e) => why.push(format!("cgroup v2 at {}: {e}", own_dir.display())),
                },
                None => why.push("the worker's cgroup is outside the mounted hierarchy".into()),
            }
        }
        if why.is_empty() {
            why.push("no cgroup hierarchy with the pids controller is mounted".into());
        }
        Err(why.join("; "))
    }

    /// Task cgroups in the v1 pids hierarchy, under `own_dir`.
    pub fn v1(own_dir: &Path, owner: &str, max_pids: u64) -> io::Result<Cgroups> {
        let base = own_dir.join(format!("gpufleet-{owner}"));
        Cgroups::open(base, Version::V1, max_pids, false)
    }

    /// Task cgroups in the unified hierarchy, under `own_dir` (the
    /// worker's own cgroup), moving the worker into a leaf first.
    pub fn v2(own_dir: &Path, owner: &str, max_pids: u64) -> io::Result<Cgroups> {
        let offered = fs::read_to_string(own_dir.join("cgroup.controllers"))?;
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if !offered.contains(&"pids") {
            return Err(io::Error::other(
                "the pids controller is not offered to the worker's cgroup",
            ));
        }
        let memory = offered.contains(&"memory");
        let wanted = if memory { "+pids +memory" } else { "+pids" };
        let subtree = own_dir.join("cgroup.subtree_control");
        if fs::write(&subtree, wanted).is_err() {
            // Processes in our cgroup (this one) keep it from handing
            // controllers down: move into a leaf of our own.
            let leaf = own_dir.join("gpufleet-worker");
            mkdir(&leaf)?;
            fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
            fs::write(&subtree, wanted).map_err(|e| {
                io::Error::other(format!(
                    "cannot enable the pids controller below it ({e}): other processes share the worker's cgroup"
                ))
            })?;
        }
        let base = own_dir.join(format!("gpufleet-{owner}"));
        mkdir(&base)?;
        fs::write(base.join("cgroup.subtree_control"), wanted)?;
        Cgroups::open(base, Version::V2, max_pids, memory)
    }

    fn open(base: PathBuf, version: Version, max_pids: u64, memory: bool) -> io::Result<Cgroups> {
        mkdir(&base)?;
        let pool = Pool {
            base,
            version,
            max_pids,
            memory,
            spares: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        };
        pool.remove_leftovers();
        // Proves that cgroups can be made and limited here, and is the
        // first spare.
        let first = pool.make()?;
        pool.give_back(first);
        Ok(Cgroups {
            inner: Arc::new(pool),
        })
    }

    pub fn version(&self) -> Version {
        self.inner.version
    }

    pub fn base(&self) -> &Path {
        &self.inner.base
    }

    /// A cgroup for one task, empty, with its `pids.max` set. Blocking.
    pub fn take(&self) -> io::Result<TaskCgroup> {
        let pool = &self.inner;
        let dir = loop {
            let spare = pool.spares.lock().ok().and_then(|mut s| s.pop());
            match spare {
                // Nothing can leave a cgroup, but root could move a process
                // in: check.
                Some(d) if members(&d).is_ok_and(|m| m.is_empty()) => break d,
                Some(d) => pool.remove(&d),
                None => break pool.make()?,
            }
        };
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(TaskCgroup {
            dir,
            procs: Some(procs.into()),
            pool: self.inner.clone(),
            oom_at_start: None,
        }
        .with_oom_baseline())
    }
}

impl Pool {
    fn make(&self) -> io::Result<PathBuf> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.base.join(format!("t{n}"));
        mkdir(&dir)?;
        if let Err(e) = fs::write(dir.join("pids.max"), self.max_pids.to_string()) {
            let _ = fs::remove_dir(&dir);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot set pids.max: {e}"),
            ));
        }
        Ok(dir)
    }

    fn give_back(&self, dir: PathBuf) {
        if let Ok(mut spares) = self.spares.lock() {
            if spares.len() < MAX_SPARES {
                spares.push(dir);
                return;
            }
        }
        self.remove(&dir);
    }

    fn remove(&self, dir: &Path) {
        if let Err(e) = fs::remove_dir(dir) {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a task cgroup");
        }
    }

    /// Empties and removes the cgroups an earlier run left.
    fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.base) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let killed = kill_members_blocking(&dir, self.version);
            if killed > 0 {
                tracing::info!(cgroup = %dir.display(), killed, "killed what an earlier run's task left");
            }
            self.remove(&dir);
        }
    }
}

impl Drop for Pool {
    /// No task holds a cgroup any more: the spares and this worker's own
    /// go.
    fn drop(&mut self) {
        let spares = self
            .spares
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for d in spares {
            self.remove(&d);
        }
        // Fails if a cgroup a task left is still in there; the next start
        // of this worker removes it.
        let _ = fs::remove_dir(&self.base);
    }
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The live processes in the cgroup at `dir` (zombies are not listed).
fn members(dir: &Path) -> io::Result<Vec<i32>> {
    Ok(fs::read_to_string(dir.join("cgroup.procs"))?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn signal_members(dir: &Path, sig: Signal) -> usize {
    let mut n = 0;
    for pid in members(dir).unwrap_or_default() {
        if kill(Pid::from_raw(pid), sig).is_ok() {
            n += 1;
        }
    }
    n
}

/// SIGKILLs everything in the cgroup until it is empty (or two seconds
/// pass); returns how many processes were signalled. Blocking.
fn kill_members_blocking(dir: &Path, version: Version) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut signalled = 0;
    // `cgroup.kill` (v2, Linux 5.14) kills atomically, forks included.
    if version == Version::V2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        signalled += 1;
    }
    loop {
        let pids = members(dir).unwrap_or_default();
        if pids.is_empty() || std::time::Instant::now() >= deadline {
            return signalled;
        }
        for pid in pids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                signalled += 1;
            }
        }
        // Dying takes the kernel a moment; there is no event to wait on.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// One task's cgroup. Dropped, it kills whatever is still in it and is
/// kept for reuse (or removed).
#[derive(Debug)]
pub struct TaskCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing: the task's first process writes
    /// `0` to it to join.
    procs: Option<OwnedFd>,
    pool: Arc<Pool>,
    oom_at_start: Option<u64>,
}

impl TaskCgroup {
    fn with_oom_baseline(mut self) -> TaskCgroup {
        self.oom_at_start = self.oom_kills_now();
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The descriptor the task's first process joins through.
    pub fn procs_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.procs.as_ref().map(|f| f.as_fd())
    }

    /// The descriptor is not needed once the task started.
    pub fn started(&mut self) {
        self.procs = None;
    }

    /// The live processes in it now.
    pub fn members(&self) -> Vec<i32> {
        members(&self.dir).unwrap_or_default()
    }

    /// Sends `sig` to every process in it; how many there were.
    pub fn signal(&self, sig: Signal) -> usize {
        signal_members(&self.dir, sig)
    }

    /// SIGKILLs everything in it until it is empty. Blocking (at most two
    /// seconds).
    pub fn kill_all(&self) -> usize {
        kill_members_blocking(&self.dir, self.pool.version)
    }

    fn oom_kills_now(&self) -> Option<u64> {
        if !self.pool.memory {
            return None;
        }
        let text = fs::read_to_string(self.dir.join("memory.events")).ok()?;
        counter(&text, "oom_kill")
    }

    /// OOM kills the kernel counted in this cgroup since the task took it,
    /// when it has its own memory accounting.
    pub fn oom_kills(&self) -> Option<u64> {
        Some(self.oom_kills_now()?.saturating_sub(self.oom_at_start?))
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        self.procs = None;
        if members(&self.dir).is_ok_and(|m| m.is_empty()) {
            self.pool.give_back(self.dir.clone());
            return;
        }
        // Left with processes in it (its supervisor was dropped or
        // failed): empty it off the runtime, which this may be on.
        let (dir, pool) = (self.dir.clone(), self.pool.clone());
        let empty = move || {
            let killed = kill_members_blocking(&dir, pool.version);
            tracing::debug!(cgroup = %dir.display(), killed, "killed what was left in a task's cgroup");
            if members(&dir).is_ok_and(|m| m.is_empty()) {
                pool.give_back(dir);
            } else {
                tracing::warn!(cgroup = %dir.display(), "task processes survive SIGKILL; leaving their cgroup");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(empty)),
            Err(_) => empty(),
        }
    }
}

/// `name N` from a flat keyed file (`memory.events`, `memory.oom_control`).
pub fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The OOM-kill count of the memory cgroup the worker (and so its tasks,
/// when they have no cgroup of their own) runs in.
#[derive(Debug, Clone)]
pub struct SharedOomCounter {
    file: PathBuf,
}

impl SharedOomCounter {
    /// The worker's own memory cgroup's counter, when the kernel has one
    /// (v2 `memory.events`, v1 `memory.oom_control`, Linux 4.13+).
    pub fn of_this_process() -> Option<SharedOomCounter> {
        let mounts = procs::cgroup_mounts().ok()?;
        let own = procs::own_cgroups().ok()?;
        let candidates = own.iter().filter_map(|c| {
            let (mount, file) = if c.id == 0 {
                (
                    mounts.iter().find(|m| m.fstype == "cgroup2")?,
                    "memory.events",
                )
            } else if c.controllers.iter().any(|x| x == "memory") {
                (
                    mounts.iter().find(|m: &&CgroupMount| {
                        m.fstype == "cgroup" && m.options.iter().any(|o| o == "memory")
                    })?,
                    "memory.oom_control",
                )
            } else {
                return None;
            };
            Some(mount.path_of(&c.path)?.join(file))
        });
        for file in candidates {
            let counter = SharedOomCounter { file };
            if counter.read().is_some() {
                return Some(counter);
            }
        }
        None
    }

    pub fn read(&self) -> Option<u64> {
        counter(&fs::read_to_string(&self.file).ok()?, "oom_kill")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_name() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(counter(v1, "oom_kill"), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(counter(v2, "oom_kill"), Some(1));
        assert_eq!(counter(v2, "oom_kil"), None);
        assert_eq!(counter("oom_kill x", "oom_kill"), None);
    }
}
