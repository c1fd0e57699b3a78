//! The gpufleet worker: advertises what this machine offers, accepts
//! reservations addressed to it, runs each task as a supervised child
//! process, and streams its output and result back.
//!
//! Decisions and IO are kept apart. Who owns what:
//!
//! - [`core`]: every decision about a lease, as pure functions over the
//!   worker's state ([`core::WorkerState`]: the ledger and the table of
//!   running attempts): accept or refuse a reservation, what a claim and a
//!   renewal write, what a lost renewal race means, whether a finished
//!   attempt reports. Unit-tested without NATS.
//! - [`agent`]: the main loop, the only owner of that state. It watches the
//!   worker's lease keys, asks [`core`], and carries out the answer (writes
//!   a refusal, starts an attempt, passes a cancel on); it drains on
//!   shutdown.
//! - `attempt`: one claimed attempt as its own tokio task (claim, renewal
//!   timer, launch, report, release); it tells the main loop when its
//!   resources are free and when it is done.
//! - [`fence`]: self-fencing: each attempt's watchdog stops its task when
//!   the worker cannot write its lease or advert for nearly their TTL.
//! - [`alive`]: while adverts cannot be stored (a stream election), asks
//!   the leading coordinator over core NATS to hear the worker alive,
//!   which counts as a stored advert for the fence.
//! - [`watchdog`]: the process outside the worker that stops the tasks of
//!   a frozen (or dead) worker by their deadlines.
//! - `publish`: the one place events are put on the stream (RUNNING,
//!   output, result).
//! - [`ledger`]: the worker's own check against overcommit, by the shared
//!   capacity model in `gpufleet_schema::capacity`.
//! - [`advert`]: the heartbeat that keeps the advert alive; it reads the
//!   GPUs and tells the main loop what memory other processes use.
//! - [`supervisor`]: one attempt's process from spawn to classified end:
//!   process group, environment, timeouts, memory limit, output and
//!   progress. It knows nothing of NATS.
//! - [`isolation`]: what keeps a task from the worker and the host, decided
//!   at start: the environment allowlist, the task user, per-task cgroups
//!   and the process limit.
//! - [`launcher`]: real processes, or none (benchmarks of the control plane).
//! - [`usage`]: what each attempt uses (memory, CPU, GPU), sampled while it
//!   runs, for its result and the advert.
//! - [`metrics`]: the worker's Prometheus metrics.
//! - [`gpu`], [`host`]: what the machine has (NVML or simulated GPUs).
//! - [`procs`]: everything read from `/proc`.
//! - [`artifacts`]: uploads of a task's output files.
//! - [`mail`]: messages for running tasks, appended to their inbox files.
//! - [`control`]: a two-phase task's control file (its ready line, its
//!   GPUs); the attempt's second phase follows it, and `core` checks the
//!   coordinator's GPU grant (signature, ledger) before the task sees it.
//! - [`config`]: settings and their defaults.

pub mod advert;
pub mod agent;
pub mod alive;
pub mod artifacts;
mod attempt;
pub mod config;
pub mod control;
pub mod core;
pub mod fence;
pub mod gpu;
pub mod host;
pub mod isolation;
pub mod launcher;
pub mod ledger;
pub mod mail;
pub mod metrics;
pub mod procs;
mod publish;
pub mod supervisor;
pub mod usage;
pub mod watchdog;

pub use agent::{run, run_with, WorkerError};
pub use config::WorkerConfig;
