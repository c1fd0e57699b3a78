//! Scale: one coordinator (the real binary, so that its CPU and memory are
//! its own) facing 1,000 simulated workers that heartbeat every 2 s, with
//! 100,000 tasks queued. The workers never claim, so reservations expire
//! and are placed again: the coordinator keeps placing the whole time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use gpufleet_natsutil::{create_stores, Backoff, RawKv, Setup};
use gpufleet_schema::{codec, subjects, ByteSize, Dur, GpuAdvert, WorkerAdvert, WorkerId};
use gpufleet_worker::procs;
use serde_json::{json, Value};

pub struct ScaleResult {
    pub workers: usize,
    pub tasks: usize,
    pub window: Duration,
    /// How long queueing the tasks took (submits one job at a time), and
    /// the coordinator's resident memory then, per queued task.
    pub queueing: Duration,
    pub bytes_per_task: f64,
    pub cpu_percent: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub placement_p50_us: f64,
    pub placement_p99_us: f64,
    pub placed: u64,
    pub adverts_sent_per_s: f64,
    pub adverts_handled_per_s: f64,
    pub backlog_start: u64,
    pub backlog_end: u64,
    pub pass_p99_ms: f64,
}

/// A simulated worker of 8 GPUs and 64 CPUs.
pub(crate) fn advert(i: usize, started: time::OffsetDateTime) -> WorkerAdvert {
    advert_with(i, 8, started)
}

/// A simulated worker of `gpus` GPUs and 64 CPUs.
fn advert_with(i: usize, gpus: u32, started: time::OffsetDateTime) -> WorkerAdvert {
    let name = WorkerId::new(format!("sim-{i:04}")).expect("valid name");
    WorkerAdvert {
        instance: format!("bench-{i}"),
        version: gpufleet_schema::VERSION.into(),
        labels: Default::default(),
        addr: Some("127.0.0.1".into()),
        cpus_milli: 64_000,
        memory_total: ByteSize::gib(512),
        memory_available: ByteSize::gib(500),
        load_memory_cap: None,
        load_avg: None,
        driver_version: Some("simulated".into()),
        gpus: (0..gpus)
            .map(|g| GpuAdvert {
                index: g,
                uuid: format!("GPU-{name}-{g}").into(),
                model: "A100".into(),
                memory_total: ByteSize::gib(80),
                memory_used: ByteSize(0),
                memory_free: ByteSize::gib(80),
                memory_unmanaged: ByteSize(0),
                utilization: Some(0),
                temperature: None,
                simulated: true,
                held_by: vec![],
            })
            .collect(),
        running: vec![],
        rendezvous_ports: None,
        draining: false,
        held: false,
        usage: Default::default(),
        metrics_addr: None,
        ttl: Dur::secs(10),
        started_at: started,
        sent_at: time::OffsetDateTime::now_utc(),
        name,
    }
}

/// Publishes every worker's advert once per `period`, spread evenly.
async fn heartbeats(
    kv: RawKv,
    workers: usize,
    gpus: u32,
    period: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let started = time::OffsetDateTime::now_utc();
    let bodies: Vec<Bytes> = (0..workers)
        .map(|i| Bytes::from(codec::encode(&advert_with(i, gpus, started)).expect("encodes")))
        .collect();
    let mut tick = tokio::time::interval(period / workers as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0;
    while !*stop.borrow() {
        tick.tick().await;
        let key = format!("sim-{:04}", i % workers);
        if kv
            .put(
                &key,
                bodies[i % workers].clone(),
                Some(Duration::from_secs(10)),
            )
            .await
            .is_ok()
        {
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        i += 1;
    }
}

/// CPU ticks used, resident and peak memory in MiB.
pub fn proc_stat(pid: u32) -> Option<(u64, f64, f64)> {
    let dir = Path::new(procs::ROOT).join(pid.to_string());
    let ticks = procs::cpu_ticks(&dir)?;
    let mib = |field: &str| Some(procs::status_bytes(&dir, field)? as f64 / (1 << 20) as f64);
    Some((ticks, mib("VmRSS:")?, mib("VmHWM:")?))
}

/// Coordinator figures, from its `$SRV.STATS`.
pub async fn coordinator_stats(client: &async_nats::Client) -> anyhow::Result<Value> {
    let r = client.request("$SRV.STATS.gpufleet", Bytes::new()).await?;
    let v: Value = serde_json::from_slice(&r.payload)?;
    v["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "jobs-submit"))
        .map(|e| e["data"].clone())
        .ok_or_else(|| anyhow::anyhow!("no coordinator stats"))
}

/// Workers the coordinator lists, page by page.
pub async fn count_workers(client: &async_nats::Client, subject: &str) -> anyhow::Result<usize> {
    let mut after: Option<String> = None;
    let mut n = 0;
    loop {
        let body = match &after {
            Some(a) => json!({"after": a}),
            None => json!({}),
        };
        let r = client
            .request(subject.to_string(), Bytes::from(serde_json::to_vec(&body)?))
            .await?;
        let page: Vec<Value> = serde_json::from_slice(&r.payload)?;
        if page.is_empty() {
            return Ok(n);
        }
        n += page.len();
        after = page
            .last()
            .and_then(|w| w["name"].as_str())
            .map(String::from);
    }
}

pub fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("dir").join(name)
}

pub async fn run(
    url: &str,
    workers: usize,
    gpus: u32,
    tasks: usize,
    window: Duration,
) -> anyhow::Result<ScaleResult> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    create_stores(&js, &Setup::default()).await?;
    let kv = RawKv::open(&js, subjects::WORKERS_BUCKET).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let beats = tokio::spawn(heartbeats(
        kv,
        workers,
        gpus,
        Duration::from_secs(2),
        stop_rx,
        sent.clone(),
    ));

    let mut coord = std::process::Command::new(sibling("gpufleet-coordinator"))
        .args(["--nats-url", url])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let pid = coord.id();
    let guard = scopeguard(move || {
        let _ = coord.kill();
        let _ = coord.wait();
    });
    // Ready when it serves and sees every worker (10,000 adverts take a
    // while to be written and read at start).
    let wait = Duration::from_secs(60) + Duration::from_millis(10 * workers as u64);
    let deadline = tokio::time::Instant::now() + wait;
    let mut pace = Backoff::fixed(Duration::from_millis(200));
    loop {
        if count_workers(&client, subjects::WORKERS_LIST)
            .await
            .unwrap_or(0)
            >= workers
        {
            break;
        }
        anyhow::ensure!(
            proc_stat(pid).is_some(),
            "the coordinator exited during start-up"
        );
        anyhow::ensure!(
            pace.wait_before(deadline).await,
            "the coordinator did not see {workers} workers in {wait:?}"
        );
    }
    // Queue the tasks as jobs of 100 one-GPU tasks, each under its own id,
    // so that a submit that timed out while the coordinator was busy can
    // be sent again (a 409 for the same spec means it was taken).
    let per_job = 100;
    let queueing = Instant::now();
    for j in 0..tasks.div_ceil(per_job) {
        let n = per_job.min(tasks - j * per_job);
        let job = json!({"id": format!("scale-{j}"), "name": format!("scale-{j}"), "tasks": (0..n).map(|_| json!({"command": ["true"], "resources": {"gpus": 1}})).collect::<Vec<_>>()});
        let body = Bytes::from(serde_json::to_vec(&job)?);
        let mut tries = 0;
        while let Err(e) = client.request(subjects::JOBS_SUBMIT, body.clone()).await {
            tries += 1;
            anyhow::ensure!(tries < 5, "submitting job scale-{j}: {e}");
        }
    }
    let queueing = queueing.elapsed();
    let queued_rss = proc_stat(pid).map_or(0.0, |(_, rss, _)| rss);
    let s0 = coordinator_stats(&client).await?;
    let (t0, _, _) = proc_stat(pid).ok_or_else(|| anyhow::anyhow!("coordinator gone"))?;
    let sent0 = sent.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let sent1 = sent.load(std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed();
    let s1 = coordinator_stats(&client).await?;
    let (t1, rss, hwm) = proc_stat(pid).ok_or_else(|| anyhow::anyhow!("coordinator gone"))?;
    let _ = stop_tx.send(true);
    beats.await?;
    drop(guard);
    let tick = 100.0; // USER_HZ on Linux
    let secs = elapsed.as_secs_f64();
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    Ok(ScaleResult {
        workers,
        tasks,
        window: elapsed,
        queueing,
        bytes_per_task: queued_rss * (1 << 20) as f64 / tasks.max(1) as f64,
        cpu_percent: (t1 - t0) as f64 / tick / secs * 100.0,
        rss_mib: rss,
        hwm_mib: hwm,
        placement_p50_us: f(&s1["placement_us"]["p50"]),
        placement_p99_us: f(&s1["placement_us"]["p99"]),
        placed: s1["placed"].as_u64().unwrap_or(0),
        adverts_sent_per_s: (sent1 - sent0) as f64 / secs,
        adverts_handled_per_s: (f(&s1["adverts"]) - f(&s0["adverts"])) / secs,
        backlog_start: s0["backlog_last"].as_u64().unwrap_or(0),
        backlog_end: s1["backlog_last"].as_u64().unwrap_or(0),
        pass_p99_ms: f(&s1["pass_us"]["p99"]) / 1000.0,
    })
}

/// Runs `f` on drop.
pub fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    G(Some(f))
}
