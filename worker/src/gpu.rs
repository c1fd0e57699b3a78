//! GPU discovery behind one trait: NVML on real machines, simulated GPUs
//! (`--simulate-gpus 2x24GiB:L4`) everywhere else.
//!
//! A probe reports what the hardware says; the worker then works out how
//! much of the used memory belongs to processes that are not its tasks
//! ("unmanaged"), which placement must treat as taken.

use std::collections::HashSet;

use gpufleet_schema::{ByteSize, GpuUuid, WorkerId};

/// One GPU as the probe saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: GpuUuid,
    pub model: String,
    pub memory_total: u64,
    pub memory_used: u64,
    pub memory_free: u64,
    pub utilization: Option<u32>,
    pub temperature: Option<u32>,
    /// Compute processes and the memory each uses; `None` when the driver
    /// does not say (containers without the host PID namespace).
    pub processes: Option<Vec<(u32, u64)>>,
    pub simulated: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSnapshot {
    pub driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

/// Reads the GPUs. Called from a blocking thread: NVML calls block.
pub trait GpuProbe: Send + 'static {
    /// Refreshes the view. `reserved` is what this worker's tasks hold on
    /// each GPU (by uuid), which simulated GPUs report as used.
    fn probe(&mut self, reserved: &[(GpuUuid, u64)]) -> GpuSnapshot;
}

/// No GPUs at all.
pub struct NoGpus;

impl GpuProbe for NoGpus {
    fn probe(&mut self, _: &[(GpuUuid, u64)]) -> GpuSnapshot {
        GpuSnapshot::default()
    }
}

/// GPUs that exist only on paper, for machines without NVIDIA hardware.
/// Their used memory follows what this worker's tasks have reserved.
pub struct Simulated {
    gpus: Vec<GpuInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --simulate-gpus {spec:?}: {reason} (expected COUNTxMEMORY[:MODEL], e.g. 2x24GiB:L4; several joined by '+')")]
pub struct SimulateError {
    pub spec: String,
    pub reason: String,
}

impl Simulated {
    /// Parses `COUNTxMEMORY[:MODEL]`, several joined by `+`
    /// (`1x80GiB:A100+2x24GiB:L4`).
    pub fn parse(spec: &str, worker: &WorkerId) -> Result<Simulated, SimulateError> {
        let fail = |reason: &str| SimulateError {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut gpus = Vec::new();
        for part in spec.split('+').map(str::trim) {
            let (shape, model) = match part.split_once(':') {
                Some((s, m)) if !m.trim().is_empty() => (s, m.trim().to_string()),
                Some(_) => return Err(fail("empty model name")),
                None => (part, "Simulated GPU".to_string()),
            };
            let (count, memory) = shape
                .split_once(['x', 'X'])
                .ok_or_else(|| fail("missing 'x' between count and memory"))?;
            let count: u32 = count
                .trim()
                .parse()
                .map_err(|_| fail("count is not a whole number"))?;
            if count == 0 || count > 64 {
                return Err(fail("count must be from 1 to 64"));
            }
            let memory: ByteSize = memory.trim().parse().map_err(|e| fail(&format!("{e}")))?;
            if memory.0 == 0 {
                return Err(fail("memory must be more than 0"));
            }
            for _ in 0..count {
                let index = gpus.len() as u32;
                gpus.push(GpuInfo {
                    index,
                    uuid: format!("GPU-sim-{worker}-{index}").into(),
                    model: model.clone(),
                    memory_total: memory.0,
                    memory_used: 0,
                    memory_free: memory.0,
                    utilization: Some(0),
                    temperature: None,
                    processes: Some(vec![]),
                    simulated: true,
                });
            }
        }
        if gpus.is_empty() {
            return Err(fail("no GPUs"));
        }
        Ok(Simulated { gpus })
    }
}

impl GpuProbe for Simulated {
    fn probe(&mut self, reserved: &[(GpuUuid, u64)]) -> GpuSnapshot {
        for g in &mut self.gpus {
            let used: u64 = reserved
                .iter()
                .filter(|(u, _)| *u == g.uuid)
                .map(|(_, m)| *m)
                .sum::<u64>()
                .min(g.memory_total);
            g.memory_used = used;
            g.memory_free = g.memory_total - used;
            g.utilization = Some(if used > 0 { 100 } else { 0 });
        }
        GpuSnapshot {
            driver_version: Some("simulated".into()),
            gpus: self.gpus.clone(),
        }
    }
}

/// Real GPUs through NVML.
pub struct NvmlProbe {
    nvml: nvml_wrapper::Nvml,
    /// What the last probe could not read, so that a GPU that stays broken
    /// is warned about once, not on every heartbeat.
    problems: HashSet<String>,
}

impl NvmlProbe {
    /// Loads NVML; `Err` says why (no driver, no library) in words.
    pub fn open() -> Result<NvmlProbe, String> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| NvmlProbe {
                nvml,
                problems: HashSet::new(),
            })
            .map_err(|e| e.to_string())
    }

    /// Reads every GPU; also returns what could not be read, in words.
    fn read(&self) -> (GpuSnapshot, Vec<String>) {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let mut problems = vec![];
        let mut snap = GpuSnapshot {
            driver_version: self.nvml.sys_driver_version().ok(),
            gpus: vec![],
        };
        let count = match self.nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("NVML cannot count GPUs: {e}"));
                return (snap, problems);
            }
        };
        for i in 0..count {
            let device = match self.nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(format!("NVML cannot open GPU {i}, leaving it out: {e}"));
                    continue;
                }
            };
            let (uuid, mem) = match (device.uuid(), device.memory_info()) {
                (Ok(u), Ok(m)) => (u, m),
                (Err(e), _) | (_, Err(e)) => {
                    problems.push(format!(
                        "NVML gives no uuid or memory for GPU {i}, leaving it out: {e}"
                    ));
                    continue;
                }
            };
            // Without every process's memory the list cannot say whose
            // the used memory is (the driver answers "not available" in
            // some virtualised set-ups): then it says nothing.
            let processes = device.running_compute_processes().ok().and_then(|ps| {
                ps.into_iter()
                    .map(|p| match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some((p.pid, b)),
                        UsedGpuMemory::Unavailable => None,
                    })
                    .collect::<Option<Vec<_>>>()
            });
            snap.gpus.push(GpuInfo {
                index: device.index().unwrap_or(i),
                uuid: uuid.into(),
                model: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                memory_total: mem.total,
                memory_used: mem.used,
                memory_free: mem.free,
                utilization: device.utilization_rates().ok().map(|u| u.gpu),
                temperature: device.temperature(TemperatureSensor::Gpu).ok(),
                processes,
                simulated: false,
            });
        }
        (snap, problems)
    }
}

impl GpuProbe for NvmlProbe {
    fn probe(&mut self, _: &[(GpuUuid, u64)]) -> GpuSnapshot {
        let (snap, problems) = self.read();
        for p in &problems {
            if !self.problems.contains(p) {
                tracing::warn!(problem = %p, "NVML cannot read a GPU");
            }
        }
        if !self.problems.is_empty() && problems.is_empty() {
            tracing::info!("NVML reads every GPU again");
        }
        self.problems = problems.into_iter().collect();
        snap
    }
}

/// The probe a worker uses: simulated GPUs when asked, else NVML, else none
/// (with one warning saying why).
pub fn open_probe(
    simulate: Option<&str>,
    worker: &WorkerId,
) -> Result<Box<dyn GpuProbe>, SimulateError> {
    if let Some(spec) = simulate {
        return Ok(Box::new(Simulated::parse(spec, worker)?));
    }
    match NvmlProbe::open() {
        Ok(p) => Ok(Box::new(p)),
        Err(e) => {
            tracing::warn!(error = %e, "NVML is not available: this worker offers no GPUs");
            Ok(Box::new(NoGpus))
        }
    }
}

/// GPU memory used by processes that are not this worker's tasks.
///
/// With a process list, it is everything used except what processes in
/// `our_pids` use: memory the list gives to nobody (processes in another
/// PID namespace, contexts the driver does not attribute) is not ours
/// either. Without a list, everything used beyond what our tasks reserved
/// counts. Both err on the side of not overfilling the GPU.
pub fn unmanaged_memory(gpu: &GpuInfo, our_pids: &HashSet<u32>, reserved_here: u64) -> u64 {
    if gpu.simulated {
        return 0;
    }
    let ours = match &gpu.processes {
        Some(ps) => ps
            .iter()
            .filter(|(pid, _)| our_pids.contains(pid))
            .map(|(_, m)| *m)
            .sum(),
        None => reserved_here,
    };
    gpu.memory_used.saturating_sub(ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> WorkerId {
        WorkerId::new("w1").unwrap()
    }

    #[test]
    fn simulated_spec_parses() {
        let mut s = Simulated::parse("2x24GiB:L4", &w()).unwrap();
        let snap = s.probe(&[]);
        assert_eq!(snap.gpus.len(), 2);
        assert_eq!(snap.gpus[1].uuid, "GPU-sim-w1-1");
        assert_eq!(snap.gpus[0].model, "L4");
        assert_eq!(snap.gpus[0].memory_total, 24 << 30);
        let s = Simulated::parse("1x80GiB:A100 + 2x16GB", &w()).unwrap();
        assert_eq!(s.gpus.len(), 3);
        assert_eq!(s.gpus[2].memory_total, 16_000_000_000);
        assert_eq!(s.gpus[2].model, "Simulated GPU");
    }

    #[test]
    fn bad_simulated_specs_say_why() {
        for (spec, why) in [
            ("24GiB", "missing 'x'"),
            ("twox24GiB", "count"),
            ("0x24GiB", "count must be"),
            ("2x24 parsecs", "unknown unit"),
            ("2x24GiB:", "empty model"),
        ] {
            let err = Simulated::parse(spec, &w()).err().unwrap().to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn simulated_memory_follows_reservations() {
        let mut s = Simulated::parse("2x24GiB", &w()).unwrap();
        let snap = s.probe(&[
            ("GPU-sim-w1-0".into(), 10 << 30),
            ("GPU-sim-w1-0".into(), 4 << 30),
        ]);
        assert_eq!(snap.gpus[0].memory_used, 14 << 30);
        assert_eq!(snap.gpus[0].memory_free, 10 << 30);
        assert_eq!(snap.gpus[1].memory_used, 0);
    }

    #[test]
    fn unmanaged_memory_counts_other_processes() {
        let mut g = Simulated::parse("1x24GiB", &w()).unwrap().gpus.remove(0);
        g.simulated = false;
        g.memory_used = 12 << 30;
        g.processes = Some(vec![(100, 8 << 30), (200, 4 << 30)]);
        let ours: HashSet<u32> = [100].into();
        assert_eq!(unmanaged_memory(&g, &ours, 8 << 30), 4 << 30);
        // Memory the list gives to no process is someone else's too.
        g.memory_used = 15 << 30;
        assert_eq!(unmanaged_memory(&g, &ours, 8 << 30), 7 << 30);
        // No process list: everything beyond our reservations.
        g.memory_used = 12 << 30;
        g.processes = None;
        assert_eq!(unmanaged_memory(&g, &ours, 10 << 30), 2 << 30);
    }

    /// A probe that fails to load (this machine has no NVIDIA driver)
    /// degrades to no GPUs rather than failing the worker.
    #[test]
    fn missing_nvml_means_no_gpus() {
        if NvmlProbe::open().is_ok() {
            return; // a real GPU machine: nothing to check here
        }
        let mut p = open_probe(None, &w()).unwrap();
        assert!(p.probe(&[]).gpus.is_empty());
    }
}
