//! A scheduling pass, in named phases:
//!
//! 1. **collect**: the snapshot of the fleet (from the lease book) and the
//!    queue policy's part of the pass (the hold it carries, its budget);
//! 2. **place**: a unit of work at a time (a plain job's task, or a
//!    gang), from the user furthest below its fair share, each user's in
//!    queue order; work over a quota waits (see `fairshare.rs`, and the
//!    queue policy for holds and the budget);
//! 3. **explain**: what still waits says why; gang members left out by
//!    `min_tasks` are dropped from the run;
//! 4. **reserve**: a reservation for each placement, with a rendezvous
//!    for a gang's members.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{btree_set, BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::iter::Peekable;

use gpufleet_schema::{
    subjects, GpuRequest, Grant, JobId, Lease, LeaseState, Rendezvous, TaskId, TaskSpec, TaskState,
    UserId, WorkerId,
};

use super::deps::Deps;
use super::fairshare::{Ledger, Usage};
use super::preempt::Preemptor;
use super::queue::{gang_hold_candidates, hold_candidate, Hold, PassPolicy, QueueKey};
use super::twophase::Upgrade;
use super::Engine;
use crate::metrics::Reservation;
use crate::placement::{self, Candidates, LoadAsk, Placement, TaskRequest, WorkerView};
use crate::state::{JobRecord, Reason};

/// What one pass decided to reserve.
enum Placed {
    Task {
        job: JobId,
        index: usize,
        worker: usize,
        grant: Grant,
    },
    /// A gang's members: (task index, worker index, grant).
    Gang {
        job: JobId,
        members: Vec<(usize, usize, Grant)>,
    },
}

impl Placed {
    /// What it holds: (worker index, grant) of each task.
    fn grants(&self) -> Vec<(usize, &Grant)> {
        match self {
            Placed::Task { worker, grant, .. } => vec![(*worker, grant)],
            Placed::Gang { members, .. } => members.iter().map(|(_, w, g)| (*w, g)).collect(),
        }
    }
}

/// One scheduling pass in progress.
pub(super) struct Pass {
    /// What placement sees; it shrinks as the pass places.
    pub(super) views: Vec<WorkerView>,
    /// Which of `views` may still fit each shape of request.
    candidates: Candidates,
    pub(super) policy: PassPolicy,
    /// The jobs the queue says something of task by task (`None`: every
    /// job, as far as the pass can tell); see [`JobPart`].
    known_tasks: Option<HashSet<JobId>>,
    /// Reasons of requests that failed in this pass, by signature. They
    /// fail again (the snapshot only shrinks), so their reason is reused:
    /// cheap with many alike tasks.
    failed: HashMap<SigKey, (Reason, bool)>,
    /// Random keys for the hashed parts of a signature (labels, named
    /// workers, the avoid window: text a user or worker chose), so that
    /// nobody can make two signatures alike on purpose.
    keys: RandomState,
    placed: Vec<Placed>,
    /// Loaded two-phase tasks given their GPUs (see `twophase.rs`).
    pub(super) upgrades: Vec<Upgrade>,
    /// Tasks that still wait, and why (only those whose reason changes).
    pub(super) waiting: Vec<(JobId, usize, Reason)>,
    /// Gang members left out of this run by `min_tasks`, and why.
    dropped: Vec<(JobId, usize, String)>,
    /// Jobs found free of their dependencies in this pass.
    deps_met: Vec<JobId>,
    /// Jobs a dependency failed, and why: they end.
    deps_failed: Vec<(JobId, String)>,
    /// Tasks of jobs with `unschedulable_after` that no worker in the
    /// fleet could ever fit.
    unschedulable: Vec<(JobId, usize)>,
    /// What each user and group holds, with this pass's placements.
    pub(super) ledger: Ledger,
    /// The fleet's capacity, shares are fractions of.
    pub(super) capacity: Usage,
    /// Whether the policy lets anybody preempt, and the work that did
    /// not fit and may (see `preempt.rs`).
    preempts: bool,
    preemptors: Vec<Preemptor>,
}

impl Pass {
    /// No worker in the fleet could ever fit this task: noted, for a job
    /// that gives up on such tasks.
    fn unschedulable(&mut self, job: &JobRecord, i: usize) {
        if job.spec.unschedulable_after.is_some() {
            self.unschedulable.push((job.id.clone(), i));
        }
    }
}

/// A weighted share, ordered (shares are finite: see `Usage::dominant`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);

impl Eq for Share {}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Share {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Everything placement looks at for one task: two tasks with equal keys
/// fit (or not) in the same places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SigKey {
    /// Its job's labels and named workers, hashed ([`job_signature`]).
    job: u64,
    cpus_milli: u64,
    memory: u64,
    gpu: (u8, u32, u64),
    load: Option<(u64, u64)>,
    /// What the queue says of this task alone (the workers it avoids or
    /// was tried on), hashed; `None` when it says nothing.
    task: Option<u64>,
}

/// What a task's signature takes from its job: the hash of its job's part
/// ([`job_signature`]), and whether the queue may say something of the
/// job's tasks one by one (a pause, the avoid window, workers tried).
/// Most jobs' tasks it says nothing of: their tasks are then gone through
/// without a look-up each, which on a long queue is most of a pass.
#[derive(Debug, Clone, Copy)]
pub(super) struct JobPart {
    hash: u64,
    known: bool,
}

/// One unit of a user's waiting work: a plain job's task (with its job's
/// part of the signature), or a gang's queued members together.
enum Work<'a> {
    Task(&'a JobRecord, usize, JobPart),
    Gang(&'a JobRecord, Vec<usize>),
}

/// One user's waiting work in queue order, taken a unit at a time.
struct UserQueue<'a> {
    user: &'a UserId,
    jobs: Peekable<btree_set::Iter<'a, QueueKey>>,
    /// The plain job being gone through: its tasks left to try.
    current: Option<(&'a JobRecord, JobPart, Peekable<std::vec::IntoIter<usize>>)>,
}

impl<'a> UserQueue<'a> {
    /// The submission order of the job it is at.
    fn head_seq(&mut self) -> u64 {
        match &self.current {
            Some((job, _, _)) => job.seq,
            None => self.jobs.peek().map_or(u64::MAX, |(_, seq, _)| *seq),
        }
    }

    /// The next unit to try, if any is left.
    fn next_work(
        &mut self,
        engine: &'a Engine,
        now: std::time::Instant,
        pass: &mut Pass,
    ) -> Option<Work<'a>> {
        loop {
            if let Some((job, job_part, tasks)) = &mut self.current {
                if let Some(i) = tasks.next() {
                    return Some(Work::Task(job, i, *job_part));
                }
                self.current = None;
            }
            let (_, _, id) = self.jobs.next()?;
            let job = &engine.jobs[id];
            let first_reason = |queued: &[usize]| {
                queued
                    .first()
                    .and_then(|&i| job.tasks[i].reason.as_ref())
                    .cloned()
            };
            let queued: Vec<usize> = (0..job.tasks.len())
                .filter(|&i| job.tasks[i].state == TaskState::Queued)
                .collect();
            if queued.is_empty() {
                continue;
            }
            if !engine.queue.deps_met(id) {
                match engine.deps(job) {
                    Deps::Met => pass.deps_met.push(id.clone()),
                    Deps::Wait(why) => {
                        let why = Reason::reusing(why, first_reason(&queued).as_ref());
                        pass.waiting.extend(
                            queued
                                .into_iter()
                                .filter(|&i| !job.tasks[i].waits_because(&why))
                                .map(|i| (id.clone(), i, why.clone())),
                        );
                        continue;
                    }
                    Deps::Failed(why) => {
                        pass.deps_failed.push((id.clone(), why));
                        continue;
                    }
                }
            }
            // A task pausing before its retry waits; a gang waits whole.
            let known = pass.known_tasks.as_ref().is_none_or(|k| k.contains(id));
            let paused = |i: &usize| known && engine.queue.is_paused(&job.tasks[*i].id, now);
            if job.spec.gang && queued.iter().any(paused) {
                continue;
            }
            let queued: Vec<usize> = queued.into_iter().filter(|i| !paused(i)).collect();
            if queued.is_empty() {
                continue;
            }
            if job.spec.gang {
                return Some(Work::Gang(job, queued));
            }
            let queued = Engine::within_max_parallel(job, queued, &mut pass.waiting);
            let job_part = JobPart {
                hash: job_signature(job, &pass.keys),
                known,
            };
            self.current = Some((job, job_part, queued.into_iter().peekable()));
        }
    }

    /// The plain job's task `failed` did not fit (for `reason`): its next
    /// tasks alike would not either, so they wait for the same reason
    /// without placement being asked again. Tasks of one job are mostly
    /// alike (arrays), so a pass spends little on a long queue.
    fn skip_alike(
        &mut self,
        engine: &Engine,
        failed: &SigKey,
        (reason, never_fits): &(Reason, bool),
        pass: &mut Pass,
    ) {
        let Some((job, job_part, tasks)) = &mut self.current else {
            return;
        };
        while let Some(&i) = tasks.peek() {
            if engine.sig_key(job, i, *job_part, &pass.keys) != *failed
                || pass.policy.is_holder(&job.id, Some(i))
            {
                return;
            }
            tasks.next();
            if *never_fits {
                pass.unschedulable(job, i);
            }
            if !job.tasks[i].waits_because(reason) {
                pass.waiting.push((job.id.clone(), i, reason.clone()));
            }
        }
    }
}

impl Engine {
    /// Places queued work: the user furthest below its fair share first,
    /// each user's own work in queue order (see the queue policy and
    /// `fairshare.rs`).
    pub(super) fn schedule(&mut self) {
        let timer = self.metrics.pass_started();
        let mut pass = self.collect();
        self.place_second_phases(&mut pass);
        let now = self.now.mono;
        let mut users: Vec<UserQueue> = self
            .queue
            .by_owner()
            .map(|(user, jobs)| UserQueue {
                user,
                jobs: jobs.iter().peekable(),
                current: None,
            })
            .collect();
        // The user to serve next: the smallest share, then the oldest
        // waiting job, then the name.
        let mut next: BinaryHeap<Reverse<(Share, u64, usize)>> = BinaryHeap::new();
        // With one user waiting there is nobody to share with.
        let shared = users.len() > 1;
        let share = |u: &UserQueue, pass: &Pass| {
            Share(if shared {
                self.shares.share(u.user, &pass.ledger, &pass.capacity)
            } else {
                0.0
            })
        };
        for (i, u) in users.iter_mut().enumerate() {
            next.push(Reverse((share(u, &pass), u.head_seq(), i)));
        }
        while let Some(Reverse((_, _, i))) = next.pop() {
            let Some(work) = users[i].next_work(self, now, &mut pass) else {
                continue;
            };
            match work {
                Work::Gang(job, queued) => self.place_gang(job, &queued, &mut pass),
                Work::Task(job, index, job_part) => {
                    let failed = self.place_task(job, index, job_part, &mut pass);
                    // With preemption, each waiting task may be a
                    // preemptor of its own: none is skipped.
                    if let Some(key) = failed.filter(|_| self.shortcuts && !pass.preempts) {
                        if let Some(outcome) = pass.failed.get(&key).cloned() {
                            users[i].skip_alike(self, &key, &outcome, &mut pass);
                        }
                    }
                }
            }
            if pass.policy.out_of_budget() {
                break;
            }
            let u = &mut users[i];
            next.push(Reverse((share(u, &pass), u.head_seq(), i)));
        }
        let Pass {
            views,
            policy,
            placed,
            upgrades,
            mut waiting,
            preemptors,
            dropped,
            deps_met,
            mut deps_failed,
            unschedulable,
            ..
        } = pass;
        let count = placed.len();
        for job in deps_met {
            self.queue.set_deps_met(job);
        }
        deps_failed.extend(self.given_up(&waiting, unschedulable));
        let mut touched = if preemptors.is_empty() {
            HashSet::new()
        } else {
            let reserved: Vec<(usize, &Grant)> = placed.iter().flat_map(Placed::grants).collect();
            self.preempt(preemptors, &reserved, &mut waiting)
        };
        touched.extend(self.explain(waiting, dropped));
        touched.extend(self.end_waiting(deps_failed));
        touched.extend(self.reserve_placed(placed, &views));
        self.grant_placed(upgrades);
        for job in touched {
            self.touch(&job);
        }
        if self.queue.end_pass(policy) {
            self.wants_schedule = true;
        }
        self.metrics.pass(timer, count);
    }

    /// Phase 1: what the pass starts from.
    fn collect(&mut self) -> Pass {
        let views = self.book.snapshot();
        let policy = self.queue.begin_pass(&views, self.now.mono);
        let mut ledger = self.shares.ledger();
        for (_, live) in self.book.iter() {
            let l = &live.lease;
            if !matches!(l.state, LeaseState::Rejected | LeaseState::Abandoned) {
                ledger.add(&self.shares, &l.owner, &Usage::of(&l.task.resources));
            }
        }
        Pass {
            preempts: self.shares.policy().preempts(),
            preemptors: Vec::new(),
            deps_met: Vec::new(),
            deps_failed: Vec::new(),
            unschedulable: Vec::new(),
            capacity: Usage::capacity(&views),
            ledger,
            views,
            policy,
            // A shortcut like the others: without them, every task is
            // looked up (the property test in `tests/alike.rs` holds the
            // two to the same placements).
            known_tasks: if self.shortcuts {
                self.queue.jobs_with_task_state()
            } else {
                None
            },
            failed: HashMap::new(),
            candidates: Candidates::default(),
            keys: RandomState::new(),
            placed: Vec::new(),
            upgrades: Vec::new(),
            waiting: Vec::new(),
            dropped: Vec::new(),
        }
    }

    /// Phase 2, for a gang: all of its queued members together (at least
    /// `min_tasks`), or none.
    fn place_gang(&self, job: &JobRecord, queued: &[usize], pass: &mut Pass) {
        // A gang goes only when none of it still holds resources.
        if job.tasks.iter().any(|t| t.holds_worker()) || !pass.policy.may_reserve() {
            return;
        }
        // Its quota counts every queued member.
        let mut ask = Usage::default();
        for &i in queued {
            ask.add(&Usage::of(&job.specs[i].resources));
        }
        if let Some(why) = self.shares.over_quota(&job.owner, &pass.ledger, &ask) {
            let why = Reason::new(why);
            for &i in queued {
                pass.waiting.push((job.id.clone(), i, why.clone()));
            }
            return;
        }
        let is_holder = pass.policy.is_holder(&job.id, None);
        let min = job
            .spec
            .min_tasks
            .map_or(queued.len(), |m| m as usize)
            .min(queued.len());
        // Away from the workers an earlier run failed on if it fits
        // elsewhere, else anywhere.
        let mut p = None;
        let mut reqs = Vec::new();
        for elsewhere in [true, false] {
            reqs = queued
                .iter()
                .map(|&i| self.request(job, i, elsewhere))
                .collect();
            let tried = p.is_some();
            let placed = pass.policy.with_held_closed(
                &mut pass.views,
                is_holder,
                (&job.id, None),
                |views| {
                    self.metrics
                        .time_placement(|| placement::place_gang(&reqs, min, views))
                },
            );
            let fits = !placed.assigned.is_empty();
            p = Some(placed);
            if fits || tried || !self.has_tried(job, queued) {
                break;
            }
        }
        let p = p.expect("placement ran");
        if !p.assigned.is_empty() {
            pass.policy.spend(p.assigned.len());
            for a in &p.assigned {
                let held = Usage::of(&job.specs[queued[a.task]].resources);
                pass.ledger.add(&self.shares, &job.owner, &held);
            }
            if is_holder {
                tracing::info!(job_id = %job.id, "the held gang fits now");
            }
            let world = p.assigned.len();
            for u in &p.unplaced {
                pass.dropped.push((
                    job.id.clone(),
                    queued[u.task],
                    format!(
                        "dropped from this run: the gang started with {world} of {} tasks (min_tasks {min})",
                        queued.len()
                    ),
                ));
            }
            pass.placed.push(Placed::Gang {
                job: job.id.clone(),
                members: p
                    .assigned
                    .into_iter()
                    .map(|a| (queued[a.task], a.worker, a.grant))
                    .collect(),
            });
            return;
        }
        let never_fits = p.unplaced.iter().any(|u| u.never_fits);
        if never_fits {
            for &i in queued {
                pass.unschedulable(job, i);
            }
        } else if pass.preempts {
            self.may_preempt_for(job, queued, min, &mut pass.preemptors);
        }
        let mut reason = p
            .unplaced
            .first()
            .map(|u| u.reason.clone())
            .unwrap_or_default();
        if is_holder {
            reason.push_str("; workers are held for it");
            pass.policy.keep_hold();
        } else if pass.policy.starving(never_fits, || {
            self.queue
                .waiting_since(queued.iter().map(|&i| &job.tasks[i].id))
        }) {
            let workers = gang_hold_candidates(&reqs, min, &pass.views);
            if !workers.is_empty() {
                tracing::info!(job_id = %job.id, ?workers, "holding workers for a starving gang");
                pass.policy.hold(Hold {
                    job: job.id.clone(),
                    task: None,
                    workers,
                });
            }
        }
        let reason = Reason::reusing(reason, job.tasks[queued[0]].reason.as_ref());
        for &i in queued {
            pass.waiting.push((job.id.clone(), i, reason.clone()));
        }
    }

    /// Phase 2, for a task of a plain job, while the pass has budget.
    /// Returns its signature if it did not fit and its failure is noted
    /// for the tasks alike.
    fn place_task(
        &self,
        job: &JobRecord,
        i: usize,
        job_part: JobPart,
        pass: &mut Pass,
    ) -> Option<SigKey> {
        if !pass.policy.may_reserve() {
            return None;
        }
        let ask = Usage::of(&job.specs[i].resources);
        if let Some(why) = self.shares.over_quota(&job.owner, &pass.ledger, &ask) {
            let why = Reason::reusing(why, job.tasks[i].reason.as_ref());
            if !job.tasks[i].waits_because(&why) {
                pass.waiting.push((job.id.clone(), i, why));
            }
            return None;
        }
        let is_holder = pass.policy.is_holder(&job.id, Some(i));
        let sig = self.sig_key(job, i, job_part, &pass.keys);
        if !is_holder {
            if let Some((reason, never_fits)) = pass.failed.get(&sig) {
                let never_fits = *never_fits;
                // Cloned only when it is news: most tasks alike wait for
                // the same reason pass after pass, one shared text that a
                // pointer compare tells unchanged.
                let news = (!job.tasks[i].waits_because(reason)).then(|| reason.clone());
                if never_fits {
                    pass.unschedulable(job, i);
                } else if pass.preempts {
                    self.may_preempt_for(job, &[i], 1, &mut pass.preemptors);
                }
                if let Some(reason) = news {
                    pass.waiting.push((job.id.clone(), i, reason));
                }
                return Some(sig);
            }
        }
        let mut req = self.request(job, i, true);
        let me = (&job.id, Some(i));
        let mut p = pass
            .policy
            .with_held_closed(&mut pass.views, is_holder, me, |views| {
                self.metrics
                    .time_placement(|| self.place_one(&mut pass.candidates, &req, views))
            });
        // A retry goes back to a worker it was tried on only if no
        // other fits.
        if p.assigned.is_empty() && !self.queue.tried(&job.tasks[i].id).is_empty() {
            req = self.request(job, i, false);
            p = pass
                .policy
                .with_held_closed(&mut pass.views, is_holder, me, |views| {
                    self.metrics
                        .time_placement(|| self.place_one(&mut pass.candidates, &req, views))
                });
        }
        if let Some(a) = p.assigned.into_iter().next() {
            pass.policy.spend(1);
            pass.ledger.add(&self.shares, &job.owner, &ask);
            pass.placed.push(Placed::Task {
                job: job.id.clone(),
                index: i,
                worker: a.worker,
                grant: a.grant,
            });
            return None;
        }
        let u = p
            .unplaced
            .into_iter()
            .next()
            .expect("one task, one outcome");
        let previous = job.tasks[i].reason.as_ref();
        let mut failed = None;
        let reason = if is_holder {
            pass.policy.keep_hold();
            Reason::reusing(format!("{}; a worker is held for it", u.reason), previous)
        } else {
            let task = &job.tasks[i];
            if pass
                .policy
                .starving(u.never_fits, || self.queue.waiting_since([&task.id]))
            {
                if let Some(w) = hold_candidate(&req, &pass.views) {
                    tracing::info!(task_id = %task.id, worker = %w, "holding a worker for a starving task");
                    pass.policy.hold(Hold {
                        job: job.id.clone(),
                        task: Some(i),
                        workers: vec![w],
                    });
                }
            }
            if u.never_fits {
                pass.unschedulable(job, i);
            } else if pass.preempts {
                self.may_preempt_for(job, &[i], 1, &mut pass.preemptors);
            }
            let reason = Reason::reusing(u.reason, previous);
            pass.failed.insert(sig, (reason.clone(), u.never_fits));
            failed = Some(sig);
            reason
        };
        if !job.tasks[i].waits_because(&reason) {
            pass.waiting.push((job.id.clone(), i, reason));
        }
        failed
    }

    /// Of a plain job's `queued` tasks, those `max_parallel` lets this
    /// pass try; the rest wait, saying so (only when that is news: an
    /// array of thousands costs a pass nothing per waiting task).
    fn within_max_parallel(
        job: &JobRecord,
        mut queued: Vec<usize>,
        waiting: &mut Vec<(JobId, usize, Reason)>,
    ) -> Vec<usize> {
        let Some(max) = job.spec.max_parallel else {
            return queued;
        };
        let holding = job.tasks.iter().filter(|t| t.holds_worker()).count();
        let room = (max as usize).saturating_sub(holding);
        if queued.len() > room {
            let wait = queued.split_off(room);
            let why = Reason::reusing(
                format!("max_parallel: {max} of the job's tasks run at once"),
                job.tasks[wait[0]].reason.as_ref(),
            );
            waiting.extend(
                wait.into_iter()
                    .filter(|&i| !job.tasks[i].waits_because(&why))
                    .map(|i| (job.id.clone(), i, why.clone())),
            );
        }
        queued
    }

    /// Phase 3: records why waiting tasks wait and drops the gang members
    /// `min_tasks` left out; returns the jobs that changed.
    fn explain(
        &mut self,
        waiting: Vec<(JobId, usize, Reason)>,
        dropped: Vec<(JobId, usize, String)>,
    ) -> HashSet<JobId> {
        let mut touched = HashSet::new();
        for (job, i, reason) in waiting {
            if self.jobs.task_mut(&job, i).wait_because(&reason) {
                touched.insert(job);
            }
        }
        for (job, i, reason) in dropped {
            self.jobs
                .task_mut(&job, i)
                .drop_from_run(reason, self.now.wall);
            self.emit_state(&job, i);
            touched.insert(job);
        }
        touched
    }

    /// Phase 3, for `unschedulable_after`: starts the clock of each task
    /// first found unschedulable, stops it for one that could fit again,
    /// and returns the jobs whose task has been unschedulable too long,
    /// with why they end.
    fn given_up(
        &mut self,
        waiting: &[(JobId, usize, Reason)],
        unschedulable: Vec<(JobId, usize)>,
    ) -> Vec<(JobId, String)> {
        let now = self.now.mono;
        let never: HashSet<TaskId> = unschedulable
            .iter()
            .map(|(j, i)| self.jobs[j].tasks[*i].id.clone())
            .collect();
        for (job, i, _) in waiting {
            let task = &self.jobs[job].tasks[*i].id;
            if !never.contains(task) {
                self.queue.fits_somewhere(task);
            }
        }
        let mut out: Vec<(JobId, String)> = Vec::new();
        for (job, i) in unschedulable {
            let j = &self.jobs[&job];
            let Some(after) = j.spec.unschedulable_after else {
                continue;
            };
            let since = self.queue.unschedulable_since(&j.tasks[i].id, now);
            if now.saturating_duration_since(since) >= after.0
                && !out.iter().any(|(o, _)| o == &job)
            {
                let reason = waiting
                    .iter()
                    .find(|(w, k, _)| w == &job && *k == i)
                    .map(|(_, _, r)| r)
                    .or(j.tasks[i].reason.as_ref())
                    .map_or_else(String::new, |r| r.to_string());
                out.push((
                    job,
                    format!("unschedulable for {after} (unschedulable_after): {reason}"),
                ));
            }
        }
        out
    }

    /// Phase 3, for jobs a dependency failed or that gave up on a task no
    /// worker fits: what of them waits ends, saying why; returns the jobs
    /// that changed.
    fn end_waiting(&mut self, failed: Vec<(JobId, String)>) -> HashSet<JobId> {
        let mut touched = HashSet::new();
        for (job, why) in failed {
            let queued: Vec<usize> = (0..self.jobs[&job].tasks.len())
                .filter(|&i| self.jobs[&job].tasks[i].state == TaskState::Queued)
                .collect();
            for i in queued {
                self.jobs
                    .task_mut(&job, i)
                    .cancel(why.clone(), self.now.wall);
                self.emit_state(&job, i);
            }
            touched.insert(job);
        }
        touched
    }

    /// Phase 4: a reservation for each placement; returns the jobs that
    /// changed.
    fn reserve_placed(&mut self, placed: Vec<Placed>, views: &[WorkerView]) -> HashSet<JobId> {
        let mut touched = HashSet::new();
        for p in placed {
            match p {
                Placed::Task {
                    job,
                    index,
                    worker,
                    grant,
                } => {
                    self.queue.preemptor_placed(&job, Some(index));
                    self.reserve(&job, index, views[worker].name.clone(), grant, None);
                    touched.insert(job);
                }
                Placed::Gang { job, mut members } => {
                    self.queue.preemptor_placed(&job, None);
                    members.sort_by_key(|(i, _, _)| *i);
                    let master = views[members[0].1].name.clone();
                    let addr = self
                        .book
                        .worker(&master)
                        .and_then(|a| a.addr.clone())
                        .unwrap_or_else(|| "127.0.0.1".into());
                    // Start at a random place in the range: other fleets (or
                    // a port a worker refused as busy) are then unlikely to
                    // be met again.
                    let port = self.book.free_rendezvous_port(&master, self.rng.next_u64());
                    let world = members.len() as u32;
                    for (rank, (i, w, grant)) in members.into_iter().enumerate() {
                        let rv = Rendezvous {
                            rank: rank as u32,
                            world_size: world,
                            master_addr: addr.clone(),
                            master_port: port,
                        };
                        self.reserve(&job, i, views[w].name.clone(), grant, Some(rv));
                    }
                    touched.insert(job);
                }
            }
        }
        touched
    }

    /// Creates the reservation for one task on one worker.
    fn reserve(
        &mut self,
        job: &JobId,
        i: usize,
        worker: WorkerId,
        grant: Grant,
        rendezvous: Option<Rendezvous>,
    ) {
        let j = self.jobs.job_mut(job);
        let task = TaskSpec::clone(&j.specs[i]);
        let owner = j.owner.clone();
        // A secret, so not from the engine's seeded generator, whose
        // numbers show in job ids.
        let token = gpufleet_schema::lease::new_token();
        let t = &mut j.tasks[i];
        t.reserve(worker.clone(), grant.clone(), token.clone());
        let key = subjects::lease_key(&worker, &t.id, t.attempt);
        let lease = Lease {
            owner,
            job_id: job.clone(),
            task_id: t.id.clone(),
            attempt: t.attempt,
            worker,
            state: LeaseState::Reserved,
            reason: None,
            task,
            grant,
            rendezvous,
            lease_ttl: self.cfg.lease_ttl,
            instance: None,
            reserved_at: self.now.wall,
            token,
            // Signed by the runtime as it writes the reservation.
            signer: None,
            signature: None,
            claim_rev: None,
            ready: false,
            gpu_grant: None,
            preempt: None,
        };
        self.queue.fits_somewhere(&lease.task_id);
        self.metrics.reservation(Reservation::Made);
        if let Some(since) = self.queue.waiting_since([&lease.task_id]) {
            self.metrics
                .queue_wait(self.now.mono.saturating_duration_since(since));
        }
        self.book.reserve(key.clone(), lease.clone());
        self.fx.create_leases.push((key.into(), lease));
        self.emit_state(job, i);
    }

    /// What placement is asked for one task; `elsewhere` keeps it off the
    /// workers its earlier attempts ran on.
    pub(super) fn request(&self, job: &JobRecord, i: usize, elsewhere: bool) -> TaskRequest {
        let spec = &job.specs[i];
        let task = &job.tasks[i].id;
        let mut avoid = self.queue.avoided(task, self.now.mono);
        if elsewhere {
            avoid.extend(self.queue.tried(task).iter().cloned());
        }
        TaskRequest {
            cpus_milli: spec.resources.cpus_milli(),
            memory: spec.resources.memory_bytes(),
            gpu: spec.resources.gpu_request(),
            labels: job.spec.constraints.labels.clone(),
            workers: job.spec.constraints.workers.clone(),
            avoid,
            load: spec.load.as_ref().map(|l| LoadAsk {
                cpus_milli: l.cpus_milli(),
                memory: l.memory_bytes(),
            }),
        }
    }

    /// Places one task on `views`: through the pass's index, or (without
    /// the shortcuts) by the plain scan it must agree with.
    fn place_one(
        &self,
        candidates: &mut Candidates,
        req: &TaskRequest,
        views: &mut [WorkerView],
    ) -> Placement {
        if self.shortcuts {
            candidates.place(req, views)
        } else {
            placement::place(std::slice::from_ref(req), views)
        }
    }

    /// Whether any of these tasks was tried on some worker before.
    fn has_tried(&self, job: &JobRecord, tasks: &[usize]) -> bool {
        tasks
            .iter()
            .any(|&i| !self.queue.tried(&job.tasks[i].id).is_empty())
    }

    /// Everything placement looks at for one task. `job_part` is
    /// [`job_signature`] of its job; the per-task part is hashed only for
    /// a task the queue says something of.
    fn sig_key(&self, job: &JobRecord, i: usize, job_part: JobPart, keys: &RandomState) -> SigKey {
        let spec = &job.specs[i];
        let r = &spec.resources;
        let id = &job.tasks[i].id;
        SigKey {
            job: job_part.hash,
            cpus_milli: r.cpus_milli(),
            memory: r.memory_bytes(),
            gpu: match r.gpu_request() {
                GpuRequest::None => (0, 0, 0),
                GpuRequest::Whole { count, memory } => (1, count, memory),
                GpuRequest::Share { memory } => (2, 0, memory),
            },
            load: spec
                .load
                .as_ref()
                .map(|l| (l.cpus_milli(), l.memory_bytes())),
            task: (job_part.known && self.queue.knows(id)).then(|| {
                let mut h = keys.build_hasher();
                self.queue.hash_avoided(id, &mut h);
                h.finish()
            }),
        }
    }
}

/// The part of a task's signature its job decides.
fn job_signature(job: &JobRecord, keys: &RandomState) -> u64 {
    let mut h = keys.build_hasher();
    job.spec.constraints.labels.hash(&mut h);
    job.spec.constraints.workers.hash(&mut h);
    h.finish()
}
