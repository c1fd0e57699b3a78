//! How attempts move. Lease changes, results and ticks become task
//! transitions (methods of the records in `state.rs`) and effects; a gang
//! breaks and settles here; start-up reconciles the records with the
//! leases. Every handler is idempotent: an input seen twice changes
//! nothing the second time.

use std::time::Duration;

use gpufleet_schema::{
    subjects, Event, EventBody, JobId, Lease, LeaseKey, LeaseState, Sender, TaskOutcome, TaskState,
    WorkerId,
};

use super::leases::{FinishedPut, LiveLease, EXPIRY_SLACK};
use super::{Engine, LeaseChange};
use crate::metrics::Reservation;
use crate::state::{GangSettled, Stop};

/// How an attempt ended, as the engine learned it.
struct Ended {
    state: TaskState,
    exit_code: Option<i32>,
    why: String,
}

impl Ended {
    /// The attempt vanished without a result.
    fn lost(why: &str) -> Ended {
        Ended {
            state: TaskState::Lost,
            exit_code: None,
            why: why.to_string(),
        }
    }
}

/// How an attempt the coordinator asked to stop ended: a cancel ends it
/// CANCELLED, a preemption INTERRUPTED "preempted by JOB", whatever the
/// worker called the stop (or if the attempt was lost meanwhile); an
/// attempt that succeeded first succeeded.
fn stopped_as_asked(stopping: Option<&Stop>, ended: Ended) -> Ended {
    match stopping {
        _ if ended.state == TaskState::Succeeded => ended,
        Some(Stop::Cancel) => Ended {
            state: TaskState::Cancelled,
            why: "cancelled".into(),
            ..ended
        },
        Some(Stop::Preempt { by }) => {
            let why = match ended.state {
                TaskState::Lost => format!("preempted by {by} (then lost: {})", ended.why),
                _ => format!("preempted by {by}"),
            };
            Ended {
                state: TaskState::Interrupted,
                why,
                ..ended
            }
        }
        None => ended,
    }
}

impl Engine {
    // ----- leases -----

    pub(super) fn lease_change(&mut self, change: LeaseChange) {
        let raw = match &change {
            LeaseChange::Put { key, .. }
            | LeaseChange::Released { key }
            | LeaseChange::Expired { key } => key,
        };
        // Only we write lease keys; one that does not parse names no
        // attempt of ours and holds nothing placement counts.
        let Some(key) = subjects::parse_lease_key(raw) else {
            return;
        };
        match change {
            LeaseChange::Put { rev, mut lease, .. } => {
                match self.book.finished_put(&key, rev, lease.state) {
                    FinishedPut::Live => {}
                    FinishedPut::Ignore => return,
                    FinishedPut::StillRuns => {
                        // Taken for ended at start-up, yet renewed since.
                        if self.ready {
                            let live = LiveLease { rev, lease: *lease };
                            let reason = "no job wants this attempt any more".to_string();
                            self.fx.cancel_lease(&key, &live, reason);
                        }
                        return;
                    }
                }
                if lease.state == LeaseState::Running && lease.claim_rev.is_none() {
                    // The claim itself: its revision is what the attempt's
                    // results name, and what our CANCELLING write carries.
                    lease.claim_rev = Some(rev);
                }
                if !self.book.put(&key, rev, (*lease).clone()) {
                    // An older entry redelivered; the newer one stays.
                    return;
                }
                if !self.ready {
                    return;
                }
                match lease.state {
                    LeaseState::Reserved => {}
                    LeaseState::Cancelling => self.second_phase_seen(&key, &lease),
                    LeaseState::Running => {
                        self.claimed(&lease);
                        self.second_phase_seen(&key, &lease);
                    }
                    LeaseState::Rejected => self.rejected(&key, &lease),
                    LeaseState::Abandoned => {
                        self.purge_lease(&key);
                        self.attempt_lost(&lease, "its worker restarted and gave it up");
                    }
                }
            }
            LeaseChange::Released { .. } => {
                let Some((l, job, i)) = self.lease_gone(&key) else {
                    return;
                };
                // A worker releases only what it claimed, after publishing
                // the result, which will arrive on the events stream. Still
                // `Reserved` here means the claim was never seen: the
                // release's rollup removed it before the watch got to it
                // (a watch running behind). Placing the attempt again would
                // run the task twice under one attempt number.
                if self.jobs[&job].tasks[i].holds_worker() {
                    self.book.released(l.task_id, self.now.mono);
                }
            }
            LeaseChange::Expired { .. } => {
                let Some((l, job, i)) = self.lease_gone(&key) else {
                    return;
                };
                match self.jobs[&job].tasks[i].state {
                    TaskState::Reserved => {
                        self.metrics.reservation(Reservation::Expired);
                        let why = format!("worker {} did not claim its reservation", l.worker);
                        self.queue.avoid(&l.task_id, &l.worker, self.now.mono);
                        self.requeue_same_attempt(&job, i, &why);
                    }
                    TaskState::Running => self.attempt_lost(
                        &l,
                        &format!("worker {} stopped renewing its lease", l.worker),
                    ),
                    _ => {}
                }
            }
        }
    }

    /// Forgets a lease key that is gone; returns it with its task when the
    /// task still waits on this attempt (and start-up is over).
    fn lease_gone(&mut self, key: &LeaseKey) -> Option<(Lease, JobId, usize)> {
        // An ended attempt's key, expiring on its own: nothing to do.
        self.book.forget_finished(key);
        let live = self.book.remove(key)?;
        self.waits.remove(key);
        self.wants_schedule = true;
        if !self.ready {
            return None;
        }
        let (job, i) = self.jobs.current_task(&live.lease)?;
        Some((live.lease, job, i))
    }

    /// Purges a lease nothing should hold any more.
    fn purge_lease(&mut self, key: &LeaseKey) {
        self.fx.purge_leases.push(key.to_string());
        self.book.remove(key);
    }

    fn claimed(&mut self, l: &Lease) {
        let Some((job, i)) = self.jobs.current_task(l) else {
            return;
        };
        let j = self.jobs.job_mut(&job);
        if j.tasks[i].state == TaskState::Reserved {
            j.tasks[i].start(self.now.wall, l.claim_rev.unwrap_or_default());
            self.queue.started(&l.task_id);
            // Not written to the record: the lease itself says the task
            // runs, and a restarted coordinator adopts running leases. One
            // write less per task; the next change writes it anyway.
            j.derive_status(self.now.wall);
        }
    }

    fn rejected(&mut self, key: &LeaseKey, l: &Lease) {
        self.purge_lease(key);
        let Some((job, i)) = self.jobs.current_task(l) else {
            return;
        };
        if self.jobs[&job].tasks[i].state == TaskState::Reserved {
            self.metrics.reservation(Reservation::Refused);
            self.queue.avoid(&l.task_id, &l.worker, self.now.mono);
            let why = format!(
                "worker {} refused it: {}",
                l.worker,
                l.reason.as_deref().unwrap_or("no reason given")
            );
            self.requeue_same_attempt(&job, i, &why);
        }
    }

    pub(super) fn lease_create_failed(&mut self, key: &str, error: &str) {
        let Some(live) = subjects::parse_lease_key(key).and_then(|k| self.book.remove(&k)) else {
            return;
        };
        if let Some((job, i)) = self.jobs.current_task(&live.lease) {
            if self.jobs[&job].tasks[i].state == TaskState::Reserved {
                self.metrics.reservation(Reservation::Failed);
                self.requeue_same_attempt(&job, i, &format!("reservation failed: {error}"));
                // The store refused it (its stream has no leader, say):
                // again after a pause, not on every pass until it is back.
                let until = self.now.mono + self.cfg.retry_backoff.0;
                self.queue.retry_later(&live.lease.task_id, until, None);
            }
        }
    }

    /// Stops the attempt behind `key`: an unclaimed reservation is purged
    /// and the task ends at once; a running one is asked to stop, and ends
    /// when its worker reports (or its lease expires).
    pub(super) fn stop_lease(&mut self, job: &JobId, index: usize, key: &LeaseKey) {
        match self.book.get(key) {
            Some(live) if live.lease.state == LeaseState::Running => {
                let preempt = self.jobs[job].tasks[index].preempted_by().map(|by| {
                    gpufleet_schema::lease::Preempt {
                        by: by.clone(),
                        grace: self.cfg.preempt_grace,
                    }
                });
                let reason = match &preempt {
                    Some(p) => format!("preempted by job {}", p.by),
                    None => "job cancelled".into(),
                };
                let (mut lease, rev) = live.cancelling(reason);
                lease.preempt = preempt;
                self.fx.cancel_leases.push((key.to_string(), lease, rev));
            }
            Some(live) if live.lease.state == LeaseState::Cancelling => {}
            _ => {
                // Not claimed (or already gone): nothing runs; end it here.
                self.purge_lease(key);
                self.jobs
                    .task_mut(job, index)
                    .cancel("cancelled before it started", self.now.wall);
                self.emit_state(job, index);
            }
        }
    }

    // ----- attempts that end -----

    /// A reservation was not taken up: the same attempt waits again (or,
    /// in a cancelled job, the task ends), and a gang breaks.
    fn requeue_same_attempt(&mut self, job: &JobId, i: usize, why: &str) {
        let j = self.jobs.job_mut(job);
        let cancelled = j.cancel_requested;
        let t = &mut j.tasks[i];
        if cancelled {
            t.cancel("cancelled before it started", self.now.wall);
        } else {
            t.requeue_same_attempt(why);
            self.queue.queued_again(&t.id, self.now.mono);
        }
        self.emit_state(job, i);
        if self.jobs[job].spec.gang {
            // One member could not start: the rest of the gang must not
            // run without it (FLARE's check, then cancel).
            self.break_gang(job, why);
        }
        self.touch(job);
        self.wants_schedule = true;
    }

    /// A running attempt vanished: LOST, retried if the job allows.
    fn attempt_lost(&mut self, l: &Lease, why: &str) {
        let Some((job, i)) = self.jobs.current_task(l) else {
            return;
        };
        self.metrics.lease_lost();
        self.end_attempt(&job, i, Ended::lost(why));
    }

    /// Ends the current attempt of a task; a retryable end with retries
    /// left queues the next attempt instead.
    fn end_attempt(&mut self, job: &JobId, i: usize, ended: Ended) {
        self.book.settled(&self.jobs[job].tasks[i].id);
        let ended = stopped_as_asked(self.jobs[job].tasks[i].stopping.as_deref(), ended);
        let j = self.jobs.job_mut(job);
        // What a cancel or a preemption ends is no error of the job's.
        if !j.cancel_requested && j.tasks[i].stopping.is_none() {
            j.note_end(i, ended.state, ended.exit_code, &ended.why, self.now.wall);
        }
        if self.jobs[job].spec.gang {
            return self.end_gang_member(job, i, ended);
        }
        let Ended {
            state,
            exit_code,
            why,
        } = ended;
        let at = self.now.wall;
        let j = self.jobs.job_mut(job);
        let max_retries = j.spec.max_retries;
        let cancelled = j.cancel_requested;
        let t = &mut j.tasks[i];
        let attempt = t.attempt;
        let preempted = t.preempted_by().is_some();
        if cancelled && state != TaskState::Succeeded {
            t.end(
                TaskState::Cancelled,
                exit_code,
                Some("cancelled".into()),
                at,
            );
        } else if preempted && state != TaskState::Succeeded {
            // Back to the queue at once, as a new attempt that spends no
            // retry (the preemptor holds the worker it leaves).
            t.end(state, exit_code, Some(why.clone()), at);
            self.emit_state(job, i);
            let t = self.jobs.task_mut(job, i);
            t.requeue_preempted(format!("attempt {attempt} {state}: {why}"));
            self.queue.queued(&t.id, self.now.mono);
        } else if state.is_retryable() && t.counted_attempts() <= max_retries {
            // Tell listeners how this attempt ended, then queue the next,
            // after a pause, preferring another worker.
            let ran_on = t.worker.clone();
            t.end(state, exit_code, Some(why.clone()), at);
            self.emit_state(job, i);
            let delay = self.retry_delay(attempt);
            let t = self.jobs.task_mut(job, i);
            t.retry(format!(
                "attempt {attempt} {state}: {why}; next try in {:.1}s",
                delay.as_secs_f64()
            ));
            self.queue.queued(&t.id, self.now.mono);
            let until = self.now.mono + delay;
            self.queue.retry_later(&t.id, until, ran_on.as_ref());
            self.metrics.retry();
        } else {
            let reason = (state != TaskState::Succeeded).then_some(why);
            t.end(state, exit_code, reason, at);
        }
        self.emit_end(job, i);
        self.touch(job);
        self.wants_schedule = true;
    }

    /// A gang member's attempt ended: a success waits for the others; any
    /// other end breaks the gang (every member stops, then it runs again
    /// as a unit).
    fn end_gang_member(&mut self, job: &JobId, i: usize, ended: Ended) {
        let Ended {
            state,
            exit_code,
            why,
        } = ended;
        let j = self.jobs.job_mut(job);
        let broken = j.gang_broken.is_some();
        let t = &mut j.tasks[i];
        let reason = (state != TaskState::Succeeded).then(|| why.clone());
        t.end(state, exit_code, reason, self.now.wall);
        let name = t.name.clone();
        self.emit_end(job, i);
        if state != TaskState::Succeeded && !broken {
            self.break_gang(job, &format!("{name} ended {state}: {why}"));
        } else {
            self.settle_gang(job);
        }
        self.touch(job);
        self.wants_schedule = true;
    }

    // ----- gangs -----

    /// Marks a gang's current run as failed and tears it down.
    fn break_gang(&mut self, job: &JobId, why: &str) {
        self.jobs.job_mut(job).break_gang(why);
        self.settle_gang(job);
    }

    /// Moves a broken gang along: stops every member that still holds a
    /// worker; once none does, the record decides how the run ends
    /// ([`crate::state::JobRecord::settle_gang`]).
    fn settle_gang(&mut self, job: &JobId) {
        let Some(why) = self.jobs[job].gang_broken.clone() else {
            return;
        };
        let active: Vec<(usize, TaskState, LeaseKey)> = self.jobs[job]
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.holds_worker())
            .filter_map(|(i, t)| {
                let w = t.worker.as_ref()?;
                Some((i, t.state, subjects::lease_key(w, &t.id, t.attempt)))
            })
            .collect();
        let mut still_running = false;
        for (i, state, key) in active {
            match (state, self.book.get(&key)) {
                (TaskState::Running, Some(live)) if live.lease.state == LeaseState::Running => {
                    let reason = format!("another member of its gang failed: {why}");
                    self.fx.cancel_lease(&key, live, reason);
                    still_running = true;
                }
                (TaskState::Running, _) => still_running = true,
                _ => {
                    // Reserved, not yet claimed: withdraw it.
                    self.purge_lease(&key);
                    self.jobs
                        .task_mut(job, i)
                        .requeue_same_attempt(format!("its gang could not start: {why}"));
                    self.emit_state(job, i);
                }
            }
        }
        if still_running {
            return;
        }
        let j = self.jobs.job_mut(job);
        let open: Vec<usize> = (0..j.tasks.len())
            .filter(|&i| !j.tasks[i].is_final())
            .collect();
        let ran_on: Vec<Option<WorkerId>> = j.tasks.iter().map(|t| t.worker.clone()).collect();
        let before = j.tasks.iter().map(|t| t.attempt).max().unwrap_or(1);
        let changed = match j.settle_gang(&why, self.now.wall) {
            GangSettled::Requeued { attempt, preempted } => {
                // A run that failed pauses the whole gang; one that never
                // started (a member refused), or was preempted, goes again
                // at once.
                let delay = if attempt > before && !preempted {
                    self.retry_delay(before)
                } else {
                    Duration::ZERO
                };
                let until = self.now.mono + delay;
                let j = &self.jobs[job];
                for (t, w) in j.tasks.iter().zip(&ran_on) {
                    self.queue.queued(&t.id, self.now.mono);
                    if !delay.is_zero() {
                        self.queue.retry_later(&t.id, until, w.as_ref());
                    }
                    self.metrics.retry();
                }
                (0..j.tasks.len()).collect()
            }
            GangSettled::Cancelled | GangSettled::Failed => open,
        };
        for i in changed {
            self.emit_state(job, i);
        }
        self.touch(job);
        self.wants_schedule = true;
    }

    // ----- results -----

    pub(super) fn result(&mut self, event: Event, sender: &Sender, seq: u64) {
        let EventBody::Result(outcome) = event.body else {
            return;
        };
        let Some(job) = self.jobs.get(&event.job_id) else {
            return;
        };
        let Some(i) = job.task_index(&event.task_id) else {
            return;
        };
        let t = &job.tasks[i];
        // The key of the lease the sender held for this attempt.
        let key = sender
            .worker()
            .map(|w| subjects::lease_key(w, &event.task_id, event.attempt));
        // Fencing: only the current attempt may end a task; anything else
        // is a superseded attempt's report.
        if t.attempt != event.attempt || t.is_final() {
            tracing::info!(
                task_id = %event.task_id,
                attempt = event.attempt,
                current = t.attempt,
                "refused a result from a superseded attempt"
            );
            // Its process is gone all the same: a lease its sender still
            // holds for it (the token says it is the sender's) holds
            // nothing more.
            if let Some(key) = key {
                if self
                    .book
                    .get(&key)
                    .is_some_and(|l| event.token.as_deref() == Some(l.lease.token.as_str()))
                {
                    self.lease_finished(&key);
                }
            }
            return;
        }
        // And only from the worker holding its live claim: sent by it (the
        // subject says so, and the server checks who may publish there),
        // naming the claim's revision, carrying the reservation's token
        // (which nobody but that worker could read).
        let refusal = if t.worker.as_ref() != sender.worker() {
            Some(format!("sent by {}, not by its worker", sender.token()))
        } else if t.claim_rev.is_some_and(|c| event.lease_rev != Some(c)) {
            Some(format!(
                "names lease revision {:?}, not the claim's {:?}",
                event.lease_rev, t.claim_rev
            ))
        } else if t.token.is_some() && event.token != t.token {
            Some("does not carry its reservation's token".to_string())
        } else {
            None
        };
        if let Some(why) = refusal {
            tracing::warn!(
                task_id = %event.task_id,
                attempt = event.attempt,
                why,
                "refused a result"
            );
            return;
        }
        let TaskOutcome {
            state,
            exit_code,
            result,
            error,
            started_at,
            usage,
            ..
        } = outcome;
        let job = event.job_id;
        if let Some(key) = key {
            self.lease_finished(&key);
        }
        self.jobs
            .task_mut(&job, i)
            .record_report(result, seq, started_at, usage);
        let why = error.unwrap_or_else(|| match (state, exit_code) {
            (TaskState::Failed, Some(c)) => format!("exited with code {c}"),
            (s, _) => s.to_string(),
        });
        let ended = Ended {
            state,
            exit_code,
            why,
        };
        self.end_attempt(&job, i, ended);
    }

    /// The holder of the lease under `key` reported its attempt's end: its
    /// process is gone, so the lease holds nothing from now on (placement
    /// may use its capacity at once). The worker leaves the key to expire.
    fn lease_finished(&mut self, key: &LeaseKey) {
        let ttl = self
            .book
            .get(key)
            .map_or(self.cfg.lease_ttl.0, |l| l.lease.lease_ttl.0)
            .max(self.cfg.lease_ttl.0);
        self.book
            .finish(key, u64::MAX, self.now.mono, ttl + EXPIRY_SLACK);
        self.waits.remove(key);
        self.wants_schedule = true;
    }

    /// How long a task waits before attempt `failed + 1`: `retry_backoff`
    /// doubled per earlier failure, capped at `retry_backoff_max`, of which
    /// a random half to all ("equal jitter"), so that tasks that failed
    /// together do not all come back at once.
    pub(super) fn retry_delay(&mut self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(30);
        let full = self
            .cfg
            .retry_backoff
            .0
            .saturating_mul(1 << doublings)
            .min(self.cfg.retry_backoff_max.0);
        let half = full / 2;
        half + half.mul_f64(self.rng.unit())
    }

    // ----- workers that go -----

    /// A worker's advert is gone. One that expired on time, while
    /// JetStream was calm and the worker was not draining, died: its
    /// leases are lost at once rather than when they expire, and are
    /// removed, so that the worker finds them gone should it come back.
    /// Unless it was promised more time (heard alive over core NATS, see
    /// `alive.rs`): then it dies when the promise lapses, if it has not
    /// advertised again by then. Any other (a clean exit, or an expiry an
    /// outage may have caused) only stops new work going there; the
    /// leases' own TTLs decide.
    pub(super) fn worker_gone(&mut self, name: &WorkerId, expired: bool) {
        let advert = self.book.worker(name);
        let ttl = advert.map(|a| a.ttl.0);
        let mut died = expired
            && self.ready
            && self.health.calm(self.now.mono)
            && self.book.expired_on_time(name, self.now.mono)
            && advert.is_some_and(|a| !a.draining);
        if let Some(ttl) = ttl.filter(|&ttl| died && self.promises.holds(name, ttl, self.now.mono))
        {
            tracing::info!(worker = %name, "a worker's advert expired while it is promised time; it dies when the promise lapses, unless it advertises again");
            self.promises.wait(name.clone(), ttl);
            died = false;
        } else if expired && !died {
            tracing::info!(worker = %name, "a worker's advert expired; its leases expire on their own");
        }
        self.book.worker_gone(name);
        self.queue.worker_gone(name);
        self.wants_schedule = true;
        if died {
            self.worker_died(name, "its advert expired");
        }
    }

    /// A worker is dead: its leases are lost (removed, and their attempts
    /// tried again).
    fn worker_died(&mut self, name: &WorkerId, how: &str) {
        let why = format!("worker {name} stopped heartbeating ({how})");
        tracing::warn!(worker = %name, "worker died: its tasks are lost and tried again");
        for (key, live) in self.book.leases_of(name) {
            self.purge_lease(&key);
            let l = &live.lease;
            let Some((job, i)) = self.jobs.current_task(l) else {
                continue;
            };
            match self.jobs[&job].tasks[i].state {
                TaskState::Reserved => {
                    self.queue.avoid(&l.task_id, &l.worker, self.now.mono);
                    self.requeue_same_attempt(&job, i, &why);
                }
                TaskState::Running => self.end_attempt(&job, i, Ended::lost(&why)),
                _ => {}
            }
        }
    }

    // ----- time -----

    pub(super) fn tick(&mut self) {
        // Workers whose advert expired while promised, whose promise has
        // lapsed without an advert: dead, if nothing else explains it.
        for name in self.promises.lapsed(self.now.mono) {
            if self.ready && self.health.calm(self.now.mono) && self.book.worker(&name).is_none() {
                self.worker_died(
                    &name,
                    "its advert expired, and it was not heard alive since",
                );
            }
        }
        self.queue.expire_avoid(self.now.mono);
        self.book.expire_finished(self.now.mono);
        self.queue.expire_pauses(self.now.mono);
        let retention =
            time::Duration::try_from(self.cfg.job_retention.0).unwrap_or(time::Duration::MAX);
        self.jobs.expire_recent(self.now.wall - retention);
        // A released lease whose result never came: the worker lost it.
        // Not while results cannot arrive (the clocks start again when
        // they can), nor while the follower lags: the result may be in the
        // stream, not yet read (a restarted coordinator replaying a
        // backlog under load).
        let grace = self.cfg.result_grace.0;
        let overdue = if self.health.results_unsettled() {
            Vec::new()
        } else {
            self.book.take_overdue(self.now.mono, grace)
        };
        for task in overdue {
            let Some((job, i)) = self.jobs.find_task(&task) else {
                continue;
            };
            if self.jobs[&job].tasks[i].holds_worker() {
                let why = "its lease was released but no result arrived";
                self.end_attempt(&job, i, Ended::lost(why));
            }
        }
        if self.ready {
            self.wants_schedule = true;
            self.fx.checkpoint = Some(self.applied_seq);
            self.repeat_cancels();
        }
    }

    /// A cancel written to a lease can lose its compare-and-set to the
    /// worker's renewal; ask again until the lease shows it. A broken gang
    /// is moved along the same way.
    fn repeat_cancels(&mut self) {
        let broken: Vec<JobId> = self
            .queue
            .jobs()
            .filter(|id| self.jobs[*id].gang_broken.is_some())
            .cloned()
            .collect();
        for job in broken {
            self.settle_gang(&job);
        }
        // Jobs cancelled, and those with a task being cancelled or
        // preempted.
        let cancelled: Vec<JobId> = self
            .queue
            .jobs()
            .filter(|id| {
                let j = &self.jobs[*id];
                j.cancel_requested || j.tasks.iter().any(|t| t.stopping.is_some())
            })
            .cloned()
            .collect();
        for job in cancelled {
            let all = self.jobs[&job].cancel_requested;
            let keys: Vec<(usize, LeaseKey)> = self.jobs[&job]
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.state == TaskState::Running && (all || t.stopping.is_some()))
                .filter_map(|(i, t)| {
                    let w = t.worker.as_ref()?;
                    Some((i, subjects::lease_key(w, &t.id, t.attempt)))
                })
                .collect();
            for (i, key) in keys {
                if self
                    .book
                    .get(&key)
                    .is_some_and(|l| l.lease.state == LeaseState::Running)
                {
                    self.stop_lease(&job, i, &key);
                }
            }
        }
    }

    // ----- start-up -----

    /// Compares the records with the live leases once both are loaded:
    /// adopts leases whose decision was not yet recorded, ends attempts
    /// whose lease vanished while nobody watched, and stops leases that
    /// belong to nothing.
    pub(super) fn reconcile_at_start(&mut self) {
        let leases: Vec<(LeaseKey, LiveLease)> = self
            .book
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, live) in leases {
            let l = &live.lease;
            let Some((job, i)) = self.jobs.attempt_of(l) else {
                self.orphan_lease(&key, &live);
                continue;
            };
            let t = self.jobs.task_mut(&job, i);
            if t.worker.as_ref() != Some(&l.worker) || t.state == TaskState::Queued {
                t.reserve(l.worker.clone(), l.grant.clone(), l.token.clone());
            }
            match l.state {
                LeaseState::Running | LeaseState::Cancelling => {
                    if t.state != TaskState::Running {
                        t.start(self.now.wall, l.claim_rev.unwrap_or(live.rev));
                    }
                    // A loaded task waits for its GPU again, or has it.
                    self.second_phase_seen(&key, l);
                }
                LeaseState::Rejected => self.rejected(&key, l),
                LeaseState::Abandoned => {
                    self.purge_lease(&key);
                    self.attempt_lost(l, "its worker restarted and gave it up");
                }
                LeaseState::Reserved => {}
            }
            self.touch(&job);
        }
        // Attempts in flight without a lease: it ended while we were away,
        // and its result (if any) was already replayed from the stream.
        let mut lost = Vec::new();
        for (id, j) in self.jobs.iter() {
            if j.status.is_finished() {
                continue;
            }
            for (i, t) in j.tasks.iter().enumerate() {
                let Some(w) = &t.worker else { continue };
                if t.holds_worker()
                    && !self
                        .book
                        .contains(&subjects::lease_key(w, &t.id, t.attempt))
                {
                    lost.push((id.clone(), i, t.state));
                }
            }
        }
        for (job, i, state) in lost {
            if state == TaskState::Reserved {
                self.requeue_same_attempt(
                    &job,
                    i,
                    "its reservation lapsed while no coordinator ran",
                );
            } else {
                let why = "its lease ended while no coordinator ran, without a result";
                self.end_attempt(&job, i, Ended::lost(why));
            }
        }
        for (_, j) in self.jobs.iter() {
            for t in j.tasks.iter().filter(|t| t.state == TaskState::Queued) {
                self.queue.queued_again(&t.id, self.now.mono);
            }
        }
    }

    /// A lease no record wants at start-up. A claimed one is, almost
    /// always, that of an attempt that ended with its result (its worker
    /// leaves the key to expire): it holds nothing, and is not asked to
    /// stop, costing nothing. Should its worker renew it after all,
    /// something runs that nothing wants, and is asked to stop then
    /// ([`FinishedPut::StillRuns`]).
    fn orphan_lease(&mut self, key: &LeaseKey, live: &LiveLease) {
        match live.lease.state {
            LeaseState::Running | LeaseState::Cancelling => {
                let ttl = live.lease.lease_ttl.0.max(self.cfg.lease_ttl.0);
                self.book
                    .finish(key, live.rev, self.now.mono, ttl + EXPIRY_SLACK);
            }
            _ => self.purge_lease(key),
        }
    }
}
