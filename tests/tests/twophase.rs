//! Two-phase tasks (issue 16), end to end with a real server, coordinator
//! and worker with one simulated GPU: tasks load without a GPU, say so in
//! their control file, wait (saying why), and get the GPU on the same
//! worker, one at a time; their loading overlaps. Durations are not
//! asserted (a busy machine stretches them): the order of the phases is.
//! `gpufleet-bench twophase` measures the makespans.
//!
//! Every wait has a deadline and waits on something that happens.

use std::time::Duration;

use gpufleet_schema::EventBody;
use gpufleet_testkit::server::workspace_root;
use gpufleet_testkit::{Fleet, WorkerSpec};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(120);

/// A task that loads for `load` seconds, says it is ready, waits for its
/// GPU in its control file, then "trains" for `train` seconds; its result
/// says when each happened and what it was told.
fn two_phase(name: &str, load: u32, train: u32) -> Value {
    let script = format!(
        r#"t0=$(date +%s.%N); sleep {load}; t1=$(date +%s.%N); echo ready >> "$GPUFLEET_CONTROL"
while ! grep -q cuda_visible_devices "$GPUFLEET_CONTROL"; do sleep 0.05; done
t2=$(date +%s.%N); grant=$(grep cuda_visible_devices "$GPUFLEET_CONTROL")
sleep {train}; t3=$(date +%s.%N)
printf '{{"load":[%s,%s],"gpu":[%s,%s],"control":%s,"env_at_start":"%s"}}' "$t0" "$t1" "$t2" "$t3" "$grant" "$CUDA_VISIBLE_DEVICES" > "$GPUFLEET_RESULT""#
    );
    json!({
        "name": name,
        "command": ["sh", "-c", script],
        "timeout": "5m",
        "resources": {"gpus": 1, "cpus": 1},
        "load": {"cpus": 1},
    })
}

fn span(v: &Value) -> (f64, f64) {
    (v[0].as_f64().unwrap(), v[1].as_f64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_overlap_and_the_gpu_goes_to_each_loaded_task_in_turn() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("tp-w1").gpus("1x24GiB").cpus(8.0))
        .await;
    let tasks: Vec<Value> = (0..4).map(|i| two_phase(&format!("t{i}"), 2, 2)).collect();
    let job = fleet.submit(&json!({ "tasks": tasks })).await;
    // While one trains, the others say what they wait for.
    let waiting = fleet
        .wait_event(&job, STEP, "a task waiting for its GPU", |e| {
            matches!(&e.body, EventBody::State { reason: Some(r), .. }
                if r.starts_with("loaded; waiting for a GPU on tp-w1"))
        })
        .await;
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    let uuid = {
        let t = &status["tasks"][0];
        assert_eq!(t["gpus"].as_array().map(Vec::len), Some(1), "{t}");
        t["gpus"][0].clone()
    };

    let mut runs: Vec<((f64, f64), (f64, f64))> = Vec::new();
    for t in status["tasks"].as_array().unwrap() {
        assert_eq!(t["state"], "SUCCEEDED", "{t}");
        assert_eq!(t["worker"], "tp-w1");
        assert_eq!(t["gpus"], json!([uuid]), "the job's status names its GPU");
        let r = &t["result"];
        // It started without a GPU, and its control file named the one
        // it was given.
        assert_eq!(r["env_at_start"], "", "{r}");
        assert_eq!(r["control"]["cuda_visible_devices"], "0", "{r}");
        assert_eq!(r["control"]["gpus"][0]["index"], 0, "{r}");
        assert_eq!(r["control"]["gpus"][0]["uuid"], uuid, "{r}");
        runs.push((span(&r["load"]), span(&r["gpu"])));
    }
    runs.sort_by(|a, b| a.1 .0.total_cmp(&b.1 .0));
    for (i, (load, gpu)) in runs.iter().enumerate() {
        assert!(load.1 <= gpu.0, "task {i} had its GPU only after loading");
        if let Some((_, next)) = runs.get(i + 1) {
            // One GPU: its phases do not overlap (the next is granted
            // only once this one's lease is gone).
            assert!(gpu.1 <= next.0, "GPU phases overlap: {runs:?}");
        }
    }
    // The last to get the GPU loaded while the first still had it: its
    // load did not wait for a GPU.
    let (first_gpu, (last_load, _)) = (runs[0].1, runs[3]);
    assert!(
        last_load.1 < first_gpu.1,
        "the last task's load ended after the first task's GPU phase: {runs:?}"
    );
    let makespan = runs[3].1 .1 - runs.iter().map(|r| r.0 .0).fold(f64::MAX, f64::min);
    eprintln!(
        "two-phase: 4 tasks (load 2 s, train 2 s) on 1 GPU took {makespan:.1} s (sequential: 16 s); waited: {waiting:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_never_says_ready_runs_its_load_phase_to_the_end() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("tp-w2").gpus("1x24GiB"))
        .await;
    // Garbage and near misses in its control file do not count.
    let script = r#"printf 'readyy\n{"ready": false}\n\377\n' >> "$GPUFLEET_CONTROL"; echo "gpus=[$CUDA_VISIBLE_DEVICES]"; echo '{"loaded": "nothing"}' > "$GPUFLEET_RESULT""#;
    let job = fleet
        .submit(&json!({"tasks": [{
            "command": ["sh", "-c", script],
            "resources": {"gpus": 1},
            "load": {"cpus": 1},
        }]}))
        .await;
    let status = fleet.wait_finished(&job, STEP).await;
    let t = &status["tasks"][0];
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    assert_eq!(t["result"], json!({"loaded": "nothing"}));
    assert_eq!(t["gpus"], json!([]), "it never held a GPU: {t}");
}

/// The README's Python example, run as a two-phase task: it loads, gets
/// the GPU, and sets CUDA_VISIBLE_DEVICES from its control file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_example_sets_its_gpu_from_the_control_file() {
    let example = std::fs::read_to_string(workspace_root().join("examples/two_phase.py"))
        .expect("examples/two_phase.py");
    let shown = gpufleet_testkit::readme_python("\"\"\"A gpufleet two-phase task");
    assert_eq!(
        shown, example,
        "README's two-phase example differs from examples/two_phase.py"
    );
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("tp-w3").gpus("1x24GiB"))
        .await;
    let job = fleet
        .submit(&json!({"tasks": [{
            "command": ["python3", "-c", example],
            "resources": {"gpus": 1},
            "load": {"cpus": 1},
        }]}))
        .await;
    let line = fleet
        .wait_event(&job, STEP, "the example's training line", |e| {
            matches!(&e.body, EventBody::Log { text, .. } if text.contains("training on 1000 items"))
        })
        .await;
    let EventBody::Log { text, .. } = line.body else {
        unreachable!()
    };
    assert!(
        text.contains("CUDA_VISIBLE_DEVICES=0 (GPU-sim-tp-w3-0)"),
        "{text}"
    );
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
}

/// With roles, the worker trusts only the coordinator's key: a GPU grant
/// it did not sign would be refused and the task would wait to its
/// deadline; the coordinator's is held, and the task trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_roles_the_signed_gpu_grant_is_taken() {
    use gpufleet_testkit::secure::SecureFleet;
    let mut fleet = SecureFleet::start(&["tp-s1"], &["alice"], &[]).await;
    fleet.add_worker(WorkerSpec::new("tp-s1").gpus("1x24GiB"));
    fleet.wait_worker_listed("alice", "tp-s1").await;
    let file = fleet.dir().join("two_phase.json");
    std::fs::write(&file, json!({"tasks": [two_phase("t", 0, 0)]}).to_string()).unwrap();
    let reply = fleet
        .json("alice", &["submit", file.to_str().unwrap()])
        .await;
    let job = reply["job_id"].as_str().expect("a job id").to_string();
    let s = gpufleet_testkit::eventually(STEP, "the job to finish", || async {
        let s = fleet.json("alice", &["status", &job]).await;
        s["status"]
            .as_str()
            .is_some_and(|st| st.starts_with("FINISHED"))
            .then_some(s)
    })
    .await;
    assert_eq!(s["status"], "FINISHED:COMPLETED", "{s}");
    let r = &s["tasks"][0]["result"];
    assert_eq!(r["control"]["cuda_visible_devices"], "0", "{r}");
    assert_eq!(s["tasks"][0]["gpus"], json!(["GPU-sim-tp-s1-0"]), "{s}");
}
