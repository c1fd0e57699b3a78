//! What the coordinator reports about jobs and tasks. Job states follow
//! NVIDIA FLARE's RunStatus names; task states add fedflow's INTERRUPTED.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{GpuUuid, JobId, TaskId, UserId, WorkerId};
use crate::usage::TaskUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    #[serde(rename = "SUBMITTED")]
    Submitted,
    #[serde(rename = "QUEUED")]
    Queued,
    #[serde(rename = "DISPATCHED")]
    Dispatched,
    #[serde(rename = "RUNNING")]
    Running,
    #[serde(rename = "FINISHED:COMPLETED")]
    Completed,
    #[serde(rename = "FINISHED:ABORTED")]
    Aborted,
    #[serde(rename = "FINISHED:EXECUTION_EXCEPTION")]
    ExecutionException,
    #[serde(rename = "FAILED_TO_RUN")]
    FailedToRun,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Submitted,
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Completed,
        JobState::Aborted,
        JobState::ExecutionException,
        JobState::FailedToRun,
    ];

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed
                | JobState::Aborted
                | JobState::ExecutionException
                | JobState::FailedToRun
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "SUBMITTED",
            JobState::Queued => "QUEUED",
            JobState::Dispatched => "DISPATCHED",
            JobState::Running => "RUNNING",
            JobState::Completed => "FINISHED:COMPLETED",
            JobState::Aborted => "FINISHED:ABORTED",
            JobState::ExecutionException => "FINISHED:EXECUTION_EXCEPTION",
            JobState::FailedToRun => "FAILED_TO_RUN",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown job status {s:?} (one of {})",
                    JobState::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Queued,
    Reserved,
    Running,
    Succeeded,
    Failed,
    /// Out of memory or killed from outside: worth retrying.
    Interrupted,
    TimedOut,
    /// Its worker vanished; the lease expired.
    Lost,
    Cancelled,
}

impl TaskState {
    /// An attempt in this state is over (it may still be retried).
    pub fn is_end(self) -> bool {
        !matches!(
            self,
            TaskState::Queued | TaskState::Reserved | TaskState::Running
        )
    }

    /// Ends a retry can help with.
    pub fn is_retryable(self) -> bool {
        matches!(self, TaskState::Interrupted | TaskState::Lost)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "QUEUED",
            TaskState::Reserved => "RESERVED",
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::Interrupted => "INTERRUPTED",
            TaskState::TimedOut => "TIMED_OUT",
            TaskState::Lost => "LOST",
            TaskState::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many of a job's tasks are in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    pub queued: u32,
    pub reserved: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub interrupted: u32,
    pub timed_out: u32,
    pub lost: u32,
    pub cancelled: u32,
}

impl TaskCounts {
    pub fn add(&mut self, s: TaskState) {
        let slot = match s {
            TaskState::Queued => &mut self.queued,
            TaskState::Reserved => &mut self.reserved,
            TaskState::Running => &mut self.running,
            TaskState::Succeeded => &mut self.succeeded,
            TaskState::Failed => &mut self.failed,
            TaskState::Interrupted => &mut self.interrupted,
            TaskState::TimedOut => &mut self.timed_out,
            TaskState::Lost => &mut self.lost,
            TaskState::Cancelled => &mut self.cancelled,
        };
        *slot += 1;
    }

    pub fn total(&self) -> u32 {
        self.queued
            + self.reserved
            + self.running
            + self.succeeded
            + self.failed
            + self.interrupted
            + self.timed_out
            + self.lost
            + self.cancelled
    }

    pub fn finished(&self) -> u32 {
        self.total() - self.queued - self.reserved - self.running
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: JobId,
    /// Who submitted it; its events are under `gpufleet.events.<owner>.…`.
    #[serde(default = "UserId::default_user")]
    pub owner: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub status: JobState,
    /// Why the job waits or how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub counts: TaskCounts,
    /// Every task in `jobs.get`; empty in `jobs.list` summaries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskStatus>,
    /// In `jobs.get`: the attempts that failed, were interrupted, lost or
    /// timed out since the errors were last reset, oldest first (the newest
    /// [`MAX_JOB_ERRORS`]); `error_count` counts them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<AttemptError>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub error_count: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How many of a job's errors its record keeps: the newest; older ones are
/// only counted, so that a task failing over and over cannot grow the
/// record without bound.
pub const MAX_JOB_ERRORS: usize = 50;

/// One attempt that did not end well: FAILED, INTERRUPTED, LOST or
/// TIMED_OUT (what FLARE's `get_errors` reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// When the coordinator learned of the end.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub task_id: TaskId,
    /// The task's name.
    pub task: String,
    pub attempt: u32,
    /// The worker it ran on (none if it never got one).
    #[serde(default)]
    pub worker: Option<WorkerId>,
    pub state: TaskState,
    pub reason: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
}

impl AttemptError {
    /// Whether an attempt that ended in `state` is an error.
    pub fn counts(state: TaskState) -> bool {
        matches!(
            state,
            TaskState::Failed | TaskState::Interrupted | TaskState::Lost | TaskState::TimedOut
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task_id: TaskId,
    pub name: String,
    pub state: TaskState,
    /// 1 for the first try.
    pub attempt: u32,
    pub worker: Option<WorkerId>,
    /// UUIDs of the GPUs it holds or held.
    #[serde(default)]
    pub gpus: Vec<GpuUuid>,
    pub exit_code: Option<i32>,
    /// The JSON the task wrote to `GPUFLEET_RESULT`.
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// What its attempt uses (while it runs, from its worker's latest
    /// advert) or used (once it ended, from its result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TaskUsage>,
}
