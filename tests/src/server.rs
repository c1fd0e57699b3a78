//! Real `nats-server` processes for tests: one server or a 3-node cluster,
//! each on free 127.0.0.1 ports with a temporary store, killed and removed
//! on drop (also when the test panics). With `GPUFLEET_TEST_NATS_URL` set,
//! [`NatsServer::start`] uses that server instead (a NATS container, say).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// Names a running server for [`NatsServer::start`] to hand out instead of
/// starting one. Only for one test at a time that never stops its server:
/// the tests on it share its streams and buckets.
pub const EXTERNAL_URL_VAR: &str = "GPUFLEET_TEST_NATS_URL";

/// How long a server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// The nats-server binary: `NATS_SERVER_BIN`, else whatever the project's
/// script finds or installs. Resolved once per test process.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = workspace_root().join("scripts/nats-server.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed; set NATS_SERVER_BIN to a nats-server 2.11+",
            script.display()
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .clone()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A port nobody listens on right now. Another process could take it before
/// we use it; callers that bind it retry on failure.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    // Our server says so once it listens: a bare connect could reach
    // another process that took the port between probe and bind (seen
    // once in CI: the port answered, then the client was refused).
    let ours = format!("Listening for client connections on 127.0.0.1:{port}");
    loop {
        let said = std::fs::read_to_string(log).is_ok_and(|l| l.contains(&ours));
        if said && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "nats-server exited with {status} before listening:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("nats-server did not listen on {port} within {START_DEADLINE:?}");
        }
        // The server gives no readiness signal we can wait on without a
        // client; a short poll of the port is the event here.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One nats-server with JetStream.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    config: PathBuf,
    /// The URL of a server we did not start and must not stop.
    external: Option<String>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store.
    pub fn start() -> NatsServer {
        Self::try_start().expect("start nats-server")
    }

    pub fn try_start() -> Result<NatsServer> {
        match std::env::var(EXTERNAL_URL_VAR) {
            Ok(url) => Self::external(url),
            Err(_) => Self::try_start_with(""),
        }
    }

    /// A handle on a server someone else runs at `url`: its URL and port
    /// for the tests, never stopped by them.
    pub fn external(url: String) -> Result<NatsServer> {
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("{EXTERNAL_URL_VAR}={url}: no port at its end"))?;
        Ok(NatsServer {
            child: None,
            port,
            dir: tempfile::Builder::new()
                .prefix("gpufleet-nats-")
                .tempdir()?,
            config: PathBuf::new(),
            external: Some(url),
        })
    }

    /// Starts a server with `extra` appended to its configuration (an
    /// `authorization { ... }` block, say).
    pub fn start_with(extra: &str) -> NatsServer {
        Self::try_start_with(extra).expect("start nats-server")
    }

    fn try_start_with(extra: &str) -> Result<NatsServer> {
        let mut last_error = None;
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("gpufleet-nats-")
                .tempdir()?;
            let port = free_port();
            let config = dir.path().join("server.conf");
            std::fs::write(
                &config,
                single_config(port, &dir.path().join("store")) + extra,
            )?;
            let mut server = NatsServer {
                child: None,
                port,
                dir,
                config,
                external: None,
            };
            // A failure is most likely the port taken between probe and bind.
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.path().join("server.log");
        let mut child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn nats-server")?;
        match wait_for_port(self.port, &mut child, &log) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Starts a server from a whole configuration file of someone else's
    /// making (`gpufleet auth` writes one) that listens on `port`; always
    /// our own, even where the others are external.
    pub fn from_config(config: &Path, port: u16) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-nats-")
            .tempdir()
            .expect("tempdir");
        let mut server = NatsServer {
            child: None,
            port,
            dir,
            config: config.to_path_buf(),
            external: None,
        };
        server
            .spawn()
            .expect("start nats-server from its configuration");
        server
    }

    pub fn url(&self) -> String {
        match &self.external {
            Some(url) => url.clone(),
            None => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9`: nothing is flushed.
    pub fn kill(&mut self) {
        assert!(
            self.external.is_none(),
            "this test stops its nats-server: run it without {EXTERNAL_URL_VAR}"
        );
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server (SIGKILL, as a crash would) and starts it again on
    /// the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("restart nats-server on the same port");
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn single_config(port: u16, store: &Path) -> String {
    format!(
        "listen: \"127.0.0.1:{port}\"\n\
         http: \"127.0.0.1:0\"\n\
         jetstream {{ store_dir: \"{}\" }}\n",
        store.display()
    )
}

/// Three nats-servers clustered over routes, for replicated JetStream.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        for attempt in 0..5 {
            match Self::try_start() {
                Ok(c) => return c,
                Err(e) => eprintln!("cluster start attempt {attempt} failed: {e:#}"),
            }
        }
        panic!("could not start a 3-node nats cluster");
    }

    fn try_start() -> Result<NatsCluster> {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("gpufleet-nats-c-")
                .tempdir()?;
            let config = dir.path().join("server.conf");
            std::fs::write(
                &config,
                format!(
                    "server_name: n{i}\n\
                     listen: \"127.0.0.1:{}\"\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: gpufleet-test, listen: \"127.0.0.1:{}\", routes: [{routes}] }}\n",
                    client_ports[i],
                    dir.path().join("store").display(),
                    route_ports[i]
                ),
            )?;
            let mut node = NatsServer {
                child: None,
                port: client_ports[i],
                dir,
                config,
                external: None,
            };
            node.spawn()?;
            nodes.push(node);
        }
        Ok(NatsCluster { nodes })
    }

    /// A URL that lists every node, so that clients fail over.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
