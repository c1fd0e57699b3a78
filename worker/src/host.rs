//! The host's CPUs and memory, through sysinfo.

use sysinfo::{MemoryRefreshKind, RefreshKind, System};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostInfo {
    pub cpus_milli: u64,
    pub memory_total: u64,
    pub memory_available: u64,
    pub load_avg: f64,
}

pub struct HostProbe {
    /// `None` where sysinfo cannot read this system; memory then reads 0
    /// and must be given with `memory` in the worker's settings.
    sys: Option<System>,
}

impl Default for HostProbe {
    fn default() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        if let Err(e) = &sys {
            tracing::warn!(error = %e, "cannot read host memory; set `memory` in the worker settings");
        }
        HostProbe { sys: sys.ok() }
    }
}

impl HostProbe {
    pub fn probe(&mut self) -> HostInfo {
        let (memory_total, memory_available) = match &mut self.sys {
            Some(sys) => {
                sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
                (sys.total_memory(), sys.available_memory())
            }
            None => (0, 0),
        };
        // What this process may use (affinity, cgroup quota), not the
        // machine's count: a worker in a 4-CPU container offers 4.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        HostInfo {
            cpus_milli: cpus * 1000,
            memory_total,
            memory_available,
            load_avg: System::load_average().map_or(0.0, |l| l.one),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let h = HostProbe::default().probe();
        assert!(h.cpus_milli >= 1000);
        assert!(h.memory_total > 0);
        assert!(h.memory_available <= h.memory_total);
    }
}
