//! The worker's advert in `gpufleet-workers`: refreshed every heartbeat
//! with a TTL, so that a worker that dies disappears on its own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gpufleet_natsutil::RawKv;
use gpufleet_schema::{codec, ByteSize, GpuAdvert, GpuUuid, TaskId, WorkerAdvert, WorkerId};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::WorkerConfig;
use crate::fence::Confirmed;
use crate::gpu::{self, GpuProbe, GpuSnapshot};
use crate::host::HostProbe;
use crate::ledger::Capacity;
use crate::metrics::{Held, WorkerMetrics, Write};
use crate::usage::Board;

/// What the main loop tells the heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdvertInputs {
    pub running: Vec<TaskId>,
    pub draining: bool,
    /// GPU memory our leases hold, by GPU uuid.
    pub reserved_gpu: Vec<(GpuUuid, u64)>,
    /// CPUs (thousandths) and memory our leases hold.
    pub held_cpus_milli: u64,
    pub held_memory: u64,
}

/// What the heartbeat reports beyond the advert's own fields: each
/// running attempt's usage, its metrics, and where they are served.
pub struct Observed {
    pub metrics: WorkerMetrics,
    pub usage: Board,
    pub metrics_addr: Option<String>,
}

async fn probe_gpus(
    probe: Box<dyn GpuProbe>,
    reserved: Vec<(GpuUuid, u64)>,
) -> (Box<dyn GpuProbe>, GpuSnapshot) {
    // NVML calls block; keep them off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        let mut probe = probe;
        let snap = probe.probe(&reserved);
        (probe, snap)
    })
    .await
    .expect("the GPU probe does not panic")
}

/// What this worker offers, from the first probe and the overrides.
pub async fn initial_capacity(
    cfg: &WorkerConfig,
    probe: Box<dyn GpuProbe>,
) -> (Capacity, Box<dyn GpuProbe>) {
    let (probe, snap) = probe_gpus(probe, vec![]).await;
    let host = HostProbe::default().probe();
    let memory = cfg.memory.map_or(host.memory_total, |m| m.0);
    let cap = Capacity {
        cpus_milli: cfg
            .cpus
            .map_or(host.cpus_milli, |c| (c * 1000.0).round() as u64),
        memory,
        load_memory_cap: cfg.load_memory_cap(memory),
        gpus: snap
            .gpus
            .iter()
            .map(|g| (g.uuid.clone(), g.memory_total))
            .collect(),
    };
    (cap, probe)
}

/// Publishes the advert every heartbeat, and at once when the inputs change
/// (a task starts or ends, draining begins).
#[allow(clippy::too_many_arguments)]
pub async fn heartbeat(
    kv: RawKv,
    cfg: WorkerConfig,
    worker: WorkerId,
    instance: String,
    capacity: Capacity,
    mut probe: Box<dyn GpuProbe>,
    mut inputs: watch::Receiver<AdvertInputs>,
    unmanaged_out: Arc<Mutex<HashMap<GpuUuid, u64>>>,
    confirmed: Arc<Confirmed>,
    observed: Observed,
) {
    let started_at = OffsetDateTime::now_utc();
    let mut host = HostProbe::default();
    let mut interval = tokio::time::interval(cfg.heartbeat.0);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let addr = cfg.addr.clone().or_else(default_addr);
    let mut late = HashSet::new();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = inputs.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let now_inputs = inputs.borrow_and_update().clone();
        let (p, mut snap) = probe_gpus(probe, now_inputs.reserved_gpu.clone()).await;
        probe = p;
        offered_only(&mut snap, &capacity, &mut late);
        let ours = if snap.gpus.iter().any(|g| !g.simulated) {
            tokio::task::spawn_blocking(crate::procs::descendants_of_self)
                .await
                .unwrap_or_default()
        } else {
            Default::default()
        };
        observed.usage.gpus(&snap);
        let (gpus, unmanaged) = gpu_adverts(&snap, &now_inputs.reserved_gpu, &ours);
        observed.metrics.heartbeat(
            Held {
                tasks: now_inputs.running.len(),
                cpus_milli: now_inputs.held_cpus_milli,
                memory: now_inputs.held_memory,
            },
            &gpus,
        );
        if let Ok(mut m) = unmanaged_out.lock() {
            *m = unmanaged;
        }
        let h = host.probe();
        let advert = WorkerAdvert {
            name: worker.clone(),
            instance: instance.clone(),
            version: gpufleet_schema::VERSION.to_string(),
            labels: cfg.labels.clone(),
            addr: addr.clone(),
            cpus_milli: capacity.cpus_milli,
            memory_total: ByteSize(capacity.memory),
            load_memory_cap: Some(ByteSize(capacity.load_memory_cap)),
            memory_available: ByteSize(h.memory_available.min(capacity.memory)),
            load_avg: Some(h.load_avg),
            driver_version: snap.driver_version.clone(),
            gpus,
            running: now_inputs.running.clone(),
            rendezvous_ports: Some(cfg.rendezvous_ports),
            draining: now_inputs.draining,
            held: false,
            usage: observed.usage.usage(),
            metrics_addr: observed.metrics_addr.clone(),
            ttl: cfg.advert_ttl,
            started_at,
            sent_at: OffsetDateTime::now_utc(),
        };
        let Ok(bytes) = codec::encode(&advert) else {
            continue;
        };
        let sent = tokio::time::Instant::now();
        observed.metrics.wrote(Write::Advert);
        match kv
            .put(worker.as_str(), Bytes::from(bytes), Some(cfg.advert_ttl.0))
            .await
        {
            // Tasks are stopped if this stops (see `crate::fence`).
            Ok(_) => confirmed.mark(sent),
            Err(e) => tracing::warn!(error = %e, "could not publish the advert"),
        }
        // Adverts at most every 50 ms however fast tasks come and go.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Leaves out of `snap` the GPUs that were not there at start: the worker
/// would refuse their reservations (its capacity is fixed at start), so
/// offering them would only draw refusals. Says so once per GPU (`late`).
fn offered_only(snap: &mut GpuSnapshot, capacity: &Capacity, late: &mut HashSet<GpuUuid>) {
    snap.gpus.retain(|g| {
        let offered = capacity.gpus.iter().any(|(u, _)| *u == g.uuid);
        if !offered && late.insert(g.uuid.clone()) {
            tracing::warn!(
                gpu = %g.uuid,
                "a GPU appeared after the worker started; restart the worker to offer it"
            );
        }
        offered
    });
}

/// The GPUs as advertised, and the memory on each (by uuid) that processes
/// other than this worker's tasks (`ours`: their pids) use, which the
/// ledger and placement must treat as taken.
pub fn gpu_adverts(
    snap: &GpuSnapshot,
    reserved: &[(GpuUuid, u64)],
    ours: &HashSet<u32>,
) -> (Vec<GpuAdvert>, HashMap<GpuUuid, u64>) {
    let mut unmanaged = HashMap::new();
    let gpus = snap
        .gpus
        .iter()
        .map(|g| {
            let reserved_here: u64 = reserved
                .iter()
                .filter(|(u, _)| *u == g.uuid)
                .map(|(_, m)| *m)
                .sum();
            let other = gpu::unmanaged_memory(g, ours, reserved_here);
            unmanaged.insert(g.uuid.clone(), other);
            GpuAdvert {
                index: g.index,
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                memory_total: ByteSize(g.memory_total),
                memory_used: ByteSize(g.memory_used),
                memory_free: ByteSize(g.memory_free),
                memory_unmanaged: ByteSize(other),
                utilization: g.utilization,
                temperature: g.temperature,
                simulated: g.simulated,
                held_by: vec![],
            }
        })
        .collect();
    (gpus, unmanaged)
}

/// This machine's first non-loopback IPv4 address, from its interfaces;
/// loopback when it has none. Set `addr` when that is not the one other
/// workers should use.
fn default_addr() -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let mut first = None;
    for ifa in addrs {
        let Some(ip) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|s| s.ip())
        else {
            continue;
        };
        if !ip.is_loopback() && !ip.is_unspecified() {
            first = Some(ip.to_string());
            break;
        }
    }
    Some(first.unwrap_or_else(|| "127.0.0.1".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuInfo;
    use crate::ledger::{test_key, Ledger};
    use gpufleet_schema::{GpuGrant, Grant};

    const GIB: u64 = 1 << 30;

    /// Stands in for NVML: real (not simulated) GPUs, with the compute
    /// processes the driver reports on each.
    struct FakeNvml {
        gpus: Vec<GpuInfo>,
    }

    impl GpuProbe for FakeNvml {
        fn probe(&mut self, _: &[(GpuUuid, u64)]) -> GpuSnapshot {
            GpuSnapshot {
                driver_version: Some("550.54".into()),
                gpus: self.gpus.clone(),
            }
        }
    }

    fn nvml_gpu(index: u32, used: u64, processes: Option<Vec<(u32, u64)>>) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}").into(),
            model: "NVIDIA L4".into(),
            memory_total: 24 * GIB,
            memory_used: used,
            memory_free: 24 * GIB - used,
            utilization: Some(40),
            temperature: Some(61),
            processes,
            simulated: false,
        }
    }

    fn probe() -> Box<dyn GpuProbe> {
        Box::new(FakeNvml {
            gpus: vec![
                // Our task (pid 100) uses 6 GiB, a stranger (pid 999) 10.
                nvml_gpu(0, 16 * GIB, Some(vec![(100, 6 * GIB), (999, 10 * GIB)])),
                // The driver does not list processes (a container without
                // the host's PID namespace): whatever our reservations do
                // not explain counts as someone else's.
                nvml_gpu(1, 12 * GIB, None),
            ],
        })
    }

    #[tokio::test]
    async fn real_gpus_advertise_what_the_driver_says_and_whose_memory_it_is() {
        let (mut probe, snap) = probe_gpus(probe(), vec![]).await;
        let reserved = vec![("GPU-0".into(), 8 * GIB), ("GPU-1".into(), 4 * GIB)];
        let ours: HashSet<u32> = [100].into();
        let (gpus, unmanaged) = gpu_adverts(&snap, &reserved, &ours);
        assert_eq!(gpus.len(), 2);
        let g0 = &gpus[0];
        assert!(!g0.simulated);
        assert_eq!(
            (g0.memory_used.0, g0.memory_free.0, g0.memory_unmanaged.0),
            (16 * GIB, 8 * GIB, 10 * GIB)
        );
        assert_eq!((g0.utilization, g0.temperature), (Some(40), Some(61)));
        assert_eq!(gpus[1].memory_unmanaged.0, 8 * GIB);
        assert_eq!(unmanaged["GPU-0"], 10 * GIB);
        assert_eq!(snap.driver_version.as_deref(), Some("550.54"));
        // The probe is used again on the next heartbeat.
        assert_eq!(probe.probe(&[]).gpus.len(), 2);
    }

    #[tokio::test]
    async fn a_gpu_that_was_not_there_at_start_is_not_offered() {
        let cfg = crate::config::WorkerConfig::for_test("nats://x:1", "w");
        let mut first = probe();
        let (cap, _) = initial_capacity(&cfg, {
            let mut gpus = first.probe(&[]).gpus;
            gpus.truncate(1);
            Box::new(FakeNvml { gpus })
        })
        .await;
        let mut snap = first.probe(&[]);
        let mut late = HashSet::new();
        offered_only(&mut snap, &cap, &mut late);
        let uuids: Vec<&str> = snap.gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids, ["GPU-0"]);
        assert!(late.contains("GPU-1"));
    }

    #[tokio::test]
    async fn memory_others_use_on_a_real_gpu_is_refused_to_shares() {
        let cfg = crate::config::WorkerConfig::for_test("nats://x:1", "w");
        let (cap, probe) = initial_capacity(&cfg, probe()).await;
        assert_eq!(
            cap.gpus,
            vec![("GPU-0".into(), 24 * GIB), ("GPU-1".into(), 24 * GIB)]
        );
        let (_, snap) = probe_gpus(probe, vec![]).await;
        let (_, unmanaged) = gpu_adverts(&snap, &[], &[100].into());
        let share = |gib: u64| Grant {
            gpus: vec![GpuGrant {
                index: 0,
                uuid: "GPU-0".into(),
                memory: ByteSize(gib * GIB),
            }],
            exclusive: false,
            cpus_milli: 0,
            memory: ByteSize(0),
            loading: false,
        };
        let mut ledger = Ledger::default();
        // 24 GiB less the stranger's 10: 14 GiB can be shared out.
        let err = ledger
            .try_hold(&test_key("a"), &share(15), &cap, &unmanaged)
            .unwrap_err();
        assert!(err.contains("10GiB by other processes"), "{err}");
        ledger
            .try_hold(&test_key("b"), &share(14), &cap, &unmanaged)
            .unwrap();
    }
}
