//! Talking to jobs and their running tasks (issue 16), end to end: a job's
//! errors listed and reset; messages to a running task through its inbox
//! (also the README's Python `log_level` example); messages between a
//! job's tasks through their outboxes, never to another job.
//!
//! Every wait has a deadline and waits on something that happens.

use std::process::{Command, Output};
use std::time::Duration;

use gpufleet_schema::{EventBody, TaskState};
use gpufleet_testkit::server::workspace_root;
use gpufleet_testkit::{bin, Fleet, WorkerSpec};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(60);

/// Runs `gpufleet ARGS` against the fleet; what it said.
fn gpufleet(fleet: &Fleet, args: &[&str]) -> Output {
    Command::new(bin("gpufleet"))
        .arg("--nats-url")
        .arg(fleet.url())
        .args(args)
        .output()
        .expect("run gpufleet")
}

/// `gpufleet ARGS`, which must succeed; its stdout.
fn ok(fleet: &Fleet, args: &[&str]) -> String {
    let out = gpufleet(fleet, args);
    assert!(out.status.success(), "gpufleet {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_listed_after_a_retried_failure_and_cleared_by_reset() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("err-w1")).await;
    // The first attempt is killed from outside (INTERRUPTED, retried), the
    // second succeeds.
    let job = fleet
        .submit(&json!({"max_retries": 1, "tasks": [{"name": "flaky",
            "command": ["sh", "-c", "[ \"$GPUFLEET_ATTEMPT\" = 1 ] && kill -9 $$; echo fine"]}]}))
        .await;
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    assert_eq!(status["error_count"], 1, "{status}");
    let e = &status["errors"][0];
    assert_eq!(
        (&e["task"], &e["attempt"], &e["worker"], &e["state"]),
        (
            &json!("flaky"),
            &json!(1),
            &json!("err-w1"),
            &json!("INTERRUPTED")
        ),
        "{status}"
    );
    assert!(e["at"].is_string() && e["reason"].is_string(), "{e}");

    let table = ok(&fleet, &["errors", &job]);
    assert!(
        table.contains("INTERRUPTED") && table.contains("flaky") && table.contains("err-w1"),
        "{table}"
    );
    let listed: Value = serde_json::from_str(&ok(&fleet, &["--json", "errors", &job])).unwrap();
    assert_eq!(listed["errors"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["reset"], false);

    let cleared = ok(&fleet, &["errors", &job, "--reset"]);
    assert!(cleared.contains("cleared 1 error"), "{cleared}");
    let after: Value = serde_json::from_str(&ok(&fleet, &["--json", "errors", &job])).unwrap();
    assert_eq!(after["errors"], json!([]), "{after}");
    assert_eq!(after["error_count"], 0, "{after}");
    assert!(fleet.get(&job).await.get("errors").is_none());
    assert!(ok(&fleet, &["errors", &job]).contains("has no errors"));

    // A job that does not exist is an error naming it.
    let out = gpufleet(&fleet, &["errors", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job nope not found"));
}

/// The README's Python example of a task that follows its inbox.
fn inbox_example() -> String {
    std::fs::read_to_string(workspace_root().join("examples/inbox_log_level.py"))
        .expect("examples/inbox_log_level.py")
}

/// Waits for a line of the job's output containing `needle`.
async fn wait_output(fleet: &Fleet, job: &str, needle: &str) {
    fleet
        .wait_event(
            job,
            STEP,
            &format!("output {needle:?}"),
            |e| matches!(&e.body, EventBody::Log { text, .. } if text.contains(needle)),
        )
        .await;
}

/// All of the job's stdout so far.
async fn output(fleet: &Fleet, job: &str) -> String {
    fleet
        .events(job)
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::Log { text, .. } => Some(text),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_a_running_task_and_log_level_changes_its_logging() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("msg-w1")).await;
    let job = fleet
        .submit(&json!({"tasks": [
            {"name": "follower", "command": ["python3", "-c", inbox_example()]},
            {"name": "quick", "command": ["true"]}]}))
        .await;
    wait_output(&fleet, &job, "INFO step 0").await;
    fleet
        .wait_job(&job, STEP, "quick to end", |s| {
            s["tasks"][1]["state"] == "SUCCEEDED"
        })
        .await;

    // To the job: only the running task gets it.
    let sent: Value = serde_json::from_str(&ok(
        &fleet,
        &[
            "--json",
            "send",
            &job,
            "--topic",
            "greeting",
            r#"{"hello": 1}"#,
        ],
    ))
    .unwrap();
    assert_eq!(sent["delivered"], 1, "{sent}");
    assert_eq!(sent["tasks"], json!([format!("{job}-0")]), "{sent}");
    wait_output(
        &fleet,
        &job,
        r#"message greeting from user:default: {"hello": 1}"#,
    )
    .await;

    // The convention: log_level, to the task by name, with a signal to
    // look at once.
    assert!(!output(&fleet, &job).await.contains("DEBUG step"));
    let said = ok(
        &fleet,
        &[
            "send",
            &job,
            "follower",
            "--topic",
            "log_level",
            "--signal",
            "DEBUG",
        ],
    );
    assert!(said.contains("delivered to 1 running task"), "{said}");
    wait_output(&fleet, &job, "log level now DEBUG (from user:default)").await;
    wait_output(&fleet, &job, "DEBUG step").await;

    // A task that has ended receives nothing; an unknown one is an error.
    let none = ok(&fleet, &["send", &job, "quick", "--topic", "t", "1"]);
    assert!(none.contains("delivered to 0 running tasks"), "{none}");
    let out = gpufleet(&fleet, &["send", &job, "nobody", "--topic", "t", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no task nobody"));
    // A reserved topic is refused before anything is sent.
    let out = gpufleet(&fleet, &["send", &job, "--topic", "gpufleet.gpus", "1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    ok(&fleet, &["send", &job, "--topic", "stop", "null"]);
    let status = fleet.wait_finished(&job, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    assert!(output(&fleet, &job).await.contains("stopping at step"));

    // Each message is in the job's events, for audit and replay.
    let messages: Vec<(String, String, String)> = fleet
        .events(&job)
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::Message {
                from, to, topic, ..
            } => Some((from, to, topic)),
            _ => None,
        })
        .collect();
    let topics: Vec<&str> = messages.iter().map(|m| m.2.as_str()).collect();
    assert_eq!(
        topics,
        ["greeting", "log_level", "t", "stop"],
        "{messages:?}"
    );
    assert!(messages.iter().all(|m| m.0 == "user:default"));
    assert_eq!(messages[1].1, "follower");
    // After the end, a send reaches nothing and stores nothing.
    let after = ok(&fleet, &["send", &job, "--topic", "late", "1"]);
    assert!(after.contains("delivered to 0"), "{after}");
    let states = fleet.events(&job).await;
    assert!(!states
        .iter()
        .any(|e| matches!(&e.body, EventBody::Message { topic, .. } if topic == "late")));
    assert!(states.iter().any(|e| matches!(
        &e.body,
        EventBody::State {
            state: TaskState::Succeeded,
            ..
        }
    )));
}
