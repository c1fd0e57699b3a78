//! Preemption: waiting work of a higher class takes the place of running
//! work that allows it.
//!
//! **Who may preempt.** A job's class is its `priority`, but only up to the
//! `preempt_priority` the scheduling policy gives its owner (or one of the
//! owner's groups); without one, a job never preempts. The policy is the
//! admins', so nobody stops other people's work by calling its own job
//! urgent. **Who may be preempted.** Only running tasks of jobs that set
//! `preemptible` (default false: nobody's work is stopped without opting
//! in), of a lower priority than the preemptor's class, not already being
//! stopped. A gang is a victim whole or not at all. Being below one's fair
//! share preempts nothing (see the README).
//!
//! **Which victims.** [`choose`] frees exactly what the waiting work needs
//! with the least lost work: for a task, on one worker, the fewest victims,
//! then the least run time lost (the youngest); for a gang, over the
//! workers it needs, greedily in that order, then without any victim it
//! turns out not to need. It is pure: a snapshot without the candidates'
//! leases, and the candidates, in; victims out.
//!
//! **Then.** Each victim's lease is asked to stop with the preemption
//! noted (the worker writes a line to the task's inbox, sends SIGTERM,
//! and SIGKILL after `preempt_grace`); the task ends INTERRUPTED "preempted
//! by JOB" and waits again as a new attempt that spends no retry. The
//! workers the victims free are held for the preemptor (a
//! `queue::PreemptHold`) until it is placed, or until the hold lapses.
//! The lease and fencing rules do not change: the preemptor is placed only
//! once a victim's lease is gone (released, or expired after its worker
//! fenced the task), so two attempts never hold the same resources.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use gpufleet_schema::{subjects, Grant, JobId, LeaseKey, TaskState};

use super::queue::PreemptHold;
use super::Engine;
use crate::placement::{self, TaskRequest, WorkerView};
use crate::state::{JobRecord, Reason, Stop};

/// Work that did not fit in a pass and whose class may preempt.
#[derive(Debug, Clone)]
pub struct Preemptor {
    pub job: JobId,
    /// The task, for a plain job; `None` for a gang.
    pub task: Option<usize>,
    /// Its waiting tasks, with what each asks.
    pub tasks: Vec<usize>,
    pub asks: Vec<TaskRequest>,
    /// The fewest of them that may start (a gang's `min_tasks`).
    pub min: usize,
    /// Victims must be of a lower priority than this.
    pub class: i32,
}

/// A unit that may be preempted: a running task, or a running gang whole.
#[derive(Debug, Clone)]
pub struct Victim {
    pub job: JobId,
    pub priority: i32,
    /// Each member: its task, its lease, its worker (an index into the
    /// views) and what it holds there.
    pub members: Vec<(usize, LeaseKey, usize, Grant)>,
    /// The work stopping it loses: its members' run time so far.
    pub lost: Duration,
}

impl Victim {
    /// Fewest tasks first, then least work lost.
    fn cost(&self) -> (usize, Duration) {
        (self.members.len(), self.lost)
    }

    fn on(&self, worker: usize) -> bool {
        self.members.iter().any(|(_, _, w, _)| *w == worker)
    }
}

/// Up to this many candidates, [`choose`] tries every set of them; past
/// it, it picks greedily (cheapest first, then drops what is not needed).
const EXACT: usize = 12;

/// The victims (indices into `candidates`) whose preemption lets `asks`
/// be placed (at least `min` of them together, for a gang; one task goes
/// on one worker), with the least lost work; `None` if preempting every
/// candidate would not do. `base` is the snapshot without any candidate's
/// lease: a candidate that is not chosen still holds what it holds.
pub fn choose(
    asks: &[TaskRequest],
    min: usize,
    base: &[WorkerView],
    candidates: &[Victim],
) -> Option<Vec<usize>> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&c| candidates[c].cost());
    let fits = |chosen: &[usize], workers: Option<usize>| -> bool {
        let mut views: Vec<WorkerView> = match workers {
            Some(w) => vec![base[w].clone()],
            None => base.to_vec(),
        };
        for (c, v) in candidates.iter().enumerate() {
            if chosen.contains(&c) {
                continue;
            }
            for (_, _, w, grant) in &v.members {
                match workers {
                    Some(only) if *w == only => views[0].hold(grant),
                    Some(_) => {}
                    None => views[*w].hold(grant),
                }
            }
        }
        !placement::place_gang(asks, min, &mut views)
            .assigned
            .is_empty()
    };
    let total = |chosen: &[usize]| {
        let mut n = 0;
        let mut lost = Duration::ZERO;
        for &c in chosen {
            n += candidates[c].members.len();
            lost += candidates[c].lost;
        }
        (n, lost)
    };
    let pick = |among: Vec<usize>, workers: Option<usize>| -> Option<Vec<usize>> {
        if among.len() <= EXACT {
            // Every set, the cheapest that fits: few candidates at a time
            // (one worker's, for a task), and a cheaper set skips the
            // placement check.
            let mut best: Option<((usize, Duration), Vec<usize>)> = None;
            for mask in 1u32..(1 << among.len()) {
                let set: Vec<usize> = (0..among.len())
                    .filter(|k| mask & (1 << k) != 0)
                    .map(|k| among[k])
                    .collect();
                let cost = total(&set);
                if best.as_ref().is_some_and(|(b, _)| *b <= cost) {
                    continue;
                }
                if fits(&set, workers) {
                    best = Some((cost, set));
                }
            }
            return best.map(|(_, set)| set);
        }
        // Too many to try every set: add victims cheapest first until the
        // work fits, then drop those it fits without, costliest first.
        let mut chosen = Vec::new();
        let mut ok = false;
        for c in among {
            chosen.push(c);
            if fits(&chosen, workers) {
                ok = true;
                break;
            }
        }
        if !ok {
            return None;
        }
        for k in (0..chosen.len()).rev() {
            let mut without = chosen.clone();
            without.remove(k);
            if fits(&without, workers) {
                chosen = without;
            }
        }
        Some(chosen)
    };
    if asks.len() == 1 {
        // One task runs on one worker: only that worker's victims.
        (0..base.len())
            .filter_map(|w| {
                let here: Vec<usize> = order
                    .iter()
                    .copied()
                    .filter(|&c| candidates[c].on(w))
                    .collect();
                if here.is_empty() {
                    return None;
                }
                pick(here, Some(w))
            })
            .min_by_key(|chosen| total(chosen))
    } else {
        pick(order, None)
    }
}

impl Engine {
    /// Notes `job`'s waiting `tasks` (a plain job's one task, or a gang's
    /// members), which did not fit, as work that may preempt if its
    /// owner's policy allows (called only when the policy lets anybody).
    pub(super) fn may_preempt_for(
        &self,
        job: &JobRecord,
        tasks: &[usize],
        min: usize,
        preemptors: &mut Vec<Preemptor>,
    ) {
        let Some(max) = self.shares.policy().preempt_priority(&job.owner) else {
            return;
        };
        let class = job.spec.priority.min(max);
        preemptors.push(Preemptor {
            job: job.id.clone(),
            task: (!job.spec.gang).then(|| tasks[0]),
            tasks: tasks.to_vec(),
            asks: tasks.iter().map(|&i| self.request(job, i, false)).collect(),
            min,
            class,
        });
    }

    /// The jobs for which running tasks are being preempted.
    fn stopping_for(&self) -> HashSet<JobId> {
        self.queue
            .jobs()
            .flat_map(|id| self.jobs[id].tasks.iter())
            .filter(|t| t.holds_worker())
            .filter_map(|t| t.preempted_by().cloned())
            .collect()
    }

    /// The running units that may be preempted, with the view index of
    /// each worker by name.
    fn victims(&self, index: &HashMap<&gpufleet_schema::WorkerId, usize>) -> Vec<Victim> {
        let mut out = Vec::new();
        for id in self.queue.jobs() {
            let job = &self.jobs[id];
            if !job.spec.preemptible || job.cancel_requested || job.gang_broken.is_some() {
                continue;
            }
            let holding: Vec<usize> = (0..job.tasks.len())
                .filter(|&i| job.tasks[i].holds_worker())
                .collect();
            let running = |i: &usize| {
                let t = &job.tasks[*i];
                t.state == TaskState::Running && t.stopping.is_none()
            };
            let units: Vec<Vec<usize>> = if job.spec.gang {
                // Whole, and only once every member runs.
                if holding.is_empty() || !holding.iter().all(running) {
                    continue;
                }
                vec![holding]
            } else {
                holding
                    .into_iter()
                    .filter(running)
                    .map(|i| vec![i])
                    .collect()
            };
            for unit in units {
                let mut members = Vec::new();
                let mut lost = Duration::ZERO;
                for i in unit {
                    let t = &job.tasks[i];
                    let (Some(w), Some(grant)) = (&t.worker, &t.grant) else {
                        continue;
                    };
                    let Some(&wi) = index.get(w) else { continue };
                    if let Some(started) = t.started_at {
                        lost += Duration::try_from(self.now.wall - started).unwrap_or_default();
                    }
                    members.push((
                        i,
                        subjects::lease_key(w, &t.id, t.attempt),
                        wi,
                        Grant::clone(grant),
                    ));
                }
                if !members.is_empty() {
                    out.push(Victim {
                        job: id.clone(),
                        priority: job.spec.priority,
                        members,
                        lost,
                    });
                }
            }
        }
        out
    }

    /// The preemption phase of a pass: for each preemptor, highest class
    /// first, victims are chosen and asked to stop, and the workers they
    /// free are held for it; one already waiting for its victims says so.
    /// `reserved` is what this pass placed (worker index, grant). Returns
    /// the jobs that changed.
    pub(super) fn preempt(
        &mut self,
        mut preemptors: Vec<Preemptor>,
        reserved: &[(usize, &Grant)],
        waiting: &mut [(JobId, usize, Reason)],
    ) -> HashSet<JobId> {
        let mut touched = HashSet::new();
        preemptors.sort_by_key(|p| (std::cmp::Reverse(p.class), self.jobs[&p.job].seq));
        let mut why_waiting: HashMap<(JobId, usize), String> = HashMap::new();
        // Built on the first preemptor that needs them.
        let mut fleet: Option<(Vec<WorkerView>, Vec<Victim>)> = None;
        let mut taken: HashSet<usize> = HashSet::new();
        let mut stopping: Option<HashSet<JobId>> = None;
        for p in preemptors {
            let pending = self
                .queue
                .preempting()
                .iter()
                .find(|h| h.job == p.job && (h.task.is_none() || h.task == p.task))
                .map(|h| h.why.clone());
            // Its victims may be stopping with no hold for it: the hold is
            // not stored, and a coordinator that took over has none.
            let pending = pending.or_else(|| {
                stopping
                    .get_or_insert_with(|| self.stopping_for())
                    .contains(&p.job)
                    .then(|| "waiting for preemption: its victims are stopping".to_string())
            });
            if let Some(why) = pending {
                for &i in &p.tasks {
                    why_waiting.insert((p.job.clone(), i), why.clone());
                }
                continue;
            }
            let (base, candidates) = fleet.get_or_insert_with(|| {
                let views = self.book.snapshot();
                let index = views
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (&v.name, i))
                    .collect();
                let candidates = self.victims(&index);
                let gone: HashSet<&LeaseKey> = candidates
                    .iter()
                    .flat_map(|v| v.members.iter().map(|(_, k, _, _)| k))
                    .collect();
                let mut base = self.book.snapshot_without(&gone);
                for (w, grant) in reserved {
                    base[*w].hold(grant);
                }
                // Workers held for other preemptors are theirs.
                for h in self.queue.preempting() {
                    for v in base.iter_mut().filter(|v| h.workers.contains(&v.name)) {
                        v.draining = true;
                    }
                }
                (base, candidates)
            });
            // Victims taken by a preemptor before stay where they are.
            let eligible: Vec<usize> = (0..candidates.len())
                .filter(|c| !taken.contains(c) && candidates[*c].priority < p.class)
                .collect();
            if eligible.is_empty() {
                continue;
            }
            let mut base_now = base.clone();
            for &c in &taken {
                for (_, _, w, grant) in &candidates[c].members {
                    base_now[*w].hold(grant);
                }
            }
            let pool: Vec<Victim> = eligible.iter().map(|&c| candidates[c].clone()).collect();
            for (c, v) in candidates.iter().enumerate() {
                if !taken.contains(&c) && !eligible.contains(&c) {
                    for (_, _, w, grant) in &v.members {
                        base_now[*w].hold(grant);
                    }
                }
            }
            let Some(chosen) = choose(&p.asks, p.min, &base_now, &pool) else {
                continue;
            };
            let chosen: Vec<usize> = chosen.into_iter().map(|k| eligible[k]).collect();
            taken.extend(chosen.iter().copied());
            let victims: Vec<Victim> = chosen.iter().map(|&c| candidates[c].clone()).collect();
            let why = self.start_preemption(&p, &victims, base);
            for &i in &p.tasks {
                why_waiting.insert((p.job.clone(), i), why.clone());
            }
            for v in &victims {
                touched.insert(v.job.clone());
            }
        }
        for (job, i, reason) in waiting.iter_mut() {
            if let Some(why) = why_waiting.remove(&(job.clone(), *i)) {
                *reason = Reason::new(why);
            }
        }
        touched
    }

    /// Asks `victims` to stop for `p`, holds their workers for it, and
    /// returns what `p` says while it waits.
    fn start_preemption(
        &mut self,
        p: &Preemptor,
        victims: &[Victim],
        views: &[WorkerView],
    ) -> String {
        let grace = self.cfg.preempt_grace;
        let mut workers = Vec::new();
        let mut tasks = 0;
        for v in victims {
            for (i, key, w, _) in &v.members {
                let name = views[*w].name.clone();
                if !workers.contains(&name) {
                    workers.push(name);
                }
                tasks += 1;
                let t = self.jobs.task_mut(&v.job, *i);
                t.stopping = Some(Box::new(Stop::Preempt { by: p.job.clone() }));
                t.reason = Some(Reason::new(format!(
                    "preempted by {}: asked to stop (SIGTERM, SIGKILL after {grace})",
                    p.job
                )));
                self.stop_lease(&v.job, *i, key);
                self.emit_state(&v.job, *i);
            }
        }
        workers.sort();
        let jobs: Vec<String> = {
            let mut j: Vec<String> = victims.iter().map(|v| v.job.to_string()).collect();
            j.dedup();
            j
        };
        let names: Vec<String> = workers.iter().map(|w| w.to_string()).collect();
        let why = format!(
            "waiting for preemption: {tasks} task{} of job {} on {} stop{} first",
            if tasks == 1 { "" } else { "s" },
            jobs.join(", "),
            names.join(", "),
            if tasks == 1 { "s" } else { "" },
        );
        tracing::info!(job_id = %p.job, victims = tasks, ?workers, "preempting for waiting work");
        self.metrics.preempted(tasks);
        // Long enough for the victims to be gone: the grace, and a lease's
        // lifetime for a worker that froze meanwhile.
        let until = self.now.mono + grace.0 + self.cfg.lease_ttl.0 * 2;
        self.queue.hold_for_preemption(PreemptHold {
            job: p.job.clone(),
            task: p.task,
            workers,
            until,
            why: why.clone(),
        });
        why
    }
}

#[cfg(test)]
mod tests {
    //! The choice alone, on random fleets: it frees what is needed (the
    //! work fits once the victims are gone), picks the least lost work,
    //! and never splits a gang.

    use super::*;
    use gpufleet_schema::capacity::{GpuCapacity, WorkerCapacity};
    use gpufleet_schema::{GpuRequest, TaskId, WorkerId};
    use proptest::prelude::*;

    fn worker(name: &str, gpus: u32) -> WorkerView {
        WorkerView {
            name: WorkerId::new(name).unwrap(),
            labels: Default::default(),
            draining: false,
            capacity: WorkerCapacity::new(
                16_000,
                64 << 30,
                (0..gpus)
                    .map(|i| GpuCapacity::new(i, format!("GPU-{name}-{i}").into(), 24 << 30, 0))
                    .collect(),
            ),
        }
    }

    fn ask(gpus: u32) -> TaskRequest {
        TaskRequest {
            cpus_milli: 1000,
            memory: 0,
            gpu: if gpus == 0 {
                GpuRequest::None
            } else {
                GpuRequest::Whole {
                    count: gpus,
                    memory: 0,
                }
            },
            labels: Default::default(),
            workers: vec![],
            avoid: vec![],
            load: None,
        }
    }

    /// Places a victim's members (`(worker, gpus)` each) on `views`, which
    /// stay as the snapshot without it; returns it.
    fn victim(views: &[WorkerView], job: &str, members: &[(usize, u32)], lost_secs: u64) -> Victim {
        let mut shadow = views.to_vec();
        let members = members
            .iter()
            .enumerate()
            .map(|(i, &(w, gpus))| {
                let mut one = [shadow[w].clone()];
                let p = placement::place(&[ask(gpus)], &mut one);
                let grant = p.assigned[0].grant.clone();
                shadow[w] = one[0].clone();
                let task = TaskId::new(format!("{job}-{i}")).unwrap();
                (i, subjects::lease_key(&shadow[w].name, &task, 1), w, grant)
            })
            .collect();
        Victim {
            job: JobId::new(job).unwrap(),
            priority: 0,
            members,
            lost: Duration::from_secs(lost_secs),
        }
    }

    /// `views` with every victim but `chosen` holding what it holds.
    fn with_held(views: &[WorkerView], cands: &[Victim], chosen: &[usize]) -> Vec<WorkerView> {
        let mut v = views.to_vec();
        for (c, x) in cands.iter().enumerate() {
            if !chosen.contains(&c) {
                for (_, _, w, g) in &x.members {
                    v[*w].hold(g);
                }
            }
        }
        v
    }

    #[test]
    fn the_youngest_of_equal_victims_on_one_worker_goes() {
        let views = vec![worker("w1", 2), worker("w2", 2)];
        // w1: two one-GPU tasks (old and young); w2: one two-GPU task.
        let mut cands = Vec::new();
        let mut shadow = views.clone();
        for (job, w, gpus, lost) in [
            ("old", 0, 1, 3600),
            ("young", 0, 1, 60),
            ("big", 1, 2, 7200),
        ] {
            let v = victim(&shadow, job, &[(w, gpus)], lost);
            for (_, _, w, g) in &v.members {
                shadow[*w].hold(g);
            }
            cands.push(v);
        }
        let chosen = choose(&[ask(1)], 1, &views, &cands).expect("one victim frees a GPU");
        assert_eq!(chosen, vec![1], "the young one, not the older ones");
        // Two GPUs: the one 2-GPU task (one victim, however old) rather
        // than both on w1.
        let chosen = choose(&[ask(2)], 1, &views, &cands).expect("fits");
        assert_eq!(chosen, vec![2]);
        // Three GPUs on one worker: impossible.
        assert_eq!(choose(&[ask(3)], 1, &views, &cands), None);
    }

    #[test]
    fn a_gang_victim_goes_whole_and_a_gang_preemptor_frees_its_workers() {
        let views = vec![worker("w1", 1), worker("w2", 1)];
        let gang = victim(&views, "gang", &[(0, 1), (1, 1)], 5);
        let cands = vec![gang];
        // One GPU asked: the only way is the whole gang, both members.
        let chosen = choose(&[ask(1)], 1, &views, &cands).expect("fits");
        assert_eq!(chosen, vec![0]);
        assert_eq!(cands[0].members.len(), 2);
        // A gang of two one-GPU tasks needs both workers.
        let chosen = choose(&[ask(1), ask(1)], 2, &views, &cands).expect("fits");
        assert_eq!(chosen, vec![0]);
    }

    /// GPUs per worker; victims' members as (worker, GPUs); each
    /// victim's run time; GPUs asked per task; how many tasks (2: a gang).
    type Fleet = (Vec<u32>, Vec<Vec<(usize, u32)>>, Vec<u64>, u32, usize);

    fn fleet() -> impl Strategy<Value = Fleet> {
        (
            proptest::collection::vec(1u32..=4, 1..4),
            proptest::collection::vec(proptest::collection::vec((0usize..4, 1u32..=2), 1..3), 0..6),
            proptest::collection::vec(0u64..10_000, 6),
            1u32..=4,
            1usize..=2,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the fleet: a choice frees what is needed (the work
        /// fits without its victims and every other candidate in place);
        /// no victim can be spared; no single victim, nor any one worker's
        /// cheaper set, would have done with fewer tasks; and no choice
        /// means that even every candidate would not do.
        #[test]
        fn a_choice_frees_what_is_needed_and_no_less_costly_one_would_do(
            (gpus, units, lost, asked, n_asks) in fleet()
        ) {
            let views: Vec<WorkerView> = gpus.iter().enumerate().map(|(i, &g)| worker(&format!("w{i}"), g)).collect();
            let mut shadow = views.clone();
            let mut cands = Vec::new();
            for (k, unit) in units.iter().enumerate() {
                let members: Vec<(usize, u32)> = unit.iter().map(|&(w, g)| (w % views.len(), g)).collect();
                // Only what fits now runs.
                let mut trial = shadow.clone();
                let fits = members.iter().all(|&(w, g)| {
                    let mut one = [trial[w].clone()];
                    let ok = !placement::place(&[ask(g)], &mut one).assigned.is_empty();
                    trial[w] = one[0].clone();
                    ok
                });
                if !fits {
                    continue;
                }
                let v = victim(&shadow, &format!("v{k}"), &members, lost[k]);
                shadow = trial;
                cands.push(v);
            }
            let asks: Vec<TaskRequest> = (0..n_asks).map(|_| ask(asked)).collect();
            let min = asks.len();
            // Preemption is asked only for work that does not fit as it is.
            let mut now = with_held(&views, &cands, &[]);
            prop_assume!(placement::place_gang(&asks, min, &mut now).assigned.is_empty());
            match choose(&asks, min, &views, &cands) {
                Some(chosen) => {
                    prop_assert!(!chosen.is_empty());
                    let mut after = with_held(&views, &cands, &chosen);
                    prop_assert!(!placement::place_gang(&asks, min, &mut after).assigned.is_empty(), "frees what is needed");
                    for k in 0..chosen.len() {
                        let mut fewer = chosen.clone();
                        fewer.remove(k);
                        let mut v = with_held(&views, &cands, &fewer);
                        prop_assert!(placement::place_gang(&asks, min, &mut v).assigned.is_empty(), "victim {} could be spared", chosen[k]);
                    }
                    // No cheaper set (fewer tasks, then less work lost)
                    // would have done.
                    let cost = |set: &[usize]| {
                        let n: usize = set.iter().map(|&c| cands[c].members.len()).sum();
                        let lost: Duration = set.iter().map(|&c| cands[c].lost).sum();
                        (n, lost)
                    };
                    for mask in 1u32..(1 << cands.len()) {
                        let set: Vec<usize> = (0..cands.len()).filter(|k| mask & (1 << k) != 0).collect();
                        if cost(&set) >= cost(&chosen) {
                            continue;
                        }
                        let mut v = with_held(&views, &cands, &set);
                        prop_assert!(placement::place_gang(&asks, min, &mut v).assigned.is_empty(), "{set:?} loses less than {chosen:?} and would do");
                    }
                }
                None => {
                    let all: Vec<usize> = (0..cands.len()).collect();
                    let mut v = with_held(&views, &cands, &all);
                    // A single task must fit one worker's victims; a gang
                    // all of them.
                    prop_assert!(placement::place_gang(&asks, min, &mut v).assigned.is_empty() || n_asks == 1);
                    if n_asks == 1 {
                        for w in 0..views.len() {
                            let here: Vec<usize> = (0..cands.len()).filter(|&c| cands[c].on(w)).collect();
                            let mut one = [with_held(&views, &cands, &here)[w].clone()];
                            prop_assert!(placement::place(&asks, &mut one).assigned.is_empty(), "worker {w}'s victims would do");
                        }
                    }
                }
            }
        }
    }
}
