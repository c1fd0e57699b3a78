//! The worker's settings: defaults < file < `GPUFLEET_*` env < flags.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use gpufleet_natsutil::metrics::MetricsAddr;
use gpufleet_natsutil::telemetry::LogFormat;
use gpufleet_schema::{capacity, ByteSize, Dur, WorkerId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// One URL or several, comma-separated.
    pub nats_url: String,
    /// A NATS credentials file (JWT and NKey seed), for secured servers.
    pub nats_creds: Option<std::path::PathBuf>,
    /// A NATS token, for servers that use one (prefer the environment
    /// variable `GPUFLEET_NATS_TOKEN` to a file).
    pub nats_token: Option<String>,
    /// A file holding a bare NKey seed, for servers that list users by
    /// public NKey (as `gpufleet auth` writes them).
    pub nats_nkey: Option<PathBuf>,
    /// A client certificate and its key (PEM), for mutual TLS.
    pub nats_tls_cert: Option<PathBuf>,
    pub nats_tls_key: Option<PathBuf>,
    /// The CA (PEM) the server's certificate must chain to.
    pub nats_tls_ca: Option<PathBuf>,
    /// Public NKeys (`U...`, `A...`) of the coordinators whose signature
    /// a reservation must carry before anything of it runs. Empty: every
    /// reservation is run (a fleet without roles).
    pub trusted_keys: Vec<String>,
    /// Unique in the fleet; defaults to the host name.
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `COUNTxMEMORY[:MODEL]` to offer simulated GPUs instead of NVML's.
    pub simulate_gpus: Option<String>,
    /// How often the advert is refreshed.
    pub heartbeat: Dur,
    /// How long the advert lives without a heartbeat.
    pub advert_ttl: Dur,
    /// Where task directories are made; defaults to a folder in $TMPDIR.
    pub work_dir: Option<PathBuf>,
    /// Keep each attempt's directory after it ends (for debugging).
    pub keep_task_dirs: bool,
    /// Override the CPUs offered (default: what the OS gives this process).
    pub cpus: Option<f64>,
    /// Override the memory offered (default: the machine's total).
    pub memory: Option<ByteSize>,
    /// The most memory the load phases of two-phase tasks may hold here
    /// together (default: half the memory offered), so that tasks waiting
    /// for a GPU can never fill the machine and leave a GPU that nothing
    /// could use.
    pub load_memory_cap: Option<ByteSize>,
    /// The address other workers reach this one at (gang rendezvous).
    pub addr: Option<String>,
    /// Ports handed out as `MASTER_PORT` for gangs whose rank 0 runs here.
    pub rendezvous_ports: (u16, u16),
    /// How long a task runs before its RUNNING event is sent; a task that
    /// ends sooner sends only its result (which says when it started), one
    /// JetStream write less. `0s`: at once, before the task starts.
    pub running_event_after: Dur,
    /// SIGTERM-to-SIGKILL grace when a task is stopped.
    pub kill_grace: Dur,
    /// How long a draining worker lets its tasks run before stopping them.
    pub drain_timeout: Dur,
    /// Largest `GPUFLEET_RESULT` file accepted.
    pub max_result_size: ByteSize,
    /// Output shipped per task before the rest is dropped (and counted).
    pub max_log_size: ByteSize,
    /// A log batch goes out at this size...
    pub log_batch_size: ByteSize,
    /// ...or after this long.
    pub log_batch_interval: Dur,
    /// Largest artifact file uploaded.
    pub max_artifact_size: ByteSize,
    /// How long to keep retrying the first connection to NATS.
    pub connect_patience: Dur,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Who tasks run as: a user name, or `uid[:gid]`. Unset: `nobody` when
    /// the worker runs as root, else the worker's own user (only root can
    /// start processes as another). `root` keeps tasks as root, with
    /// access to everything the worker has.
    pub run_as: Option<String>,
    /// Variables of the worker's environment that tasks get, beyond
    /// `PATH`, `HOME`, `LANG`, `LC_*` and `TZ`; `NAME*` for a prefix.
    pub pass_env: Vec<String>,
    /// Processes (threads count) one task may have: its RLIMIT_NPROC
    /// (counted per user, not for root) and its cgroup's `pids.max`.
    pub max_task_processes: u64,
    /// Give each task a cgroup of its own where the worker may make one
    /// (cgroup v1 `pids`, or a delegated v2 subtree).
    pub task_cgroups: bool,
    /// Where Prometheus metrics are served (`/metrics`), or `off`.
    pub metrics_addr: MetricsAddr,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds: None,
            nats_token: None,
            nats_nkey: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_ca: None,
            trusted_keys: Vec::new(),
            name: None,
            labels: BTreeMap::new(),
            simulate_gpus: None,
            heartbeat: Dur::secs(2),
            advert_ttl: Dur::secs(10),
            work_dir: None,
            keep_task_dirs: false,
            cpus: None,
            memory: None,
            load_memory_cap: None,
            addr: None,
            rendezvous_ports: capacity::DEFAULT_RENDEZVOUS_PORTS,
            running_event_after: Dur(Duration::from_millis(50)),
            kill_grace: Dur::secs(10),
            drain_timeout: Dur::secs(300),
            max_result_size: ByteSize::mib(1),
            max_log_size: ByteSize::mib(256),
            log_batch_size: ByteSize(64 << 10),
            log_batch_interval: Dur(Duration::from_millis(100)),
            max_artifact_size: ByteSize::gib(4),
            connect_patience: Dur::secs(60),
            log_format: LogFormat::Text,
            run_as: None,
            pass_env: Vec::new(),
            max_task_processes: 4096,
            task_cgroups: true,
            metrics_addr: MetricsAddr::Listen(DEFAULT_METRICS_ADDR.into()),
        }
    }
}

/// The worker's metrics, on loopback: nothing is exposed to the network
/// unless the operator chooses to. A second worker on one machine needs a
/// port of its own (or gets a warning and no metrics).
pub const DEFAULT_METRICS_ADDR: ([u8; 4], u16) =
    ([127, 0, 0, 1], gpufleet_natsutil::metrics::WORKER_PORT);

impl WorkerConfig {
    /// Settings for tests: quick heartbeats and short grace periods.
    pub fn for_test(nats_url: impl Into<String>, name: &str) -> Self {
        WorkerConfig {
            nats_url: nats_url.into(),
            name: Some(name.into()),
            heartbeat: Dur(Duration::from_millis(500)),
            advert_ttl: Dur::secs(2),
            kill_grace: Dur(Duration::from_millis(500)),
            drain_timeout: Dur::secs(5),
            connect_patience: Dur::secs(10),
            // Any free port: tests run side by side.
            metrics_addr: MetricsAddr::Listen(([127, 0, 0, 1], 0).into()),
            ..Default::default()
        }
    }

    pub fn auth(&self) -> gpufleet_natsutil::Auth {
        gpufleet_natsutil::Auth {
            creds: self.nats_creds.clone(),
            token: self.nats_token.clone(),
            nkey: self.nats_nkey.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            // Its replies come to its own inbox, which its role may read.
            inbox_prefix: self
                .worker_id()
                .ok()
                .map(|w| gpufleet_schema::roles::Role::Worker(w).inbox_prefix()),
        }
    }

    /// The keys in `trusted_keys`, checked.
    pub fn trusted_keys(&self) -> Result<Vec<nkeys::KeyPair>, String> {
        self.trusted_keys
            .iter()
            .map(|k| {
                nkeys::KeyPair::from_public_key(k)
                    .map_err(|e| format!("trusted_keys: {k:?} is not a public NKey ({e})"))
            })
            .collect()
    }

    /// The worker's name: the configured one, else the host's.
    pub fn worker_id(&self) -> Result<WorkerId, String> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => hostname(),
        };
        WorkerId::new(name.clone()).map_err(|e| format!("name: {e}"))
    }

    pub fn validate(&self) -> Result<(), String> {
        self.worker_id()?;
        self.trusted_keys()?;
        if self.heartbeat.0 < Duration::from_millis(100) {
            return Err("heartbeat: at least 100ms".into());
        }
        if self.advert_ttl.0 < Duration::from_secs(1) || self.advert_ttl.0 <= self.heartbeat.0 * 2 {
            return Err(
                "advert_ttl: at least 1s and more than two heartbeats, so one lost heartbeat does not drop the worker"
                    .into(),
            );
        }
        if self.running_event_after.0 > Duration::from_secs(60) {
            return Err("running_event_after: at most 1m (watchers show a task that ran this long as still RESERVED)".into());
        }
        if let Some(c) = self.cpus {
            if !c.is_finite() || c <= 0.0 {
                return Err("cpus: must be more than 0".into());
            }
        }
        if self.load_memory_cap.is_some_and(|c| c.0 == 0) {
            return Err(
                "load_memory_cap: more than 0 (leave it unset for the default, half the memory)"
                    .into(),
            );
        }
        if self.rendezvous_ports.0 == 0 || self.rendezvous_ports.0 > self.rendezvous_ports.1 {
            return Err("rendezvous_ports: a range [low, high] with 0 < low <= high".into());
        }
        for p in &self.pass_env {
            crate::isolation::check_pass_env(p)?;
        }
        if self.max_task_processes < 8 {
            return Err(
                "max_task_processes: at least 8 (a shell and the program it runs need a few)"
                    .into(),
            );
        }
        if self.log_batch_size.0 == 0 || self.log_batch_size.0 > 512 << 10 {
            return Err(
                "log_batch_size: from 1 byte to 512KiB (it must fit one NATS message)".into(),
            );
        }
        Ok(())
    }

    /// The load-phase memory cap for a worker offering `memory`.
    pub fn load_memory_cap(&self, memory: u64) -> u64 {
        self.load_memory_cap.map_or(memory / 2, |c| c.0.min(memory))
    }

    pub fn work_dir(&self, worker: &WorkerId) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("gpufleet-worker-{worker}")))
    }
}

/// Parses `k=v,k=v` from the command line.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("labels: {pair:?} is not key=value"))?;
        if k.trim().is_empty() {
            return Err(format!("labels: {pair:?} has an empty key"));
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn hostname() -> String {
    let raw = crate::procs::hostname()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_else(|| "worker".into());
    // Host names may hold dots; a worker name is one subject token.
    raw.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let l = parse_labels("zone=a, gpu=l4").unwrap();
        assert_eq!(l.get("zone").unwrap(), "a");
        assert_eq!(l.len(), 2);
        assert!(parse_labels("zone").unwrap_err().contains("\"zone\""));
        assert!(parse_labels("=x").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn validation_names_the_setting() {
        let mut c = WorkerConfig::for_test("nats://x:1", "w");
        assert!(c.validate().is_ok());
        c.name = Some("bad.name".into());
        assert!(c.validate().unwrap_err().starts_with("name:"));
        let mut c = WorkerConfig::for_test("nats://x:1", "w");
        c.advert_ttl = Dur::secs(1);
        assert!(c.validate().unwrap_err().starts_with("advert_ttl"));
        let mut c = WorkerConfig::for_test("nats://x:1", "w");
        c.pass_env = vec!["GPUFLEET_*".into()];
        assert!(c.validate().unwrap_err().starts_with("pass_env"));
        let mut c = WorkerConfig::for_test("nats://x:1", "w");
        c.max_task_processes = 1;
        assert!(c.validate().unwrap_err().starts_with("max_task_processes"));
    }

    #[test]
    fn host_name_becomes_a_valid_worker_name() {
        assert!(WorkerId::new(hostname()).is_ok());
    }
}
