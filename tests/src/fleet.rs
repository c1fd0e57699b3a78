//! A whole fleet of real processes on one real nats-server: the coordinator
//! and any number of workers with simulated GPUs, started and waited for.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::events::{Replay, Until};
use gpufleet_schema::{codec, subjects, Event, EventBody, EventKind, JobId, TaskState};
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
"#;

pub struct Fleet {
    pub server: NatsServer,
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
}

impl Fleet {
    /// A server and a coordinator; add workers with [`Fleet::add_worker`].
    pub async fn start() -> Fleet {
        let server = NatsServer::start();
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-fleet-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("coordinator.toml"), COORDINATOR_TEST_CONFIG)
            .expect("write config");
        let mut fleet = Fleet {
            server,
            coordinator: None,
            workers: vec![],
            dir,
        };
        fleet.start_coordinator().await;
        fleet
    }

    pub fn url(&self) -> String {
        self.server.url()
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
            self.url(),
            "--name".into(),
            spec.name.clone(),
            "--heartbeat".into(),
            "500ms".into(),
            "--advert-ttl".into(),
            "2s".into(),
            "--work-dir".into(),
            self.dir
                .path()
                .join(format!("work-{}", spec.name))
                .display()
                .to_string(),
            // Gang rendezvous stays on loopback in tests.
            "--addr".into(),
            "127.0.0.1".into(),
        ];
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

    /// Starts a worker and waits until the coordinator lists it.
    pub async fn add_worker(&mut self, spec: WorkerSpec) {
        let args = self.worker_args(&spec);
        // A short kill grace keeps stop tests quick.
        let mut env = vec![
            ("GPUFLEET_KILL_GRACE", "1s"),
            ("GPUFLEET_DRAIN_TIMEOUT", "5s"),
        ];
        env.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let proc = Proc::spawn("gpufleet-worker", &args, &env);
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
        async_nats::connect(self.url())
            .await
            .expect("connect to the test server")
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

    /// Re-runs `check` whenever a message arrives on `subject`, and a
    /// second after the last one (for changes that publish nothing there,
    /// or that the coordinator had not read yet), until it yields `Some`.
    async fn recheck_on<T, F, Fut>(
        &self,
        subject: String,
        deadline: Duration,
        what: &str,
        mut check: F,
    ) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let client = self.client().await;
        let mut wakeups = client.subscribe(subject).await.expect("subscribe");
        with_deadline(deadline, what, async {
            loop {
                if let Some(v) = check().await {
                    return v;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), wakeups.next()).await;
            }
        })
        .await
    }

    /// Waits until the job's status satisfies `pred`, checking it on each
    /// of the job's state events.
    pub async fn wait_job(
        &self,
        job_id: &str,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let pred = &pred;
        let job = JobId::new(job_id).expect("a job id");
        let states = subjects::job_events_of_kind(&job, EventKind::State);
        self.recheck_on(states, deadline, what, || async move {
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
        self.recheck_on(beats, Duration::from_secs(60), what, || async move {
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
        let filters = vec![subjects::job_events(&job)];
        Replay::start(&js, subjects::EVENTS_STREAM, filters, 1, until)
            .await
            .expect("the events stream")
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
            EventBody::State { state, reason } => Some((e.attempt, *state, reason.clone())),
            _ => None,
        })
        .collect()
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
            let msg = h
                .get("Nats-Service-Error")
                .map(|v| v.to_string())
                .unwrap_or_default();
            return Err(format!("{code}: {msg}"));
        }
    }
    serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("reply of {subject} is not JSON: {e}"))
}
