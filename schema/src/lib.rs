//! gpufleet's wire contract, shared by every program and by clients in
//! other languages (see the README's API section).
//!
//! - [`spec`]: what clients submit (jobs, tasks, resources), with validation
//!   whose errors name the field; [`array`]: task templates with parameters.
//! - [`status`]: job and task states and the status replies.
//! - [`worker`], [`lease`], [`event`], [`artifact`]: what workers
//!   advertise, the (signed) reservations they claim, and the events and
//!   artifacts they stream.
//! - [`api`]: request and reply bodies of the `gpufleet` micro service.
//! - [`message`]: messages to running tasks, and the inbox lines a worker
//!   writes for them.
//! - [`capacity`]: what a worker has free and whether a grant fits: the one
//!   model the coordinator places by and the worker checks by.
//! - [`policy`]: fair-share weights and quotas per user and group.
//! - [`subjects`]: every subject, bucket and key name.
//! - [`roles`]: the NATS permission set of each role, built from those
//!   names.
//! - [`codec`]: MessagePack (native) and JSON, chosen per message.
//! - [`usage`]: what a task attempt used (memory, CPU, GPU).
//! - [`units`], [`ids`]: sizes, durations and identifier newtypes.
//!
//! This crate holds the wire, and the arithmetic both ends of it must agree
//! on; no NATS client, no runtime.

pub mod api;
pub mod array;
pub mod artifact;
pub mod capacity;
pub mod codec;
pub mod event;
pub mod ids;
pub mod lease;
pub mod message;
pub mod policy;
pub mod roles;
pub mod spec;
pub mod status;
pub mod subjects;
pub mod text;
pub mod units;
pub mod usage;
pub mod worker;

pub use codec::{CodecError, Encoding};
pub use event::{Artifact, Event, EventBody, EventKind, LogStream, TaskOutcome};
pub use ids::{GpuUuid, JobId, TaskId, UserId, WorkerId};
pub use lease::{GpuGrant, GpuUpgrade, Grant, Lease, LeaseState, Rendezvous, SealError};
pub use spec::{Constraints, GpuRequest, JobSpec, LoadSpec, Resources, SpecError, TaskSpec};
pub use status::{AttemptError, JobState, JobStatus, TaskCounts, TaskState, TaskStatus};
pub use subjects::{LeaseKey, Sender};
pub use units::{ByteSize, Dur};
pub use usage::TaskUsage;
pub use worker::{AliveAsk, AliveHeard, GpuAdvert, WorkerAdvert};

/// The version every program reports and advertises.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
