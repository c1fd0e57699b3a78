//! One task cancelled, and tasks run again by hand: `jobs.cancel` with a
//! `task`, and `jobs.retry` (`gpufleet cancel JOB TASK`, `gpufleet retry
//! JOB [TASK]`).
//!
//! A retry runs the job's tasks that ended without succeeding (FAILED,
//! INTERRUPTED, LOST, TIMED_OUT, CANCELLED), or the one named, as a new
//! attempt with the whole of `max_retries` ahead of it. A gang runs again
//! whole. A finished job is reopened: it goes back to QUEUED (RUNNING if
//! any of it ran), off the done records and back among the active ones.

use gpufleet_schema::api::{code, MAX_TASKS_PER_PAGE};
use gpufleet_schema::{subjects, JobId, TaskState};

use super::talk::find_task;
use super::{not_found, Caller, Engine, Fetch, Reply, ReplyTx};
use crate::state::{JobRecord, Stop};

impl Engine {
    /// Cancels one task of a job: a waiting one ends at once, a running
    /// one is asked to stop and ends CANCELLED when it has; one that ended
    /// stays as it is. The rest of the job goes on.
    pub(super) fn cancel_task(&mut self, id: JobId, task: String, caller: Caller, tx: ReplyTx) {
        // One no longer held has finished: its tasks have all ended.
        let Some(tx) = self.held_for(&id, &caller, tx, Fetch::Cancel) else {
            return;
        };
        let job = &self.jobs[&id];
        let Some(i) = find_task(job, &task) else {
            let reply = Reply::error(code::NOT_FOUND, format!("job {id} has no task {task}"));
            self.fx.replies.push((tx, reply, None));
            return;
        };
        let t = &job.tasks[i];
        if job.spec.gang && !t.is_final() {
            let reply = Reply::error(
                code::BAD_REQUEST,
                format!("job {id} is a gang, whose tasks run and stop together: cancel the job"),
            );
            self.fx.replies.push((tx, reply, None));
            return;
        }
        match (t.state, &t.worker) {
            (TaskState::Queued, _) => {
                let why = format!("cancelled by {}", caller.user);
                self.jobs.task_mut(&id, i).cancel(why, self.now.wall);
                self.emit_state(&id, i);
                self.touch(&id);
            }
            (TaskState::Reserved | TaskState::Running, Some(w)) => {
                let key = subjects::lease_key(w, &t.id, t.attempt);
                self.jobs.task_mut(&id, i).stopping = Some(Box::new(Stop::Cancel));
                self.stop_lease(&id, i, &key);
                self.touch(&id);
            }
            _ => {}
        }
        let page = self.jobs[&id].page(0, MAX_TASKS_PER_PAGE as usize);
        self.fx
            .replies
            .push((tx, Reply::Job(Box::new(page)), Some(id)));
    }

    /// `jobs.retry`: runs the job's ended tasks (or the one named) again.
    pub(super) fn retry(&mut self, id: JobId, task: Option<String>, caller: Caller, tx: ReplyTx) {
        let reply = match self.jobs.get(&id) {
            Some(j) if j.stored && !caller.sees(&j.owner) => not_found(&id),
            Some(j) if j.stored && j.status.is_finished() => Reply::error(
                code::UNAVAILABLE,
                format!("job {id} has just finished and is being stored: try again in a moment"),
            ),
            Some(j) if j.stored => match retry_targets(j, task.as_deref()) {
                Ok(targets) => return self.rerun(&id, targets, &caller, tx),
                Err(reply) => reply,
            },
            // Not held (or not stored yet): a finished job is read from
            // the store and comes back as `Input::Reopen`.
            _ => {
                self.fx
                    .fetches
                    .push((id, caller, Fetch::Retry { task, tx }));
                return;
            }
        };
        self.fx.replies.push((tx, reply, None));
    }

    /// A finished job read back from its done record for a retry: it
    /// becomes an active job again, and its done record goes once its
    /// active one is stored.
    pub(super) fn reopen(
        &mut self,
        mut job: JobRecord,
        task: Option<String>,
        caller: Caller,
        tx: ReplyTx,
    ) {
        if self.jobs.get(&job.id).is_some() {
            // Taken back by a retry that came first.
            return self.retry(job.id.clone(), task, caller, tx);
        }
        let targets = match retry_targets(&job, task.as_deref()) {
            Ok(t) => t,
            Err(reply) => {
                self.fx.replies.push((tx, reply, None));
                return;
            }
        };
        let id = job.id.clone();
        job.stored = true;
        self.fx.reopened.push((id.clone(), job.parts.len()));
        self.jobs.restore(job);
        self.jobs.forget(&id);
        self.rerun(&id, targets, &caller, tx);
    }

    /// Queues `targets` of a job the table holds as new attempts (a gang:
    /// every member), reopening the job if it had finished, and answers
    /// once its record is stored.
    fn rerun(&mut self, id: &JobId, targets: Vec<usize>, caller: &Caller, tx: ReplyTx) {
        let why = format!("retried by {}", caller.user);
        let j = self.jobs.job_mut(id);
        let reopened = j.status.is_finished();
        let targets = if j.spec.gang {
            let next = j.tasks.iter().map(|t| t.attempt).max().unwrap_or(1) + 1;
            for t in &mut j.tasks {
                t.requeue_with_gang(next, why.clone());
                t.spared = next - 1;
            }
            (0..j.tasks.len()).collect()
        } else {
            for &i in &targets {
                j.tasks[i].retry_by_hand(why.clone());
            }
            targets
        };
        if reopened {
            j.cancel_requested = false;
            j.finished_at = None;
            j.gang_broken = None;
            let ran = j.started_at.is_some();
            self.queue.enqueue(&self.jobs[id]);
            if ran {
                // It started once, so what it waited for was met; those
                // jobs may be long forgotten.
                self.queue.set_deps_met(id.clone());
            }
        }
        for &i in &targets {
            let task = self.jobs[id].tasks[i].id.clone();
            self.queue.queued(&task, self.now.mono);
            self.emit_state(id, i);
        }
        self.touch(id);
        self.wants_schedule = true;
        tracing::info!(job_id = %id, tasks = targets.len(), reopened, user = %caller.user, "tasks retried by hand");
        let page = self.jobs[id].page(0, MAX_TASKS_PER_PAGE as usize);
        self.fx
            .replies
            .push((tx, Reply::Job(Box::new(page)), Some(id.clone())));
    }
}

/// The tasks a retry of `job` (of `task`, if named) runs again, or the
/// error to answer.
fn retry_targets(job: &JobRecord, task: Option<&str>) -> Result<Vec<usize>, Reply> {
    let id = &job.id;
    let finished = job.status.is_finished();
    if job.cancel_requested && !finished {
        return Err(Reply::error(
            code::CONFLICT,
            format!("job {id} is being cancelled: retry it once it has ended"),
        ));
    }
    let again = |state: TaskState| state.is_end() && state != TaskState::Succeeded;
    let Some(task) = task else {
        if job.spec.gang {
            return if finished {
                Ok((0..job.tasks.len()).collect())
            } else {
                Err(Reply::error(
                    code::CONFLICT,
                    format!("job {id} is a gang that has not ended: a gang runs again whole, once it has"),
                ))
            };
        }
        let targets: Vec<usize> = (0..job.tasks.len())
            .filter(|&i| again(job.tasks[i].state))
            .collect();
        if targets.is_empty() {
            return Err(Reply::error(
                code::CONFLICT,
                format!("job {id} has no task that ended without succeeding"),
            ));
        }
        return Ok(targets);
    };
    let Some(i) = find_task(job, task) else {
        return Err(Reply::error(
            code::NOT_FOUND,
            format!("job {id} has no task {task}"),
        ));
    };
    if job.spec.gang {
        return Err(Reply::error(
            code::BAD_REQUEST,
            format!("job {id} is a gang, which runs again whole: retry the job without a task"),
        ));
    }
    let t = &job.tasks[i];
    if !again(t.state) {
        let why = if t.state == TaskState::Succeeded {
            "succeeded"
        } else {
            "has not ended"
        };
        return Err(Reply::error(
            code::CONFLICT,
            format!(
                "task {} of job {id} {why} ({}): nothing to retry",
                t.name, t.state
            ),
        ));
    }
    Ok(vec![i])
}
