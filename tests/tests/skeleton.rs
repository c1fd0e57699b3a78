//! One job end to end, with the real binaries over a real nats-server, as
//! any NATS client would drive them.

use std::time::Duration;

use gpufleet_schema::{Event, EventBody, TaskState};
use gpufleet_testkit::{api, state_events, task_states_read, Fleet, WorkerSpec};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_job_completes_with_its_logs_and_result_in_the_stream() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("2x24GiB:L4"))
        .await;

    let job = json!({
        "name": "hello",
        "tasks": [{
            "name": "greet",
            "command": ["sh", "-c", "echo hello from $GPUFLEET_TASK_ID; echo to stderr >&2; echo '{\"answer\": 42}' > $GPUFLEET_RESULT"],
            "resources": {"gpus": 1, "gpu_memory": "10GiB", "cpus": 1}
        }]
    });
    let id = fleet.submit(&job).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let task = &status["tasks"][0];
    assert_eq!(task["state"], "SUCCEEDED");
    assert_eq!(task["exit_code"], 0);
    assert_eq!(task["result"], json!({"answer": 42}));
    assert_eq!(task["worker"], "w1");
    assert_eq!(task["gpus"].as_array().unwrap().len(), 1);

    let evs = fleet.events(&id).await;
    let logs: String = evs
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Log { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert!(logs.contains(&format!("hello from {id}-0")), "{logs}");
    assert!(logs.contains("to stderr"), "{logs}");
    let results: Vec<&Event> = evs
        .iter()
        .filter(|e| matches!(e.body, EventBody::Result(_)))
        .collect();
    assert_eq!(results.len(), 1);
    let EventBody::Result(outcome) = &results[0].body else {
        unreachable!()
    };
    assert_eq!(outcome.result, Some(json!({"answer": 42})));
    // Every log line is in the stream before the result.
    let last_log = evs
        .iter()
        .rposition(|e| matches!(e.body, EventBody::Log { .. }))
        .unwrap();
    let result_at = evs
        .iter()
        .position(|e| matches!(e.body, EventBody::Result(_)))
        .unwrap();
    assert!(last_log < result_at);
    // RUNNING only if the task outlived the worker's `running_event_after`;
    // no SUCCEEDED state event: the holder's result says it.
    let told = |states: Vec<(u32, TaskState, Option<String>)>| -> Vec<String> {
        states
            .iter()
            .map(|(_, state, _)| state.to_string())
            .filter(|s| s != "RUNNING")
            .collect()
    };
    assert_eq!(told(state_events(&evs)), vec!["RESERVED"]);
    assert_eq!(told(task_states_read(&evs)), vec!["RESERVED", "SUCCEEDED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_ends_in_execution_exception_with_its_code() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["sh", "-c", "exit 7"]}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(
        status["status"], "FINISHED:EXECUTION_EXCEPTION",
        "{status:#}"
    );
    assert_eq!(status["tasks"][0]["state"], "FAILED");
    assert_eq!(status["tasks"][0]["exit_code"], 7);
    assert!(status["reason"]
        .as_str()
        .unwrap()
        .contains("exited with code 7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_submit_gets_400_naming_the_field() {
    let fleet = Fleet::start().await;
    let client = fleet.client().await;
    let err = api(
        &client,
        "gpufleet.api.jobs.submit",
        &json!({"tasks": [{"command": ["true"], "resources": {"gpus": "two"}}]}),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("400:"), "{err}");
    assert!(err.contains("tasks[0].resources.gpus"), "{err}");

    // The body carries the error too.
    let reply = client
        .request(
            "gpufleet.api.jobs.submit",
            r#"{"tasks": [{"command": ["true"], "gpu_memroy": 1}]}"#.into(),
        )
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("gpu_memroy"),
        "{body}"
    );
    let code = reply
        .headers
        .unwrap()
        .get("Nats-Service-Error-Code")
        .unwrap()
        .to_string();
    assert_eq!(code, "400");

    let err = api(&client, "gpufleet.api.jobs.submit", &json!({"tasks": []}))
        .await
        .unwrap_err();
    assert!(err.starts_with("400:") && err.contains("tasks"), "{err}");
    let err = api(&client, "gpufleet.api.jobs.get", &json!({"job_id": "nope"}))
        .await
        .unwrap_err();
    assert!(err.starts_with("404:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msgpack_submit_gets_a_msgpack_reply() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let client = fleet.client().await;
    let job = json!({"id": "packed-1", "tasks": [{"command": ["true"]}]});
    let body = rmp_serde::to_vec_named(&job).unwrap();
    // No Content-Type: the coordinator sniffs the first byte.
    let reply = client
        .request("gpufleet.api.jobs.submit", body.into())
        .await
        .unwrap();
    assert_ne!(reply.payload.first(), Some(&b'{'), "reply must not be JSON");
    let decoded: Value = rmp_serde::from_slice(&reply.payload).expect("a msgpack reply");
    assert_eq!(decoded["job_id"], "packed-1");
    let status = fleet.wait_finished("packed-1", T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED");

    // The same id with the same spec is the same job; another spec is 409.
    let again = api(&client, "gpufleet.api.jobs.submit", &job)
        .await
        .unwrap();
    assert_eq!(again["created"], false);
    let err = api(
        &client,
        "gpufleet.api.jobs.submit",
        &json!({"id": "packed-1", "tasks": [{"command": ["false"]}]}),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("409:"), "{err}");
}
