//! How an attempt's program is run: as a real supervised process, or (for
//! benchmarks of the control plane and tests) not at all.

use std::future::Future;
use std::pin::Pin;

use gpufleet_schema::TaskState;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::supervisor::{self, Finished, Output, StopReason, TaskRun};

pub type Launch = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// Runs one attempt to its end; the contract is [`supervisor::run`]'s.
pub trait Launcher: Send + Sync + 'static {
    /// Whether attempts need their directory on disk (creating one per
    /// task is most of a worker's own cost when tasks are tiny).
    fn uses_dir(&self) -> bool {
        true
    }

    fn launch(
        &self,
        run: TaskRun,
        output: mpsc::Sender<Output>,
        stop: watch::Receiver<Option<StopReason>>,
    ) -> Launch;
}

/// The real thing: a child process under the supervisor.
pub struct Processes;

impl Launcher for Processes {
    fn launch(
        &self,
        run: TaskRun,
        output: mpsc::Sender<Output>,
        stop: watch::Receiver<Option<StopReason>>,
    ) -> Launch {
        Box::pin(supervisor::run(run, output, stop))
    }
}

/// Ends every attempt at once, successfully, without running anything:
/// what is left is the cost of gpufleet itself.
pub struct Instant;

impl Launcher for Instant {
    fn uses_dir(&self) -> bool {
        false
    }

    fn launch(
        &self,
        run: TaskRun,
        _output: mpsc::Sender<Output>,
        _stop: watch::Receiver<Option<StopReason>>,
    ) -> Launch {
        Box::pin(async move {
            let now = OffsetDateTime::now_utc();
            Finished {
                state: TaskState::Succeeded,
                exit_code: Some(0),
                signal: None,
                result: None,
                error: None,
                started_at: Some(now),
                finished_at: now,
                output_dir: run.dir,
                launched: true,
                log_dropped_bytes: 0,
                usage: None,
            }
        })
    }
}
