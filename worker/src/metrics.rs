//! The worker's Prometheus metrics, `gpufleet_worker_*`, each labelled with
//! the worker's name (so that several workers on one machine, or behind one
//! scrape target, stay apart), served on `metrics_addr`.
//!
//! Gauges are set from what each heartbeat advertises; counters and the
//! renewal histogram where things happen. Labels are the worker and, for
//! GPUs, the GPU's index and uuid: bounded by the hardware, never by tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gpufleet_natsutil::metrics::latency_buckets;
use gpufleet_schema::{GpuAdvert, WorkerId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
    uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuOwnerLabel {
    gpu: String,
    uuid: String,
    /// `tasks` (this worker's) or `others` (every other process).
    owner: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabel {
    kind: &'static str,
}

/// A JetStream write of the worker's, by what it writes (artifact uploads,
/// one per chunk, are not counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The compare-and-set that claims a reservation.
    Claim,
    /// A lease renewal (or a cancel adopted into the lease).
    Renewal,
    /// A reservation answered REJECTED or ABANDONED.
    Refusal,
    /// A RUNNING state event, output, progress or a message.
    Event,
    /// A result event (each try).
    Result,
    /// The worker's advert (per worker, not per task).
    Advert,
}

impl Write {
    pub const ALL: [Write; 6] = [
        Write::Claim,
        Write::Renewal,
        Write::Refusal,
        Write::Event,
        Write::Result,
        Write::Advert,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Write::Claim => "claim",
            Write::Renewal => "renewal",
            Write::Refusal => "refusal",
            Write::Event => "event",
            Write::Result => "result",
            Write::Advert => "advert",
        }
    }
}

/// Every worker's writes in this process, by [`Write`]: what a program
/// running workers in its own process (the benchmarks) reads, since their
/// metrics endpoints are off.
static IN_PROCESS: [AtomicU64; Write::ALL.len()] = [const { AtomicU64::new(0) }; Write::ALL.len()];

/// The JetStream writes of every worker in this process so far, by kind.
pub fn writes_in_process() -> Vec<(&'static str, u64)> {
    Write::ALL
        .iter()
        .map(|w| (w.name(), IN_PROCESS[*w as usize].load(Ordering::Relaxed)))
        .collect()
}

struct Inner {
    running: Gauge,
    cpus: FloatGauge,
    cpus_held: FloatGauge,
    memory: Gauge,
    memory_held: Gauge,
    gpu_used: Family<GpuOwnerLabel, Gauge>,
    gpu_total: Family<GpuLabel, Gauge>,
    gpu_utilization: Family<GpuLabel, FloatGauge>,
    log_shipped: Counter,
    log_dropped: Counter,
    renewal: Histogram,
    writes: Family<WriteLabel, Counter>,
}

/// Shared by the heartbeat, the attempts and the metrics endpoint.
#[derive(Clone)]
pub struct WorkerMetrics(Arc<Inner>);

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics(Arc::new(Inner {
            running: Gauge::default(),
            cpus: FloatGauge::default(),
            cpus_held: FloatGauge::default(),
            memory: Gauge::default(),
            memory_held: Gauge::default(),
            gpu_used: Family::default(),
            gpu_total: Family::default(),
            gpu_utilization: Family::default(),
            log_shipped: Counter::default(),
            log_dropped: Counter::default(),
            renewal: Histogram::new(latency_buckets()),
            writes: Family::default(),
        }))
    }
}

/// What the worker's tasks hold, as a heartbeat sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub tasks: usize,
    pub cpus_milli: u64,
    pub memory: u64,
}

impl WorkerMetrics {
    /// What the worker offers, which does not change while it runs.
    pub fn offers(&self, cpus_milli: u64, memory: u64) {
        self.0.cpus.set(cpus_milli as f64 / 1000.0);
        self.0.memory.set(memory as i64);
    }

    /// What a heartbeat advertises: the tasks' holdings and each GPU.
    pub fn heartbeat(&self, held: Held, gpus: &[GpuAdvert]) {
        let m = &self.0;
        m.running.set(held.tasks as i64);
        m.cpus_held.set(held.cpus_milli as f64 / 1000.0);
        m.memory_held.set(held.memory as i64);
        for g in gpus {
            let label = GpuLabel {
                gpu: g.index.to_string(),
                uuid: g.uuid.to_string(),
            };
            let others = g.memory_unmanaged.0.min(g.memory_used.0);
            for (owner, bytes) in [("tasks", g.memory_used.0 - others), ("others", others)] {
                m.gpu_used
                    .get_or_create(&GpuOwnerLabel {
                        gpu: label.gpu.clone(),
                        uuid: label.uuid.clone(),
                        owner,
                    })
                    .set(bytes as i64);
            }
            m.gpu_total
                .get_or_create(&label)
                .set(g.memory_total.0 as i64);
            if let Some(u) = g.utilization {
                m.gpu_utilization
                    .get_or_create(&label)
                    .set(f64::from(u) / 100.0);
            }
        }
    }

    /// Task output that went into the stream, and output dropped.
    pub fn log(&self, shipped: u64, dropped: u64) {
        self.0.log_shipped.inc_by(shipped);
        self.0.log_dropped.inc_by(dropped);
    }

    /// One lease renewal took `d`, from send to ack.
    pub fn renewal(&self, d: Duration) {
        self.0.renewal.observe(d.as_secs_f64());
    }

    /// One JetStream write was sent.
    pub fn wrote(&self, w: Write) {
        IN_PROCESS[w as usize].fetch_add(1, Ordering::Relaxed);
        self.0
            .writes
            .get_or_create(&WriteLabel { kind: w.name() })
            .inc();
    }

    /// A registry of every metric, labelled with `worker`.
    pub fn registry(&self, worker: &WorkerId) -> Registry {
        let m = &self.0;
        let mut r = Registry::with_prefix_and_labels(
            "gpufleet_worker",
            [("worker".into(), worker.to_string().into())].into_iter(),
        );
        r.register(
            "running_tasks",
            "Tasks this worker holds a lease for",
            m.running.clone(),
        );
        r.register("cpus", "CPUs offered", m.cpus.clone());
        r.register("cpus_held", "CPUs held by tasks", m.cpus_held.clone());
        r.register_with_unit("memory", "Memory offered", Unit::Bytes, m.memory.clone());
        r.register_with_unit(
            "memory_held",
            "Memory held by tasks (what they asked for)",
            Unit::Bytes,
            m.memory_held.clone(),
        );
        r.register_with_unit(
            "gpu_memory_used",
            "GPU memory used, by this worker's tasks and by other processes",
            Unit::Bytes,
            m.gpu_used.clone(),
        );
        r.register_with_unit(
            "gpu_memory_total",
            "GPU memory",
            Unit::Bytes,
            m.gpu_total.clone(),
        );
        r.register_with_unit(
            "gpu_utilization",
            "GPU utilisation as NVML reports it (simulated GPUs: 1 while held)",
            Unit::Other("ratio".into()),
            m.gpu_utilization.clone(),
        );
        r.register_with_unit(
            "log_shipped",
            "Task output put into the events stream",
            Unit::Bytes,
            m.log_shipped.clone(),
        );
        r.register_with_unit(
            "log_dropped",
            "Task output dropped: printed faster than it could be shipped, or past max_log_size",
            Unit::Bytes,
            m.log_dropped.clone(),
        );
        r.register_with_unit(
            "lease_renewal",
            "Lease renewal latency, from send to ack",
            Unit::Seconds,
            m.renewal.clone(),
        );
        r.register(
            "jetstream_writes",
            "JetStream writes sent, by kind (claim, renewal, refusal, event, result, advert)",
            m.writes.clone(),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::ByteSize;

    #[test]
    fn a_heartbeat_splits_gpu_memory_between_tasks_and_others() {
        let m = WorkerMetrics::default();
        m.offers(4000, 8 << 30);
        let gpu = GpuAdvert {
            index: 0,
            uuid: "GPU-a".into(),
            model: "T".into(),
            memory_total: ByteSize::gib(24),
            memory_used: ByteSize::gib(10),
            memory_free: ByteSize::gib(14),
            memory_unmanaged: ByteSize::gib(4),
            utilization: Some(75),
            held_by: Vec::new(),
            temperature: None,
            simulated: false,
        };
        m.heartbeat(
            Held {
                tasks: 2,
                cpus_milli: 1500,
                memory: 1 << 30,
            },
            &[gpu],
        );
        m.log(100, 7);
        m.renewal(Duration::from_millis(3));
        m.wrote(Write::Claim);
        m.wrote(Write::Result);
        m.wrote(Write::Result);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &m.registry(&WorkerId::new("w1").unwrap()),
        )
        .unwrap();
        for line in [
            r#"gpufleet_worker_running_tasks{worker="w1"} 2"#,
            r#"gpufleet_worker_cpus_held{worker="w1"} 1.5"#,
            r#"gpufleet_worker_gpu_memory_used_bytes{worker="w1",gpu="0",uuid="GPU-a",owner="tasks"} 6442450944"#,
            r#"gpufleet_worker_gpu_memory_used_bytes{worker="w1",gpu="0",uuid="GPU-a",owner="others"} 4294967296"#,
            r#"gpufleet_worker_gpu_utilization_ratio{worker="w1",gpu="0",uuid="GPU-a"} 0.75"#,
            r#"gpufleet_worker_log_shipped_bytes_total{worker="w1"} 100"#,
            r#"gpufleet_worker_lease_renewal_seconds_count{worker="w1"} 1"#,
            r#"gpufleet_worker_jetstream_writes_total{worker="w1",kind="claim"} 1"#,
            r#"gpufleet_worker_jetstream_writes_total{worker="w1",kind="result"} 2"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
