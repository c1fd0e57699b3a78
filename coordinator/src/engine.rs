//! The coordinator's one owner of state.
//!
//! Every input (API calls, worker adverts, lease changes, task results,
//! ticks) goes through [`Engine::handle`], which changes the state and
//! records what must happen outside as [`Effects`]. Nothing in here touches
//! NATS, reads a clock or blocks, so it is tested without a server and
//! without waiting: time comes in with each input ([`Now`]) and random
//! choices from a seeded [`Rng`]. `runtime.rs` feeds it and carries out
//! its effects. Handlers are idempotent: any input may come twice (a replay
//! after restart, a redelivered watch entry) and the outcome is the same.
//!
//! The state is split by owner, each with its own transitions:
//! - `jobs`: the job table. A task's transitions (reserve, start, end,
//!   retry, requeue, cancel, drop) are methods of its record in
//!   `state.rs`, each deciding every field it resets.
//! - `leases`: the lease book: worker adverts, live leases (reservations
//!   in flight included), released attempts awaiting their result; it
//!   builds the snapshot placement works on.
//! - `queue`: the queue policy: order, starvation holds, the avoid window
//!   and the pass budget.
//!
//! The engine's own code joins them: this file takes inputs and answers
//! the API; `lifecycle` turns lease changes, results and ticks into task
//! transitions (gangs break and settle there, and start-up reconciles);
//! `schedule` runs a placement pass in named phases; `health` keeps track
//! of JetStream outages, during which nothing is declared lost; `alive`
//! keeps the promises made to workers heard alive over core NATS.
//!
//! Finished jobs leave the engine once their record is stored (`Moved`);
//! what it no longer holds, the runtime reads from the jobs bucket when a
//! client asks ([`Fetch`]).

use gpufleet_schema::api::{code, ErrorsReply, SubmitReply};
use gpufleet_schema::policy::SchedPolicy;
use gpufleet_schema::{
    subjects, Encoding, Event, EventBody, JobId, JobSpec, JobState, JobStatus, Lease, LeaseKey,
    Sender, TaskState, UserId, WorkerAdvert, WorkerId,
};
use std::collections::BTreeSet;
use tokio::sync::oneshot;

mod alive;
mod clock;
mod deps;
mod fairshare;
mod health;
mod jobs;
mod leases;
mod lifecycle;
mod preempt;
mod queue;
mod retry;
mod schedule;
mod talk;
mod twophase;

pub use clock::{Now, Rng};
pub use queue::AVOID_FOR;
pub use talk::{sent as talk_sent, undeliverable, AfterPost, Post};

use crate::config::CoordinatorConfig;
use crate::metrics::{job_state_index, task_state_index, InputKind, Metrics, Observed};
use crate::state::JobRecord;
use health::Health;
use jobs::JobTable;
use leases::{LeaseBook, LiveLease};
use queue::QueuePolicy;

/// A reply to an API call, before encoding.
#[derive(Debug)]
pub enum Reply {
    Submit(SubmitReply),
    Job(Box<JobStatus>),
    Jobs(Vec<JobStatus>),
    Workers(Vec<WorkerAdvert>),
    Errors(Box<ErrorsReply>),
    Sent(Box<gpufleet_schema::message::SendReply>),
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

/// Who makes an API call: the user the request's subject names (the NATS
/// permissions make sure it is the caller's own), and whether it sees and
/// acts on every job (an admin, or anyone while roles are off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    pub admin: bool,
}

impl Caller {
    /// The one user everybody is while roles are off: sees everything.
    pub fn everyone() -> Caller {
        Caller {
            user: UserId::default_user(),
            admin: true,
        }
    }

    /// Whether this caller may see and act on a job of `owner`'s.
    pub fn sees(&self, owner: &UserId) -> bool {
        self.admin || &self.user == owner
    }
}

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
    /// Cancels one task of a job (by id or name).
    CancelTask {
        job: JobId,
        task: String,
    },
    /// Runs a job's ended tasks again (one, by id or name), reopening a
    /// finished job (see `retry.rs`).
    Retry {
        job: JobId,
        task: Option<String>,
    },
    Delete(JobId),
    Workers {
        after: Option<WorkerId>,
        limit: usize,
    },
    /// A job's errors; `reset` clears them.
    Errors {
        job: JobId,
        reset: bool,
    },
    /// A message to a job's running tasks (checked on decoding).
    Send(Box<gpufleet_schema::message::SendRequest>),
}

/// What to do with a job the engine no longer holds, once its done record
/// is read from the jobs bucket.
#[derive(Debug)]
pub enum Fetch {
    /// Answer `jobs.get` with it (404 if there is none).
    Get {
        offset: usize,
        limit: usize,
        tx: ReplyTx,
    },
    /// Answer `jobs.cancel`: a finished job stays as it is.
    Cancel(ReplyTx),
    /// Delete it and its events (404 if there is none).
    Delete(ReplyTx),
    /// Answer `jobs.errors` (and with `reset`, clear them in the record).
    Errors { reset: bool, tx: ReplyTx },
    /// Answer `jobs.send`: a finished job runs nothing (404 if there is
    /// none).
    Send(ReplyTx),
    /// Reopen it for `jobs.retry` (`Input::Reopen`).
    Retry { task: Option<String>, tx: ReplyTx },
}

/// A change in `gpufleet-leases`, as the watcher saw it. Keys come as the
/// KV holds them; the engine parses each once, on the way in.
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
    Api(ApiCall, Caller, ReplyTx),
    Advert(Box<WorkerAdvert>),
    /// A worker's advert is gone: `expired` when its TTL ran out (it
    /// stopped heartbeating), not when it was removed (a clean exit).
    WorkerGone {
        name: WorkerId,
        expired: bool,
    },
    Lease(LeaseChange),
    /// A worker asked to be heard alive (over core NATS, its advert
    /// writes failing) and is answered: promised `ttl` from `heard`.
    Alive {
        worker: WorkerId,
        heard: std::time::Instant,
        ttl: std::time::Duration,
    },
    /// A result event, with its stream sequence and who sent it (from
    /// its subject, which the server vouches for; its body was checked
    /// against the subject).
    Result {
        seq: u64,
        event: Box<Event>,
        sender: Sender,
    },
    /// A message a task wrote to its outbox (a `message` event), with who
    /// sent it (from its subject; the body was checked against it).
    Message {
        event: Box<Event>,
        sender: Sender,
    },
    /// A reservation we tried to create could not be.
    LeaseCreateFailed {
        key: String,
        error: String,
    },
    /// A job record could not be written; write it again.
    Persist(JobId),
    /// A new job's record is stored: its tasks may run.
    Stored(JobId),
    /// A new job's record could not be stored: the job is forgotten (its
    /// submit was answered 503, and nothing of it ran).
    NotStored(JobId),
    /// A finished job's done record is stored and its active one removed:
    /// it leaves memory.
    Moved(JobId),
    /// A finished job's record was deleted.
    Deleted(JobId),
    /// A finished job's done record, read for `jobs.retry` (whose caller
    /// sees it): it runs again.
    Reopen {
        job: Box<JobRecord>,
        task: Option<String>,
        caller: Caller,
        tx: ReplyTx,
    },
    /// A new job's client-chosen id turned out to be a finished job's
    /// (see `JobRecord::verify`): the new one is forgotten, nothing of it
    /// having run, and its submit was answered from the finished one.
    Duplicate(JobId),
    /// A feed's consumer failed (its stream lost its leader, its server
    /// node died) or is back.
    FeedDown(Feed),
    FeedUp(Feed),
    /// The results follower now lags behind the stream (results were
    /// stored after the one it last delivered), or has caught up.
    ResultsBehind(bool),
    /// A start-up feed has delivered everything that existed. Sent through
    /// the same channel as the feed's changes, so it comes after them.
    Synced(Feed),
    Tick,
    /// A retry's pause has ended: time to place again.
    Wake,
    /// The scheduling policy key was written (a checked policy), or
    /// removed (`None`: back to the settings').
    Policy(Option<Box<SchedPolicy>>),
    /// Prometheus scrapes: set the state-derived gauges, then say so.
    Observe(oneshot::Sender<()>),
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
    /// Jobs to read from the jobs bucket, and what to do with them.
    pub fetches: Vec<(JobId, Caller, Fetch)>,
    /// The result sequence the records reflect, to store once they are.
    pub checkpoint: Option<u64>,
    /// Messages for running tasks, to hand their workers (see `talk`).
    pub posts: Vec<talk::Post>,
    /// Loaded two-phase tasks' GPU grants: compare-and-set the lease (key,
    /// new value, expected rev), signing its `gpu_grant` (see `twophase`).
    pub grant_leases: Vec<(String, Lease, u64)>,
    /// Finished jobs reopened by a retry, with how many parts their done
    /// record has: it is removed once the active record is stored.
    pub reopened: Vec<(JobId, usize)>,
}

impl Effects {
    /// Asks the holder of a running lease to stop, by writing CANCELLING
    /// over the revision we know.
    fn cancel_lease(&mut self, key: &LeaseKey, live: &LiveLease, reason: String) {
        let (lease, rev) = live.cancelling(reason);
        self.cancel_leases.push((key.to_string(), lease, rev));
    }

    pub fn is_empty(&self) -> bool {
        self.put_jobs.is_empty()
            && self.create_leases.is_empty()
            && self.cancel_leases.is_empty()
            && self.purge_leases.is_empty()
            && self.events.is_empty()
            && self.replies.is_empty()
            && self.fetches.is_empty()
            && self.checkpoint.is_none()
            && self.posts.is_empty()
            && self.grant_leases.is_empty()
            && self.reopened.is_empty()
    }
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

pub struct Engine {
    cfg: CoordinatorConfig,
    jobs: JobTable,
    book: LeaseBook,
    queue: QueuePolicy,
    /// Fair-share weights and quotas in force.
    shares: fairshare::Shares,
    fx: Effects,
    /// Highest result sequence applied to the in-memory table.
    applied_seq: u64,
    pub readiness: Readiness,
    ready: bool,
    /// Something changed that placement should look at.
    wants_schedule: bool,
    metrics: Metrics,
    /// The time of the input being handled.
    now: Now,
    rng: Rng,
    /// The most bytes one part of a stored record may take.
    part_budget: usize,
    health: Health,
    /// Loaded two-phase tasks waiting for their GPUs.
    waits: twophase::GpuWaits,
    /// Workers heard alive while their adverts could not be stored.
    promises: alive::Promises,
    /// Whether a pass takes its shortcuts: a job's tasks alike wait as
    /// soon as one of them did not fit, and a task is placed through the
    /// pass's index of workers (see `schedule.rs`). Off only in the test
    /// that checks they change nothing.
    shortcuts: bool,
}

/// Parts of stored records are at most this large unless the server's
/// `max_payload` asks for less.
pub const PART_BUDGET: usize = 256 * 1024;

impl Engine {
    /// An empty engine at `now`; `seed` makes all of its random choices.
    /// No trace of an earlier leader was found when this one took over
    /// (see `alive::Promises::no_predecessor`).
    pub fn no_predecessor(&mut self, trace_life: std::time::Duration) {
        self.promises.no_predecessor(trace_life);
    }

    pub fn new(cfg: CoordinatorConfig, now: Now, seed: u64) -> Engine {
        let cfg_lease_ttl = cfg.lease_ttl.0;
        let leader_ttl = cfg.leader_ttl.0;
        Engine {
            queue: QueuePolicy::new(&cfg),
            shares: fairshare::Shares::new(cfg.scheduling.clone()),
            cfg,
            jobs: JobTable::new(),
            book: LeaseBook::default(),
            fx: Effects::default(),
            applied_seq: 0,
            readiness: Readiness::default(),
            ready: false,
            wants_schedule: true,
            metrics: Metrics::default(),
            now,
            rng: Rng::new(seed),
            part_budget: PART_BUDGET,
            health: Health::new(cfg_lease_ttl),
            waits: twophase::GpuWaits::default(),
            promises: alive::Promises::new(now.mono, crate::leader::promise_reach(leader_ttl)),
            shortcuts: true,
        }
    }

    /// Fair share and quotas follow `policy` from now on (the settings'
    /// for `None`); work already running stays.
    pub fn set_policy(&mut self, policy: Option<SchedPolicy>) {
        let policy = policy.unwrap_or_else(|| self.cfg.scheduling.clone());
        if &policy != self.shares.policy() {
            tracing::info!(?policy, "the scheduling policy changed");
            self.shares = fairshare::Shares::new(policy);
            self.wants_schedule = true;
        }
    }

    /// Parts of stored records are at most `bytes` (from the server's
    /// `max_payload`).
    pub fn set_part_budget(&mut self, bytes: usize) {
        self.part_budget = bytes;
    }

    /// Remembers a finished job read at start-up, for `jobs.list`.
    pub fn restore_finished(&mut self, seq: u64, summary: JobStatus) {
        self.jobs.remember_finished(seq, summary);
    }

    /// Forgets a finished job that was deleted or expired.
    pub fn forget_finished(&mut self, job: &JobId) {
        self.jobs.forget(job);
    }

    /// Writes a job's record again (taken in from an earlier version's).
    pub fn rewrite(&mut self, job: &JobId) {
        self.fx.put_jobs.insert(job.clone());
    }

    /// How many jobs are held in memory (not counting the window of
    /// recently finished ones).
    pub fn jobs_in_memory(&self) -> usize {
        self.jobs.len()
    }

    /// When the engine next has something to do on its own (a retry whose
    /// pause ends), if earlier than the next tick.
    pub fn next_wakeup(&self) -> Option<std::time::Instant> {
        self.queue.next_due()
    }

    /// Loads a persisted job at start-up. A finished one (whose move to
    /// the done records was cut short) is written again, and moves.
    pub fn restore_job(&mut self, mut job: JobRecord) {
        job.stored = true;
        if job.status.is_finished() {
            self.fx.put_jobs.insert(job.id.clone());
        } else {
            self.queue.enqueue(&job);
        }
        self.jobs.restore(job);
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

    /// The engine, counting into `metrics` (shared with what serves them).
    pub fn with_metrics(mut self, metrics: Metrics) -> Engine {
        self.metrics = metrics;
        self
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

    /// Handles one input that arrived at `now`.
    pub fn handle(&mut self, input: Input, now: Now) {
        self.now = now;
        self.metrics.input(match &input {
            Input::Advert(_) | Input::WorkerGone { .. } | Input::Alive { .. } => InputKind::Advert,
            Input::Lease(_) => InputKind::Lease,
            Input::Result { .. } => InputKind::Result,
            Input::Api(..) => InputKind::Api,
            _ => InputKind::Other,
        });
        match input {
            Input::Api(call, caller, tx) => self.api(call, caller, tx),
            Input::Advert(advert) => {
                self.promises.advertised(&advert.name);
                let lifted = self.queue.lift_avoid(&advert.name);
                // Most heartbeats change nothing placement looks at; only
                // those that do are worth a pass over the queue.
                if self.book.advert(*advert, self.now.mono) || lifted {
                    self.wants_schedule = true;
                }
            }
            Input::WorkerGone { name, expired } => self.worker_gone(&name, expired),
            Input::Alive { worker, heard, ttl } => self.promises.heard(worker, heard, ttl),
            Input::Lease(change) => self.lease_change(change),
            Input::Result { seq, event, sender } => {
                self.result(*event, &sender, seq);
                self.applied_seq = self.applied_seq.max(seq);
            }
            Input::Message { event, sender } => self.route(*event, &sender),
            Input::LeaseCreateFailed { key, error } => self.lease_create_failed(&key, &error),
            Input::Persist(job) => {
                if self.jobs.get(&job).is_some() {
                    self.fx.put_jobs.insert(job);
                }
            }
            Input::Stored(job) => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.stored = true;
                }
            }
            Input::NotStored(job) => self.not_stored(&job),
            Input::Moved(job) => {
                if self.jobs.get(&job).is_some_and(|j| j.status.is_finished()) {
                    self.jobs.retire(&job);
                }
            }
            Input::Deleted(job) => self.jobs.forget(&job),
            Input::Reopen {
                job,
                task,
                caller,
                tx,
            } => self.reopen(*job, task, caller, tx),
            Input::Duplicate(job) => self.not_stored(&job),
            Input::FeedDown(feed) => self.health.down(feed, self.now.mono),
            Input::ResultsBehind(behind) => self.health.set_results_behind(behind),
            Input::FeedUp(feed) => {
                self.health.up(feed, self.now.mono);
                if feed == Feed::Events {
                    // Results could not arrive meanwhile: the wait for
                    // those of released leases starts again.
                    self.book.restart_released_clocks(self.now.mono);
                }
            }
            Input::Synced(feed) => self.set_readiness(|r| match feed {
                Feed::Workers => r.workers_synced = true,
                Feed::Leases => r.leases_synced = true,
                Feed::Events => r.events_caught_up = true,
            }),
            Input::Tick => self.tick(),
            Input::Wake => self.wants_schedule = true,
            Input::Policy(p) => self.set_policy(p.map(|p| *p)),
            Input::Observe(done) => {
                self.metrics.observed(&self.observe());
                let _ = done.send(());
            }
        }
    }

    /// The figures Prometheus asks for that are views of the state: jobs
    /// by status, tasks by state, the queue, workers by state. Computed
    /// only when asked (a scrape), so the hot path keeps no counts for it.
    pub fn observe(&self) -> Observed {
        let mut o = Observed::default();
        let mut waiting = Vec::new();
        for (_, j) in self.jobs.iter() {
            o.jobs[job_state_index(j.status)] += 1;
            for t in &j.tasks {
                o.tasks[task_state_index(t.state)] += 1;
                if t.state == TaskState::Queued {
                    waiting.push(&t.id);
                }
            }
        }
        // Finished jobs leave the table once stored; those of the window
        // still count, so that a job's end shows in its status series.
        for s in self.jobs.recent() {
            o.jobs[job_state_index(s.status)] += 1;
        }
        o.queue_length = waiting.len() as i64;
        o.oldest_wait = self
            .queue
            .waiting_since(waiting)
            .map(|since| self.now.mono.saturating_duration_since(since))
            .unwrap_or_default();
        let held = self
            .queue
            .hold()
            .map(|h| h.workers.as_slice())
            .unwrap_or(&[]);
        for w in self.book.workers() {
            if w.draining {
                o.workers_draining += 1;
            } else if held.contains(&w.name) {
                o.workers_held += 1;
            } else {
                o.workers_ready += 1;
            }
        }
        o
    }

    /// Runs placement at `now` if anything changed since the last time.
    pub fn schedule_if_needed(&mut self, now: Now) {
        self.now = now;
        if self.ready && self.wants_schedule {
            self.wants_schedule = false;
            self.schedule();
        }
    }

    // ----- API -----

    fn api(&mut self, call: ApiCall, caller: Caller, tx: ReplyTx) {
        match call {
            ApiCall::Submit(spec) => self.submit(*spec, caller, tx),
            ApiCall::Get { job, offset, limit } => match self.jobs.get(&job) {
                Some(j) if j.stored && caller.sees(&j.owner) => {
                    let mut page = j.page(offset, limit);
                    for (s, t) in page.tasks.iter_mut().zip(j.tasks.iter().skip(offset)) {
                        // A running task's usage so far is in its worker's
                        // latest advert.
                        if t.state == TaskState::Running {
                            s.usage = t
                                .worker
                                .as_ref()
                                .and_then(|w| self.book.worker(w))
                                .and_then(|a| a.usage.get(&t.id))
                                .cloned();
                        }
                    }
                    self.fx.replies.push((tx, Reply::Job(Box::new(page)), None));
                }
                // Another user's job is not found either (its id tells
                // nobody else anything); a finished one no longer held is
                // read from the store, where its owner is checked too.
                Some(j) if j.stored => self.fx.replies.push((tx, not_found(&job), None)),
                _ => self
                    .fx
                    .fetches
                    .push((job, caller, Fetch::Get { offset, limit, tx })),
            },
            ApiCall::List { status, limit } => {
                let list = self.jobs.newest(status, limit, &caller);
                self.fx.replies.push((tx, Reply::Jobs(list), None));
            }
            ApiCall::Cancel(id) => self.cancel(id, caller, tx),
            ApiCall::CancelTask { job, task } => self.cancel_task(job, task, caller, tx),
            ApiCall::Retry { job, task } => self.retry(job, task, caller, tx),
            ApiCall::Delete(id) => self.delete(id, caller, tx),
            ApiCall::Errors { job, reset } => self.errors(job, reset, caller, tx),
            ApiCall::Send(req) => self.send(*req, caller, tx),
            ApiCall::Workers { after, limit } => {
                let mut list = self.book.workers_page(after, limit);
                // What runs where is only the caller's business for its
                // own jobs.
                let visible = |t: &gpufleet_schema::TaskId| {
                    self.jobs
                        .find_task(t)
                        .is_some_and(|(job, _)| caller.sees(&self.jobs[&job].owner))
                };
                let mut held = self
                    .book
                    .gpu_holders(&list.iter().map(|w| &w.name).collect());
                let starving = self
                    .queue
                    .hold()
                    .map(|h| h.workers.as_slice())
                    .unwrap_or(&[]);
                for w in &mut list {
                    w.held = starving.contains(&w.name);
                    w.running.retain(|t| visible(t));
                    w.usage.retain(|t, _| visible(t));
                    for g in &mut w.gpus {
                        g.held_by = held
                            .remove(&(w.name.clone(), g.uuid.clone()))
                            .unwrap_or_default();
                        g.held_by.retain(|t| visible(t));
                    }
                }
                self.fx.replies.push((tx, Reply::Workers(list), None));
            }
        }
    }

    fn submit(&mut self, mut spec: JobSpec, caller: Caller, tx: ReplyTx) {
        // Array templates become their tasks here: the job stored and run
        // is plain tasks (a resubmit compares the same way).
        match spec.validate().and_then(|()| spec.expand()) {
            Ok(expanded) => spec = expanded,
            Err(e) => {
                self.fx
                    .replies
                    .push((tx, Reply::error(code::BAD_REQUEST, e.to_string()), None));
                return;
            }
        }
        let Some(id) = spec.id.clone() else {
            // A fresh id is nobody's yet.
            let id = self.new_job_id();
            spec.id = Some(id);
            return self.create(spec, caller, tx, false);
        };
        if let Some(existing) = self.jobs.get(&id) {
            if existing.owner != caller.user {
                // Ids are one namespace: someone else's is taken.
                let reply = Reply::error(
                    code::CONFLICT,
                    format!("job id {id} is taken; choose another id"),
                );
                self.fx.replies.push((tx, reply, None));
                return;
            }
            return self.resubmit(spec, tx);
        }
        // The id may belong to a finished job no longer held: the runtime
        // looks it up beside the new record's first write, and nothing of
        // the job runs unless it is new.
        self.create(spec, caller, tx, true)
    }

    /// A submit whose id the table holds: the same spec is the same job.
    fn resubmit(&mut self, spec: JobSpec, tx: ReplyTx) {
        let id = spec.id.clone().expect("a resubmit names its job");
        let existing = &self.jobs[&id];
        let reply = if existing.same_spec(&spec) {
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
        let wait = (!existing.stored).then(|| id.clone());
        self.fx.replies.push((tx, reply, wait));
    }

    /// Takes a new job in; its tasks may be placed at once, but nothing of
    /// it runs before its record is stored (and, for a client-chosen id,
    /// before the id is known to be nobody's: `verify`).
    fn create(&mut self, spec: JobSpec, caller: Caller, tx: ReplyTx, verify: bool) {
        // Checked for a new job only: a resubmit of one that exists is
        // answered from it, even once what it waited for is forgotten.
        if let Err(e) = self.check_deps(&spec, &caller) {
            self.fx
                .replies
                .push((tx, Reply::error(code::BAD_REQUEST, e), None));
            return;
        }
        let id = spec.id.clone().expect("an id was chosen");
        let parts = match crate::store::plan_parts(&spec, self.part_budget) {
            Ok(p) => p,
            Err(too_large) => {
                let reply = Reply::error(code::PAYLOAD_TOO_LARGE, too_large.to_string());
                self.fx.replies.push((tx, reply, None));
                return;
            }
        };
        let job = self.jobs.add(id.clone(), caller.user, spec, self.now.wall);
        job.parts = parts;
        job.verify = verify;
        let job = &self.jobs[&id];
        for t in &job.tasks {
            self.queue.queued(&t.id, self.now.mono);
        }
        self.queue.enqueue(job);
        let status = job.status;
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

    /// A new job's first write failed (or its id was taken): it is
    /// forgotten, with whatever was reserved for it in the same batch
    /// (those reservations were never created: see the runtime).
    fn not_stored(&mut self, id: &JobId) {
        let Some(job) = self.jobs.drop_unstored(id) else {
            return;
        };
        self.queue.dequeue(&job);
        for t in &job.tasks {
            if let Some(w) = &t.worker {
                self.book.remove(&subjects::lease_key(w, &t.id, t.attempt));
            }
        }
        self.wants_schedule = true;
    }

    /// A fresh job id in the form `JobId::generate` makes (a UUIDv7 in
    /// hex), from the input's time and the engine's randomness.
    fn new_job_id(&mut self) -> JobId {
        let millis = (self.now.wall.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let mut random = [0u8; 10];
        random[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
        random[8..].copy_from_slice(&self.rng.next_u64().to_le_bytes()[..2]);
        let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
        JobId::new(uuid.simple().to_string()).expect("32 hex digits are a valid job id")
    }

    /// `tx` back if the engine holds job `id` for `caller`; otherwise
    /// answers it: 404 for another user's job, and one no longer held is
    /// read from the store (`fetch`).
    fn held_for(
        &mut self,
        id: &JobId,
        caller: &Caller,
        tx: ReplyTx,
        fetch: impl FnOnce(ReplyTx) -> Fetch,
    ) -> Option<ReplyTx> {
        match self.jobs.get(id).filter(|j| j.stored) {
            Some(j) if caller.sees(&j.owner) => return Some(tx),
            Some(_) => self.fx.replies.push((tx, not_found(id), None)),
            None => self
                .fx
                .fetches
                .push((id.clone(), caller.clone(), fetch(tx))),
        }
        None
    }

    fn cancel(&mut self, id: JobId, caller: Caller, tx: ReplyTx) {
        let Some(tx) = self.held_for(&id, &caller, tx, Fetch::Cancel) else {
            return;
        };
        let job = self.jobs.job_mut(&id);
        if job.request_cancel() {
            let mut to_stop = Vec::new();
            let mut ended = Vec::new();
            for (i, t) in job.tasks.iter_mut().enumerate() {
                match t.state {
                    TaskState::Queued => {
                        t.cancel("cancelled before it ran", self.now.wall);
                        ended.push(i);
                    }
                    TaskState::Reserved | TaskState::Running => {
                        if let Some(w) = &t.worker {
                            to_stop.push((i, subjects::lease_key(w, &t.id, t.attempt)));
                        }
                    }
                    _ => {}
                }
            }
            for i in ended {
                self.emit_state(&id, i);
            }
            for (i, key) in to_stop {
                self.stop_lease(&id, i, &key);
            }
            self.touch(&id);
        }
        let page = self.jobs[&id].page(0, gpufleet_schema::api::MAX_TASKS_PER_PAGE as usize);
        self.fx
            .replies
            .push((tx, Reply::Job(Box::new(page)), Some(id)));
    }

    /// Deletes a finished job's record and events; an unfinished job must
    /// be cancelled first.
    fn delete(&mut self, id: JobId, caller: Caller, tx: ReplyTx) {
        let reply = match self.jobs.get(&id) {
            Some(j) if !caller.sees(&j.owner) => not_found(&id),
            Some(j) if !j.status.is_finished() => Reply::error(
                code::CONFLICT,
                format!("job {id} has not finished: cancel it first"),
            ),
            Some(_) => Reply::error(
                code::UNAVAILABLE,
                format!("job {id} has just finished and is being stored: try again in a moment"),
            ),
            None => {
                self.fx.fetches.push((id, caller, Fetch::Delete(tx)));
                return;
            }
        };
        self.fx.replies.push((tx, reply, None));
    }

    // ----- bookkeeping -----

    /// Marks a job changed: status and reason re-derived, record to be
    /// written, and off the queue once finished.
    fn touch(&mut self, job: &JobId) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        j.derive_status(self.now.wall);
        if j.status.is_finished() {
            self.queue.dequeue(j);
        }
        self.fx.put_jobs.insert(job.clone());
    }

    /// Tells listeners how an attempt ended, unless it succeeded: then the
    /// result event its holder sent, which the engine accepted, said so
    /// already (readers take it as the task's SUCCEEDED), and a state event
    /// would be one more write per task saying nothing new.
    fn emit_end(&mut self, job: &JobId, i: usize) {
        let t = &self.jobs[job].tasks[i];
        if t.state == gpufleet_schema::TaskState::Succeeded {
            self.metrics.task_ended(t.state);
        } else {
            self.emit_state(job, i);
        }
    }

    /// Tells listeners the task's state as its record has it now, with
    /// the record's reason.
    fn emit_state(&mut self, job: &JobId, i: usize) {
        let j = &self.jobs[job];
        let t = &j.tasks[i];
        let event = Event {
            job_id: job.clone(),
            task_id: t.id.clone(),
            attempt: t.attempt,
            worker: None,
            lease_rev: None,
            at: self.now.wall,
            body: EventBody::State {
                state: t.state,
                reason: t.reason.as_ref().map(|r| r.to_string()),
                // Readers take the attempt's output only from this worker.
                holder: t.worker.clone().filter(|_| t.holds_worker()),
            },
            token: None,
        };
        self.metrics.task_ended(t.state);
        let subject = subjects::events(
            &j.owner,
            job,
            &t.id,
            gpufleet_schema::EventKind::State,
            &Sender::Coordinator,
        );
        self.fx.events.push((subject, event));
    }
}

fn not_found(job: &JobId) -> Reply {
    Reply::error(code::NOT_FOUND, format!("job {job} not found"))
}

/// Encodes a reply in the request's encoding: `(error code, body)`.
pub fn encode_reply(reply: &Reply, enc: Encoding) -> (Option<u16>, Vec<u8>) {
    let body = match reply {
        Reply::Submit(r) => enc.encode(r),
        Reply::Job(r) => enc.encode(r),
        Reply::Jobs(r) => enc.encode(r),
        Reply::Workers(r) => enc.encode(r),
        Reply::Errors(r) => enc.encode(r),
        Reply::Sent(r) => enc.encode(r),
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
mod tests;
