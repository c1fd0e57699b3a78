//! The job table: every job record by id, and the submission counter.
//!
//! It finds records and tells which task a lease or a result speaks for;
//! what happens to a task is a method of its record (`state.rs`), so that
//! one place decides what each transition resets.

use std::collections::HashMap;
use std::ops::Index;

use gpufleet_schema::{JobId, JobSpec, JobState, JobStatus, Lease, TaskId};
use time::OffsetDateTime;

use crate::state::{JobRecord, TaskRecord};

pub struct JobTable {
    jobs: HashMap<JobId, JobRecord>,
    /// The next submission's place in the queue's tie-break.
    next_seq: u64,
}

impl JobTable {
    pub fn new() -> JobTable {
        JobTable {
            jobs: HashMap::new(),
            next_seq: 1,
        }
    }

    /// Loads a persisted job at start-up.
    pub fn restore(&mut self, job: JobRecord) {
        self.next_seq = self.next_seq.max(job.seq + 1);
        self.jobs.insert(job.id.clone(), job);
    }

    /// Adds a newly submitted job, behind every earlier submission.
    pub fn add(&mut self, id: JobId, spec: JobSpec, at: OffsetDateTime) -> &JobRecord {
        let seq = self.next_seq;
        self.next_seq += 1;
        let job = JobRecord::new(id.clone(), seq, spec, at);
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

    /// Up to `limit` jobs, newest first, optionally of one status.
    pub fn newest(&self, status: Option<JobState>, limit: usize) -> Vec<JobStatus> {
        let mut jobs: Vec<&JobRecord> = self
            .jobs
            .values()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
        jobs.iter().take(limit).map(|j| j.status(false)).collect()
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
