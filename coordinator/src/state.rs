//! Job and task records: what the coordinator persists in `gpufleet-jobs`
//! and how a job's status follows from its tasks'.
//!
//! The records are the coordinator's own format (not part of the public
//! contract): clients read jobs through the API, never from the bucket.

use gpufleet_schema::status::MAX_JOB_ERRORS;
use gpufleet_schema::{
    AttemptError, Grant, JobId, JobSpec, JobState, JobStatus, TaskCounts, TaskId, TaskSpec,
    TaskState, TaskStatus, TaskUsage, UserId, WorkerId,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use time::OffsetDateTime;

/// Results at most this large are kept in the job record; larger ones stay
/// in the events stream and are fetched when a client asks.
pub const INLINE_RESULT_BYTES: usize = 4096;
/// The longest reason a record keeps (reasons quote workers and tasks);
/// what is longer is cut, so that a record's size stays bounded.
pub const MAX_REASON_BYTES: usize = 1024;

/// The longest reason an error keeps: a job keeps up to
/// [`MAX_JOB_ERRORS`] of them in its record's head.
pub const MAX_ERROR_REASON_BYTES: usize = 256;

/// `why`, cut to [`MAX_REASON_BYTES`].
pub fn bounded_reason(why: String) -> String {
    if why.len() <= MAX_REASON_BYTES {
        return why;
    }
    gpufleet_schema::text::cut(&why, MAX_REASON_BYTES)
}

/// Why a task waits or ended: a bounded text shared between the tasks
/// that say the same. A million queued tasks waiting for one reason hold
/// one copy of it, and a scheduling pass tells that a task's reason is
/// unchanged by comparing pointers, not text (see `schedule.rs`). Stored
/// as a plain string.
#[derive(Clone)]
pub struct Reason(Arc<str>);

impl Reason {
    /// `why`, cut to [`MAX_REASON_BYTES`].
    pub fn new(why: impl Into<String>) -> Reason {
        Reason(Arc::from(bounded_reason(why.into())))
    }

    /// `fresh`, as the very `previous` if that says the same: tasks that
    /// already share `previous` then see this one as unchanged by pointer.
    pub fn reusing(fresh: impl Into<String>, previous: Option<&Reason>) -> Reason {
        let fresh = bounded_reason(fresh.into());
        match previous {
            Some(p) if *p.0 == *fresh => p.clone(),
            _ => Reason(Arc::from(fresh)),
        }
    }

    /// Whether both are the one shared text (a pointer compare): the
    /// cheap test that a reason did not change.
    pub fn is(&self, other: &Reason) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Reason {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Reason {
    fn eq(&self, other: &Reason) -> bool {
        self.is(other) || self.0 == other.0
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl std::fmt::Debug for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Reason {
    fn from(why: &str) -> Reason {
        Reason::new(why)
    }
}

impl From<String> for Reason {
    fn from(why: String) -> Reason {
        Reason::new(why)
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.0.to_string()
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reason, D::Error> {
        String::deserialize(d).map(Reason::new)
    }
}

/// `tasks` with each one equal to the one before it sharing that one's
/// allocation (a job's alike tasks are neighbours: copies, arrays).
pub fn share(tasks: Vec<TaskSpec>) -> Vec<Arc<TaskSpec>> {
    let mut out: Vec<Arc<TaskSpec>> = Vec::with_capacity(tasks.len());
    for t in tasks {
        match out.last() {
            Some(prev) if **prev == t => out.push(prev.clone()),
            _ => out.push(Arc::new(t)),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    /// The user that submitted it (from the API subject).
    #[serde(default = "UserId::default_user")]
    pub owner: UserId,
    /// Submission order across the fleet; the queue's tie-breaker.
    pub seq: u64,
    /// The job's own spec; its tasks' are in `specs` (here `tasks` is
    /// empty, but in a record an earlier version stored whole: see
    /// [`JobRecord::share_specs`]).
    pub spec: JobSpec,
    /// Each task's spec, alike neighbours sharing one: a job of a
    /// thousand copies of one task holds its spec once, not a thousand
    /// times (a queued task's largest part, with its heap).
    #[serde(skip)]
    pub specs: Vec<Arc<TaskSpec>>,
    pub status: JobState,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// Why a gang's current run is being torn down, while it is.
    #[serde(default)]
    pub gang_broken: Option<String>,
    pub tasks: Vec<TaskRecord>,
    /// Attempts that ended badly since the last reset, the newest
    /// [`MAX_JOB_ERRORS`]; `error_count` counts them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<AttemptError>,
    #[serde(default)]
    pub error_count: u32,
    /// Where each part of the stored record starts (see `store.rs`).
    #[serde(skip)]
    pub parts: Vec<u32>,
    /// Whether the record has been stored once: until then nothing of the
    /// job may run.
    #[serde(skip)]
    pub stored: bool,
    /// The id was the client's and the job is not stored yet: it may be a
    /// finished job's (no longer held), which the first write looks up.
    #[serde(skip)]
    pub verify: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub name: String,
    pub state: TaskState,
    /// The attempt that runs or will run next; 1 for the first.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerId>,
    /// Boxed, like the other fields only an attempt under way or ended
    /// has: a queued task (most of a long queue) keeps a pointer's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Box<Grant>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<serde_json::Value>>,
    /// Where a result too large to keep inline is, in `GPUFLEET_EVENTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// Whether any attempt got as far as starting its program.
    #[serde(default, skip_serializing_if = "is_false")]
    pub launched: bool,
    /// A gang member left out of this run by `min_tasks`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dropped: bool,
    /// The current attempt's random token, from its reservation: a result
    /// must carry it. Kept here so that a restarted coordinator still
    /// knows it after the lease is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The revision of the current attempt's claim, once seen: a result
    /// must name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_rev: Option<u64>,
    /// What the current attempt used, as its worker reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Box<TaskUsage>>,
    /// Why the coordinator asked the current attempt to stop, while it
    /// stops: decides how its end counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping: Option<Box<Stop>>,
    /// Attempts that do not count against `max_retries`: preempted ones,
    /// and those before a retry by hand.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spared: u32,
}

/// Why the coordinator stops a task's running attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// `gpufleet cancel JOB TASK`: the task ends CANCELLED.
    Cancel,
    /// For waiting work of a higher class: the attempt ends INTERRUPTED
    /// and the task waits again without spending a retry.
    Preempt { by: JobId },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A task's transitions. Each is one method that decides every field it
/// sets and resets, so that no two paths leave a task half-changed. The
/// rule: a task's `worker`, `grant`, outcome and times describe its current
/// attempt; whenever it queues again, nothing of the attempt before is left
/// but its `reason` and `launched`.
impl TaskRecord {
    pub fn is_final(&self) -> bool {
        self.state.is_end()
    }

    /// The attempts that count against `max_retries`, this one included.
    pub fn counted_attempts(&self) -> u32 {
        self.attempt.saturating_sub(self.spared)
    }

    /// Whether its attempt is being preempted, and for which job.
    pub fn preempted_by(&self) -> Option<&JobId> {
        match self.stopping.as_deref() {
            Some(Stop::Preempt { by }) => Some(by),
            _ => None,
        }
    }

    /// The attempt was preempted: the next waits, and neither counts
    /// against `max_retries` more than the one before did.
    pub fn requeue_preempted(&mut self, why: impl Into<String>) {
        self.spared += 1;
        self.retry(why);
    }

    /// A retry asked for by hand: a new attempt with the whole of
    /// `max_retries` ahead of it.
    pub fn retry_by_hand(&mut self, why: impl Into<String>) {
        self.dropped = false;
        self.retry(why);
        self.spared = self.attempt - 1;
    }

    /// Whether the current attempt holds (or is about to hold) a worker.
    pub fn holds_worker(&self) -> bool {
        matches!(self.state, TaskState::Reserved | TaskState::Running)
    }

    /// Whether `reason` is the very text it waits for (a pointer
    /// compare): then nothing needs writing.
    pub fn waits_because(&self, reason: &Reason) -> bool {
        self.reason.as_ref().is_some_and(|r| r.is(reason))
    }

    /// Why it waits, while queued; returns whether that changed. The same
    /// words in another copy are taken on too, unchanged, so that the
    /// next pass finds them by pointer.
    pub fn wait_because(&mut self, reason: &Reason) -> bool {
        let same = self.reason.as_ref() == Some(reason);
        self.reason = Some(reason.clone());
        !same
    }

    /// Placement chose `worker`: the current attempt is reserved there,
    /// under `token`.
    pub fn reserve(&mut self, worker: WorkerId, grant: Grant, token: String) {
        self.state = TaskState::Reserved;
        self.worker = Some(worker);
        self.grant = Some(Box::new(grant));
        self.reason = None;
        self.token = Some(token);
        self.claim_rev = None;
    }

    /// Its worker claimed the reservation at revision `claim_rev`: the
    /// attempt runs from `at`.
    pub fn start(&mut self, at: OffsetDateTime, claim_rev: u64) {
        self.state = TaskState::Running;
        self.started_at = Some(at);
        self.launched = true;
        self.reason = None;
        self.claim_rev = Some(claim_rev);
    }

    /// Keeps what the worker reported of the current attempt (its result,
    /// and when its program started), before the attempt ends. `seq` is
    /// where the result event is, for a result too large to keep inline.
    pub fn record_report(
        &mut self,
        result: Option<serde_json::Value>,
        seq: u64,
        started_at: Option<OffsetDateTime>,
        usage: Option<TaskUsage>,
    ) {
        self.usage = usage.map(Box::new);
        if self.started_at.is_none() {
            self.started_at = started_at;
        }
        self.launched |= started_at.is_some();
        let inline = |r: &serde_json::Value| {
            serde_json::to_vec(r).map_or(0, |b| b.len()) <= INLINE_RESULT_BYTES
        };
        (self.result, self.result_seq) = match result {
            Some(r) if inline(&r) => (Some(Box::new(r)), None),
            Some(_) => (None, Some(seq)),
            None => (None, None),
        };
    }

    /// The current attempt ended in `state`. Final unless [`retry`] follows.
    ///
    /// [`retry`]: TaskRecord::retry
    pub fn end(
        &mut self,
        state: TaskState,
        exit_code: Option<i32>,
        reason: Option<String>,
        at: OffsetDateTime,
    ) {
        self.state = state;
        self.exit_code = exit_code;
        self.reason = reason.map(Reason::new);
        self.finished_at = Some(at);
    }

    /// Ends the task without (another) run; what the attempt reported, if
    /// anything, stays.
    pub fn cancel(&mut self, reason: impl Into<String>, at: OffsetDateTime) {
        let exit_code = self.exit_code;
        self.end(TaskState::Cancelled, exit_code, Some(reason.into()), at);
    }

    /// A gang member left out of this run by `min_tasks`.
    pub fn drop_from_run(&mut self, reason: impl Into<String>, at: OffsetDateTime) {
        self.cancel(reason, at);
        self.dropped = true;
    }

    /// The reservation was not taken up (refused, expired, not written, or
    /// withdrawn with its gang): nothing ran, so the same attempt waits
    /// again.
    pub fn requeue_same_attempt(&mut self, why: impl Into<String>) {
        self.queue_again(self.attempt, why.into());
    }

    /// The attempt ended and may be retried: the next one waits.
    pub fn retry(&mut self, why: impl Into<String>) {
        self.queue_again(self.attempt + 1, why.into());
    }

    /// Its gang runs again, as a whole, as `attempt`; a member dropped by
    /// `min_tasks` last time takes part again.
    pub fn requeue_with_gang(&mut self, attempt: u32, why: impl Into<String>) {
        self.dropped = false;
        self.queue_again(attempt, why.into());
    }

    fn queue_again(&mut self, attempt: u32, why: String) {
        self.state = TaskState::Queued;
        self.attempt = attempt;
        self.worker = None;
        self.grant = None;
        self.exit_code = None;
        self.result = None;
        self.result_seq = None;
        self.started_at = None;
        self.finished_at = None;
        self.reason = Some(Reason::new(why));
        self.token = None;
        self.claim_rev = None;
        self.usage = None;
        self.stopping = None;
    }
}

/// How a broken gang's run came out, once none of it held a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GangSettled {
    /// The job was cancelled: every member still in play is cancelled.
    Cancelled,
    /// The whole gang waits again, as this attempt (at once if its run
    /// was preempted).
    Requeued { attempt: u32, preempted: bool },
    /// Its retries are spent: every member still in play is cancelled.
    Failed,
}

impl JobRecord {
    pub fn new(id: JobId, seq: u64, mut spec: JobSpec, now: OffsetDateTime) -> JobRecord {
        let specs = share(std::mem::take(&mut spec.tasks));
        let tasks = specs
            .iter()
            .enumerate()
            .map(|(i, t)| TaskRecord {
                id: TaskId::for_index(&id, i),
                name: t.display_name(i),
                state: TaskState::Queued,
                attempt: 1,
                worker: None,
                grant: None,
                exit_code: None,
                result: None,
                result_seq: None,
                reason: None,
                started_at: None,
                finished_at: None,
                launched: false,
                dropped: false,
                token: None,
                claim_rev: None,
                usage: None,
                stopping: None,
                spared: 0,
            })
            .collect();
        JobRecord {
            id,
            owner: UserId::default_user(),
            seq,
            spec,
            specs,
            status: JobState::Queued,
            reason: None,
            submitted_at: now,
            started_at: None,
            finished_at: None,
            cancel_requested: false,
            gang_broken: None,
            tasks,
            errors: Vec::new(),
            error_count: 0,
            parts: vec![0],
            stored: false,
            verify: false,
        }
    }

    /// A record decoded whole (as an earlier version stored it): its
    /// tasks' specs move to `specs`, shared.
    pub fn share_specs(&mut self) {
        if self.specs.is_empty() {
            self.specs = share(std::mem::take(&mut self.spec.tasks));
        }
    }

    /// The spec as submitted, tasks and all.
    pub fn full_spec(&self) -> JobSpec {
        JobSpec {
            tasks: self.specs.iter().map(|t| TaskSpec::clone(t)).collect(),
            ..self.spec.clone()
        }
    }

    /// Whether `spec` is the one this job was submitted with.
    pub fn same_spec(&self, spec: &JobSpec) -> bool {
        spec.tasks.len() == self.specs.len()
            && spec.tasks.iter().zip(&self.specs).all(|(a, b)| *a == **b)
            && JobSpec {
                tasks: Vec::new(),
                ..spec.clone()
            } == self.spec
    }

    /// Asks the job to stop; false if it has ended or was asked already.
    pub fn request_cancel(&mut self) -> bool {
        if self.status.is_finished() || self.cancel_requested {
            return false;
        }
        self.cancel_requested = true;
        true
    }

    /// Notes that task `i`'s current attempt ended in `state` (an error
    /// if [`AttemptError::counts`] says so) at `at`.
    pub fn note_end(
        &mut self,
        i: usize,
        state: TaskState,
        exit_code: Option<i32>,
        why: &str,
        at: OffsetDateTime,
    ) {
        if !AttemptError::counts(state) {
            return;
        }
        let t = &self.tasks[i];
        if self.errors.len() >= MAX_JOB_ERRORS {
            self.errors.remove(0);
        }
        self.errors.push(AttemptError {
            at,
            task_id: t.id.clone(),
            task: t.name.clone(),
            attempt: t.attempt,
            worker: t.worker.clone(),
            state,
            reason: gpufleet_schema::text::cut(why, MAX_ERROR_REASON_BYTES),
            exit_code,
        });
        self.error_count = self.error_count.saturating_add(1);
    }

    /// Clears the errors (`gpufleet errors --reset`); returns what they
    /// were and how many.
    pub fn reset_errors(&mut self) -> (Vec<AttemptError>, u32) {
        let count = std::mem::take(&mut self.error_count);
        (std::mem::take(&mut self.errors), count)
    }

    /// Marks the gang's current run as failing; the first reason stays.
    pub fn break_gang(&mut self, why: &str) {
        if self.gang_broken.is_none() {
            self.gang_broken = Some(why.to_string());
        }
    }

    /// Ends a broken gang's run, once none of its members holds a worker:
    /// it runs again as a whole (as attempt + 1 if any member ran, within
    /// `max_retries`), or, if cancelled or out of retries, ends.
    pub fn settle_gang(&mut self, why: &str, at: OffsetDateTime) -> GangSettled {
        self.gang_broken = None;
        let attempt = self.tasks.iter().map(|t| t.attempt).max().unwrap_or(1);
        let counted = self.tasks.iter().map(|t| t.counted_attempts()).max();
        let ran = self.tasks.iter().any(|t| t.started_at.is_some());
        // A preempted run is no failure: it costs no retry.
        let preempted = self.tasks.iter().any(|t| t.preempted_by().is_some());
        let (settled, reason) = if self.cancel_requested {
            (GangSettled::Cancelled, "cancelled".to_string())
        } else if !ran || preempted || counted.unwrap_or(1) <= self.spec.max_retries {
            let next = if ran { attempt + 1 } else { attempt };
            let why = if preempted {
                format!("gang run {attempt} was preempted: {why}")
            } else {
                format!("gang run {attempt} failed: {why}")
            };
            for t in &mut self.tasks {
                let before = t.attempt;
                t.requeue_with_gang(next, why.clone());
                if preempted {
                    t.spared += next - before;
                }
            }
            return GangSettled::Requeued {
                attempt: next,
                preempted,
            };
        } else {
            (GangSettled::Failed, format!("its gang failed: {why}"))
        };
        for t in self.tasks.iter_mut().filter(|t| !t.is_final()) {
            t.cancel(reason.clone(), at);
        }
        settled
    }

    /// The index of a task of this job, from its id.
    pub fn task_index(&self, task: &TaskId) -> Option<usize> {
        let suffix = task
            .as_str()
            .strip_prefix(self.id.as_str())?
            .strip_prefix('-')?;
        let i: usize = suffix.parse().ok()?;
        (i < self.tasks.len()).then_some(i)
    }

    pub fn counts(&self) -> TaskCounts {
        let mut c = TaskCounts::default();
        for t in &self.tasks {
            c.add(t.state);
        }
        c
    }

    /// Recomputes the job's status and reason from its tasks; returns
    /// whether the status changed. `now` stamps `finished_at` when the job
    /// ends. A waiting job says why its first waiting task waits; a
    /// finished one why it ended.
    pub fn derive_status(&mut self, now: OffsetDateTime) -> bool {
        let before = self.status;
        let all_final = self.tasks.iter().all(TaskRecord::is_final);
        self.status = if all_final {
            if self.cancel_requested {
                JobState::Aborted
            } else if self
                .tasks
                .iter()
                .all(|t| t.state == TaskState::Succeeded || t.dropped)
                && self.tasks.iter().any(|t| t.state == TaskState::Succeeded)
            {
                JobState::Completed
            } else if self.tasks.iter().all(|t| !t.launched) {
                JobState::FailedToRun
            } else {
                JobState::ExecutionException
            }
        } else if self.tasks.iter().any(|t| t.state == TaskState::Running) {
            JobState::Running
        } else if self.tasks.iter().any(|t| t.state == TaskState::Reserved) {
            JobState::Dispatched
        } else if self.started_at.is_some() {
            // Some tasks ran and ended; the rest wait their turn.
            JobState::Running
        } else {
            JobState::Queued
        };
        if self.status == JobState::Running && self.started_at.is_none() {
            self.started_at = Some(now);
        }
        if self.status.is_finished() {
            if self.finished_at.is_none() {
                self.finished_at = Some(now);
            }
            self.reason = self.end_reason().map(bounded_reason);
        } else {
            self.reason = self
                .tasks
                .iter()
                .find(|t| t.state == TaskState::Queued)
                .and_then(|t| t.reason.as_ref().map(|r| r.to_string()));
        }
        self.status != before
    }

    /// Why a finished job ended as it did, in one line.
    fn end_reason(&self) -> Option<String> {
        match self.status {
            JobState::Completed => None,
            JobState::Aborted => Some("cancelled".into()),
            _ => {
                let bad: Vec<&TaskRecord> = self
                    .tasks
                    .iter()
                    .filter(|t| t.state != TaskState::Succeeded && !t.dropped)
                    .collect();
                let first = bad.first()?;
                let what = match (first.state, first.exit_code, &first.reason) {
                    (TaskState::Failed, Some(code), _) => format!("exited with code {code}"),
                    (_, _, Some(r)) => r.to_string(),
                    (s, _, None) => s.to_string(),
                };
                Some(format!(
                    "{} of {} tasks did not succeed; {} ({}) {}",
                    bad.len(),
                    self.tasks.len(),
                    first.name,
                    first.state,
                    what
                ))
            }
        }
    }

    /// The job with tasks `offset..offset + limit`, fewer if their status
    /// would not fit one reply (see [`PAGE_BYTES`]).
    pub fn page(&self, offset: usize, limit: usize) -> JobStatus {
        let mut status = self.status(false);
        status.errors = self.errors.clone();
        status.error_count = self.error_count;
        let mut used = 0;
        for t in self.tasks.iter().skip(offset).take(limit) {
            let size = t.status_size();
            if used + size > PAGE_BYTES && !status.tasks.is_empty() {
                break;
            }
            used += size;
            status.tasks.push(t.status());
        }
        status
    }

    pub fn status(&self, with_tasks: bool) -> JobStatus {
        JobStatus {
            job_id: self.id.clone(),
            owner: self.owner.clone(),
            name: self.spec.name.clone(),
            status: self.status,
            reason: self.reason.clone(),
            priority: self.spec.priority,
            submitted_at: self.submitted_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            counts: self.counts(),
            tasks: if with_tasks {
                self.tasks.iter().map(TaskRecord::status).collect()
            } else {
                vec![]
            },
            errors: Vec::new(),
            error_count: 0,
        }
    }
}

/// The most bytes of task status one `jobs.get` reply carries: half the
/// default `max_payload`, room to spare for the job's own fields.
pub const PAGE_BYTES: usize = 512 * 1024;

impl TaskRecord {
    /// At most what this task's status takes in a reply, in either
    /// encoding.
    fn status_size(&self) -> usize {
        let gpus = self.grant.as_ref().map_or(0, |g| g.gpus.len());
        512 + self.name.len()
            + self.reason.as_ref().map_or(0, |r| r.len())
            + gpus * 160
            + self.result.as_ref().map_or(0, |_| INLINE_RESULT_BYTES * 2)
    }

    pub fn status(&self) -> TaskStatus {
        TaskStatus {
            task_id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            attempt: self.attempt,
            worker: self.worker.clone(),
            gpus: self
                .grant
                .as_ref()
                .map(|g| g.gpus.iter().map(|g| g.uuid.clone()).collect())
                .unwrap_or_default(),
            exit_code: self.exit_code,
            result: self.result.as_deref().cloned(),
            reason: self.reason.as_ref().map(|r| r.to_string()),
            started_at: self.started_at,
            finished_at: self.finished_at,
            usage: self.usage.as_deref().cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::{Encoding, TaskSpec};

    fn spec(n: usize) -> JobSpec {
        let tasks: Vec<TaskSpec> = (0..n)
            .map(|_| Encoding::Json.decode(br#"{"command": ["true"]}"#).unwrap())
            .collect();
        JobSpec {
            id: None,
            name: Some("t".into()),
            priority: 0,
            max_retries: 0,
            gang: false,
            min_tasks: None,
            max_parallel: None,
            after_ok: vec![],
            after_any: vec![],
            unschedulable_after: None,
            preemptible: false,
            constraints: Default::default(),
            tasks,
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
    }

    #[test]
    fn status_follows_tasks() {
        let mut j = JobRecord::new(JobId::new("j").unwrap(), 1, spec(2), now());
        assert!(!j.derive_status(now()));
        assert_eq!(j.status, JobState::Queued);
        j.tasks[0].state = TaskState::Reserved;
        j.derive_status(now());
        assert_eq!(j.status, JobState::Dispatched);
        j.tasks[0].state = TaskState::Running;
        j.derive_status(now());
        assert_eq!(j.status, JobState::Running);
        assert!(j.started_at.is_some());
        j.tasks[0].state = TaskState::Succeeded;
        j.tasks[0].launched = true;
        j.derive_status(now());
        assert_eq!(j.status, JobState::Running, "one task still queued");
        j.tasks[1].state = TaskState::Failed;
        j.tasks[1].exit_code = Some(3);
        j.tasks[1].launched = true;
        j.derive_status(now());
        assert_eq!(j.status, JobState::ExecutionException);
        assert!(j.finished_at.is_some());
        assert!(j.reason.as_deref().unwrap().contains("exited with code 3"));
    }

    #[test]
    fn never_launched_is_failed_to_run_and_cancel_is_aborted() {
        let mut j = JobRecord::new(JobId::new("j").unwrap(), 1, spec(1), now());
        j.tasks[0].state = TaskState::Failed;
        j.derive_status(now());
        assert_eq!(j.status, JobState::FailedToRun);
        let mut j = JobRecord::new(JobId::new("k").unwrap(), 1, spec(1), now());
        j.cancel_requested = true;
        j.tasks[0].state = TaskState::Cancelled;
        j.derive_status(now());
        assert_eq!(j.status, JobState::Aborted);
    }

    /// A task that was reserved, ran, reported and failed.
    fn ran_and_failed() -> TaskRecord {
        let mut j = JobRecord::new(JobId::new("j").unwrap(), 1, spec(1), now());
        let mut t = j.tasks.remove(0);
        t.reserve(WorkerId::new("w").unwrap(), Grant::default(), "tok".into());
        t.start(now(), 5);
        let usage = TaskUsage {
            peak_rss: gpufleet_schema::ByteSize::mib(300),
            cpu_seconds: 2.5,
            samples: 3,
            ..Default::default()
        };
        t.record_report(
            Some(serde_json::json!({"loss": 1})),
            7,
            Some(now()),
            Some(usage),
        );
        assert!(t.status().usage.is_some());
        t.end(
            TaskState::Failed,
            Some(1),
            Some("exited with code 1".into()),
            now(),
        );
        t
    }

    #[test]
    fn every_requeue_leaves_nothing_of_the_attempt_before() {
        type Requeue = fn(&mut TaskRecord);
        let requeues: [(&str, Requeue, u32); 3] = [
            ("retry", |t| t.retry("again"), 2),
            ("same attempt", |t| t.requeue_same_attempt("again"), 1),
            ("gang", |t| t.requeue_with_gang(5, "again"), 5),
        ];
        for (name, requeue, attempt) in requeues {
            let mut t = ran_and_failed();
            t.dropped = true;
            requeue(&mut t);
            let fresh = TaskRecord {
                state: TaskState::Queued,
                attempt,
                reason: Some("again".into()),
                // Whether any attempt ever ran stays: it tells a job that
                // failed to run from one that failed running.
                launched: true,
                // Only a gang's rerun brings back members left out.
                dropped: name != "gang",
                ..JobRecord::new(JobId::new("j").unwrap(), 1, spec(1), now()).tasks[0].clone()
            };
            assert_eq!(t, fresh, "{name}");
        }
    }

    #[test]
    fn a_large_result_is_kept_by_its_sequence_and_a_start_is_not_moved() {
        let mut t = ran_and_failed();
        let started = t.started_at;
        let big = serde_json::json!({"blob": "x".repeat(INLINE_RESULT_BYTES)});
        t.record_report(
            Some(big),
            42,
            Some(now() + time::Duration::seconds(5)),
            None,
        );
        assert_eq!((t.result.as_ref(), t.result_seq), (None, Some(42)));
        assert_eq!(t.started_at, started);
    }

    #[test]
    fn task_index_from_id() {
        let j = JobRecord::new(JobId::new("a-1").unwrap(), 1, spec(3), now());
        assert_eq!(j.task_index(&TaskId::new("a-1-2").unwrap()), Some(2));
        assert_eq!(j.task_index(&TaskId::new("a-1-3").unwrap()), None);
        assert_eq!(j.task_index(&TaskId::new("a-2").unwrap()), None);
    }
}
