//! The control plane: the real coordinator (its own process) and workers
//! in this process whose tasks end at once (or run `/bin/true`), so that
//! what is measured is gpufleet's own cost per task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::histogram::Histogram;
use gpufleet_natsutil::Backoff;
use gpufleet_schema::{codec, subjects, Event, EventBody, EventKind, TaskState};
use gpufleet_worker::launcher::Launcher;
use gpufleet_worker::WorkerConfig;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::scale::{count_workers, sibling};

/// A coordinator process and workers in this process.
pub struct Fleet {
    coordinator: std::process::Child,
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// A coordinator process on `url`.
fn spawn_coordinator(url: &str) -> std::io::Result<std::process::Child> {
    std::process::Command::new(sibling("gpufleet-coordinator"))
        .args(["--nats-url", url])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
}

impl Fleet {
    pub async fn start(
        url: &str,
        workers: usize,
        cpus: f64,
        launcher: Arc<dyn Launcher>,
    ) -> anyhow::Result<Fleet> {
        let coordinator = spawn_coordinator(url)?;
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        for i in 0..workers {
            let cfg = WorkerConfig {
                nats_url: url.to_string(),
                name: Some(format!("bench-{i:03}")),
                cpus: Some(cpus),
                addr: Some("127.0.0.1".into()),
                work_dir: Some(
                    std::env::temp_dir().join(format!("gpufleet-bench-{}-{i}", std::process::id())),
                ),
                ..WorkerConfig::default()
            };
            let mut rx = stop_rx.clone();
            let launcher = launcher.clone();
            handles.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = gpufleet_worker::run_with(cfg, shutdown, launcher).await {
                    eprintln!("bench worker failed: {e}");
                }
            }));
        }
        let fleet = Fleet {
            coordinator,
            stop,
            workers: handles,
        };
        let client = async_nats::connect(url).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut pace = Backoff::fixed(Duration::from_millis(100));
        loop {
            let n = count_workers(&client).await.unwrap_or(0);
            if n >= workers {
                break;
            }
            anyhow::ensure!(
                pace.wait_before(deadline).await,
                "only {n} of {workers} workers came up"
            );
        }
        Ok(fleet)
    }

    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.id()
    }

    /// Stops the coordinator (SIGTERM: it hands the leadership over at
    /// once) and starts another.
    pub fn restart_coordinator(&mut self, url: &str) -> anyhow::Result<()> {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.coordinator.id() as i32);
        kill(pid, Signal::SIGTERM)?;
        self.coordinator.wait()?;
        self.coordinator = spawn_coordinator(url)?;
        Ok(())
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut me = self;
        for h in me.workers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
        }
        // The coordinator goes with the Fleet, in Drop.
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Also on an error path: never leave a coordinator behind.
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// Counts tasks whose end the coordinator has recorded (its SUCCEEDED
/// state events), and wakes waiters per job on RUNNING and result.
struct Watcher {
    done: Arc<AtomicU64>,
    waiting: Arc<Mutex<HashMap<String, Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    running: Option<oneshot::Sender<Instant>>,
    result: Option<oneshot::Sender<Instant>>,
}

impl Watcher {
    async fn start(client: &async_nats::Client) -> anyhow::Result<Watcher> {
        let done = Arc::new(AtomicU64::new(0));
        let waiting: Arc<Mutex<HashMap<String, Waiter>>> = Arc::default();
        let states = client
            .subscribe(subjects::events_of_kind(EventKind::State))
            .await?;
        let results = client
            .subscribe(subjects::events_of_kind(EventKind::Result))
            .await?;
        let mut sub = futures::stream::select(states, results);
        let (d, w) = (done.clone(), waiting.clone());
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let at = Instant::now();
                let Ok(ev) = codec::decode::<Event>(&m.payload) else {
                    continue;
                };
                match ev.body {
                    EventBody::State {
                        state: TaskState::Running,
                        ..
                    } => {
                        if let Some(tx) = w
                            .lock()
                            .expect("lock")
                            .get_mut(ev.job_id.as_str())
                            .and_then(|x| x.running.take())
                        {
                            let _ = tx.send(at);
                        }
                    }
                    EventBody::Result(_) => {
                        if let Some(tx) = w
                            .lock()
                            .expect("lock")
                            .get_mut(ev.job_id.as_str())
                            .and_then(|x| x.result.take())
                        {
                            let _ = tx.send(at);
                        }
                    }
                    EventBody::State {
                        state: TaskState::Succeeded,
                        ..
                    } if ev.worker.is_none() => {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        Ok(Watcher { done, waiting })
    }
}

pub struct Throughput {
    pub tasks: u64,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn rate(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64()
    }
}

/// Submits `jobs` jobs of `per_job` tasks of `cpus` CPUs each, 64 submits
/// in flight, and waits until the coordinator has recorded every task done.
pub async fn throughput(
    url: &str,
    jobs: usize,
    per_job: usize,
    cpus: f64,
) -> anyhow::Result<Throughput> {
    let client = async_nats::connect(url).await?;
    let watcher = Watcher::start(&client).await?;
    let base = watcher.done.load(Ordering::Relaxed);
    let total = (jobs * per_job) as u64;
    let tasks: Vec<Value> = (0..per_job)
        .map(|_| json!({"command": ["true"], "resources": {"cpus": cpus}}))
        .collect();
    let started = Instant::now();
    submit_many(&client, jobs, &json!({"tasks": tasks})).await?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while watcher.done.load(Ordering::Relaxed) - base < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {total} tasks finished",
            watcher.done.load(Ordering::Relaxed) - base
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Throughput {
        tasks: total,
        elapsed: started.elapsed(),
    })
}

/// Submits `jobs` copies of `job`, 64 in flight.
pub async fn submit_many(
    client: &async_nats::Client,
    jobs: usize,
    job: &Value,
) -> anyhow::Result<()> {
    let body = Bytes::from(serde_json::to_vec(job)?);
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..64 {
        let (client, body, next) = (client.clone(), body.clone(), next.clone());
        submitters.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs as u64 {
                let r = client.request(subjects::JOBS_SUBMIT, body.clone()).await?;
                anyhow::ensure!(
                    r.headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Service-Error-Code"))
                        .is_none(),
                    "submit refused: {}",
                    String::from_utf8_lossy(&r.payload)
                );
            }
            Ok(())
        }));
    }
    for s in submitters {
        s.await??;
    }
    Ok(())
}

pub struct Latency {
    pub to_running: Histogram,
    pub to_result: Histogram,
}

/// One single-task job at a time: submit to RUNNING, submit to result.
pub async fn latency(url: &str, jobs: usize) -> anyhow::Result<Latency> {
    let client = async_nats::connect(url).await?;
    let watcher = Watcher::start(&client).await?;
    let mut out = Latency {
        to_running: Histogram::default(),
        to_result: Histogram::default(),
    };
    for n in 0..jobs {
        let id = format!("lat-{}-{n}", std::process::id());
        let (rtx, rrx) = oneshot::channel();
        let (dtx, drx) = oneshot::channel();
        watcher.waiting.lock().expect("lock").insert(
            id.clone(),
            Waiter {
                running: Some(rtx),
                result: Some(dtx),
            },
        );
        let body = serde_json::to_vec(
            &json!({"id": id, "tasks": [{"command": ["true"], "resources": {"cpus": 0.01}}]}),
        )?;
        let t0 = Instant::now();
        client
            .request(subjects::JOBS_SUBMIT, Bytes::from(body))
            .await?;
        let ran = tokio::time::timeout(Duration::from_secs(30), rrx).await??;
        let done = tokio::time::timeout(Duration::from_secs(30), drx).await??;
        out.to_running.record(ran - t0);
        out.to_result.record(done - t0);
        watcher.waiting.lock().expect("lock").remove(&id);
    }
    Ok(out)
}
