//! Requests and replies of the `gpufleet` micro service.

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::status::JobState;

/// Reply to `jobs.submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitReply {
    pub job_id: JobId,
    pub status: JobState,
    /// False when an identical job with this id already existed.
    #[serde(default = "yes")]
    pub created: bool,
}

fn yes() -> bool {
    true
}

/// Request of `jobs.delete` (and, without a task, `jobs.cancel`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    pub job_id: JobId,
}

/// Request of `jobs.cancel` and `jobs.retry`: a job, or one of its
/// tasks (by id or name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRef {
    pub job_id: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Request of `jobs.errors`: a job's errors, and with `reset` clears
/// them (the reply lists what was cleared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorsRequest {
    pub job_id: JobId,
    #[serde(default)]
    pub reset: bool,
}

/// Reply to `jobs.errors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorsReply {
    pub job_id: JobId,
    /// Oldest first, at most [`crate::status::MAX_JOB_ERRORS`].
    pub errors: Vec<crate::status::AttemptError>,
    /// How many errors there were since the last reset, also those no
    /// longer listed.
    pub error_count: u32,
    /// Whether they were cleared.
    pub reset: bool,
}

/// Request of `jobs.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Request of `jobs.get`. Large jobs come in pages of tasks, so that a
/// reply always fits one NATS message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    pub job_id: JobId,
    /// Index of the first task to include (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_offset: Option<u32>,
    /// How many tasks to include (default and most: [`MAX_TASKS_PER_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_limit: Option<u32>,
}

/// The most tasks one `jobs.get` reply holds.
pub const MAX_TASKS_PER_PAGE: u32 = 1000;

/// Request of `workers.list`: workers sorted by name, in pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersRequest {
    /// Only workers whose name sorts after this one (the last of the
    /// previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<crate::ids::WorkerId>,
    /// How many workers (default and most: [`MAX_WORKERS_PER_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The most workers one `workers.list` reply holds.
pub const MAX_WORKERS_PER_PAGE: u32 = 200;

/// Body of every error reply, beside the `Nats-Service-Error` headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Error codes, as HTTP would spell them.
pub mod code {
    pub const BAD_REQUEST: u16 = 400;
    pub const NOT_FOUND: u16 = 404;
    pub const CONFLICT: u16 = 409;
    pub const PAYLOAD_TOO_LARGE: u16 = 413;
    pub const INTERNAL: u16 = 500;
    pub const UNAVAILABLE: u16 = 503;
}
