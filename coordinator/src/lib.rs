//! The gpufleet coordinator: accepts jobs, places their tasks on workers
//! through TTL reservations, and follows them to the end.
//!
//! Who owns what:
//! - [`engine`]: the one owner of state, pure (no NATS, no clock, no
//!   randomness of its own: time and a seed come in). Every input goes
//!   through it and comes out as effects. Inside, the state is split by
//!   owner: the job table, the lease book (adverts, live leases, released
//!   attempts; it builds the placement snapshot) and the queue policy
//!   (order, starvation holds, the avoid window, the pass budget).
//! - [`state`]: job and task records, their transitions (one method each,
//!   deciding what it resets) and how a job's status follows from its tasks.
//! - [`store`]: how records are stored in `gpufleet-jobs`: in parts that
//!   each fit one message, unfinished and finished jobs apart.
//! - [`placement`]: the pure placement function (see its README).
//! - [`runtime`]: restores state from JetStream, owns the feeder tasks that
//!   feed the engine (a feeder that stops stops the coordinator), supplies
//!   the clock, and carries out the engine's effects in batches.
//! - [`api`]: the `gpufleet` micro service.
//! - [`post`]: hands messages for running tasks to their workers.
//! - [`leader`]: one coordinator leads, others stand by.
//! - [`alive`]: the leader hears workers alive over core NATS while their
//!   adverts cannot be stored (a stream election).
//! - [`metrics`]: counters and timings served in `$SRV.STATS`.
//! - [`config`]: settings and their defaults.

pub mod alive;
pub mod api;
pub mod config;
pub mod engine;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod post;
pub mod runtime;
pub mod state;
pub mod store;

pub use config::CoordinatorConfig;
pub use runtime::{run, CoordinatorError};
