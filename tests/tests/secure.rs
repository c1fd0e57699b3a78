//! A fleet with roles, end to end: `gpufleet auth` writes the keys, the
//! settings and the nats-server configuration; the real server, the real
//! coordinator and workers run from them; people use the real `gpufleet`
//! as their user. What each role may do works, and what it may not is
//! refused, by the server or by the program that checks.

use std::time::Duration;

use bytes::Bytes;
use gpufleet_natsutil::{events, RawKv};
use gpufleet_schema::roles::Role;
use gpufleet_schema::subjects::{self, Sender};
use gpufleet_schema::{codec, Event, EventBody, EventKind, JobId, TaskId, TaskOutcome, TaskState};
use gpufleet_testkit::secure::{user, worker, SecureFleet};
use gpufleet_testkit::{eventually, WorkerSpec};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes a job file into the fleet's folder; returns its path.
fn job_file(fleet: &SecureFleet, name: &str, job: &Value) -> String {
    let path = fleet.dir().join(name);
    std::fs::write(&path, job.to_string()).unwrap();
    path.display().to_string()
}

async fn submit(fleet: &SecureFleet, as_user: &str, name: &str, job: &Value) -> String {
    let file = job_file(fleet, name, job);
    let reply = fleet.json(as_user, &["submit", &file]).await;
    reply["job_id"].as_str().expect("a job id").to_string()
}

async fn status(fleet: &SecureFleet, as_user: &str, job: &str) -> Value {
    fleet.json(as_user, &["status", job]).await
}

async fn wait_state(fleet: &SecureFleet, as_user: &str, job: &str, want: &str) -> Value {
    eventually(T, &format!("job {job} to be {want}"), || async move {
        let s = status(fleet, as_user, job).await;
        (s["status"] == want).then_some(s)
    })
    .await
}

/// Whether the coordinator (which may read everything) finds a message
/// stored on `subject` of `stream`.
async fn stored(fleet: &SecureFleet, stream: &str, subject: &str) -> bool {
    let js = async_nats::jetstream::new(fleet.client_as(&Role::Coordinator).await);
    js.get_stream_no_info(stream)
        .await
        .unwrap()
        .direct_get_last_for_subject(subject)
        .await
        .is_ok()
}

/// Publishes as `client` and makes sure the server has read it.
async fn publish_raw(client: &async_nats::Client, subject: String, body: Bytes) {
    client.publish(subject, body).await.unwrap();
    client.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_fleet_works_under_least_privilege() {
    let mut fleet = SecureFleet::start(&["w1", "w2"], &["alice"], &["root"]).await;
    fleet.add_worker(WorkerSpec::new("w1").gpus("1x24GiB:L4").cpus(2.0));
    fleet.add_worker(WorkerSpec::new("w2").gpus("1x24GiB:L4").cpus(2.0));
    fleet.wait_worker_listed("alice", "w1").await;
    fleet.wait_worker_listed("alice", "w2").await;

    // Submit, place, run; logs, progress, a result and artifacts, followed
    // to the end by alice's own `gpufleet`.
    let script = "echo hello from $GPUFLEET_TASK_ID; echo '{\"step\": 1}' >> $GPUFLEET_EVENTS; \
                  mkdir -p out && echo weights > out/model.bin; echo '{\"loss\": 0.5}' > $GPUFLEET_RESULT";
    let file = job_file(
        &fleet,
        "train.json",
        &json!({"name": "train", "tasks": [{"name": "t", "command": ["sh", "-c", script],
            "resources": {"gpus": 1}, "artifacts": ["out/*.bin"]}]}),
    );
    let out = fleet
        .gpufleet("alice", &["submit", &file, "--follow"])
        .await;
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("hello from"), "{said}");
    let list = fleet.json("alice", &["list"]).await;
    let job = list[0]["job_id"].as_str().unwrap().to_string();
    let s = status(&fleet, "alice", &job).await;
    assert_eq!(s["owner"], "alice");
    assert_eq!(s["status"], "FINISHED:COMPLETED");
    assert_eq!(s["tasks"][0]["result"], json!({"loss": 0.5}));
    let out = fleet.gpufleet("alice", &["logs", &job]).await;
    assert!(text(&out).contains("hello from"), "{}", text(&out));
    let arts = fleet.json("alice", &["artifacts", "list", &job]).await;
    assert_eq!(arts[0]["name"], "out/model.bin", "{arts}");
    let got = fleet.dir().join("model.bin");
    let out = fleet
        .gpufleet(
            "alice",
            &[
                "artifacts",
                "get",
                &job,
                "t",
                "out/model.bin",
                "-o",
                got.to_str().unwrap(),
            ],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "weights\n");

    // A gang across both workers.
    let gang = submit(
        &fleet,
        "alice",
        "gang.json",
        &json!({"gang": true, "tasks": [
            {"command": ["sh", "-c", "echo rank $GPUFLEET_RANK of $GPUFLEET_WORLD_SIZE"], "resources": {"gpus": 1}},
            {"command": ["sh", "-c", "echo rank $GPUFLEET_RANK of $GPUFLEET_WORLD_SIZE"], "resources": {"gpus": 1}}]}),
    )
    .await;
    let done = wait_state(&fleet, "alice", &gang, "FINISHED:COMPLETED").await;
    let workers: Vec<&str> = done["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().unwrap())
        .collect();
    assert_ne!(workers[0], workers[1], "one rank per worker");

    // Cancel a running job.
    let long = submit(
        &fleet,
        "alice",
        "long.json",
        &json!({"tasks": [{"command": ["sleep", "300"], "resources": {"cpus": 0.5}}]}),
    )
    .await;
    eventually(T, "the long task to run", || async {
        let s = status(&fleet, "alice", &long).await;
        (s["tasks"][0]["state"] == "RUNNING").then_some(())
    })
    .await;
    let out = fleet.gpufleet("alice", &["cancel", &long, "--wait"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(
        status(&fleet, "alice", &long).await["status"],
        "FINISHED:ABORTED"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_kept_apart_and_an_admin_sees_everything() {
    let mut fleet = SecureFleet::start(&["w1"], &["alice", "bob"], &["root"]).await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(2.0));
    fleet.wait_worker_listed("alice", "w1").await;
    let job = submit(
        &fleet,
        "alice",
        "a.json",
        &json!({"tasks": [{"command": ["sh", "-c", "echo secret-output; sleep 300"], "resources": {"cpus": 0.5}}]}),
    )
    .await;
    eventually(T, "alice's task to run and print", || async {
        let out = fleet.gpufleet("alice", &["logs", &job]).await;
        text(&out).contains("secret-output").then_some(())
    })
    .await;

    // Bob: not found, whatever he asks; his list is empty.
    for args in [
        vec!["status", job.as_str()],
        vec!["cancel", job.as_str()],
        vec!["logs", job.as_str()],
        vec!["artifacts", "list", job.as_str()],
    ] {
        let out = fleet.gpufleet("bob", &args).await;
        assert!(!out.status.success(), "bob ran {args:?}: {}", text(&out));
        assert!(text(&out).contains("not found"), "{args:?}: {}", text(&out));
    }
    assert_eq!(fleet.json("bob", &["list"]).await, json!([]));
    assert_eq!(
        status(&fleet, "alice", &job).await["tasks"][0]["state"],
        "RUNNING",
        "bob's cancel changed nothing"
    );

    // Nor by going around the API: bob's consumer on alice's events is
    // refused; he cannot write a lease, an advert or an event.
    let bob = fleet.client_as(&Role::User(user("bob"))).await;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(bob.clone());
    let alice_events = subjects::user_events(&user("alice"));
    let replay = events::Replay::start(
        &js,
        subjects::EVENTS_STREAM,
        vec![alice_events],
        1,
        events::Until::CaughtUp,
    )
    .await;
    let leaked = match replay {
        Err(_) => false,
        Ok(mut r) => matches!(r.next().await, Some(Ok(_))),
    };
    assert!(!leaked, "bob read alice's events");
    // Her artifacts' consumer is refused outright (she has none to leak).
    let artifacts = events::Replay::start(
        &js,
        subjects::ARTIFACTS_STREAM,
        vec![subjects::user_artifacts(&user("alice"))],
        1,
        events::Until::CaughtUp,
    )
    .await;
    assert!(artifacts.is_err(), "bob may replay alice's artifacts");
    let job_id = JobId::new(job.clone()).unwrap();
    let task = TaskId::for_index(&job_id, 0);
    let writes = [
        (
            subjects::kv_stream(subjects::LEASES_BUCKET),
            subjects::kv_subject(
                subjects::LEASES_BUCKET,
                &subjects::lease_key(&worker("w1"), &task, 9),
            ),
        ),
        (
            subjects::kv_stream(subjects::WORKERS_BUCKET),
            subjects::kv_subject(subjects::WORKERS_BUCKET, "fake"),
        ),
        (
            subjects::EVENTS_STREAM.to_string(),
            subjects::events(
                &user("bob"),
                &job_id,
                &task,
                EventKind::Log,
                &Sender::Worker(worker("w1")),
            ),
        ),
    ];
    for (stream, subject) in writes {
        publish_raw(&bob, subject.clone(), Bytes::from_static(b"x")).await;
        assert!(
            !stored(&fleet, &stream, &subject).await,
            "bob wrote {subject}"
        );
    }

    // The admin sees it, reads its output and cancels it.
    let s = status(&fleet, "root", &job).await;
    assert_eq!(s["owner"], "alice");
    let listed = fleet.json("root", &["list"]).await;
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["job_id"] == job));
    let out = fleet.gpufleet("root", &["logs", &job]).await;
    assert!(text(&out).contains("secret-output"), "{}", text(&out));
    let out = fleet.gpufleet("root", &["cancel", &job, "--wait"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_act_for_another_and_a_result_for_a_task_it_does_not_hold_is_refused() {
    let mut fleet = SecureFleet::start(&["w1", "w2"], &["alice"], &[]).await;
    let marker = fleet.dir().join("release");
    fleet.add_worker(WorkerSpec::new("w1").cpus(1.0));
    fleet.wait_worker_listed("alice", "w1").await;
    // Runs until the test lets it end.
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.1; done; echo '{{\"real\": true}}' > $GPUFLEET_RESULT",
        marker.display()
    );
    let job = submit(
        &fleet,
        "alice",
        "j.json",
        &json!({"tasks": [{"command": ["sh", "-c", script], "resources": {"cpus": 1}}]}),
    )
    .await;
    let s = eventually(T, "the task to run on w1", || async {
        let s = status(&fleet, "alice", &job).await;
        (s["tasks"][0]["state"] == "RUNNING").then_some(s)
    })
    .await;
    assert_eq!(s["tasks"][0]["worker"], "w1");
    fleet.add_worker(WorkerSpec::new("w2").cpus(1.0));
    fleet.wait_worker_listed("alice", "w2").await;

    let w2 = fleet.client_as(&Role::Worker(worker("w2"))).await;
    let job_id = JobId::new(job.clone()).unwrap();
    let task = TaskId::for_index(&job_id, 0);
    // w2 cannot write w1's advert or leases, nor publish as w1.
    for (stream, subject) in [
        (
            subjects::kv_stream(subjects::WORKERS_BUCKET),
            subjects::kv_subject(subjects::WORKERS_BUCKET, "w1"),
        ),
        (
            subjects::kv_stream(subjects::LEASES_BUCKET),
            subjects::kv_subject(
                subjects::LEASES_BUCKET,
                &subjects::lease_key(&worker("w1"), &task, 1),
            ),
        ),
        (
            subjects::EVENTS_STREAM.to_string(),
            subjects::events(
                &user("alice"),
                &job_id,
                &task,
                EventKind::Result,
                &Sender::Worker(worker("w1")),
            ),
        ),
    ] {
        let before = stored_seq(&fleet, &stream, &subject).await;
        publish_raw(&w2, subject.clone(), Bytes::from_static(b"x")).await;
        assert_eq!(
            stored_seq(&fleet, &stream, &subject).await,
            before,
            "w2 wrote {subject}"
        );
    }
    // Under its own name it may publish a result for w1's task, with
    // everything public about the attempt: it is stored, and refused.
    let forged = Event {
        job_id: job_id.clone(),
        task_id: task.clone(),
        attempt: 1,
        worker: Some(worker("w2")),
        lease_rev: Some(1),
        at: time::OffsetDateTime::now_utc(),
        body: EventBody::Result(TaskOutcome {
            state: TaskState::Succeeded,
            exit_code: Some(0),
            signal: None,
            result: Some(json!({"forged": true})),
            error: None,
            artifacts: vec![],
            started_at: None,
            finished_at: time::OffsetDateTime::now_utc(),
            usage: None,
        }),
        token: Some("guessed".into()),
    };
    let subject = subjects::events(
        &user("alice"),
        &job_id,
        &task,
        EventKind::Result,
        &Sender::Worker(worker("w2")),
    );
    let w2_js = async_nats::jetstream::new(w2.clone());
    events::publish(
        &w2_js,
        subject,
        Bytes::from(codec::encode(&forged).unwrap()),
        None,
    )
    .await
    .expect("a worker publishes under its own name");
    std::fs::write(&marker, "").unwrap();
    let s = wait_state(&fleet, "alice", &job, "FINISHED:COMPLETED").await;
    assert_eq!(s["tasks"][0]["result"], json!({"real": true}), "{s:#}");
    let log = fleet.coordinator.as_ref().unwrap().output();
    assert!(
        log.contains("refused a result") && log.contains("sent by w2, not by its worker"),
        "{log}"
    );
}

/// The sequence of the last message on `subject` (0 if none), as the
/// coordinator reads it.
async fn stored_seq(fleet: &SecureFleet, stream: &str, subject: &str) -> u64 {
    let js = async_nats::jetstream::new(fleet.client_as(&Role::Coordinator).await);
    js.get_stream_no_info(stream)
        .await
        .unwrap()
        .direct_get_last_for_subject(subject)
        .await
        .map_or(0, |m| m.sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_without_a_trusted_signature_is_refused_and_placed_again() {
    let mut fleet = SecureFleet::start(&["w1", "w2"], &["alice"], &[]).await;
    // w1 trusts another key than the coordinator's: every reservation it
    // gets is one it cannot trust.
    let stranger = nkeys::KeyPair::new_account().public_key();
    let w1_conf = fleet.auth.join("worker-w1.toml");
    let text_w1 = std::fs::read_to_string(&w1_conf).unwrap();
    let trusted = text_w1
        .lines()
        .find(|l| l.starts_with("trusted_keys"))
        .unwrap()
        .to_string();
    std::fs::write(
        &w1_conf,
        text_w1.replace(&trusted, &format!("trusted_keys = [\"{stranger}\"]")),
    )
    .unwrap();
    fleet.add_worker(WorkerSpec::new("w1").cpus(1.0));
    fleet.wait_worker_listed("alice", "w1").await;
    let ran = fleet.dir().join("ran");
    let job = submit(
        &fleet,
        "alice",
        "j.json",
        &json!({"tasks": [{"command": ["sh", "-c", format!("echo $GPUFLEET_TASK_ID >> {}", ran.display())],
            "resources": {"cpus": 1}}]}),
    )
    .await;
    // Refused by w1, with the reason recorded (in the state event that
    // queues it again, as alice reads her job's events).
    let alice = async_nats::jetstream::new(fleet.client_as(&Role::User(user("alice"))).await);
    let job_id = JobId::new(job.clone()).unwrap();
    let mut replay = events::Replay::start(
        &alice,
        subjects::EVENTS_STREAM,
        vec![subjects::job_events(&user("alice"), &job_id)],
        1,
        events::Until::Live,
    )
    .await
    .unwrap();
    gpufleet_testkit::with_deadline(T, "w1 to refuse the reservation", async {
        loop {
            let Some(Ok(r)) = replay.next().await else {
                continue;
            };
            let Ok(ev) = codec::decode::<Event>(&r.message.payload) else {
                continue;
            };
            if let EventBody::State {
                state: TaskState::Queued,
                reason: Some(reason),
                ..
            } = &ev.body
            {
                if reason.contains("worker w1 refused it") && reason.contains("does not trust") {
                    return;
                }
            }
        }
    })
    .await;
    assert!(!ran.exists(), "w1 ran what it could not trust");
    // Placed again on a worker that trusts the coordinator, where it runs.
    fleet.add_worker(WorkerSpec::new("w2").cpus(1.0));
    let s = wait_state(&fleet, "alice", &job, "FINISHED:COMPLETED").await;
    assert_eq!(s["tasks"][0]["worker"], "w2");
    assert_eq!(std::fs::read_to_string(&ran).unwrap().lines().count(), 1);

    // A reservation written behind the coordinator's back (here with the
    // coordinator's own NATS key, but no signature) is refused too, and
    // nothing of it runs.
    let forged_ran = fleet.dir().join("forged-ran");
    let js = async_nats::jetstream::new(fleet.client_as(&Role::Coordinator).await);
    let leases = RawKv::open(&js, subjects::LEASES_BUCKET).await.unwrap();
    let fake_job = JobId::new("forged").unwrap();
    let fake_task = TaskId::for_index(&fake_job, 0);
    let key = subjects::lease_key(&worker("w2"), &fake_task, 1);
    let mut lease: gpufleet_schema::Lease = serde_json::from_value(json!({
        "owner": "alice", "job_id": "forged", "task_id": "forged-0", "attempt": 1,
        "worker": "w2", "state": "RESERVED",
        "task": {"command": ["sh", "-c", format!("touch {}", forged_ran.display())]},
        "grant": {"cpus_milli": 100, "memory": 0}, "lease_ttl": 30,
        "reserved_at": "2026-01-01T00:00:00Z", "token": "t"}))
    .unwrap();
    lease.signer = Some(stranger.clone());
    lease.signature = Some("AAAA".into());
    // The coordinator purges a refusal as soon as it sees it: watch for it.
    let mut watch = leases.watch(&key).await.unwrap();
    leases
        .create(
            &key,
            Bytes::from(codec::encode(&lease).unwrap()),
            Some(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let refused =
        gpufleet_testkit::with_deadline(T, "w2 to refuse the forged reservation", async {
            loop {
                let c = match watch.next().await.expect("the watch goes on") {
                    Ok(gpufleet_natsutil::KvEvent::Change(c)) => c,
                    _ => continue,
                };
                if let Ok(l) = codec::decode::<gpufleet_schema::Lease>(&c.value) {
                    if l.state == gpufleet_schema::LeaseState::Rejected {
                        break l;
                    }
                }
            }
        })
        .await;
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("does not trust"),
        "{refused:?}"
    );
    assert!(!forged_ran.exists(), "w2 ran a reservation nobody signed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_but_a_coordinator_moves_the_leader_key() {
    let mut fleet = SecureFleet::start(&["w1"], &["alice"], &["root"]).await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(1.0));
    fleet.wait_worker_listed("alice", "w1").await;
    let jobs_stream = subjects::kv_stream(subjects::JOBS_BUCKET);
    let leader = subjects::kv_subject(subjects::JOBS_BUCKET, subjects::LEADER_KEY);
    let held = stored_seq(&fleet, &jobs_stream, &leader).await;
    assert!(held > 0, "the coordinator holds the leader key");
    for role in [
        Role::User(user("alice")),
        Role::Admin(user("root")),
        Role::Worker(worker("w1")),
    ] {
        let client = fleet.client_as(&role).await;
        // A put and a purge, as the old one-line takeover did.
        publish_raw(&client, leader.clone(), Bytes::from_static(b"mine")).await;
        let mut purge = async_nats::HeaderMap::new();
        purge.insert("KV-Operation", "PURGE");
        client
            .publish_with_headers(leader.clone(), purge, Bytes::new())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let now = stored_seq(&fleet, &jobs_stream, &leader).await;
        let js = async_nats::jetstream::new(fleet.client_as(&Role::Coordinator).await);
        let value = js
            .get_stream_no_info(&jobs_stream)
            .await
            .unwrap()
            .direct_get_last_for_subject(leader.as_str())
            .await
            .unwrap();
        assert_ne!(
            value.payload.as_ref(),
            b"mine",
            "{role:?} moved the leader key"
        );
        assert!(now >= held, "{role:?}");
    }
    // The coordinator still leads and serves.
    let job = submit(
        &fleet,
        "alice",
        "j.json",
        &json!({"tasks": [{"command": ["true"], "resources": {"cpus": 0.5}}]}),
    )
    .await;
    wait_state(&fleet, "alice", &job, "FINISHED:COMPLETED").await;
}
