//! The coordinator's one owner of state.
//!
//! Every input (API calls, worker adverts, lease changes, task results,
//! ticks) goes through [`Engine::handle`], which changes the job table and
//! records what must happen outside as [`Effects`]. Nothing in here touches
//! NATS or blocks, so it is tested without a server; `runtime.rs` feeds it
//! and carries out its effects. Handlers are idempotent: any input may come
//! twice (a replay after restart, a redelivered watch entry) and the
//! outcome is the same.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use gpufleet_schema::api::{code, SubmitReply};
use gpufleet_schema::capacity::WorkerCapacity;
use gpufleet_schema::{
    subjects, Encoding, Event, EventBody, GpuRequest, JobId, JobSpec, JobState, JobStatus, Lease,
    LeaseState, Rendezvous, TaskId, TaskOutcome, TaskState, WorkerAdvert, WorkerId,
};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::CoordinatorConfig;
use crate::metrics::{InputKind, Metrics};
use crate::placement::{self, TaskRequest, WorkerView};
use crate::state::{JobRecord, INLINE_RESULT_BYTES};

/// A reply to an API call, before encoding.
#[derive(Debug)]
pub enum Reply {
    Submit(SubmitReply),
    Job(Box<JobStatus>),
    Jobs(Vec<JobStatus>),
    Workers(Vec<WorkerAdvert>),
    Error { code: u16, message: String },
}

impl Reply {
    pub fn error(code: u16, message: impl Into<String>) -> Reply {
        Reply::Error {
            code,
            message: message.into(),
        }
    }
}

pub type ReplyTx = oneshot::Sender<Reply>;

#[derive(Debug)]
pub enum ApiCall {
    Submit(Box<JobSpec>),
    Get {
        job: JobId,
        offset: usize,
        limit: usize,
    },
    List {
        status: Option<JobState>,
        limit: usize,
    },
    Cancel(JobId),
    Workers {
        after: Option<WorkerId>,
        limit: usize,
    },
}

/// A change in `gpufleet-leases`, as the watcher saw it.
#[derive(Debug, Clone)]
pub enum LeaseChange {
    Put {
        key: String,
        rev: u64,
        lease: Box<Lease>,
    },
    /// Released by its holder, or purged by us.
    Released { key: String },
    /// Its TTL ran out.
    Expired { key: String },
}

#[derive(Debug)]
pub enum Input {
    Api(ApiCall, ReplyTx),
    Advert(Box<WorkerAdvert>),
    WorkerGone(WorkerId),
    Lease(LeaseChange),
    /// A result event, with its stream sequence.
    Result {
        seq: u64,
        event: Box<Event>,
    },
    /// A reservation we tried to create could not be.
    LeaseCreateFailed {
        key: String,
        error: String,
    },
    /// A job record could not be written; write it again.
    Persist(JobId),
    /// A start-up feed has delivered everything that existed. Sent through
    /// the same channel as the feed's changes, so it comes after them.
    Synced(Feed),
    Tick,
}

/// The start-up feeds the engine waits for before it places anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Workers,
    Leases,
    Events,
}

/// What the runtime must do after a batch of inputs.
#[derive(Default)]
pub struct Effects {
    /// Job records to write (their current state).
    pub put_jobs: BTreeSet<JobId>,
    pub create_leases: Vec<(String, Lease)>,
    /// Compare-and-set the lease to CANCELLING (key, new value, expected rev).
    pub cancel_leases: Vec<(String, Lease, u64)>,
    pub purge_leases: Vec<String>,
    /// State events to publish: (subject, event).
    pub events: Vec<(String, Event)>,
    /// Replies to send once the job records they depend on are written.
    pub replies: Vec<(ReplyTx, Reply, Option<JobId>)>,
    /// The result sequence the records reflect, to store once they are.
    pub checkpoint: Option<u64>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.put_jobs.is_empty()
            && self.create_leases.is_empty()
            && self.cancel_leases.is_empty()
            && self.purge_leases.is_empty()
            && self.events.is_empty()
            && self.replies.is_empty()
            && self.checkpoint.is_none()
    }
}

/// A live key in `gpufleet-leases`, as we last saw or wrote it.
#[derive(Debug, Clone)]
struct LiveLease {
    rev: u64,
    lease: Lease,
}

/// Where the engine is in its start-up.
#[derive(Debug, Default, Clone, Copy)]
pub struct Readiness {
    pub workers_synced: bool,
    pub leases_synced: bool,
    pub events_caught_up: bool,
}

impl Readiness {
    pub fn all(&self) -> bool {
        self.workers_synced && self.leases_synced && self.events_caught_up
    }
}

/// Workers held back for the task or gang at the head of the queue.
#[derive(Debug, Clone, PartialEq)]
struct Hold {
    job: JobId,
    /// The task, for a plain job; `None` for a gang.
    task: Option<usize>,
    workers: Vec<WorkerId>,
}

/// What one scheduling pass decided to reserve.
enum Placed {
    Task {
        job: JobId,
        index: usize,
        worker: usize,
        grant: gpufleet_schema::Grant,
    },
    /// A gang's members: (task index, worker index, grant).
    Gang {
        job: JobId,
        members: Vec<(usize, usize, gpufleet_schema::Grant)>,
    },
}

pub struct Engine {
    cfg: CoordinatorConfig,
    jobs: HashMap<JobId, JobRecord>,
    /// Unfinished jobs in queue order: priority (high first), then age.
    queue: BTreeSet<(std::cmp::Reverse<i32>, u64, JobId)>,
    next_seq: u64,
    workers: BTreeMap<WorkerId, WorkerAdvert>,
    leases: HashMap<String, LiveLease>,
    /// Workers that refused a task, until when.
    avoid: HashMap<TaskId, Vec<(WorkerId, Instant)>>,
    /// Tasks whose lease was released before their result came.
    released: HashMap<TaskId, Instant>,
    /// When each task joined the queue (for the starvation hold).
    queued_since: HashMap<TaskId, Instant>,
    hold: Option<Hold>,
    fx: Effects,
    /// Highest result sequence applied to the in-memory table.
    applied_seq: u64,
    pub readiness: Readiness,
    ready: bool,
    /// Something changed that placement should look at.
    wants_schedule: bool,
    metrics: Metrics,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Engine {
    pub fn new(cfg: CoordinatorConfig) -> Engine {
        Engine {
            cfg,
            jobs: HashMap::new(),
            queue: BTreeSet::new(),
            next_seq: 1,
            workers: BTreeMap::new(),
            leases: HashMap::new(),
            avoid: HashMap::new(),
            released: HashMap::new(),
            queued_since: HashMap::new(),
            hold: None,
            fx: Effects::default(),
            applied_seq: 0,
            readiness: Readiness::default(),
            ready: false,
            wants_schedule: true,
            metrics: Metrics::default(),
        }
    }

    /// Loads a persisted job at start-up.
    pub fn restore_job(&mut self, job: JobRecord) {
        self.next_seq = self.next_seq.max(job.seq + 1);
        if !job.status.is_finished() {
            self.queue.insert(queue_key(&job));
        }
        self.jobs.insert(job.id.clone(), job);
    }

    pub fn restore_checkpoint(&mut self, seq: u64) {
        self.applied_seq = self.applied_seq.max(seq);
    }

    /// The sequence after which result events must be replayed.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Placement has work left that an earlier pass did not get to.
    pub fn schedule_pending(&self) -> bool {
        self.ready && self.wants_schedule
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    pub fn job(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.fx)
    }

    /// Marks start-up inputs as complete; once all are, reconciles the
    /// records with the leases and starts placing.
    fn set_readiness(&mut self, f: impl FnOnce(&mut Readiness)) {
        f(&mut self.readiness);
        if !self.ready && self.readiness.all() {
            self.ready = true;
            self.reconcile_at_start();
            self.wants_schedule = true;
        }
    }

    pub fn handle(&mut self, input: Input) {
        self.metrics.input(match &input {
            Input::Advert(_) | Input::WorkerGone(_) => InputKind::Advert,
            Input::Lease(_) => InputKind::Lease,
            Input::Result { .. } => InputKind::Result,
            Input::Api(..) => InputKind::Api,
            _ => InputKind::Other,
        });
        match input {
            Input::Api(call, tx) => self.api(call, tx),
            Input::Advert(advert) => {
                // A fresh advert ends a refusal: what made the worker say
                // no (a race with a task that just ended) is behind it.
                let name = advert.name.clone();
                let mut lifted = false;
                self.avoid.retain(|_, list| {
                    let before = list.len();
                    list.retain(|(w, _)| *w != name);
                    lifted |= list.len() != before;
                    !list.is_empty()
                });
                // Most heartbeats change nothing placement looks at; only
                // those that do are worth a pass over the queue.
                if lifted
                    || self
                        .workers
                        .get(&name)
                        .is_none_or(|old| capacity_changed(old, &advert))
                {
                    self.wants_schedule = true;
                }
                self.workers.insert(name, *advert);
            }
            Input::WorkerGone(name) => {
                self.workers.remove(&name);
                if self
                    .hold
                    .as_ref()
                    .is_some_and(|h| h.workers.contains(&name))
                {
                    self.hold = None;
                }
                self.wants_schedule = true;
            }
            Input::Lease(change) => self.lease_change(change),
            Input::Result { seq, event } => {
                self.result(*event, seq);
                self.applied_seq = self.applied_seq.max(seq);
            }
            Input::LeaseCreateFailed { key, error } => self.lease_create_failed(&key, &error),
            Input::Persist(job) => {
                self.fx.put_jobs.insert(job);
            }
            Input::Synced(feed) => self.set_readiness(|r| match feed {
                Feed::Workers => r.workers_synced = true,
                Feed::Leases => r.leases_synced = true,
                Feed::Events => r.events_caught_up = true,
            }),
            Input::Tick => self.tick(),
        }
    }

    /// Runs placement if anything changed since the last time.
    pub fn schedule_if_needed(&mut self) {
        if self.ready && self.wants_schedule {
            self.wants_schedule = false;
            self.schedule();
        }
    }

    // ----- API -----

    fn api(&mut self, call: ApiCall, tx: ReplyTx) {
        match call {
            ApiCall::Submit(spec) => self.submit(*spec, tx),
            ApiCall::Get { job, offset, limit } => {
                let reply = match self.jobs.get(&job) {
                    Some(j) => {
                        let mut status = j.status(false);
                        status.tasks = j
                            .tasks
                            .iter()
                            .skip(offset)
                            .take(limit)
                            .map(|t| t.status())
                            .collect();
                        Reply::Job(Box::new(status))
                    }
                    None => Reply::error(code::NOT_FOUND, format!("job {job} not found")),
                };
                self.fx.replies.push((tx, reply, None));
            }
            ApiCall::List { status, limit } => {
                let mut jobs: Vec<&JobRecord> = self
                    .jobs
                    .values()
                    .filter(|j| status.is_none_or(|s| j.status == s))
                    .collect();
                // Newest first.
                jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
                let list = jobs.iter().take(limit).map(|j| j.status(false)).collect();
                self.fx.replies.push((tx, Reply::Jobs(list), None));
            }
            ApiCall::Cancel(id) => self.cancel(id, tx),
            ApiCall::Workers { after, limit } => {
                let list = match after {
                    Some(a) => self
                        .workers
                        .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                        .take(limit)
                        .map(|(_, w)| w.clone())
                        .collect(),
                    None => self.workers.values().take(limit).cloned().collect(),
                };
                self.fx.replies.push((tx, Reply::Workers(list), None));
            }
        }
    }

    fn submit(&mut self, mut spec: JobSpec, tx: ReplyTx) {
        if let Err(e) = spec.validate() {
            self.fx
                .replies
                .push((tx, Reply::error(code::BAD_REQUEST, e.to_string()), None));
            return;
        }
        let id = spec.id.clone().unwrap_or_else(JobId::generate);
        spec.id = Some(id.clone());
        if let Some(existing) = self.jobs.get(&id) {
            let reply = if existing.spec == spec {
                Reply::Submit(SubmitReply {
                    job_id: id.clone(),
                    status: existing.status,
                    created: false,
                })
            } else {
                Reply::error(
                    code::CONFLICT,
                    format!("job {id} already exists with a different spec"),
                )
            };
            // The earlier submit may still be on its way to the store.
            let wait = self.fx.put_jobs.contains(&id).then(|| id.clone());
            self.fx.replies.push((tx, reply, wait));
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let job = JobRecord::new(id.clone(), seq, spec, now());
        let since = Instant::now();
        for t in &job.tasks {
            self.queued_since.insert(t.id.clone(), since);
        }
        self.queue.insert(queue_key(&job));
        let status = job.status;
        self.jobs.insert(id.clone(), job);
        self.fx.put_jobs.insert(id.clone());
        self.fx.replies.push((
            tx,
            Reply::Submit(SubmitReply {
                job_id: id.clone(),
                status,
                created: true,
            }),
            Some(id),
        ));
        self.wants_schedule = true;
    }

    fn cancel(&mut self, id: JobId, tx: ReplyTx) {
        let Some(job) = self.jobs.get_mut(&id) else {
            self.fx.replies.push((
                tx,
                Reply::error(code::NOT_FOUND, format!("job {id} not found")),
                None,
            ));
            return;
        };
        if !job.status.is_finished() && !job.cancel_requested {
            job.cancel_requested = true;
            let t_now = now();
            let mut to_cancel = Vec::new();
            for (i, t) in job.tasks.iter_mut().enumerate() {
                match t.state {
                    TaskState::Queued => {
                        t.state = TaskState::Cancelled;
                        t.finished_at = Some(t_now);
                        t.reason = Some("cancelled before it ran".into());
                        to_cancel.push((i, None));
                    }
                    TaskState::Reserved | TaskState::Running => {
                        let key = t
                            .worker
                            .as_ref()
                            .map(|w| subjects::lease_key(w, &t.id, t.attempt));
                        to_cancel.push((i, key));
                    }
                    _ => {}
                }
            }
            for (i, key) in to_cancel {
                match key {
                    None => self.emit_state(&id, i, None),
                    Some(key) => self.stop_lease(&id, i, &key),
                }
            }
            self.touch(&id);
        }
        let job = &self.jobs[&id];
        let reply = Reply::Job(Box::new(job.status(true)));
        self.fx.replies.push((tx, reply, Some(id)));
    }

    /// Stops the attempt behind `key`: an unclaimed reservation is purged
    /// and the task ends at once; a running one is asked to stop, and ends
    /// when its worker reports (or its lease expires).
    fn stop_lease(&mut self, job: &JobId, index: usize, key: &str) {
        let live = self.leases.get(key).cloned();
        let task = &mut self.jobs.get_mut(job).expect("job exists").tasks[index];
        match live {
            Some(l) if l.lease.state == LeaseState::Running => {
                let mut lease = l.lease.clone();
                lease.state = LeaseState::Cancelling;
                lease.reason = Some("job cancelled".into());
                self.fx.cancel_leases.push((key.to_string(), lease, l.rev));
            }
            Some(l) if l.lease.state == LeaseState::Cancelling => {}
            _ => {
                // Not claimed (or already gone): nothing runs; end it here.
                self.fx.purge_leases.push(key.to_string());
                self.leases.remove(key);
                task.state = TaskState::Cancelled;
                task.finished_at = Some(now());
                task.reason = Some("cancelled before it started".into());
                self.emit_state(job, index, None);
            }
        }
    }

    // ----- leases -----

    fn lease_change(&mut self, change: LeaseChange) {
        match change {
            LeaseChange::Put { key, rev, lease } => {
                let lease = *lease;
                let state = lease.state;
                let prev = self.leases.insert(
                    key.clone(),
                    LiveLease {
                        rev,
                        lease: lease.clone(),
                    },
                );
                if prev.as_ref().is_some_and(|p| p.rev > rev) {
                    // An older entry redelivered; keep the newer.
                    self.leases.insert(key, prev.expect("checked"));
                    return;
                }
                if !self.ready {
                    return;
                }
                match state {
                    LeaseState::Reserved | LeaseState::Cancelling => {}
                    LeaseState::Running => self.claimed(&key, &lease),
                    LeaseState::Rejected => self.rejected(&key, &lease),
                    LeaseState::Abandoned => {
                        self.fx.purge_leases.push(key.clone());
                        self.leases.remove(&key);
                        self.attempt_lost(&lease, "its worker restarted and gave it up");
                    }
                }
            }
            LeaseChange::Released { key } => {
                let Some((l, job, i)) = self.lease_gone(&key) else {
                    return;
                };
                let state = self.jobs[&job].tasks[i].state;
                // A worker releases only what it claimed, after publishing
                // the result, which will arrive on the events stream. Still
                // `Reserved` here means the claim was never seen: the
                // release's rollup removed it before the watch got to it
                // (a watch running behind). Placing the attempt again would
                // run the task twice under one attempt number.
                if matches!(state, TaskState::Running | TaskState::Reserved) {
                    self.released.insert(l.task_id.clone(), Instant::now());
                }
            }
            LeaseChange::Expired { key } => {
                let Some((l, job, i)) = self.lease_gone(&key) else {
                    return;
                };
                match self.jobs[&job].tasks[i].state {
                    TaskState::Reserved => {
                        let why = format!("worker {} did not claim its reservation", l.worker);
                        self.avoid_worker(&l.task_id, &l.worker);
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
    fn lease_gone(&mut self, key: &str) -> Option<(Lease, JobId, usize)> {
        let live = self.leases.remove(key)?;
        self.wants_schedule = true;
        if !self.ready {
            return None;
        }
        let (job, i) = self.current_task(&live.lease)?;
        Some((live.lease, job, i))
    }

    /// The job and index of the task this lease is for, if the lease is
    /// for the task's current attempt and the task is still in play.
    fn current_task(&self, l: &Lease) -> Option<(JobId, usize)> {
        let job = self.jobs.get(&l.job_id)?;
        let i = job.task_index(&l.task_id)?;
        let t = &job.tasks[i];
        (t.attempt == l.attempt && !t.is_final() && t.worker.as_ref() == Some(&l.worker))
            .then(|| (l.job_id.clone(), i))
    }

    fn claimed(&mut self, _key: &str, l: &Lease) {
        let Some((job, i)) = self.current_task(l) else {
            return;
        };
        let t = &mut self.jobs.get_mut(&job).expect("job").tasks[i];
        if t.state == TaskState::Reserved {
            t.state = TaskState::Running;
            t.started_at = Some(now());
            t.launched = true;
            t.reason = None;
            self.queued_since.remove(&l.task_id);
            // Not written to the record: the lease itself says the task
            // runs, and a restarted coordinator adopts running leases. One
            // write less per task; the next change writes it anyway.
            let j = self.jobs.get_mut(&job).expect("job");
            j.derive_status(now());
            self.update_job_reason(&job);
        }
    }

    fn rejected(&mut self, key: &str, l: &Lease) {
        self.fx.purge_leases.push(key.to_string());
        self.leases.remove(key);
        let Some((job, i)) = self.current_task(l) else {
            return;
        };
        if self.jobs[&job].tasks[i].state == TaskState::Reserved {
            self.avoid_worker(&l.task_id, &l.worker);
            let why = format!(
                "worker {} refused it: {}",
                l.worker,
                l.reason.as_deref().unwrap_or("no reason given")
            );
            self.requeue_same_attempt(&job, i, &why);
        }
    }

    fn avoid_worker(&mut self, task: &TaskId, worker: &WorkerId) {
        let until = Instant::now() + Duration::from_secs(30);
        self.avoid
            .entry(task.clone())
            .or_default()
            .push((worker.clone(), until));
    }

    fn requeue_same_attempt(&mut self, job: &JobId, i: usize, why: &str) {
        let j = self.jobs.get_mut(job).expect("job");
        let t = &mut j.tasks[i];
        if j.cancel_requested {
            t.state = TaskState::Cancelled;
            t.finished_at = Some(now());
        } else {
            t.state = TaskState::Queued;
            t.worker = None;
            t.grant = None;
            t.started_at = None;
            t.reason = Some(why.to_string());
            self.queued_since
                .entry(t.id.clone())
                .or_insert_with(Instant::now);
        }
        self.emit_state(job, i, Some(why.to_string()));
        if self.jobs[job].spec.gang {
            // One member could not start: the rest of the gang must not
            // run without it (FLARE's check, then cancel).
            self.break_gang(job, why);
        }
        self.touch(job);
        self.wants_schedule = true;
    }

    /// Marks a gang's current run as failed and tears it down.
    fn break_gang(&mut self, job: &JobId, why: &str) {
        let j = self.jobs.get_mut(job).expect("job");
        if j.gang_broken.is_none() {
            j.gang_broken = Some(why.to_string());
        }
        self.settle_gang(job);
    }

    /// Moves a broken gang along: stops every member that still holds
    /// resources; once none does, queues the whole gang again (as attempt
    /// + 1 if any member ran, within `max_retries`) or ends it.
    fn settle_gang(&mut self, job: &JobId) {
        let Some(why) = self.jobs[job].gang_broken.clone() else {
            return;
        };
        let active: Vec<(usize, TaskState, String)> = self.jobs[job]
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.state, TaskState::Reserved | TaskState::Running))
            .filter_map(|(i, t)| {
                let w = t.worker.as_ref()?;
                Some((i, t.state, subjects::lease_key(w, &t.id, t.attempt)))
            })
            .collect();
        let mut still_running = false;
        for (i, state, key) in active {
            match (state, self.leases.get(&key).map(|l| l.lease.state)) {
                (TaskState::Running, Some(LeaseState::Running)) => {
                    let live = self.leases[&key].clone();
                    let mut lease = live.lease;
                    lease.state = LeaseState::Cancelling;
                    lease.reason = Some(format!("another member of its gang failed: {why}"));
                    self.fx.cancel_leases.push((key, lease, live.rev));
                    still_running = true;
                }
                (TaskState::Running, _) => still_running = true,
                _ => {
                    // Reserved, not yet claimed: withdraw it.
                    self.fx.purge_leases.push(key.clone());
                    self.leases.remove(&key);
                    let t = &mut self.jobs.get_mut(job).expect("job").tasks[i];
                    t.state = TaskState::Queued;
                    t.worker = None;
                    t.grant = None;
                    self.emit_state(job, i, Some(format!("its gang could not start: {why}")));
                }
            }
        }
        if still_running {
            return;
        }
        let j = self.jobs.get_mut(job).expect("job");
        let attempt = j.tasks.iter().map(|t| t.attempt).max().unwrap_or(1);
        let ran = j.tasks.iter().any(|t| t.started_at.is_some());
        let t_now = now();
        j.gang_broken = None;
        if j.cancel_requested {
            for t in j.tasks.iter_mut().filter(|t| !t.is_final()) {
                t.state = TaskState::Cancelled;
                t.finished_at = Some(t_now);
            }
        } else if !ran || attempt <= j.spec.max_retries {
            // The whole gang again, as one unit.
            let next = if ran { attempt + 1 } else { attempt };
            for t in j.tasks.iter_mut() {
                t.state = TaskState::Queued;
                t.attempt = next;
                t.worker = None;
                t.grant = None;
                t.exit_code = None;
                t.result = None;
                t.result_seq = None;
                t.started_at = None;
                t.finished_at = None;
                t.dropped = false;
                t.reason = Some(format!("gang run {attempt} failed: {why}"));
            }
            let since = Instant::now();
            let ids: Vec<TaskId> = j.tasks.iter().map(|t| t.id.clone()).collect();
            for id in ids {
                self.queued_since.insert(id, since);
            }
            for i in 0..self.jobs[job].tasks.len() {
                self.emit_state(job, i, Some(format!("gang run {attempt} failed: {why}")));
            }
        } else {
            let msg = format!("its gang failed: {why}");
            let ends: Vec<usize> = j
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.is_final())
                .map(|(i, _)| i)
                .collect();
            for &i in &ends {
                let t = &mut j.tasks[i];
                t.state = TaskState::Cancelled;
                t.finished_at = Some(t_now);
                t.reason = Some(msg.clone());
            }
            for i in ends {
                self.emit_state(job, i, Some(msg.clone()));
            }
        }
        self.touch(job);
        self.wants_schedule = true;
    }

    /// A running attempt vanished: LOST, retried if the job allows.
    fn attempt_lost(&mut self, l: &Lease, why: &str) {
        let Some((job, i)) = self.current_task(l) else {
            return;
        };
        self.end_attempt(&job, i, TaskState::Lost, None, why.to_string());
    }

    /// Ends the current attempt of a task in `state`; a retryable end with
    /// retries left queues the next attempt instead.
    fn end_attempt(
        &mut self,
        job: &JobId,
        i: usize,
        state: TaskState,
        exit_code: Option<i32>,
        why: String,
    ) {
        self.released.remove(&self.jobs[job].tasks[i].id);
        if self.jobs[job].spec.gang {
            return self.end_gang_member(job, i, state, exit_code, why);
        }
        let j = self.jobs.get_mut(job).expect("job");
        let max_retries = j.spec.max_retries;
        let cancelled = j.cancel_requested;
        let t = &mut j.tasks[i];
        let attempt = t.attempt;
        t.exit_code = exit_code;
        if cancelled && state != TaskState::Succeeded {
            t.state = TaskState::Cancelled;
            t.finished_at = Some(now());
            t.reason = Some("cancelled".into());
        } else if state.is_retryable() && attempt <= max_retries {
            // Tell listeners how this attempt ended, then queue the next.
            t.state = state;
            t.reason = Some(format!("attempt {attempt} {state}: {why}"));
            let ev = self.state_event(job, i, Some(why.clone()));
            self.fx.events.push(ev);
            let t = &mut self.jobs.get_mut(job).expect("job").tasks[i];
            t.state = TaskState::Queued;
            t.attempt += 1;
            t.worker = None;
            t.grant = None;
            t.exit_code = None;
            self.queued_since.insert(t.id.clone(), Instant::now());
            self.wants_schedule = true;
        } else {
            t.state = state;
            t.finished_at = Some(now());
            t.reason = (state != TaskState::Succeeded).then_some(why.clone());
        }
        let reason = self.jobs[job].tasks[i].reason.clone();
        self.emit_state(job, i, reason);
        self.touch(job);
        self.wants_schedule = true;
    }

    /// A gang member's attempt ended: a success waits for the others; any
    /// other end breaks the gang (every member stops, then it runs again
    /// as a unit).
    fn end_gang_member(
        &mut self,
        job: &JobId,
        i: usize,
        state: TaskState,
        exit_code: Option<i32>,
        why: String,
    ) {
        let j = self.jobs.get_mut(job).expect("job");
        let broken = j.gang_broken.is_some();
        let t = &mut j.tasks[i];
        t.exit_code = exit_code;
        t.finished_at = Some(now());
        t.state = state;
        t.reason = (state != TaskState::Succeeded).then(|| why.clone());
        let reason = t.reason.clone();
        let name = t.name.clone();
        self.emit_state(job, i, reason);
        if state != TaskState::Succeeded && !broken {
            self.break_gang(job, &format!("{name} ended {state}: {why}"));
        } else {
            self.settle_gang(job);
        }
        self.touch(job);
        self.wants_schedule = true;
    }

    fn lease_create_failed(&mut self, key: &str, error: &str) {
        let Some(live) = self.leases.remove(key) else {
            return;
        };
        if let Some((job, i)) = self.current_task(&live.lease) {
            if self.jobs[&job].tasks[i].state == TaskState::Reserved {
                self.requeue_same_attempt(&job, i, &format!("reservation failed: {error}"));
            }
        }
    }

    // ----- results -----

    fn result(&mut self, event: Event, seq: u64) {
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
        // Fencing: only the current attempt, from the worker that holds it,
        // may end a task; anything else is a superseded attempt's report.
        if t.attempt != event.attempt || t.is_final() || t.worker != event.worker {
            tracing::info!(
                task_id = %event.task_id,
                attempt = event.attempt,
                current = t.attempt,
                "refused a result from a superseded attempt"
            );
            return;
        }
        let TaskOutcome {
            state,
            exit_code,
            result,
            error,
            started_at,
            ..
        } = outcome;
        let job_id = event.job_id.clone();
        {
            let t = &mut self.jobs.get_mut(&job_id).expect("job").tasks[i];
            if t.started_at.is_none() {
                t.started_at = started_at;
            }
            t.launched |= started_at.is_some();
            match result {
                Some(r) if serde_json::to_vec(&r).map_or(0, |b| b.len()) <= INLINE_RESULT_BYTES => {
                    t.result = Some(r);
                    t.result_seq = None;
                }
                Some(_) => {
                    t.result = None;
                    t.result_seq = Some(seq);
                }
                None => {
                    t.result = None;
                    t.result_seq = None;
                }
            }
        }
        let why = error.unwrap_or_else(|| match (state, exit_code) {
            (TaskState::Failed, Some(c)) => format!("exited with code {c}"),
            (s, _) => s.to_string(),
        });
        self.end_attempt(&job_id, i, state, exit_code, why);
    }

    // ----- time -----

    fn tick(&mut self) {
        let now_i = Instant::now();
        self.avoid.retain(|_, list| {
            list.retain(|(_, until)| *until > now_i);
            !list.is_empty()
        });
        // A released lease whose result never came: the worker lost it.
        let grace = self.cfg.result_grace.0;
        let overdue: Vec<TaskId> = self
            .released
            .iter()
            .filter(|(_, at)| now_i.duration_since(**at) > grace)
            .map(|(t, _)| t.clone())
            .collect();
        for task in overdue {
            self.released.remove(&task);
            if let Some((job, i)) = self.find_task(&task) {
                if matches!(
                    self.jobs[&job].tasks[i].state,
                    TaskState::Running | TaskState::Reserved
                ) {
                    self.end_attempt(
                        &job,
                        i,
                        TaskState::Lost,
                        None,
                        "its lease was released but no result arrived".into(),
                    );
                }
            }
        }
        if self.ready {
            self.wants_schedule = true;
            let seq = self.applied_seq;
            self.fx.checkpoint = Some(seq);
            self.repeat_cancels();
        }
    }

    /// A cancel written to a lease can lose its compare-and-set to the
    /// worker's renewal; ask again until the lease shows it.
    fn repeat_cancels(&mut self) {
        let broken: Vec<JobId> = self
            .queue
            .iter()
            .map(|(_, _, id)| id)
            .filter(|id| self.jobs[*id].gang_broken.is_some())
            .cloned()
            .collect();
        for job in broken {
            self.settle_gang(&job);
        }
        let jobs: Vec<JobId> = self
            .queue
            .iter()
            .map(|(_, _, id)| id)
            .filter(|id| self.jobs[*id].cancel_requested)
            .cloned()
            .collect();
        for job in jobs {
            let keys: Vec<(usize, String)> = self.jobs[&job]
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.state == TaskState::Running)
                .filter_map(|(i, t)| {
                    let w = t.worker.as_ref()?;
                    Some((i, subjects::lease_key(w, &t.id, t.attempt)))
                })
                .collect();
            for (i, key) in keys {
                if self
                    .leases
                    .get(&key)
                    .is_some_and(|l| l.lease.state == LeaseState::Running)
                {
                    self.stop_lease(&job, i, &key);
                }
            }
        }
    }

    fn find_task(&self, task: &TaskId) -> Option<(JobId, usize)> {
        // Task ids are `<job>-<index>`; the job id may itself contain '-'.
        let (job, _) = task.as_str().rsplit_once('-')?;
        let job = JobId::new(job).ok()?;
        let i = self.jobs.get(&job)?.task_index(task)?;
        Some((job, i))
    }

    // ----- start-up -----

    /// Compares the records with the live leases once both are loaded:
    /// adopts leases whose decision was not yet recorded, ends attempts
    /// whose lease vanished while nobody watched, and stops leases that
    /// belong to nothing.
    fn reconcile_at_start(&mut self) {
        let mut by_task: HashMap<TaskId, Vec<String>> = HashMap::new();
        for (key, l) in &self.leases {
            by_task
                .entry(l.lease.task_id.clone())
                .or_default()
                .push(key.clone());
        }
        let keys: Vec<(String, LiveLease)> = self
            .leases
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, live) in keys {
            let l = &live.lease;
            let owner = self
                .jobs
                .get(&l.job_id)
                .and_then(|j| j.task_index(&l.task_id).map(|i| (j, i)));
            let adopt = match owner {
                Some((j, i)) => {
                    let t = &j.tasks[i];
                    t.attempt == l.attempt && !t.is_final()
                }
                None => false,
            };
            if !adopt {
                self.orphan_lease(&key, &live);
                continue;
            }
            let job = l.job_id.clone();
            let i = self.jobs[&job].task_index(&l.task_id).expect("checked");
            let t = &mut self.jobs.get_mut(&job).expect("job").tasks[i];
            if t.worker.as_ref() != Some(&l.worker) || t.state == TaskState::Queued {
                t.worker = Some(l.worker.clone());
                t.grant = Some(l.grant.clone());
                t.state = TaskState::Reserved;
            }
            match l.state {
                LeaseState::Running | LeaseState::Cancelling => {
                    if t.state != TaskState::Running {
                        t.state = TaskState::Running;
                        t.started_at.get_or_insert_with(now);
                        t.launched = true;
                    }
                }
                LeaseState::Rejected => {
                    let l = l.clone();
                    self.rejected(&key, &l);
                }
                LeaseState::Abandoned => {
                    self.fx.purge_leases.push(key.clone());
                    self.leases.remove(&key);
                    let l = l.clone();
                    self.attempt_lost(&l, "its worker restarted and gave it up");
                }
                LeaseState::Reserved => {}
            }
            self.touch(&job);
        }
        // Attempts in flight without a lease: it ended while we were away,
        // and its result (if any) was already replayed from the stream.
        let mut lost = Vec::new();
        for (id, j) in &self.jobs {
            if j.status.is_finished() {
                continue;
            }
            for (i, t) in j.tasks.iter().enumerate() {
                let Some(w) = &t.worker else { continue };
                if matches!(t.state, TaskState::Reserved | TaskState::Running)
                    && !self
                        .leases
                        .contains_key(&subjects::lease_key(w, &t.id, t.attempt))
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
                self.end_attempt(
                    &job,
                    i,
                    TaskState::Lost,
                    None,
                    "its lease ended while no coordinator ran, without a result".into(),
                );
            }
        }
        let since = Instant::now();
        for j in self.jobs.values() {
            for t in &j.tasks {
                if t.state == TaskState::Queued {
                    self.queued_since.entry(t.id.clone()).or_insert(since);
                }
            }
        }
    }

    fn orphan_lease(&mut self, key: &str, live: &LiveLease) {
        if live.lease.state == LeaseState::Running {
            // Something runs that no record wants: ask its worker to stop.
            let mut lease = live.lease.clone();
            lease.state = LeaseState::Cancelling;
            lease.reason = Some("no job wants this attempt any more".into());
            self.fx
                .cancel_leases
                .push((key.to_string(), lease, live.rev));
        } else if live.lease.state != LeaseState::Cancelling {
            self.fx.purge_leases.push(key.to_string());
            self.leases.remove(key);
        }
    }

    // ----- placement -----

    /// Builds the snapshot placement works on: adverts, less what every
    /// live lease holds.
    fn snapshot(&self) -> Vec<WorkerView> {
        let mut views: Vec<WorkerView> = self
            .workers
            .values()
            .map(|a| WorkerView {
                name: a.name.clone(),
                labels: a.labels.clone(),
                draining: a.draining,
                capacity: WorkerCapacity::from_advert(a),
            })
            .collect();
        let index: HashMap<WorkerId, usize> = views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
        for live in self.leases.values() {
            let l = &live.lease;
            if matches!(l.state, LeaseState::Rejected | LeaseState::Abandoned) {
                continue;
            }
            let Some(&w) = index.get(&l.worker) else {
                continue;
            };
            views[w].capacity.hold(&l.grant);
        }
        views
    }

    /// A hash of everything placement looks at for one task: two tasks with
    /// the same signature fit (or not) in the same places. `job_part` is
    /// [`Engine::job_signature`] of its job.
    fn task_signature(&self, job: &JobRecord, i: usize, job_part: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        let r = &job.spec.tasks[i].resources;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        job_part.hash(&mut h);
        r.cpus_milli().hash(&mut h);
        r.memory_bytes().hash(&mut h);
        match r.gpu_request() {
            GpuRequest::None => 0u8.hash(&mut h),
            GpuRequest::Whole { count, memory } => (1u8, count, memory).hash(&mut h),
            GpuRequest::Share { memory } => (2u8, memory).hash(&mut h),
        }
        if let Some(list) = self.avoid.get(&job.tasks[i].id) {
            for (w, _) in list {
                w.hash(&mut h);
            }
        }
        h.finish()
    }

    fn job_signature(job: &JobRecord) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        job.spec.constraints.labels.hash(&mut h);
        job.spec.constraints.workers.hash(&mut h);
        h.finish()
    }

    fn request(&self, job: &JobRecord, i: usize) -> TaskRequest {
        let spec = &job.spec.tasks[i];
        let task = &job.tasks[i];
        let now_i = Instant::now();
        TaskRequest {
            cpus_milli: spec.resources.cpus_milli(),
            memory: spec.resources.memory_bytes(),
            gpu: spec.resources.gpu_request(),
            labels: job.spec.constraints.labels.clone(),
            workers: job.spec.constraints.workers.clone(),
            avoid: self
                .avoid
                .get(&task.id)
                .map(|l| {
                    l.iter()
                        .filter(|(_, until)| *until > now_i)
                        .map(|(w, _)| w.clone())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Places queued work in queue order.
    ///
    /// Queue policy: priority, then submission order. Work that does not
    /// fit does not block what is behind it (backfill), except that once the
    /// first waiting task or gang that could fit somewhere has waited
    /// `starvation_after`, the workers it needs are held: no new work is
    /// placed on them until it fits there.
    fn schedule(&mut self) {
        let pass_started = std::time::Instant::now();
        let mut views = self.snapshot();
        let order: Vec<JobId> = self.queue.iter().map(|(_, _, id)| id.clone()).collect();
        // Requests that already failed in this pass fail again (the snapshot
        // only shrinks), so their reason is reused: cheap with many tasks.
        let mut failed: HashMap<u64, String> = HashMap::new();
        let mut placed: Vec<Placed> = Vec::new();
        let mut reasons: Vec<(JobId, usize, String)> = Vec::new();
        let mut dropped: Vec<(JobId, usize, String)> = Vec::new();
        let now_i = Instant::now();
        let starvation = self.cfg.starvation_after.0;
        let mut head_seen = false;
        // The hold is dropped unless its holder is still waiting this pass.
        let hold = self.hold.take();
        let held: Vec<usize> = hold
            .as_ref()
            .map(|h| {
                h.workers
                    .iter()
                    .filter_map(|w| views.iter().position(|v| &v.name == w))
                    .collect()
            })
            .unwrap_or_default();
        let held_draining: Vec<bool> = held.iter().map(|&i| views[i].draining).collect();
        // Closes the held workers to everyone but the holder, and reopens them.
        let mask = |views: &mut Vec<WorkerView>, closed: bool| {
            for (k, &i) in held.iter().enumerate() {
                views[i].draining = held_draining[k] || closed;
            }
        };

        // Reservations made in this pass. A pass makes at most
        // `max_reservations_per_pass`, so that one flush stays a size the
        // server acks well within its timeout; the next pass follows at once.
        let mut budget = self.cfg.max_reservations_per_pass.max(1);
        let mut out_of_budget = false;
        for job_id in order {
            if out_of_budget {
                break;
            }
            let job = &self.jobs[&job_id];
            let queued: Vec<usize> = job
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.state == TaskState::Queued)
                .map(|(i, _)| i)
                .collect();
            if queued.is_empty() {
                continue;
            }
            if job.spec.gang {
                // A gang goes only when none of it still holds resources.
                if job
                    .tasks
                    .iter()
                    .any(|t| matches!(t.state, TaskState::Reserved | TaskState::Running))
                {
                    continue;
                }
                let is_holder = hold.as_ref().is_some_and(|h| h.job == job_id);
                let reqs: Vec<TaskRequest> = queued.iter().map(|&i| self.request(job, i)).collect();
                let min = job
                    .spec
                    .min_tasks
                    .map_or(queued.len(), |m| m as usize)
                    .min(queued.len());
                mask(&mut views, !is_holder);
                let t0 = std::time::Instant::now();
                let p = placement::place_gang(&reqs, min, &mut views);
                self.metrics.placement(t0.elapsed());
                mask(&mut views, false);
                if !p.assigned.is_empty() {
                    budget = budget.saturating_sub(p.assigned.len());
                    out_of_budget = budget == 0;
                    if is_holder {
                        tracing::info!(job_id = %job_id, "the held gang fits now");
                    }
                    let world = p.assigned.len();
                    for u in &p.unplaced {
                        dropped.push((
                            job_id.clone(),
                            queued[u.task],
                            format!(
                                "dropped from this run: the gang started with {world} of {} tasks (min_tasks {min})",
                                queued.len()
                            ),
                        ));
                    }
                    placed.push(Placed::Gang {
                        job: job_id.clone(),
                        members: p
                            .assigned
                            .into_iter()
                            .map(|a| (queued[a.task], a.worker, a.grant))
                            .collect(),
                    });
                    continue;
                }
                let never_fits = p.unplaced.iter().any(|u| u.never_fits);
                let mut reason = p
                    .unplaced
                    .first()
                    .map(|u| u.reason.clone())
                    .unwrap_or_default();
                if is_holder {
                    reason.push_str("; workers are held for it");
                    self.hold = hold.clone();
                } else if !head_seen && !never_fits {
                    head_seen = true;
                    let waited = queued
                        .iter()
                        .filter_map(|&i| self.queued_since.get(&job.tasks[i].id))
                        .min()
                        .map(|s| now_i.duration_since(*s))
                        .unwrap_or_default();
                    if hold.is_none() && self.hold.is_none() && waited >= starvation {
                        let workers = gang_hold_candidates(&reqs, min, &views);
                        if !workers.is_empty() {
                            tracing::info!(job_id = %job_id, ?workers, "holding workers for a starving gang");
                            self.hold = Some(Hold {
                                job: job_id.clone(),
                                task: None,
                                workers,
                            });
                        }
                    }
                }
                for &i in &queued {
                    reasons.push((job_id.clone(), i, reason.clone()));
                }
                continue;
            }
            let job_part = Self::job_signature(job);
            for &i in &queued {
                if budget == 0 {
                    out_of_budget = true;
                    break;
                }
                let is_holder = hold
                    .as_ref()
                    .is_some_and(|h| h.job == job_id && h.task == Some(i));
                let sig = self.task_signature(job, i, job_part);
                if !is_holder {
                    if let Some(reason) = failed.get(&sig) {
                        if job.tasks[i].reason.as_deref() != Some(reason.as_str()) {
                            reasons.push((job_id.clone(), i, reason.clone()));
                        }
                        continue;
                    }
                }
                let req = self.request(job, i);
                mask(&mut views, !is_holder);
                let t0 = std::time::Instant::now();
                let p = placement::place(std::slice::from_ref(&req), &mut views);
                self.metrics.placement(t0.elapsed());
                mask(&mut views, false);
                if let Some(a) = p.assigned.into_iter().next() {
                    budget -= 1;
                    placed.push(Placed::Task {
                        job: job_id.clone(),
                        index: i,
                        worker: a.worker,
                        grant: a.grant,
                    });
                    continue;
                }
                let u = p
                    .unplaced
                    .into_iter()
                    .next()
                    .expect("one task, one outcome");
                let mut reason = u.reason.clone();
                if is_holder {
                    reason.push_str("; a worker is held for it");
                    self.hold = hold.clone();
                } else {
                    // The first waiting task that could fit somewhere, once it
                    // has waited long enough, gets a worker held for it.
                    if !head_seen && !u.never_fits {
                        head_seen = true;
                        let waited = self
                            .queued_since
                            .get(&job.tasks[i].id)
                            .map(|s| now_i.duration_since(*s))
                            .unwrap_or_default();
                        if hold.is_none() && self.hold.is_none() && waited >= starvation {
                            if let Some(w) = hold_candidate(&req, &views) {
                                tracing::info!(task_id = %job.tasks[i].id, worker = %w, "holding a worker for a starving task");
                                self.hold = Some(Hold {
                                    job: job_id.clone(),
                                    task: Some(i),
                                    workers: vec![w],
                                });
                            }
                        }
                    }
                    failed.insert(sig, u.reason);
                }
                reasons.push((job_id.clone(), i, reason));
            }
        }

        let mut touched: HashSet<JobId> = HashSet::new();
        for (job, i, reason) in reasons {
            let j = self.jobs.get_mut(&job).expect("job");
            if j.tasks[i].reason.as_deref() != Some(reason.as_str()) {
                j.tasks[i].reason = Some(reason);
                touched.insert(job);
            }
        }
        for (job, i, reason) in dropped {
            let t = &mut self.jobs.get_mut(&job).expect("job").tasks[i];
            t.state = TaskState::Cancelled;
            t.dropped = true;
            t.finished_at = Some(now());
            t.reason = Some(reason.clone());
            self.emit_state(&job, i, Some(reason));
            touched.insert(job);
        }
        let names: Vec<WorkerId> = views.iter().map(|v| v.name.clone()).collect();
        let placed_count = placed.len();
        for p in placed {
            match p {
                Placed::Task {
                    job,
                    index,
                    worker,
                    grant,
                } => {
                    self.reserve(&job, index, names[worker].clone(), grant, None);
                    touched.insert(job);
                }
                Placed::Gang { job, mut members } => {
                    members.sort_by_key(|(i, _, _)| *i);
                    let master = names[members[0].1].clone();
                    let addr = self
                        .workers
                        .get(&master)
                        .and_then(|a| a.addr.clone())
                        .unwrap_or_else(|| "127.0.0.1".into());
                    let port = self.free_rendezvous_port(&master);
                    let world = members.len() as u32;
                    for (rank, (i, w, grant)) in members.into_iter().enumerate() {
                        let rv = Rendezvous {
                            rank: rank as u32,
                            world_size: world,
                            master_addr: addr.clone(),
                            master_port: port,
                        };
                        self.reserve(&job, i, names[w].clone(), grant, Some(rv));
                    }
                    touched.insert(job);
                }
            }
        }
        for job in touched {
            self.update_job_reason(&job);
            self.touch(&job);
        }
        self.metrics.pass(pass_started.elapsed(), placed_count);
        if out_of_budget {
            self.wants_schedule = true;
        }
    }

    /// A port from the master worker's rendezvous range that no live gang
    /// with its rank 0 there uses.
    fn free_rendezvous_port(&self, master: &WorkerId) -> u16 {
        let (lo, hi) = self
            .workers
            .get(master)
            .and_then(|a| a.rendezvous_ports)
            .unwrap_or((29500, 29999));
        let used: HashSet<u16> = self
            .leases
            .values()
            .filter(|l| &l.lease.worker == master)
            .filter_map(|l| l.lease.rendezvous.as_ref())
            .filter(|r| r.rank == 0)
            .map(|r| r.master_port)
            .collect();
        // Start at a random place in the range: other fleets (or a port a
        // worker refused as busy) are then unlikely to be met again.
        let span = u32::from(hi - lo) + 1;
        let start = (random_u64() % u64::from(span)) as u32;
        (0..span)
            .map(|k| lo + ((start + k) % span) as u16)
            .find(|p| !used.contains(p))
            .unwrap_or(lo)
    }

    /// Creates the reservation for one task on one worker.
    fn reserve(
        &mut self,
        job: &JobId,
        i: usize,
        worker: WorkerId,
        grant: gpufleet_schema::Grant,
        rendezvous: Option<Rendezvous>,
    ) {
        let lease_ttl = self.cfg.lease_ttl;
        let j = self.jobs.get_mut(job).expect("job");
        let spec = j.spec.tasks[i].clone();
        let t = &mut j.tasks[i];
        t.state = TaskState::Reserved;
        t.worker = Some(worker.clone());
        t.grant = Some(grant.clone());
        t.reason = None;
        let key = subjects::lease_key(&worker, &t.id, t.attempt);
        let lease = Lease {
            job_id: job.clone(),
            task_id: t.id.clone(),
            attempt: t.attempt,
            worker,
            state: LeaseState::Reserved,
            reason: None,
            task: spec,
            grant,
            rendezvous,
            lease_ttl,
            instance: None,
            reserved_at: now(),
        };
        // Counted as live at once, so the next pass does not place on
        // capacity this reservation already holds; the watch confirms it.
        self.leases.insert(
            key.clone(),
            LiveLease {
                rev: 0,
                lease: lease.clone(),
            },
        );
        self.fx.create_leases.push((key, lease));
        self.emit_state(job, i, None);
    }

    fn update_job_reason(&mut self, job: &JobId) {
        let j = self.jobs.get_mut(job).expect("job");
        if j.status.is_finished() {
            return;
        }
        // A waiting job says why its first waiting task waits.
        j.reason = j
            .tasks
            .iter()
            .find(|t| t.state == TaskState::Queued)
            .and_then(|t| t.reason.clone());
    }

    // ----- bookkeeping -----

    /// Marks a job changed: status re-derived, record to be written, and
    /// off the queue once finished.
    fn touch(&mut self, job: &JobId) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        let key = queue_key(j);
        j.derive_status(now());
        if j.status.is_finished() {
            self.queue.remove(&key);
            for t in &j.tasks {
                self.queued_since.remove(&t.id);
                self.avoid.remove(&t.id);
            }
        } else {
            self.update_job_reason(job);
        }
        self.fx.put_jobs.insert(job.clone());
    }

    fn state_event(&self, job: &JobId, i: usize, reason: Option<String>) -> (String, Event) {
        let t = &self.jobs[job].tasks[i];
        let event = Event {
            job_id: job.clone(),
            task_id: t.id.clone(),
            attempt: t.attempt,
            worker: None,
            lease_rev: None,
            at: now(),
            body: EventBody::State {
                state: t.state,
                reason,
            },
        };
        (
            subjects::events(job, &t.id, gpufleet_schema::EventKind::State),
            event,
        )
    }

    fn emit_state(&mut self, job: &JobId, i: usize, reason: Option<String>) {
        let ev = self.state_event(job, i, reason);
        self.fx.events.push(ev);
    }
}

/// A random number from the std hasher's per-process random keys: enough
/// to spread port choices, without a RNG dependency.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Whether a new advert changes what placement sees of a worker. Small
/// swings in other processes' GPU memory (under 256 MiB) are ignored.
fn capacity_changed(old: &WorkerAdvert, new: &WorkerAdvert) -> bool {
    const NOISE: u64 = 256 << 20;
    old.instance != new.instance
        || old.draining != new.draining
        || old.cpus_milli != new.cpus_milli
        || old.memory_total != new.memory_total
        || old.labels != new.labels
        || old.gpus.len() != new.gpus.len()
        || old.gpus.iter().zip(&new.gpus).any(|(a, b)| {
            a.uuid != b.uuid
                || a.memory_total != b.memory_total
                || a.memory_unmanaged.0.abs_diff(b.memory_unmanaged.0) > NOISE
        })
}

fn queue_key(j: &JobRecord) -> (std::cmp::Reverse<i32>, u64, JobId) {
    (std::cmp::Reverse(j.spec.priority), j.seq, j.id.clone())
}

/// The worker to hold for a starving task: one that could hold it were it
/// empty, with the least of the task's kind of resource in use now.
fn hold_candidate(req: &TaskRequest, views: &[WorkerView]) -> Option<WorkerId> {
    views
        .iter()
        .filter(|v| !v.draining)
        .filter(|v| {
            let mut empty = (*v).clone();
            empty.cpus_free_milli = empty.cpus_total_milli;
            empty.memory_free = empty.memory_total;
            for g in &mut empty.gpus {
                g.exclusive = false;
                g.shares = 0;
                g.memory_free = g.memory_total;
            }
            !placement::place(std::slice::from_ref(req), &mut [empty])
                .assigned
                .is_empty()
        })
        .min_by_key(|v| match req.gpu {
            GpuRequest::None => v.cpus_total_milli - v.cpus_free_milli,
            _ => v
                .gpus
                .iter()
                .filter(|g| g.exclusive || g.shares > 0)
                .count() as u64,
        })
        .map(|v| v.name.clone())
}

/// The workers to hold for a starving gang: those it would use were they
/// empty, preferring the least busy.
fn gang_hold_candidates(reqs: &[TaskRequest], min: usize, views: &[WorkerView]) -> Vec<WorkerId> {
    let mut empty: Vec<WorkerView> = views
        .iter()
        .filter(|v| !v.draining)
        .map(|v| {
            let mut e = v.clone();
            e.cpus_free_milli = e.cpus_total_milli;
            e.memory_free = e.memory_total;
            for g in &mut e.gpus {
                g.exclusive = false;
                g.shares = 0;
                g.memory_free = g.memory_total;
            }
            e
        })
        .collect();
    let p = placement::place_gang(reqs, min, &mut empty);
    let mut out: Vec<WorkerId> = p
        .assigned
        .iter()
        .map(|a| empty[a.worker].name.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Encodes a reply in the request's encoding: `(error code, body)`.
pub fn encode_reply(reply: &Reply, enc: Encoding) -> (Option<u16>, Vec<u8>) {
    let body = match reply {
        Reply::Submit(r) => enc.encode(r),
        Reply::Job(r) => enc.encode(r),
        Reply::Jobs(r) => enc.encode(r),
        Reply::Workers(r) => enc.encode(r),
        Reply::Error { code, message } => {
            let body = enc.encode(&gpufleet_schema::api::ErrorBody {
                error: message.clone(),
            });
            return (Some(*code), body.unwrap_or_default());
        }
    };
    match body {
        Ok(b) => (None, b),
        Err(e) => {
            let msg = gpufleet_schema::api::ErrorBody {
                error: format!("cannot encode the reply: {e}"),
            };
            (
                Some(code::INTERNAL),
                Encoding::Json.encode(&msg).unwrap_or_default(),
            )
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
