//! Scheduling for a shared fleet, end to end (real nats-server, real
//! coordinator and workers, simulated GPUs): fair share between users and
//! quotas set without a restart.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use gpufleet_schema::subjects::{self, endpoint};
use gpufleet_schema::UserId;
use gpufleet_testkit::invariants::LeaseWatch;
use gpufleet_testkit::wait::eventually;
use gpufleet_testkit::{api, Fleet, WorkerSpec};
use serde_json::{json, Value};

/// How long each task of these tests runs.
const TASK: Duration = Duration::from_secs(3);

fn user(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

/// A job of `n` tasks that each hold one GPU for `run`.
fn one_gpu_tasks(n: usize, run: Duration) -> Value {
    let task = json!({
        "command": ["sleep", run.as_secs().to_string()],
        "resources": {"gpus": 1, "cpus": 0.1},
    });
    json!({"max_retries": 0, "tasks": vec![task; n]})
}

/// Calls `endpoint` as `who` (with roles off, a user is who the subject
/// names).
async fn call(fleet: &Fleet, who: &str, endpoint: &str, body: &Value) -> Value {
    let client = fleet.client().await;
    api(&client, &subjects::api(&user(who), endpoint), body)
        .await
        .unwrap_or_else(|e| panic!("{endpoint} as {who}: {e}"))
}

async fn submit_as(fleet: &Fleet, who: &str, job: &Value) -> String {
    let reply = call(fleet, who, endpoint::JOBS_SUBMIT, job).await;
    reply["job_id"].as_str().expect("a job id").to_string()
}

/// The job's tasks holding a GPU (reserved or running), and done.
async fn held_and_done(fleet: &Fleet, who: &str, job: &str) -> (u64, u64) {
    let s = call(
        fleet,
        who,
        endpoint::JOBS_GET,
        &json!({"job_id": job, "task_limit": 1}),
    )
    .await;
    let c = &s["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    (n("reserved") + n("running"), n("succeeded"))
}

async fn fleet_of(gpus: &[&str]) -> Fleet {
    let mut fleet = Fleet::start().await;
    for (i, g) in gpus.iter().enumerate() {
        fleet
            .add_worker(WorkerSpec::new(&format!("w{i}")).gpus(g).cpus(16.0))
            .await;
    }
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_user_gets_half_the_gpus_within_one_task_duration() {
    let fleet = fleet_of(&["4x24GiB:L4", "4x24GiB:L4"]).await;
    // No GPU is ever held twice (the lease book: two jobs' counts, read
    // one after the other, cannot tell that).
    let book = LeaseWatch::start(&fleet.url()).await;
    let a = submit_as(&fleet, "alice", &one_gpu_tasks(1000, TASK)).await;
    eventually(
        Duration::from_secs(60),
        "alice to hold all 8 GPUs",
        || async { (held_and_done(&fleet, "alice", &a).await.0 == 8).then_some(()) },
    )
    .await;

    let b = submit_as(&fleet, "bob", &one_gpu_tasks(100, TASK)).await;
    let submitted = Instant::now();
    // Every GPU turns over within one task duration, and each freed one
    // goes to bob until he holds his half. (Twice the duration as the
    // deadline: the tasks started over a second or so, and the machine
    // is shared.)
    eventually(2 * TASK, "bob to hold half the GPUs", || async {
        (held_and_done(&fleet, "bob", &b).await.0 >= 4).then_some(())
    })
    .await;
    let took = submitted.elapsed();
    // From then on the split stays even: bob never holds more than his
    // half while alice waits, through two more rounds of his tasks.
    eventually(
        Duration::from_secs(60),
        "bob's tasks to turn over twice",
        || async {
            let (bob, done) = held_and_done(&fleet, "bob", &b).await;
            assert!(bob <= 4, "bob holds {bob} of 8 while alice waits");
            (done >= 8).then_some(())
        },
    )
    .await;
    let v = book.violations();
    assert!(v.is_empty(), "overcommitted: {v:?}");
    eprintln!("bob held half the GPUs {took:?} after his submit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_written_to_the_policy_key_applies_without_a_restart() {
    let fleet = fleet_of(&["4x24GiB:L4"]).await;
    let js = jetstream::new(fleet.client().await);
    let kv = js
        .get_key_value(subjects::JOBS_BUCKET)
        .await
        .expect("the jobs bucket");
    let policy = json!({"users": {"alice": {"quota": {"max_gpus": 1}}}});
    kv.put(
        subjects::POLICY_KEY,
        serde_json::to_vec(&policy).unwrap().into(),
    )
    .await
    .expect("write the policy");

    // Long tasks: had the others waited for the first to end, one would
    // be done by the time they all held a GPU.
    let job = submit_as(&fleet, "alice", &one_gpu_tasks(3, 4 * TASK)).await;
    let status = eventually(
        Duration::from_secs(30),
        "one task to run, two over quota",
        || async {
            let s = call(&fleet, "alice", endpoint::JOBS_GET, &json!({"job_id": job})).await;
            let over = s["tasks"]
                .as_array()?
                .iter()
                .filter(|t| {
                    t["reason"]
                        .as_str()
                        .is_some_and(|r| r == "over quota: user alice max_gpus 1 (holds 1, asks 1)")
                })
                .count();
            (over == 2).then_some(s)
        },
    )
    .await;
    assert_eq!(
        status["counts"]["reserved"].as_u64().unwrap()
            + status["counts"]["running"].as_u64().unwrap(),
        1
    );
    // The admin removes the quota: the rest start at once, not after the
    // running task ends.
    kv.delete(subjects::POLICY_KEY)
        .await
        .expect("remove the policy");
    eventually(4 * TASK, "all three tasks to hold a GPU", || async {
        (held_and_done(&fleet, "alice", &job).await == (3, 0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_of_six_runs_each_combination_at_most_two_at_once() {
    let fleet = fleet_of(&["2x24GiB:L4"]).await;
    // Each task reports what it was given: its environment, and the
    // command's substitutions.
    let script = r#"printf '{"lr": "%s", "seed": "%s", "index": %s, "arg": "%s"}' "$lr" "$seed" "$GPUFLEET_ARRAY_INDEX" "$1" > "$GPUFLEET_RESULT""#;
    let job = fleet
        .submit(&json!({
            "max_parallel": 2,
            "tasks": [{
                "name": "lr{lr}-seed{seed}",
                "command": ["sh", "-c", script, "sh", "--lr={lr}"],
                "resources": {"cpus": 0.1},
                "array": {"lr": ["0.1", "0.01"], "seed": [1, 2, 3]},
            }],
        }))
        .await;
    let done = fleet.wait_finished(&job, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done}");
    let tasks = done["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 6);
    let mut i = 0;
    for lr in ["0.1", "0.01"] {
        for seed in ["1", "2", "3"] {
            let t = &tasks[i];
            assert_eq!(t["name"], format!("lr{lr}-seed{seed}"));
            assert_eq!(
                t["result"],
                json!({"lr": lr, "seed": seed, "index": i, "arg": format!("--lr={lr}")}),
            );
            i += 1;
        }
    }
    // max_parallel 2: at no moment did three run (the tasks' own start
    // and end times say so).
    let span = |t: &Value, k: &str| {
        time::OffsetDateTime::parse(
            t[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    for t in tasks {
        let start = span(t, "started_at");
        let overlapping = tasks
            .iter()
            .filter(|o| span(o, "started_at") <= start && start < span(o, "finished_at"))
            .count();
        assert!(overlapping <= 2, "{overlapping} tasks ran at once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_jobs_runs_in_order() {
    let fleet = fleet_of(&["1x24GiB:L4", "1x24GiB:L4"]).await;
    let job = |after: Option<&str>| {
        let mut j = json!({"tasks": [{"command": ["sleep", "1"], "resources": {"cpus": 0.1}}]});
        if let Some(a) = after {
            j["after_ok"] = json!([a]);
        }
        j
    };
    let a = fleet.submit(&job(None)).await;
    let b = fleet.submit(&job(Some(&a))).await;
    let c = fleet.submit(&job(Some(&b))).await;
    let waiting = fleet.get(&c).await;
    assert_eq!(waiting["status"], "QUEUED");
    let done = fleet.wait_finished(&c, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done}");
    let at = |s: &Value, k: &str| {
        time::OffsetDateTime::parse(
            s["tasks"][0][k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let (sa, sb) = (fleet.get(&a).await, fleet.get(&b).await);
    // Room for all three at once, yet each started after the one before
    // it had ended.
    assert!(at(&sb, "started_at") >= at(&sa, "finished_at"));
    assert!(at(&done, "started_at") >= at(&sb, "finished_at"));
}
