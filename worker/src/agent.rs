//! The worker's main loop: watches its lease keys, accepts or refuses
//! reservations, claims them, and runs each claimed attempt as its own
//! tokio task (supervisor + output shipping + lease renewal + result).
//!
//! One loop owns the ledger and the table of running attempts. Renewals run
//! in each attempt's own task on a timer of their own, so neither a task
//! that prints a lot nor a busy loop can starve them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, object_store::ObjectStore};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use gpufleet_natsutil::{ensure_stores, KvError, KvEvent, KvOp, RawKv, Setup};
use gpufleet_schema::{
    codec, subjects, Event, EventBody, EventKind, JobId, Lease, LeaseState, TaskId, TaskOutcome,
    TaskState, WorkerAdvert, WorkerId,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::advert::{self, AdvertInputs};
use crate::artifacts;
use crate::config::WorkerConfig;
use crate::gpu;
use crate::launcher::{Launcher, Processes};
use crate::ledger::{Capacity, Ledger};
use crate::metrics::WorkerMetrics;
use crate::supervisor::{self, Finished, Limits, Output, StopReason, TaskRun};
use crate::usage;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Connect(#[from] gpufleet_natsutil::ConnectError),
    #[error(transparent)]
    Store(#[from] gpufleet_natsutil::stores::StoreError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("{0}")]
    NameInUse(String),
    #[error("NATS: {0}")]
    Nats(String),
}

/// Output batches waiting between a task's supervisor and its shipper.
/// With `OUTPUT_IN_FLIGHT` and the supervisor's own queue
/// (`max_pending_log_bytes`) this bounds the output a task can make the
/// worker hold: 4 MiB plus about 80 batches (5 MiB at 64 KiB a batch).
const OUTPUT_CHANNEL: usize = 16;
/// Output events published and not yet acknowledged, per task.
const OUTPUT_IN_FLIGHT: usize = 64;

/// What every attempt's task shares.
pub(crate) struct Ctx {
    pub launcher: Arc<dyn Launcher>,
    pub js: jetstream::Context,
    pub leases: RawKv,
    pub objects: ObjectStore,
    pub worker: WorkerId,
    pub instance: String,
    pub cfg: WorkerConfig,
    pub work_dir: PathBuf,
    pub dirs: supervisor::DirPool,
    pub metrics: WorkerMetrics,
    /// What each running attempt uses, for the advert.
    pub usage: usage::Board,
}

/// An attempt this worker holds a lease for.
struct Held {
    stop: Arc<watch::Sender<Option<StopReason>>>,
    /// Set once the attempt has reported and lets its lease go, so that
    /// the purge it causes is not mistaken for a lost lease.
    released: Arc<AtomicBool>,
    /// The lease's latest revision, shared with its renewal timer.
    rev: Arc<AtomicU64>,
}

/// What an attempt's task tells the main loop.
enum AttemptMsg {
    /// The attempt is about to release its lease. The main loop frees its
    /// resources in the ledger first and then answers: once the lease is
    /// gone the coordinator may place new work here at once, and that
    /// reservation must not find the old grant still held.
    Releasing {
        key: String,
        freed: oneshot::Sender<()>,
    },
    /// The attempt's task is over (reported, released, cleaned up).
    Done { key: String },
}

/// Runs the worker until `shutdown` resolves, then drains: no new work,
/// running tasks get `drain_timeout` to finish, then are stopped and handed
/// back (INTERRUPTED, so they are retried elsewhere).
pub async fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    run_with(cfg, shutdown, Arc::new(Processes)).await
}

/// [`run`] with another way of running tasks (benchmarks use
/// [`crate::launcher::Instant`] to measure the control plane alone).
pub async fn run_with(
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()>,
    launcher: Arc<dyn Launcher>,
) -> Result<(), WorkerError> {
    cfg.validate().map_err(WorkerError::Config)?;
    let worker = cfg.worker_id().map_err(WorkerError::Config)?;
    let probe = gpu::open_probe(cfg.simulate_gpus.as_deref(), &worker)
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    let client = gpufleet_natsutil::connect(
        &cfg.nats_url,
        &cfg.auth(),
        &format!("gpufleet-worker {worker}"),
        cfg.connect_patience.0,
    )
    .await?;
    let js = jetstream::new(client.clone());
    ensure_stores(&js, &Setup::default()).await?;
    let leases = RawKv::open(&js, subjects::LEASES_BUCKET).await?;
    let adverts = RawKv::open(&js, subjects::WORKERS_BUCKET).await?;
    let objects = js
        .get_object_store(subjects::ARTIFACTS_BUCKET)
        .await
        .map_err(|e| WorkerError::Nats(e.to_string()))?;
    let instance = uuid::Uuid::now_v7().simple().to_string();
    wait_for_name(&adverts, &worker, &instance).await?;

    let work_dir = cfg.work_dir(&worker);
    tokio::fs::create_dir_all(&work_dir)
        .await
        .map_err(|e| WorkerError::Config(format!("work_dir {}: {e}", work_dir.display())))?;
    let cleaned =
        supervisor::clean_up_earlier_run(&work_dir, worker.as_str(), !cfg.keep_task_dirs).await;
    if cleaned != supervisor::CleanedUp::default() {
        tracing::info!(
            killed = cleaned.killed,
            removed = cleaned.removed,
            "cleaned up after an earlier run of this worker"
        );
    }

    // What the worker offers, fixed at start.
    let (capacity, probe) = advert::initial_capacity(&cfg, probe).await;
    tracing::info!(
        worker = %worker,
        cpus = capacity.cpus_milli as f64 / 1000.0,
        memory = %gpufleet_schema::ByteSize(capacity.memory),
        gpus = capacity.gpus.len(),
        "worker starting"
    );
    let metrics = WorkerMetrics::default();
    metrics.offers(capacity.cpus_milli, capacity.memory);
    let metrics_server = gpufleet_natsutil::metrics::serve_or_warn(
        cfg.metrics_addr,
        metrics.registry(&worker),
        None,
    )
    .await;
    let ctx = Arc::new(Ctx {
        js: js.clone(),
        leases: leases.clone(),
        objects,
        worker: worker.clone(),
        instance: instance.clone(),
        cfg: cfg.clone(),
        dirs: supervisor::DirPool::new(&work_dir, worker.as_str()),
        work_dir,
        launcher,
        metrics: metrics.clone(),
        usage: usage::Board::default(),
    });

    let unmanaged: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let (advert_tx, advert_rx) = watch::channel(AdvertInputs::default());
    let advert_task = tokio::spawn(advert::heartbeat(
        adverts.clone(),
        cfg.clone(),
        worker.clone(),
        instance.clone(),
        capacity.clone(),
        probe,
        advert_rx,
        unmanaged.clone(),
        advert::Observed {
            metrics,
            usage: ctx.usage.clone(),
            metrics_addr: metrics_server.as_ref().map(|s| s.addr().to_string()),
        },
    ));

    let mut watch = leases.watch(&subjects::worker_leases(&worker)).await?;
    let (done_tx, mut done_rx) = mpsc::channel::<AttemptMsg>(1024);
    let mut ledger = Ledger::default();
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut draining = false;
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    tokio::pin!(shutdown);

    let publish_inputs = |held: &HashMap<String, Held>, ledger: &Ledger, draining: bool| {
        let running: Vec<TaskId> = held
            .keys()
            .filter_map(|k| subjects::parse_lease_key(k).map(|(_, t, _)| t))
            .collect();
        let (held_cpus_milli, held_memory) = ledger.held();
        advert_tx.send_replace(AdvertInputs {
            running,
            draining,
            reserved_gpu: ledger.reserved_gpu_memory(&capacity),
            held_cpus_milli,
            held_memory,
        });
    };

    loop {
        tokio::select! {
            _ = &mut shutdown, if !draining => {
                draining = true;
                tracing::info!(running = held.len(), "draining: taking no new work");
                publish_inputs(&held, &ledger, draining);
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + cfg.drain_timeout.0);
                if held.is_empty() {
                    break;
                }
            }
            _ = &mut drain_deadline, if draining => {
                tracing::info!(running = held.len(), "drain timeout: stopping the remaining tasks");
                for h in held.values() {
                    h.stop.send_replace(Some(StopReason::Drain));
                }
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
            Some(msg) = done_rx.recv() => match msg {
                AttemptMsg::Releasing { key, freed } => {
                    ledger.release(&key);
                    publish_inputs(&held, &ledger, draining);
                    let _ = freed.send(());
                }
                AttemptMsg::Done { key } => {
                    held.remove(&key);
                    ledger.release(&key);
                    publish_inputs(&held, &ledger, draining);
                    if draining && held.is_empty() {
                        break;
                    }
                }
            },
            item = watch.next() => {
                let Some(item) = item else {
                    // The watch cannot continue; start it again from the
                    // current state (idempotent for keys we already hold).
                    let mut delay = Duration::from_millis(100);
                    watch = loop {
                        match leases.watch(&subjects::worker_leases(&worker)).await {
                            Ok(w) => break w,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot watch leases; retrying");
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(Duration::from_secs(5));
                            }
                        }
                    };
                    continue;
                };
                let change = match item {
                    Ok(KvEvent::Change(c)) => c,
                    Ok(KvEvent::Synced) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "lease watch error");
                        continue;
                    }
                };
                match change.op {
                    KvOp::Put => {
                        let lease: Lease = match codec::decode(&change.value) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::warn!(key = %change.key, error = %e, "ignoring an unreadable lease");
                                continue;
                            }
                        };
                        let before = held.len();
                        on_lease(&ctx, &mut ledger, &mut held, &capacity, &unmanaged, draining, &done_tx, change.key, change.revision, lease).await;
                        if held.len() != before {
                            publish_inputs(&held, &ledger, draining);
                        }
                    }
                    _ => {
                        // Purged by the coordinator or expired: whatever runs
                        // under it is no longer ours to report.
                        if let Some(h) = held.get(&change.key).filter(|h| !h.released.load(Ordering::SeqCst)) {
                            tracing::warn!(key = %change.key, "lease gone: stopping the task without reporting");
                            h.stop.send_replace(Some(StopReason::Fenced));
                        }
                    }
                }
            }
        }
    }

    advert_task.abort();
    // Leave at once rather than when the TTL runs out.
    if let Err(e) = adverts
        .purge(worker.as_str(), Duration::from_secs(60))
        .await
    {
        tracing::warn!(error = %e, "could not remove this worker's advert");
    }
    // Without NATS there is nothing to flush to; do not wait for it.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Waits until no other live worker advertises under our name.
async fn wait_for_name(
    adverts: &RawKv,
    worker: &WorkerId,
    instance: &str,
) -> Result<(), WorkerError> {
    let Some(entry) = adverts.get(worker.as_str()).await? else {
        return Ok(());
    };
    let Ok(old) = codec::decode::<WorkerAdvert>(&entry.value) else {
        return Ok(());
    };
    if old.instance == instance {
        return Ok(());
    }
    let wait = old.ttl.0 * 2 + Duration::from_secs(1);
    tracing::warn!(
        worker = %worker,
        other = %old.instance,
        "another worker advertised this name recently; waiting up to {wait:?} for its advert to expire"
    );
    let mut w = adverts.watch(worker.as_str()).await?;
    let gone = tokio::time::timeout(wait, async {
        while let Some(Ok(ev)) = w.next().await {
            if let KvEvent::Change(c) = ev {
                if c.op != KvOp::Put {
                    return true;
                }
            }
        }
        false
    })
    .await;
    match gone {
        Ok(true) => Ok(()),
        _ => Err(WorkerError::NameInUse(format!(
            "worker name {worker} is in use by a live worker (instance {}); choose another --name",
            old.instance
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn on_lease(
    ctx: &Arc<Ctx>,
    ledger: &mut Ledger,
    held: &mut HashMap<String, Held>,
    capacity: &Capacity,
    unmanaged: &Arc<Mutex<HashMap<String, u64>>>,
    draining: bool,
    done_tx: &mpsc::Sender<AttemptMsg>,
    key: String,
    rev: u64,
    lease: Lease,
) {
    if let Some(h) = held.get(&key) {
        h.rev.fetch_max(rev, Ordering::SeqCst);
        if lease.state == LeaseState::Cancelling {
            h.stop.send_replace(Some(StopReason::Cancel));
        }
        return;
    }
    match lease.state {
        LeaseState::Reserved => {
            let refusal = if draining {
                Some("the worker is draining".to_string())
            } else if let Some(port) = lease
                .rendezvous
                .as_ref()
                .filter(|r| r.rank == 0)
                .map(|r| r.master_port)
                .filter(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_err())
            {
                // Rank 0 listens there; the others would never meet it.
                Some(format!("MASTER_PORT {port} is in use on this worker"))
            } else {
                let un = unmanaged.lock().map(|m| m.clone()).unwrap_or_default();
                ledger.try_hold(&key, &lease.grant, capacity, &un).err()
            };
            if let Some(reason) = refusal {
                tracing::info!(key, reason, "refusing a reservation");
                refuse(ctx, &key, rev, lease, LeaseState::Rejected, reason).await;
                return;
            }
            let (stop_tx, stop_rx) = watch::channel(None);
            let h = Held {
                stop: Arc::new(stop_tx),
                released: Arc::new(AtomicBool::new(false)),
                rev: Arc::new(AtomicU64::new(rev)),
            };
            let attempt = Attempt {
                ctx: ctx.clone(),
                key: key.clone(),
                lease,
                stop: h.stop.clone(),
                released: h.released.clone(),
                stop_rx,
                rev: h.rev.clone(),
                main: done_tx.clone(),
            };
            held.insert(key.clone(), h);
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                attempt.run().await;
                let _ = done_tx.send(AttemptMsg::Done { key }).await;
            });
        }
        LeaseState::Running | LeaseState::Cancelling => {
            if lease.instance.as_deref() != Some(ctx.instance.as_str()) {
                // A lease of this worker's previous life: that process is
                // gone (its child died with it), so the attempt is lost.
                refuse(
                    ctx,
                    &key,
                    rev,
                    lease,
                    LeaseState::Abandoned,
                    "the worker restarted while the task ran".into(),
                )
                .await;
            }
        }
        LeaseState::Rejected | LeaseState::Abandoned => {}
    }
}

/// Answers a lease with a refusal the coordinator reads and records.
async fn refuse(
    ctx: &Ctx,
    key: &str,
    rev: u64,
    mut lease: Lease,
    state: LeaseState,
    reason: String,
) {
    lease.state = state;
    lease.reason = Some(reason);
    let Ok(bytes) = codec::encode(&lease) else {
        return;
    };
    // A short TTL: if the coordinator is away, the refusal still clears.
    match ctx
        .leases
        .update(key, Bytes::from(bytes), Some(Duration::from_secs(10)), rev)
        .await
    {
        Ok(_) | Err(KvError::Conflict { .. }) => {}
        Err(e) => tracing::warn!(key, error = %e, "could not refuse a lease"),
    }
}

/// When a lease was last known to be this attempt's (claim or renewal), as
/// nanoseconds on a process-wide monotonic clock, which keeps counting
/// while the process is frozen.
#[derive(Default)]
struct Confirmed(AtomicU64);

fn clock_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

impl Confirmed {
    fn mark(&self) {
        self.0.fetch_max(clock_ns(), Ordering::SeqCst);
    }

    fn age(&self) -> Duration {
        Duration::from_nanos(clock_ns().saturating_sub(self.0.load(Ordering::SeqCst)))
    }
}

/// One claimed (or about to be claimed) attempt.
struct Attempt {
    ctx: Arc<Ctx>,
    key: String,
    lease: Lease,
    stop: Arc<watch::Sender<Option<StopReason>>>,
    released: Arc<AtomicBool>,
    stop_rx: watch::Receiver<Option<StopReason>>,
    rev: Arc<AtomicU64>,
    /// The main loop, which owns the ledger.
    main: mpsc::Sender<AttemptMsg>,
}

impl Attempt {
    fn event(&self, body: EventBody, lease_rev: u64) -> (String, Event) {
        let l = &self.lease;
        let kind = match body {
            EventBody::State { .. } => EventKind::State,
            EventBody::Log { .. } => EventKind::Log,
            EventBody::Progress { .. } => EventKind::Progress,
            EventBody::Result(_) => EventKind::Result,
        };
        (
            subjects::events(&l.job_id, &l.task_id, kind),
            Event {
                job_id: l.job_id.clone(),
                task_id: l.task_id.clone(),
                attempt: l.attempt,
                worker: Some(self.ctx.worker.clone()),
                lease_rev: Some(lease_rev),
                at: OffsetDateTime::now_utc(),
                body,
            },
        )
    }

    async fn run(self) {
        let ctx = self.ctx.clone();
        let ttl = self.lease.lease_ttl.0.max(Duration::from_secs(1));
        // Claim: compare-and-set on the reservation's revision.
        let mut claimed = self.lease.clone();
        claimed.state = LeaseState::Running;
        claimed.instance = Some(ctx.instance.clone());
        let Ok(bytes) = codec::encode(&claimed) else {
            return;
        };
        let expected = self.rev.load(Ordering::SeqCst);
        let claim_rev = match ctx
            .leases
            .update(&self.key, Bytes::from(bytes), Some(ttl), expected)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(key = %self.key, error = %e, "could not claim a reservation");
                return;
            }
        };
        self.rev.fetch_max(claim_rev, Ordering::SeqCst);
        let confirmed = Arc::new(Confirmed::default());
        confirmed.mark();
        tracing::info!(task_id = %self.lease.task_id, attempt = self.lease.attempt, "task claimed");

        let renewal = tokio::spawn(renew(
            ctx.clone(),
            self.key.clone(),
            claimed,
            ttl,
            self.rev.clone(),
            self.stop.clone(),
            confirmed.clone(),
        ));

        let (subject, ev) = self.event(
            EventBody::State {
                state: TaskState::Running,
                reason: None,
            },
            claim_rev,
        );
        // Sent now (so it is stored before any output, which follows on the
        // same connection), its ack awaited before the result: the task
        // does not wait a round trip to start.
        let running_ack = send_event(&ctx.js, subject, &ev).await;

        let (out_tx, out_rx) = mpsc::channel::<Output>(OUTPUT_CHANNEL);
        let shipper = tokio::spawn(ship_output(
            ctx.clone(),
            out_rx,
            self.lease.job_id.clone(),
            self.lease.task_id.clone(),
            self.lease.attempt,
            claim_rev,
        ));
        let dir = ctx
            .work_dir
            .join(format!("{}-{}", self.lease.task_id, self.lease.attempt));
        if ctx.launcher.uses_dir() {
            if let Err(e) = ctx.dirs.take(&dir).await {
                // The task's start reports it, if it cannot make it either.
                tracing::warn!(dir = %dir.display(), error = %e, "cannot make a task directory");
            }
        }
        let meter = usage::Meter::new(self.lease.grant.gpus.clone());
        let attempt = (self.lease.task_id.clone(), self.lease.attempt);
        ctx.usage.add(attempt.clone(), meter.clone());
        let run = TaskRun {
            job_id: self.lease.job_id.clone(),
            task_id: self.lease.task_id.clone(),
            attempt: self.lease.attempt,
            spec: self.lease.task.clone(),
            gpus: self.lease.grant.gpus.clone(),
            rendezvous: self.lease.rendezvous.clone(),
            dir: dir.clone(),
            limits: limits(&ctx.cfg),
            usage: Some(meter),
        };
        let finished = ctx.launcher.launch(run, out_tx, self.stop_rx.clone()).await;
        ctx.usage.remove(&attempt);
        ctx.metrics.log(0, finished.log_dropped_bytes);
        // Every log line is in the stream before the result.
        let _ = shipper.await;

        if let Some(ack) = running_ack {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "the RUNNING event was not stored");
            }
        }
        let mut fenced = *self.stop_rx.borrow() == Some(StopReason::Fenced);
        // A lease confirmed within half its TTL cannot have lapsed yet; an
        // older one is checked (the worker may have been frozen).
        if !fenced && confirmed.age() >= ttl / 2 && !self.still_ours().await {
            // The lease lapsed while nothing here could notice (a frozen
            // worker, a stalled runtime): a newer attempt may run elsewhere.
            self.stop.send_replace(Some(StopReason::Fenced));
            fenced = true;
        }
        if fenced {
            tracing::warn!(task_id = %self.lease.task_id, "attempt fenced: its result is not reported");
        } else {
            let outcome = self.outcome(finished).await;
            self.report(outcome, claim_rev).await;
        }
        renewal.abort();
        self.released.store(true, Ordering::SeqCst);
        if !fenced {
            self.free_resources().await;
            if let Err(e) = ctx.leases.purge(&self.key, Duration::from_secs(60)).await {
                tracing::warn!(key = %self.key, error = %e, "could not release a lease; it will expire");
            }
        }
        if !ctx.cfg.keep_task_dirs && ctx.launcher.uses_dir() {
            if let Err(e) = ctx.dirs.give_back(&dir).await {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a task directory");
            }
        }
    }

    /// Whether the lease is still this attempt's: its last entry is a value
    /// that this process claimed or renewed (or the coordinator's request
    /// to cancel it), not an expiry or purge marker or someone else's.
    async fn still_ours(&self) -> bool {
        match self.ctx.leases.last(&self.key).await {
            Ok(Some(e)) if e.op == KvOp::Put => codec::decode::<Lease>(&e.value).is_ok_and(|l| {
                l.instance.as_deref() == Some(self.ctx.instance.as_str())
                    && l.attempt == self.lease.attempt
            }),
            Ok(_) => false,
            Err(e) => {
                // Cannot tell; the coordinator refuses a superseded
                // attempt's result anyway.
                tracing::warn!(key = %self.key, error = %e, "cannot check the lease before reporting");
                true
            }
        }
    }

    /// Frees this attempt's resources in the ledger before its lease goes.
    async fn free_resources(&self) {
        let (freed, answer) = oneshot::channel();
        let msg = AttemptMsg::Releasing {
            key: self.key.clone(),
            freed,
        };
        if self.main.send(msg).await.is_ok() {
            let _ = answer.await;
        }
    }

    async fn outcome(&self, f: Finished) -> TaskOutcome {
        let mut error = f.error;
        let mut artifacts = Vec::new();
        if f.launched && !self.lease.task.artifacts.is_empty() {
            let prefix = format!(
                "{}/{}/{}",
                self.lease.job_id, self.lease.task_id, self.lease.attempt
            );
            let up = artifacts::upload(
                &self.ctx.objects,
                &f.output_dir,
                &self.lease.task.artifacts,
                &prefix,
                self.ctx.cfg.max_artifact_size.0,
            )
            .await;
            artifacts = up.artifacts;
            if !up.errors.is_empty() {
                let joined = up.errors.join("; ");
                error = Some(match error {
                    Some(e) => format!("{e}; {joined}"),
                    None => joined,
                });
            }
        }
        TaskOutcome {
            state: f.state,
            exit_code: f.exit_code,
            signal: f.signal,
            result: f.result,
            error,
            artifacts,
            started_at: f.started_at,
            finished_at: f.finished_at,
            usage: f.usage,
        }
    }

    /// Publishes the result until the stream has it, or the lease is lost.
    async fn report(&self, outcome: TaskOutcome, claim_rev: u64) {
        // A result event that cannot be one NATS message would be refused
        // on every try: make it fit first.
        let max = self
            .ctx
            .js
            .client()
            .max_payload()
            .saturating_sub(HEADER_ROOM);
        let outcome = fit_outcome(outcome, max, |o| {
            let (_, ev) = self.event(EventBody::Result(o.clone()), claim_rev);
            codec::encode(&ev).map_or(0, |b| b.len())
        });
        let (subject, ev) = self.event(EventBody::Result(outcome), claim_rev);
        // The same id on every try: the stream keeps one copy.
        let msg_id = subjects::result_msg_id(&self.lease.task_id, self.lease.attempt);
        let mut delay = Duration::from_millis(100);
        loop {
            if publish(&self.ctx.js, subject.clone(), &ev, Some(&msg_id)).await {
                return;
            }
            if *self.stop_rx.borrow() == Some(StopReason::Fenced) {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// Room kept for a result event's headers (content type, message id).
const HEADER_ROOM: usize = 1024;
/// The longest error text a result carries.
const MAX_ERROR_CHARS: usize = 16 * 1024;

/// Makes an outcome fit in `max` bytes as measured by `size`: a result too
/// large to send is left out and a success becomes FAILED (the task would
/// fail the same way if retried), then, if need be, the artifact list is
/// left out (the files stay in the store) and the error text is shortened.
fn fit_outcome(
    mut o: TaskOutcome,
    max: usize,
    size: impl Fn(&TaskOutcome) -> usize,
) -> TaskOutcome {
    let add_error = |o: &mut TaskOutcome, problem: String| {
        o.error = Some(match o.error.take() {
            Some(e) => format!("{e}; {problem}"),
            None => problem,
        });
    };
    let n = size(&o);
    if n <= max {
        return o;
    }
    if o.result.take().is_some() {
        if o.state == TaskState::Succeeded {
            o.state = TaskState::Failed;
        }
        let problem = format!(
            "the result is {} as an event, more than the {} one NATS message may hold (the server's max_payload); write less to GPUFLEET_RESULT",
            gpufleet_schema::ByteSize(n as u64),
            gpufleet_schema::ByteSize(max as u64)
        );
        add_error(&mut o, problem);
        if size(&o) <= max {
            return o;
        }
    }
    if !o.artifacts.is_empty() {
        let count = o.artifacts.len();
        o.artifacts.clear();
        add_error(
            &mut o,
            format!("{count} artifacts were uploaded: too many to list in the result"),
        );
    }
    if let Some(e) = &mut o.error {
        if e.len() > MAX_ERROR_CHARS {
            let cut = (0..=MAX_ERROR_CHARS)
                .rev()
                .find(|&i| e.is_char_boundary(i))
                .unwrap_or(0);
            e.truncate(cut);
            e.push_str("...");
        }
    }
    o
}

fn limits(cfg: &WorkerConfig) -> Limits {
    Limits {
        kill_grace: cfg.kill_grace.0,
        max_result_bytes: cfg.max_result_size.0,
        log_batch_bytes: cfg.log_batch_size.0 as usize,
        log_batch_interval: cfg.log_batch_interval.0,
        max_log_bytes: cfg.max_log_size.0,
        ..Limits::default()
    }
}

/// Renews the lease every third of its TTL, compare-and-set on the last
/// revision. A lost race is looked into: the coordinator asking to cancel
/// is obeyed; anything else means the lease is no longer ours. A lease the
/// coordinator marked CANCELLING is renewed as CANCELLING, so that its
/// request stays visible (to a coordinator that restarts meanwhile, say)
/// until the worker releases the lease.
async fn renew(
    ctx: Arc<Ctx>,
    key: String,
    lease: Lease,
    ttl: Duration,
    rev: Arc<AtomicU64>,
    stop: Arc<watch::Sender<Option<StopReason>>>,
    confirmed: Arc<Confirmed>,
) {
    let mut current = lease;
    let mut interval = tokio::time::interval(ttl / 3);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        // A cancel the lease watch saw (its revision is already ours).
        if *stop.borrow() == Some(StopReason::Cancel) {
            current.state = LeaseState::Cancelling;
        }
        let Ok(bytes) = codec::encode(&current) else {
            return;
        };
        let expected = rev.load(Ordering::SeqCst);
        let sent = std::time::Instant::now();
        let renewed = ctx
            .leases
            .update(&key, Bytes::from(bytes), Some(ttl), expected)
            .await;
        ctx.metrics.renewal(sent.elapsed());
        match renewed {
            Ok(r) => {
                rev.fetch_max(r, Ordering::SeqCst);
                confirmed.mark();
            }
            Err(KvError::Conflict { .. }) => match ctx.leases.last(&key).await {
                Ok(Some(e)) if e.op == KvOp::Put => match codec::decode::<Lease>(&e.value) {
                    Ok(l)
                        if l.instance.as_deref() == Some(ctx.instance.as_str())
                            && l.attempt == current.attempt =>
                    {
                        rev.fetch_max(e.revision, Ordering::SeqCst);
                        if l.state == LeaseState::Cancelling {
                            stop.send_replace(Some(StopReason::Cancel));
                        }
                        // Renew at once what we found, so that it does not
                        // lapse while the task is stopped.
                        current = l;
                        if let Ok(b) = codec::encode(&current) {
                            let _ = ctx
                                .leases
                                .update(&key, Bytes::from(b), Some(ttl), e.revision)
                                .await
                                .map(|r| rev.fetch_max(r, Ordering::SeqCst));
                        }
                    }
                    _ => {
                        stop.send_replace(Some(StopReason::Fenced));
                        return;
                    }
                },
                Ok(_) => {
                    stop.send_replace(Some(StopReason::Fenced));
                    return;
                }
                Err(e) => tracing::warn!(key, error = %e, "lease check failed; retrying"),
            },
            Err(e) => tracing::warn!(key, error = %e, "lease renewal failed; retrying"),
        }
    }
}

/// Ships a task's output as events; waits for every ack before returning,
/// so that the result published after it follows the last line.
async fn ship_output(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<Output>,
    job: JobId,
    task: TaskId,
    attempt: u32,
    lease_rev: u64,
) {
    let (js, metrics, worker) = (&ctx.js, &ctx.metrics, &ctx.worker);
    let mut acks = FuturesUnordered::new();
    while let Some(out) = rx.recv().await {
        // Drops are counted once, from the attempt's total at its end.
        if let Output::Log { text, .. } = &out {
            metrics.log(text.len() as u64, 0);
        }
        let (kind, body) = match out {
            Output::Log {
                stream,
                text,
                dropped_bytes,
            } => (
                EventKind::Log,
                EventBody::Log {
                    stream,
                    text,
                    dropped_bytes,
                },
            ),
            Output::Progress(data) => (EventKind::Progress, EventBody::Progress { data }),
        };
        let ev = Event {
            job_id: job.clone(),
            task_id: task.clone(),
            attempt,
            worker: Some(worker.clone()),
            lease_rev: Some(lease_rev),
            at: OffsetDateTime::now_utc(),
            body,
        };
        let subject = subjects::events(&job, &task, kind);
        let Ok(bytes) = codec::encode(&ev) else {
            continue;
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(codec::CONTENT_TYPE, codec::MSGPACK);
        match js
            .publish_with_headers(subject, headers, bytes.into())
            .await
        {
            Ok(ack) => acks.push(std::future::IntoFuture::into_future(ack)),
            Err(e) => tracing::warn!(error = %e, "could not publish task output"),
        }
        // Bound what is in flight; the supervisor counts what it must drop
        // while we wait.
        while acks.len() >= OUTPUT_IN_FLIGHT {
            if let Some(Err(e)) = acks.next().await {
                tracing::warn!(error = %e, "task output was not stored");
            }
        }
    }
    while let Some(r) = acks.next().await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "task output was not stored");
        }
    }
}

/// Publishes one event and waits for the stream's ack.
/// Sends one event without waiting for the stream's ack; the ack comes
/// back as a future.
async fn send_event(
    js: &jetstream::Context,
    subject: String,
    ev: &Event,
) -> Option<async_nats::jetstream::context::PublishAckFuture> {
    let bytes = codec::encode(ev).ok()?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(codec::CONTENT_TYPE, codec::MSGPACK);
    match js
        .publish_with_headers(subject, headers, bytes.into())
        .await
    {
        Ok(ack) => Some(ack),
        Err(e) => {
            tracing::warn!(error = %e, "could not publish an event");
            None
        }
    }
}

async fn publish(
    js: &jetstream::Context,
    subject: String,
    ev: &Event,
    msg_id: Option<&str>,
) -> bool {
    let Ok(bytes) = codec::encode(ev) else {
        return false;
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(codec::CONTENT_TYPE, codec::MSGPACK);
    if let Some(id) = msg_id {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    }
    match js
        .publish_with_headers(subject, headers, bytes.into())
        .await
    {
        Ok(ack) => match ack.await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "event not stored");
                false
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "could not publish an event");
            false
        }
    }
}

/// Our task processes and everything below them, for telling our GPU
/// memory from others'.
pub(crate) fn descendants_of_self() -> HashSet<u32> {
    let me = std::process::id();
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // The command name may hold spaces; fields follow the last ')'.
                if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                    if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
                    {
                        parent.insert(pid, ppid);
                    }
                }
            }
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == me => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::{Artifact, ByteSize};

    fn outcome(result: usize, artifacts: usize) -> TaskOutcome {
        TaskOutcome {
            state: TaskState::Succeeded,
            exit_code: Some(0),
            signal: None,
            result: Some(serde_json::Value::String("x".repeat(result))),
            error: None,
            artifacts: (0..artifacts)
                .map(|i| Artifact {
                    name: format!("out/{i}"),
                    object: format!("j/t/1/out/{i}"),
                    size: ByteSize(1),
                    sha256: "0".repeat(64),
                })
                .collect(),
            started_at: None,
            finished_at: OffsetDateTime::now_utc(),
            usage: None,
        }
    }

    fn size(o: &TaskOutcome) -> usize {
        codec::encode(o).unwrap().len()
    }

    #[test]
    fn an_outcome_that_fits_is_left_alone() {
        let o = outcome(100, 3);
        assert_eq!(fit_outcome(o.clone(), 1 << 20, size), o);
    }

    #[test]
    fn a_result_too_large_to_send_fails_the_task_with_the_reason() {
        let o = fit_outcome(outcome(1 << 20, 3), 1 << 20, size);
        assert_eq!(o.state, TaskState::Failed);
        assert_eq!(o.result, None);
        assert_eq!(o.artifacts.len(), 3, "the artifacts still fit");
        assert!(o.error.unwrap().contains("max_payload"));
    }

    #[test]
    fn too_many_artifacts_are_left_out_of_the_list_but_not_failed() {
        let o = outcome(0, 20_000);
        let max = 64 << 10;
        let mut o = fit_outcome(TaskOutcome { result: None, ..o }, max, size);
        assert_eq!(o.state, TaskState::Succeeded);
        assert!(o.artifacts.is_empty());
        assert!(o.error.take().unwrap().contains("20000 artifacts"));
        assert!(size(&o) <= max);
    }
}
