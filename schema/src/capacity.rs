//! What a worker has free, and whether a grant fits: one model for the
//! coordinator, which places work by it, and for the worker, which checks
//! every reservation against it before claiming. Both compute free capacity
//! the same way (totals, less what other processes use on each GPU, less
//! what every held grant sets aside), so that work placed is never refused
//! for arithmetic's sake; a property test in the worker checks that on
//! random adverts.
//!
//! Rules: a whole GPU is held by one task and has nothing left for others;
//! a share sets its memory aside on a GPU that nobody holds whole. Holding
//! saturates (a snapshot built from stale leases may be overcommitted and
//! must not panic); checking never overflows. The load phases of
//! two-phase tasks (`loading` grants) hold memory under a cap of their own
//! as well, the worker's `load_memory_cap`, so that loading tasks can never
//! take so much memory that a free GPU there could not be given out.

use crate::ids::GpuUuid;
use crate::lease::{GpuGrant, Grant};
use crate::spec::GpuRequest;
use crate::units::ByteSize;
use crate::worker::WorkerAdvert;

/// Ports a worker hands out as `MASTER_PORT` when it does not say.
pub const DEFAULT_RENDEZVOUS_PORTS: (u16, u16) = (29500, 29999);

/// One GPU: its size and what is held on it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuCapacity {
    pub index: u32,
    pub uuid: GpuUuid,
    pub memory_total: u64,
    /// Memory still free for us: total, less what processes that are not
    /// ours use, less what shares set aside; none once held whole.
    pub memory_free: u64,
    /// Held whole by one task.
    pub exclusive: bool,
    /// Tasks sharing it by memory.
    pub shares: u32,
    /// Memory used by processes that are not gpufleet tasks (from NVML).
    pub memory_unmanaged: u64,
    /// Memory the shares on it set aside.
    pub memory_shared: u64,
}

impl GpuCapacity {
    /// A GPU with nothing of ours on it.
    pub fn new(index: u32, uuid: GpuUuid, memory_total: u64, memory_unmanaged: u64) -> Self {
        GpuCapacity {
            index,
            uuid,
            memory_total,
            memory_free: memory_total.saturating_sub(memory_unmanaged),
            exclusive: false,
            shares: 0,
            memory_unmanaged,
            memory_shared: 0,
        }
    }

    /// Neither held whole nor shared.
    pub fn is_idle(&self) -> bool {
        !self.exclusive && self.shares == 0
    }

    /// Whether a task may have it whole with `memory` free on it.
    pub fn fits_whole(&self, memory: u64) -> bool {
        self.is_idle() && self.memory_free >= memory
    }

    /// Whether a share of `memory` fits next to what is on it.
    pub fn fits_share(&self, memory: u64) -> bool {
        !self.exclusive && self.memory_free >= memory
    }

    fn hold_whole(&mut self) {
        self.exclusive = true;
        self.memory_free = 0;
    }

    fn hold_share(&mut self, memory: u64) {
        self.shares += 1;
        self.memory_shared = self.memory_shared.saturating_add(memory);
        self.memory_free = self.memory_free.saturating_sub(memory);
    }
}

/// One worker: its totals and what is free of them.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCapacity {
    /// Logical CPUs, in thousandths.
    pub cpus_total_milli: u64,
    pub cpus_free_milli: u64,
    pub memory_total: u64,
    pub memory_free: u64,
    pub gpus: Vec<GpuCapacity>,
    /// The most memory load phases may hold together.
    pub load_memory_cap: u64,
    /// What of that cap is still free.
    pub load_memory_free: u64,
}

/// Why a grant does not fit; the text is the reason a worker gives when it
/// refuses a reservation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error(
        "not enough CPUs: {:.2} held of {:.2}, {:.2} asked",
        *held as f64 / 1000.0,
        *total as f64 / 1000.0,
        *asked as f64 / 1000.0
    )]
    Cpus { held: u64, total: u64, asked: u64 },
    #[error(
        "not enough memory: {} held of {}, {} asked",
        ByteSize(*held),
        ByteSize(*total),
        ByteSize(*asked)
    )]
    Memory { held: u64, total: u64, asked: u64 },
    #[error(
        "not enough memory under the load-phase cap: {} held by loading tasks of {}, {} asked",
        ByteSize(*held),
        ByteSize(*cap),
        ByteSize(*asked)
    )]
    LoadMemory { held: u64, cap: u64, asked: u64 },
    #[error("no GPU {uuid} on this worker")]
    NoSuchGpu { uuid: GpuUuid },
    #[error("GPU {uuid} is given twice in one grant")]
    GpuTwice { uuid: GpuUuid },
    #[error("GPU {uuid} is in use and cannot be given whole")]
    GpuInUse { uuid: GpuUuid },
    #[error("GPU {uuid} is held whole by another task")]
    GpuHeldWhole { uuid: GpuUuid },
    #[error(
        "GPU {uuid} has {} free ({} held by tasks, {} by other processes), {} asked",
        ByteSize(*free),
        ByteSize(*shared),
        ByteSize(*unmanaged),
        ByteSize(*asked)
    )]
    GpuMemory {
        uuid: GpuUuid,
        free: u64,
        shared: u64,
        unmanaged: u64,
        asked: u64,
    },
}

impl WorkerCapacity {
    /// A worker with nothing of ours held on it.
    pub fn new(cpus_milli: u64, memory: u64, gpus: Vec<GpuCapacity>) -> Self {
        WorkerCapacity {
            cpus_total_milli: cpus_milli,
            cpus_free_milli: cpus_milli,
            memory_total: memory,
            memory_free: memory,
            gpus,
            load_memory_cap: memory,
            load_memory_free: memory,
        }
    }

    /// Load phases may hold at most `cap` of memory together.
    pub fn with_load_cap(mut self, cap: u64) -> Self {
        self.load_memory_cap = cap;
        self.load_memory_free = cap;
        self
    }

    /// What a worker's advert offers, before any lease is counted.
    pub fn from_advert(a: &WorkerAdvert) -> Self {
        WorkerCapacity::new(
            a.cpus_milli,
            a.memory_total.0,
            a.gpus
                .iter()
                .map(|g| {
                    GpuCapacity::new(
                        g.index,
                        g.uuid.clone(),
                        g.memory_total.0,
                        g.memory_unmanaged.0,
                    )
                })
                .collect(),
        )
        .with_load_cap(a.load_memory_cap.map_or(a.memory_total.0, |c| c.0))
    }

    /// Whether `cpus_milli` are free now.
    pub fn fits_cpus(&self, cpus_milli: u64) -> bool {
        self.cpus_free_milli >= cpus_milli
    }

    /// Whether `memory` is free now.
    pub fn fits_memory(&self, memory: u64) -> bool {
        self.memory_free >= memory
    }

    /// Counts `grant` as held. A GPU the worker does not have is skipped:
    /// an advert may have changed under a live lease.
    pub fn hold(&mut self, grant: &Grant) {
        self.cpus_free_milli = self.cpus_free_milli.saturating_sub(grant.cpus_milli);
        self.memory_free = self.memory_free.saturating_sub(grant.memory.0);
        if grant.loading {
            self.load_memory_free = self.load_memory_free.saturating_sub(grant.memory.0);
        }
        for g in &grant.gpus {
            if let Some(gpu) = self.gpus.iter_mut().find(|x| x.uuid == g.uuid) {
                if grant.exclusive {
                    gpu.hold_whole();
                } else {
                    gpu.hold_share(g.memory.0);
                }
            }
        }
    }

    /// Whether `grant` fits in what is free, and if not, the first reason.
    pub fn check(&self, grant: &Grant) -> Result<(), Shortfall> {
        if !self.fits_cpus(grant.cpus_milli) {
            return Err(Shortfall::Cpus {
                held: self.cpus_total_milli.saturating_sub(self.cpus_free_milli),
                total: self.cpus_total_milli,
                asked: grant.cpus_milli,
            });
        }
        if !self.fits_memory(grant.memory.0) {
            return Err(Shortfall::Memory {
                held: self.memory_total.saturating_sub(self.memory_free),
                total: self.memory_total,
                asked: grant.memory.0,
            });
        }
        if grant.loading && self.load_memory_free < grant.memory.0 {
            return Err(Shortfall::LoadMemory {
                held: self.load_memory_cap.saturating_sub(self.load_memory_free),
                cap: self.load_memory_cap,
                asked: grant.memory.0,
            });
        }
        for (i, g) in grant.gpus.iter().enumerate() {
            let Some(gpu) = self.gpus.iter().find(|x| x.uuid == g.uuid) else {
                return Err(Shortfall::NoSuchGpu {
                    uuid: g.uuid.clone(),
                });
            };
            // Each entry is checked against what is held without the
            // grant, so the same GPU twice would pass twice.
            if grant.gpus[..i].iter().any(|x| x.uuid == g.uuid) {
                return Err(Shortfall::GpuTwice {
                    uuid: g.uuid.clone(),
                });
            }
            if grant.exclusive && !gpu.is_idle() {
                return Err(Shortfall::GpuInUse {
                    uuid: g.uuid.clone(),
                });
            }
            if gpu.exclusive {
                return Err(Shortfall::GpuHeldWhole {
                    uuid: g.uuid.clone(),
                });
            }
            // A whole GPU sets nothing aside that a share could have: it
            // only needs to be idle.
            let asked = if grant.exclusive { 0 } else { g.memory.0 };
            if !gpu.fits_share(asked) {
                return Err(Shortfall::GpuMemory {
                    uuid: g.uuid.clone(),
                    free: gpu.memory_free,
                    shared: gpu.memory_shared,
                    unmanaged: gpu.memory_unmanaged,
                    asked,
                });
            }
        }
        Ok(())
    }

    /// Grants `cpus_milli`, `memory` and `gpu` on the GPUs at `gpus`
    /// (indexes into [`WorkerCapacity::gpus`]) and holds the grant. A whole
    /// GPU's grant carries all its free memory: nothing is left for shares.
    /// The caller has checked that it fits.
    pub fn take(&mut self, cpus_milli: u64, memory: u64, gpu: GpuRequest, gpus: &[usize]) -> Grant {
        let (exclusive, per_gpu) = match gpu {
            GpuRequest::None => (false, 0),
            GpuRequest::Whole { memory, .. } => (true, memory),
            GpuRequest::Share { memory } => (false, memory),
        };
        let grant = Grant {
            gpus: gpus
                .iter()
                .map(|&i| {
                    let g = &self.gpus[i];
                    GpuGrant {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        memory: ByteSize(if exclusive {
                            g.memory_free.max(per_gpu)
                        } else {
                            per_gpu
                        }),
                    }
                })
                .collect(),
            exclusive,
            cpus_milli,
            memory: ByteSize(memory),
            loading: false,
        };
        self.hold(&grant);
        grant
    }

    /// Grants a load phase `cpus_milli` and `memory` (no GPU) and holds
    /// it. The caller has checked that it fits.
    pub fn take_loading(&mut self, cpus_milli: u64, memory: u64) -> Grant {
        let grant = Grant {
            cpus_milli,
            memory: ByteSize(memory),
            loading: true,
            ..Grant::default()
        };
        self.hold(&grant);
        grant
    }

    /// Whether a load phase of `memory` fits under the load-phase cap now.
    pub fn fits_loading(&self, memory: u64) -> bool {
        self.load_memory_free >= memory
    }
}

/// GPU memory a grant sets aside on each of its GPUs, as `(uuid, bytes)`:
/// a whole GPU counts in full (`total` gives a GPU's size by uuid).
pub fn gpu_memory_set_aside<'a>(
    grant: &'a Grant,
    total: impl Fn(&GpuUuid) -> Option<u64> + 'a,
) -> impl Iterator<Item = (GpuUuid, u64)> + 'a {
    grant.gpus.iter().map(move |x| {
        let m = if grant.exclusive {
            total(&x.uuid).unwrap_or(x.memory.0)
        } else {
            x.memory.0
        };
        (x.uuid.clone(), m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn worker() -> WorkerCapacity {
        WorkerCapacity::new(
            4000,
            16 * GIB,
            vec![
                GpuCapacity::new(0, "g0".into(), 24 * GIB, 4 * GIB),
                GpuCapacity::new(1, "g1".into(), 80 * GIB, 0),
            ],
        )
    }

    #[test]
    fn a_whole_gpu_takes_all_its_free_memory_and_a_share_only_its_own() {
        let mut w = worker();
        let whole = w.take(
            1000,
            GIB,
            GpuRequest::Whole {
                count: 1,
                memory: 8 * GIB,
            },
            &[0],
        );
        assert!(whole.exclusive);
        assert_eq!(
            whole.gpus[0].memory,
            ByteSize(20 * GIB),
            "24 less the 4 others use"
        );
        assert_eq!((w.gpus[0].memory_free, w.gpus[0].exclusive), (0, true));
        let share = w.take(500, 0, GpuRequest::Share { memory: 10 * GIB }, &[1]);
        assert!(!share.exclusive);
        assert_eq!(share.gpus[0].memory, ByteSize(10 * GIB));
        assert_eq!(w.gpus[1].memory_free, 70 * GIB);
        assert_eq!((w.cpus_free_milli, w.memory_free), (2500, 15 * GIB));
        // What take left is what holding the same grants leaves.
        let mut again = worker();
        again.hold(&whole);
        again.hold(&share);
        assert_eq!(again, w);
    }

    #[test]
    fn a_grant_that_does_not_fit_says_what_is_short() {
        let mut w = worker();
        let share = |uuid: &str, gib: u64| Grant {
            gpus: vec![GpuGrant {
                index: 0,
                uuid: uuid.into(),
                memory: ByteSize(gib * GIB),
            }],
            exclusive: false,
            cpus_milli: 0,
            memory: ByteSize(0),
            loading: false,
        };
        w.hold(&share("g0", 12));
        assert_eq!(
            w.check(&share("g0", 9)).unwrap_err().to_string(),
            "GPU g0 has 8GiB free (12GiB held by tasks, 4GiB by other processes), 9GiB asked"
        );
        assert!(w.check(&share("g0", 8)).is_ok());
        let whole = Grant {
            exclusive: true,
            ..share("g0", 0)
        };
        assert_eq!(
            w.check(&whole),
            Err(Shortfall::GpuInUse { uuid: "g0".into() })
        );
        let twice = Grant {
            gpus: [share("g1", 1).gpus, share("g1", 1).gpus].concat(),
            ..share("g1", 0)
        };
        assert_eq!(
            w.check(&twice),
            Err(Shortfall::GpuTwice { uuid: "g1".into() })
        );
        let cpus = Grant {
            cpus_milli: 4001,
            ..Grant::default()
        };
        assert_eq!(
            w.check(&cpus).unwrap_err().to_string(),
            "not enough CPUs: 0.00 held of 4.00, 4.00 asked"
        );
    }

    #[test]
    fn load_phases_hold_memory_under_their_own_cap() {
        let mut w = worker().with_load_cap(6 * GIB);
        let load = w.take_loading(1000, 4 * GIB);
        assert!(load.loading && load.gpus.is_empty());
        assert_eq!((w.memory_free, w.load_memory_free), (12 * GIB, 2 * GIB));
        let more = Grant {
            memory: ByteSize(3 * GIB),
            loading: true,
            ..Grant::default()
        };
        assert_eq!(
            w.check(&more).unwrap_err().to_string(),
            "not enough memory under the load-phase cap: 4GiB held by loading tasks of 6GiB, 3GiB asked"
        );
        // Memory outside the load phase is not capped.
        assert!(w
            .check(&Grant {
                loading: false,
                ..more.clone()
            })
            .is_ok());
        assert!(w.fits_loading(2 * GIB) && !w.fits_loading(2 * GIB + 1));
        let mut again = worker().with_load_cap(6 * GIB);
        again.hold(&load);
        assert_eq!(again, w);
    }

    #[test]
    fn a_snapshot_holding_more_than_there_is_saturates() {
        let mut w = worker();
        let big = Grant {
            gpus: vec![GpuGrant {
                index: 0,
                uuid: "g0".into(),
                memory: ByteSize(100 * GIB),
            }],
            exclusive: false,
            cpus_milli: 10_000,
            memory: ByteSize(100 * GIB),
            loading: false,
        };
        w.hold(&big);
        w.hold(&big);
        assert_eq!((w.cpus_free_milli, w.memory_free), (0, 0));
        assert_eq!((w.gpus[0].memory_free, w.gpus[0].shares), (0, 2));
        // A GPU the advert no longer has is skipped.
        w.hold(&Grant {
            gpus: vec![GpuGrant {
                index: 9,
                uuid: "gone".into(),
                memory: ByteSize(GIB),
            }],
            exclusive: true,
            ..Grant::default()
        });
        assert!(!w.gpus.iter().any(|g| g.exclusive));
    }
}
