//! `gpufleet up`: a whole local fleet in one command: nats-server with
//! JetStream, a coordinator and N workers with simulated GPUs. Ctrl-C (or
//! the end of `--run ... --once`) stops everything it started.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::Api;

pub struct UpOptions {
    pub workers: usize,
    pub simulate_gpus: String,
    pub port: u16,
    pub data_dir: Option<PathBuf>,
    pub nats_server: Option<PathBuf>,
}

/// A child that is stopped when dropped: SIGTERM, a grace, then SIGKILL.
struct Guard {
    name: String,
    child: Child,
}

impl Guard {
    fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let end = std::time::Instant::now() + grace;
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// A running local fleet; dropping it stops every process, workers first.
pub struct LocalFleet {
    pub url: String,
    workers: Vec<Guard>,
    coordinator: Option<Guard>,
    server: Option<Guard>,
    _tmp: Option<tempfile::TempDir>,
}

impl LocalFleet {
    pub fn stop(&mut self) {
        for w in &mut self.workers {
            w.stop(Duration::from_secs(15));
        }
        self.workers.clear();
        if let Some(mut c) = self.coordinator.take() {
            c.stop(Duration::from_secs(10));
        }
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A program that sits beside this one (same build), else on PATH.
fn sibling(name: &str) -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let p = dir.join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// nats-server: the flag, `NATS_SERVER_BIN`, the project's script when run
/// from a checkout, or `nats-server` on PATH.
fn find_nats_server(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new("scripts/nats-server.sh");
    if script.exists() {
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/nats-server.sh")?;
        if out.status.success() {
            return Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
        bail!("scripts/nats-server.sh could not provide a nats-server");
    }
    Ok(PathBuf::from("nats-server"))
}

fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Guard> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    Ok(Guard {
        name: name.to_string(),
        child,
    })
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub async fn up(opts: &UpOptions) -> anyhow::Result<LocalFleet> {
    let nats_server = find_nats_server(opts.nats_server.as_deref())?;
    let (tmp, dir) = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new().prefix("gpufleet-up-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let port = if port_free(opts.port) {
        opts.port
    } else {
        let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        eprintln!("port {} is taken; using {p}", opts.port);
        p
    };
    let url = format!("nats://127.0.0.1:{port}");
    let mut fleet = LocalFleet {
        url: url.clone(),
        workers: vec![],
        coordinator: None,
        server: None,
        _tmp: tmp,
    };

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
    fleet.server = Some(spawn("nats-server", cmd, &dir.join("nats-server.log"))?);
    eprintln!(
        "nats-server   {url}  (store {})",
        dir.join("nats").display()
    );

    let mut cmd = Command::new(sibling("gpufleet-coordinator"));
    cmd.args(["--nats-url", &url]);
    fleet.coordinator = Some(spawn("coordinator", cmd, &dir.join("coordinator.log"))?);
    eprintln!(
        "coordinator   log {}",
        dir.join("coordinator.log").display()
    );

    for i in 1..=opts.workers {
        let name = format!("local-{i}");
        let mut cmd = Command::new(sibling("gpufleet-worker"));
        cmd.args(["--nats-url", &url, "--name", &name])
            .arg("--work-dir")
            .arg(dir.join(format!("work-{name}")));
        if !opts.simulate_gpus.is_empty() {
            cmd.args(["--simulate-gpus", &opts.simulate_gpus]);
        }
        let log = dir.join(format!("{name}.log"));
        fleet.workers.push(spawn(&name, cmd, &log)?);
        eprintln!("worker        {name}  log {}", log.display());
    }

    // Ready when the coordinator answers and lists every worker.
    let api = Api::connect(&url).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ws) = api.workers().await {
            if ws.len() >= opts.workers {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the fleet did not come up within 60s; see the logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("\nfleet ready. Use it from another terminal with:\n  export GPUFLEET_NATS_URL={url}\n  gpufleet workers\n");
    Ok(fleet)
}
