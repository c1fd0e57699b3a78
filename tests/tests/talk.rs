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
use gpufleet_testkit::{bin, task_states_read, Fleet, WorkerSpec};
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

/// The README's Python example of a task that follows its inbox: the
/// README shows this file whole.
fn inbox_example() -> String {
    let example = std::fs::read_to_string(workspace_root().join("examples/inbox_log_level.py"))
        .expect("examples/inbox_log_level.py");
    let shown = gpufleet_testkit::readme_python("\"\"\"A gpufleet task that follows its inbox");
    assert_eq!(
        shown, example,
        "README's inbox example differs from examples/inbox_log_level.py"
    );
    example
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
    assert!(task_states_read(&states)
        .iter()
        .any(|(_, s, _)| *s == TaskState::Succeeded));
}

/// A gang member: says hello to all until it has heard from both others,
/// then sends five numbered messages to `NEXT` and "done" to all, and ends
/// once it has its predecessor's five and both others' "done".
const GANG_MEMBER: &str = r#"
import json, os, time
me, nxt = os.environ["ME"], os.environ["NEXT"]
inbox, outbox = os.environ["GPUFLEET_INBOX"], os.environ["GPUFLEET_OUTBOX"]
offset = 0

def send(to, topic, data=None):
    with open(outbox, "a") as f:
        f.write(json.dumps({"to": to, "topic": topic, "data": data}) + "\n")

def read():
    global offset
    try:
        with open(inbox, "rb") as f:
            f.seek(offset)
            d = f.read()
    except FileNotFoundError:
        return []
    whole = d[:d.rfind(b"\n") + 1]
    offset += len(whole)
    return [json.loads(l) for l in whole.splitlines() if l.strip()]

alive, seqs, done, said_hello, sent = set(), [], set(), 0, False
while not (len(seqs) == 5 and len(done) == 2):
    for m in read():
        if m["topic"] == "gpufleet.undeliverable":
            continue
        alive.add(m["from"])
        if m["topic"] == "seq":
            seqs.append([m["from"], m["data"]])
        elif m["topic"] == "done":
            done.add(m["from"])
        elif m["topic"] != "hello":
            print("unexpected", json.dumps(m), flush=True)
    if not sent and len(alive) == 2:
        for i in range(5):
            send(nxt, "seq", i)
        send("*", "done")
        sent = True
    if not sent and time.time() - said_hello > 0.3:
        send("*", "hello")
        said_hello = time.time()
    time.sleep(0.05)
print(me, "got", json.dumps(seqs), "done from", json.dumps(sorted(done)), flush=True)
"#;

/// A task of another job: writes to a task of the gang's job, by its id
/// and by its name, and ends once both came back undeliverable.
const INTRUDER: &str = r#"
import json, os, time
target = os.environ["TARGET"]
with open(os.environ["GPUFLEET_OUTBOX"], "a") as f:
    f.write(json.dumps({"to": target, "topic": "psst", "data": 1}) + "\n")
    f.write(json.dumps({"to": "t0", "topic": "psst", "data": 2}) + "\n")
    f.write("this is not json\n")
bounced = []
while len(bounced) < 2:
    try:
        lines = open(os.environ["GPUFLEET_INBOX"]).read().splitlines()
    except FileNotFoundError:
        lines = []
    bounced = [json.loads(l) for l in lines if l.strip()]
    time.sleep(0.05)
for m in bounced:
    print("bounced", m["topic"], m["from"], json.dumps(m["data"]), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_exchanges_targeted_and_multicast_messages_and_another_job_cannot_reach_it() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("gang-w1").cpus(4.0)).await;
    let member = |me: &str, next: &str| {
        json!({"name": me, "command": ["python3", "-c", GANG_MEMBER],
               "env": {"ME": me, "NEXT": next}, "resources": {"cpus": 1}})
    };
    let gang = fleet
        .submit(&json!({"gang": true, "max_retries": 0, "tasks": [
            member("t0", "t1"), member("t1", "t2"), member("t2", "t0")]}))
        .await;
    let intruder = fleet
        .submit(
            &json!({"tasks": [{"name": "intruder", "resources": {"cpus": 1},
            "command": ["python3", "-c", INTRUDER], "env": {"TARGET": format!("{gang}-0")}}]}),
        )
        .await;

    let status = fleet.wait_finished(&gang, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    let out = output(&fleet, &gang).await;
    for (me, from) in [("t0", "t2"), ("t1", "t0"), ("t2", "t1")] {
        // Targeted, in the order sent; the multicast "done" from both.
        let seqs: Vec<Value> = (0..5).map(|i| json!([from, i])).collect();
        let others: Vec<&str> = ["t0", "t1", "t2"]
            .into_iter()
            .filter(|t| *t != me)
            .collect();
        let line = format!(
            "{me} got {} done from {}",
            serde_json::to_string(&seqs).unwrap().replace(",", ", "),
            serde_json::to_string(&others).unwrap().replace(",", ", ")
        );
        assert!(out.contains(&line), "{line:?} not in:\n{out}");
    }
    assert!(!out.contains("unexpected"), "{out}");

    let status = fleet.wait_finished(&intruder, STEP).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status}");
    let out = output(&fleet, &intruder).await;
    assert!(
        out.contains(&format!(r#""to": "{gang}-0""#)) && out.contains(r#""to": "t0""#),
        "{out}"
    );
    assert_eq!(
        out.matches("bounced gpufleet.undeliverable gpufleet")
            .count(),
        2,
        "{out}"
    );
    assert!(out.contains(&format!("has no task {gang}-0")), "{out}");
    assert!(
        out.contains("ignored an outbox line"),
        "a bad line is said: {out}"
    );

    // The gang's messages are in its events, from the worker that ran each.
    let sent = fleet
        .events(&gang)
        .await
        .into_iter()
        .filter(|e| matches!(&e.body, EventBody::Message { topic, .. } if topic == "seq"))
        .count();
    assert_eq!(sent, 15);
}
