//! What a job or a request may be, and what the stores hold (issue 11),
//! against a real fleet: requests that cannot be stored or run are refused
//! naming the field, the largest job runs and a restart reruns nothing,
//! every malformed request is answered, only the coordinator creates the
//! stores (a fleet started at once on a fresh cluster comes up clean), and
//! finished jobs can be deleted.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::{create_stores, Setup};
use gpufleet_schema::spec::MAX_TASKS_PER_JOB;
use gpufleet_schema::{subjects, EventBody, JobId, TaskState};
use gpufleet_testkit::fleet::COORDINATOR_TEST_CONFIG;
use gpufleet_testkit::{
    api, bin, coordinator_config, eventually, spawn_coordinator, spawn_plain_worker,
    wait_workers_listed, with_deadline, Fleet, NatsCluster, NatsServer, Proc, WorkerSpec,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

/// Runs the command line on the fleet; returns its stdout, failing the test
/// if it fails.
fn gpufleet(fleet: &Fleet, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(bin("gpufleet"))
        .args(["--nats-url", &fleet.url()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gpufleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

async fn refused(fleet: &Fleet, job: Value) -> String {
    let client = fleet.client().await;
    api(&client, subjects::JOBS_SUBMIT, &job)
        .await
        .expect_err("the job was accepted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_stored_or_run_is_refused_naming_the_field() {
    let fleet = Fleet::start().await;
    // Used to pass and then panic the worker adding it to a clock.
    let e = refused(
        &fleet,
        json!({"tasks": [{"command": ["true"], "timeout": 18446744073709551615u64}]}),
    )
    .await;
    assert!(e.starts_with("400: tasks[0].timeout: at most"), "{e}");
    // Used to be accepted, its task id `<id>-0` over the limit: it never ran.
    let e = refused(
        &fleet,
        json!({"id": "j".repeat(128), "tasks": [{"command": ["true"]}]}),
    )
    .await;
    assert!(
        e.starts_with("400: id: invalid job id") && e.contains("task ids"),
        "{e}"
    );
    let e = refused(
        &fleet,
        json!({"tasks": [{"command": ["true"], "resources": {"cpus": 0}}]}),
    )
    .await;
    assert!(e.starts_with("400: tasks[0].resources.cpus"), "{e}");
    let e = refused(
        &fleet,
        json!({"tasks": [{"command": ["true"], "env": {"A\r\nB": "1"}}]}),
    )
    .await;
    assert!(e.contains("control characters"), "{e}");
    // A task too large for one stored message: 413, naming the limit.
    let big = "x".repeat(120_000);
    let e = refused(
        &fleet,
        json!({"tasks": [{"command": ["true", big, big, big]}]}),
    )
    .await;
    assert!(e.starts_with("413: ") && e.contains("max_payload"), "{e}");
    // The longest id that fits is taken.
    let id = "j".repeat(gpufleet_schema::ids::MAX_JOB_ID_LEN);
    let client = fleet.client().await;
    let ok = api(
        &client,
        subjects::JOBS_SUBMIT,
        &json!({"id": id, "tasks": [{"command": ["true"]}]}),
    )
    .await
    .unwrap();
    assert_eq!(ok["job_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_huge_field_name_gets_its_error_reply() {
    let fleet = Fleet::start().await;
    let client = fleet.client().await;
    for subject in [
        subjects::JOBS_SUBMIT,
        subjects::JOBS_GET,
        subjects::JOBS_LIST,
        subjects::WORKERS_LIST,
    ] {
        let body = format!(r#"{{"{}": 1}}"#, "f".repeat(300_000));
        let reply = with_deadline(
            Duration::from_secs(20),
            "the error reply",
            client.request(subject.to_string(), Bytes::from(body)),
        )
        .await
        .unwrap();
        let headers = reply.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "400"
        );
        assert_eq!(
            headers.get("Nats-Service-Error").unwrap().as_str(),
            "bad request"
        );
        assert!(reply.payload.len() < 4096, "{}", reply.payload.len());
        let err: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert!(
            err["error"].as_str().unwrap().contains("unknown field"),
            "{err}"
        );
    }
    // `null` is JSON, and is answered in JSON.
    let reply = client
        .request(
            subjects::JOBS_SUBMIT.to_string(),
            Bytes::from_static(b"null"),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.headers.unwrap().get("Content-Type").unwrap().as_str(),
        "application/json"
    );
    serde_json::from_slice::<Value>(&reply.payload).unwrap();
}

/// The task states and RUNNING events (attempt, count) of a job, from its
/// events.
async fn attempts(fleet: &Fleet, job: &str) -> Vec<(String, u32, TaskState)> {
    let mut out = Vec::new();
    for ev in fleet.events(job).await {
        if let EventBody::State { state, .. } = ev.body {
            out.push((ev.task_id.to_string(), ev.attempt, state));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_job_runs_and_a_restart_reruns_nothing() {
    // Hundreds of tasks at once on each worker, each renewing its lease:
    // the production lease and advert TTLs keep a write confirmed late on
    // a loaded machine from fencing them (a retry would then be the
    // fence's doing, not the restart's).
    let mut fleet = Fleet::start_with(&[("lease_ttl", "\"30s\"")]).await;
    for w in ["w1", "w2"] {
        fleet
            .add_worker(WorkerSpec::new(w).cpus(64.0).advert_ttl("10s"))
            .await;
    }
    let tasks: Vec<Value> = (0..MAX_TASKS_PER_JOB)
        .map(|_| json!({"command": ["true"], "resources": {"cpus": 0.1}}))
        .collect();
    let job = fleet.submit(&json!({"name": "big", "tasks": tasks})).await;
    // Half way, the coordinator is killed and started again.
    fleet
        .wait_job(&job, T, "a thousand tasks to succeed", |s| {
            s["counts"]["succeeded"].as_u64().unwrap_or(0) >= 1000
        })
        .await;
    fleet.coordinator.as_mut().unwrap().kill9();
    fleet.start_coordinator().await;
    let done = fleet.wait_finished(&job, Duration::from_secs(600)).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{}", done["reason"]);
    assert_eq!(done["counts"]["succeeded"], MAX_TASKS_PER_JOB as u64);

    // Every task ran once, as attempt 1: nothing was run again.
    let states = attempts(&fleet, &job).await;
    let mut running = std::collections::HashMap::new();
    for (task, attempt, state) in &states {
        assert_eq!(*attempt, 1, "{task} ran as attempt {attempt}");
        if *state == TaskState::Running {
            *running.entry(task.clone()).or_insert(0) += 1;
        }
    }
    // A task that ends within the worker's `running_event_after` sends no
    // RUNNING event, so each task has at most one, and every task a state.
    let tasks: std::collections::HashSet<_> = states.iter().map(|(t, _, _)| t).collect();
    assert_eq!(tasks.len(), MAX_TASKS_PER_JOB);
    assert!(running.values().all(|n| *n == 1), "a task ran twice");

    // `gpufleet status` shows all of it (the reply comes in pages).
    let out = gpufleet(&fleet, &["status", &job, "--json"]);
    let status: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(status["tasks"].as_array().unwrap().len(), MAX_TASKS_PER_JOB);
}

async fn stream_names(url: &str) -> Vec<String> {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let mut names = js.stream_names();
    let mut out = Vec::new();
    while let Some(n) = names.next().await {
        out.push(n.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_first_creates_no_store_and_waits_for_the_coordinator() {
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let worker = spawn_plain_worker(&url, "early", dir.path(), &[]);
    eventually(T, "the worker to say it waits", || async {
        worker
            .output()
            .contains("waiting for the coordinator to create the stores")
            .then_some(())
    })
    .await;
    assert!(
        stream_names(&url).await.is_empty(),
        "a worker created stores"
    );
    let _coordinator = spawn_coordinator(&url, dir.path(), COORDINATOR_TEST_CONFIG);
    let client = async_nats::connect(url.clone()).await.unwrap();
    wait_workers_listed(&client, 1, "the worker to be listed").await;
    assert_eq!(stream_names(&url).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_says_where_existing_stores_differ_from_its_settings() {
    let server = NatsServer::start();
    // Made earlier with other limits (1 GiB of events; the rest small, as
    // the server reserves what every store may hold).
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let earlier = Setup {
        jobs_max_bytes: 256 << 20,
        artifacts_max_bytes: 512 << 20,
        ..Setup::default()
    };
    with_deadline(T, "the stores", create_stores(&js, &earlier))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = spawn_coordinator(&server.url(), dir.path(), COORDINATOR_TEST_CONFIG);
    eventually(T, "the coordinator to name the difference", || async {
        let out = coordinator.output();
        out.contains("stream GPUFLEET_EVENTS: max_bytes is 1GiB, the settings say 256MiB")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_started_at_once_on_a_fresh_cluster_comes_up_clean_ten_times() {
    let config = coordinator_config(&[("replicas", "3")]);
    let started = Instant::now();
    for round in 0..10 {
        let cluster = NatsCluster::start();
        let url = cluster.url();
        let dirs = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let coordinator = spawn_coordinator(&url, dirs.path(), &config);
        let workers: Vec<Proc> = ["w1", "w2"]
            .iter()
            .map(|w| spawn_plain_worker(&url, w, dirs.path(), &[]))
            .collect();
        let client = gpufleet_natsutil::connect(&url, &Default::default(), "test", T)
            .await
            .unwrap();
        wait_workers_listed(
            &client,
            2,
            &format!("round {round}: both workers to be listed"),
        )
        .await;
        let up = t0.elapsed();
        let js = jetstream::new(client.clone());
        for name in [
            subjects::kv_stream(subjects::WORKERS_BUCKET),
            subjects::kv_stream(subjects::LEASES_BUCKET),
            subjects::kv_stream(subjects::JOBS_BUCKET),
            subjects::EVENTS_STREAM.to_string(),
            subjects::ARTIFACTS_STREAM.to_string(),
        ] {
            let info = js
                .get_stream(&name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .clone();
            assert_eq!(
                info.config.num_replicas, 3,
                "round {round}: {name} has {} replicas",
                info.config.num_replicas
            );
        }
        // Nobody gave up on the way.
        let mut all = workers;
        all.push(coordinator);
        for p in &mut all {
            assert!(
                p.wait_exit(Duration::ZERO).is_none(),
                "round {round}: a program exited:\n{}",
                p.output()
            );
        }
        eprintln!("round {round}: the fleet was up in {up:?}");
    }
    eprintln!("ten fresh clusters in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_can_be_deleted_and_an_unfinished_one_cannot() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let client = fleet.client().await;
    let waiting = fleet
        .submit(&json!({"tasks": [{"command": ["true"], "resources": {"cpus": 999}}]}))
        .await;
    let e = api(&client, subjects::JOBS_DELETE, &json!({"job_id": waiting}))
        .await
        .unwrap_err();
    assert!(
        e.starts_with("409: ") && e.contains("cancel it first"),
        "{e}"
    );

    let job = fleet
        .submit(&json!({"tasks": [{"command": ["echo", "hello"]}]}))
        .await;
    fleet.wait_finished(&job, T).await;
    assert!(!fleet.events(&job).await.is_empty());
    // The CLI's delete.
    gpufleet(&fleet, &["delete", &job]);
    let e = api(&client, subjects::JOBS_GET, &json!({"job_id": job}))
        .await
        .unwrap_err();
    assert!(e.starts_with("404: "), "{e}");
    assert!(fleet.events(&job).await.is_empty(), "its events stay");
    let listed = api(&client, subjects::JOBS_LIST, &json!({})).await.unwrap();
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["job_id"] == job.as_str()),
        "still listed"
    );
    // Gone from the bucket: a resubmit of its id makes a new job.
    let again = api(
        &client,
        subjects::JOBS_SUBMIT,
        &json!({"id": JobId::new(&job).unwrap(), "tasks": [{"command": ["true"]}]}),
    )
    .await
    .unwrap();
    assert_eq!(again["created"], true);
}
