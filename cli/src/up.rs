//! `gpufleet up`: a whole local fleet in one command: nats-server with
//! JetStream, a coordinator and N workers with simulated GPUs.
//!
//! Everything it starts is stopped when it ends: on Ctrl-C or SIGTERM
//! (workers first, so that they drain, then the coordinator, then NATS), at
//! the end of `--run FILE --once`, and, because every child is started with
//! `PR_SET_PDEATHSIG`, even when `up` itself is killed with `kill -9`. The
//! children get their own process group, so a Ctrl-C in the terminal
//! reaches `up` alone and the shutdown keeps its order.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use gpufleet_natsutil::telemetry::LogFormat;
use gpufleet_natsutil::Backoff;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::client::Api;
use crate::exit;
use crate::jobfile;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// How many workers to start
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Simulated GPUs per worker, COUNTxMEMORY[:MODEL] (e.g. 2x24GiB:L4); "" for none
    #[arg(long, default_value = "2x24GiB:Simulated")]
    simulate_gpus: String,
    /// NATS port; another free one if it is taken; 0 for any
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// Keep NATS data and logs here instead of a temporary folder
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The nats-server binary [default: $NATS_SERVER_BIN, scripts/nats-server.sh, PATH]
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Settings file for the coordinator (see examples/coordinator.toml)
    #[arg(long)]
    coordinator_config: Option<PathBuf>,
    /// Settings file for every worker (see examples/worker.toml)
    #[arg(long)]
    worker_config: Option<PathBuf>,
    /// Once the fleet is up, submit this job file and follow it
    #[arg(long, value_name = "FILE")]
    run: Option<String>,
    /// With --run: stop the fleet when the job ends and exit with its outcome
    #[arg(long, requires = "run")]
    once: bool,
    /// Run with roles: `gpufleet auth` keys and permissions for every
    /// member, signed reservations, and the job run as user `local`
    #[arg(long, conflicts_with_all = ["coordinator_config", "worker_config"])]
    secure: bool,
}

/// The user `up --secure` runs its job as, and tells people to use.
const LOCAL_USER: &str = "local";

/// How long each kind of process gets to stop after SIGTERM.
const WORKER_GRACE: Duration = Duration::from_secs(20);
const GRACE: Duration = Duration::from_secs(10);
/// Local workers drain quickly, so that `up` stops within seconds.
const LOCAL_DRAIN_TIMEOUT: &str = "5s";
const LOCAL_KILL_GRACE: &str = "2s";
/// The store limits of a local fleet (unless the user's environment or
/// `--coordinator-config` says otherwise).
const LOCAL_STORE_LIMITS: [(&str, &str); 3] = [
    ("events_max_bytes", "256MiB"),
    ("jobs_max_bytes", "256MiB"),
    ("artifacts_max_bytes", "1GiB"),
];

/// A program `up` started.
struct Member {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once it was seen to exit.
    exited: Option<std::process::ExitStatus>,
}

impl Member {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            // SAFETY: kill(2) on our own child, which we have not reaped yet,
            // so the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// Whether it has exited; reaps it if so.
    fn poll(&mut self) -> bool {
        if self.exited.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
            }
        }
        self.exited.is_some()
    }

    /// The last lines of its log, to explain an early exit.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// A running local fleet. Dropping it kills whatever is still running.
struct LocalFleet {
    url: String,
    dir: PathBuf,
    /// With `--secure`: the settings file of the local user.
    user_config: Option<PathBuf>,
    server: Option<Member>,
    coordinator: Option<Member>,
    workers: Vec<Member>,
    _tmp: Option<tempfile::TempDir>,
}

impl LocalFleet {
    /// The API as the local user (with `--secure`) or as anyone.
    async fn api(&self, patience: Duration) -> anyhow::Result<Api> {
        let Some(file) = &self.user_config else {
            return Api::connect(&self.url, &Default::default(), None, patience).await;
        };
        let cfg = crate::settings::load(Some(file), None, None, None)?;
        Api::connect(&self.url, &cfg.auth(), cfg.user.clone(), patience).await
    }

    fn members_mut(&mut self) -> impl Iterator<Item = &mut Member> {
        self.workers
            .iter_mut()
            .chain(self.coordinator.as_mut())
            .chain(self.server.as_mut())
    }

    /// The first member found to have exited since the last look.
    fn newly_exited(&mut self) -> Option<(String, String, String)> {
        for m in self.members_mut() {
            let was = m.exited.is_some();
            if !was && m.poll() {
                let how = m
                    .exited
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "exited".into());
                return Some((m.name.clone(), how, m.log_tail()));
            }
        }
        None
    }

    /// Stops every member, in order: workers (they drain), the coordinator,
    /// then nats-server. A Ctrl-C meanwhile kills what is left at once.
    async fn stop(&mut self, sigint: &mut Signal) {
        let mut hurry = false;
        let mut workers: Vec<&mut Member> = self.workers.iter_mut().collect();
        stop_group(&mut workers, WORKER_GRACE, sigint, &mut hurry).await;
        let mut coordinator: Vec<&mut Member> = self.coordinator.iter_mut().collect();
        stop_group(&mut coordinator, GRACE, sigint, &mut hurry).await;
        let mut server: Vec<&mut Member> = self.server.iter_mut().collect();
        stop_group(&mut server, GRACE, sigint, &mut hurry).await;
    }
}

/// SIGTERM to every member (SIGKILL in a hurry), then waits up to `grace`
/// for them to exit before killing them.
async fn stop_group(
    members: &mut [&mut Member],
    grace: Duration,
    sigint: &mut Signal,
    hurry: &mut bool,
) {
    for m in members.iter() {
        m.signal(if *hurry { libc::SIGKILL } else { libc::SIGTERM });
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !members.iter_mut().all(|m| m.poll()) {
        if tokio::time::Instant::now() > deadline {
            for m in members.iter().filter(|m| m.exited.is_none()) {
                eprintln!("{} did not stop within {grace:?}; killing it", m.name);
                m.signal(libc::SIGKILL);
            }
            for m in members.iter_mut() {
                if m.exited.is_none() {
                    m.exited = m.child.wait().ok();
                }
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = sigint.recv(), if !*hurry => {
                eprintln!("killing what is left");
                *hurry = true;
                for m in members.iter() {
                    m.signal(libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        for m in self.members_mut() {
            if !m.poll() {
                m.signal(libc::SIGKILL);
                let _ = m.child.wait();
            }
        }
    }
}

/// The directory of the running `gpufleet`, where `cargo build` puts the
/// coordinator and worker beside it.
fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// A program that sits beside this one (same build), else one on PATH.
fn sibling(name: &str) -> PathBuf {
    exe_dir()
        .map(|d| d.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// nats-server: the flag, `NATS_SERVER_BIN`, the project's
/// `scripts/nats-server.sh` (found from the working directory or from this
/// binary's place in `target/`), else `nats-server` on PATH.
fn find_nats_server(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from("scripts/nats-server.sh")];
    if let Some(d) = exe_dir() {
        // target/<profile>/gpufleet -> the checkout.
        candidates.extend(
            d.ancestors()
                .skip(2)
                .take(1)
                .map(|r| r.join("scripts/nats-server.sh")),
        );
    }
    if let Some(script) = candidates.into_iter().find(|p| p.exists()) {
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if out.status.success() {
            return Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
        bail!("{} could not provide a nats-server", script.display());
    }
    Ok(PathBuf::from("nats-server"))
}

/// Starts a member. Must run on the main thread: `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked the child exits, and the main thread lives
/// as long as the process. (`run` is driven by `block_on` on the main
/// thread, so it holds.)
fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Member> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    // SAFETY: getpid is async-signal-safe; read before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        // Its own process group: a Ctrl-C in the terminal goes to `up` only.
        .process_group(0)
        // Settings meant for the command line are not the children's.
        .env_remove("GPUFLEET_CONFIG")
        .env_remove("GPUFLEET_NATS_URL")
        .spawn()
        .with_context(|| format!("starting {name} ({})", cmd.get_program().to_string_lossy()))?;
    Ok(Member {
        name: name.to_string(),
        child,
        log: log.to_path_buf(),
        exited: None,
    })
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start(args: &UpArgs, log_format: Option<LogFormat>) -> anyhow::Result<LocalFleet> {
    let nats_server = find_nats_server(args.nats_server.as_deref())?;
    if !args.simulate_gpus.is_empty() && !args.simulate_gpus.contains('x') {
        bail!(
            "--simulate-gpus {:?}: expected COUNTxMEMORY[:MODEL], e.g. 2x24GiB:L4",
            args.simulate_gpus
        );
    }
    let (tmp, dir) = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, d.canonicalize()?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("gpufleet-up-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let port = match args.port {
        0 => free_port()?,
        p if port_free(p) => p,
        p => {
            let other = free_port()?;
            eprintln!("port {p} is taken; using {other}");
            other
        }
    };
    let url = format!("nats://127.0.0.1:{port}");
    let auth = if args.secure {
        let spec = crate::auth::Spec {
            nats_url: url.clone(),
            workers: (1..=args.workers)
                .map(|i| gpufleet_schema::WorkerId::new(format!("local-{i}")))
                .collect::<Result<_, _>>()?,
            users: vec![gpufleet_schema::UserId::new(LOCAL_USER)?],
            admins: vec![],
            server: None,
        };
        Some(crate::auth::write(&spec, &dir.join("auth"))?)
    } else {
        None
    };
    let mut fleet = LocalFleet {
        url: url.clone(),
        dir: dir.clone(),
        user_config: auth.as_ref().map(|a| a.users[0].1.clone()),
        server: None,
        coordinator: None,
        workers: vec![],
        _tmp: tmp,
    };
    eprintln!("starting a local fleet in {}", dir.display());

    let mut cmd = Command::new(&nats_server);
    cmd.args([
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-js",
        "--store_dir",
    ])
    .arg(dir.join("nats"));
    if let Some(a) = &auth {
        cmd.arg("-c").arg(&a.server_conf);
    }
    let m = spawn("nats-server", cmd, &dir.join("nats-server.log"))?;
    eprintln!("  nats-server  pid {:<7} {url}", m.pid());
    fleet.server = Some(m);

    // `--log-format` given to `up` is the fleet's; else their settings'.
    let log_args: Vec<String> = log_format
        .map(|f| vec!["--log-format".to_string(), f.to_string()])
        .unwrap_or_default();
    let mut cmd = Command::new(sibling("gpufleet-coordinator"));
    cmd.args(["--nats-url", &url]).args(&log_args);
    if let Some(c) = args
        .coordinator_config
        .as_ref()
        .or(auth.as_ref().map(|a| &a.coordinator))
    {
        cmd.arg("--config").arg(c);
    }
    if args.coordinator_config.is_none() {
        // The server reserves every store's limit at once; a local fleet
        // on a laptop's disk gets 1.5 GiB, not the production 6 GiB (the
        // coordinator would refuse to start where JetStream has less room).
        for (setting, value) in LOCAL_STORE_LIMITS {
            let name = gpufleet_natsutil::settings::env_name(setting);
            if std::env::var_os(&name).is_none() {
                cmd.env(name, value);
            }
        }
    }
    let m = spawn("coordinator", cmd, &dir.join("coordinator.log"))?;
    eprintln!("  coordinator  pid {:<7} log coordinator.log", m.pid());
    fleet.coordinator = Some(m);

    for i in 1..=args.workers {
        let name = format!("local-{i}");
        let mut cmd = Command::new(sibling("gpufleet-worker"));
        cmd.args(["--nats-url", &url, "--name", &name])
            .args(&log_args)
            .arg("--work-dir")
            .arg(dir.join(format!("work-{name}")));
        if !args.simulate_gpus.is_empty() {
            cmd.args(["--simulate-gpus", &args.simulate_gpus]);
        }
        let secure = auth.as_ref().map(|a| &a.workers[i - 1].1);
        if let Some(c) = args.worker_config.as_ref().or(secure) {
            cmd.arg("--config").arg(c);
        }
        for (k, v) in [
            ("GPUFLEET_DRAIN_TIMEOUT", LOCAL_DRAIN_TIMEOUT),
            ("GPUFLEET_KILL_GRACE", LOCAL_KILL_GRACE),
        ] {
            if std::env::var_os(k).is_none() {
                cmd.env(k, v);
            }
        }
        // Workers on one machine cannot share the default metrics port:
        // local-N serves on the coordinator's default plus N, unless told
        // otherwise (the environment, or a settings file).
        if std::env::var_os("GPUFLEET_METRICS_ADDR").is_none() && args.worker_config.is_none() {
            let port = gpufleet_natsutil::metrics::COORDINATOR_PORT + i as u16;
            cmd.env("GPUFLEET_METRICS_ADDR", format!("127.0.0.1:{port}"));
        }
        let log = format!("{name}.log");
        let m = spawn(&name, cmd, &dir.join(&log))?;
        eprintln!("  {name:<11}  pid {:<7} log {log}", m.pid());
        fleet.workers.push(m);
    }

    // Ready when the coordinator answers and lists every worker; a member
    // that exits meanwhile fails the start with its last words.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let api = loop {
        if let Some((name, how, tail)) = fleet.newly_exited() {
            bail!("{name} exited while the fleet started ({how}); the end of its log:\n{tail}");
        }
        if let Ok(api) = fleet.api(Duration::from_millis(200)).await {
            break api;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "nats-server did not start within 60s; see {}",
                dir.display()
            );
        }
    };
    let mut pace = Backoff::fixed(Duration::from_millis(100));
    loop {
        if let Some((name, how, tail)) = fleet.newly_exited() {
            bail!("{name} exited while the fleet started ({how}); the end of its log:\n{tail}");
        }
        if let Ok(ws) = api.workers().await {
            if ws.len() >= args.workers {
                break;
            }
        }
        if !pace.wait_before(deadline).await {
            bail!(
                "the fleet did not come up within 60s; see the logs in {}",
                dir.display()
            );
        }
    }
    Ok(fleet)
}

/// Runs `gpufleet up` to its end; returns the exit code.
pub async fn run(args: UpArgs, json: bool, log_format: Option<LogFormat>) -> anyhow::Result<i32> {
    // Installed first, so that a Ctrl-C during the start is ours to handle.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigchld = signal(SignalKind::child())?;
    let spec = args.run.as_deref().map(jobfile::read).transpose()?;
    let mut fleet = tokio::select! {
        f = start(&args, log_format) => f?,
        _ = sigint.recv() => bail!("interrupted while the fleet started; stopped it"),
        _ = sigterm.recv() => bail!("terminated while the fleet started; stopped it"),
    };
    let url = fleet.url.clone();
    if args.once {
        eprintln!(
            "fleet ready: {} worker(s) on {url}; it stops when the job ends",
            args.workers
        );
    } else {
        eprintln!(
            "fleet ready: {} worker(s) on {url}\n\
             use it from another terminal with:\n  \
             export GPUFLEET_NATS_URL={url}{}\n  \
             gpufleet workers\n  \
             gpufleet submit examples/hello.json --follow\n  \
             gpufleet run --gpus 1 -- python3 -c 'import os; print(os.environ[\"CUDA_VISIBLE_DEVICES\"])'\n\
             logs and data: {}{}\n\
             press Ctrl-C to stop the fleet",
            args.workers,
            fleet
                .user_config
                .as_ref()
                .map(|c| format!("\n  export GPUFLEET_CONFIG={}", c.display()))
                .unwrap_or_default(),
            fleet.dir.display(),
            if fleet._tmp.is_some() {
                " (removed on exit; keep them with --data-dir)"
            } else {
                ""
            }
        );
    }
    println!("{url}");

    let mut code = exit::OK;
    if let Some(spec) = spec {
        let api = fleet.api(Duration::from_secs(5)).await?;
        let flags = crate::WaitFlags {
            wait: true,
            follow: true,
            detach: false,
        };
        let reply = api.submit(&spec, Duration::from_secs(60)).await?;
        eprintln!("submitted job {}", reply.job_id);
        code = crate::wait_job(&api, &reply.job_id, &flags, json).await?;
        if args.once {
            eprintln!("stopping the fleet...");
            fleet.stop(&mut sigint).await;
            eprintln!("fleet stopped");
            return Ok(code);
        }
    }

    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sigchld.recv() => {
                while let Some((name, how, tail)) = fleet.newly_exited() {
                    eprintln!("{name} exited ({how}); the end of its log:\n{tail}");
                    if name == "nats-server" {
                        // Nothing can drain without NATS: no grace to wait out.
                        eprintln!("the fleet cannot work without nats-server; killing it");
                        drop(fleet);
                        return Ok(exit::FAILED);
                    }
                    if name == "coordinator" {
                        eprintln!("the fleet cannot work without its coordinator; stopping it");
                        fleet.stop(&mut sigint).await;
                        return Ok(exit::FAILED);
                    }
                }
            }
        }
    }
    eprintln!("stopping the fleet (Ctrl-C again to kill it at once)...");
    fleet.stop(&mut sigint).await;
    eprintln!("fleet stopped");
    Ok(code)
}
