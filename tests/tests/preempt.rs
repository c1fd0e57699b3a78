//! Stopping and restarting single tasks, end to end (real nats-server,
//! real coordinator and workers, simulated GPUs): one task cancelled while
//! the rest of its job runs on, and tasks run again by hand (`jobs.retry`),
//! also of a job that had finished.

use std::time::Duration;

use gpufleet_schema::subjects::{self, endpoint};
use gpufleet_testkit::wait::eventually;
use gpufleet_testkit::{api, open_to_tasks, task_states, Fleet, WorkerSpec};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

/// Calls `endpoint` on the subject without a user (roles are off).
async fn call(fleet: &Fleet, endpoint: &str, body: &Value) -> Result<Value, String> {
    api(
        &fleet.client().await,
        &subjects::api_for(None, endpoint),
        body,
    )
    .await
}

async fn cpu_fleet() -> Fleet {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w0").cpus(4.0)).await;
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_of_a_finished_job_is_retried_by_hand_and_the_job_reopens() {
    let fleet = cpu_fleet().await;
    let marks = fleet.dir().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    open_to_tasks(&marks);
    // `flaky` fails the first time it runs (a FAILED exit is not retried
    // on its own), then succeeds.
    let flaky = format!(
        "if [ -e {m}/ran ]; then exit 0; fi; touch {m}/ran; exit 3",
        m = marks.display()
    );
    let job = fleet
        .submit(&json!({
            "max_retries": 0,
            "tasks": [
                {"name": "ok", "command": ["true"], "resources": {"cpus": 0.1}},
                {"name": "flaky", "command": ["sh", "-c", flaky], "resources": {"cpus": 0.1}},
            ],
        }))
        .await;
    let done = fleet.wait_finished(&job, DEADLINE).await;
    assert_eq!(done["status"], "FINISHED:EXECUTION_EXCEPTION", "{done}");

    // Just finished, its record may still be on its way to the done
    // records: the coordinator says so (503) and a client asks again.
    let reopened = eventually(DEADLINE, "the retry to be taken", || async {
        match call(&fleet, endpoint::JOBS_RETRY, &json!({"job_id": job})).await {
            Ok(v) => Some(v),
            Err(e) if e.starts_with("503") => None,
            Err(e) => panic!("retry: {e}"),
        }
    })
    .await;
    let status = reopened["status"].as_str().unwrap();
    assert!(
        status == "RUNNING" || status == "QUEUED" || status == "DISPATCHED",
        "a retried finished job is open again: {reopened}"
    );
    assert_eq!(task_states(&reopened)[0], "SUCCEEDED", "{reopened}");
    let done = fleet.wait_finished(&job, DEADLINE).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done}");
    let flaky = &done["tasks"][1];
    assert_eq!(flaky["attempt"], 2, "the retry is a new attempt: {done}");
    assert_eq!(
        done["tasks"][0]["attempt"], 1,
        "what succeeded stays: {done}"
    );

    // Nothing is left to retry now, and a task it does not have is not
    // found.
    let none = call(&fleet, endpoint::JOBS_RETRY, &json!({"job_id": job})).await;
    assert!(
        none.as_ref().is_err_and(|e| e.starts_with("409")),
        "{none:?}"
    );
    let missing = call(
        &fleet,
        endpoint::JOBS_RETRY,
        &json!({"job_id": job, "task": "nope"}),
    )
    .await;
    assert!(
        missing.as_ref().is_err_and(|e| e.starts_with("404")),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_cancelled_while_the_rest_runs_then_retried_alone() {
    let fleet = cpu_fleet().await;
    // `long` runs for a minute on its first attempt only.
    let job = fleet
        .submit(&json!({
            "tasks": [
                {"name": "long", "command": ["sh", "-c", "[ \"$GPUFLEET_ATTEMPT\" = 1 ] && exec sleep 60; exit 0"], "resources": {"cpus": 0.1}},
                {"name": "short", "command": ["sleep", "2"], "resources": {"cpus": 0.1}},
            ],
        }))
        .await;
    fleet
        .wait_job(&job, DEADLINE, "both tasks to run", |s| {
            task_states(s) == ["RUNNING", "RUNNING"]
        })
        .await;
    let reply = call(
        &fleet,
        endpoint::JOBS_CANCEL,
        &json!({"job_id": job, "task": "long"}),
    )
    .await
    .expect("cancel one task");
    assert_eq!(reply["job_id"], job.as_str());
    let s = fleet
        .wait_job(&job, DEADLINE, "long to be cancelled", |s| {
            task_states(s)[0] == "CANCELLED"
        })
        .await;
    assert_ne!(s["status"], "FINISHED:ABORTED", "the job goes on: {s}");
    let done = fleet.wait_finished(&job, DEADLINE).await;
    assert_eq!(task_states(&done), ["CANCELLED", "SUCCEEDED"], "{done}");
    assert_eq!(done["status"], "FINISHED:EXECUTION_EXCEPTION", "{done}");
    assert_eq!(
        done["error_count"].as_u64().unwrap_or(0),
        0,
        "a cancel is no error: {done}"
    );

    eventually(DEADLINE, "the retry of long to be taken", || async {
        let body = json!({"job_id": job, "task": "long"});
        match call(&fleet, endpoint::JOBS_RETRY, &body).await {
            Ok(_) => Some(()),
            Err(e) if e.starts_with("503") => None,
            Err(e) => panic!("retry: {e}"),
        }
    })
    .await;
    let done = fleet.wait_finished(&job, DEADLINE).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done}");
    assert_eq!(done["tasks"][0]["attempt"], 2, "{done}");
    assert_eq!(done["tasks"][1]["attempt"], 1, "{done}");
}
