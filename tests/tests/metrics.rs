//! Prometheus metrics of a real fleet: a real Prometheus (Debian's
//! `prometheus`, which scripts/test.sh installs when absent) scrapes the
//! coordinator and a worker, and its query API shows what the fleet did;
//! and every metric the README lists is served, in OpenMetrics.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpufleet_schema::subjects;
use gpufleet_testkit::http::{self, free_port};
use gpufleet_testkit::{api, eventually, Fleet, WorkerSpec};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(60);

/// A Prometheus scraping `targets` every 200 ms, with its data in a
/// temporary folder; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(targets: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-prometheus-")
            .tempdir()
            .expect("tempdir");
        let mut config = String::from(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{addr}\"]\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child =
            Command::new(std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into()))
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                "cannot start prometheus ({e}): run scripts/test.sh, or apt-get install prometheus"
            )
                });
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let ready = format!("{}/-/ready", p.url);
        eventually(STEP, "Prometheus to be ready", || {
            let ready = ready.clone();
            async move { http::get(&ready).await.ok().filter(|r| r.status == 200) }
        })
        .await;
        p
    }

    /// The sum of the values of an instant query, `None` while it has none.
    async fn query(&self, expr: &str) -> Option<f64> {
        let url = format!("{}/api/v1/query?query={}", self.url, encode(expr));
        let reply = http::get(&url).await.ok()?;
        let v: Value = serde_json::from_str(&reply.body).ok()?;
        let results = v["data"]["result"].as_array()?;
        if results.is_empty() {
            return None;
        }
        results
            .iter()
            .map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `expr` is `want`, as Prometheus's own query API says.
    async fn until(&self, expr: &str, want: f64) {
        eventually(STEP, &format!("Prometheus: {expr} == {want}"), || async {
            self.query(expr).await.filter(|v| *v == want)
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self._dir.path().join("prometheus.log"));
            eprintln!("----- prometheus.log -----\n{}", log.unwrap_or_default());
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where the coordinator serves its metrics: the API's service metadata.
async fn coordinator_metrics(fleet: &Fleet) -> String {
    let client = fleet.client().await;
    let info = client
        .request(format!("$SRV.INFO.{}", subjects::SERVICE_NAME), "".into())
        .await
        .expect("the service's info");
    let info: Value = serde_json::from_slice(&info.payload).expect("JSON info");
    info["metadata"]["metrics_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics_addr in the service's metadata: {info}"))
        .to_string()
}

/// Where a worker serves its metrics: its advert.
async fn worker_metrics(fleet: &Fleet, name: &str) -> String {
    let advert = fleet
        .wait_advert(name, "its metrics address", |a| {
            a["metrics_addr"].is_string()
        })
        .await;
    advert["metrics_addr"].as_str().unwrap().to_string()
}

/// A task holding a 3 GiB share of a GPU until `gate` exists.
fn gated_share(gate: &Path) -> Value {
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    json!({"name": "holder", "tasks": [{"command": ["sh", "-c", script],
        "resources": {"gpu_memory": "3GiB", "cpus": 0.5}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_tasks_succeed_and_gpu_memory_held() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("prom-w1").gpus("1x24GiB:L4"))
        .await;
    let coordinator = coordinator_metrics(&fleet).await;
    let worker = worker_metrics(&fleet, "prom-w1").await;
    let prom = Prometheus::start(&[("coordinator", coordinator), ("worker", worker)]).await;
    prom.until(r#"sum(up{job=~"coordinator|worker"})"#, 2.0)
        .await;

    // Four tasks succeed: Prometheus counts four.
    let tasks: Vec<Value> = (0..4).map(|_| json!({"command": ["true"]})).collect();
    let job = fleet.submit(&json!({"name": "four", "tasks": tasks})).await;
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    prom.until(r#"sum(gpufleet_tasks_ended_total{state="SUCCEEDED"})"#, 4.0)
        .await;
    prom.until(r#"sum(gpufleet_jobs{status="FINISHED:COMPLETED"})"#, 1.0)
        .await;
    prom.until(r#"sum(gpufleet_reservations_total{outcome="made"})"#, 4.0)
        .await;

    // While a task holds 3 GiB of the simulated GPU, the worker says so,
    // and the coordinator counts it running.
    let gates = tempfile::tempdir().unwrap();
    let gate = gates.path().join("go");
    let holder = fleet.submit(&gated_share(&gate)).await;
    fleet
        .wait_job(&holder, STEP, "the holder to run", |s| {
            s["tasks"][0]["state"] == "RUNNING"
        })
        .await;
    let held = (3u64 << 30) as f64;
    prom.until(
        r#"sum(gpufleet_worker_gpu_memory_used_bytes{worker="prom-w1", owner="tasks"})"#,
        held,
    )
    .await;
    assert!(prom
        .query(r#"sum(gpufleet_worker_gpu_memory_used_bytes{owner="tasks"})"#)
        .await
        .is_some_and(|v| v > 0.0));
    prom.until(r#"sum(gpufleet_tasks{state="RUNNING"})"#, 1.0)
        .await;
    prom.until(
        r#"sum(gpufleet_worker_running_tasks{worker="prom-w1"})"#,
        1.0,
    )
    .await;
    std::fs::write(&gate, "").unwrap();
    fleet.wait_finished(&holder, STEP).await;
    prom.until(
        r#"sum(gpufleet_worker_gpu_memory_used_bytes{owner="tasks"})"#,
        0.0,
    )
    .await;
    prom.until(r#"sum(gpufleet_tasks_ended_total{state="SUCCEEDED"})"#, 5.0)
        .await;
}

/// Every metric family the README lists, by program.
const COORDINATOR_METRICS: [&str; 17] = [
    "gpufleet_jobs",
    "gpufleet_tasks",
    "gpufleet_queue_length",
    "gpufleet_queue_oldest_wait_seconds",
    "gpufleet_workers",
    "gpufleet_coordinator_leader",
    "gpufleet_tasks_ended_total",
    "gpufleet_task_retries_total",
    "gpufleet_leases_lost_total",
    "gpufleet_reservations_total",
    "gpufleet_placement_seconds_bucket",
    "gpufleet_queue_wait_seconds_bucket",
    "gpufleet_schedule_pass_seconds_bucket",
    "gpufleet_jetstream_write_seconds_bucket",
    "gpufleet_api_requests_total",
    "gpufleet_api_errors_total",
    "gpufleet_input_backlog",
];

const WORKER_METRICS: [&str; 10] = [
    "gpufleet_worker_running_tasks",
    "gpufleet_worker_cpus",
    "gpufleet_worker_cpus_held",
    "gpufleet_worker_memory_bytes",
    "gpufleet_worker_memory_held_bytes",
    "gpufleet_worker_gpu_memory_used_bytes",
    "gpufleet_worker_gpu_memory_total_bytes",
    "gpufleet_worker_gpu_utilization_ratio",
    "gpufleet_worker_log_shipped_bytes_total",
    "gpufleet_worker_lease_renewal_seconds_bucket",
];

/// The sample lines of a scrape, by metric name.
fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_metric_is_served_in_openmetrics() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("list-w1").gpus("1x8GiB:T4"))
        .await;
    // Something to count: a task that prints, an error, a list.
    let job = fleet
        .submit(&json!({"tasks": [{"command": ["echo", "hello"]}]}))
        .await;
    fleet.wait_finished(&job, STEP).await;
    let client = fleet.client().await;
    let err = api(&client, subjects::JOBS_GET, &json!({"job_id": "nope"})).await;
    assert!(err.is_err());
    let coordinator = coordinator_metrics(&fleet).await;
    let worker = worker_metrics(&fleet, "list-w1").await;
    for (program, addr, names) in [
        ("coordinator", coordinator, &COORDINATOR_METRICS[..]),
        ("worker", worker, &WORKER_METRICS[..]),
    ] {
        let url = format!("http://{addr}/metrics");
        // The state-derived gauges are set on a scrape; the worker's log
        // counter once its output is shipped: read until all are there.
        let reply = eventually(STEP, &format!("every metric of the {program}"), || {
            let url = url.clone();
            async move {
                let r = http::get(&url).await.ok()?;
                let have = families(&r.body);
                names
                    .iter()
                    .all(|n| have.iter().any(|h| h == n))
                    .then_some(r)
            }
        })
        .await;
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("application/openmetrics-text")),
            "{program}: {:?}",
            reply.head
        );
        assert!(reply.body.trim_end().ends_with("# EOF"), "{program}");
        // No task or job ids in label values: cardinality stays bounded.
        assert!(
            !reply.body.contains(&job),
            "{program} exports a job id:\n{}",
            reply.body
        );
    }
}
