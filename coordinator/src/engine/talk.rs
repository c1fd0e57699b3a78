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
use gpufleet_schema::message::{
    Delivery, InboxMessage, SendRequest, FROM_GPUFLEET, TO_ALL, UNDELIVERABLE_TOPIC,
};
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
    /// A task's message: tell it, in its own inbox, of every receiver it
    /// did not reach (those the engine already knows of in `refused`, as
    /// `(receiver, why)`; then each copy not delivered).
    Bounce {
        sender: (WorkerId, Delivery),
        /// Whom the message was for, as the sender put it.
        to: String,
        refused: Vec<(String, String)>,
    },
}

/// The notice a sender gets, in its inbox, for a message that did not
/// reach `receiver`: `sender` addresses the sending attempt and holds the
/// message itself.
pub fn undeliverable(sender: &Delivery, to: &str, receiver: &str, why: &str) -> Delivery {
    Delivery {
        message: InboxMessage {
            at: sender.message.at,
            from: FROM_GPUFLEET.into(),
            topic: UNDELIVERABLE_TOPIC.into(),
            data: serde_json::json!({
                "to": to, "task": receiver, "topic": sender.message.topic, "reason": why,
            }),
        },
        signal: false,
        ..sender.clone()
    }
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
                    signal: req.signal,
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

impl Engine {
    /// Routes a message a task wrote to its outbox (a `message` event its
    /// worker published) to the tasks of the same job it names: one by
    /// name or id, or every other running one for `*`. It counts only from
    /// the worker holding the sending attempt's claim; a receiver that is
    /// not running is reported back to the sender.
    pub(super) fn route(&mut self, event: Event, sender: &subjects::Sender) {
        let Some(worker) = sender.worker() else {
            // The coordinator's own audit of a client's message.
            return;
        };
        let EventBody::Message {
            to,
            topic,
            data,
            signal,
            ..
        } = event.body
        else {
            return;
        };
        let Some(job) = self.jobs.get(&event.job_id).filter(|j| j.stored) else {
            return;
        };
        let Some(i) = job.task_index(&event.task_id) else {
            return;
        };
        let t = &job.tasks[i];
        // The attempt may have ended since (the results come on another
        // feed); it must be the current one, and this worker's claim.
        if t.attempt != event.attempt
            || t.worker.as_ref() != Some(worker)
            || t.claim_rev.is_none()
            || event.lease_rev != t.claim_rev
        {
            tracing::info!(task_id = %event.task_id, attempt = event.attempt, sender = %worker, "ignored a message not from the attempt's claim");
            return;
        }
        let message = InboxMessage {
            at: self.now.wall,
            from: t.name.clone(),
            topic,
            data,
        };
        let back = Delivery {
            job_id: event.job_id.clone(),
            task_id: t.id.clone(),
            attempt: t.attempt,
            message: message.clone(),
            signal: false,
        };
        let mut refused = Vec::new();
        let receivers: Vec<usize> = if to == TO_ALL {
            let others: Vec<usize> = (0..job.tasks.len())
                .filter(|&k| k != i && job.tasks[k].state == TaskState::Running)
                .collect();
            if others.is_empty() {
                refused.push((to.clone(), "no other task of the job is running".into()));
            }
            others
        } else {
            match find_task(job, &to) {
                Some(k) if job.tasks[k].state == TaskState::Running => vec![k],
                Some(k) => {
                    let r = &job.tasks[k];
                    refused.push((r.name.clone(), format!("it is not running ({})", r.state)));
                    vec![]
                }
                None => {
                    refused.push((to.clone(), format!("job {} has no task {to}", job.id)));
                    vec![]
                }
            }
        };
        let parcels = receivers
            .into_iter()
            .filter_map(|k| {
                let r = &job.tasks[k];
                let w = r.worker.clone()?;
                Some((
                    w,
                    Delivery {
                        job_id: job.id.clone(),
                        task_id: r.id.clone(),
                        attempt: r.attempt,
                        message: message.clone(),
                        signal,
                    },
                ))
            })
            .collect();
        self.fx.posts.push(Post {
            parcels,
            then: AfterPost::Bounce {
                sender: (worker.clone(), back),
                to,
                refused,
            },
        });
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
pub(super) fn find_task(job: &JobRecord, task: &str) -> Option<usize> {
    job.tasks
        .iter()
        .position(|t| t.id.as_str() == task)
        .or_else(|| job.tasks.iter().position(|t| t.name == task))
}
