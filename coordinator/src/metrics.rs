//! What the coordinator counts about itself, two ways:
//!
//! - Prometheus metrics (`gpufleet_*`, listed in the README), served on
//!   `metrics_addr` by `natsutil::metrics`. Counters and histograms are
//!   updated where things happen, each through a handle resolved once, so
//!   that the hot path pays an atomic add and never looks a label up.
//!   Figures that are views of the engine's state (jobs by status, tasks by
//!   state, the queue) are computed by the engine when Prometheus scrapes
//!   ([`Observed`]), not kept up to date on every change.
//! - The figures a benchmark reads from the running process, in the `data`
//!   of the `jobs-submit` endpoint's `$SRV.STATS` reply (see the README's
//!   benchmarks section), with quantiles of its own histograms.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpufleet_natsutil::histogram::Histogram;
use gpufleet_natsutil::metrics::latency_buckets;
use gpufleet_schema::{JobState, TaskState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use prometheus_client::registry::Registry;
use serde_json::json;

#[derive(Default)]
struct Inner {
    inputs: u64,
    adverts: u64,
    lease_changes: u64,
    results: u64,
    api_calls: u64,
    batches: u64,
    backlog_max: u64,
    backlog_last: u64,
    schedule_passes: u64,
    placed: u64,
    placement: Histogram,
    pass: Histogram,
    flush: Histogram,
    writes_job: u64,
    writes_lease: u64,
    writes_event: u64,
    writes_checkpoint: u64,
    /// Jobs held in memory now.
    held_jobs: u64,
}

/// Shared between the engine, the runtime, the API and the stats handler.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
    prom: Arc<Prom>,
}

/// Which kind of input arrived.
#[derive(Debug, Clone, Copy)]
pub enum InputKind {
    Advert,
    Lease,
    Result,
    Api,
    Other,
}

/// When a scheduling pass started, for its timing.
pub struct PassTimer(Instant);

/// JetStream writes of one flush, by kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct Writes {
    pub job: u64,
    pub lease: u64,
    pub event: u64,
    pub checkpoint: u64,
}

/// What became of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Placement made it.
    Made,
    /// Its worker did not claim it in time.
    Expired,
    /// Its worker refused it.
    Refused,
    /// It could not be written.
    Failed,
}

impl Reservation {
    const ALL: [Reservation; 4] = [
        Reservation::Made,
        Reservation::Expired,
        Reservation::Refused,
        Reservation::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reservation::Made => "made",
            Reservation::Expired => "expired",
            Reservation::Refused => "refused",
            Reservation::Failed => "failed",
        }
    }
}

/// A JetStream write, by what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Job,
    Lease,
    Event,
    Checkpoint,
}

impl WriteKind {
    const ALL: [WriteKind; 4] = [
        WriteKind::Job,
        WriteKind::Lease,
        WriteKind::Event,
        WriteKind::Checkpoint,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WriteKind::Job => "job",
            WriteKind::Lease => "lease",
            WriteKind::Event => "event",
            WriteKind::Checkpoint => "checkpoint",
        }
    }
}

/// The error codes the API answers with, as metric labels; any other is
/// counted as `other`, so that the label's values stay few.
const ERROR_CODES: [&str; 6] = ["400", "404", "409", "500", "503", "other"];

/// A state-derived view of the engine, taken when Prometheus scrapes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Observed {
    /// Jobs the coordinator holds, by status (in `JobState::ALL` order).
    pub jobs: [i64; 8],
    /// Their tasks, by state (in `TASK_STATES` order).
    pub tasks: [i64; 9],
    /// Tasks waiting to be placed.
    pub queue_length: i64,
    /// How long the longest-waiting of them has waited.
    pub oldest_wait: Duration,
    pub workers_ready: i64,
    pub workers_draining: i64,
    /// Workers held back for a starving task or gang.
    pub workers_held: i64,
}

/// Every task state, in the order [`Observed::tasks`] counts them.
pub const TASK_STATES: [TaskState; 9] = [
    TaskState::Queued,
    TaskState::Reserved,
    TaskState::Running,
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Interrupted,
    TaskState::TimedOut,
    TaskState::Lost,
    TaskState::Cancelled,
];

/// The index of `state` in [`TASK_STATES`].
pub fn task_state_index(state: TaskState) -> usize {
    TASK_STATES
        .iter()
        .position(|s| *s == state)
        .expect("every state is listed")
}

/// The index of `status` in `JobState::ALL`.
pub fn job_state_index(status: JobState) -> usize {
    JobState::ALL
        .iter()
        .position(|s| *s == status)
        .expect("every status is listed")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointCodeLabel {
    endpoint: &'static str,
    code: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn histogram() -> PromHistogram {
    PromHistogram::new(latency_buckets())
}

/// The Prometheus metrics, with a handle per label value resolved up front.
struct Prom {
    jobs: Family<StatusLabel, Gauge>,
    tasks: Family<StateLabel, Gauge>,
    queue_length: Gauge,
    queue_oldest_wait: FloatGauge,
    workers: Family<StateLabel, Gauge>,
    leader: Gauge,
    tasks_ended: Family<StateLabel, Counter>,
    ended: Vec<Counter>,
    retries: Counter,
    preempted: Counter,
    leases_lost: Counter,
    reservations: Family<OutcomeLabel, Counter>,
    reservation: Vec<Counter>,
    placement: PromHistogram,
    queue_wait: PromHistogram,
    pass: PromHistogram,
    writes: Family<KindLabel, PromHistogram, fn() -> PromHistogram>,
    write: Vec<PromHistogram>,
    requests: Family<EndpointLabel, Counter>,
    errors: Family<EndpointCodeLabel, Counter>,
    backlog: Gauge,
}

impl Default for Prom {
    fn default() -> Self {
        let tasks_ended = Family::<StateLabel, Counter>::default();
        let ended = TASK_STATES
            .iter()
            .map(|s| {
                tasks_ended
                    .get_or_create(&StateLabel { state: s.as_str() })
                    .clone()
            })
            .collect();
        let reservations = Family::<OutcomeLabel, Counter>::default();
        let reservation = Reservation::ALL
            .iter()
            .map(|r| {
                reservations
                    .get_or_create(&OutcomeLabel {
                        outcome: r.as_str(),
                    })
                    .clone()
            })
            .collect();
        let writes =
            Family::<KindLabel, PromHistogram, fn() -> PromHistogram>::new_with_constructor(
                histogram,
            );
        let write = WriteKind::ALL
            .iter()
            .map(|k| {
                writes
                    .get_or_create(&KindLabel { kind: k.as_str() })
                    .clone()
            })
            .collect();
        Prom {
            jobs: Family::default(),
            tasks: Family::default(),
            queue_length: Gauge::default(),
            queue_oldest_wait: FloatGauge::default(),
            workers: Family::default(),
            leader: Gauge::default(),
            tasks_ended,
            ended,
            retries: Counter::default(),
            preempted: Counter::default(),
            leases_lost: Counter::default(),
            reservations,
            reservation,
            placement: histogram(),
            queue_wait: histogram(),
            pass: histogram(),
            writes,
            write,
            requests: Family::default(),
            errors: Family::default(),
            backlog: Gauge::default(),
        }
    }
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut m) = self.inner.lock() {
            f(&mut m);
        }
    }

    pub fn input(&self, kind: InputKind) {
        self.with(|m| {
            m.inputs += 1;
            match kind {
                InputKind::Advert => m.adverts += 1,
                InputKind::Lease => m.lease_changes += 1,
                InputKind::Result => m.results += 1,
                InputKind::Api => m.api_calls += 1,
                InputKind::Other => {}
            }
        });
    }

    pub fn batch(&self, backlog: usize) {
        self.with(|m| {
            m.batches += 1;
            m.backlog_last = backlog as u64;
            m.backlog_max = m.backlog_max.max(backlog as u64);
        });
        self.prom.backlog.set(backlog as i64);
    }

    /// Runs one placement (of a task or a gang) and records how long it took.
    pub fn time_placement<R>(&self, place: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let r = place();
        let d = started.elapsed();
        self.with(|m| m.placement.record(d));
        self.prom.placement.observe(d.as_secs_f64());
        r
    }

    /// Starts timing a scheduling pass; [`Metrics::pass`] records it. The
    /// engine decides nothing from these readings: they are only counted.
    pub fn pass_started(&self) -> PassTimer {
        PassTimer(Instant::now())
    }

    pub fn pass(&self, timer: PassTimer, placed: usize) {
        let d = timer.0.elapsed();
        self.with(|m| {
            m.schedule_passes += 1;
            m.placed += placed as u64;
            m.pass.record(d);
        });
        self.prom.pass.observe(d.as_secs_f64());
    }

    pub fn flush(&self, d: Duration, w: Writes) {
        self.with(|m| {
            m.flush.record(d);
            m.writes_job += w.job;
            m.writes_lease += w.lease;
            m.writes_event += w.event;
            m.writes_checkpoint += w.checkpoint;
        });
    }

    /// How many jobs the engine holds now.
    pub fn held(&self, jobs: usize) {
        self.with(|m| m.held_jobs = jobs as u64);
    }

    /// One JetStream write of `kind` took `d` (from send to ack).
    pub fn write(&self, kind: WriteKind, d: Duration) {
        self.prom.write[kind as usize].observe(d.as_secs_f64());
    }

    /// A task's attempt ended in `state` (final or to be retried).
    pub fn task_ended(&self, state: TaskState) {
        if state.is_end() {
            self.prom.ended[task_state_index(state)].inc();
        }
    }

    /// A task queues again for a new attempt.
    pub fn retry(&self) {
        self.prom.retries.inc();
    }

    /// `tasks` running tasks were asked to stop for waiting work.
    pub fn preempted(&self, tasks: usize) {
        self.prom.preempted.inc_by(tasks as u64);
    }

    /// A running attempt's lease lapsed, or its worker gave it up.
    pub fn lease_lost(&self) {
        self.prom.leases_lost.inc();
    }

    pub fn reservation(&self, what: Reservation) {
        self.prom.reservation[what as usize].inc();
    }

    /// A task waited `d` from joining the queue to its reservation.
    pub fn queue_wait(&self, d: Duration) {
        self.prom.queue_wait.observe(d.as_secs_f64());
    }

    /// The counter of requests to `endpoint`, for its loop to keep: counting
    /// a request is then one atomic add (and the series exists, at zero,
    /// from the service's start).
    pub fn api_requests(&self, endpoint: &'static str) -> Counter {
        self.prom
            .requests
            .get_or_create(&EndpointLabel { endpoint })
            .clone()
    }

    /// The API answered a request at `endpoint` with error `code`.
    pub fn api_error(&self, endpoint: &'static str, code: u16) {
        let code = ERROR_CODES
            .iter()
            .copied()
            .find(|c| *c == code.to_string())
            .unwrap_or("other");
        self.prom
            .errors
            .get_or_create(&EndpointCodeLabel { endpoint, code })
            .inc();
    }

    /// Whether this coordinator leads the fleet.
    pub fn leading(&self, yes: bool) {
        self.prom.leader.set(i64::from(yes));
    }

    /// Sets the state-derived gauges from a view the engine took.
    pub fn observed(&self, o: &Observed) {
        let p = &self.prom;
        for (status, n) in JobState::ALL.iter().zip(o.jobs) {
            p.jobs
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(n);
        }
        for (state, n) in TASK_STATES.iter().zip(o.tasks) {
            p.tasks
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n);
        }
        p.queue_length.set(o.queue_length);
        p.queue_oldest_wait.set(o.oldest_wait.as_secs_f64());
        for (state, n) in [
            ("ready", o.workers_ready),
            ("draining", o.workers_draining),
            ("held", o.workers_held),
        ] {
            p.workers.get_or_create(&StateLabel { state }).set(n);
        }
    }

    /// A registry of every Prometheus metric, for the `/metrics` endpoint.
    pub fn registry(&self) -> Registry {
        let p = &self.prom;
        let mut r = Registry::with_prefix("gpufleet");
        r.register(
            "jobs",
            "Jobs by status: every unfinished job and the newest 1,000 finished ones",
            p.jobs.clone(),
        );
        r.register("tasks", "Tasks of those jobs, by state", p.tasks.clone());
        r.register(
            "queue_length",
            "Tasks waiting to be placed",
            p.queue_length.clone(),
        );
        r.register_with_unit(
            "queue_oldest_wait",
            "How long the longest-waiting task has waited",
            prometheus_client::registry::Unit::Seconds,
            p.queue_oldest_wait.clone(),
        );
        r.register(
            "workers",
            "Workers by state: ready, draining, or held for a starving task",
            p.workers.clone(),
        );
        r.register(
            "coordinator_leader",
            "1 while this coordinator leads the fleet, 0 while it stands by",
            p.leader.clone(),
        );
        r.register(
            "tasks_ended",
            "Task attempts that ended, by how (LOST and INTERRUPTED ones may be retried)",
            p.tasks_ended.clone(),
        );
        r.register(
            "task_retries",
            "Tasks queued again for a new attempt",
            p.retries.clone(),
        );
        r.register(
            "tasks_preempted",
            "Running tasks asked to stop for waiting work of a higher priority",
            p.preempted.clone(),
        );
        r.register(
            "leases_lost",
            "Running attempts whose lease lapsed or whose worker gave them up",
            p.leases_lost.clone(),
        );
        r.register(
            "reservations",
            "Reservations by outcome: made, expired unclaimed, refused by the worker, failed to write",
            p.reservations.clone(),
        );
        r.register_with_unit(
            "placement",
            "Time to place one task (or one gang) in a scheduling pass",
            prometheus_client::registry::Unit::Seconds,
            p.placement.clone(),
        );
        r.register_with_unit(
            "queue_wait",
            "Time from joining the queue to a reservation",
            prometheus_client::registry::Unit::Seconds,
            p.queue_wait.clone(),
        );
        r.register_with_unit(
            "schedule_pass",
            "Time of one scheduling pass over the queue",
            prometheus_client::registry::Unit::Seconds,
            p.pass.clone(),
        );
        r.register_with_unit(
            "jetstream_write",
            "JetStream write latency, from send to ack, by what is written",
            prometheus_client::registry::Unit::Seconds,
            p.writes.clone(),
        );
        r.register(
            "api_requests",
            "API requests by endpoint",
            p.requests.clone(),
        );
        r.register(
            "api_errors",
            "API requests answered with an error, by endpoint and code",
            p.errors.clone(),
        );
        r.register(
            "input_backlog",
            "Inputs waiting for the engine after its last batch",
            p.backlog.clone(),
        );
        r
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let Ok(m) = self.inner.lock() else {
            return serde_json::Value::Null;
        };
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        json!({
            "inputs": m.inputs,
            "adverts": m.adverts,
            "lease_changes": m.lease_changes,
            "results": m.results,
            "api_calls": m.api_calls,
            "batches": m.batches,
            "backlog_last": m.backlog_last,
            "backlog_max": m.backlog_max,
            "schedule_passes": m.schedule_passes,
            "placed": m.placed,
            "placement_us": {"count": m.placement.count(), "p50": us(m.placement.quantile(0.5)), "p99": us(m.placement.quantile(0.99)), "max": us(m.placement.max())},
            "pass_us": {"count": m.pass.count(), "p50": us(m.pass.quantile(0.5)), "p99": us(m.pass.quantile(0.99)), "max": us(m.pass.max())},
            "flush_us": {"count": m.flush.count(), "p50": us(m.flush.quantile(0.5)), "p99": us(m.flush.quantile(0.99))},
            "held_jobs": m.held_jobs,
            "writes": {"job": m.writes_job, "lease": m.writes_lease, "event": m.writes_event, "checkpoint": m.writes_checkpoint},
        })
    }
}
