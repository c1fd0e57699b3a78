//! Placement: a pure function from a snapshot to assignments.
//!
//! `place(tasks, workers)` filters workers for each task (cheap checks first,
//! each rejection with a reason), scores the ones left (0..100), and takes
//! the best, deducting what it gave from its copy of the snapshot so that
//! later tasks in the same call see it. No NATS and no clock in here: the
//! engine builds the snapshot and applies the result. See `README.md` beside
//! this file for the algorithm and its reasons.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};

use gpufleet_schema::capacity::WorkerCapacity;
use gpufleet_schema::{GpuRequest, Grant, WorkerId};

/// One worker as placement sees it: who it is, and its capacity by the
/// model the worker itself checks grants with.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub name: WorkerId,
    pub labels: BTreeMap<String, String>,
    pub draining: bool,
    pub capacity: WorkerCapacity,
}

/// A view reads as its capacity (`view.cpus_free_milli`, `view.gpus`):
/// the filters and scores below, and the engine's hold logic, look at
/// little else.
impl Deref for WorkerView {
    type Target = WorkerCapacity;

    fn deref(&self) -> &WorkerCapacity {
        &self.capacity
    }
}

impl DerefMut for WorkerView {
    fn deref_mut(&mut self) -> &mut WorkerCapacity {
        &mut self.capacity
    }
}

/// What one task needs, and where it may go.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequest {
    pub cpus_milli: u64,
    pub memory: u64,
    pub gpu: GpuRequest,
    pub labels: BTreeMap<String, String>,
    /// If not empty, only these workers.
    pub workers: Vec<WorkerId>,
    /// Workers that recently refused this task.
    pub avoid: Vec<WorkerId>,
    /// A two-phase task's load phase: it holds only this now (no GPU), on
    /// a worker that could hold the whole request above later.
    pub load: Option<LoadAsk>,
}

/// What a load phase holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoadAsk {
    pub cpus_milli: u64,
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Index into the `tasks` slice given to [`place`].
    pub task: usize,
    /// Index into the `workers` slice.
    pub worker: usize,
    pub grant: Grant,
}

/// Why a task was not placed, summed over workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub task: usize,
    pub reason: String,
    /// True when no worker in the snapshot could ever hold it, busy or not.
    pub never_fits: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub assigned: Vec<Assignment>,
    pub unplaced: Vec<Unplaced>,
}

/// Why one worker cannot take one task. Static reasons hold whatever runs
/// there; the others may pass once tasks end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reject {
    NotNamed,
    Labels,
    Draining,
    Avoided,
    GpuCount { has: usize },
    GpuMemory { largest: u64 },
    CpusTotal { has: u64 },
    MemoryTotal { has: u64 },
    LoadCap { cap: u64 },
    GpusBusy { free: usize },
    GpuMemoryBusy { most_free: u64 },
    CpusBusy,
    MemoryBusy,
    LoadCapBusy,
}

impl Reject {
    /// Whether the worker stays unfit for every request of the same
    /// resources while capacities only shrink: the reasons that are not
    /// about who asks (named workers, labels, the avoid window) or about
    /// a mask that comes and goes (draining, held workers).
    fn lasts_for_shape(self) -> bool {
        !matches!(
            self,
            Reject::NotNamed | Reject::Labels | Reject::Draining | Reject::Avoided
        )
    }

    fn is_static(self) -> bool {
        !matches!(
            self,
            Reject::GpusBusy { .. }
                | Reject::GpuMemoryBusy { .. }
                | Reject::CpusBusy
                | Reject::MemoryBusy
                | Reject::LoadCapBusy
                | Reject::Avoided
        )
    }
}

/// What fits on one worker, with the GPUs it would use.
struct Fit {
    score: u32,
    gpus: Chosen,
}

/// The GPUs a fit would use. A scan computes a fit for every worker that
/// fits, and most tasks want none or one: those take no allocation.
enum Chosen {
    None,
    One(usize),
    Many(Vec<usize>),
}

impl Chosen {
    fn as_slice(&self) -> &[usize] {
        match self {
            Chosen::None => &[],
            Chosen::One(i) => std::slice::from_ref(i),
            Chosen::Many(v) => v,
        }
    }
}

fn fmt_bytes(b: u64) -> String {
    gpufleet_schema::ByteSize(b).to_string()
}

fn fmt_cpus(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        format!("{}", milli / 1000)
    } else {
        format!("{:.2}", milli as f64 / 1000.0)
    }
}

/// Filters, cheapest first; `Ok` carries the chosen GPUs and the score.
fn fit(task: &TaskRequest, w: &WorkerView) -> Result<Fit, Reject> {
    if !task.workers.is_empty() && !task.workers.contains(&w.name) {
        return Err(Reject::NotNamed);
    }
    if task.labels.iter().any(|(k, v)| w.labels.get(k) != Some(v)) {
        return Err(Reject::Labels);
    }
    if w.draining {
        return Err(Reject::Draining);
    }
    if task.avoid.contains(&w.name) {
        return Err(Reject::Avoided);
    }
    // Static capacity before anything that depends on what runs now.
    match task.gpu {
        GpuRequest::None => {}
        GpuRequest::Whole { count, memory } => {
            if w.gpus.len() < count as usize {
                return Err(Reject::GpuCount { has: w.gpus.len() });
            }
            let big_enough = w.gpus.iter().filter(|g| g.memory_total >= memory).count();
            if big_enough < count as usize {
                let largest = w.gpus.iter().map(|g| g.memory_total).max().unwrap_or(0);
                return Err(Reject::GpuMemory { largest });
            }
        }
        GpuRequest::Share { memory } => {
            let largest = w.gpus.iter().map(|g| g.memory_total).max().unwrap_or(0);
            if w.gpus.is_empty() {
                return Err(Reject::GpuCount { has: 0 });
            }
            if largest < memory {
                return Err(Reject::GpuMemory { largest });
            }
        }
    }
    if w.cpus_total_milli < task.cpus_milli {
        return Err(Reject::CpusTotal {
            has: w.cpus_total_milli,
        });
    }
    if w.memory_total < task.memory {
        return Err(Reject::MemoryTotal {
            has: w.memory_total,
        });
    }
    if let Some(load) = task.load {
        return fit_load(task, load, w);
    }
    if !w.fits_cpus(task.cpus_milli) {
        return Err(Reject::CpusBusy);
    }
    if !w.fits_memory(task.memory) {
        return Err(Reject::MemoryBusy);
    }
    let cpu_pack = |after_free: u64| -> u32 {
        // Fuller workers score higher, so that work packs and whole
        // machines stay free for large tasks.
        (100 * (w.cpus_total_milli - after_free))
            .checked_div(w.cpus_total_milli)
            .unwrap_or(0) as u32
    };
    match task.gpu {
        GpuRequest::None => {
            // CPU work goes to machines without GPUs first.
            let gpu_bonus = if w.gpus.is_empty() { 50 } else { 0 };
            Ok(Fit {
                score: gpu_bonus + cpu_pack(w.cpus_free_milli - task.cpus_milli) / 2,
                gpus: Chosen::None,
            })
        }
        GpuRequest::Whole { count, memory } => {
            // Best fit: the smallest GPUs that are big enough, keeping large
            // ones whole; among equals the one with the most free memory.
            let best_first = |&i: &usize| {
                (
                    w.gpus[i].memory_total,
                    std::cmp::Reverse(w.gpus[i].memory_free),
                    i,
                )
            };
            let fitting = (0..w.gpus.len()).filter(|&i| w.gpus[i].fits_whole(memory));
            let idle = if count == 1 {
                // The one best GPU, without a list.
                fitting.min_by_key(best_first).map(Chosen::One)
            } else {
                let mut idle: Vec<usize> = fitting.collect();
                (idle.len() >= count as usize).then(|| {
                    idle.sort_by_key(best_first);
                    idle.truncate(count as usize);
                    Chosen::Many(idle)
                })
            };
            let Some(idle) = idle else {
                let free = w.gpus.iter().filter(|g| g.is_idle()).count();
                if free < count as usize {
                    return Err(Reject::GpusBusy { free });
                }
                let most_free = w.gpus.iter().map(|g| g.memory_free).max().unwrap_or(0);
                return Err(Reject::GpuMemoryBusy { most_free });
            };
            let chosen = idle.as_slice();
            let used_after = w.gpus.iter().filter(|g| !g.is_idle()).count() + chosen.len();
            let pack = (100 * used_after / w.gpus.len()) as u32;
            let chosen_total: u64 = chosen.iter().map(|&i| w.gpus[i].memory_total).sum();
            let waste = (100 * (chosen_total - memory * count as u64))
                .checked_div(chosen_total)
                .unwrap_or(0) as u32;
            Ok(Fit {
                score: pack / 2 + (100 - waste.min(100)) / 2,
                gpus: idle,
            })
        }
        GpuRequest::Share { memory } => {
            // A GPU that is already shared first (keep idle GPUs whole for
            // whole-GPU tasks); then the most free memory, as fedflow's
            // assign_cuda does.
            let best = (0..w.gpus.len())
                .filter(|&i| w.gpus[i].fits_share(memory))
                .max_by_key(|&i| {
                    let g = &w.gpus[i];
                    (g.shares > 0, g.memory_free, std::cmp::Reverse(i))
                });
            match best {
                None => {
                    let most_free = w
                        .gpus
                        .iter()
                        .filter(|g| !g.exclusive)
                        .map(|g| g.memory_free)
                        .max()
                        .unwrap_or(0);
                    Err(Reject::GpuMemoryBusy { most_free })
                }
                Some(i) => {
                    let g = &w.gpus[i];
                    let shared_bonus = if g.shares > 0 { 50 } else { 0 };
                    let roomy = (50 * (g.memory_free - memory) / g.memory_total.max(1)) as u32;
                    Ok(Fit {
                        score: shared_bonus + roomy,
                        gpus: Chosen::One(i),
                    })
                }
            }
        }
    }
}

/// The rest of [`fit`] for a load phase, on a worker that could hold the
/// whole task: what the load phase holds must fit now, under the
/// worker's load-phase memory cap too.
fn fit_load(task: &TaskRequest, load: LoadAsk, w: &WorkerView) -> Result<Fit, Reject> {
    if w.load_memory_cap < load.memory {
        return Err(Reject::LoadCap {
            cap: w.load_memory_cap,
        });
    }
    if !w.fits_cpus(load.cpus_milli) {
        return Err(Reject::CpusBusy);
    }
    if !w.fits_memory(load.memory) {
        return Err(Reject::MemoryBusy);
    }
    if !w.fits_loading(load.memory) {
        return Err(Reject::LoadCapBusy);
    }
    // Where its GPU is free now, it may have it as soon as it has loaded.
    let gpu_now = gpu_fits_now(task.gpu, w);
    let after = w.cpus_free_milli - load.cpus_milli;
    let pack = (100 * (w.cpus_total_milli - after))
        .checked_div(w.cpus_total_milli)
        .unwrap_or(0) as u32;
    Ok(Fit {
        score: if gpu_now { 50 } else { 0 } + pack / 2,
        gpus: Chosen::None,
    })
}

/// Whether `gpu` could be given on `w` now.
pub fn gpu_fits_now(gpu: GpuRequest, w: &WorkerCapacity) -> bool {
    match gpu {
        GpuRequest::None => true,
        GpuRequest::Whole { count, memory } => {
            w.gpus.iter().filter(|g| g.fits_whole(memory)).count() >= count as usize
        }
        GpuRequest::Share { memory } => w.gpus.iter().any(|g| g.fits_share(memory)),
    }
}

/// Best worker for one task, or the reasons none fits.
fn choose(task: &TaskRequest, workers: &[WorkerView]) -> Result<(usize, Fit), Vec<Reject>> {
    let mut best: Option<(usize, Fit)> = None;
    let mut rejects = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        match fit(task, w) {
            Ok(f) => {
                // Ties go to the earlier worker, so results are stable.
                if best.as_ref().is_none_or(|(_, b)| f.score > b.score) {
                    best = Some((i, f));
                }
            }
            Err(r) => rejects.push(r),
        }
    }
    best.ok_or(rejects)
}

/// Gives task `t` what `f` chose on worker `w`.
fn assign(
    t: usize,
    task: &TaskRequest,
    w: usize,
    f: Fit,
    workers: &mut [WorkerView],
) -> Assignment {
    let grant = match task.load {
        Some(load) => workers[w].take_loading(load.cpus_milli, load.memory),
        None => workers[w].take(task.cpus_milli, task.memory, task.gpu, f.gpus.as_slice()),
    };
    Assignment {
        task: t,
        worker: w,
        grant,
    }
}

/// Places `tasks` in the order given (the queue's order) on `workers`,
/// updating `workers` to what is left.
pub fn place(tasks: &[TaskRequest], workers: &mut [WorkerView]) -> Placement {
    let mut out = Placement::default();
    for (t, task) in tasks.iter().enumerate() {
        match choose(task, workers) {
            Ok((w, f)) => out.assigned.push(assign(t, task, w, f, workers)),
            Err(rejects) => out.unplaced.push(explain(t, task, &rejects, workers)),
        }
    }
    out
}

/// The resources of a request: what decides, besides who asks, where it
/// fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    cpus_milli: u64,
    memory: u64,
    gpu: (u8, u32, u64),
    load: Option<LoadAsk>,
}

impl Shape {
    fn of(task: &TaskRequest) -> Shape {
        Shape {
            cpus_milli: task.cpus_milli,
            memory: task.memory,
            gpu: match task.gpu {
                GpuRequest::None => (0, 0, 0),
                GpuRequest::Whole { count, memory } => (1, count, memory),
                GpuRequest::Share { memory } => (2, 0, memory),
            },
            load: task.load,
        }
    }
}

/// An index for one scheduling pass: for each shape of request, the
/// workers that may still fit it. A worker found too small or too busy
/// for a shape leaves that shape's list for good, so that with
/// thousands of workers, mostly busy, a placement looks at the few that
/// may fit instead of all of them.
///
/// Valid only while capacities only shrink, as in a pass (the snapshot
/// is taken once and placements only take from it): a worker that could
/// not hold a shape then never can. [`Candidates::place`] gives what
/// [`place`] gives for one task (same worker, same grant, same reason),
/// as the property test `candidates_place_as_the_plain_scan` checks.
#[derive(Debug, Default)]
pub struct Candidates {
    alive: HashMap<Shape, Vec<usize>>,
}

impl Candidates {
    /// [`place`] for one task, looking only at the workers that may
    /// still fit its shape; when none does, the plain scan says why.
    pub fn place(&mut self, task: &TaskRequest, workers: &mut [WorkerView]) -> Placement {
        let alive = self
            .alive
            .entry(Shape::of(task))
            .or_insert_with(|| (0..workers.len()).collect());
        let mut best: Option<(usize, Fit)> = None;
        // In worker order, so that ties go to the earlier worker as in
        // `choose`.
        alive.retain(|&i| match fit(task, &workers[i]) {
            Ok(f) => {
                if best.as_ref().is_none_or(|(_, b)| f.score > b.score) {
                    best = Some((i, f));
                }
                true
            }
            Err(r) => !r.lasts_for_shape(),
        });
        match best {
            Some((w, f)) => Placement {
                assigned: vec![assign(0, task, w, f, workers)],
                unplaced: vec![],
            },
            None => place(std::slice::from_ref(task), workers),
        }
    }
}

/// Places a gang: every task or none. With `min` below the task count, as
/// many as fit, if at least `min` do. On failure `workers` is unchanged.
pub fn place_gang(tasks: &[TaskRequest], min: usize, workers: &mut [WorkerView]) -> Placement {
    let mut trial = workers.to_vec();
    let placement = place(tasks, &mut trial);
    if placement.assigned.len() >= min.max(1) {
        workers.clone_from_slice(&trial);
        return placement;
    }
    // None of it happens; every task reports why the gang waits.
    let placed = placement.assigned.len();
    let detail = placement
        .unplaced
        .first()
        .map(|u| u.reason.clone())
        .unwrap_or_default();
    let never_fits = placement.unplaced.iter().any(|u| u.never_fits);
    Placement {
        assigned: vec![],
        unplaced: (0..tasks.len())
            .map(|t| Unplaced {
                task: t,
                reason: format!(
                    "gang needs {} tasks placed together, only {placed} fit now: {detail}",
                    min.max(1)
                ),
                never_fits,
            })
            .collect(),
    }
}

/// Turns per-worker rejections into one sentence for the job's `reason`.
fn explain(t: usize, task: &TaskRequest, rejects: &[Reject], workers: &[WorkerView]) -> Unplaced {
    if workers.is_empty() {
        return Unplaced {
            task: t,
            reason: "no workers are online".into(),
            never_fits: true,
        };
    }
    let never_fits = rejects.len() == workers.len() && rejects.iter().all(|r| r.is_static());
    let reason = if never_fits {
        // The most telling static reason: the one that got furthest.
        let worst = rejects.iter().max().copied().unwrap_or(Reject::NotNamed);
        match worst {
            Reject::NotNamed => format!(
                "none of the named workers ({}) is online",
                task.workers
                    .iter()
                    .map(|w| w.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Reject::Labels => format!(
                "no worker has the labels {}",
                task.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Reject::Draining => "every worker that fits is draining".into(),
            Reject::GpuCount { .. } => {
                let want = match task.gpu {
                    GpuRequest::Whole { count, .. } => count,
                    _ => 1,
                };
                let largest = rejects
                    .iter()
                    .filter_map(|r| match r {
                        Reject::GpuCount { has } => Some(*has),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                format!("no worker has {want} GPUs; the largest has {largest}")
            }
            Reject::GpuMemory { .. } => {
                let want = match task.gpu {
                    GpuRequest::Whole { memory, .. } | GpuRequest::Share { memory } => memory,
                    GpuRequest::None => 0,
                };
                let largest = rejects
                    .iter()
                    .filter_map(|r| match r {
                        Reject::GpuMemory { largest } => Some(*largest),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                format!(
                    "no worker has a GPU with {} of memory; the largest has {}",
                    fmt_bytes(want),
                    fmt_bytes(largest)
                )
            }
            Reject::CpusTotal { .. } => {
                let largest = workers
                    .iter()
                    .map(|w| w.cpus_total_milli)
                    .max()
                    .unwrap_or(0);
                format!(
                    "no worker has {} CPUs; the largest has {}",
                    fmt_cpus(task.cpus_milli),
                    fmt_cpus(largest)
                )
            }
            Reject::LoadCap { .. } => {
                let largest = workers.iter().map(|w| w.load_memory_cap).max().unwrap_or(0);
                format!(
                    "no worker lets a load phase hold {} (load_memory_cap); the largest cap is {}",
                    fmt_bytes(task.load.map_or(0, |l| l.memory)),
                    fmt_bytes(largest)
                )
            }
            Reject::MemoryTotal { .. } => {
                let largest = workers.iter().map(|w| w.memory_total).max().unwrap_or(0);
                format!(
                    "no worker has {} of memory; the largest has {}",
                    fmt_bytes(task.memory),
                    fmt_bytes(largest)
                )
            }
            _ => "no worker fits".into(),
        }
    } else {
        let busy: Vec<&Reject> = rejects.iter().filter(|r| !r.is_static()).collect();
        let mut what: Vec<&str> = busy
            .iter()
            .map(|r| match r {
                Reject::GpusBusy { .. } => "free GPUs",
                Reject::GpuMemoryBusy { .. } => "free GPU memory",
                Reject::CpusBusy => "free CPUs",
                Reject::MemoryBusy => "free memory",
                Reject::LoadCapBusy => "room under the load-phase memory cap",
                Reject::Avoided => "a worker that accepts it (refused recently)",
                _ => "capacity",
            })
            .collect();
        what.sort_unstable();
        what.dedup();
        format!(
            "waiting for {}: {} of {} workers could run it once busy resources free up",
            what.join(" and "),
            busy.len(),
            workers.len()
        )
    };
    Unplaced {
        task: t,
        reason,
        never_fits,
    }
}

#[cfg(test)]
mod tests;
