//! The gpufleet worker: advertises what this machine offers, accepts
//! reservations addressed to it, runs each task as a supervised child
//! process, and streams its output and result back.
//!
//! - [`agent`]: the main loop (lease watch, accept/refuse, claim, renew,
//!   report) and the drain on shutdown.
//! - [`supervisor`]: one attempt from spawn to classified end: process
//!   group, environment, timeouts, memory limit, output and progress.
//! - [`advert`]: the heartbeat that keeps the advert alive.
//! - [`ledger`]: the worker's own check against overcommit.
//! - [`usage`]: what each attempt uses (memory, CPU, GPU), sampled while it
//!   runs, for its result and the advert.
//! - [`metrics`]: the worker's Prometheus metrics.
//! - [`gpu`], [`host`]: what the machine has (NVML or simulated GPUs).
//! - [`artifacts`]: uploads of a task's output files.
//! - [`launcher`]: real processes, or none (benchmarks of the control plane).
//! - [`config`]: settings and their defaults.

pub mod advert;
pub mod agent;
pub mod artifacts;
pub mod config;
pub mod gpu;
pub mod host;
pub mod launcher;
pub mod ledger;
pub mod metrics;
pub mod supervisor;
pub mod usage;

pub use agent::{run, run_with, WorkerError};
pub use config::WorkerConfig;
