//! The worker's NVML path without a GPU: real `gpufleet-worker` processes
//! load a stand-in `libnvidia-ml.so.1` (tests/nvml-stub, built by the test
//! kit) through nvml-wrapper exactly as on a GPU machine, found on
//! `LD_LIBRARY_PATH`, and the test changes what it reports while they run:
//! GPUs and their memory, processes on them (foreign ones, and our own
//! tasks by pid), a driver that will not start, a library that is broken.
//!
//! Every wait is on something that happens (an advert, a job state, a file
//! a task wrote, a log line), each with a deadline.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use gpufleet_testkit::nvml::{broken_dir, NvmlTable, StubGpu, StubProcess};
use gpufleet_testkit::{eventually, Fleet, WorkerSpec};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

async fn wait_file(path: &Path) -> String {
    let p = path.to_path_buf();
    eventually(T, &format!("{} to be written", path.display()), || {
        let p = p.clone();
        async move { std::fs::read_to_string(&p).ok().filter(|s| !s.is_empty()) }
    })
    .await
}

fn gpu<'a>(advert: &'a Value, uuid: &str) -> &'a Value {
    advert["gpus"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["uuid"] == uuid))
        .unwrap_or_else(|| panic!("no GPU {uuid} in {advert:#}"))
}

fn bytes(v: &Value) -> u64 {
    // ByteSize travels as a number of bytes in JSON.
    v.as_u64()
        .unwrap_or_else(|| panic!("{v} is not a number of bytes"))
}

/// A fleet with one worker `w1` on the stand-in NVML, reporting `gpus`.
async fn fleet_on_stub(gpus: Vec<StubGpu>) -> (Fleet, NvmlTable) {
    let mut fleet = Fleet::start().await;
    let table = NvmlTable::new(&fleet.dir().join("nvml-table"), gpus);
    table.write();
    fleet
        .add_worker(WorkerSpec::new("w1").env(table.worker_env()))
        .await;
    (fleet, table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_the_driver_reports_are_advertised_and_given_to_tasks_by_index_and_uuid() {
    let mut a100 = StubGpu::new(
        0,
        "GPU-1b2c3d4e-0000-4000-8000-00000000a100",
        "NVIDIA A100-SXM4-80GB",
        80 * GIB,
    );
    a100.utilization = 37;
    a100.temperature = 55;
    let l4 = StubGpu::new(
        1,
        "GPU-1b2c3d4e-0000-4000-8000-0000000000l4",
        "NVIDIA L4",
        24 * GIB,
    );
    let (fleet, _table) = fleet_on_stub(vec![a100.clone(), l4.clone()]).await;

    let advert = fleet
        .wait_advert("w1", "an advert with both GPUs", |a| {
            a["gpus"].as_array().is_some_and(|g| g.len() == 2)
        })
        .await;
    assert_eq!(advert["driver_version"], "550.54.15");
    for (want, index) in [(&a100, 0), (&l4, 1)] {
        let g = gpu(&advert, &want.uuid);
        assert_eq!(g["index"], index);
        assert_eq!(g["model"], want.name.as_str());
        assert_eq!(bytes(&g["memory_total"]), want.total);
        assert_eq!(bytes(&g["memory_used"]), 0);
        assert_eq!(bytes(&g["memory_free"]), want.total);
        assert_eq!(bytes(&g["memory_unmanaged"]), 0);
        assert_eq!(g["utilization"], want.utilization);
        assert_eq!(g["temperature"], want.temperature);
        assert_eq!(g["simulated"], false, "{g:#}");
    }

    // A task asking for a GPU of at least 40 GiB gets the A100, named as
    // CUDA and NVML name it.
    // Where the task writes what it saw ($CTL).
    let ctl = fleet.dir().to_path_buf();
    let id = fleet
        .submit(&json!({"id": "nv-env", "tasks": [{
            "command": ["sh", "-c", r#"echo "$CUDA_VISIBLE_DEVICES $GPUFLEET_GPUS" > "$CTL/seen.tmp" && mv "$CTL/seen.tmp" "$CTL/seen""#],
            "env": {"CTL": ctl},
            "resources": {"gpus": 1, "gpu_memory": "40GiB"}}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let seen = wait_file(&ctl.join("seen")).await;
    assert_eq!(seen.trim(), format!("0 {}", a100.uuid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_foreign_process_uses_is_not_given_out_until_it_goes_away() {
    let (fleet, mut table) = fleet_on_stub(vec![StubGpu::new(
        0,
        "GPU-foreign-0",
        "NVIDIA L4",
        24 * GIB,
    )])
    .await;
    fleet
        .wait_advert("w1", "an advert with the GPU", |a| {
            a["gpus"][0]["uuid"] == "GPU-foreign-0"
        })
        .await;

    // Someone else's training run (this test process: it is no task of the
    // worker's) takes 20 GiB of the GPU.
    let stranger = std::process::id();
    table.processes = vec![StubProcess::new(0, stranger, 20 * GIB)];
    table.write();
    let a = fleet
        .wait_advert("w1", "the stranger's memory in the advert", |a| {
            a["gpus"][0]["memory_unmanaged"] == 20 * GIB
        })
        .await;
    assert_eq!(bytes(&a["gpus"][0]["memory_used"]), 20 * GIB);
    assert_eq!(bytes(&a["gpus"][0]["memory_free"]), 4 * GIB);

    // Neither a share nor a whole GPU that needs 8 GiB is given out: both
    // wait, saying why.
    let share = fleet
        .submit(&json!({"id": "nv-share", "tasks": [{"command": ["true"],
            "resources": {"gpus": 0, "gpu_memory": "8GiB"}}]}))
        .await;
    let whole = fleet
        .submit(&json!({"id": "nv-whole", "tasks": [{"command": ["true"],
            "resources": {"gpus": 1, "gpu_memory": "8GiB"}}]}))
        .await;
    for id in [&share, &whole] {
        let waiting = fleet
            .wait_job(id, T, "a reason to wait", |s| s["reason"].is_string())
            .await;
        assert_eq!(waiting["status"], "QUEUED", "{waiting:#}");
        let reason = waiting["reason"].as_str().unwrap();
        assert!(reason.contains("free GPU memory"), "{id}: {reason}");
    }

    // The stranger leaves: the GPU is given again, to both in turn.
    table.processes.clear();
    table.write();
    for id in [&share, &whole] {
        let done = fleet.wait_finished(id, T).await;
        assert_eq!(done["status"], "FINISHED:COMPLETED", "{done:#}");
    }
    let a = fleet
        .wait_advert("w1", "the GPU free again", |a| {
            a["gpus"][0]["memory_unmanaged"] == 0
        })
        .await;
    assert_eq!(bytes(&a["gpus"][0]["memory_free"]), 24 * GIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_memory_our_own_tasks_use_is_theirs_not_someone_elses() {
    let (fleet, mut table) =
        fleet_on_stub(vec![StubGpu::new(0, "GPU-ours-0", "NVIDIA L4", 24 * GIB)]).await;
    let ctl = fleet.dir().to_path_buf();
    // The CUDA process is a child of the task's shell (as under torchrun):
    // what the worker must recognise is its whole process tree.
    let script = r#"sleep 600 & echo $! > "$CTL/pid.tmp" && mv "$CTL/pid.tmp" "$CTL/pid"; wait"#;
    let holder = fleet
        .submit(
            &json!({"id": "nv-holder", "tasks": [{"command": ["sh", "-c", script],
            "env": {"CTL": ctl},
            "resources": {"gpus": 0, "gpu_memory": "10GiB"}}]}),
        )
        .await;
    let pid: u32 = wait_file(&ctl.join("pid")).await.trim().parse().unwrap();

    // Our task uses 9 GiB of its 10; a stranger 5 GiB.
    let stranger = std::process::id();
    table.processes = vec![
        StubProcess::new(0, pid, 9 * GIB),
        StubProcess::new(0, stranger, 5 * GIB),
    ];
    table.write();
    let a = fleet
        .wait_advert("w1", "the task's and the stranger's memory", |a| {
            a["gpus"][0]["memory_used"] == 14 * GIB
        })
        .await;
    assert_eq!(
        bytes(&a["gpus"][0]["memory_unmanaged"]),
        5 * GIB,
        "only the stranger's memory is someone else's: {a:#}"
    );

    // 24 GiB less the stranger's 5 and our task's 10: 9 GiB can still be
    // shared out. Had the task's 9 GiB been counted as a stranger's, only
    // 24 - 14 - 10 = 0 would be left and this would wait.
    let second = fleet
        .submit(&json!({"id": "nv-second", "tasks": [{"command": ["true"],
            "resources": {"gpus": 0, "gpu_memory": "9GiB"}}]}))
        .await;
    let done = fleet.wait_finished(&second, T).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done:#}");

    let client = fleet.client().await;
    gpufleet_testkit::api(
        &client,
        "gpufleet.api.jobs.cancel",
        &json!({"job_id": holder}),
    )
    .await
    .unwrap();
    fleet.wait_finished(&holder, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_broken_nvml_means_no_gpus_with_a_warning_and_cpu_work_still_runs() {
    let mut fleet = Fleet::start().await;
    let empty = fleet.dir().join("no-nvml");
    std::fs::create_dir_all(&empty).unwrap();
    // The driver is installed but not running: nvmlInit_v2 says so.
    let mut not_loaded = NvmlTable::new(
        &fleet.dir().join("not-loaded"),
        vec![StubGpu::new(0, "GPU-never", "NVIDIA L4", 24 * GIB)],
    );
    not_loaded.init_code = 9; // NVML_ERROR_DRIVER_NOT_LOADED
    not_loaded.write();
    let cases = [
        (
            "missing",
            vec![("LD_LIBRARY_PATH".to_string(), empty.display().to_string())],
        ),
        (
            "broken",
            vec![(
                "LD_LIBRARY_PATH".to_string(),
                broken_dir().display().to_string(),
            )],
        ),
        ("notloaded", not_loaded.worker_env()),
    ];
    for (name, env) in &cases {
        fleet
            .add_worker(WorkerSpec::new(name).env(env.iter().cloned()))
            .await;
    }
    for (name, _) in &cases {
        let a = fleet
            .wait_advert(name, "its advert", |a| a["name"] == *name)
            .await;
        assert_eq!(a["gpus"], json!([]), "{name}: {a:#}");
        let log = fleet.worker(name).output();
        assert!(
            log.contains("NVML is not available: this worker offers no GPUs"),
            "{name}: {log}"
        );
        let id = fleet
            .submit(&json!({"tasks": [{"command": ["true"]}],
                "constraints": {"workers": [name]}}))
            .await;
        let done = fleet.wait_finished(&id, T).await;
        assert_eq!(done["status"], "FINISHED:COMPLETED", "{name}: {done:#}");
    }
    // Each says why in its own words.
    let log = |n: &str| {
        fleet
            .workers
            .iter()
            .find(|(w, _)| w == n)
            .unwrap()
            .1
            .output()
    };
    assert!(
        log("missing").contains("libnvidia-ml.so.1"),
        "{}",
        log("missing")
    );
    assert!(log("broken").contains("nvmlInit_v2"), "{}", log("broken"));
    assert!(log("notloaded").contains("driver"), "{}", log("notloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_the_driver_gives_to_no_listed_process_counts_as_someone_elses() {
    // GPU 0: 6 GiB used by no process the driver lists (a process in
    // another PID namespace). GPU 1: a stranger whose memory the driver
    // gives as "not available". GPU 2: no process list at all.
    let mut unlisted = StubGpu::new(0, "GPU-unlisted", "NVIDIA L4", 24 * GIB);
    unlisted.used_other = 6 * GIB;
    let hidden = StubGpu::new(1, "GPU-hidden", "NVIDIA L4", 24 * GIB);
    let mut no_list = StubGpu::new(2, "GPU-nolist", "NVIDIA L4", 24 * GIB);
    no_list.no_processes = true;
    no_list.used_other = 10 * GIB;
    let (fleet, mut table) = fleet_on_stub(vec![unlisted, hidden, no_list]).await;
    let mut stranger = StubProcess::new(1, std::process::id(), 20 * GIB);
    stranger.memory_hidden = true;
    table.processes = vec![stranger];
    table.write();
    let a = fleet
        .wait_advert("w1", "the stranger on GPU 1", |a| {
            a["gpus"].as_array().is_some_and(|g| g.len() == 3)
                && a["gpus"][1]["memory_used"] == 20 * GIB
        })
        .await;
    for (uuid, want) in [
        ("GPU-unlisted", 6 * GIB),
        ("GPU-hidden", 20 * GIB),
        ("GPU-nolist", 10 * GIB),
    ] {
        let g = gpu(&a, uuid);
        assert_eq!(bytes(&g["memory_unmanaged"]), want, "{g:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_that_falls_off_the_bus_leaves_the_advert_with_one_warning_and_comes_back() {
    let (fleet, mut table) = fleet_on_stub(vec![
        StubGpu::new(0, "GPU-steady", "NVIDIA L4", 24 * GIB),
        StubGpu::new(1, "GPU-flaky", "NVIDIA L4", 24 * GIB),
    ])
    .await;
    let client = fleet.client().await;
    let two = |a: &Value| a["gpus"].as_array().is_some_and(|g| g.len() == 2);
    fleet.wait_advert("w1", "both GPUs", two).await;

    table.gpus[1].lost = true;
    table.write();
    let a = fleet
        .wait_advert("w1", "the lost GPU gone", |a| {
            a["gpus"].as_array().is_some_and(|g| g.len() == 1)
        })
        .await;
    assert_eq!(a["gpus"][0]["uuid"], "GPU-steady");
    // Several heartbeats later, still one warning about it, not one each.
    let mut beats = client.subscribe("$KV.gpufleet-workers.w1").await.unwrap();
    for _ in 0..3 {
        gpufleet_testkit::with_deadline(T, "a heartbeat", beats.next())
            .await
            .expect("heartbeats go on");
    }
    let log = fleet.workers[0].1.output();
    assert_eq!(log.matches("NVML cannot read a GPU").count(), 1, "{log}");
    assert!(log.contains("GPU 1"), "{log}");

    table.gpus[1].lost = false;
    table.write();
    fleet.wait_advert("w1", "the GPU back", two).await;
    let log = fleet.workers[0].1.output();
    assert!(log.contains("NVML reads every GPU again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_gpu_memory_and_utilisation_are_read_from_nvml_per_process() {
    let mut l4 = StubGpu::new(0, "GPU-usage-0", "NVIDIA L4", 24 * GIB);
    l4.utilization = 40;
    let (fleet, mut table) = fleet_on_stub(vec![l4]).await;
    let ctl = fleet.dir().to_path_buf();
    // The CUDA process is the task's shell's child, as under torchrun.
    let script = r#"sleep 600 & echo $! > "$CTL/pid.tmp" && mv "$CTL/pid.tmp" "$CTL/pid"; wait"#;
    let job = fleet
        .submit(
            &json!({"id": "nv-usage", "tasks": [{"command": ["sh", "-c", script],
            "env": {"CTL": ctl},
            "resources": {"gpus": 0, "gpu_memory": "10GiB"}}]}),
        )
        .await;
    let pid: u32 = wait_file(&ctl.join("pid")).await.trim().parse().unwrap();
    let usage_is = |gib: u64| {
        move |s: &Value| s["tasks"][0]["usage"]["gpu_memory_peak"].as_u64() == Some(gib * GIB)
    };
    // The task's process uses 6 GiB, then 8, then 3; a stranger 5 all along.
    let stranger = std::process::id();
    let mut peak = 0;
    for gib in [6, 8, 3] {
        peak = peak.max(gib);
        table.processes = vec![
            StubProcess::new(0, pid, gib * GIB),
            StubProcess::new(0, stranger, 5 * GIB),
        ];
        table.write();
        fleet
            .wait_job(
                &job,
                T,
                &format!("a GPU peak of {peak} GiB"),
                usage_is(peak),
            )
            .await;
        // The stranger's memory is never the task's.
        let a = fleet
            .wait_advert("w1", "the new reading", |a| {
                a["gpus"][0]["memory_used"] == (gib + 5) * GIB
            })
            .await;
        assert_eq!(bytes(&a["gpus"][0]["memory_unmanaged"]), 5 * GIB, "{a:#}");
    }
    let running = fleet.get(&job).await;
    let u = &running["tasks"][0]["usage"];
    assert_eq!(u["gpu_utilization_mean"].as_f64(), Some(40.0), "{u}");
    assert!(
        u.get("gpu_simulated").is_none(),
        "real (stand-in) GPUs: {u}"
    );

    let client = fleet.client().await;
    gpufleet_testkit::api(&client, "gpufleet.api.jobs.cancel", &json!({"job_id": job}))
        .await
        .unwrap();
    let done = fleet.wait_finished(&job, T).await;
    // The result keeps the peak; the sampler saw the task's processes.
    assert_eq!(
        done["tasks"][0]["usage"]["gpu_memory_peak"].as_u64(),
        Some(8 * GIB),
        "{done:#}"
    );
}
