//! The coordinator with real workers (simulated GPUs) over a real
//! nats-server: the whole API, placement under load, waiting with a reason,
//! retries after faults, and a coordinator killed mid-run.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use gpufleet_testkit::invariants::LeaseWatch;
use gpufleet_testkit::{api, pids, task_states, task_states_read, Fleet, WorkerSpec};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_is_discoverable_and_answers_every_endpoint() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("1x24GiB:L4").labels("zone=a"))
        .await;
    let client = fleet.client().await;
    let info = client
        .request("$SRV.INFO.gpufleet", Bytes::new())
        .await
        .unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "gpufleet");
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    for s in [
        "gpufleet.api.jobs.submit",
        "gpufleet.api.jobs.get",
        "gpufleet.api.jobs.list",
        "gpufleet.api.jobs.cancel",
        "gpufleet.api.workers.list",
    ] {
        assert!(subjects.contains(&s), "{s} missing from {subjects:?}");
    }

    let workers = api(&client, "gpufleet.api.workers.list", &json!({}))
        .await
        .unwrap();
    let w = &workers[0];
    assert_eq!(w["name"], "w1");
    assert_eq!(w["labels"]["zone"], "a");
    assert_eq!(w["gpus"][0]["model"], "L4");
    assert_eq!(w["gpus"][0]["memory_total"], 24u64 << 30);

    let a = fleet
        .submit(&json!({"name": "a", "tasks": [{"command": ["true"]}]}))
        .await;
    let b = fleet
        .submit(&json!({"name": "b", "tasks": [{"command": ["false"]}]}))
        .await;
    fleet.wait_finished(&a, T).await;
    fleet.wait_finished(&b, T).await;
    let list = api(&client, "gpufleet.api.jobs.list", &json!({}))
        .await
        .unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![b.as_str(), a.as_str()], "newest first");
    let done = api(
        &client,
        "gpufleet.api.jobs.list",
        &json!({"status": "FINISHED:COMPLETED", "limit": 10}),
    )
    .await
    .unwrap();
    assert_eq!(done.as_array().unwrap().len(), 1);
    assert_eq!(done[0]["job_id"], a.as_str());
    let err = api(
        &client,
        "gpufleet.api.jobs.list",
        &json!({"status": "DONE"}),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("400:") && err.contains("status"), "{err}");

    // The same in msgpack.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/msgpack");
    let reply = client
        .request_with_headers(
            "gpufleet.api.jobs.get",
            headers,
            rmp_serde::to_vec_named(&json!({"job_id": a}))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    let got: Value = rmp_serde::from_slice(&reply.payload).unwrap();
    assert_eq!(got["status"], "FINISHED:COMPLETED");
    assert_eq!(
        reply.headers.unwrap().get("Content-Type").unwrap().as_str(),
        "application/msgpack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_mixed_tasks_on_three_different_workers_never_overcommit() {
    let mut fleet = Fleet::start().await;
    // The shared lease book: a lease ends at its expiry or removal, or once
    // its holder's result is stored (workers leave the key to expire).
    let book = LeaseWatch::start(&fleet.url()).await;
    fleet
        .add_worker(WorkerSpec::new("big").gpus("2x80GiB:A100").cpus(4.0))
        .await;
    fleet
        .add_worker(WorkerSpec::new("small").gpus("4x24GiB:L4").cpus(4.0))
        .await;
    fleet.add_worker(WorkerSpec::new("cpu").cpus(2.0)).await;

    let mut tasks = Vec::new();
    for i in 0..30 {
        // Each holds its resources a moment, so that tasks overlap.
        let cmd = json!([
            "sh",
            "-c",
            format!(
                "sleep 0.{}; echo '{{\"i\": {i}}}' > $GPUFLEET_RESULT",
                2 + i % 5
            )
        ]);
        let resources = match i % 5 {
            0 => json!({"gpus": 1, "gpu_memory": "40GiB", "cpus": 1}),
            1 => json!({"gpus": 2, "cpus": 1}),
            2 => json!({"gpus": 0, "gpu_memory": "10GiB", "cpus": 0.5}),
            3 => json!({"cpus": 1}),
            _ => json!({"gpus": 1, "gpu_memory": "16GiB", "cpus": 0.5}),
        };
        tasks.push(json!({"name": format!("t{i}"), "command": cmd, "resources": resources}));
    }
    let id = fleet
        .submit(&json!({"name": "mixed", "tasks": tasks}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    for (i, t) in status["tasks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(t["result"]["i"], i, "task {i}");
        if i % 5 == 0 {
            // 40 GiB only fits the A100s.
            assert_eq!(t["worker"], "big", "task {i}");
        }
    }
    let v = book.violations();
    assert!(v.is_empty(), "overcommitted: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_job_waits_with_its_reason_until_a_big_worker_joins() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("two").gpus("2x24GiB"))
        .await;
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["true"], "resources": {"gpus": 4}}]}))
        .await;
    let waiting = fleet
        .wait_job(&id, T, "a reason", |s| s["reason"].is_string())
        .await;
    assert_eq!(waiting["status"], "QUEUED");
    assert_eq!(waiting["reason"], "no worker has 4 GPUs; the largest has 2");
    assert_eq!(
        waiting["tasks"][0]["reason"],
        "no worker has 4 GPUs; the largest has 2"
    );

    fleet
        .add_worker(WorkerSpec::new("four").gpus("4x24GiB"))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED");
    assert_eq!(status["tasks"][0]["worker"], "four");
    assert_eq!(status["tasks"][0]["gpus"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_stops_the_task_and_aborts_the_job() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(1.0)).await;
    let pidfile = fleet.dir().join("pid");
    let id = fleet
        .submit(&json!({"tasks": [
            {"command": ["sh", "-c", format!("echo $$ > {}; exec sleep 600", pidfile.display())]},
            {"command": ["true"]}
        ]}))
        .await;
    // One CPU: the second task waits behind the first; its pid file says
    // its process is up.
    let pid: i32 = gpufleet_testkit::eventually(T, "the pid file", || {
        let p = pidfile.clone();
        async move { std::fs::read_to_string(p).ok()?.trim().parse().ok() }
    })
    .await;
    let client = fleet.client().await;
    let reply = api(&client, "gpufleet.api.jobs.cancel", &json!({"job_id": id}))
        .await
        .unwrap();
    assert_eq!(reply["tasks"][1]["state"], "CANCELLED");
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:ABORTED", "{status:#}");
    assert_eq!(task_states(&status), vec!["CANCELLED", "CANCELLED"]);
    assert!(
        !pids::exists(pid),
        "the cancelled task's process {pid} still runs"
    );
    // Cancelling again is harmless.
    let again = api(&client, "gpufleet.api.jobs.cancel", &json!({"job_id": id}))
        .await
        .unwrap();
    assert_eq!(again["status"], "FINISHED:ABORTED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_worker_dies_is_lost_then_succeeds_elsewhere() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("doomed").cpus(1.0)).await;
    let marker = fleet.dir().join("started");
    let id = fleet
        .submit(&json!({"max_retries": 1, "tasks": [{
            "command": ["sh", "-c", format!(
                "if [ \"$GPUFLEET_ATTEMPT\" = 1 ]; then touch {}; exec sleep 600; fi; echo '{{\"worker\": \"second\"}}' > $GPUFLEET_RESULT",
                marker.display())]
        }]}))
        .await;
    fleet
        .wait_job(&id, T, "the task to run", |s| {
            s["tasks"][0]["state"] == "RUNNING"
        })
        .await;
    fleet
        .add_worker(WorkerSpec::new("survivor").cpus(1.0))
        .await;
    fleet.worker("doomed").kill9();
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let t = &status["tasks"][0];
    assert_eq!(t["attempt"], 2);
    assert_eq!(t["worker"], "survivor");
    assert_eq!(t["result"]["worker"], "second");

    // The stream tells the story: LOST, then a new attempt that succeeded.
    let evs: Vec<(String, u32)> = task_states_read(&fleet.events(&id).await)
        .into_iter()
        .map(|(attempt, state, _)| (state.to_string(), attempt))
        .collect();
    let lost = evs
        .iter()
        .position(|(s, a)| s == "LOST" && *a == 1)
        .expect("a LOST state");
    let ok = evs
        .iter()
        .position(|(s, a)| s == "SUCCEEDED" && *a == 2)
        .expect("SUCCEEDED on attempt 2");
    assert!(lost < ok, "{evs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_run_loses_nothing_and_runs_nothing_twice() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(2.0)).await;
    fleet.add_worker(WorkerSpec::new("w2").cpus(2.0)).await;
    let ledger = fleet.dir().join("ran");
    std::fs::write(&ledger, "").unwrap();
    // Tasks may run as another user (`run_as`) than the test.
    std::fs::set_permissions(&ledger, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    // Each task appends its id to one file: a task run twice shows twice.
    let tasks: Vec<Value> = (0..50)
        .map(|i| {
            json!({"command": ["sh", "-c", format!(
                "sleep 0.{}; echo \"$GPUFLEET_TASK_ID $GPUFLEET_ATTEMPT\" >> {}; echo '{{\"i\": {i}}}' > $GPUFLEET_RESULT",
                3 + i % 5, ledger.display())],
                "resources": {"cpus": 0.5}})
        })
        .collect();
    let id = fleet.submit(&json!({"id": "fifty", "tasks": tasks})).await;
    fleet
        .wait_job(&id, T, "a few tasks done", |s| {
            s["counts"]["succeeded"].as_u64() >= Some(10)
        })
        .await;
    fleet.coordinator.as_mut().unwrap().kill9();
    let at_kill = std::fs::read_to_string(&ledger).unwrap().lines().count();
    // The workers carry on with what they hold; their results wait in the
    // stream for the next coordinator.
    gpufleet_testkit::eventually(T, "tasks to finish while no coordinator runs", || {
        let ledger = ledger.clone();
        async move {
            (std::fs::read_to_string(ledger).ok()?.lines().count() >= at_kill + 2).then_some(())
        }
    })
    .await;
    fleet.start_coordinator().await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    for (i, t) in status["tasks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(t["state"], "SUCCEEDED");
        assert_eq!(t["result"]["i"], i);
        assert_eq!(t["attempt"], 1, "task {i} was retried: {t}");
    }
    let ran = std::fs::read_to_string(&ledger).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in ran.lines() {
        *seen.entry(line.to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 50, "{ran}");
    assert!(seen.values().all(|&n| n == 1), "a task ran twice: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_task_is_not_starved_by_a_stream_of_small_ones() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("2x24GiB"))
        .await;
    let release = fleet.dir().join("release");
    // A blocker holds one GPU until the test lets it go.
    let blocker = fleet
        .submit(&json!({"tasks": [{"command": ["sh", "-c", format!(
            "while [ ! -e {} ]; do sleep 0.05; done", release.display())],
            "resources": {"gpus": 1}}]}))
        .await;
    fleet
        .wait_job(&blocker, T, "the blocker to run", |s| {
            s["status"] == "RUNNING"
        })
        .await;
    let big = fleet
        .submit(&json!({"name": "big", "tasks": [{"command": ["true"], "resources": {"gpus": 2}}]}))
        .await;
    // Small one-GPU tasks, submitted after the big one, keep the other GPU
    // busy: without a hold the big task would wait for all of them.
    let smalls: Vec<Value> = (0..40)
        .map(|_| json!({"command": ["sleep", "0.3"], "resources": {"gpus": 1}}))
        .collect();
    let small = fleet
        .submit(&json!({"name": "small", "tasks": smalls}))
        .await;
    // After `starvation_after` (5s in tests) the worker is held for it.
    fleet
        .wait_job(&big, T, "a worker held for the big task", |s| {
            s["reason"]
                .as_str()
                .is_some_and(|r| r.contains("a worker is held for it"))
        })
        .await;
    std::fs::write(&release, "").unwrap();
    let status = fleet.wait_finished(&big, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED");
    let small_now = fleet.get(&small).await;
    let left = small_now["counts"]["queued"].as_u64().unwrap();
    assert!(
        left >= 10,
        "the big task ran only after the small ones: {left} queued"
    );
    let small_done = fleet.wait_finished(&small, T).await;
    assert_eq!(small_done["status"], "FINISHED:COMPLETED");
}

/// How many coordinators answer `$SRV.PING.gpufleet` within a moment.
async fn serving_coordinators(client: &async_nats::Client) -> usize {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.PING.gpufleet", inbox, Bytes::new())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut n = 0;
    // Replies come within milliseconds; a second is far past the last.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), replies.next()).await {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_coordinator_takes_over_when_the_leader_dies() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(2.0)).await;
    let mut standby =
        gpufleet_testkit::Proc::spawn("gpufleet-coordinator", &fleet.coordinator_args(), &[]);
    let client = fleet.client().await;
    gpufleet_testkit::eventually(T, "the standby to say it stands by", || {
        let out = standby.output();
        async move { out.contains("standing by").then_some(()) }
    })
    .await;
    assert_eq!(
        serving_coordinators(&client).await,
        1,
        "a standby must not serve"
    );

    let tasks: Vec<Value> = (0..20)
        .map(|i| json!({"command": ["sh", "-c", format!("sleep 0.{}; echo '{{\"i\": {i}}}' > $GPUFLEET_RESULT", i % 5)], "resources": {"cpus": 0.5}}))
        .collect();
    let id = fleet.submit(&json!({"tasks": tasks})).await;
    fleet
        .wait_job(&id, T, "some tasks done", |s| {
            s["counts"]["succeeded"].as_u64() >= Some(3)
        })
        .await;
    fleet.coordinator.as_mut().unwrap().kill9();
    // It leads before it serves (it restores first): wait for the API.
    gpufleet_testkit::eventually(T, "the standby to lead and serve", || {
        let out = standby.output();
        async move { out.contains("serving the gpufleet API").then_some(()) }
    })
    .await;
    // It serves once it has restored the fleet's state.
    gpufleet_testkit::eventually(T, "the new leader to serve", || {
        let client = client.clone();
        let id = id.clone();
        async move {
            api(&client, "gpufleet.api.jobs.get", &json!({"job_id": id}))
                .await
                .ok()
        }
    })
    .await;
    // It serves the API only once it has restored the jobs and caught up
    // with the leases and results: a moment after it says it leads.
    gpufleet_testkit::eventually(T, "the new leader to serve", || {
        let client = client.clone();
        let id = id.clone();
        async move {
            let get = json!({"job_id": id});
            gpufleet_testkit::api(&client, "gpufleet.api.jobs.get", &get)
                .await
                .ok()
        }
    })
    .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    for (i, t) in status["tasks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(t["result"]["i"], i);
        assert_eq!(t["attempt"], 1, "{t}");
    }
    assert_eq!(serving_coordinators(&client).await, 1);
    standby.sigterm();
    assert!(standby.wait_exit(T).is_some_and(|s| s.success()));
}

/// What a confused or hostile worker can get from the leader's promise to
/// hear it alive: an answer capped at ten minutes, whatever TTL it asks,
/// and nothing at all for a request that does not decode (the responder
/// goes on serving the next one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alive_promise_is_capped_and_a_garbled_ask_gets_no_answer() {
    use futures::StreamExt;
    use gpufleet_schema::{codec, subjects, AliveAsk, AliveHeard, Dur, WorkerId};

    let fleet = Fleet::start().await;
    let client = fleet.client().await;
    let mut answers = client.subscribe("_INBOX.alive-test.>").await.unwrap();
    let subject = subjects::alive(&WorkerId::new("w9").unwrap());
    let greedy = AliveAsk {
        instance: "hostile".into(),
        ttl: Dur::secs(365 * 24 * 3600),
    };
    client
        .publish_with_reply(
            subject.clone(),
            "_INBOX.alive-test.garbled",
            Bytes::from_static(b"\xc1 not msgpack"),
        )
        .await
        .unwrap();
    client
        .publish_with_reply(
            subject,
            "_INBOX.alive-test.greedy",
            codec::encode(&greedy).unwrap().into(),
        )
        .await
        .unwrap();
    // The responder takes requests in order and one connection delivers
    // its answers in order: an answer to the garbled one would come first.
    let answer = tokio::time::timeout(T, answers.next())
        .await
        .expect("an answer to the well-formed ask")
        .unwrap();
    assert_eq!(answer.subject.as_str(), "_INBOX.alive-test.greedy");
    let heard: AliveHeard = codec::decode(&answer.payload).unwrap();
    assert_eq!(
        heard.ttl,
        Dur::secs(600),
        "a year asked, {heard:?} promised"
    );
}
