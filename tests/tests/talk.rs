//! Talking to jobs and their running tasks (issue 16), end to end: a job's
//! errors listed and reset; messages to a running task through its inbox
//! (also the README's Python `log_level` example); messages between a
//! job's tasks through their outboxes, never to another job.
//!
//! Every wait has a deadline and waits on something that happens.

use std::process::{Command, Output};
use std::time::Duration;

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
