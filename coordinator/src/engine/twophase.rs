//! Two-phase tasks: a task with a `load` phase is reserved with only that
//! phase's CPUs and memory (placement puts it on a worker that could hold
//! the whole task, under the worker's load-phase memory cap). Its worker
//! marks the lease `ready` once the task has loaded; from then on the task
//! waits here for its GPUs, which only its own worker can give: the
//! attempt's process runs there.
//!
//! The rule for who goes first: at the start of every scheduling pass the
//! loaded tasks are placed before any new work, each only on its own
//! worker, in order of their job's priority, then their owner's fair share
//! (with more than one user), then how long they have waited. One that
//! still does not fit closes its worker's GPUs, and the CPUs and memory it
//! waits for, to the rest of the pass: a loaded task has spent its load and
//! holds memory while it waits, and it can only ever run there, whereas new
//! work may go anywhere, so it must not be overtaken on its worker by work
//! placed after it (see `README.md` beside `placement/`).
//!
//! The grant is a compare-and-set of the same lease over the revision the
//! engine last saw, adding a `gpu_grant` that the runtime signs; the
//! worker runs nothing on a GPU without that signature. A grant that loses
//! its race (the worker renewed first) is made again from the newer
//! revision; a lease that lapsed cannot be written over, so no GPU is
//! ever given to an attempt whose lease is gone. What waits is kept in the
//! leases themselves (`ready`, `gpu_grant`), so a coordinator that takes
//! over finds it there.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::time::Instant;

use gpufleet_schema::{GpuUpgrade, Grant, JobId, Lease, LeaseKey, LeaseState, TaskState};

use super::schedule::Pass;
use super::Engine;
use crate::placement::{self, TaskRequest, WorkerView};
use crate::state::Reason;

/// The attempts that have loaded and wait for their GPUs, by lease key,
/// with when they said so.
#[derive(Default)]
pub struct GpuWaits {
    waiting: HashMap<LeaseKey, Instant>,
}

impl GpuWaits {
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Returns whether it is news.
    fn insert(&mut self, key: &LeaseKey, at: Instant) -> bool {
        if self.waiting.contains_key(key) {
            return false;
        }
        self.waiting.insert(key.clone(), at);
        true
    }

    pub fn remove(&mut self, key: &LeaseKey) {
        self.waiting.remove(key);
    }
}

/// A second phase placed in a pass: the task, its lease, and what its
/// grant adds to its load phase's.
pub struct Upgrade {
    job: JobId,
    index: usize,
    key: LeaseKey,
    more: Grant,
}

/// What the GPU phase asks beyond what the load phase holds: the whole
/// task's GPUs, and the rest of its CPUs and memory, on its worker only.
fn second_phase_request(l: &Lease) -> TaskRequest {
    let r = &l.task.resources;
    TaskRequest {
        cpus_milli: r.cpus_milli().saturating_sub(l.grant.cpus_milli),
        memory: r.memory_bytes().saturating_sub(l.grant.memory.0),
        gpu: r.gpu_request(),
        labels: Default::default(),
        workers: vec![l.worker.clone()],
        avoid: vec![],
        load: None,
    }
}

/// Why a second phase does not fit its worker now, in a few words.
fn busy(req: &TaskRequest, w: &WorkerView) -> &'static str {
    if !placement::gpu_fits_now(req.gpu, w) {
        "its GPU is busy"
    } else if !w.fits_cpus(req.cpus_milli) {
        "its CPUs are busy"
    } else if !w.fits_memory(req.memory) {
        "its memory is busy"
    } else {
        "it has no room"
    }
}

/// Keeps the rest of a pass off what a waiting second phase needs on its
/// worker: every GPU there, and its CPUs and memory.
fn close_for(req: &TaskRequest, w: &mut WorkerView) {
    w.cpus_free_milli = w.cpus_free_milli.saturating_sub(req.cpus_milli);
    w.memory_free = w.memory_free.saturating_sub(req.memory);
    for g in &mut w.gpus {
        g.exclusive = true;
        g.memory_free = 0;
    }
}

impl Engine {
    /// A lease of a two-phase task was written (`Running` or
    /// `Cancelling`): a `ready` one waits for its GPUs; one with a GPU
    /// grant has them (after a restart, the record learns it here).
    pub(super) fn second_phase_seen(&mut self, key: &LeaseKey, l: &Lease) {
        if l.task.load.is_none() {
            return;
        }
        let Some((job, i)) = self.jobs.current_task(l) else {
            return;
        };
        if self.jobs[&job].tasks[i].state != TaskState::Running {
            return;
        }
        match (&l.gpu_grant, l.ready && l.state == LeaseState::Running) {
            (Some(u), _) => {
                self.waits.remove(key);
                let t = self.jobs.task_mut(&job, i);
                if t.grant.as_deref() != Some(&u.grant) {
                    t.grant = Some(Box::new(u.grant.clone()));
                    self.touch(&job);
                }
            }
            (None, true) => {
                // A grant of ours that lost its race leaves the record
                // ahead of the lease: back to the load phase's grant.
                let t = self.jobs.task_mut(&job, i);
                let reverted = t.grant.as_deref() != Some(&l.grant);
                t.grant = Some(Box::new(l.grant.clone()));
                if self.waits.insert(key, self.now.mono) {
                    let why = format!("loaded; waiting for a GPU on {}", l.worker);
                    self.jobs.task_mut(&job, i).reason = Some(Reason::new(why));
                    self.emit_state(&job, i);
                    self.touch(&job);
                } else if reverted {
                    self.touch(&job);
                }
                self.wants_schedule = true;
            }
            (None, false) => self.waits.remove(key),
        }
    }

    /// Phase 2a of a pass: the loaded tasks, each on its own worker, before
    /// any new work (see the module's header for the order).
    pub(super) fn place_second_phases(&self, pass: &mut Pass) {
        if self.waits.is_empty() {
            return;
        }
        let shared = self.queue.by_owner().nth(1).is_some();
        // (priority, share, since, job seq, task): the order they go in.
        type Waiting<'a> = (
            Reverse<i32>,
            f64,
            Instant,
            u64,
            usize,
            &'a LeaseKey,
            &'a Lease,
            JobId,
        );
        let mut order: Vec<Waiting> = Vec::new();
        for (key, since) in &self.waits.waiting {
            let Some(live) = self.book.get(key) else {
                continue;
            };
            let l = &live.lease;
            if l.state != LeaseState::Running || !l.ready || l.gpu_grant.is_some() {
                continue;
            }
            let Some((job, i)) = self.jobs.current_task(l) else {
                continue;
            };
            let j = &self.jobs[&job];
            if j.tasks[i].state != TaskState::Running {
                continue;
            }
            let share = if shared {
                self.shares.share(&j.owner, &pass.ledger, &pass.capacity)
            } else {
                0.0
            };
            order.push((
                Reverse(j.spec.priority),
                share,
                *since,
                j.seq,
                i,
                key,
                l,
                job,
            ));
        }
        order.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then((a.2, a.3, a.4).cmp(&(b.2, b.3, b.4)))
        });
        for (_, _, _, _, i, key, l, job) in order {
            let Some(w) = pass.views.iter().position(|v| v.name == l.worker) else {
                // Its worker's advert is gone: its lease decides.
                continue;
            };
            let req = second_phase_request(l);
            // What preemption freed on a worker goes to the work it was
            // freed for, not to a task that loaded there meanwhile.
            if let Some(by) = pass.policy.held_for_another(w, (&job, Some(i))) {
                let why = format!(
                    "loaded; waiting for a GPU on {}: held for job {by}, which preempted work there",
                    l.worker
                );
                pass.waiting.push((job, i, Reason::new(why)));
                continue;
            }
            // A draining worker takes no new work, but this task already
            // runs there: with its GPU it may finish before the drain ends.
            let mut one = [pass.views[w].clone()];
            one[0].draining = false;
            let p = placement::place(std::slice::from_ref(&req), &mut one);
            match p.assigned.into_iter().next() {
                Some(a) => {
                    pass.views[w].capacity = one[0].capacity.clone();
                    pass.policy.spend(1);
                    pass.upgrades.push(Upgrade {
                        job,
                        index: i,
                        key: key.clone(),
                        more: a.grant,
                    });
                }
                None => {
                    let why = format!(
                        "loaded; waiting for a GPU on {}: {}",
                        l.worker,
                        busy(&req, &pass.views[w])
                    );
                    close_for(&req, &mut pass.views[w]);
                    pass.waiting.push((job, i, Reason::new(why)));
                }
            }
        }
    }

    /// Phase 4a: grants each placed second phase its GPUs, as an update of
    /// its lease (signed by the runtime as it writes it).
    pub(super) fn grant_placed(&mut self, upgrades: Vec<Upgrade>) {
        for u in upgrades {
            let Some(live) = self.book.get(&u.key) else {
                continue;
            };
            let (rev, mut lease) = (live.rev, live.lease.clone());
            let grant = lease.grant.upgraded(&u.more);
            lease.gpu_grant = Some(GpuUpgrade {
                grant: grant.clone(),
                signer: None,
                signature: None,
            });
            lease.reason = None;
            // In the book at once, so that the next pass counts its GPUs.
            self.book.put(&u.key, rev, lease.clone());
            self.waits.remove(&u.key);
            let t = self.jobs.task_mut(&u.job, u.index);
            t.grant = Some(Box::new(grant));
            t.reason = None;
            tracing::info!(task_id = %t.id, worker = %lease.worker, "a loaded task is given its GPU");
            self.emit_state(&u.job, u.index);
            self.touch(&u.job);
            self.fx.grant_leases.push((u.key.to_string(), lease, rev));
        }
    }
}
