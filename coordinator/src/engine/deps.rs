//! Dependencies between jobs: a job with `after_ok` starts once each of
//! those jobs completed, and ends without running if one ends otherwise; a
//! job with `after_any` starts once each of those finished, however.
//!
//! The jobs named must exist for the submitter when it submits (unfinished,
//! or among the recently finished the coordinator remembers), so that no
//! cycle can form and a typo is a 400, not a job waiting for ever.

use gpufleet_schema::{JobId, JobSpec, JobState, UserId};

use super::{Caller, Engine};
use crate::state::JobRecord;

/// Where a job stands with the jobs it waits for.
#[derive(Debug, PartialEq)]
pub(super) enum Deps {
    Met,
    /// Still waiting, and why.
    Wait(String),
    /// One will never complete: the job ends, and why.
    Failed(String),
}

impl Engine {
    /// A job's status and owner, if the engine holds it or remembers it
    /// finished.
    fn known_job(&self, id: &JobId) -> Option<(JobState, &UserId)> {
        if let Some(j) = self.jobs.get(id) {
            return Some((j.status, &j.owner));
        }
        self.jobs
            .recent()
            .find(|s| &s.job_id == id)
            .map(|s| (s.status, &s.owner))
    }

    /// Every job a new spec waits for exists for `caller`; otherwise the
    /// error names the field.
    pub(super) fn check_deps(&self, spec: &JobSpec, caller: &Caller) -> Result<(), String> {
        for (field, deps) in [("after_ok", &spec.after_ok), ("after_any", &spec.after_any)] {
            for d in deps {
                if !self
                    .known_job(d)
                    .is_some_and(|(_, owner)| caller.sees(owner))
                {
                    return Err(format!(
                        "{field}: job {d} not found (a job waits only for unfinished or recently finished jobs)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `job` may start, must wait, or can never start.
    pub(super) fn deps(&self, job: &JobRecord) -> Deps {
        for d in &job.spec.after_ok {
            match self.known_job(d) {
                Some((JobState::Completed, _)) => {}
                Some((s, _)) if s.is_finished() => {
                    return Deps::Failed(format!("dependency {d} ended {s} (after_ok)"))
                }
                Some(_) => return Deps::Wait(format!("waits for job {d} to complete (after_ok)")),
                // It finished and left even the window of recent jobs
                // (deleted, say): how, nobody can tell now.
                None => {
                    return Deps::Failed(format!("dependency {d} is no longer known (after_ok)"))
                }
            }
        }
        for d in &job.spec.after_any {
            if let Some((s, _)) = self.known_job(d) {
                if !s.is_finished() {
                    return Deps::Wait(format!("waits for job {d} to finish (after_any)"));
                }
            }
        }
        Deps::Met
    }
}
