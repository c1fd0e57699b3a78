//! The control plane: the real coordinator (its own process) and workers
//! in this process whose tasks end at once (or run `/bin/true`), so that
//! what is measured is gpufleet's own cost per task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use gpufleet_natsutil::events::{last_on, Replay, Until};
use gpufleet_natsutil::histogram::Histogram;
use gpufleet_natsutil::{Auth, Backoff};
use gpufleet_schema::subjects::endpoint;
use gpufleet_schema::{codec, subjects, Event, EventBody, EventKind, TaskState, UserId};
use gpufleet_worker::launcher::Launcher;
use gpufleet_worker::WorkerConfig;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::scale::{count_workers, sibling};

/// How the benchmark reaches its fleet: openly, or with roles and signed
/// reservations, from the keys and settings `gpufleet auth` writes.
pub struct Access {
    pub url: String,
    /// The folder `gpufleet auth` wrote, with roles.
    auth: Option<PathBuf>,
}

/// The user that submits, and the admin that watches every job's events.
const SUBMITTER: &str = "bench";
const WATCHER: &str = "watch";

impl Access {
    pub fn open(url: &str) -> Access {
        Access {
            url: url.to_string(),
            auth: None,
        }
    }

    /// Writes credentials for `workers` workers, the submitter and the
    /// watcher into `dir` with `gpufleet auth`, and starts a server from
    /// them.
    pub fn secure(
        workers: usize,
        dir: &std::path::Path,
    ) -> anyhow::Result<(gpufleet_testkit::NatsServer, Access)> {
        let port = gpufleet_testkit::server::free_port();
        let url = format!("nats://127.0.0.1:{port}");
        let names: Vec<String> = (0..workers).map(worker_name).collect();
        let auth = dir.join("auth");
        let out = std::process::Command::new(sibling("gpufleet"))
            .env_remove("GPUFLEET_CONFIG")
            .args(["--nats-url", &url, "auth", "--out"])
            .arg(&auth)
            .args(["--workers", &names.join(",")])
            .args(["--users", SUBMITTER, "--admins", WATCHER])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--store-dir"])
            .arg(dir.join("store"))
            .output()?;
        anyhow::ensure!(out.status.success(), "gpufleet auth: {out:?}");
        let server =
            gpufleet_testkit::NatsServer::from_config(&auth.join("nats-server.conf"), port);
        Ok((
            server,
            Access {
                url,
                auth: Some(auth),
            },
        ))
    }

    pub fn is_secure(&self) -> bool {
        self.auth.is_some()
    }

    /// A client as `user` (with roles), or an open one.
    pub async fn client(&self, user: &str) -> anyhow::Result<async_nats::Client> {
        let Some(dir) = &self.auth else {
            return Ok(async_nats::connect(self.url.as_str()).await?);
        };
        let auth = Auth {
            nkey: Some(dir.join(format!("user-{user}.nk"))),
            inbox_prefix: Some(gpufleet_schema::roles::inbox_prefix(user)),
            ..Auth::default()
        };
        Ok(gpufleet_natsutil::connect(&self.url, &auth, user, Duration::from_secs(10)).await?)
    }

    /// The subject of an API endpoint, as the submitter calls it.
    pub fn api(&self, endpoint: &str) -> String {
        let user = self
            .auth
            .as_ref()
            .map(|_| UserId::new(SUBMITTER).expect("a valid user name"));
        subjects::api_for(user.as_ref(), endpoint)
    }

    fn worker_config(&self, name: &str) -> anyhow::Result<WorkerConfig> {
        let Some(dir) = &self.auth else {
            return Ok(WorkerConfig {
                nats_url: self.url.clone(),
                name: Some(name.to_string()),
                ..WorkerConfig::default()
            });
        };
        let file = dir.join(format!("worker-{name}.toml"));
        Ok(gpufleet_natsutil::settings::load(
            &WorkerConfig::default(),
            Some(&file),
            vec![],
        )?)
    }

    /// Every state and result event, as they come.
    async fn watch(&self) -> anyhow::Result<BoxStream<'static, Bytes>> {
        let client = self.client(WATCHER).await?;
        let kinds = [EventKind::State, EventKind::Result];
        if !self.is_secure() {
            let mut subs = Vec::new();
            for k in kinds {
                subs.push(client.subscribe(subjects::events_of_kind(k)).await?);
            }
            // The server has the subscriptions once it answers a ping: a
            // first task may end within a millisecond of its submit.
            client.flush().await?;
            return Ok(futures::stream::select_all(subs).map(|m| m.payload).boxed());
        }
        // With roles nobody may subscribe to events: the admin replays
        // them through consumers, one filter each.
        let js = async_nats::jetstream::new(client);
        let mut replays = Vec::new();
        let stream = js.get_stream_no_info(subjects::EVENTS_STREAM).await?;
        for k in kinds {
            // From now on: what earlier scenarios left is not counted.
            let filters = vec![subjects::events_of_kind(k)];
            let end = last_on(&js, &stream, subjects::EVENTS_STREAM, &filters).await?;
            let replay =
                Replay::start(&js, subjects::EVENTS_STREAM, filters, end + 1, Until::Live).await?;
            replays.push(
                futures::stream::unfold(replay, |mut r| async move {
                    loop {
                        match r.next().await? {
                            Ok(m) => return Some((m.message.payload, r)),
                            Err(_) => continue,
                        }
                    }
                })
                .boxed(),
            );
        }
        Ok(futures::stream::select_all(replays).boxed())
    }
}

fn worker_name(i: usize) -> String {
    format!("bench-{i:03}")
}

/// A coordinator process and workers in this process.
pub struct Fleet {
    coordinator: std::process::Child,
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// A coordinator process reaching NATS as `access` says.
fn spawn_coordinator(access: &Access) -> std::io::Result<std::process::Child> {
    let mut coordinator = std::process::Command::new(sibling("gpufleet-coordinator"));
    match &access.auth {
        Some(dir) => coordinator
            .arg("--config")
            .arg(dir.join("coordinator.toml")),
        None => coordinator.args(["--nats-url", &access.url]),
    };
    coordinator
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
}

impl Fleet {
    pub async fn start(
        access: &Access,
        workers: usize,
        cpus: f64,
        launcher: Arc<dyn Launcher>,
    ) -> anyhow::Result<Fleet> {
        Self::start_with(access, workers, launcher, |cfg| WorkerConfig {
            cpus: Some(cpus),
            ..cfg
        })
        .await
    }

    /// [`Fleet::start`] with each worker's settings as `tune` makes them.
    pub async fn start_with(
        access: &Access,
        workers: usize,
        launcher: Arc<dyn Launcher>,
        tune: impl Fn(WorkerConfig) -> WorkerConfig,
    ) -> anyhow::Result<Fleet> {
        let coordinator = spawn_coordinator(access)?;
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        for i in 0..workers {
            let cfg = tune(WorkerConfig {
                addr: Some("127.0.0.1".into()),
                work_dir: Some(
                    std::env::temp_dir().join(format!("gpufleet-bench-{}-{i}", std::process::id())),
                ),
                // Many workers in one process: one port would not do.
                metrics_addr: gpufleet_natsutil::metrics::MetricsAddr::Off,
                ..access.worker_config(&worker_name(i))?
            });
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
        let client = access.client(SUBMITTER).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut pace = Backoff::fixed(Duration::from_millis(100));
        loop {
            let n = count_workers(&client, &access.api(endpoint::WORKERS_LIST))
                .await
                .unwrap_or(0);
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
    pub fn restart_coordinator(&mut self, access: &Access) -> anyhow::Result<()> {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.coordinator.id() as i32);
        kill(pid, Signal::SIGTERM)?;
        self.coordinator.wait()?;
        self.coordinator = spawn_coordinator(access)?;
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

/// Counts tasks that ended (their holders' SUCCEEDED results: the
/// coordinator sends no state event for a success, and records it within
/// a batch of taking the result), and wakes waiters per job on result.
struct Watcher {
    done: Arc<AtomicU64>,
    waiting: Arc<Mutex<HashMap<String, Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    result: Option<oneshot::Sender<Instant>>,
}

impl Watcher {
    async fn start(access: &Access) -> anyhow::Result<Watcher> {
        let done = Arc::new(AtomicU64::new(0));
        let waiting: Arc<Mutex<HashMap<String, Waiter>>> = Arc::default();
        let mut sub = access.watch().await?;
        let (d, w) = (done.clone(), waiting.clone());
        tokio::spawn(async move {
            while let Some(payload) = sub.next().await {
                let at = Instant::now();
                let Ok(ev) = codec::decode::<Event>(&payload) else {
                    continue;
                };
                let EventBody::Result(o) = ev.body else {
                    continue;
                };
                if o.state == TaskState::Succeeded && ev.worker.is_some() {
                    d.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(tx) = w
                    .lock()
                    .expect("lock")
                    .get_mut(ev.job_id.as_str())
                    .and_then(|x| x.result.take())
                {
                    let _ = tx.send(at);
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
/// in flight, and waits until every task has ended.
pub async fn throughput(
    access: &Access,
    jobs: usize,
    per_job: usize,
    cpus: f64,
) -> anyhow::Result<Throughput> {
    let client = access.client(SUBMITTER).await?;
    let watcher = Watcher::start(access).await?;
    let submit = access.api(endpoint::JOBS_SUBMIT);
    let base = watcher.done.load(Ordering::Relaxed);
    let total = (jobs * per_job) as u64;
    let tasks: Vec<Value> = (0..per_job)
        .map(|_| json!({"command": ["true"], "resources": {"cpus": cpus}}))
        .collect();
    let started = Instant::now();
    submit_many(&client, &submit, jobs, &json!({"tasks": tasks})).await?;
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

/// Submits `jobs` copies of `job` on `submit`, 64 in flight.
pub async fn submit_many(
    client: &async_nats::Client,
    submit: &str,
    jobs: usize,
    job: &Value,
) -> anyhow::Result<()> {
    let body = Bytes::from(serde_json::to_vec(job)?);
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..64 {
        let (client, body, next) = (client.clone(), body.clone(), next.clone());
        let submit = submit.to_string();
        submitters.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs as u64 {
                let r = client.request(submit.clone(), body.clone()).await?;
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
    pub to_result: Histogram,
}

/// One single-task job at a time: submit to result.
pub async fn latency(access: &Access, jobs: usize) -> anyhow::Result<Latency> {
    let client = access.client(SUBMITTER).await?;
    let watcher = Watcher::start(access).await?;
    let mut out = Latency {
        to_result: Histogram::default(),
    };
    for n in 0..jobs {
        let id = format!("lat-{}-{n}", std::process::id());
        let (dtx, drx) = oneshot::channel();
        watcher
            .waiting
            .lock()
            .expect("lock")
            .insert(id.clone(), Waiter { result: Some(dtx) });
        let body = serde_json::to_vec(
            &json!({"id": id, "tasks": [{"command": ["true"], "resources": {"cpus": 0.01}}]}),
        )?;
        let t0 = Instant::now();
        client
            .request(access.api(endpoint::JOBS_SUBMIT), Bytes::from(body))
            .await?;
        let done = tokio::time::timeout(Duration::from_secs(30), drx).await??;
        out.to_result.record(done - t0);
        watcher.waiting.lock().expect("lock").remove(&id);
    }
    Ok(out)
}
