//! What a worker says about itself in `gpufleet-workers`, refreshed on
//! every heartbeat. Our own output types accept unknown fields, so that a
//! newer worker can add some without breaking an older coordinator.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{GpuUuid, TaskId, WorkerId};
use crate::units::{ByteSize, Dur};
use crate::usage::TaskUsage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerAdvert {
    pub name: WorkerId,
    /// Changes each time the worker process starts.
    pub instance: String,
    pub version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// An address of this machine that other workers can reach
    /// (`MASTER_ADDR` for gangs whose rank 0 runs here).
    #[serde(default)]
    pub addr: Option<String>,
    /// Logical CPUs, in thousandths.
    pub cpus_milli: u64,
    pub memory_total: ByteSize,
    /// Memory available on the host right now.
    pub memory_available: ByteSize,
    #[serde(default)]
    pub load_avg: Option<f64>,
    #[serde(default)]
    pub driver_version: Option<String>,
    #[serde(default)]
    pub gpus: Vec<GpuAdvert>,
    /// Tasks this worker holds a lease for, running or starting.
    #[serde(default)]
    pub running: Vec<TaskId>,
    /// Ports this worker hands out as `MASTER_PORT` to gangs whose rank 0
    /// runs here, `[low, high]`.
    #[serde(default)]
    pub rendezvous_ports: Option<(u16, u16)>,
    /// The most memory the load phases of two-phase tasks may hold here
    /// together (the worker's `load_memory_cap`); none: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_memory_cap: Option<ByteSize>,
    /// Draining workers take no new work.
    #[serde(default)]
    pub draining: bool,
    /// Set by the coordinator in `workers.list` (a worker's own value is
    /// ignored): no new work is placed here for now, as it is held for a
    /// task or gang that has waited too long (see the queue policy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// What each running task has used so far, by task id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub usage: BTreeMap<TaskId, TaskUsage>,
    /// Where the worker serves its Prometheus metrics (`metrics_addr`),
    /// when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// How long the advert lives without a heartbeat.
    pub ttl: Dur,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuAdvert {
    /// NVML index; also the number in `CUDA_VISIBLE_DEVICES`.
    pub index: u32,
    pub uuid: GpuUuid,
    pub model: String,
    pub memory_total: ByteSize,
    pub memory_used: ByteSize,
    pub memory_free: ByteSize,
    /// Memory used by processes that are not this worker's tasks: the part
    /// of `memory_used` that placement must treat as taken.
    #[serde(default)]
    pub memory_unmanaged: ByteSize,
    #[serde(default)]
    pub utilization: Option<u32>,
    #[serde(default)]
    pub temperature: Option<u32>,
    #[serde(default)]
    pub simulated: bool,
    /// Tasks holding this GPU, as `workers.list` reports it (the caller's
    /// own only, with roles on); workers leave it empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<TaskId>,
}

/// What a worker whose JetStream writes fail sends on its alive subject
/// (`subjects::alive`), over core NATS, to be heard alive by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliveAsk {
    pub instance: String,
    /// Its advert's TTL: how long the leader's promise must last.
    pub ttl: Dur,
}

/// The leader's answer to an [`AliveAsk`]: it heard the worker alive, and
/// will not take the expiry of its advert for its death within `ttl` of
/// hearing it. No answer (from a standby, or nobody) promises nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliveHeard {
    pub ttl: Dur,
}
