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

/// Request of `jobs.get` and `jobs.cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    pub job_id: JobId,
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

/// Request of `workers.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersRequest {}

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
    pub const INTERNAL: u16 = 500;
    pub const UNAVAILABLE: u16 = 503;
}
