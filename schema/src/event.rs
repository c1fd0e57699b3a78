//! Messages in the `GPUFLEET_EVENTS` stream, on
//! `gpufleet.events.<owner>.<job>.<task>.<kind>.<sender>`.
//!
//! A reader trusts the subject's sender (the server enforces it) over the
//! body, and drops an event whose body names another job, task or kind
//! than its subject: see [`Event::matches_subject`].

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{JobId, TaskId, WorkerId};
use crate::status::TaskState;
use crate::units::ByteSize;
use crate::usage::TaskUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    State,
    Log,
    Progress,
    Result,
    /// A message to a running task (`jobs.send`), or one a task sent
    /// another through its outbox: kept for audit and replay.
    Message,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Log => "log",
            EventKind::Progress => "progress",
            EventKind::Result => "result",
            EventKind::Message => "message",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        Some(match s {
            "state" => EventKind::State,
            "log" => EventKind::Log,
            "progress" => EventKind::Progress,
            "result" => EventKind::Result,
            "message" => EventKind::Message,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub job_id: JobId,
    pub task_id: TaskId,
    pub attempt: u32,
    /// Who sent it; `None` for the coordinator.
    #[serde(default)]
    pub worker: Option<WorkerId>,
    /// The lease revision the worker holds (its fencing token).
    #[serde(default)]
    pub lease_rev: Option<u64>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub body: EventBody,
    /// In a result only: the attempt's token from its reservation, which
    /// nobody but the worker holding it (and the coordinator) can read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Event {
    /// Whether the body agrees with the subject it came on: the same job,
    /// task and kind, and, from a worker, that worker's name. Anything else
    /// was put there by someone who could not have sent it.
    pub fn matches_subject(&self, subject: &crate::subjects::EventSubject) -> bool {
        self.job_id == subject.job
            && self.task_id == subject.task
            && self.kind() == subject.kind
            && self.worker.as_ref() == subject.sender.worker()
    }

    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }
}

impl EventBody {
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::State { .. } => EventKind::State,
            EventBody::Log { .. } => EventKind::Log,
            EventBody::Progress { .. } => EventKind::Progress,
            EventBody::Result(_) => EventKind::Result,
            EventBody::Message { .. } => EventKind::Message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EventBody {
    State {
        state: TaskState,
        #[serde(default)]
        reason: Option<String>,
        /// The worker that holds the attempt, in the coordinator's events
        /// while it does (RESERVED, RUNNING): the one sender whose output,
        /// progress and result count for the attempt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<WorkerId>,
    },
    /// One batch of output: whole lines, in order.
    Log {
        stream: LogStream,
        text: String,
        /// Output dropped before this batch because the task printed faster
        /// than it could be shipped (see the README on output limits).
        #[serde(default)]
        dropped_bytes: u64,
    },
    Progress {
        data: serde_json::Value,
    },
    Result(TaskOutcome),
    /// A message: from a client to the task of this event's subject (sent
    /// by the coordinator), or from that task to `to` (sent by its worker).
    Message {
        from: String,
        /// A task's name or id, or `*`: every other running task of the job.
        to: String,
        topic: String,
        #[serde(default)]
        data: serde_json::Value,
        /// The receivers are to be sent `SIGUSR1` too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        signal: bool,
    },
}

/// How an attempt ended. Published after every log line of the attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub state: TaskState,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Why it did not succeed, in words, when we know.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// What the attempt used; absent when it never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TaskUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Path relative to the output directory.
    pub name: String,
    /// `<job>/<task>/<attempt>/<path>` (`subjects::artifact_object`).
    pub object: String,
    pub size: ByteSize,
    pub sha256: String,
}
