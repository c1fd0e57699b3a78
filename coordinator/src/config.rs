//! The coordinator's settings: defaults < file < `GPUFLEET_*` env < flags.

use std::time::Duration;

use gpufleet_natsutil::metrics::MetricsAddr;
use gpufleet_natsutil::telemetry::LogFormat;
use gpufleet_natsutil::Setup;
use std::path::PathBuf;

use gpufleet_schema::policy::SchedPolicy;
use gpufleet_schema::{ByteSize, Dur, UserId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
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
    /// Users act under their own names and see only their own jobs (see
    /// the README's security model); off, everyone is one user who sees
    /// everything, and the API's subjects without a user are served too.
    pub roles: bool,
    /// Users who see and act on every job when roles are on.
    pub admins: Vec<UserId>,
    /// A file holding the NKey seed reservations are signed with; workers
    /// trust its public key (their `trusted_keys`).
    pub signing_key: Option<PathBuf>,
    /// How long a reservation waits for its worker's claim.
    pub reservation_ttl: Dur,
    /// How long a claimed lease lives between renewals; the worker renews
    /// it three times per period.
    pub lease_ttl: Dur,
    /// How often the coordinator re-checks queued work and drift even
    /// when nothing happens.
    pub tick: Dur,
    /// How long the first task in the queue may wait before the coordinator
    /// holds a worker for it (see the README on the queue policy).
    pub starvation_after: Dur,
    /// How long a task may show RUNNING after its worker released the lease
    /// without its result arriving, before it counts as LOST.
    pub result_grace: Dur,
    /// The most reservations one scheduling pass makes; the next pass
    /// follows at once. Keeps each batch of writes small enough to be
    /// acknowledged promptly when thousands of tasks fit at once.
    pub max_reservations_per_pass: usize,
    /// JetStream replicas for the stores it creates.
    pub replicas: usize,
    /// How long events (logs, results) are kept.
    pub events_max_age: Dur,
    /// The most bytes the events stream holds; the oldest events go first.
    pub events_max_bytes: ByteSize,
    /// The most bytes of job records; once full, new jobs are refused.
    pub jobs_max_bytes: ByteSize,
    /// How long artifacts are kept.
    pub artifacts_max_age: Dur,
    /// The most bytes of artifacts; once full, uploads fail.
    pub artifacts_max_bytes: ByteSize,
    /// How long a finished job's record is kept (then it is gone, as if
    /// `gpufleet delete` had removed it).
    pub job_retention: Dur,
    /// The TTL of an unfinished job's record: written again at half of it
    /// while the job lives, so that a finished job's record needs no
    /// removal (it expires), and a start-up reads the records of jobs
    /// finished within it at most.
    pub active_record_ttl: Dur,
    /// The pause before a task's first retry; each further retry waits
    /// twice as long (with jitter), up to `retry_backoff_max`.
    pub retry_backoff: Dur,
    pub retry_backoff_max: Dur,
    /// How long a preempted task has, after SIGTERM (and a line in its
    /// inbox), to save its work before its worker kills it.
    pub preempt_grace: Dur,
    /// How long the leadership lives without renewal: a coordinator
    /// standing by takes over this long after the leader dies.
    pub leader_ttl: Dur,
    /// How long to keep retrying the first connection to NATS.
    pub connect_patience: Dur,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Where Prometheus metrics are served (`/metrics`), or `off`.
    pub metrics_addr: MetricsAddr,
    /// Fair-share weights and quotas; the jobs bucket's `meta.policy` key
    /// replaces them while it exists (see the README's "Fair share and
    /// quotas").
    pub scheduling: SchedPolicy,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds: None,
            nats_token: None,
            nats_nkey: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_ca: None,
            roles: false,
            admins: Vec::new(),
            signing_key: None,
            reservation_ttl: Dur::secs(30),
            lease_ttl: Dur::secs(30),
            tick: Dur::secs(1),
            starvation_after: Dur::secs(60),
            result_grace: Dur::secs(30),
            max_reservations_per_pass: 512,
            replicas: 1,
            events_max_age: Dur::secs(7 * 24 * 3600),
            events_max_bytes: ByteSize(1 << 30),
            jobs_max_bytes: ByteSize(1 << 30),
            artifacts_max_age: Dur::secs(30 * 24 * 3600),
            artifacts_max_bytes: ByteSize(4 << 30),
            job_retention: Dur::secs(7 * 24 * 3600),
            active_record_ttl: Dur::secs(600),
            retry_backoff: Dur(Duration::from_millis(500)),
            retry_backoff_max: Dur::secs(60),
            preempt_grace: Dur::secs(30),
            leader_ttl: Dur::secs(10),
            connect_patience: Dur::secs(60),
            log_format: LogFormat::Text,
            metrics_addr: MetricsAddr::Listen(DEFAULT_METRICS_ADDR.into()),
            scheduling: SchedPolicy::default(),
        }
    }
}

/// The coordinator's metrics, on loopback: nothing is exposed to the
/// network unless the operator chooses to (`0.0.0.0:9464` for a Prometheus
/// elsewhere).
pub const DEFAULT_METRICS_ADDR: ([u8; 4], u16) =
    ([127, 0, 0, 1], gpufleet_natsutil::metrics::COORDINATOR_PORT);

impl CoordinatorConfig {
    /// Settings for tests: short timers so faults show quickly.
    pub fn for_test(nats_url: impl Into<String>) -> Self {
        CoordinatorConfig {
            nats_url: nats_url.into(),
            reservation_ttl: Dur::secs(5),
            lease_ttl: Dur::secs(3),
            tick: Dur(Duration::from_millis(200)),
            starvation_after: Dur::secs(5),
            result_grace: Dur::secs(5),
            leader_ttl: Dur::secs(3),
            connect_patience: Dur::secs(10),
            retry_backoff: Dur(Duration::from_millis(200)),
            retry_backoff_max: Dur::secs(2),
            // Many test servers share one disk; each reserves these.
            events_max_bytes: ByteSize(256 << 20),
            jobs_max_bytes: ByteSize(256 << 20),
            artifacts_max_bytes: ByteSize(512 << 20),
            // Any free port: tests run side by side.
            metrics_addr: MetricsAddr::Listen(([127, 0, 0, 1], 0).into()),
            ..Default::default()
        }
    }

    /// Checks what types cannot; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.reservation_ttl.0 < Duration::from_secs(1) {
            return Err("reservation_ttl: at least 1s (NATS TTLs are whole seconds)".into());
        }
        if self.lease_ttl.0 < Duration::from_secs(2) {
            return Err("lease_ttl: at least 2s, so that renewals fit inside it".into());
        }
        if self.tick.0 < Duration::from_millis(10) {
            return Err("tick: at least 10ms".into());
        }
        if self.leader_ttl.0 < Duration::from_secs(2) {
            return Err("leader_ttl: at least 2s, so that renewals fit inside it".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return Err("replicas: from 1 to 5".into());
        }
        // Every duration is added to a clock somewhere; none may overflow it.
        let year = Duration::from_secs(366 * 24 * 3600);
        for (name, d) in [
            ("reservation_ttl", self.reservation_ttl),
            ("lease_ttl", self.lease_ttl),
            ("tick", self.tick),
            ("starvation_after", self.starvation_after),
            ("result_grace", self.result_grace),
            ("events_max_age", self.events_max_age),
            ("artifacts_max_age", self.artifacts_max_age),
            ("job_retention", self.job_retention),
            ("active_record_ttl", self.active_record_ttl),
            ("retry_backoff", self.retry_backoff),
            ("retry_backoff_max", self.retry_backoff_max),
            ("preempt_grace", self.preempt_grace),
            ("leader_ttl", self.leader_ttl),
            ("connect_patience", self.connect_patience),
        ] {
            if d.0 > year {
                return Err(format!("{name}: at most 366 days"));
            }
        }
        if self.job_retention.0 < Duration::from_secs(1) {
            return Err("job_retention: at least 1s (NATS TTLs are whole seconds)".into());
        }
        if self.active_record_ttl.0 < Duration::from_secs(10) {
            return Err("active_record_ttl: at least 10s (it is refreshed at half of it)".into());
        }
        self.scheduling
            .validate()
            .map_err(|e| format!("scheduling.{e}"))?;
        if self.retry_backoff_max.0 < self.retry_backoff.0 {
            return Err("retry_backoff_max: at least retry_backoff".into());
        }
        for (name, b) in [
            ("events_max_bytes", self.events_max_bytes),
            ("jobs_max_bytes", self.jobs_max_bytes),
            ("artifacts_max_bytes", self.artifacts_max_bytes),
        ] {
            if b.0 < 1 << 20 || b.0 > 1 << 50 {
                return Err(format!("{name}: from 1MiB to 1PiB"));
            }
        }
        Ok(())
    }

    pub fn auth(&self) -> gpufleet_natsutil::Auth {
        gpufleet_natsutil::Auth {
            creds: self.nats_creds.clone(),
            token: self.nats_token.clone(),
            nkey: self.nats_nkey.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            inbox_prefix: Some(gpufleet_schema::roles::Role::Coordinator.inbox_prefix()),
        }
    }

    /// The key reservations are signed with, if one is set.
    pub fn signing_key(&self) -> Result<Option<nkeys::KeyPair>, String> {
        let Some(path) = &self.signing_key else {
            return Ok(None);
        };
        let seed = gpufleet_natsutil::connect::read_nkey_seed(path)
            .map_err(|e| format!("signing_key {}: {e}", path.display()))?;
        nkeys::KeyPair::from_seed(&seed)
            .map(Some)
            .map_err(|e| format!("signing_key {}: {e}", path.display()))
    }

    pub fn setup(&self) -> Setup {
        Setup {
            replicas: self.replicas,
            events_max_age: self.events_max_age.0,
            events_max_bytes: self.events_max_bytes.0 as i64,
            jobs_max_bytes: self.jobs_max_bytes.0 as i64,
            artifacts_max_age: self.artifacts_max_age.0,
            artifacts_max_bytes: self.artifacts_max_bytes.0 as i64,
        }
    }
}
