//! The worker's own accounting of what its leases hold.
//!
//! The coordinator places by its snapshot, but a stale or second
//! coordinator could over-place; the worker refuses any reservation that
//! would overcommit its CPUs, memory, GPUs or GPU memory, with a reason the
//! coordinator records. Both sides count by the same model,
//! [`gpufleet_schema::capacity`], so that what placement grants fits here.

use std::collections::HashMap;

use gpufleet_schema::capacity::{self, GpuCapacity, WorkerCapacity};
use gpufleet_schema::{GpuUuid, Grant, LeaseKey};

/// What this worker offers in total.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub cpus_milli: u64,
    pub memory: u64,
    /// The most memory load phases may hold together.
    pub load_memory_cap: u64,
    /// uuid and total memory of each GPU.
    pub gpus: Vec<(GpuUuid, u64)>,
}

impl Capacity {
    /// The offer with nothing of ours held, and `unmanaged` (GPU memory
    /// used by processes that are not ours, by uuid) taken.
    fn model(&self, unmanaged: &HashMap<GpuUuid, u64>) -> WorkerCapacity {
        WorkerCapacity::new(
            self.cpus_milli,
            self.memory,
            self.gpus
                .iter()
                .enumerate()
                .map(|(i, (uuid, total))| {
                    let other = unmanaged.get(uuid).copied().unwrap_or(0);
                    GpuCapacity::new(i as u32, uuid.clone(), *total, other)
                })
                .collect(),
        )
        .with_load_cap(self.load_memory_cap)
    }

    fn gpu_total(&self, uuid: &GpuUuid) -> Option<u64> {
        self.gpus.iter().find(|(u, _)| u == uuid).map(|(_, t)| *t)
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    held: HashMap<LeaseKey, Grant>,
}

impl Ledger {
    /// Holds `grant` under `key` if it fits next to everything held;
    /// `unmanaged` is GPU memory used by processes that are not ours.
    pub fn try_hold(
        &mut self,
        key: &LeaseKey,
        grant: &Grant,
        cap: &Capacity,
        unmanaged: &HashMap<GpuUuid, u64>,
    ) -> Result<(), String> {
        if self.held.contains_key(key) {
            return Ok(());
        }
        self.hold_if_it_fits(key, grant, cap, unmanaged)
    }

    /// Holds `grant` under `key` instead of what it held (a two-phase
    /// task's GPU phase replacing its load phase), if it fits next to
    /// everything else held; else what it held stays.
    pub fn try_upgrade(
        &mut self,
        key: &LeaseKey,
        grant: &Grant,
        cap: &Capacity,
        unmanaged: &HashMap<GpuUuid, u64>,
    ) -> Result<(), String> {
        if self.held.get(key) == Some(grant) {
            return Ok(());
        }
        self.hold_if_it_fits(key, grant, cap, unmanaged)
    }

    /// Holds `grant` under `key` if it fits next to everything held under
    /// other keys.
    fn hold_if_it_fits(
        &mut self,
        key: &LeaseKey,
        grant: &Grant,
        cap: &Capacity,
        unmanaged: &HashMap<GpuUuid, u64>,
    ) -> Result<(), String> {
        let mut free = cap.model(unmanaged);
        for (_, h) in self.held.iter().filter(|(k, _)| *k != key) {
            free.hold(h);
        }
        free.check(grant).map_err(|e| e.to_string())?;
        self.held.insert(key.clone(), grant.clone());
        Ok(())
    }

    pub fn release(&mut self, key: &LeaseKey) {
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
    pub fn reserved_gpu_memory(&self, cap: &Capacity) -> Vec<(GpuUuid, u64)> {
        self.held
            .values()
            .flat_map(|g| capacity::gpu_memory_set_aside(g, |u| cap.gpu_total(u)))
            .collect()
    }
}

/// A lease key for task `name` (a valid task id), for tests that only need
/// distinct keys.
#[cfg(test)]
pub(crate) fn test_key(name: &str) -> LeaseKey {
    use gpufleet_schema::{subjects, TaskId, WorkerId};
    subjects::lease_key(&WorkerId::new("w").unwrap(), &TaskId::new(name).unwrap(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::{ByteSize, GpuGrant};
    use proptest::prelude::*;

    fn cap() -> Capacity {
        Capacity {
            cpus_milli: 4000,
            memory: 16 << 30,
            load_memory_cap: 8 << 30,
            gpus: vec![("g0".into(), 24 << 30), ("g1".into(), 24 << 30)],
        }
    }

    fn grant(cpus: u64, gpus: &[(&str, u64)], exclusive: bool) -> Grant {
        Grant {
            gpus: gpus
                .iter()
                .map(|(u, m)| GpuGrant {
                    index: 0,
                    uuid: (*u).into(),
                    memory: ByteSize(*m),
                })
                .collect(),
            exclusive,
            cpus_milli: cpus,
            memory: ByteSize(0),
            loading: false,
        }
    }

    #[test]
    fn refuses_overcommit_with_a_reason() {
        let mut l = Ledger::default();
        let none = HashMap::new();
        l.try_hold(
            &test_key("a"),
            &grant(3000, &[("g0", 0)], true),
            &cap(),
            &none,
        )
        .unwrap();
        let err = l
            .try_hold(&test_key("b"), &grant(2000, &[], false), &cap(), &none)
            .unwrap_err();
        assert!(err.starts_with("not enough CPUs"), "{err}");
        let err = l
            .try_hold(
                &test_key("c"),
                &grant(500, &[("g0", 1 << 30)], false),
                &cap(),
                &none,
            )
            .unwrap_err();
        assert!(err.contains("held whole"), "{err}");
        l.try_hold(
            &test_key("d"),
            &grant(500, &[("g1", 20 << 30)], false),
            &cap(),
            &none,
        )
        .unwrap();
        let err = l
            .try_hold(
                &test_key("e"),
                &grant(500, &[("g1", 1 << 30)], true),
                &cap(),
                &none,
            )
            .unwrap_err();
        assert!(err.contains("cannot be given whole"), "{err}");
        let err = l
            .try_hold(
                &test_key("f"),
                &grant(0, &[("g1", 5 << 30)], false),
                &cap(),
                &none,
            )
            .unwrap_err();
        assert!(err.contains("4GiB free"), "{err}");
        l.release(&test_key("d"));
        l.try_hold(
            &test_key("f"),
            &grant(0, &[("g1", 5 << 30)], false),
            &cap(),
            &none,
        )
        .unwrap();
    }

    #[test]
    fn other_processes_count_against_a_share() {
        let mut l = Ledger::default();
        let busy: HashMap<GpuUuid, u64> = [("g0".into(), 20u64 << 30)].into();
        let err = l
            .try_hold(
                &test_key("a"),
                &grant(0, &[("g0", 8 << 30)], false),
                &cap(),
                &busy,
            )
            .unwrap_err();
        assert!(err.contains("by other processes"), "{err}");
        let err = l
            .try_hold(&test_key("b"), &grant(0, &[("gX", 0)], true), &cap(), &busy)
            .unwrap_err();
        assert!(err.contains("no GPU gX"), "{err}");
    }

    #[test]
    fn an_upgrade_replaces_the_load_phase_only_if_the_whole_fits() {
        let mut l = Ledger::default();
        let none = HashMap::new();
        let load = Grant {
            cpus_milli: 1000,
            memory: ByteSize(4 << 30),
            loading: true,
            ..Grant::default()
        };
        l.try_hold(&test_key("a"), &load, &cap(), &none).unwrap();
        l.try_hold(
            &test_key("b"),
            &grant(2000, &[("g0", 0)], true),
            &cap(),
            &none,
        )
        .unwrap();
        // g0 is held whole by b.
        let on_g0 = load.upgraded(&grant(1000, &[("g0", 0)], true));
        let err = l
            .try_upgrade(&test_key("a"), &on_g0, &cap(), &none)
            .unwrap_err();
        assert!(err.contains("cannot be given whole"), "{err}");
        assert_eq!(l.held(), (3000, 4 << 30), "the load phase still held");
        // Its own load phase does not count against it: 2 CPUs of 4 are
        // b's, and the whole task takes the other 2.
        let on_g1 = load.upgraded(&grant(1000, &[("g1", 0)], true));
        l.try_upgrade(&test_key("a"), &on_g1, &cap(), &none)
            .unwrap();
        assert_eq!(l.held(), (4000, 4 << 30));
        assert_eq!(l.reserved_gpu_memory(&cap()).len(), 2);
        // Again: nothing changes.
        l.try_upgrade(&test_key("a"), &on_g1, &cap(), &none)
            .unwrap();
        assert_eq!(l.held(), (4000, 4 << 30));
    }

    fn arb_grant() -> impl Strategy<Value = Grant> {
        (
            0u64..3000,
            0u64..8,
            any::<bool>(),
            // Indexes into cap()'s GPUs; 2 is a GPU the worker lacks.
            prop::collection::vec((0usize..3, 0u64..30), 0..3),
            any::<bool>(),
        )
            .prop_map(|(cpus, mem, exclusive, gpus, loading)| Grant {
                gpus: gpus
                    .into_iter()
                    .map(|(g, gib)| GpuGrant {
                        index: g as u32,
                        uuid: format!("g{g}").into(),
                        memory: ByteSize(gib << 30),
                    })
                    .collect(),
                exclusive,
                cpus_milli: cpus,
                memory: ByteSize(mem << 30),
                loading,
            })
    }

    proptest! {
        /// Whatever it is offered, in whatever order, with tasks ending
        /// between, what the ledger holds fits the worker: counted here
        /// without the capacity model.
        #[test]
        fn never_accepts_an_overcommit(
            offers in prop::collection::vec((arb_grant(), any::<bool>()), 0..40),
            other in prop::collection::vec(0u64..30, 2),
        ) {
            let cap = cap();
            let unmanaged: HashMap<GpuUuid, u64> =
                [("g0".into(), other[0] << 30), ("g1".into(), other[1] << 30)].into();
            let mut l = Ledger::default();
            for (k, (grant, end_one)) in offers.iter().enumerate() {
                let _ = l.try_hold(&test_key(&format!("k{k}")), grant, &cap, &unmanaged);
                if *end_one {
                    if let Some(key) = l.held.keys().next().cloned() {
                        l.release(&key);
                    }
                }
                let held: Vec<&Grant> = l.held.values().collect();
                prop_assert!(held.iter().map(|g| g.cpus_milli).sum::<u64>() <= cap.cpus_milli);
                prop_assert!(held.iter().map(|g| g.memory.0).sum::<u64>() <= cap.memory);
                prop_assert!(
                    held.iter().filter(|g| g.loading).map(|g| g.memory.0).sum::<u64>()
                        <= cap.load_memory_cap
                );
                for (uuid, total) in &cap.gpus {
                    let on_it: Vec<&&Grant> =
                        held.iter().filter(|g| g.gpus.iter().any(|x| &x.uuid == uuid)).collect();
                    if on_it.iter().any(|g| g.exclusive) {
                        prop_assert_eq!(on_it.len(), 1, "a whole GPU has one user");
                    } else if !on_it.is_empty() {
                        let shared: u64 = on_it
                            .iter()
                            .flat_map(|g| g.gpus.iter().filter(|x| &x.uuid == uuid))
                            .map(|x| x.memory.0)
                            .sum();
                        // What shares set aside fits in what others leave.
                        prop_assert!(shared <= total.saturating_sub(unmanaged[uuid.as_str()]));
                    }
                }
                prop_assert!(held
                    .iter()
                    .all(|g| g.gpus.iter().all(|x| cap.gpus.iter().any(|(u, _)| *u == x.uuid))));
            }
        }
    }
}
