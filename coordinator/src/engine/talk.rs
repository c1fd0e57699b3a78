//! Talking to a job: its errors (`jobs.errors`, as FLARE's executor
//! reports and resets them).

use gpufleet_schema::api::ErrorsReply;
use gpufleet_schema::JobId;

use super::{not_found, Caller, Engine, Fetch, Reply, ReplyTx};

impl Engine {
    /// Answers `jobs.errors`; with `reset`, clears them once the record
    /// that no longer holds them is stored.
    pub(super) fn errors(&mut self, id: JobId, reset: bool, caller: Caller, tx: ReplyTx) {
        let Some(job) = self.jobs.get_mut(&id).filter(|j| j.stored) else {
            // A finished job no longer held is read (and reset) in the store.
            self.fx
                .fetches
                .push((id, caller, Fetch::Errors { reset, tx }));
            return;
        };
        if !caller.sees(&job.owner) {
            self.fx.replies.push((tx, not_found(&id), None));
            return;
        }
        let (errors, error_count) = if reset {
            job.reset_errors()
        } else {
            (job.errors.clone(), job.error_count)
        };
        let reply = Reply::Errors(Box::new(ErrorsReply {
            job_id: id.clone(),
            errors,
            error_count,
            reset,
        }));
        if reset {
            self.fx.put_jobs.insert(id.clone());
            self.fx.replies.push((tx, reply, Some(id)));
        } else {
            self.fx.replies.push((tx, reply, None));
        }
    }
}
