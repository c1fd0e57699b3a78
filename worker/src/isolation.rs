//! What keeps a task from the worker, the host and other tasks, decided
//! once at start from the settings and what the machine allows:
//!
//! - **Environment**: a task starts from an allowlist of the worker's
//!   variables ([`DEFAULT_PASS_ENV`] plus the `pass_env` setting), then the
//!   job's `env`, then the documented `GPUFLEET_*` variables. Nothing else
//!   of the worker's (its `GPUFLEET_*` settings, a NATS token or URL with a
//!   password) reaches a task.
//! - **User**: a worker running as root starts tasks as an unprivileged
//!   user (`run_as`, default `nobody`), which owns the task's directories
//!   and nothing of the worker's: not its credentials file, not its
//!   `/proc/<pid>/environ` or memory. The worker is also non-dumpable
//!   ([`make_non_dumpable`]), which keeps a task running as the worker's own
//!   user (a worker that is not root) out of those two files.
//! - **Processes**: each task may have `max_task_processes` processes
//!   (threads count): its `RLIMIT_NPROC` (per user, for users other than
//!   root), and its cgroup's `pids.max` where the worker can make one
//!   ([`cgroup`]). The cgroup also finds every process of the task at its
//!   end, including one that left its process group.

pub mod cgroup;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::WorkerConfig;
use cgroup::{Cgroups, SharedOomCounter};
use gpufleet_schema::WorkerId;

/// The worker's variables every task gets (when the worker has them).
/// `LC_*` stands for every variable whose name starts with `LC_`.
pub const DEFAULT_PASS_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_*", "TZ"];

/// A task's `PATH` when the worker has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The file in the work directory that names the directory of the
/// worker's task cgroups.
pub const CGROUP_NOTE: &str = "cgroup";

/// The user tasks run as when the worker runs as root and `run_as` is
/// not set.
pub const DEFAULT_RUN_AS: &str = "nobody";

/// Who a task runs as, when not the worker's own user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its home directory, when it has one that exists.
    pub home: Option<PathBuf>,
}

/// How this worker contains its tasks.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// `None`: tasks run as the worker's own user.
    pub user: Option<TaskUser>,
    /// `None`: the worker cannot make cgroups here.
    pub cgroups: Option<Cgroups>,
    /// Each task's `RLIMIT_NPROC` and `pids.max`; `None`: no limit.
    pub max_processes: Option<u64>,
    /// The worker's variables that tasks get.
    pub base_env: BTreeMap<OsString, OsString>,
    /// The OOM-kill count of the memory cgroup tasks share with the
    /// worker, when the kernel keeps one.
    pub shared_oom: Option<SharedOomCounter>,
}

impl Isolation {
    /// Decides from the settings and the machine; an error names the
    /// setting at fault.
    pub fn from_config(cfg: &WorkerConfig, worker: &WorkerId) -> Result<Isolation, String> {
        let user = task_user(cfg.run_as.as_deref())?;
        if let Some(u) = &user {
            check_reachable(&cfg.work_dir(worker), u)?;
        }
        let max = cfg.max_task_processes;
        let cgroups = if cfg.task_cgroups {
            match Cgroups::detect(&cgroup_name(worker, &cfg.work_dir(worker)), max) {
                Ok(c) => Some(c),
                Err(why) => {
                    tracing::warn!(%why, "tasks get no cgroup of their own: processes that leave a task's process group are found by its environment only, and the process limit is RLIMIT_NPROC alone");
                    None
                }
            }
        } else {
            None
        };
        Ok(Isolation {
            user,
            cgroups,
            max_processes: Some(max),
            base_env: pass_env(std::env::vars_os(), &cfg.pass_env),
            shared_oom: SharedOomCounter::of_this_process(),
        })
    }

    /// Tasks as the worker's own user, without cgroups or limits, with the
    /// default allowlist: what a test of the supervisor runs with.
    pub fn unconfined() -> Isolation {
        Isolation {
            user: None,
            cgroups: None,
            max_processes: None,
            base_env: pass_env(std::env::vars_os(), &[]),
            shared_oom: None,
        }
    }

    /// One line for the start log.
    pub fn describe(&self) -> String {
        let user = match &self.user {
            Some(u) => format!("as {} (uid {})", u.name, u.uid),
            None => "as the worker's user".into(),
        };
        let cgroups = match &self.cgroups {
            Some(c) => format!("in cgroups under {}", c.base().display()),
            None => "without cgroups".into(),
        };
        let limit = match self.max_processes {
            Some(n) => format!("at most {n} processes each"),
            None => "no process limit".into(),
        };
        format!("tasks run {user}, {cgroups}, {limit}")
    }
}

/// The name of a worker's cgroup: its name and its work directory's, as
/// the two identify "this worker" across its restarts (its earlier run's
/// leftovers are its own to kill) and tell it from a namesake of another
/// fleet on the same host (whose tasks are not).
fn cgroup_name(worker: &WorkerId, work_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let dir = std::path::absolute(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let digest = Sha256::digest(dir.as_os_str().as_bytes());
    let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{worker}-{short}")
}

/// Whether `name` is allowed by `pattern`: equal, or starting with what
/// precedes a trailing `*`.
fn allowed(pattern: &str, name: &[u8]) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix.as_bytes()),
        None => name == pattern.as_bytes(),
    }
}

/// The variables of `vars` that the default allowlist or `extra` let
/// through, with a `PATH` added if there was none.
pub fn pass_env(
    vars: impl Iterator<Item = (OsString, OsString)>,
    extra: &[String],
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = vars
        .filter(|(k, _)| {
            let name = k.as_bytes();
            // The worker's own settings never pass, whatever the list says.
            !name.starts_with(b"GPUFLEET_")
                && DEFAULT_PASS_ENV
                    .iter()
                    .copied()
                    .chain(extra.iter().map(String::as_str))
                    .any(|p| allowed(p, name))
        })
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env
}

/// Checks a `pass_env` entry: a variable name, or a prefix and `*`.
pub fn check_pass_env(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    let valid = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !valid {
        return Err(format!(
            "pass_env: {pattern:?} is not a variable name (letters, digits, _), optionally ending in *"
        ));
    }
    if allowed(pattern, b"GPUFLEET_") || name.starts_with("GPUFLEET_") {
        return Err(format!(
            "pass_env: {pattern:?} would pass the worker's own GPUFLEET_* settings to tasks"
        ));
    }
    Ok(())
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Who tasks run as, from the `run_as` setting; `None`: the worker's own
/// user.
pub fn task_user(run_as: Option<&str>) -> Result<Option<TaskUser>, String> {
    let me = euid();
    let Some(wanted) = run_as.or((me == 0).then_some(DEFAULT_RUN_AS)) else {
        return Ok(None);
    };
    let user = resolve_user(wanted)?;
    if user.uid == me {
        if me == 0 {
            tracing::warn!("run_as is root: tasks can read the worker's credentials and everything else on this host");
        }
        return Ok(None);
    }
    if me != 0 {
        return Err(format!(
            "run_as: the worker runs as uid {me} and cannot start tasks as {} (uid {}); run the worker as root or leave run_as unset",
            user.name, user.uid
        ));
    }
    if user.uid == 0 || user.gid == 0 {
        return Err(format!("run_as: {wanted:?} is root by another name"));
    }
    Ok(Some(user))
}

/// A user by name, or `uid` / `uid:gid`.
pub fn resolve_user(spec: &str) -> Result<TaskUser, String> {
    use nix::unistd::{Uid, User};
    let (who, gid) = match spec.split_once(':') {
        Some((u, g)) => {
            let g: u32 = g
                .parse()
                .map_err(|_| format!("run_as: {spec:?}: the group must be a number"))?;
            (u, Some(g))
        }
        None => (spec, None),
    };
    let entry = match who.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid))
            .map_err(|e| format!("run_as: cannot look up uid {uid}: {e}"))?
            .map(Ok)
            .unwrap_or(Err(uid)),
        Err(_) => match User::from_name(who) {
            Ok(Some(u)) => Ok(u),
            Ok(None) => return Err(format!("run_as: no user named {who:?} on this host")),
            Err(e) => return Err(format!("run_as: cannot look up {who:?}: {e}")),
        },
    };
    Ok(match entry {
        Ok(u) => TaskUser {
            home: Some(u.dir.clone()).filter(|d| d.is_dir()),
            gid: gid.unwrap_or(u.gid.as_raw()),
            uid: u.uid.as_raw(),
            name: u.name,
        },
        // A bare uid without a passwd entry: its own group, no home.
        Err(uid) => TaskUser {
            name: uid.to_string(),
            uid,
            gid: gid.unwrap_or(uid),
            home: None,
        },
    })
}

/// Whether `user` may enter every directory on the way to `dir` (its
/// task directories live there); an error says which one stops it.
pub fn check_reachable(dir: &Path, user: &TaskUser) -> Result<(), String> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut walked = PathBuf::new();
    for part in dir.components() {
        walked.push(part);
        let Ok(meta) = std::fs::metadata(&walked) else {
            // Made later by the worker (root), with a mode that lets it in.
            return Ok(());
        };
        let mode = meta.mode();
        let bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(format!(
                "work_dir: {} cannot be reached by the task user {} (uid {}): {} has mode {:o}; let it in (chmod o+x) or choose another work_dir",
                dir.display(),
                user.name,
                user.uid,
                walked.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// Keeps processes running as the worker's user (its tasks, when it is
/// not root) from reading its memory and `/proc/<pid>/environ`, and from
/// attaching a debugger to it. Tasks do not inherit it: exec resets it.
pub fn make_non_dumpable() -> std::io::Result<()> {
    // SAFETY: a plain prctl on this process.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process is dumpable (for tests).
pub fn is_dumpable() -> bool {
    // SAFETY: a plain prctl on this process.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Iterator<Item = (OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn only_allowlisted_variables_pass_and_never_the_workers_settings() {
        let worker = vars(&[
            ("PATH", "/bin"),
            ("HOME", "/root"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("TZ", "UTC"),
            ("GPUFLEET_NATS_TOKEN", "s3cret"),
            ("GPUFLEET_NATS_URL", "nats://u:pw@h:4222"),
            ("NATS_CREDS", "/etc/creds"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("HF_HOME", "/data/hf"),
        ]);
        let env = pass_env(worker, &["HF_*".into(), "GPUFLEET_NATS_TOKEN".into()]);
        let names: Vec<String> = env.keys().map(|k| k.to_string_lossy().into()).collect();
        assert_eq!(names, ["HF_HOME", "HOME", "LANG", "LC_ALL", "PATH", "TZ"]);
        // Without a PATH of its own, a task gets the default one.
        let env = pass_env(vars(&[("TERM", "xterm")]), &[]);
        assert_eq!(
            env.into_iter().collect::<Vec<_>>(),
            vec![("PATH".into(), DEFAULT_PATH.into())]
        );
    }

    #[test]
    fn namesakes_with_other_work_directories_get_other_cgroups() {
        let w = WorkerId::new("w1").unwrap();
        let a = cgroup_name(&w, Path::new("/tmp/fleet-a/work-w1"));
        assert_eq!(a, cgroup_name(&w, Path::new("/tmp/fleet-a/work-w1")));
        assert_ne!(a, cgroup_name(&w, Path::new("/tmp/fleet-b/work-w1")));
        assert!(a.starts_with("w1-") && a.len() == 11, "{a}");
    }

    #[test]
    fn pass_env_entries_are_checked() {
        assert!(check_pass_env("HF_HOME").is_ok());
        assert!(check_pass_env("NCCL_*").is_ok());
        for bad in ["", "*", "A-B", "1X", "A=B"] {
            assert!(
                check_pass_env(bad).unwrap_err().starts_with("pass_env:"),
                "{bad}"
            );
        }
        for leak in ["GPUFLEET_NATS_TOKEN", "GPUFLEET_*", "GPU*", "G*"] {
            let e = check_pass_env(leak).unwrap_err();
            assert!(e.contains("GPUFLEET_* settings"), "{leak}: {e}");
        }
    }

    #[test]
    fn users_are_found_by_name_or_number() {
        let nobody = resolve_user("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
        assert_eq!(
            resolve_user(&nobody.uid.to_string()).unwrap().name,
            "nobody"
        );
        let odd = resolve_user("4000123:4000124").unwrap();
        assert_eq!((odd.uid, odd.gid, odd.home), (4000123, 4000124, None));
        assert!(resolve_user("no-such-user-here")
            .unwrap_err()
            .contains("no user named"));
        assert!(resolve_user("12:x").unwrap_err().contains("group"));
    }

    #[test]
    fn a_work_dir_the_task_user_cannot_enter_is_refused_naming_the_directory() {
        use std::os::unix::fs::PermissionsExt;
        let user = TaskUser {
            name: "someone".into(),
            uid: 4000123,
            gid: 4000123,
            home: None,
        };
        let top = tempfile::tempdir().unwrap();
        let inner = top.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_reachable(&inner, &user).unwrap_err();
        assert!(
            e.contains(&format!("{} has mode 700", top.path().display())),
            "{e}"
        );
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(check_reachable(&inner, &user), Ok(()));
        // Not made yet: the worker makes it.
        assert_eq!(check_reachable(&inner.join("c/d"), &user), Ok(()));
    }
}
