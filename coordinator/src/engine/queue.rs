//! The queue policy: which waiting work goes first, and what keeps that
//! fair.
//!
//! - **Order**: each user's work by priority (high first), then
//!   submission order; between users, fair share decides (see
//!   `fairshare.rs`): a pass asks for each user's jobs apart.
//! - **Backfill with a starvation hold**: work that does not fit does not
//!   block what is behind it, except that once the first waiting task or
//!   gang that could fit somewhere has waited `starvation_after`, the
//!   workers it needs are held: no other work is placed on them until it
//!   fits there (or a held worker goes away).
//! - **Avoid window**: a worker that refused a task, or did not claim it,
//!   is not offered that task again for [`AVOID_FOR`], unless a fresh
//!   advert from it comes first.
//! - **Retry pause**: a task whose attempt ended and is tried again waits
//!   first (exponential with jitter, capped), and its next attempt goes to
//!   another worker than the ones it was tried on, when one fits.
//! - **Pass budget**: one pass makes at most `max_reservations_per_pass`
//!   reservations, so that one flush stays a size the server acknowledges
//!   well within its timeout; the next pass follows at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use gpufleet_schema::{GpuRequest, JobId, TaskId, UserId, WorkerId};

use crate::config::CoordinatorConfig;
use crate::placement::{self, TaskRequest, WorkerView};
use crate::state::JobRecord;

/// How long a task keeps away from a worker that refused it.
pub const AVOID_FOR: Duration = Duration::from_secs(30);

/// Queue order within a user: priority (high first), then submission.
pub type QueueKey = (Reverse<i32>, u64, JobId);

fn queue_key(j: &JobRecord) -> QueueKey {
    (Reverse(j.spec.priority), j.seq, j.id.clone())
}

/// Workers held for work that waits for the preemption of tasks there:
/// nobody else is placed on them, so that what the victims free goes to
/// the work they were stopped for.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptHold {
    pub job: JobId,
    /// The task, for a plain job; `None` for a gang.
    pub task: Option<usize>,
    pub workers: Vec<WorkerId>,
    /// The hold lapses then (its victims should be long gone: the grace,
    /// then a lease's lifetime for a worker that froze meanwhile).
    pub until: Instant,
    /// What the waiting work says meanwhile.
    pub why: String,
}

/// Workers held back for the task or gang at the head of the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub job: JobId,
    /// The task, for a plain job; `None` for a gang.
    pub task: Option<usize>,
    pub workers: Vec<WorkerId>,
}

pub struct QueuePolicy {
    /// Unfinished jobs, by owner, each owner's in queue order.
    order: BTreeMap<UserId, BTreeSet<QueueKey>>,
    /// When each waiting task joined the queue (for the starvation hold).
    queued_since: HashMap<TaskId, Instant>,
    /// Workers a task keeps away from, each until when.
    avoid: HashMap<TaskId, Vec<(WorkerId, Instant)>>,
    /// Tasks pausing before their next attempt, until when.
    paused: HashMap<TaskId, Instant>,
    /// Workers earlier attempts of a task ran on: the next goes elsewhere
    /// if it can.
    tried: HashMap<TaskId, Vec<WorkerId>>,
    hold: Option<Hold>,
    /// Workers held for work waiting on preemptions there.
    preempting: Vec<PreemptHold>,
    /// Jobs whose dependencies are met: not asked again.
    deps_met: HashSet<JobId>,
    /// Since when each task (of a job with `unschedulable_after`) has
    /// been found to fit no worker in the fleet.
    unschedulable: HashMap<TaskId, Instant>,
    starvation_after: Duration,
    max_per_pass: usize,
}

impl QueuePolicy {
    pub fn new(cfg: &CoordinatorConfig) -> QueuePolicy {
        QueuePolicy {
            order: BTreeMap::new(),
            queued_since: HashMap::new(),
            avoid: HashMap::new(),
            paused: HashMap::new(),
            tried: HashMap::new(),
            hold: None,
            preempting: Vec::new(),
            deps_met: HashSet::new(),
            unschedulable: HashMap::new(),
            starvation_after: cfg.starvation_after.0,
            max_per_pass: cfg.max_reservations_per_pass.max(1),
        }
    }

    // ----- order -----

    pub fn enqueue(&mut self, job: &JobRecord) {
        self.order
            .entry(job.owner.clone())
            .or_default()
            .insert(queue_key(job));
    }

    /// A job ended: off the queue, and its tasks' clocks and windows go.
    pub fn dequeue(&mut self, job: &JobRecord) {
        self.deps_met.remove(&job.id);
        if !self.preempting.is_empty() {
            self.preempting.retain(|h| h.job != job.id);
        }
        if let Some(jobs) = self.order.get_mut(&job.owner) {
            jobs.remove(&queue_key(job));
            if jobs.is_empty() {
                self.order.remove(&job.owner);
            }
        }
        for t in &job.tasks {
            self.unschedulable.remove(&t.id);
            self.queued_since.remove(&t.id);
            self.avoid.remove(&t.id);
            self.paused.remove(&t.id);
            self.tried.remove(&t.id);
        }
    }

    /// Unfinished jobs, each user's first in line first.
    pub fn jobs(&self) -> impl Iterator<Item = &JobId> {
        self.order.values().flatten().map(|(_, _, id)| id)
    }

    /// The users with unfinished jobs, each with its jobs in queue order.
    pub fn by_owner(&self) -> impl Iterator<Item = (&UserId, &BTreeSet<QueueKey>)> {
        self.order.iter()
    }

    // ----- dependencies -----

    /// Whether the job's dependencies were found met (they stay met).
    pub fn deps_met(&self, job: &JobId) -> bool {
        self.deps_met.contains(job)
    }

    pub fn set_deps_met(&mut self, job: JobId) {
        self.deps_met.insert(job);
    }

    // ----- unschedulable work -----

    /// Since when the task has fitted no worker in the fleet, counting
    /// from `now` if this is the first time.
    pub fn unschedulable_since(&mut self, task: &TaskId, now: Instant) -> Instant {
        *self.unschedulable.entry(task.clone()).or_insert(now)
    }

    /// The task could fit some worker (busy or not): its clock stops.
    pub fn fits_somewhere(&mut self, task: &TaskId) {
        if !self.unschedulable.is_empty() {
            self.unschedulable.remove(task);
        }
    }

    // ----- the starvation clock -----

    /// The task (re)joins the queue now: its wait starts.
    pub fn queued(&mut self, task: &TaskId, at: Instant) {
        self.queued_since.insert(task.clone(), at);
    }

    /// The task waits again for the same attempt: it has waited all along,
    /// so an earlier start stays.
    pub fn queued_again(&mut self, task: &TaskId, at: Instant) {
        self.queued_since.entry(task.clone()).or_insert(at);
    }

    /// The task runs: it waits no more.
    pub fn started(&mut self, task: &TaskId) {
        self.queued_since.remove(task);
    }

    /// When the longest-waiting of `tasks` started waiting.
    pub fn waiting_since<'a>(
        &self,
        tasks: impl IntoIterator<Item = &'a TaskId>,
    ) -> Option<Instant> {
        tasks
            .into_iter()
            .filter_map(|t| self.queued_since.get(t))
            .min()
            .copied()
    }

    // ----- retries -----

    /// The task's next attempt waits until `until`, and prefers another
    /// worker than `on` (the one its attempt ran on).
    pub fn retry_later(&mut self, task: &TaskId, until: Instant, on: Option<&WorkerId>) {
        self.paused.insert(task.clone(), until);
        if let Some(w) = on {
            let tried = self.tried.entry(task.clone()).or_default();
            if !tried.contains(w) {
                tried.push(w.clone());
            }
        }
    }

    /// Whether the task still pauses at `now`.
    pub fn is_paused(&self, task: &TaskId, now: Instant) -> bool {
        self.paused.get(task).is_some_and(|until| *until > now)
    }

    /// Forgets pauses that are over.
    pub fn expire_pauses(&mut self, now: Instant) {
        self.paused.retain(|_, until| *until > now);
    }

    /// When the first pause ends.
    pub fn next_due(&self) -> Option<Instant> {
        self.paused.values().min().copied()
    }

    /// The workers earlier attempts of the task ran on.
    pub fn tried(&self, task: &TaskId) -> &[WorkerId] {
        self.tried.get(task).map_or(&[], Vec::as_slice)
    }

    // ----- the avoid window -----

    pub fn avoid(&mut self, task: &TaskId, worker: &WorkerId, now: Instant) {
        self.avoid
            .entry(task.clone())
            .or_default()
            .push((worker.clone(), now + AVOID_FOR));
    }

    /// A fresh advert ends a refusal: what made the worker say no (a race
    /// with a task that just ended) is behind it. Returns whether any task
    /// kept away from it.
    pub fn lift_avoid(&mut self, worker: &WorkerId) -> bool {
        let mut lifted = false;
        self.avoid.retain(|_, list| {
            let before = list.len();
            list.retain(|(w, _)| w != worker);
            lifted |= list.len() != before;
            !list.is_empty()
        });
        lifted
    }

    pub fn expire_avoid(&mut self, now: Instant) {
        self.avoid.retain(|_, list| {
            list.retain(|(_, until)| *until > now);
            !list.is_empty()
        });
    }

    /// The workers `task` keeps away from at `now`.
    pub fn avoided(&self, task: &TaskId, now: Instant) -> Vec<WorkerId> {
        self.avoid
            .get(task)
            .map(|l| {
                l.iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(w, _)| w.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The jobs with a task that the avoid window, the workers tried or a
    /// pause say something of; `None` when that cannot be told (a task id
    /// not made by `TaskId::for_index`): then of every job.
    pub fn jobs_with_task_state(&self) -> Option<HashSet<JobId>> {
        let mut jobs = HashSet::new();
        for t in self
            .avoid
            .keys()
            .chain(self.tried.keys())
            .chain(self.paused.keys())
        {
            jobs.insert(t.job_and_index()?.0);
        }
        Some(jobs)
    }

    /// Whether the avoid window or the workers tried say anything of
    /// `task` (most tasks: nothing, and then nothing is hashed for them).
    pub fn knows(&self, task: &TaskId) -> bool {
        self.avoid.contains_key(task) || self.tried.contains_key(task)
    }

    /// Hashes what the avoid window says of `task`, for a signature of
    /// what placement looks at.
    pub fn hash_avoided(&self, task: &TaskId, h: &mut impl Hasher) {
        if let Some(list) = self.avoid.get(task) {
            for (w, _) in list {
                w.hash(h);
            }
        }
        self.tried(task).hash(h);
    }

    // ----- holds and the pass budget -----

    /// The workers held now, and for whom.
    pub fn hold(&self) -> Option<&Hold> {
        self.hold.as_ref()
    }

    /// The holds for work waiting on preemptions.
    pub fn preempting(&self) -> &[PreemptHold] {
        &self.preempting
    }

    /// Holds workers for work that waits for the preemption of tasks there.
    pub fn hold_for_preemption(&mut self, hold: PreemptHold) {
        self.preempting.push(hold);
    }

    /// The work a preemption was for has its reservation: its hold ends.
    pub fn preemptor_placed(&mut self, job: &JobId, task: Option<usize>) {
        if !self.preempting.is_empty() {
            self.preempting
                .retain(|h| !(&h.job == job && (h.task.is_none() || h.task == task)));
        }
    }

    /// A held worker went away: the hold is void.
    pub fn worker_gone(&mut self, worker: &WorkerId) {
        self.preempting.retain(|h| !h.workers.contains(worker));
        if self
            .hold
            .as_ref()
            .is_some_and(|h| h.workers.contains(worker))
        {
            self.hold = None;
        }
    }

    /// Starts a scheduling pass over `views`. The hold is dropped unless
    /// its holder is still waiting in this pass.
    pub fn begin_pass(&mut self, views: &[WorkerView], now: Instant) -> PassPolicy {
        self.preempting.retain(|h| h.until > now);
        let mut for_preemptors = Vec::new();
        for h in &self.preempting {
            for w in &h.workers {
                if let Some(i) = views.iter().position(|v| &v.name == w) {
                    for_preemptors.push((i, views[i].draining, h.job.clone(), h.task));
                }
            }
        }
        let carried = self.hold.take();
        let held = carried
            .as_ref()
            .map(|h| {
                h.workers
                    .iter()
                    .filter_map(|w| views.iter().position(|v| &v.name == w))
                    .map(|i| (i, views[i].draining))
                    .collect()
            })
            .unwrap_or_default();
        PassPolicy {
            carried,
            held,
            for_preemptors,
            next: None,
            head_seen: false,
            budget: self.max_per_pass,
            out_of_budget: false,
            starvation_after: self.starvation_after,
            now,
        }
    }

    /// Ends a pass; returns whether it stopped for its budget with work
    /// left to place.
    pub fn end_pass(&mut self, pass: PassPolicy) -> bool {
        self.hold = pass.next;
        pass.out_of_budget
    }
}

/// The queue policy's part of one scheduling pass: the hold it carries,
/// the one it leaves, and the budget left.
pub struct PassPolicy {
    /// The hold from the pass before.
    carried: Option<Hold>,
    /// The held workers' places in the snapshot, with their own draining.
    held: Vec<(usize, bool)>,
    /// Workers held for preemptors: place, own draining, and for whom.
    for_preemptors: Vec<(usize, bool, JobId, Option<usize>)>,
    /// The hold the next pass starts with.
    next: Option<Hold>,
    /// Whether the first waiting work that could fit somewhere was seen.
    head_seen: bool,
    budget: usize,
    out_of_budget: bool,
    starvation_after: Duration,
    now: Instant,
}

impl PassPolicy {
    /// Whether the carried hold is for this task (`Some(index)`) or gang
    /// (`None`) of `job`.
    pub fn is_holder(&self, job: &JobId, task: Option<usize>) -> bool {
        self.carried
            .as_ref()
            .is_some_and(|h| &h.job == job && h.task == task)
    }

    /// Runs `place` for the task (`Some(index)`) or gang (`None`) of
    /// `job` with the held workers closed to everyone but their holder
    /// (`holder`: the starvation hold's), then opens them again.
    pub fn with_held_closed<R>(
        &self,
        views: &mut [WorkerView],
        holder: bool,
        (job, task): (&JobId, Option<usize>),
        place: impl FnOnce(&mut [WorkerView]) -> R,
    ) -> R {
        let mask = |views: &mut [WorkerView], open: bool| {
            for &(i, draining) in &self.held {
                views[i].draining = draining || !(open || holder);
            }
            for (i, draining, j, t) in &self.for_preemptors {
                views[*i].draining = *draining || !(open || for_them((j, *t), (job, task)));
            }
        };
        mask(views, false);
        let r = place(views);
        mask(views, true);
        r
    }

    /// The job a preemption holds worker `i` for, if that is not
    /// `(job, task)` itself.
    pub fn held_for_another(
        &self,
        i: usize,
        (job, task): (&JobId, Option<usize>),
    ) -> Option<&JobId> {
        self.for_preemptors
            .iter()
            .find(|(w, _, j, t)| *w == i && !for_them((j, *t), (job, task)))
            .map(|(_, _, j, _)| j)
    }

    /// The holder did not fit yet: its hold carries on.
    pub fn keep_hold(&mut self) {
        self.next = self.carried.clone();
    }

    /// Whether work that did not fit should now get workers held for it:
    /// it is the first waiting work that could fit somewhere (only the
    /// first is asked), it has waited `starvation_after` since `since()`,
    /// and no hold is in force.
    pub fn starving(&mut self, never_fits: bool, since: impl FnOnce() -> Option<Instant>) -> bool {
        if self.head_seen || never_fits {
            return false;
        }
        self.head_seen = true;
        let waited = since().map_or(Duration::ZERO, |s| self.now.duration_since(s));
        self.carried.is_none() && self.next.is_none() && waited >= self.starvation_after
    }

    pub fn hold(&mut self, hold: Hold) {
        self.next = Some(hold);
    }

    /// Whether another reservation may be made in this pass; once not,
    /// the pass ends with work left for the next.
    pub fn may_reserve(&mut self) -> bool {
        if self.budget == 0 {
            self.out_of_budget = true;
        }
        !self.out_of_budget
    }

    pub fn spend(&mut self, reservations: usize) {
        self.budget = self.budget.saturating_sub(reservations);
    }

    pub fn out_of_budget(&self) -> bool {
        self.out_of_budget
    }
}

/// The worker to hold for a starving task: one that could hold it were it
/// empty, with the least of the task's kind of resource in use now.
pub fn hold_candidate(req: &TaskRequest, views: &[WorkerView]) -> Option<WorkerId> {
    views
        .iter()
        .filter(|v| !v.draining)
        .filter(|v| {
            !placement::place(std::slice::from_ref(req), &mut [emptied(v)])
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
pub fn gang_hold_candidates(
    reqs: &[TaskRequest],
    min: usize,
    views: &[WorkerView],
) -> Vec<WorkerId> {
    let mut empty: Vec<WorkerView> = views.iter().filter(|v| !v.draining).map(emptied).collect();
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

/// A worker as it would be with nothing running.
fn emptied(v: &WorkerView) -> WorkerView {
    let mut e = v.clone();
    e.cpus_free_milli = e.cpus_total_milli;
    e.memory_free = e.memory_total;
    for g in &mut e.gpus {
        g.exclusive = false;
        g.shares = 0;
        g.memory_free = g.memory_total;
    }
    e
}

/// Whether work `(job, task)` is what a preemption hold for `(held_job,
/// held_task)` keeps its workers for (a gang's hold has no task).
fn for_them(
    (held_job, held_task): (&JobId, Option<usize>),
    (job, task): (&JobId, Option<usize>),
) -> bool {
    held_job == job && (held_task.is_none() || held_task == task)
}
