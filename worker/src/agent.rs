//! The worker's main loop: watches its lease keys, and for each lease
//! written there acts on what [`crate::core`] decides: claims a
//! reservation (starting its `attempt` task), refuses it, or
//! passes a cancel on to the attempt that runs it.
//!
//! One loop owns the worker's state (the ledger and the table of running
//! attempts). Renewals run in each attempt's own task on a timer of their
//! own, so that neither a task that prints a lot nor a busy loop can
//! starve them.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use gpufleet_natsutil::{Backoff, KvError, KvEvent, KvOp, KvWatcher, RawKv};
use gpufleet_schema::{
    codec, subjects, GpuUuid, Lease, LeaseKey, LeaseState, WorkerAdvert, WorkerId,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::advert::{self, AdvertInputs};
use crate::attempt::{Attempt, Phases};
use crate::config::WorkerConfig;
use crate::core::{self, OnLease, WorkerState};
use crate::fence::Confirmed;
use crate::gpu;
use crate::isolation::{self, Isolation};
use crate::launcher::{Launcher, Processes};
use crate::metrics::{WorkerMetrics, Write};
use crate::publish::Source;
use crate::supervisor::{self, StopReason};
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

/// What every attempt's task shares.
pub(crate) struct Ctx {
    pub launcher: Arc<dyn Launcher>,
    pub js: jetstream::Context,
    pub leases: RawKv,
    pub worker: WorkerId,
    pub instance: String,
    pub cfg: WorkerConfig,
    pub work_dir: PathBuf,
    pub dirs: supervisor::DirPool,
    pub isolation: Arc<Isolation>,
    /// When the advert was last stored (see [`crate::fence`]).
    pub advert_confirmed: Arc<Confirmed>,
    pub metrics: WorkerMetrics,
    /// What each running attempt uses, for the advert.
    pub usage: usage::Board,
    /// Where messages for the running attempts go.
    pub mail: crate::mail::Mailboxes,
    /// The process that stops tasks should the worker freeze.
    pub watchdog: Option<crate::watchdog::Watchdog>,
}

/// How the main loop reaches an attempt it runs.
struct Held {
    stop: Arc<watch::Sender<Option<StopReason>>>,
    /// Set once the attempt has reported and lets its lease go, so that
    /// the purge it causes is not mistaken for a lost lease.
    released: Arc<AtomicBool>,
    /// The lease's latest revision, shared with its renewal timer.
    rev: Arc<AtomicU64>,
    /// A two-phase task's phases.
    phases: Arc<Phases>,
}

/// What an attempt's task tells the main loop.
pub(crate) enum AttemptMsg {
    /// The attempt is about to release its lease. The main loop frees its
    /// resources in the ledger first and then answers: once the lease is
    /// gone the coordinator may place new work here at once, and that
    /// reservation must not find the old grant still held.
    Releasing {
        key: LeaseKey,
        freed: oneshot::Sender<()>,
    },
    /// The attempt's task is over (reported, released, cleaned up).
    Done { key: LeaseKey },
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
    // Before anything secret is in memory: a task running as this user
    // must not read it from /proc.
    if let Err(e) = isolation::make_non_dumpable() {
        tracing::warn!(error = %e, "cannot make the worker non-dumpable");
    }
    let isolation = Arc::new(Isolation::from_config(&cfg, &worker).map_err(WorkerError::Config)?);
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
    let trusted = cfg.trusted_keys().map_err(WorkerError::Config)?;
    // Only the coordinator creates the stores; a worker reads and writes
    // its own keys through them (its least privilege allows no more).
    let leases = RawKv::open_scoped(&js, subjects::LEASES_BUCKET).await?;
    let adverts = RawKv::open_scoped(&js, subjects::WORKERS_BUCKET).await?;
    let patience = tokio::time::Instant::now() + cfg.connect_patience.0;
    let mut watch = watch_leases(&leases, &worker, Some(patience)).await?;
    let instance = uuid::Uuid::now_v7().simple().to_string();
    wait_for_name(&adverts, &worker, &instance).await?;

    let work_dir = cfg.work_dir(&worker);
    tokio::fs::create_dir_all(&work_dir)
        .await
        .map_err(|e| WorkerError::Config(format!("work_dir {}: {e}", work_dir.display())))?;
    if let Some(user) = &isolation.user {
        // Made just now with whatever mode: the task user must get in.
        isolation::check_reachable(&work_dir, user).map_err(WorkerError::Config)?;
    }
    if let Some(c) = &isolation.cgroups {
        // For whoever removes this work directory after a kill -9 of the
        // worker (a test kit, an operator): where its tasks' cgroups are.
        let note = work_dir.join(isolation::CGROUP_NOTE);
        if let Err(e) = tokio::fs::write(&note, c.base().as_os_str().as_encoded_bytes()).await {
            tracing::warn!(file = %note.display(), error = %e, "cannot note where the task cgroups are");
        }
    }
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
        isolation = %isolation.describe(),
        "worker starting"
    );
    let advert_confirmed = Arc::new(Confirmed::now());
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
        worker: worker.clone(),
        instance: instance.clone(),
        cfg: cfg.clone(),
        dirs: supervisor::DirPool::new(&work_dir, worker.as_str()),
        work_dir,
        launcher,
        isolation,
        advert_confirmed: advert_confirmed.clone(),
        metrics: metrics.clone(),
        usage: usage::Board::default(),
        mail: crate::mail::Mailboxes::default(),
        watchdog: crate::watchdog::Watchdog::start_if_available(
            advert_confirmed.clone(),
            cfg.advert_ttl.0,
        ),
    });
    let deliveries = client
        .subscribe(subjects::deliver(&worker))
        .await
        .map_err(|e| WorkerError::Nats(format!("cannot take messages for tasks: {e}")))?;
    let mail_task = tokio::spawn(take_deliveries(
        client.clone(),
        deliveries,
        ctx.mail.clone(),
    ));

    let unmanaged: Arc<Mutex<HashMap<GpuUuid, u64>>> = Arc::default();
    let (advert_tx, advert_rx) = watch::channel(AdvertInputs::default());
    let alive_task = tokio::spawn(crate::alive::ask(
        client.clone(),
        worker.clone(),
        instance.clone(),
        (cfg.advert_ttl.0, cfg.heartbeat.0),
        advert_confirmed.clone(),
        advert_rx.clone(),
    ));
    let advert_task = tokio::spawn(advert::heartbeat(
        adverts.clone(),
        cfg.clone(),
        worker.clone(),
        instance.clone(),
        capacity.clone(),
        probe,
        advert_rx,
        unmanaged.clone(),
        advert_confirmed,
        advert::Observed {
            metrics,
            usage: ctx.usage.clone(),
            metrics_addr: metrics_server.as_ref().map(|s| s.addr().to_string()),
        },
    ));

    let (done_tx, mut done_rx) = mpsc::channel::<AttemptMsg>(1024);
    let mut state: WorkerState<Held> =
        WorkerState::new(instance.clone(), capacity).trusting(trusted);
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    tokio::pin!(shutdown);

    let publish_inputs = |state: &WorkerState<Held>| {
        advert_tx.send_replace(state.advert_inputs());
    };

    loop {
        tokio::select! {
            _ = &mut shutdown, if !state.is_draining() => {
                let idle = state.drain();
                tracing::info!(running = state.running(), "draining: taking no new work");
                publish_inputs(&state);
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + cfg.drain_timeout.0);
                if idle {
                    break;
                }
            }
            _ = &mut drain_deadline, if state.is_draining() => {
                tracing::info!(running = state.running(), "drain timeout: stopping the remaining tasks");
                for h in state.attempts() {
                    h.stop.send_replace(Some(StopReason::Drain));
                }
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
            Some(msg) = done_rx.recv() => match msg {
                AttemptMsg::Releasing { key, freed } => {
                    state.releasing(&key);
                    publish_inputs(&state);
                    let _ = freed.send(());
                }
                AttemptMsg::Done { key } => {
                    let stop = state.done(&key);
                    publish_inputs(&state);
                    if stop {
                        break;
                    }
                }
            },
            item = watch.next() => {
                let Some(item) = item else {
                    // The watch cannot continue; start it again from the
                    // current state (idempotent for keys we already hold).
                    watch = watch_leases(&leases, &worker, None).await?;
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
                // Only the coordinator writes lease keys; one that does not
                // parse names no attempt.
                let Some(key) = subjects::parse_lease_key(&change.key) else {
                    tracing::warn!(key = %change.key, "ignoring a lease under a malformed key");
                    continue;
                };
                if change.op != KvOp::Put {
                    // Purged by the coordinator or expired: whatever runs
                    // under it is no longer ours to report.
                    if let Some(h) = state.attempt(&key).filter(|h| !h.released.load(Ordering::SeqCst)) {
                        tracing::warn!(%key, "lease gone: stopping the task without reporting");
                        h.stop.send_replace(Some(StopReason::Fenced));
                    }
                    continue;
                }
                let lease: Lease = match codec::decode(&change.value) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "ignoring an unreadable lease");
                        continue;
                    }
                };
                let decision = {
                    let unmanaged = unmanaged.lock().unwrap_or_else(|e| e.into_inner());
                    state.on_lease(&key, &lease, &unmanaged, port_is_free)
                };
                if act(&ctx, &mut state, &done_tx, key, change.revision, lease, decision).await {
                    publish_inputs(&state);
                }
            }
        }
    }

    advert_task.abort();
    alive_task.abort();
    mail_task.abort();
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

/// Answers the coordinator's deliveries of messages to the tasks running
/// here, one at a time, in the order they come (each sender's order).
async fn take_deliveries(
    client: async_nats::Client,
    mut deliveries: async_nats::Subscriber,
    mail: crate::mail::Mailboxes,
) {
    use futures::StreamExt;
    while let Some(msg) = deliveries.next().await {
        let Some(reply) = msg.reply else { continue };
        let answer = match codec::decode::<gpufleet_schema::message::Delivery>(&msg.payload) {
            Ok(d) => mail.deliver(&d).await,
            Err(e) => gpufleet_schema::message::DeliveryReply {
                delivered: false,
                why: Some(format!("unreadable: {e}")),
            },
        };
        if let Ok(body) = codec::encode(&answer) {
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::info!(error = %e, "cannot answer a delivery");
            }
        }
    }
}

/// Starts the watch on this worker's lease keys, retrying (the
/// coordinator may not have made the bucket yet, or NATS is away) until
/// `deadline`, or for ever without one.
async fn watch_leases(
    leases: &RawKv,
    worker: &WorkerId,
    deadline: Option<tokio::time::Instant>,
) -> Result<KvWatcher, WorkerError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut said = false;
    loop {
        match leases.watch(&subjects::worker_leases(worker)).await {
            Ok(w) => return Ok(w),
            Err(e) => {
                // Only the coordinator creates the stores; until it has,
                // the bucket is missing (and with roles, reading what is
                // there is not ours to do).
                if !said {
                    said = true;
                    tracing::info!(error = %e, "waiting for the coordinator to create the stores");
                } else {
                    tracing::debug!(error = %e, "cannot watch this worker's leases yet; retrying");
                }
                match deadline {
                    Some(d) => match backoff.next_before(d) {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => return Err(e.into()),
                    },
                    None => backoff.wait().await,
                }
            }
        }
    }
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

/// Whether this machine can listen on `port` now.
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Carries out what the core decided about the lease written under `key`
/// at revision `rev`. True when an attempt started.
async fn act(
    ctx: &Arc<Ctx>,
    state: &mut WorkerState<Held>,
    done_tx: &mpsc::Sender<AttemptMsg>,
    key: LeaseKey,
    rev: u64,
    lease: Lease,
    decision: OnLease,
) -> bool {
    match decision {
        OnLease::Ignore => false,
        OnLease::Ours { cancel, upgrade } => {
            if let Some(h) = state.attempt(&key) {
                if let Some(checked) = upgrade {
                    if let Err(why) = &checked {
                        tracing::warn!(%key, why, "refusing a GPU grant");
                    }
                    h.phases.grant_checked(lease.gpu_grant.as_ref(), checked);
                }
                h.rev.fetch_max(rev, Ordering::SeqCst);
                if cancel {
                    ctx.mail.stop_as_asked(&h.stop, &lease).await;
                }
            }
            false
        }
        OnLease::Refuse {
            state: answer,
            reason,
        } => {
            if answer == LeaseState::Rejected {
                tracing::info!(%key, reason, "refusing a reservation");
            }
            refuse(ctx, &key, rev, core::refusal(lease, answer, reason)).await;
            false
        }
        OnLease::Claim => {
            let (stop_tx, stop_rx) = watch::channel(None);
            let h = Held {
                stop: Arc::new(stop_tx),
                released: Arc::new(AtomicBool::new(false)),
                rev: Arc::new(AtomicU64::new(rev)),
                phases: Arc::default(),
            };
            let attempt = Attempt {
                ctx: ctx.clone(),
                key: key.clone(),
                source: Source::new(&lease, &ctx.worker),
                lease,
                stop: h.stop.clone(),
                released: h.released.clone(),
                stop_rx,
                rev: h.rev.clone(),
                main: done_tx.clone(),
                phases: h.phases.clone(),
            };
            state.admit(key.clone(), h);
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                // The main loop hears of the end however the attempt ends,
                // a panic included, so that its resources are freed.
                if let Err(e) = tokio::spawn(attempt.run()).await {
                    tracing::error!(%key, error = %e, "an attempt failed; its lease will lapse");
                }
                let _ = done_tx.send(AttemptMsg::Done { key }).await;
            });
            true
        }
    }
}

/// Writes a refusal the coordinator reads and records.
pub(crate) async fn refuse(ctx: &Ctx, key: &LeaseKey, rev: u64, answer: Lease) {
    let Ok(bytes) = codec::encode(&answer) else {
        return;
    };
    ctx.metrics.wrote(Write::Refusal);
    match ctx
        .leases
        .update(
            key.as_str(),
            Bytes::from(bytes),
            Some(core::REFUSAL_TTL),
            rev,
        )
        .await
    {
        Ok(_) | Err(KvError::Conflict { .. }) => {}
        Err(e) => tracing::warn!(%key, error = %e, "could not refuse a lease"),
    }
}
