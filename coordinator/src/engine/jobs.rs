//! The job table: the record of every job that has not finished (and of
//! finished ones until their record is stored as done), a bounded window
//! of recently finished jobs for `jobs.list`, and the submission counter.
//!
//! It finds records and tells which task a lease or a result speaks for;
//! what happens to a task is a method of its record (`state.rs`), so that
//! one place decides what each transition resets. Finished jobs leave the
//! table once their done record is stored: memory does not grow with the
//! history, which the jobs bucket keeps (and serves on demand).

use std::collections::{HashMap, VecDeque};
use std::ops::Index;

use gpufleet_schema::{JobId, JobSpec, JobState, JobStatus, Lease, TaskId, UserId};
use time::OffsetDateTime;

use crate::state::{JobRecord, TaskRecord};

/// How many finished jobs `jobs.list` can show beside the unfinished.
pub const RECENT_FINISHED: usize = 1000;

pub struct JobTable {
    jobs: HashMap<JobId, JobRecord>,
    /// Summaries of the newest finished jobs no longer in `jobs`, oldest
    /// first, with their submission order.
    recent: VecDeque<(u64, JobStatus)>,
    /// The next submission's place in the queue's tie-break.
    next_seq: u64,
}

impl JobTable {
    pub fn new() -> JobTable {
        JobTable {
            jobs: HashMap::new(),
            recent: VecDeque::new(),
            next_seq: 1,
        }
    }

    /// Remembers a finished job that is not in the table, for `jobs.list`
    /// (at start-up, from the stored done records).
    pub fn remember_finished(&mut self, seq: u64, summary: JobStatus) {
        self.next_seq = self.next_seq.max(seq + 1);
        self.recent.retain(|(_, s)| s.job_id != summary.job_id);
        self.recent.push_back((seq, summary));
        while self.recent.len() > RECENT_FINISHED {
            self.recent.pop_front();
        }
    }

    /// A finished job's record is stored as done: it leaves the table for
    /// the window.
    pub fn retire(&mut self, id: &JobId) {
        if let Some(job) = self.jobs.remove(id) {
            self.remember_finished(job.seq, job.status(false));
        }
    }

    /// Drops a job that was never stored (its submit failed).
    pub fn drop_unstored(&mut self, id: &JobId) -> Option<JobRecord> {
        match self.jobs.get(id) {
            Some(j) if !j.stored => self.jobs.remove(id),
            _ => None,
        }
    }

    /// Forgets a deleted job's summary.
    pub fn forget(&mut self, id: &JobId) {
        self.recent.retain(|(_, s)| &s.job_id != id);
    }

    /// Drops from the window what finished before `before`.
    pub fn expire_recent(&mut self, before: OffsetDateTime) {
        self.recent
            .retain(|(_, s)| s.finished_at.is_none_or(|f| f >= before));
    }

    /// The summaries in the window of newest finished jobs.
    pub fn recent(&self) -> impl Iterator<Item = &JobStatus> {
        self.recent.iter().map(|(_, s)| s)
    }

    /// How many jobs the table holds (the window not counted).
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Loads a persisted job at start-up.
    pub fn restore(&mut self, job: JobRecord) {
        self.next_seq = self.next_seq.max(job.seq + 1);
        self.jobs.insert(job.id.clone(), job);
    }

    /// Adds a newly submitted job, behind every earlier submission.
    pub fn add(
        &mut self,
        id: JobId,
        owner: UserId,
        spec: JobSpec,
        at: OffsetDateTime,
    ) -> &mut JobRecord {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut job = JobRecord::new(id.clone(), seq, spec, at);
        job.owner = owner;
        self.jobs.entry(id).insert_entry(job).into_mut()
    }

    pub fn get(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut JobRecord> {
        self.jobs.get_mut(id)
    }

    /// A job the engine knows exists (its id came from this table).
    pub fn job_mut(&mut self, id: &JobId) -> &mut JobRecord {
        self.jobs.get_mut(id).expect("a job id from the table")
    }

    pub fn task_mut(&mut self, id: &JobId, i: usize) -> &mut TaskRecord {
        &mut self.job_mut(id).tasks[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = (&JobId, &JobRecord)> {
        self.jobs.iter()
    }

    /// Up to `limit` jobs `caller` may see, newest first, optionally of one
    /// status: every job in the table and the window of recently finished
    /// ones.
    pub fn newest(
        &self,
        status: Option<JobState>,
        limit: usize,
        caller: &super::Caller,
    ) -> Vec<JobStatus> {
        let mut jobs: Vec<(u64, &JobRecord)> = self
            .jobs
            .values()
            .filter(|j| j.stored && status.is_none_or(|s| j.status == s) && caller.sees(&j.owner))
            .map(|j| (j.seq, j))
            .collect();
        jobs.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        jobs.truncate(limit);
        let recent = self
            .recent
            .iter()
            .filter(|(_, s)| status.is_none_or(|st| s.status == st) && caller.sees(&s.owner));
        let mut out: Vec<(u64, JobStatus)> = jobs
            .into_iter()
            .map(|(seq, j)| (seq, j.status(false)))
            .chain(recent.map(|(seq, s)| (*seq, s.clone())))
            .collect();
        out.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        out.truncate(limit);
        out.into_iter().map(|(_, s)| s).collect()
    }

    pub fn find_task(&self, task: &TaskId) -> Option<(JobId, usize)> {
        let (job, _) = task.job_and_index()?;
        let i = self.jobs.get(&job)?.task_index(task)?;
        Some((job, i))
    }

    /// The task a lease is for, if the lease is for its current attempt
    /// and the task has not ended (whichever worker holds it).
    pub fn attempt_of(&self, l: &Lease) -> Option<(JobId, usize)> {
        let job = self.jobs.get(&l.job_id)?;
        let i = job.task_index(&l.task_id)?;
        let t = &job.tasks[i];
        (t.attempt == l.attempt && !t.is_final()).then(|| (l.job_id.clone(), i))
    }

    /// The task a lease is for, if the lease is for its current attempt on
    /// the worker the record names, and the task is still in play.
    pub fn current_task(&self, l: &Lease) -> Option<(JobId, usize)> {
        let (job, i) = self.attempt_of(l)?;
        (self.jobs[&job].tasks[i].worker.as_ref() == Some(&l.worker)).then_some((job, i))
    }
}

impl Index<&JobId> for JobTable {
    type Output = JobRecord;

    fn index(&self, id: &JobId) -> &JobRecord {
        &self.jobs[id]
    }
}
