//! The real gpufleet binaries, run as child processes: built once per test
//! process, killed on drop, their output kept in a file that is printed
//! when a test fails.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::server::workspace_root;

/// The folder cargo put this test binary's siblings in (`target/debug`).
pub(crate) fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Builds the workspace binaries once, so that a test never runs a stale
/// one. Cargo's own lock makes concurrent test binaries wait for each other.
fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("GPUFLEET_SKIP_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "--bins"])
            .args([
                "-p",
                "gpufleet-coordinator",
                "-p",
                "gpufleet-worker",
                "-p",
                "gpufleet-cli",
            ]);
        if profile_dir().file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the gpufleet binaries failed"
        );
    });
}

/// Path of a workspace binary, built if needed.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The primary group of `user`, from `id -g`.
fn primary_gid(user: &str) -> String {
    let out = Command::new("id")
        .args(["-g", user])
        .output()
        .unwrap_or_else(|e| panic!("id -g {user}: {e}"));
    assert!(out.status.success(), "no user {user}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running gpufleet program.
pub struct Proc {
    child: Option<Child>,
    name: String,
    log: PathBuf,
    _dir: TempDir,
}

impl Proc {
    /// Starts `bin(program)` with `args`; stdout and stderr go to a log file.
    pub fn spawn(program: &str, args: &[String], envs: &[(&str, &str)]) -> Proc {
        Proc::spawn_as(None, program, args, envs)
    }

    /// [`Proc::spawn`], as `user` (a name or uid, with its primary group
    /// and no other) when given: the test runs as root, a deployment may
    /// not.
    pub fn spawn_as(
        user: Option<&str>,
        program: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Proc {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-proc-")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = match user {
            None => Command::new(bin(program)),
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={}", primary_gid(user)))
                    .arg("--clear-groups")
                    .arg(bin(program));
                c
            }
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Proc {
            child: Some(child),
            name: program.to_string(),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("process is running").id() as i32
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid we own; a stale pid only yields ESRCH.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// `kill -9`: the program gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Freezes the process, as a stalled VM or a debugger would.
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGCONT first: a stopped process cannot die of SIGKILL's
            // delivery until resumed on some kernels' accounting of wait.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.output());
        }
    }
}
