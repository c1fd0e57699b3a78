//! The gpufleet coordinator: accepts jobs, places their tasks on workers
//! through TTL reservations, and follows them to the end.
//!
//! - [`engine`]: the one owner of state; every input goes through it and
//!   comes out as effects. No NATS inside, so it is tested directly.
//! - [`placement`]: the pure placement function (see its README).
//! - [`state`]: job and task records and how a job's status follows.
//! - [`runtime`]: restores state from JetStream, feeds the engine from
//!   watchers and carries out its effects in batches.
//! - [`api`]: the `gpufleet` micro service.
//! - [`leader`]: one coordinator leads, others stand by.
//! - [`metrics`]: counters and timings served in `$SRV.STATS`.
//! - [`config`]: settings and their defaults.

pub mod api;
pub mod config;
pub mod engine;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod runtime;
pub mod state;

pub use config::CoordinatorConfig;
pub use runtime::{run, CoordinatorError};
