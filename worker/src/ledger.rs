//! The worker's own accounting of what its leases hold.
//!
//! The coordinator places by its snapshot, but a stale or second
//! coordinator could over-place; the worker refuses any reservation that
//! would overcommit its CPUs, memory, GPUs or GPU memory, with a reason the
//! coordinator records.

use std::collections::HashMap;

use gpufleet_schema::{ByteSize, Grant};

/// What this worker offers in total.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub cpus_milli: u64,
    pub memory: u64,
    /// uuid and total memory of each GPU.
    pub gpus: Vec<(String, u64)>,
}

#[derive(Debug, Default)]
pub struct Ledger {
    held: HashMap<String, Grant>,
}

impl Ledger {
    /// Holds `grant` under `key` if it fits next to everything held;
    /// `unmanaged` is GPU memory used by processes that are not ours.
    pub fn try_hold(
        &mut self,
        key: &str,
        grant: &Grant,
        cap: &Capacity,
        unmanaged: &HashMap<String, u64>,
    ) -> Result<(), String> {
        if self.held.contains_key(key) {
            return Ok(());
        }
        let cpus: u64 = self.held.values().map(|g| g.cpus_milli).sum::<u64>() + grant.cpus_milli;
        if cpus > cap.cpus_milli {
            return Err(format!(
                "not enough CPUs: {:.2} held of {:.2}, {:.2} asked",
                (cpus - grant.cpus_milli) as f64 / 1000.0,
                cap.cpus_milli as f64 / 1000.0,
                grant.cpus_milli as f64 / 1000.0
            ));
        }
        let memory: u64 = self.held.values().map(|g| g.memory.0).sum::<u64>() + grant.memory.0;
        if memory > cap.memory {
            return Err(format!(
                "not enough memory: {} held of {}, {} asked",
                ByteSize(memory - grant.memory.0),
                ByteSize(cap.memory),
                grant.memory
            ));
        }
        for g in &grant.gpus {
            let Some((_, total)) = cap.gpus.iter().find(|(u, _)| *u == g.uuid) else {
                return Err(format!("no GPU {} on this worker", g.uuid));
            };
            let holders: Vec<&Grant> = self
                .held
                .values()
                .filter(|h| h.gpus.iter().any(|x| x.uuid == g.uuid))
                .collect();
            if grant.exclusive && !holders.is_empty() {
                return Err(format!(
                    "GPU {} is in use and cannot be given whole",
                    g.uuid
                ));
            }
            if holders.iter().any(|h| h.exclusive) {
                return Err(format!("GPU {} is held whole by another task", g.uuid));
            }
            let shared: u64 = holders
                .iter()
                .flat_map(|h| h.gpus.iter().filter(|x| x.uuid == g.uuid))
                .map(|x| x.memory.0)
                .sum();
            let other = unmanaged.get(&g.uuid).copied().unwrap_or(0);
            let need = if grant.exclusive { 0 } else { g.memory.0 };
            if shared + other + need > *total {
                return Err(format!(
                    "GPU {} has {} free ({} held by tasks, {} by other processes), {} asked",
                    g.uuid,
                    ByteSize(total.saturating_sub(shared + other)),
                    ByteSize(shared),
                    ByteSize(other),
                    ByteSize(need)
                ));
            }
        }
        self.held.insert(key.to_string(), grant.clone());
        Ok(())
    }

    pub fn release(&mut self, key: &str) {
        self.held.remove(key);
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// CPUs (in thousandths) and memory that the held grants take.
    pub fn held(&self) -> (u64, u64) {
        self.held
            .values()
            .fold((0, 0), |(c, m), g| (c + g.cpus_milli, m + g.memory.0))
    }

    /// GPU memory set aside per GPU uuid (a whole GPU counts in full).
    pub fn reserved_gpu_memory(&self, cap: &Capacity) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for g in self.held.values() {
            for x in &g.gpus {
                let m = if g.exclusive {
                    cap.gpus
                        .iter()
                        .find(|(u, _)| *u == x.uuid)
                        .map_or(x.memory.0, |(_, t)| *t)
                } else {
                    x.memory.0
                };
                out.push((x.uuid.clone(), m));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::GpuGrant;

    fn cap() -> Capacity {
        Capacity {
            cpus_milli: 4000,
            memory: 16 << 30,
            gpus: vec![("g0".into(), 24 << 30), ("g1".into(), 24 << 30)],
        }
    }

    fn grant(cpus: u64, gpus: &[(&str, u64)], exclusive: bool) -> Grant {
        Grant {
            gpus: gpus
                .iter()
                .map(|(u, m)| GpuGrant {
                    index: 0,
                    uuid: u.to_string(),
                    memory: ByteSize(*m),
                })
                .collect(),
            exclusive,
            cpus_milli: cpus,
            memory: ByteSize(0),
        }
    }

    #[test]
    fn refuses_overcommit_with_a_reason() {
        let mut l = Ledger::default();
        let none = HashMap::new();
        l.try_hold("a", &grant(3000, &[("g0", 0)], true), &cap(), &none)
            .unwrap();
        let err = l
            .try_hold("b", &grant(2000, &[], false), &cap(), &none)
            .unwrap_err();
        assert!(err.starts_with("not enough CPUs"), "{err}");
        let err = l
            .try_hold("c", &grant(500, &[("g0", 1 << 30)], false), &cap(), &none)
            .unwrap_err();
        assert!(err.contains("held whole"), "{err}");
        l.try_hold("d", &grant(500, &[("g1", 20 << 30)], false), &cap(), &none)
            .unwrap();
        let err = l
            .try_hold("e", &grant(500, &[("g1", 1 << 30)], true), &cap(), &none)
            .unwrap_err();
        assert!(err.contains("cannot be given whole"), "{err}");
        let err = l
            .try_hold("f", &grant(0, &[("g1", 5 << 30)], false), &cap(), &none)
            .unwrap_err();
        assert!(err.contains("4GiB free"), "{err}");
        l.release("d");
        l.try_hold("f", &grant(0, &[("g1", 5 << 30)], false), &cap(), &none)
            .unwrap();
    }

    #[test]
    fn other_processes_count_against_a_share() {
        let mut l = Ledger::default();
        let busy: HashMap<String, u64> = [("g0".to_string(), 20u64 << 30)].into();
        let err = l
            .try_hold("a", &grant(0, &[("g0", 8 << 30)], false), &cap(), &busy)
            .unwrap_err();
        assert!(err.contains("by other processes"), "{err}");
        let err = l
            .try_hold("b", &grant(0, &[("gX", 0)], true), &cap(), &busy)
            .unwrap_err();
        assert!(err.contains("no GPU gX"), "{err}");
    }
}
