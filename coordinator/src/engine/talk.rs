//! Talking to a job: its errors (`jobs.errors`, as FLARE's executor
//! reports and resets them), and messages to its running tasks
//! (`jobs.send`).
//!
//! A message goes to a task's worker, which appends it to the task's inbox
//! file: the engine decides who gets it (the tasks running now) and what
//! is kept for audit (one `message` event per addressed task, stored
//! before the message is handed over); the
//! runtime's postman (`post.rs`) hands it over, in order per worker, and
//! answers with how many received it.

use gpufleet_schema::api::{code, ErrorsReply};
use gpufleet_schema::message::{Delivery, InboxMessage, SendRequest};
use gpufleet_schema::{subjects, Event, EventBody, EventKind, JobId, TaskState, WorkerId};

use super::{not_found, Caller, Engine, Fetch, Reply, ReplyTx};
use crate::state::JobRecord;

/// Messages for running tasks, and what to do once they are handed over.
/// Their audit events go out with the batch's other events, before the
/// runtime hands the post to the postman.
#[derive(Debug)]
pub struct Post {
    /// Each task's copy, for the worker that runs it.
    pub parcels: Vec<(WorkerId, Delivery)>,
    pub then: AfterPost,
}

#[derive(Debug)]
pub enum AfterPost {
    /// Answer `jobs.send` with how many received it.
    Reply { tx: ReplyTx, job: JobId },
}

impl Engine {
    /// Answers `jobs.errors`; with `reset`, clears them once the record
    /// that no longer holds them is stored.
    pub(super) fn errors(&mut self, id: JobId, reset: bool, caller: Caller, tx: ReplyTx) {
        let Some(job) = self.jobs.get_mut(&id).filter(|j| j.stored) else {
            // A finished job no longer held is read (and reset) in the store.
            self.fx
                .fetches
                .push((id, caller, Fetch::Errors { reset, tx }));
            return;
        };
        if !caller.sees(&job.owner) {
            self.fx.replies.push((tx, not_found(&id), None));
            return;
        }
        let (errors, error_count) = if reset {
            job.reset_errors()
        } else {
            (job.errors.clone(), job.error_count)
        };
        let reply = Reply::Errors(Box::new(ErrorsReply {
            job_id: id.clone(),
            errors,
            error_count,
            reset,
        }));
        if reset {
            self.fx.put_jobs.insert(id.clone());
            self.fx.replies.push((tx, reply, Some(id)));
        } else {
            self.fx.replies.push((tx, reply, None));
        }
    }

    /// Sends a client's message to the job's running tasks (the named one,
    /// or all); a finished job runs nothing, and stores nothing more.
    pub(super) fn send(&mut self, req: SendRequest, caller: Caller, tx: ReplyTx) {
        let id = req.job_id.clone();
        let Some(job) = self.jobs.get(&id).filter(|j| j.stored) else {
            self.fx.fetches.push((id, caller, Fetch::Send(tx)));
            return;
        };
        if !caller.sees(&job.owner) {
            self.fx.replies.push((tx, not_found(&id), None));
            return;
        }
        let addressed: Vec<usize> = match &req.task {
            Some(t) => match find_task(job, t) {
                Some(i) => vec![i],
                None => {
                    let reply = Reply::error(code::NOT_FOUND, format!("job {id} has no task {t}"));
                    self.fx.replies.push((tx, reply, None));
                    return;
                }
            },
            None => (0..job.tasks.len())
                .filter(|&i| job.tasks[i].state == TaskState::Running)
                .collect(),
        };
        if job.status.is_finished() {
            self.fx.replies.push((tx, sent(&id, vec![]), None));
            return;
        }
        let message = InboxMessage {
            at: self.now.wall,
            from: format!("user:{}", caller.user),
            topic: req.topic,
            data: req.data,
        };
        let to = req.task.unwrap_or_else(|| "*".into());
        let mut post = Post {
            parcels: Vec::new(),
            then: AfterPost::Reply {
                tx,
                job: id.clone(),
            },
        };
        for i in addressed {
            let t = &job.tasks[i];
            let event = Event {
                job_id: id.clone(),
                task_id: t.id.clone(),
                attempt: t.attempt,
                worker: None,
                lease_rev: None,
                at: self.now.wall,
                body: EventBody::Message {
                    from: message.from.clone(),
                    to: to.clone(),
                    topic: message.topic.clone(),
                    data: message.data.clone(),
                },
                token: None,
            };
            let subject = subjects::events(
                &job.owner,
                &id,
                &t.id,
                EventKind::Message,
                &subjects::Sender::Coordinator,
            );
            self.fx.events.push((subject, event));
            if let (TaskState::Running, Some(w)) = (t.state, &t.worker) {
                post.parcels.push((
                    w.clone(),
                    Delivery {
                        job_id: id.clone(),
                        task_id: t.id.clone(),
                        attempt: t.attempt,
                        message: message.clone(),
                        signal: req.signal,
                    },
                ));
            }
        }
        self.fx.posts.push(post);
    }
}

/// The reply to `jobs.send`: the tasks that received it.
pub fn sent(job: &JobId, tasks: Vec<gpufleet_schema::TaskId>) -> Reply {
    Reply::Sent(Box::new(gpufleet_schema::message::SendReply {
        job_id: job.clone(),
        delivered: tasks.len() as u32,
        tasks,
    }))
}

/// A task of `job` by its id or its name.
fn find_task(job: &JobRecord, task: &str) -> Option<usize> {
    job.tasks
        .iter()
        .position(|t| t.id.as_str() == task)
        .or_else(|| job.tasks.iter().position(|t| t.name == task))
}
