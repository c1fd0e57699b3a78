//! The coordinator's settings: defaults < file < `GPUFLEET_*` env < flags.

use std::time::Duration;

use gpufleet_natsutil::metrics::MetricsAddr;
use gpufleet_natsutil::telemetry::LogFormat;
use gpufleet_natsutil::Setup;
use gpufleet_schema::Dur;
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
    /// How long the leadership lives without renewal: a coordinator
    /// standing by takes over this long after the leader dies.
    pub leader_ttl: Dur,
    /// How long to keep retrying the first connection to NATS.
    pub connect_patience: Dur,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Where Prometheus metrics are served (`/metrics`), or `off`.
    pub metrics_addr: MetricsAddr,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds: None,
            nats_token: None,
            reservation_ttl: Dur::secs(30),
            lease_ttl: Dur::secs(30),
            tick: Dur::secs(1),
            starvation_after: Dur::secs(60),
            result_grace: Dur::secs(30),
            max_reservations_per_pass: 512,
            replicas: 1,
            events_max_age: Dur::secs(7 * 24 * 3600),
            leader_ttl: Dur::secs(10),
            connect_patience: Dur::secs(60),
            log_format: LogFormat::Text,
            metrics_addr: MetricsAddr::Listen(DEFAULT_METRICS_ADDR.into()),
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
        Ok(())
    }

    pub fn auth(&self) -> gpufleet_natsutil::Auth {
        gpufleet_natsutil::Auth {
            creds: self.nats_creds.clone(),
            token: self.nats_token.clone(),
        }
    }

    pub fn setup(&self) -> Setup {
        Setup {
            replicas: self.replicas,
            events_max_age: self.events_max_age.0,
            ..Setup::default()
        }
    }
}
