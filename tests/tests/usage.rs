//! What a task uses, measured by the real worker while it runs: in its
//! result event, in `jobs.get`, and shown by `gpufleet status` and
//! `gpufleet workers`.

use std::process::Command;
use std::time::Duration;

use gpufleet_schema::EventBody;
use gpufleet_testkit::{bin, Fleet, WorkerSpec};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(60);
const MIB: f64 = (1 << 20) as f64;

/// `gpufleet ARGS` against the fleet; its stdout.
fn gpufleet(fleet: &Fleet, args: &[&str]) -> String {
    let out = Command::new(bin("gpufleet"))
        .arg("--nats-url")
        .arg(fleet.url())
        .args(args)
        .output()
        .expect("run gpufleet");
    assert!(out.status.success(), "gpufleet {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Python that makes `mib` MiB resident (written, not only mapped) and
/// holds them `secs`.
fn allocate(mib: u64, secs: f64) -> String {
    format!("import time; b = bytearray(b'x') * ({mib} << 20); time.sleep({secs})")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_allocates_200_mib_reports_a_peak_rss_within_40_mib_of_it() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("use-w1")).await;
    let job = fleet
        .submit(
            &json!({"tasks": [{"command": ["python3", "-c", allocate(200, 1.5)],
            "resources": {"memory": "1GiB"}}]}),
        )
        .await;
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    let usage = &status["tasks"][0]["usage"];
    // The margin: the interpreter's own memory (about 10 MiB), and no
    // more; a peak below 200 MiB would mean the allocation went unseen.
    let peak = usage["peak_rss"].as_f64().expect("peak_rss") / MIB;
    assert!((200.0..240.0).contains(&peak), "peak {peak} MiB: {usage}");
    // Writing 200 MiB takes CPU; sleeping does not.
    let cpu = usage["cpu_seconds"].as_f64().expect("cpu_seconds");
    assert!(cpu > 0.0 && cpu < 1.5, "{usage}");
    assert!(
        usage["samples"].as_u64().unwrap() >= 2,
        "sampled while it ran: {usage}"
    );
    assert!(
        usage.get("gpu_memory_peak").is_none(),
        "a CPU task: {usage}"
    );
    // The result event carries the same figures.
    let events = fleet.events(&job).await;
    let reported = events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Result(o) => o.usage.clone(),
            _ => None,
        })
        .expect("usage in the result event");
    assert_eq!(reported.peak_rss.0 as f64 / MIB, peak);
    // `gpufleet status` shows it.
    let shown = gpufleet(&fleet, &["status", &job]);
    assert!(
        shown.contains("USAGE") && shown.contains("peak 2"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tasks_usage_shows_in_status_and_workers_with_simulated_gpu_figures() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("use-w2").gpus("1x24GiB:L4"))
        .await;
    let gates = tempfile::tempdir().unwrap();
    let gate = gates.path().join("go");
    let script = format!(
        "import os, time\nb = bytearray(b'x') * (64 << 20)\nwhile not os.path.exists({:?}): time.sleep(0.05)",
        gate.display().to_string()
    );
    let job = fleet
        .submit(
            &json!({"tasks": [{"name": "holder", "command": ["python3", "-c", script],
            "resources": {"gpu_memory": "2GiB", "cpus": 0.5}}]}),
        )
        .await;
    // Its worker's adverts bring the figures while it runs.
    let status = fleet
        .wait_job(&job, STEP, "usage of the running task", |s| {
            let u = &s["tasks"][0]["usage"];
            s["tasks"][0]["state"] == "RUNNING"
                && u["peak_rss"].as_f64().is_some_and(|p| p >= 64.0 * MIB)
                && u["gpu_memory_peak"].is_number()
        })
        .await;
    let u: &Value = &status["tasks"][0]["usage"];
    // Simulated GPUs: the task uses what was set aside for it, at 100%.
    assert_eq!(u["gpu_memory_peak"].as_u64(), Some(2 << 30), "{u}");
    assert_eq!(u["gpu_utilization_mean"].as_f64(), Some(100.0), "{u}");
    assert_eq!(u["gpu_simulated"], true, "{u}");
    let shown = gpufleet(&fleet, &["status", &job]);
    assert!(shown.contains("GPU 2 GiB 100% (sim)"), "{shown}");
    let workers = gpufleet(&fleet, &["workers"]);
    assert!(
        workers.contains("RUNNING TASK") && workers.contains(&format!("{job}-0")),
        "{workers}"
    );
    assert!(workers.contains("GPU 2 GiB 100% (sim)"), "{workers}");
    std::fs::write(&gate, "").unwrap();
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    let u = &status["tasks"][0]["usage"];
    assert_eq!(u["gpu_memory_peak"].as_u64(), Some(2 << 30), "{u}");
}
