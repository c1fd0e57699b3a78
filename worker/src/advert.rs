//! The worker's advert in `gpufleet-workers`: refreshed every heartbeat
//! with a TTL, so that a worker that dies disappears on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gpufleet_natsutil::RawKv;
use gpufleet_schema::{codec, ByteSize, GpuAdvert, TaskId, WorkerAdvert, WorkerId};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::WorkerConfig;
use crate::gpu::{self, GpuProbe, GpuSnapshot};
use crate::host::HostProbe;
use crate::ledger::Capacity;

/// What the main loop tells the heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdvertInputs {
    pub running: Vec<TaskId>,
    pub draining: bool,
    /// GPU memory our leases hold, by GPU uuid.
    pub reserved_gpu: Vec<(String, u64)>,
}

async fn probe_gpus(
    probe: Box<dyn GpuProbe>,
    reserved: Vec<(String, u64)>,
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
    let cap = Capacity {
        cpus_milli: cfg
            .cpus
            .map_or(host.cpus_milli, |c| (c * 1000.0).round() as u64),
        memory: cfg.memory.map_or(host.memory_total, |m| m.0),
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
    unmanaged_out: Arc<Mutex<HashMap<String, u64>>>,
) {
    let started_at = OffsetDateTime::now_utc();
    let mut host = HostProbe::default();
    let mut interval = tokio::time::interval(cfg.heartbeat.0);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let addr = cfg.addr.clone().or_else(default_addr);
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
        let (p, snap) = probe_gpus(probe, now_inputs.reserved_gpu.clone()).await;
        probe = p;
        let ours = if snap.gpus.iter().any(|g| !g.simulated) {
            tokio::task::spawn_blocking(crate::agent::descendants_of_self)
                .await
                .unwrap_or_default()
        } else {
            Default::default()
        };
        let mut unmanaged = HashMap::new();
        let gpus: Vec<GpuAdvert> = snap
            .gpus
            .iter()
            .map(|g| {
                let reserved_here: u64 = now_inputs
                    .reserved_gpu
                    .iter()
                    .filter(|(u, _)| *u == g.uuid)
                    .map(|(_, m)| *m)
                    .sum();
                let other = gpu::unmanaged_memory(g, &ours, reserved_here);
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
                }
            })
            .collect();
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
            memory_available: ByteSize(h.memory_available.min(capacity.memory)),
            load_avg: Some(h.load_avg),
            driver_version: snap.driver_version.clone(),
            gpus,
            running: now_inputs.running.clone(),
            rendezvous_ports: Some(cfg.rendezvous_ports),
            draining: now_inputs.draining,
            ttl: cfg.advert_ttl,
            started_at,
            sent_at: OffsetDateTime::now_utc(),
        };
        let Ok(bytes) = codec::encode(&advert) else {
            continue;
        };
        if let Err(e) = kv
            .put(worker.as_str(), Bytes::from(bytes), Some(cfg.advert_ttl.0))
            .await
        {
            tracing::warn!(error = %e, "could not publish the advert");
        }
        // Adverts at most every 50 ms however fast tasks come and go.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
