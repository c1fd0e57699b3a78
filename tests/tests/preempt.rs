//! Stopping and restarting tasks, end to end (real nats-server, real
//! coordinator and workers, simulated GPUs): an urgent job preempts a
//! preemptible one, which saves its work and resumes from it; one task
//! cancelled while the rest of its job runs on; tasks run again by hand
//! (`jobs.retry`), also of a job that had finished.

use std::time::Duration;

use gpufleet_schema::subjects::{self, endpoint};
use gpufleet_schema::{EventBody, TaskState};
use gpufleet_testkit::wait::eventually;
use gpufleet_testkit::{api, open_to_tasks, state_events, task_states, Fleet, WorkerSpec};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_job_preempts_one_that_checkpoints_and_resumes_without_spending_a_retry() {
    // Anyone (roles are off: user `default`) may preempt up to priority 10.
    let mut fleet = Fleet::start_with(&[("scheduling.users.default.preempt_priority", "10")]).await;
    fleet
        .add_worker(WorkerSpec::new("w0").gpus("1x24GiB:L4").cpus(4.0))
        .await;
    let dir = fleet.dir().join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    open_to_tasks(&dir);
    // Told to stop, it saves its work (and the inbox line that said so),
    // takes a moment over it, and exits; run again, it resumes from it.
    let train = format!(
        r#"d={d}
if [ -e $d/ckpt ]; then cp $d/ckpt $d/resumed; echo resumed; exit 0; fi
trap 'grep gpufleet.preempted "$GPUFLEET_INBOX" > $d/ckpt; echo step=42 >> $d/ckpt; sleep 1; exit 0' TERM
echo training
while :; do sleep 0.1; done"#,
        d = dir.display()
    );
    let low = fleet
        .submit(&json!({
            "name": "low", "priority": 0, "preemptible": true, "max_retries": 0,
            "tasks": [{"command": ["sh", "-c", train], "resources": {"gpus": 1, "cpus": 0.1}}],
        }))
        .await;
    fleet
        .wait_job(&low, DEADLINE, "the preemptible job to run", |s| {
            task_states(s) == ["RUNNING"]
        })
        .await;
    // RUNNING is the claim; the shell sets its trap a moment later and
    // says so by printing `training` (a SIGTERM before it ended the task
    // without a checkpoint, once in CI).
    eventually(DEADLINE, "the victim to have set its trap", || async {
        fleet
            .events(&low)
            .await
            .iter()
            .any(|e| matches!(&e.body, EventBody::Log { text, .. } if text.contains("training")))
            .then_some(())
    })
    .await;
    let urgent = fleet
        .submit(&json!({
            "name": "urgent", "priority": 5,
            "tasks": [{"command": ["true"], "resources": {"gpus": 1, "cpus": 0.1}}],
        }))
        .await;
    // While the victim saves its work, the urgent job says why it waits,
    // and the victim why it stops.
    let (waiting, stopping) = eventually(DEADLINE, "the preemption to be under way", || async {
        let u = fleet.get(&urgent).await;
        let l = fleet.get(&low).await;
        let why = |s: &Value| s["tasks"][0]["reason"].as_str().unwrap_or("").to_string();
        (why(&u).starts_with("waiting for preemption") && why(&l).contains("preempted by"))
            .then(|| (why(&u), why(&l)))
    })
    .await;
    assert!(
        waiting.contains(&low) && waiting.contains("w0"),
        "{waiting}"
    );
    assert!(
        stopping.contains(&format!("preempted by {urgent}")),
        "{stopping}"
    );

    let done = fleet.wait_finished(&urgent, DEADLINE).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done}");
    let done = fleet.wait_finished(&low, DEADLINE).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done}");
    // Attempt 2, with max_retries 0: the preemption spent no retry, and
    // is no error of the job's.
    assert_eq!(done["tasks"][0]["attempt"], 2, "{done}");
    assert_eq!(done["error_count"].as_u64().unwrap_or(0), 0, "{done}");
    let resumed = std::fs::read_to_string(dir.join("resumed")).expect("attempt 2 resumed");
    assert!(resumed.contains("step=42"), "{resumed}");
    assert!(
        resumed.contains(r#""topic":"gpufleet.preempted""#) && resumed.contains(&urgent),
        "the inbox said who preempted it: {resumed}"
    );
    // The first attempt ended INTERRUPTED, saying by whom.
    let ended = state_events(&fleet.events(&low).await)
        .into_iter()
        .find(|(attempt, state, _)| *attempt == 1 && *state == TaskState::Interrupted)
        .expect("attempt 1 ended INTERRUPTED");
    assert_eq!(ended.2, Some(format!("preempted by {urgent}")));
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
