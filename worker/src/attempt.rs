//! One attempt, from claim to result, as its own tokio task: claims the
//! reservation, renews the lease on a timer of its own, runs the task,
//! ships its output and reports its result (which ends the lease for the
//! coordinator; the key then expires on its own). What each
//! step writes and what a lost race means are decided in [`crate::core`];
//! this is the IO around those decisions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use gpufleet_natsutil::{Backoff, KvError};
use gpufleet_schema::{
    codec, EventBody, GpuUpgrade, Grant, Lease, LeaseKey, LeaseState, TaskOutcome, TaskState,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::{AttemptMsg, Ctx};
use crate::artifacts;
use crate::core::{self, AfterConflict, Finish};
use crate::fence::{self, Confirmed, Deadline};
use crate::metrics::Write;
use crate::publish::{self, Source};
use crate::supervisor::{Finished, Limits, Output, StopReason, TaskPaths, TaskRun};
use crate::usage;
use tokio_util::task::AbortOnDropHandle;

/// Output batches waiting between a task's supervisor and its shipper.
/// With the shipper's bound on events in flight and the supervisor's own
/// queue (`max_pending_log_bytes`) this bounds the output a task can make
/// the worker hold: 4 MiB plus about 80 batches (5 MiB at 64 KiB a batch).
const OUTPUT_CHANNEL: usize = 16;

/// A two-phase task's phases as its lease shows them, shared by the main
/// loop (which checks GPU grants), the attempt's renewals (which write its
/// marks into the lease) and its second phase (which follows the task's
/// control file and hands it its GPUs).
#[derive(Default)]
pub(crate) struct Phases {
    marks: watch::Sender<Marks>,
    /// Renew at once: a mark changed.
    renew_now: tokio::sync::Notify,
}

/// What the worker writes of a two-phase task's phases in its lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Marks {
    /// The task has loaded.
    ready: bool,
    /// The GPU grant the worker holds for it (checked and in the ledger).
    gpu_grant: Option<GpuUpgrade>,
    /// Why the last GPU grant was refused.
    refused: Option<String>,
}

impl Phases {
    /// The main loop's answer to a lease that carried `offered`: held
    /// (`Ok`) or refused. Written before the lease's revision is noted, so
    /// that a renewal over that revision carries it.
    pub fn grant_checked(&self, offered: Option<&GpuUpgrade>, checked: Result<Grant, String>) {
        let changed = self.marks.send_if_modified(|m| match checked {
            Ok(_) if m.gpu_grant.as_ref() == offered => false,
            Ok(_) => {
                m.gpu_grant = offered.cloned();
                m.refused = None;
                true
            }
            Err(why) => {
                let news = m.refused.as_ref() != Some(&why) || m.gpu_grant.is_some();
                m.gpu_grant = None;
                m.refused = Some(why);
                news
            }
        });
        if changed {
            self.renew_now.notify_one();
        }
    }

    /// Writes the marks into the lease a renewal is about to write.
    fn mark(&self, lease: &mut Lease) {
        let m = self.marks.borrow();
        lease.ready = m.ready;
        lease.gpu_grant = m.gpu_grant.clone();
        if let Some(why) = &m.refused {
            lease.reason = Some(why.clone());
        }
    }
}

/// One claimed (or about to be claimed) attempt.
pub(crate) struct Attempt {
    pub ctx: Arc<Ctx>,
    pub key: LeaseKey,
    pub lease: Lease,
    pub source: Source,
    pub stop: Arc<watch::Sender<Option<StopReason>>>,
    pub released: Arc<AtomicBool>,
    pub stop_rx: watch::Receiver<Option<StopReason>>,
    pub rev: Arc<AtomicU64>,
    /// The main loop, which owns the ledger.
    pub main: mpsc::Sender<AttemptMsg>,
    pub phases: Arc<Phases>,
}

impl Attempt {
    pub async fn run(self) {
        let ctx = self.ctx.clone();
        let ttl = core::lease_ttl(&self.lease);
        // The task must be gone before the lease or the advert can lapse.
        let advert_ttl = ctx.cfg.advert_ttl.0;
        let grace = core::fence_grace(ttl.min(advert_ttl), ctx.cfg.kill_grace.0);
        let advert_after = core::fence_after(advert_ttl, grace);
        // Just back in touch with NATS, the advert may be older than the
        // watchdog allows: the next one is on its way; without it, the
        // task would be stopped as soon as started.
        if !ctx
            .advert_confirmed
            .fresh_within(advert_after, advert_ttl)
            .await
        {
            let reason = "the worker cannot renew its advert (no contact with NATS)".to_string();
            tracing::warn!(key = %self.key, "refusing a reservation: {reason}");
            let answer = core::refusal(self.lease.clone(), LeaseState::Rejected, reason);
            crate::agent::refuse(&ctx, &self.key, self.rev.load(Ordering::SeqCst), answer).await;
            return;
        }
        // Claim: compare-and-set on the reservation's revision.
        let claimed = core::claimed(&self.lease, &ctx.instance);
        let Ok(bytes) = codec::encode(&claimed) else {
            return;
        };
        let expected = self.rev.load(Ordering::SeqCst);
        let sent = tokio::time::Instant::now();
        ctx.metrics.wrote(Write::Claim);
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
        // Renewals say which revision claimed it, for a coordinator that
        // reads the lease later (results must name that revision).
        let claimed = core::with_claim_rev(claimed, claim_rev);
        let confirmed = Arc::new(Confirmed::now());
        confirmed.mark(sent);
        let fence = ctx
            .watchdog
            .as_ref()
            .map(|w| Arc::new(w.fence(confirmed.clone(), ttl, grace)));
        tracing::info!(task_id = %self.lease.task_id, attempt = self.lease.attempt, "task claimed");

        // Both end with the attempt, however it ends.
        let _renewal = AbortOnDropHandle::new(tokio::spawn(renew(
            ctx.clone(),
            self.key.clone(),
            claimed,
            ttl,
            self.rev.clone(),
            self.stop.clone(),
            confirmed.clone(),
            self.phases.clone(),
        )));
        let deadlines = vec![
            Deadline {
                what: "lease renewal",
                confirmed: confirmed.clone(),
                after: core::fence_after(ttl, grace),
            },
            Deadline {
                what: "advert",
                confirmed: ctx.advert_confirmed.clone(),
                after: advert_after,
            },
        ];
        let _watchdog = AbortOnDropHandle::new(tokio::spawn(fence::watchdog(
            self.key.clone(),
            deadlines,
            self.stop.clone(),
        )));

        // RUNNING goes out only once the task has run for a while: a task
        // that ends sooner is told by its result alone (which says when it
        // started), one write less. The coordinator learns of the claim
        // from the lease; readers take output from the holder its RESERVED
        // event names, whether or not RUNNING came.
        let running_after = ctx.cfg.running_event_after.0;
        let mut running_ack = if running_after.is_zero() {
            // At once, so that it is stored before any output (which
            // follows on the same connection).
            self.send_running(claim_rev).await
        } else {
            None
        };
        let (out_tx, out_rx) = mpsc::channel::<Output>(OUTPUT_CHANNEL);
        let shipper = tokio::spawn(publish::ship_output(
            ctx.js.clone(),
            ctx.metrics.clone(),
            out_rx,
            self.source.clone(),
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
        let mut limits = Limits::from_config(&ctx.cfg);
        limits.fence_grace = grace;
        let meter = usage::Meter::new(self.lease.grant.gpus.clone());
        let attempt = (self.lease.task_id.clone(), self.lease.attempt);
        ctx.usage.add(attempt.clone(), meter.clone());
        let meter_for_gpus = meter.clone();
        let pid = ctx
            .mail
            .open(&attempt.0, attempt.1, TaskPaths::new(&dir).inbox);
        let run = TaskRun {
            job_id: self.lease.job_id.clone(),
            task_id: self.lease.task_id.clone(),
            attempt: self.lease.attempt,
            spec: self.lease.task.clone(),
            gpus: self.lease.grant.gpus.clone(),
            rendezvous: self.lease.rendezvous.clone(),
            dir: dir.clone(),
            limits,
            isolation: ctx.isolation.clone(),
            usage: Some(meter),
            pid: Some(pid),
            fence: fence.clone(),
        };
        let output_dir = TaskPaths::new(&dir).work;
        // A two-phase task's second phase follows it, and ends with it.
        let _second_phase = self.lease.task.load.is_some().then(|| {
            AbortOnDropHandle::new(tokio::spawn(second_phase(
                ctx.clone(),
                self.lease.clone(),
                TaskPaths::new(&dir).control,
                self.phases.clone(),
                meter_for_gpus,
            )))
        });
        // Its own task: should the supervisor panic, the attempt still
        // ends, FAILED with the reason, and its resources are freed.
        let launch = ctx.launcher.launch(run, out_tx, self.stop_rx.clone());
        let mut launched = tokio::spawn(launch);
        let joined = if running_after.is_zero() {
            launched.await
        } else {
            tokio::select! {
                joined = &mut launched => joined,
                _ = tokio::time::sleep(running_after) => {
                    running_ack = self.send_running(claim_rev).await;
                    launched.await
                }
            }
        };
        let finished = match joined {
            Ok(finished) => finished,
            Err(e) => {
                let why = panic_message(e);
                tracing::error!(task_id = %self.lease.task_id, attempt = self.lease.attempt, %why, "the supervisor of a task failed");
                supervisor_failed(why, output_dir)
            }
        };
        drop(_second_phase);
        ctx.usage.remove(&attempt);
        ctx.mail.close(&attempt.0, attempt.1);
        ctx.metrics.log(0, finished.log_dropped_bytes);
        // Every log line is in the stream before the result.
        let _ = shipper.await;

        if let Some(ack) = running_ack {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "the RUNNING event was not stored");
            }
        }
        let stop = *self.stop_rx.borrow();
        let fenced = match core::finish(stop, confirmed.age(), ttl) {
            Finish::Report => false,
            Finish::Fenced => true,
            Finish::CheckLease => {
                // Its process is gone: whatever the lease says, what it
                // held is free, also while the check waits for NATS.
                self.free_resources().await;
                if self.still_ours(ttl, &confirmed).await {
                    false
                } else {
                    // The lease lapsed while nothing here could renew it
                    // (cut off, frozen): a newer attempt may run elsewhere.
                    self.stop.send_replace(Some(StopReason::Fenced));
                    true
                }
            }
        };
        if fenced {
            tracing::warn!(task_id = %self.lease.task_id, attempt = self.lease.attempt, "attempt fenced: its result is not reported");
        } else {
            let outcome = self.outcome(finished).await;
            // Free before the result goes: the coordinator frees what the
            // lease held as soon as it takes the result, and may place new
            // work here at once, which must find it free.
            self.free_resources().await;
            self.report(outcome, claim_rev, ttl, &confirmed).await;
        }
        drop(_watchdog);
        drop(_renewal);
        // The lease is not removed: the result ended it for the
        // coordinator, and the key expires on its own (one write less).
        // Its expiry must not be taken for a fence.
        self.released.store(true, Ordering::SeqCst);
        if !ctx.cfg.keep_task_dirs && ctx.launcher.uses_dir() {
            if let Err(e) = ctx.dirs.give_back(&dir).await {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a task directory");
            }
        }
    }

    /// Sends the attempt's RUNNING event; its ack is awaited before the
    /// result, so that nobody sees the result followed by a RUNNING.
    async fn send_running(&self, claim_rev: u64) -> Option<PublishAckFuture> {
        let (subject, ev) = self.source.event(
            EventBody::State {
                state: TaskState::Running,
                reason: None,
                holder: None,
            },
            claim_rev,
        );
        publish::send_event(&self.ctx.js, &self.ctx.metrics, subject, &ev).await
    }

    /// Whether the lease is still this attempt's ([`core::still_ours`]).
    /// Without an answer from NATS it asks again, for as long as
    /// [`core::reconcile_for`] allows since the last renewal; then it is
    /// taken as lost.
    async fn still_ours(&self, ttl: Duration, confirmed: &Confirmed) -> bool {
        let mut delay = core::renewal_retry(ttl);
        loop {
            match self.ctx.leases.last(&self.key).await {
                Ok(latest) => {
                    return core::still_ours(
                        latest.as_ref(),
                        self.lease.attempt,
                        &self.ctx.instance,
                    )
                    .is_some()
                }
                Err(e) if confirmed.age() < core::reconcile_for(ttl) => {
                    tracing::info!(key = %self.key, error = %e, "cannot check the lease yet; retrying");
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "cannot check the lease; taking it as lost");
                    return false;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
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
            let l = &self.lease;
            let at = gpufleet_natsutil::artifacts::Attempt {
                owner: l.owner.clone(),
                job: l.job_id.clone(),
                task: l.task_id.clone(),
                attempt: l.attempt,
                worker: self.ctx.worker.clone(),
                token: l.token.clone(),
            };
            let up = artifacts::upload(
                &self.ctx.js,
                &at,
                &f.output_dir,
                &l.task.artifacts,
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

    /// Publishes the result until the stream has it, or the lease is lost
    /// (or, cut off from NATS, may be: see [`core::reconcile_for`]).
    async fn report(
        &self,
        outcome: TaskOutcome,
        claim_rev: u64,
        ttl: Duration,
        confirmed: &Confirmed,
    ) {
        // A result event that cannot be one NATS message would be refused
        // on every try: make it fit first.
        let max = self
            .ctx
            .js
            .client()
            .max_payload()
            .saturating_sub(HEADER_ROOM);
        let outcome = fit_outcome(outcome, max, |o| {
            let (_, ev) = self.source.event(EventBody::Result(o.clone()), claim_rev);
            codec::encode(&ev).map_or(0, |b| b.len())
        });
        let (subject, ev) = self.source.event(EventBody::Result(outcome), claim_rev);
        // The same id on every try: the stream keeps one copy.
        let msg_id = gpufleet_schema::subjects::result_msg_id(
            &self.lease.task_id,
            self.lease.attempt,
            &self.lease.token,
        );
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            self.ctx.metrics.wrote(Write::Result);
            if publish::publish(&self.ctx.js, subject.clone(), &ev, Some(&msg_id)).await {
                return;
            }
            if *self.stop_rx.borrow() == Some(StopReason::Fenced) {
                return;
            }
            if confirmed.age() >= core::reconcile_for(ttl) {
                tracing::warn!(task_id = %self.lease.task_id, attempt = self.lease.attempt, "cannot report the result and the lease has lapsed; giving up");
                return;
            }
            backoff.wait().await;
        }
    }
}

/// How often a two-phase task's control file is read while it loads.
const CONTROL_POLL: Duration = Duration::from_millis(100);

/// A two-phase task's second phase: follows its control file until it
/// says it has loaded, marks the lease ready, waits for the GPU grant the
/// main loop has checked and held, then tells the task its GPUs (control
/// file and inbox) and counts them as its own. A task that
/// never says it is ready just runs to its end without a GPU.
async fn second_phase(
    ctx: Arc<Ctx>,
    lease: Lease,
    control: std::path::PathBuf,
    phases: Arc<Phases>,
    meter: usage::Meter,
) {
    let mut watch = crate::control::ReadyWatch::default();
    let mut tick = tokio::time::interval(CONTROL_POLL);
    while let Some(offset) = watch.offset() {
        tick.tick().await;
        let path = control.clone();
        let read = tokio::task::spawn_blocking(move || crate::control::read_from(&path, offset))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        match read {
            Ok(bytes) => {
                watch.take(&bytes);
            }
            Err(e) => {
                // The task put something else there (a link, a FIFO): it
                // can still make it right.
                tracing::debug!(task_id = %lease.task_id, error = %e, "cannot read the control file");
            }
        }
    }
    if watch.given_up() {
        tracing::info!(task_id = %lease.task_id, "no ready line in the control file's first 64KiB; the task keeps its load phase");
        return;
    }
    tracing::info!(task_id = %lease.task_id, attempt = lease.attempt, "the task has loaded; waiting for its GPU");
    phases.marks.send_modify(|m| m.ready = true);
    phases.renew_now.notify_one();
    let mut marks = phases.marks.subscribe();
    let grant = loop {
        if let Some(u) = &marks.borrow_and_update().gpu_grant {
            break u.grant.clone();
        }
        if marks.changed().await.is_err() {
            return;
        }
    };
    tracing::info!(task_id = %lease.task_id, attempt = lease.attempt, gpus = ?grant.gpus, "the task has its GPU");
    ctx.usage.add(
        (lease.task_id.clone(), lease.attempt),
        meter.with_gpus(grant.gpus.clone()),
    );
    let line = crate::control::gpus_line(&grant.gpus);
    let path = control.clone();
    let written = tokio::task::spawn_blocking(move || crate::mail::append(&path, &line))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    if let Err(e) = written {
        tracing::warn!(task_id = %lease.task_id, error = %e, "cannot write the task's control file; its inbox has the GPUs");
    }
    let told = ctx
        .mail
        .deliver(&crate::mail::from_gpufleet(
            &lease,
            "gpus",
            crate::control::gpus_message(&grant.gpus),
        ))
        .await;
    if !told.delivered {
        tracing::warn!(task_id = %lease.task_id, why = ?told.why, "cannot tell the task its GPUs through its inbox");
    }
}

/// What a panic said, for the task's reason.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The end of an attempt whose supervisor failed: its processes were
/// killed as the supervisor unwound.
fn supervisor_failed(why: String, output_dir: std::path::PathBuf) -> Finished {
    Finished {
        state: TaskState::Failed,
        exit_code: None,
        signal: None,
        result: None,
        error: Some(format!(
            "the worker failed while supervising the task ({why}); the task was stopped"
        )),
        started_at: None,
        finished_at: time::OffsetDateTime::now_utc(),
        output_dir,
        // Its artifacts are not looked for: what it left is unknown.
        launched: false,
        log_dropped_bytes: 0,
        usage: None,
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

/// Renews the lease every third of its TTL, compare-and-set on the last
/// revision ([`core::renewal`] says what it writes); after a failed
/// renewal it tries again soon ([`core::renewal_retry`]) rather than a
/// period later. A lost race is looked into ([`core::after_conflict`]): the
/// coordinator asking to cancel is obeyed; anything else means the lease is
/// no longer ours. A two-phase task's marks go out at once when they change.
#[allow(clippy::too_many_arguments)]
async fn renew(
    ctx: Arc<Ctx>,
    key: LeaseKey,
    lease: Lease,
    ttl: Duration,
    rev: Arc<AtomicU64>,
    stop: Arc<watch::Sender<Option<StopReason>>>,
    confirmed: Arc<Confirmed>,
    phases: Arc<Phases>,
) {
    let attempt = lease.attempt;
    let mut current = lease;
    let period = ttl / 3;
    let retry = core::renewal_retry(ttl);
    let mut next = tokio::time::Instant::now() + period;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = phases.renew_now.notified() => {}
        }
        next = tokio::time::Instant::now() + retry;
        // A cancel the lease watch saw (its revision is already ours).
        core::renewal(&mut current, *stop.borrow());
        let expected = rev.load(Ordering::SeqCst);
        // After the revision: a GPU grant noted with it is in the marks.
        phases.mark(&mut current);
        let Ok(bytes) = codec::encode(&current) else {
            return;
        };
        let sent = tokio::time::Instant::now();
        ctx.metrics.wrote(Write::Renewal);
        let renewed = ctx
            .leases
            .update(&key, Bytes::from(bytes), Some(ttl), expected)
            .await;
        ctx.metrics.renewal(sent.elapsed());
        match renewed {
            Ok(r) => {
                rev.fetch_max(r, Ordering::SeqCst);
                confirmed.mark(sent);
                next = tokio::time::Instant::now() + period;
                continue;
            }
            Err(KvError::Conflict { .. }) => {}
            Err(e) => {
                tracing::warn!(%key, error = %e, "lease renewal failed; retrying");
                continue;
            }
        }
        let latest = match ctx.leases.last(&key).await {
            Ok(latest) => latest,
            Err(e) => {
                tracing::warn!(%key, error = %e, "lease check failed; retrying");
                continue;
            }
        };
        match core::after_conflict(latest.as_ref(), attempt, &ctx.instance) {
            AfterConflict::Fenced => {
                stop.send_replace(Some(StopReason::Fenced));
                return;
            }
            AfterConflict::Adopt {
                lease,
                revision,
                cancel,
            } => {
                rev.fetch_max(revision, Ordering::SeqCst);
                if cancel {
                    ctx.mail.stop_as_asked(&stop, &lease).await;
                }
                // Renew at once what we found, so that it does not lapse
                // while the task is stopped.
                current = *lease;
                if let Ok(b) = codec::encode(&current) {
                    let sent = tokio::time::Instant::now();
                    ctx.metrics.wrote(Write::Renewal);
                    if let Ok(r) = ctx
                        .leases
                        .update(&key, Bytes::from(b), Some(ttl), revision)
                        .await
                    {
                        rev.fetch_max(r, Ordering::SeqCst);
                        confirmed.mark(sent);
                        next = tokio::time::Instant::now() + period;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::{Artifact, ByteSize};
    use time::OffsetDateTime;

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
