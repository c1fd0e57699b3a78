//! Messages in the `GPUFLEET_EVENTS` stream, on
//! `gpufleet.events.<job>.<task>.<kind>`.

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
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Log => "log",
            EventKind::Progress => "progress",
            EventKind::Result => "result",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        Some(match s {
            "state" => EventKind::State,
            "log" => EventKind::Log,
            "progress" => EventKind::Progress,
            "result" => EventKind::Result,
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
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self.body {
            EventBody::State { .. } => EventKind::State,
            EventBody::Log { .. } => EventKind::Log,
            EventBody::Progress { .. } => EventKind::Progress,
            EventBody::Result(_) => EventKind::Result,
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
    /// Object name in `gpufleet-artifacts`.
    pub object: String,
    pub size: ByteSize,
    pub sha256: String,
}
