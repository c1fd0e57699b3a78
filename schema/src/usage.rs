//! What a task attempt used, measured by its worker while it runs: in the
//! `result` event, in `jobs.get`'s task status, and (for running tasks) in
//! the worker's advert.

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// One attempt's use of the machine so far (or in all, once it ended).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskUsage {
    /// The most resident memory its processes held together, as sampled;
    /// at least the largest single process's own peak, which the kernel
    /// reports when the task's main process ends.
    pub peak_rss: ByteSize,
    /// CPU time, user and system, of its processes.
    pub cpu_seconds: f64,
    /// The most GPU memory its processes used, summed over its GPUs; absent
    /// for a task without GPUs or where the driver does not say per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_peak: Option<ByteSize>,
    /// The mean utilisation of its GPUs while it ran, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_mean: Option<f64>,
    /// The GPU figures come from simulated GPUs: the memory set aside for
    /// the task, and 100% while it is held, rather than a measurement.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpu_simulated: bool,
    /// How many samples the figures rest on.
    #[serde(default)]
    pub samples: u32,
}
