//! What the coordinator counts about itself, served in the `data` of the
//! `jobs-submit` endpoint's `$SRV.STATS` reply (see the README's
//! benchmarks section), so that a benchmark reads the figures from the
//! running process.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpufleet_natsutil::histogram::Histogram;
use serde_json::json;

#[derive(Default)]
struct Inner {
    inputs: u64,
    adverts: u64,
    lease_changes: u64,
    results: u64,
    api_calls: u64,
    batches: u64,
    backlog_max: u64,
    backlog_last: u64,
    schedule_passes: u64,
    placed: u64,
    placement: Histogram,
    pass: Histogram,
    flush: Histogram,
    writes_job: u64,
    writes_lease: u64,
    writes_event: u64,
    writes_checkpoint: u64,
}

/// Shared between the engine, the runtime and the stats handler.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Mutex<Inner>>);

/// Which kind of input arrived.
#[derive(Debug, Clone, Copy)]
pub enum InputKind {
    Advert,
    Lease,
    Result,
    Api,
    Other,
}

/// When a scheduling pass started, for its timing.
pub struct PassTimer(Instant);

/// JetStream writes of one flush, by kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct Writes {
    pub job: u64,
    pub lease: u64,
    pub event: u64,
    pub checkpoint: u64,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut m) = self.0.lock() {
            f(&mut m);
        }
    }

    pub fn input(&self, kind: InputKind) {
        self.with(|m| {
            m.inputs += 1;
            match kind {
                InputKind::Advert => m.adverts += 1,
                InputKind::Lease => m.lease_changes += 1,
                InputKind::Result => m.results += 1,
                InputKind::Api => m.api_calls += 1,
                InputKind::Other => {}
            }
        });
    }

    pub fn batch(&self, backlog: usize) {
        self.with(|m| {
            m.batches += 1;
            m.backlog_last = backlog as u64;
            m.backlog_max = m.backlog_max.max(backlog as u64);
        });
    }

    /// Runs one placement (of a task or a gang) and records how long it took.
    pub fn time_placement<R>(&self, place: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let r = place();
        let d = started.elapsed();
        self.with(|m| m.placement.record(d));
        r
    }

    /// Starts timing a scheduling pass; [`Metrics::pass`] records it. The
    /// engine decides nothing from these readings: they are only counted.
    pub fn pass_started(&self) -> PassTimer {
        PassTimer(Instant::now())
    }

    pub fn pass(&self, timer: PassTimer, placed: usize) {
        let d = timer.0.elapsed();
        self.with(|m| {
            m.schedule_passes += 1;
            m.placed += placed as u64;
            m.pass.record(d);
        });
    }

    pub fn flush(&self, d: Duration, w: Writes) {
        self.with(|m| {
            m.flush.record(d);
            m.writes_job += w.job;
            m.writes_lease += w.lease;
            m.writes_event += w.event;
            m.writes_checkpoint += w.checkpoint;
        });
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let Ok(m) = self.0.lock() else {
            return serde_json::Value::Null;
        };
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        json!({
            "inputs": m.inputs,
            "adverts": m.adverts,
            "lease_changes": m.lease_changes,
            "results": m.results,
            "api_calls": m.api_calls,
            "batches": m.batches,
            "backlog_last": m.backlog_last,
            "backlog_max": m.backlog_max,
            "schedule_passes": m.schedule_passes,
            "placed": m.placed,
            "placement_us": {"count": m.placement.count(), "p50": us(m.placement.quantile(0.5)), "p99": us(m.placement.quantile(0.99)), "max": us(m.placement.max())},
            "pass_us": {"count": m.pass.count(), "p50": us(m.pass.quantile(0.5)), "p99": us(m.pass.quantile(0.99)), "max": us(m.pass.max())},
            "flush_us": {"count": m.flush.count(), "p50": us(m.flush.quantile(0.5)), "p99": us(m.flush.quantile(0.99))},
            "writes": {"job": m.writes_job, "lease": m.writes_lease, "event": m.writes_event, "checkpoint": m.writes_checkpoint},
        })
    }
}
