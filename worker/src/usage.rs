//! What each task attempt uses, measured while it runs.
//!
//! - Host memory and CPU: its process group is sampled from `/proc`
//!   ([`crate::procs::group_usage`]) every
//!   `usage_poll` (the resident memory of its processes together, and
//!   their CPU time, children they reaped included). The first sample
//!   comes one period after the start, so that a task shorter than that
//!   costs no scan of `/proc`; when its main process is reaped, the
//!   kernel's own count (`wait4`: CPU time of it and everything it reaped,
//!   and the largest resident size of any one of them) completes the
//!   figures, so even such a task is measured.
//! - GPUs: at each heartbeat the advert's GPU reading (NVML's per-process
//!   memory and each GPU's utilisation) is shared out by pid over the
//!   task's processes. On simulated GPUs, which have no processes, a task
//!   uses what was set aside for it and its GPUs show 100% while held:
//!   figures tests can check (`gpu_simulated` says so).
//!
//! [`Meter`] holds one attempt's figures, [`Board`] the running ones, for
//! the advert; the supervisor feeds a meter, the agent reads it at the end.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_schema::{ByteSize, GpuGrant, TaskId, TaskUsage};

use crate::gpu::GpuSnapshot;
use crate::procs::GroupUsage;

/// What a task's processes use on its GPUs in one reading: (memory,
/// mean utilisation, simulated). `None` when the reading does not cover
/// them (no GPUs, or GPUs it does not list).
pub fn on_gpus(
    grant: &[GpuGrant],
    pids: &HashSet<u32>,
    snap: &GpuSnapshot,
) -> Option<(Option<u64>, Option<f64>, bool)> {
    let mut memory: Option<u64> = None;
    let mut utilization = Vec::new();
    let mut simulated = false;
    let mut seen = false;
    for g in grant {
        let Some(gpu) = snap.gpus.iter().find(|s| s.uuid == g.uuid) else {
            continue;
        };
        seen = true;
        simulated |= gpu.simulated;
        let used = if gpu.simulated {
            Some(g.memory.0)
        } else {
            // Without a per-process list (some containers) the task's
            // share of the used memory is unknown.
            gpu.processes.as_ref().map(|ps| {
                ps.iter()
                    .filter(|(pid, _)| pids.contains(pid))
                    .map(|(_, bytes)| *bytes)
                    .sum()
            })
        };
        if let Some(u) = used {
            memory = Some(memory.unwrap_or(0) + u);
        }
        if let Some(u) = gpu.utilization {
            utilization.push(u as f64);
        }
    }
    let mean = (!utilization.is_empty())
        .then(|| utilization.iter().sum::<f64>() / utilization.len() as f64);
    seen.then_some((memory, mean, simulated))
}

#[derive(Debug, Default)]
struct Figures {
    peak_rss: u64,
    cpu: Duration,
    samples: u32,
    /// The group's processes at the last sample, for sharing out GPUs.
    pids: HashSet<u32>,
    gpu_peak: Option<u64>,
    utilization_sum: f64,
    utilization_samples: u32,
    simulated: bool,
}

/// One attempt's figures, shared by whoever samples and whoever reads.
#[derive(Debug, Clone)]
pub struct Meter {
    figures: Arc<Mutex<Figures>>,
    gpus: Arc<[GpuGrant]>,
}

impl Meter {
    /// A meter for an attempt granted `gpus`.
    pub fn new(gpus: Vec<GpuGrant>) -> Meter {
        Meter {
            figures: Arc::default(),
            gpus: gpus.into(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Figures) -> R) -> R {
        let mut g = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// The same attempt's meter, granted `gpus` from now on (a two-phase
    /// task's GPU phase): its figures are shared with this one's.
    pub fn with_gpus(&self, gpus: Vec<GpuGrant>) -> Meter {
        Meter {
            figures: self.figures.clone(),
            gpus: gpus.into(),
        }
    }

    /// A reading of the task's process group.
    pub fn host(&self, s: GroupUsage) {
        self.with(|f| {
            f.peak_rss = f.peak_rss.max(s.rss);
            // A process reaped by one outside the group takes its time
            // with it: the highest total seen is the best count.
            f.cpu = f.cpu.max(s.cpu);
            f.samples += 1;
            f.pids = s.pids.into_iter().collect();
        });
    }

    /// The kernel's count when the task's main process was reaped.
    pub fn reaped(&self, cpu: Duration, max_rss: u64) {
        self.with(|f| {
            f.cpu = f.cpu.max(cpu);
            f.peak_rss = f.peak_rss.max(max_rss);
            f.samples += 1;
        });
    }

    /// A reading of the GPUs (a heartbeat's).
    pub fn gpus(&self, snap: &GpuSnapshot) {
        if self.gpus.is_empty() {
            return;
        }
        self.with(|f| {
            let Some((memory, utilization, simulated)) = on_gpus(&self.gpus, &f.pids, snap) else {
                return;
            };
            if let Some(m) = memory {
                f.gpu_peak = Some(f.gpu_peak.unwrap_or(0).max(m));
            }
            if let Some(u) = utilization {
                f.utilization_sum += u;
                f.utilization_samples += 1;
            }
            f.simulated |= simulated;
        });
    }

    /// The figures so far.
    pub fn usage(&self) -> TaskUsage {
        self.with(|f| TaskUsage {
            peak_rss: ByteSize(f.peak_rss),
            // Milliseconds are plenty, and keep the JSON short.
            cpu_seconds: (f.cpu.as_secs_f64() * 1000.0).round() / 1000.0,
            gpu_memory_peak: f.gpu_peak.map(ByteSize),
            gpu_utilization_mean: (f.utilization_samples > 0)
                .then(|| f.utilization_sum / f.utilization_samples as f64),
            gpu_simulated: f.simulated,
            samples: f.samples,
        })
    }
}

/// Samples `pgid` into `meter` every `every`, from one period after the
/// start, until dropped.
pub async fn follow(meter: Meter, pgid: i32, every: Duration) {
    let every = every.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sampled = tokio::task::spawn_blocking(move || {
            crate::procs::group_usage(Path::new(crate::procs::ROOT), pgid)
        })
        .await;
        match sampled {
            Ok(Ok(s)) if !s.pids.is_empty() => meter.host(s),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(pgid, error = %e, "cannot read the task's processes");
            }
            Err(_) => return,
        }
    }
}

/// A task's attempt: the key of a [`Board`].
pub type Attempt = (TaskId, u32);

/// The meters of the attempts running now, for the advert.
#[derive(Debug, Clone, Default)]
pub struct Board(Arc<Mutex<BTreeMap<Attempt, Meter>>>);

impl Board {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<Attempt, Meter>) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn add(&self, attempt: Attempt, meter: Meter) {
        self.with(|b| b.insert(attempt, meter));
    }

    pub fn remove(&self, attempt: &Attempt) {
        self.with(|b| b.remove(attempt));
    }

    /// Shares a GPU reading out over the running attempts.
    pub fn gpus(&self, snap: &GpuSnapshot) {
        for meter in self.with(|b| b.values().cloned().collect::<Vec<_>>()) {
            meter.gpus(snap);
        }
    }

    /// Every running attempt's figures so far, by task (the newest
    /// attempt, should a superseded one still be stopping here).
    pub fn usage(&self) -> BTreeMap<TaskId, TaskUsage> {
        self.with(|b| b.iter().map(|((t, _), m)| (t.clone(), m.usage())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuInfo;

    fn gpu(uuid: &str, simulated: bool, processes: Option<Vec<(u32, u64)>>) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: uuid.into(),
            model: "T".into(),
            memory_total: 24 << 30,
            memory_used: 0,
            memory_free: 24 << 30,
            utilization: Some(40),
            temperature: None,
            processes,
            simulated,
        }
    }

    fn grant(uuid: &str, gib: u64) -> GpuGrant {
        GpuGrant {
            index: 0,
            uuid: uuid.into(),
            memory: ByteSize::gib(gib),
        }
    }

    #[test]
    fn gpu_memory_is_shared_out_by_pid_and_simulated_gpus_report_their_grant() {
        let snap = GpuSnapshot {
            driver_version: None,
            gpus: vec![
                gpu(
                    "real",
                    false,
                    Some(vec![(10, 3 << 30), (11, 1 << 30), (99, 5 << 30)]),
                ),
                gpu("sim", true, Some(vec![])),
                gpu("blind", false, None),
            ],
        };
        let ours: HashSet<u32> = [10, 11].into();
        assert_eq!(
            on_gpus(&[grant("real", 8)], &ours, &snap),
            Some((Some(4 << 30), Some(40.0), false)),
            "only its own processes count"
        );
        assert_eq!(
            on_gpus(&[grant("sim", 6)], &ours, &snap),
            Some((Some(6 << 30), Some(40.0), true))
        );
        assert_eq!(
            on_gpus(&[grant("blind", 8)], &ours, &snap),
            Some((None, Some(40.0), false)),
            "no per-process list: memory unknown"
        );
        assert_eq!(on_gpus(&[grant("gone", 8)], &ours, &snap), None);
        assert_eq!(on_gpus(&[], &ours, &snap), None);
    }

    #[test]
    fn a_meter_keeps_peaks_and_means() {
        let m = Meter::new(vec![grant("real", 8)]);
        let sample = |rss: u64, secs: u64| GroupUsage {
            rss,
            cpu: Duration::from_secs(secs),
            pids: vec![10],
        };
        m.host(sample(300, 2));
        m.host(sample(100, 1));
        let reading = |mib: u64, util: u32| GpuSnapshot {
            driver_version: None,
            gpus: vec![GpuInfo {
                utilization: Some(util),
                ..gpu("real", false, Some(vec![(10, mib << 20)]))
            }],
        };
        m.gpus(&reading(512, 20));
        m.gpus(&reading(256, 60));
        // The kernel's count at the end: more CPU, a lower peak.
        m.reaped(Duration::from_millis(2500), 200);
        let u = m.usage();
        assert_eq!(u.peak_rss, ByteSize(300));
        assert_eq!(u.cpu_seconds, 2.5);
        assert_eq!(u.gpu_memory_peak, Some(ByteSize::mib(512)));
        assert_eq!(u.gpu_utilization_mean, Some(40.0));
        assert!(!u.gpu_simulated);
        assert_eq!(u.samples, 3);
        // A CPU task says nothing of GPUs.
        let cpu_only = Meter::new(vec![]);
        cpu_only.gpus(&reading(512, 20));
        assert_eq!(cpu_only.usage().gpu_memory_peak, None);
    }

    #[test]
    fn the_board_lists_running_attempts() {
        let board = Board::default();
        let t = TaskId::new("j-0").unwrap();
        for (attempt, mib) in [(2, 2), (1, 1)] {
            let m = Meter::new(vec![]);
            m.reaped(Duration::from_secs(1), mib << 20);
            board.add((t.clone(), attempt), m);
        }
        assert_eq!(
            board.usage()[&t].peak_rss,
            ByteSize::mib(2),
            "the newest attempt"
        );
        board.remove(&(t.clone(), 2));
        board.remove(&(t.clone(), 1));
        assert!(board.usage().is_empty());
    }
}
