//! Reservations and leases, the values in `gpufleet-leases`.
//!
//! The coordinator creates a [`Lease`] in state `RESERVED` under
//! [`crate::subjects::lease_key`] with a TTL; that entry *is* the
//! assignment: it carries everything the worker needs to run the task. The
//! worker claims it by a compare-and-set to `RUNNING` and renews it while the
//! task runs. A lease nobody renews expires on its own. The KV revision of
//! the claim is the fencing token that the worker sends with its results.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{GpuUuid, JobId, TaskId, WorkerId};
use crate::spec::TaskSpec;
use crate::units::{ByteSize, Dur};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LeaseState {
    /// Written by the coordinator; waits for the worker's claim.
    Reserved,
    /// Claimed by the worker, which renews it while the task runs.
    Running,
    /// The coordinator asks the worker to stop the task.
    Cancelling,
    /// The worker refused the reservation (`reason` says why).
    Rejected,
    /// A restarted worker found a lease of its previous life.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub job_id: JobId,
    pub task_id: TaskId,
    /// 1 for the first try.
    pub attempt: u32,
    pub worker: WorkerId,
    pub state: LeaseState,
    #[serde(default)]
    pub reason: Option<String>,
    pub task: TaskSpec,
    pub grant: Grant,
    #[serde(default)]
    pub rendezvous: Option<Rendezvous>,
    /// How long the lease lives between renewals once claimed.
    pub lease_ttl: Dur,
    /// The worker process that claimed it.
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub reserved_at: OffsetDateTime,
}

/// What the task was given on its worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(default)]
    pub gpus: Vec<GpuGrant>,
    /// Whole GPUs are the task's alone; a share leaves room for others.
    #[serde(default)]
    pub exclusive: bool,
    pub cpus_milli: u64,
    pub memory: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuGrant {
    pub index: u32,
    pub uuid: GpuUuid,
    /// GPU memory set aside for the task.
    pub memory: ByteSize,
}

/// Where the ranks of a gang meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    pub rank: u32,
    pub world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
}
