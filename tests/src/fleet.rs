//! A whole fleet of real processes on one real nats-server: the coordinator
//! and any number of workers with simulated GPUs, started and waited for.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::events::{Replay, Until};
use gpufleet_schema::{codec, subjects, Event, EventBody, EventKind, JobId, TaskState, UserId};
use serde_json::Value;
use tempfile::TempDir;

use crate::procs::Proc;
use crate::server::NatsServer;
use crate::wait::{eventually, with_deadline};

/// How long reading a job's stored events may take.
const READ_EVENTS: Duration = Duration::from_secs(60);

/// Short timers, so that faults show within seconds.
pub const COORDINATOR_TEST_CONFIG: &str = r#"
reservation_ttl = "5s"
lease_ttl = "3s"
tick = "200ms"
starvation_after = "5s"
result_grace = "5s"
leader_ttl = "3s"
connect_patience = "10s"
retry_backoff = "200ms"
retry_backoff_max = "2s"
# Many test servers share one disk, and each reserves these.
events_max_bytes = "256MiB"
jobs_max_bytes = "256MiB"
artifacts_max_bytes = "512MiB"
# Any free port: test fleets run side by side.
metrics_addr = "127.0.0.1:0"
"#;

pub struct Fleet {
    pub server: NatsServer,
    /// The other nodes of the cluster, for a fleet on a 3-node cluster
    /// ([`Fleet::start_clustered`]); none otherwise.
    pub nodes: Vec<NatsServer>,
    pub coordinator: Option<Proc>,
    pub workers: Vec<(String, Proc)>,
    dir: TempDir,
}

/// How a worker is started.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub name: String,
    pub gpus: Option<String>,
    pub cpus: Option<f64>,
    pub labels: Option<String>,
    pub extra: Vec<String>,
    /// Environment variables beyond the test kit's own.
    pub env: Vec<(String, String)>,
    /// Run the worker as this user rather than the test's.
    pub user: Option<String>,
    /// Connect the worker here rather than to the fleet's server (a
    /// [`crate::proxy::Proxy`] in front of it, say).
    pub nats_url: Option<String>,
}

impl WorkerSpec {
    pub fn new(name: &str) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            gpus: None,
            cpus: None,
            labels: None,
            extra: vec![],
            env: vec![],
            user: None,
            nats_url: None,
        }
    }

    pub fn gpus(mut self, spec: &str) -> Self {
        self.gpus = Some(spec.into());
        self
    }

    pub fn cpus(mut self, n: f64) -> Self {
        self.cpus = Some(n);
        self
    }

    pub fn labels(mut self, l: &str) -> Self {
        self.labels = Some(l.into());
        self
    }

    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    pub fn via(mut self, nats_url: &str) -> Self {
        self.nats_url = Some(nats_url.into());
        self
    }

    /// A longer advert TTL than the test kit's 2 s, for a worker that may
    /// be too busy to confirm a heartbeat within its fence's margin
    /// (about 1.5 s of a 2 s TTL) and would then stop its tasks.
    pub fn advert_ttl(mut self, ttl: &str) -> Self {
        self.extra
            .extend(["--advert-ttl".to_string(), ttl.to_string()]);
        self
    }

    pub fn as_user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }
}

/// [`COORDINATOR_TEST_CONFIG`] with some settings changed (`key`, TOML
/// value).
pub fn coordinator_config(overrides: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for line in COORDINATOR_TEST_CONFIG.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if !overrides.iter().any(|(k, _)| *k == key) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (k, v) in overrides {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

impl Fleet {
    /// A server and a coordinator; add workers with [`Fleet::add_worker`].
    pub async fn start() -> Fleet {
        Self::start_with(&[]).await
    }

    /// [`Fleet::start`] with some coordinator settings changed.
    pub async fn start_with(overrides: &[(&str, &str)]) -> Fleet {
        Self::start_on(NatsServer::start(), vec![], overrides).await
    }

    /// [`Fleet::start_with`] on a 3-node cluster: `server` is its first
    /// node, `nodes` the others, and every program is given all three.
    pub async fn start_clustered(overrides: &[(&str, &str)]) -> Fleet {
        let mut nodes = crate::server::NatsCluster::start().nodes;
        let server = nodes.remove(0);
        Self::start_on(server, nodes, overrides).await
    }

    async fn start_on(
        server: NatsServer,
        nodes: Vec<NatsServer>,
        overrides: &[(&str, &str)],
    ) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-fleet-")
            .tempdir()
            .expect("tempdir");
        // Workers started as root run their tasks as `nobody`: tasks must
        // reach their work directories here, and write the files tests
        // steer them by.
        open_to_tasks(dir.path());
        std::fs::write(
            dir.path().join("coordinator.toml"),
            coordinator_config(overrides),
        )
        .expect("write config");
        let mut fleet = Fleet {
            server,
            nodes,
            coordinator: None,
            workers: vec![],
            dir,
        };
        fleet.start_coordinator().await;
        fleet
    }

    /// The server's URL, or on a cluster every node's, comma-separated.
    pub fn url(&self) -> String {
        std::iter::once(&self.server)
            .chain(&self.nodes)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The arguments a coordinator of this fleet runs with.
    pub fn coordinator_args(&self) -> Vec<String> {
        vec![
            "--nats-url".to_string(),
            self.url(),
            "--config".into(),
            self.dir
                .path()
                .join("coordinator.toml")
                .display()
                .to_string(),
        ]
    }

    /// Starts (or restarts) the coordinator and waits until it serves.
    pub async fn start_coordinator(&mut self) {
        let args = self.coordinator_args();
        self.coordinator = Some(Proc::spawn("gpufleet-coordinator", &args, &[]));
        let client = self.client().await;
        eventually(Duration::from_secs(30), "the coordinator to answer", || {
            let client = client.clone();
            async move {
                let r = client
                    .request("$SRV.PING.gpufleet", Bytes::new())
                    .await
                    .ok()?;
                Some(r)
            }
        })
        .await;
    }

    pub fn worker_args(&self, spec: &WorkerSpec) -> Vec<String> {
        let mut args = vec![
            "--nats-url".to_string(),
            spec.nats_url.clone().unwrap_or_else(|| self.url()),
            "--name".into(),
            spec.name.clone(),
        ];
        args.extend(worker_test_args(self.dir.path(), spec));
        args
    }

    /// Starts a worker and waits until the coordinator lists it.
    pub async fn add_worker(&mut self, spec: WorkerSpec) {
        let args = self.worker_args(&spec);
        let proc = spawn_worker(&args, &spec);
        self.workers.push((spec.name.clone(), proc));
        self.wait_worker_listed(&spec.name, true).await;
    }

    pub fn worker(&mut self, name: &str) -> &mut Proc {
        &mut self
            .workers
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no worker {name}"))
            .1
    }

    /// Waits until `workers.list` does (or does not) show `name`.
    pub async fn wait_worker_listed(&self, name: &str, present: bool) {
        let client = self.client().await;
        let what = format!(
            "worker {name} to be {}",
            if present { "listed" } else { "gone" }
        );
        eventually(Duration::from_secs(30), &what, || {
            let client = client.clone();
            async move {
                let v = api(&client, subjects::WORKERS_LIST, &serde_json::json!({}))
                    .await
                    .ok()?;
                let listed = v
                    .as_array()?
                    .iter()
                    .any(|w| w["name"] == Value::String(name.to_string()));
                (listed == present).then_some(())
            }
        })
        .await;
    }

    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// Submits a job as JSON and returns its id.
    pub async fn submit(&self, job: &Value) -> String {
        submit_job(&self.client().await, job)
            .await
            .unwrap_or_else(|e| panic!("submit failed: {e}"))
    }

    pub async fn get(&self, job_id: &str) -> Value {
        get_job(&self.client().await, job_id)
            .await
            .unwrap_or_else(|e| panic!("get {job_id} failed: {e}"))
    }

    /// Re-runs `check` whenever a message arrives on one of `subjects`,
    /// soon again after one (the coordinator may not have read it yet: a
    /// result is recorded a moment after it is published), and a second
    /// after the last one (for changes that publish nothing there), until
    /// it yields `Some`.
    async fn recheck_on<T, F, Fut>(
        &self,
        subjects: Vec<String>,
        deadline: Duration,
        what: &str,
        mut check: F,
    ) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let client = self.client().await;
        let mut subs = Vec::new();
        for s in subjects {
            subs.push(client.subscribe(s).await.expect("subscribe"));
        }
        let mut wakeups = futures::stream::select_all(subs);
        let quiet = Duration::from_secs(1);
        with_deadline(deadline, what, async {
            let mut pause = quiet;
            loop {
                if let Some(v) = check().await {
                    return v;
                }
                pause = match tokio::time::timeout(pause, wakeups.next()).await {
                    Ok(_) => Duration::from_millis(20),
                    Err(_) => (pause * 2).min(quiet),
                };
            }
        })
        .await
    }

    /// Waits until the job's status satisfies `pred`, checking it on each
    /// of the job's state events and results (a success has no state
    /// event: the status says it a moment after the holder's result).
    pub async fn wait_job(
        &self,
        job_id: &str,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let pred = &pred;
        let job = JobId::new(job_id).expect("a job id");
        let user = UserId::default_user();
        let wakeups = [EventKind::State, EventKind::Result]
            .map(|k| subjects::job_events_of_kind(&user, &job, k))
            .to_vec();
        self.recheck_on(wakeups, deadline, what, || async move {
            let status = self.get(job_id).await;
            pred(&status).then_some(status)
        })
        .await
    }

    /// Waits until the coordinator's copy of worker `name`'s advert (as
    /// `workers.list` shows it) satisfies `pred`, checking it on each of
    /// the worker's heartbeats.
    pub async fn wait_advert(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let pred = &pred;
        let client = &self.client().await;
        let beats = subjects::kv_subject(subjects::WORKERS_BUCKET, name);
        self.recheck_on(vec![beats], Duration::from_secs(60), what, || async move {
            let ws = api(client, subjects::WORKERS_LIST, &serde_json::json!({}))
                .await
                .ok()?;
            ws.as_array()?
                .iter()
                .find(|w| w["name"] == Value::String(name.to_string()))
                .filter(|a| pred(a))
                .cloned()
        })
        .await
    }

    /// A replay of every event of a job from the start of the stream.
    async fn job_events(&self, job: &str, until: Until) -> Replay {
        let js = jetstream::new(self.client().await);
        let job = JobId::new(job).expect("a job id");
        let filters = vec![subjects::job_events(&UserId::default_user(), &job)];
        // The stream may have no leader for a while (a node of a cluster
        // lost, a server restarting).
        eventually(READ_EVENTS, "the events stream to be read", || {
            let (js, filters) = (&js, filters.clone());
            async move {
                match Replay::start(js, subjects::EVENTS_STREAM, filters, 1, until).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        eprintln!("reading the events stream: {e}");
                        None
                    }
                }
            }
        })
        .await
    }

    /// Every event of a job stored so far, in stream order.
    pub async fn events(&self, job: &str) -> Vec<Event> {
        let mut replay = self.job_events(job, Until::CaughtUp).await;
        with_deadline(READ_EVENTS, "stored events", async {
            let mut out = Vec::new();
            while let Some(r) = replay.next().await {
                match r {
                    Ok(r) => out.push(codec::decode(&r.message.payload).expect("event decodes")),
                    // The replay resumes after the last event it handed out.
                    Err(e) => eprintln!("reading the events of {job}: {e}"),
                }
            }
            out
        })
        .await
    }

    /// Waits for an event of the job (stored or yet to come) matching
    /// `pred`.
    pub async fn wait_event(
        &self,
        job: &str,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let mut replay = self.job_events(job, Until::Live).await;
        with_deadline(deadline, what, async {
            loop {
                match replay.next().await.expect("a live replay goes on") {
                    Ok(r) => {
                        let ev = codec::decode::<Event>(&r.message.payload).expect("event decodes");
                        if pred(&ev) {
                            return ev;
                        }
                    }
                    Err(e) => eprintln!("reading the events of {job}: {e}"),
                }
            }
        })
        .await
    }

    /// Waits until the job has finished, whatever the outcome.
    pub async fn wait_finished(&self, job_id: &str, deadline: Duration) -> Value {
        self.wait_job(job_id, deadline, &format!("job {job_id} to finish"), |s| {
            let st = s["status"].as_str().unwrap_or("");
            st.starts_with("FINISHED") || st == "FAILED_TO_RUN"
        })
        .await
    }
}

/// A client of the server at `url`, or of any of the nodes a
/// comma-separated `url` lists (it fails over between them).
pub async fn connect(url: &str) -> Client {
    async_nats::connect(url.split(',').collect::<Vec<_>>())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// A test worker's flags beside how it reaches NATS: quick heartbeats, its
/// own work directory under `dir`, rendezvous on loopback, and `spec`'s.
pub fn worker_test_args(dir: &std::path::Path, spec: &WorkerSpec) -> Vec<String> {
    let mut args = vec![];
    // Quick heartbeats, unless `spec.extra` sets its own.
    for (flag, value) in [("--heartbeat", "500ms"), ("--advert-ttl", "2s")] {
        if !spec.extra.iter().any(|a| a == flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend([
        "--work-dir".into(),
        dir.join(format!("work-{}", spec.name))
            .display()
            .to_string(),
        // Gang rendezvous stays on loopback in tests.
        "--addr".into(),
        "127.0.0.1".into(),
        // Any free port: test workers run side by side.
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ]);
    if let Some(g) = &spec.gpus {
        args.push("--simulate-gpus".into());
        args.push(g.clone());
    }
    if let Some(c) = spec.cpus {
        args.push("--cpus".into());
        args.push(c.to_string());
    }
    if let Some(l) = &spec.labels {
        args.push("--labels".into());
        args.push(l.clone());
    }
    args.extend(spec.extra.iter().cloned());
    args
}

/// Starts `gpufleet-worker ARGS` with `spec`'s environment.
pub fn spawn_worker(args: &[String], spec: &WorkerSpec) -> Proc {
    // A short kill grace keeps stop tests quick.
    let mut env = vec![
        ("GPUFLEET_KILL_GRACE", "1s"),
        ("GPUFLEET_DRAIN_TIMEOUT", "5s"),
    ];
    env.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Proc::spawn_as(spec.user.as_deref(), "gpufleet-worker", args, &env)
}

impl Drop for Fleet {
    /// Killed with SIGKILL, workers leave their tasks' cgroups behind (and
    /// anything still running in them): those go too.
    fn drop(&mut self) {
        let names: Vec<String> = self.workers.drain(..).map(|(n, _)| n).collect();
        for name in names {
            let note = self.dir.path().join(format!("work-{name}/cgroup"));
            if let Ok(base) = std::fs::read_to_string(&note) {
                remove_cgroup_tree(std::path::Path::new(base.trim()));
            }
        }
    }
}

/// Kills whatever runs in the cgroups under `base` and removes them.
fn remove_cgroup_tree(base: &std::path::Path) {
    let Ok(children) = std::fs::read_dir(base) else {
        return;
    };
    for child in children.flatten().filter(|c| c.path().is_dir()) {
        let dir = child.path();
        for _ in 0..200 {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: a plain kill of a process in a test's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // Dying takes the kernel a moment; there is no event for it.
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(base);
}

/// Lets tasks, which may run as another user than the test, enter and
/// write `dir`.
pub fn open_to_tasks(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("open {} to tasks: {e}", dir.display()));
}

/// The state of each task of a job status, in order.
pub fn task_states(status: &Value) -> Vec<String> {
    status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap().to_string())
        .collect()
}

/// (attempt, state, reason) of every state event among `evs`, in order.
pub fn state_events(evs: &[Event]) -> Vec<(u32, TaskState, Option<String>)> {
    evs.iter()
        .filter_map(|e| match &e.body {
            EventBody::State { state, reason, .. } => Some((e.attempt, *state, reason.clone())),
            _ => None,
        })
        .collect()
}

/// (attempt, state, reason) of every task state change among `evs` (of one
/// task, or several: then the attempt numbers mix), as a reader takes them (README, "A success has no state event"):
/// the state events, and a SUCCEEDED result from the holder the
/// coordinator's RESERVED named, unless the coordinator had ended that
/// attempt already, or ends it otherwise later (that end replaces it).
pub fn task_states_read(evs: &[Event]) -> Vec<(u32, TaskState, Option<String>)> {
    let mut holders = std::collections::HashMap::new();
    // Attempts whose success only a result said, and where it sits in `out`.
    let mut by_result = std::collections::HashMap::new();
    let mut out: Vec<(u32, TaskState, Option<String>)> = Vec::new();
    let mut ended = std::collections::HashSet::new();
    for e in evs {
        let key = (e.task_id.clone(), e.attempt);
        match &e.body {
            EventBody::State {
                state,
                reason,
                holder,
            } => {
                if e.worker.is_none() {
                    if let Some(h) = holder {
                        holders.insert(key.clone(), h.clone());
                    }
                    // It replaces a success that only a result said.
                    if let Some(i) = state.is_end().then(|| by_result.remove(&key)).flatten() {
                        out.remove(i);
                        by_result
                            .values_mut()
                            .for_each(|j| *j -= usize::from(*j > i));
                    }
                    if state.is_end() {
                        ended.insert(key);
                    }
                }
                out.push((e.attempt, *state, reason.clone()));
            }
            EventBody::Result(o)
                if o.state == TaskState::Succeeded
                    && e.worker.is_some()
                    && holders.get(&key) == e.worker.as_ref()
                    && !ended.contains(&key)
                    && !by_result.contains_key(&key) =>
            {
                by_result.insert(key, out.len());
                out.push((e.attempt, TaskState::Succeeded, None));
            }
            _ => {}
        }
    }
    out
}

/// Submits a job (JSON) through `client` and returns its id; `Err` says
/// why not, for tests whose fleet may not answer right now.
pub async fn submit_job(client: &Client, job: &Value) -> Result<String, String> {
    let reply = api(client, subjects::JOBS_SUBMIT, job).await?;
    reply["job_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("a submit reply without a job_id: {reply}"))
}

/// A job's status (JSON) through `client`.
pub async fn get_job(client: &Client, job_id: &str) -> Result<Value, String> {
    api(
        client,
        subjects::JOBS_GET,
        &serde_json::json!({"job_id": job_id}),
    )
    .await
}

/// A JSON API request; `Err` carries the error code and message.
pub async fn api(client: &Client, subject: &str, body: &Value) -> Result<Value, String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(codec::CONTENT_TYPE, codec::JSON);
    let reply = client
        .request_with_headers(
            subject.to_string(),
            headers,
            serde_json::to_vec(body).unwrap().into(),
        )
        .await
        .map_err(|e| format!("request {subject}: {e}"))?;
    if let Some(h) = &reply.headers {
        if let Some(code) = h.get("Nats-Service-Error-Code") {
            // The message is in the body; the header has a short phrase.
            let msg = serde_json::from_slice::<Value>(&reply.payload)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .or_else(|| h.get("Nats-Service-Error").map(|v| v.to_string()))
                .unwrap_or_default();
            return Err(format!("{code}: {msg}"));
        }
    }
    serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("reply of {subject} is not JSON: {e}"))
}

/// A coordinator on `url` (one URL or several) with the settings `config`
/// (TOML), written to a file in `dir`.
pub fn spawn_coordinator(url: &str, dir: &std::path::Path, config: &str) -> Proc {
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, config).expect("write the coordinator's settings");
    let args = [
        "--nats-url".to_string(),
        url.to_string(),
        "--config".into(),
        path.display().to_string(),
    ];
    Proc::spawn("gpufleet-coordinator", &args, &[])
}

/// A worker `name` on `url` with the program's own defaults (not the test
/// fleet's), working in a directory of its own under `dir`, with `extra`
/// flags.
pub fn spawn_plain_worker(url: &str, name: &str, dir: &std::path::Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--nats-url".to_string(),
        url.to_string(),
        "--name".into(),
        name.into(),
        "--work-dir".into(),
        dir.join(format!("work-{name}")).display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Proc::spawn("gpufleet-worker", &args, &[])
}

/// Waits until `workers.list` shows `n` workers.
pub async fn wait_workers_listed(client: &Client, n: usize, what: &str) {
    eventually(Duration::from_secs(120), what, || {
        let client = client.clone();
        async move {
            let ws = api(&client, subjects::WORKERS_LIST, &serde_json::json!({}))
                .await
                .ok()?;
            (ws.as_array()?.len() == n).then_some(())
        }
    })
    .await;
}
