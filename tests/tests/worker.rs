//! The worker (issue 3) end to end: real `gpufleet-worker` and
//! `gpufleet-coordinator` processes over a real nats-server, running real
//! child processes (shell scripts that wait on files, print a lot, ignore
//! SIGTERM, allocate memory, write results and artifacts).
//!
//! Tasks are steered through a control directory (`$CTL`): a task writes
//! its pid or environment there and waits for a `go` file the test creates,
//! so that every wait in here is on something that happens (a KV change, a
//! stored event, a file a task wrote), each with a deadline.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use bytes::Bytes;
use gpufleet_natsutil::{artifacts, KvChange, KvEvent, KvOp, KvWatcher, RawKv};
use gpufleet_schema::{
    codec, subjects, ByteSize, Dur, Event, EventBody, GpuGrant, Grant, JobId, Lease, LeaseState,
    LogStream, TaskId, TaskOutcome, TaskState, UserId, WorkerAdvert, WorkerId,
};
use gpufleet_testkit::proxy::Proxy;
use gpufleet_testkit::{
    eventually, pids, state_events, task_states, task_states_read, with_deadline, Fleet, WorkerSpec,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Generous: two cores shared with builds.
const T: Duration = Duration::from_secs(60);
/// The fleet's advert TTL (`--advert-ttl 2s` in the test kit).
const ADVERT_TTL: Duration = Duration::from_secs(2);
const GIB: u64 = 1 << 30;

// ----- helpers -----

/// A fresh control directory for a test's tasks, passed to them as `$CTL`.
fn ctl(fleet: &Fleet, name: &str) -> PathBuf {
    let dir = fleet.dir().join(format!("ctl-{name}"));
    std::fs::create_dir_all(&dir).expect("create the control directory");
    gpufleet_testkit::open_to_tasks(&dir);
    dir
}

fn touch(path: &Path) {
    std::fs::write(path, b"").expect("touch a control file");
}

/// Shell that writes the shell's pid to `$CTL/<name>` atomically.
fn write_pid(name: &str) -> String {
    format!(r#"echo $$ > "$CTL/{name}.tmp" && mv "$CTL/{name}.tmp" "$CTL/{name}";"#)
}

/// Shell that waits until `$CTL/<name>` exists.
fn wait_for(name: &str) -> String {
    format!(r#"while [ ! -e "$CTL/{name}" ]; do sleep 0.05; done;"#)
}

/// Waits until a task has written `path`; returns its content.
async fn wait_file(path: &Path) -> String {
    let p = path.to_path_buf();
    eventually(T, &format!("{} to be written", path.display()), || {
        let p = p.clone();
        async move { std::fs::read_to_string(&p).ok() }
    })
    .await
}

async fn wait_pid(path: &Path) -> i32 {
    wait_file(path)
        .await
        .trim()
        .parse()
        .expect("a pid in the file")
}

async fn wait_gone(pid: i32, what: &str) {
    eventually(T, what, || async move { pids::gone(pid).then_some(()) }).await
}

async fn bucket(fleet: &Fleet, name: &str) -> RawKv {
    let js = jetstream::new(fleet.client().await);
    RawKv::open(&js, name).await.expect("open bucket")
}

/// The next change of a watch that satisfies `pred`.
async fn next_change(
    watch: &mut KvWatcher,
    deadline: Duration,
    what: &str,
    mut pred: impl FnMut(&KvChange) -> bool,
) -> KvChange {
    with_deadline(deadline, what, async {
        loop {
            match watch.next().await {
                Some(Ok(KvEvent::Change(c))) if pred(&c) => return c,
                Some(Ok(_)) => {}
                Some(Err(e)) => eprintln!("watch error (continuing): {e}"),
                None => panic!("the watch ended while waiting for {what}"),
            }
        }
    })
    .await
}

/// The next advert on a watch of the workers bucket that satisfies `pred`.
async fn next_advert(
    watch: &mut KvWatcher,
    what: &str,
    pred: impl Fn(&WorkerAdvert) -> bool,
) -> WorkerAdvert {
    let c = next_change(watch, T, what, |c| {
        c.op == KvOp::Put && codec::decode::<WorkerAdvert>(&c.value).is_ok_and(|a| pred(&a))
    })
    .await;
    codec::decode(&c.value).unwrap()
}

fn decode_lease(c: &KvChange) -> Option<Lease> {
    (c.op == KvOp::Put)
        .then(|| codec::decode::<Lease>(&c.value).ok())
        .flatten()
}

fn outcomes(evs: &[Event]) -> Vec<(usize, &Event, &TaskOutcome)> {
    evs.iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.body {
            EventBody::Result(o) => Some((i, e, o)),
            _ => None,
        })
        .collect()
}

/// Waits, without blocking the runtime, for a program to exit.
fn wait_exit(fleet: &mut Fleet, name: &str) -> std::process::ExitStatus {
    let proc = fleet.worker(name);
    tokio::task::block_in_place(|| proc.wait_exit(T))
        .unwrap_or_else(|| panic!("{name} did not exit within {T:?}"))
}

/// Runs a one-task job whose task starts a process of its own, as
/// torchrun would, and waits for both: the job, the task's pid and its
/// child's.
async fn run_a_parent(fleet: &Fleet, name: &str) -> (String, i32, i32) {
    let ctl = ctl(fleet, name);
    let script = format!(
        r#"sleep 600 & echo $! > "$CTL/child.tmp" && mv "$CTL/child.tmp" "$CTL/child"; {} wait"#,
        write_pid("pid")
    );
    let id = fleet
        .submit(&json!({"max_retries": 0, "tasks": [{
            "command": ["sh", "-c", script],
            "env": {"CTL": ctl}, "resources": {"cpus": 0.5}}]}))
        .await;
    let task_pid = wait_pid(&ctl.join("pid")).await;
    let grandchild = wait_pid(&ctl.join("child")).await;
    (id, task_pid, grandchild)
}

/// The worker's watchdog process, among its children, once it runs.
async fn watchdog_of(fleet: &mut Fleet, worker: &str, not: Option<u32>) -> u32 {
    let pid = fleet.worker(worker).pid();
    eventually(T, "the worker's watchdog to run", || async move {
        pids::children(pid)
            .into_iter()
            .find(|&c| Some(c) != not && pids::alive(c, gpufleet_worker::watchdog::NAME))
    })
    .await
}

/// A watchdog killed is started again and told what its predecessor
/// watched: the worker, frozen after that, still has its task stopped
/// (the worker's own fence is frozen with it, so only the new watchdog
/// can).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_watchdog_is_started_again_and_still_stops_the_tasks_of_a_frozen_worker() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let (_, task_pid, grandchild) = run_a_parent(&fleet, "watchdog-again").await;

    let first = watchdog_of(&mut fleet, "w1", None).await;
    let status = std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let second = watchdog_of(&mut fleet, "w1", Some(first)).await;
    assert!(
        pids::exists(task_pid),
        "killing the watchdog killed the task"
    );
    eprintln!("watchdog {first} killed, {second} started");

    fleet.worker("w1").sigstop();
    wait_gone(
        task_pid,
        "the new watchdog to stop the frozen worker's task",
    )
    .await;
    wait_gone(grandchild, "the new watchdog to stop what the task started").await;
    fleet.worker("w1").sigcont();
}

// ----- 1. adverts -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_kill_9_leaves_the_fleet_within_its_advert_ttl() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let (id, task_pid, grandchild) = run_a_parent(&fleet, "kill9").await;

    let workers = bucket(&fleet, subjects::WORKERS_BUCKET).await;
    let mut watch = workers.watch("w1").await.unwrap();
    next_change(&mut watch, T, "w1's advert", |c| c.op == KvOp::Put).await;
    fleet.worker("w1").kill9();
    let killed = Instant::now();
    let gone = next_change(&mut watch, T, "w1's advert to go", |c| c.op != KvOp::Put).await;
    let after = killed.elapsed();
    eprintln!("kill -9: the advert expired {after:?} after the kill (advert ttl {ADVERT_TTL:?})");
    assert_eq!(gone.op, KvOp::Expired, "nobody purged it: it expired");
    // The last heartbeat came at most one interval before the kill; the
    // server expires on a ~250 ms tick; a second of slack for a busy box.
    assert!(
        after <= ADVERT_TTL + Duration::from_secs(1),
        "the advert outlived its TTL: {after:?}"
    );

    // Its task died with it (PR_SET_PDEATHSIG, and its watchdog, which
    // kills the task's whole group), and the coordinator saw both the
    // worker and its lease go.
    wait_gone(task_pid, "the task to die with its worker").await;
    wait_gone(grandchild, "the watchdog to kill what the task started").await;
    fleet.wait_worker_listed("w1", false).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["tasks"][0]["state"], "LOST", "{status:#}");
    assert_eq!(status["status"], "FINISHED:EXECUTION_EXCEPTION");

    // The killed worker could not remove its task's directory; started
    // again on the same work dir, it does before it takes work.
    let left = fleet.dir().join(format!("work-w1/{id}-0-1"));
    assert!(left.join("work").is_dir());
    fleet.add_worker(WorkerSpec::new("w1")).await;
    assert!(!left.exists(), "{} was cleaned up", left.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advert_shows_totals_free_memory_running_tasks_labels_version_and_draining() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(
            WorkerSpec::new("w1")
                .gpus("2x24GiB:L4")
                .cpus(3.0)
                .labels("zone=a,rack=r7"),
        )
        .await;
    let ctl = ctl(&fleet, "advert");
    let dump = format!(
        r#"{{ env; echo "PWD_REAL=$(pwd -P)"; }} > "$CTL/env-$GPUFLEET_TASK_ID.tmp" && mv "$CTL/env-$GPUFLEET_TASK_ID.tmp" "$CTL/env-$GPUFLEET_TASK_ID"; {}"#,
        wait_for("go")
    );
    let id = fleet
        .submit(&json!({"id": "adv", "tasks": [
            {"name": "share", "command": ["sh", "-c", dump], "env": {"CTL": ctl},
             "resources": {"gpus": 0, "gpu_memory": "10GiB", "cpus": 1}},
            {"name": "whole", "command": ["sh", "-c", dump], "env": {"CTL": ctl},
             "resources": {"gpus": 1, "gpu_memory": "8GiB", "cpus": 1}},
        ]}))
        .await;
    let env_share = parse_env(&wait_file(&ctl.join("env-adv-0")).await);
    let env_whole = parse_env(&wait_file(&ctl.join("env-adv-1")).await);
    let status = fleet.get(&id).await;
    let gpu_of = |i: usize| status["tasks"][i]["gpus"][0].as_str().unwrap().to_string();
    let (share_gpu, whole_gpu) = (gpu_of(0), gpu_of(1));
    assert_ne!(share_gpu, whole_gpu);

    let workers = bucket(&fleet, subjects::WORKERS_BUCKET).await;
    let mut watch = workers.watch("w1").await.unwrap();
    let a = next_advert(&mut watch, "an advert listing both tasks", |a| {
        a.running.len() == 2
    })
    .await;
    let mut running: Vec<String> = a.running.iter().map(|t| t.to_string()).collect();
    running.sort();
    assert_eq!(running, vec!["adv-0", "adv-1"]);
    assert_eq!(a.name.as_str(), "w1");
    assert_eq!(a.version, gpufleet_schema::VERSION);
    assert_eq!(
        a.labels,
        BTreeMap::from([("zone".into(), "a".into()), ("rack".into(), "r7".into())])
    );
    assert_eq!(a.cpus_milli, 3000);
    assert!(a.memory_total.0 > 0);
    assert!(a.memory_available.0 > 0 && a.memory_available <= a.memory_total);
    assert!(!a.draining);
    assert_eq!(a.ttl.0, ADVERT_TTL);
    assert_eq!(a.gpus.len(), 2);
    for g in &a.gpus {
        assert!(g.simulated);
        assert_eq!(g.model, "L4");
        assert_eq!(g.memory_total.0, 24 * GIB);
        assert_eq!(g.memory_used.0 + g.memory_free.0, g.memory_total.0);
        assert_eq!(g.memory_unmanaged.0, 0);
        // Simulated used memory follows what the tasks reserved: a share
        // its size, a whole GPU all of it.
        let want_used = if g.uuid == share_gpu {
            10 * GIB
        } else {
            assert_eq!(g.uuid, whole_gpu);
            24 * GIB
        };
        assert_eq!(g.memory_used.0, want_used, "{g:?}");
    }

    // What each task saw.
    let index_of = |uuid: &str| {
        a.gpus
            .iter()
            .find(|g| g.uuid == uuid)
            .unwrap()
            .index
            .to_string()
    };
    for (env, task, gpu) in [
        (&env_share, "adv-0", &share_gpu),
        (&env_whole, "adv-1", &whole_gpu),
    ] {
        assert_eq!(env["GPUFLEET_JOB_ID"], "adv");
        assert_eq!(env["GPUFLEET_TASK_ID"], task);
        assert_eq!(env["GPUFLEET_ATTEMPT"], "1");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], index_of(gpu));
        assert_eq!(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
        assert_eq!(&env["GPUFLEET_GPUS"], gpu);
        assert_eq!(env["GPUFLEET_OUTPUT_DIR"], env["PWD_REAL"]);
        let work = fleet.dir().join(format!("work-w1/{task}-1/work"));
        assert_eq!(
            Path::new(&env["PWD_REAL"]),
            work.canonicalize().unwrap(),
            "each attempt runs in <work_dir>/<task>-<attempt>/work"
        );
        for f in ["GPUFLEET_RESULT", "GPUFLEET_EVENTS"] {
            assert!(
                !Path::new(&env[f]).starts_with(&env["PWD_REAL"]),
                "{f} is outside the output directory"
            );
        }
    }

    // When they end, the advert says so and the GPUs are free again.
    touch(&ctl.join("go"));
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let a = next_advert(&mut watch, "an idle advert", |a| {
        a.running.is_empty() && a.gpus.iter().all(|g| g.memory_used.0 == 0)
    })
    .await;
    assert!(a.gpus.iter().all(|g| g.memory_free.0 == 24 * GIB));
}

fn parse_env(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ----- 3. the worker's own accounting -----

fn rogue_lease(worker_field: &str, task: &str, grant: Grant, spec: Value) -> Lease {
    let task_id = TaskId::new(task).unwrap();
    Lease {
        job_id: task_id.job_and_index().unwrap().0,
        task_id,
        attempt: 1,
        worker: WorkerId::new(worker_field).unwrap(),
        state: LeaseState::Reserved,
        reason: None,
        task: serde_json::from_value(spec).unwrap(),
        grant,
        rendezvous: None,
        lease_ttl: Dur::secs(3),
        instance: None,
        reserved_at: time::OffsetDateTime::now_utc(),
        owner: UserId::default_user(),
        token: "rogue".into(),
        signer: None,
        signature: None,
        claim_rev: None,
        ready: false,
        gpu_grant: None,
        preempt: None,
    }
}

fn grant(cpus_milli: u64, memory: u64, gpus: &[(&str, u64)], exclusive: bool) -> Grant {
    Grant {
        gpus: gpus
            .iter()
            .enumerate()
            .map(|(i, (uuid, m))| GpuGrant {
                index: i as u32,
                uuid: uuid.to_string().into(),
                memory: ByteSize(*m),
            })
            .collect(),
        exclusive,
        cpus_milli,
        memory: ByteSize(memory),
        loading: false,
    }
}

/// Writes a reservation as a (second, stale) coordinator would, and
/// returns the worker's answer: the next state the key takes.
async fn reserve_directly(leases: &RawKv, key: &str, lease: &Lease) -> Lease {
    let mut watch = leases.watch(key).await.unwrap();
    leases
        .create(
            key,
            Bytes::from(codec::encode(lease).unwrap()),
            Some(Duration::from_secs(30)),
        )
        .await
        .expect("create the reservation");
    let c = next_change(
        &mut watch,
        T,
        &format!("the worker's answer to {key}"),
        |c| decode_lease(c).is_some_and(|l| l.state != LeaseState::Reserved),
    )
    .await;
    decode_lease(&c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_that_would_overcommit_the_worker_is_refused_with_a_reason() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("1x24GiB:L4").cpus(2.0))
        .await;
    let ctl = ctl(&fleet, "refuse");
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    let gpu = "GPU-sim-w1-0";
    let quick = json!({"command": ["true"]});

    // Each alone is more than the worker has.
    for (task, g, why) in [
        ("over-0", grant(4000, 0, &[], false), "not enough CPUs"),
        (
            "over-1",
            grant(500, 1 << 50, &[], false),
            "not enough memory",
        ),
        (
            "over-2",
            grant(500, 0, &[(gpu, 30 * GIB)], false),
            "GPU GPU-sim-w1-0 has 24GiB free",
        ),
        (
            "over-3",
            grant(500, 0, &[("GPU-nope", GIB)], true),
            "no GPU GPU-nope",
        ),
    ] {
        let key = format!("w1.{task}.1");
        let answer =
            reserve_directly(&leases, &key, &rogue_lease("w1", task, g, quick.clone())).await;
        assert_eq!(answer.state, LeaseState::Rejected, "{key}: {answer:?}");
        let reason = answer.reason.unwrap_or_default();
        assert!(reason.contains(why), "{key}: {reason}");
    }

    // A stale coordinator's reservation takes every CPU and the GPU whole.
    // Its `worker` field names another worker, so the live coordinator
    // does not count it against w1: its view of w1 is now wrong, as a
    // coordinator's is that has not yet seen another's reservation.
    let hog = rogue_lease(
        "elsewhere",
        "hog-0",
        grant(2000, 0, &[(gpu, 24 * GIB)], true),
        json!({"command": ["sh", "-c", wait_for("go")], "env": {"CTL": ctl}}),
    );
    let answer = reserve_directly(&leases, "w1.hog-0.1", &hog).await;
    assert_eq!(answer.state, LeaseState::Running, "{answer:?}");
    let answer = reserve_directly(
        &leases,
        "w1.share-0.1",
        &rogue_lease("w1", "share-0", grant(0, 0, &[(gpu, GIB)], false), quick),
    )
    .await;
    assert_eq!(answer.state, LeaseState::Rejected);
    assert!(
        answer.reason.as_deref().unwrap().contains("held whole"),
        "{answer:?}"
    );

    // The live coordinator places a job on w1; w1 refuses; the coordinator
    // records why and places it elsewhere.
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["true"], "resources": {"cpus": 1}}]}))
        .await;
    let refused = fleet.wait_event(&id, T, "the coordinator to record the refusal", |e| {
        matches!(&e.body, EventBody::State { state: TaskState::Queued, reason: Some(r), .. } if r.contains("refused"))
    })
    .await;
    let EventBody::State { reason, .. } = &refused.body else {
        unreachable!()
    };
    let reason = reason.as_deref().unwrap();
    assert!(
        reason.contains("worker w1 refused it: not enough CPUs"),
        "{reason}"
    );
    assert!(refused.worker.is_none(), "the coordinator's own event");
    fleet.add_worker(WorkerSpec::new("w2").cpus(2.0)).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    assert_eq!(status["tasks"][0]["worker"], "w2");
    touch(&ctl.join("go"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_the_coordinator_places_is_never_refused() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("2x24GiB:L4").cpus(2.0))
        .await;
    fleet
        .add_worker(WorkerSpec::new("w2").gpus("1x48GiB:L40S").cpus(2.0))
        .await;
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    let mut watch = leases.watch(">").await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Lease)>::new()));
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(item) = watch.next().await {
                if let Ok(KvEvent::Change(c)) = item {
                    if let Some(l) = decode_lease(&c) {
                        seen.lock().unwrap().push((c.key, l));
                    }
                }
            }
        })
    };

    // Whole GPUs, shares of several sizes and CPU tasks, in two jobs at
    // once, more than fits at a time.
    let task = |res: Value| json!({"command": ["sleep", "0.3"], "resources": res});
    let mut a = vec![];
    let mut b = vec![];
    for _ in 0..3 {
        a.push(task(
            json!({"gpus": 1, "gpu_memory": "16GiB", "cpus": 0.25}),
        ));
        a.push(task(json!({"gpus": 0, "gpu_memory": "8GiB", "cpus": 0.25})));
        b.push(task(
            json!({"gpus": 0, "gpu_memory": "20GiB", "cpus": 0.25}),
        ));
        b.push(task(json!({"cpus": 0.5, "memory": "64MiB"})));
        b.push(task(json!({"gpus": 0, "gpu_memory": "6GiB", "cpus": 0.5})));
    }
    let ja = fleet.submit(&json!({"tasks": a})).await;
    let jb = fleet.submit(&json!({"tasks": b})).await;
    for id in [&ja, &jb] {
        let status = fleet.wait_finished(id, T).await;
        assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
        assert!(
            status["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["attempt"] == 1),
            "{status:#}"
        );
        for (_, state, reason) in state_events(&fleet.events(id).await) {
            let reason = reason.unwrap_or_default();
            assert!(!reason.contains("refused"), "{state}: {reason}");
        }
    }
    collector.abort();
    let seen = seen.lock().unwrap();
    let claimed: HashSet<&str> = seen
        .iter()
        .filter(|(_, l)| l.state == LeaseState::Running)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(claimed.len(), 15, "every task claimed once");
    let refused: Vec<_> = seen
        .iter()
        .filter(|(_, l)| l.state == LeaseState::Rejected)
        .collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
}

// ----- 4. the supervisor -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_side_by_side_as_capacity_allows_each_in_its_own_group_and_directory() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(2.0)).await;
    let ctl = ctl(&fleet, "many");
    let script = format!(
        r#"echo "$(pwd -P) [${{CUDA_VISIBLE_DEVICES-unset}}]" > "$CTL/pwd-$GPUFLEET_TASK_ID.tmp"; mv "$CTL/pwd-$GPUFLEET_TASK_ID.tmp" "$CTL/pwd-$GPUFLEET_TASK_ID"; {} {} echo done"#,
        write_pid("pid-$GPUFLEET_TASK_ID"),
        wait_for("go")
    );
    let task =
        json!({"command": ["sh", "-c", script], "env": {"CTL": ctl}, "resources": {"cpus": 0.5}});
    // Four fit in two CPUs; the fifth waits.
    let id = fleet
        .submit(&json!({"id": "many", "tasks": [task, task, task, task, task]}))
        .await;

    let running = |s: &Value| task_states(s).iter().filter(|s| *s == "RUNNING").count();
    let status = fleet
        .wait_job(&id, T, "four tasks running", |s| running(s) == 4)
        .await;
    let states = task_states(&status);
    let workers = bucket(&fleet, subjects::WORKERS_BUCKET).await;
    let mut watch = workers.watch("w1").await.unwrap();
    next_advert(&mut watch, "an advert with four tasks", |a| {
        a.running.len() == 4
    })
    .await;
    let waiting = states
        .iter()
        .position(|s| s == "QUEUED")
        .expect("one waits");
    assert!(
        status["tasks"][waiting]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("CPU")),
        "the waiting task says why: {status:#}"
    );

    let worker_pgid = pids::pgid(fleet.worker("w1").pid());
    let mut dirs = HashSet::new();
    for i in (0..5).filter(|&i| i != waiting) {
        let task = format!("many-{i}");
        let pid = wait_pid(&ctl.join(format!("pid-{task}"))).await;
        // Its own process group, led by the task's main process.
        assert_eq!(pids::pgid(pid), pid, "{task} leads its own group");
        assert_ne!(pid, worker_pgid);
        let seen = wait_file(&ctl.join(format!("pwd-{task}"))).await;
        let want = fleet.dir().join(format!("work-w1/{task}-1/work"));
        let want = want.canonicalize().unwrap();
        // A CPU task sees no GPU: the variable is set, and empty.
        assert_eq!(seen.trim(), format!("{} []", want.display()));
        dirs.insert(want);
    }
    assert!(
        !ctl.join(format!("pid-many-{waiting}")).exists(),
        "the fifth task has not started"
    );

    touch(&ctl.join("go"));
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    // The advert drops a task once its attempt is over, directory included.
    next_advert(&mut watch, "an idle advert", |a| a.running.is_empty()).await;
    for d in &dirs {
        assert!(!d.exists(), "{} was removed", d.display());
        assert!(!d.parent().unwrap().exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_ends_the_task_timed_out_with_sigkill_after_the_grace() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(2.0)).await;
    let ctl = ctl(&fleet, "timeout");
    let stubborn = format!(
        r#"trap '' TERM; {} while :; do sleep 0.1; done"#,
        write_pid("stubborn")
    );
    let id = fleet
        .submit(&json!({"id": "to", "tasks": [
            {"command": ["sleep", "600"], "timeout": "1s", "resources": {"cpus": 0.5}},
            {"command": ["sh", "-c", stubborn], "env": {"CTL": ctl}, "timeout": "1s",
             "resources": {"cpus": 0.5}},
        ]}))
        .await;
    let stubborn_pid = wait_pid(&ctl.join("stubborn")).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(
        status["status"], "FINISHED:EXECUTION_EXCEPTION",
        "{status:#}"
    );
    assert_eq!(task_states(&status), vec!["TIMED_OUT", "TIMED_OUT"]);
    assert!(status["tasks"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("timed out after 1s"));
    wait_gone(stubborn_pid, "the task that ignored SIGTERM to be killed").await;

    let evs = fleet.events(&id).await;
    let signals: Vec<(String, Option<i32>)> = outcomes(&evs)
        .into_iter()
        .map(|(_, e, o)| (e.task_id.to_string(), o.signal))
        .collect();
    assert!(
        signals.contains(&("to-0".into(), Some(libc::SIGTERM))),
        "{signals:?}"
    );
    assert!(
        signals.contains(&("to-1".into(), Some(libc::SIGKILL))),
        "{signals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_process_frees_the_lease_and_aborts_the_job() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "cancel");
    // It ignores SIGTERM, so it takes the kill grace (1 s) to stop.
    let script = format!(
        "trap '' TERM; {} while :; do sleep 0.1; done",
        write_pid("pid")
    );
    let id = fleet
        .submit(&json!({"id": "cx", "tasks": [{
            "command": ["sh", "-c", script],
            "env": {"CTL": ctl}, "resources": {"cpus": 0.5}}]}))
        .await;
    let pid = wait_pid(&ctl.join("pid")).await;
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    let mut watch = leases.watch("w1.cx-0.1").await.unwrap();
    next_change(&mut watch, T, "the running lease", |c| {
        decode_lease(c).is_some_and(|l| l.state == LeaseState::Running)
    })
    .await;

    let client = fleet.client().await;
    gpufleet_testkit::api(&client, "gpufleet.api.jobs.cancel", &json!({"job_id": id}))
        .await
        .expect("cancel");
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:ABORTED", "{status:#}");
    assert_eq!(status["tasks"][0]["state"], "CANCELLED");
    wait_gone(pid, "the cancelled task's process to be gone").await;
    // While the task is stopped the worker keeps the lease alive, and the
    // coordinator's request visible; once it has reported, it leaves the
    // lease to expire (the result ended it; nobody writes it again).
    next_change(&mut watch, T, "the coordinator's cancel request", |c| {
        decode_lease(c).is_some_and(|l| l.state == LeaseState::Cancelling)
    })
    .await;
    let released = loop {
        let c = next_change(&mut watch, T, "the lease to expire", |_| true).await;
        match decode_lease(&c) {
            Some(l) => assert_eq!(l.state, LeaseState::Cancelling, "renewed as it was"),
            None => break c,
        }
    };
    assert_eq!(released.op, KvOp::Expired);
    let evs = fleet.events(&id).await;
    let outs = outcomes(&evs);
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].2.state, TaskState::Cancelled);
    assert_eq!(outs[0].2.signal, Some(libc::SIGKILL), "after the grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_over_the_memory_limit_or_out_of_memory_is_interrupted_and_retried() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1").cpus(2.0)).await;
    // Writes 256 MiB (so it is resident), then waits to be stopped.
    let hog =
        "import time\nx = b'x' * (256 << 20)\nprint('allocated', flush=True)\ntime.sleep(600)";
    let mem = fleet
        .submit(&json!({"max_retries": 1, "tasks": [{
            "command": ["python3", "-c", hog],
            "resources": {"cpus": 0.5, "memory": "64MiB"}}]}))
        .await;
    let oom = fleet
        .submit(&json!({"max_retries": 0, "tasks": [{
            "command": ["sh", "-c", "echo 'RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB' >&2; exit 1"],
            "resources": {"cpus": 0.5}}]}))
        .await;

    let status = fleet.wait_finished(&mem, T).await;
    assert_eq!(
        status["status"], "FINISHED:EXECUTION_EXCEPTION",
        "{status:#}"
    );
    let t = &status["tasks"][0];
    assert_eq!(t["state"], "INTERRUPTED", "{t:#}");
    assert_eq!(t["attempt"], 2, "retried once, as max_retries allows");
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("memory limit exceeded"),
        "{t:#}"
    );
    let interrupted: Vec<u32> = state_events(&fleet.events(&mem).await)
        .into_iter()
        .filter(|(_, s, _)| *s == TaskState::Interrupted)
        .map(|(a, _, _)| a)
        .collect();
    assert_eq!(interrupted, vec![1, 2]);

    let status = fleet.wait_finished(&oom, T).await;
    assert_eq!(
        status["status"], "FINISHED:EXECUTION_EXCEPTION",
        "{status:#}"
    );
    assert_eq!(status["tasks"][0]["state"], "INTERRUPTED");
    assert_eq!(status["tasks"][0]["exit_code"], 1);
    let reason = status["tasks"][0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("out of memory: PyTorch reported"),
        "{reason}"
    );
}

// ----- 5. leases -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_outliving_several_lease_ttls_keeps_its_lease() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "long");
    // Prints steadily, so that renewals compete with output.
    let script = r#"while [ ! -e "$CTL/go" ]; do seq 1 2000; sleep 0.01; done"#;
    let id = fleet
        .submit(&json!({"id": "long", "max_retries": 2, "tasks": [{
            "command": ["sh", "-c", script], "env": {"CTL": ctl}, "resources": {"cpus": 0.5}}]}))
        .await;
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    let mut watch = leases.watch("w1.long-0.1").await.unwrap();
    let claim = next_change(&mut watch, T, "the claim", |c| {
        decode_lease(c).is_some_and(|l| l.state == LeaseState::Running)
    })
    .await;
    // The coordinator's lease_ttl is 3 s; wait for renewals spanning four.
    let span = Duration::from_secs(12);
    let mut renewals = 0;
    loop {
        let c = next_change(&mut watch, Duration::from_secs(10), "a renewal", |_| true).await;
        assert_eq!(c.op, KvOp::Put, "the lease never lapses: {c:?}");
        assert_eq!(decode_lease(&c).unwrap().state, LeaseState::Running);
        renewals += 1;
        if (c.published - claim.published).unsigned_abs() >= span {
            break;
        }
    }
    eprintln!("{renewals} renewals in {span:?}");
    touch(&ctl.join("go"));
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    assert_eq!(status["tasks"][0]["attempt"], 1);
    let states: Vec<TaskState> = task_states_read(&fleet.events(&id).await)
        .into_iter()
        .map(|(_, s, _)| s)
        .collect();
    assert_eq!(
        states,
        vec![
            TaskState::Reserved,
            TaskState::Running,
            TaskState::Succeeded
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_fenced_off_and_never_reports_over_the_newer_attempt() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "fence");
    let script = |name: &str| {
        format!(
            r#"{} {} printf '{{"attempt": %s}}' "$GPUFLEET_ATTEMPT" > "$GPUFLEET_RESULT"; touch "$CTL/{name}-$GPUFLEET_ATTEMPT.done""#,
            write_pid(&format!("{name}-$GPUFLEET_ATTEMPT.pid")),
            wait_for(&format!("go-{name}"))
        )
    };
    // x still runs when its frozen worker thaws; y ends while it is frozen.
    let id = fleet
        .submit(&json!({"id": "fence", "max_retries": 2, "tasks": [
            {"name": "x", "command": ["sh", "-c", script("x")], "env": {"CTL": ctl},
             "resources": {"cpus": 0.5}},
            {"name": "y", "command": ["sh", "-c", script("y")], "env": {"CTL": ctl},
             "resources": {"cpus": 0.5}},
        ]}))
        .await;
    let x1 = wait_pid(&ctl.join("x-1.pid")).await;
    wait_pid(&ctl.join("y-1.pid")).await;
    fleet.add_worker(WorkerSpec::new("w2")).await;

    fleet.worker("w1").sigstop();
    touch(&ctl.join("go-y"));
    wait_file(&ctl.join("y-1.done")).await;
    // Past the lease TTL the coordinator calls both attempts LOST and runs
    // them again on w2.
    fleet
        .wait_job(&id, T, "both tasks to run again on w2", |s| {
            let (x, y) = (&s["tasks"][0], &s["tasks"][1]);
            x["attempt"] == 2
                && x["state"] == "RUNNING"
                && x["worker"] == "w2"
                && y["state"] == "SUCCEEDED"
        })
        .await;
    wait_pid(&ctl.join("x-2.pid")).await;
    // Its watchdog, outside the frozen worker, stopped it before the
    // lease could lapse.
    assert!(
        pids::gone(x1),
        "x's first attempt still ran when its retry started"
    );

    let workers = bucket(&fleet, subjects::WORKERS_BUCKET).await;
    let mut watch = workers.watch("w1").await.unwrap();
    fleet.worker("w1").sigcont();
    // It drops both attempts.
    next_advert(&mut watch, "w1 back, running nothing", |a| {
        a.running.is_empty()
    })
    .await;

    touch(&ctl.join("go-x"));
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    for t in status["tasks"].as_array().unwrap() {
        assert_eq!(t["attempt"], 2);
        assert_eq!(t["worker"], "w2");
        assert_eq!(t["result"], json!({"attempt": 2}));
    }
    // w1 reported nothing for the attempts it lost: the only results in
    // the stream are the second attempts'.
    let evs = fleet.events(&id).await;
    let results: Vec<(String, u32, Option<String>)> = outcomes(&evs)
        .into_iter()
        .map(|(_, e, _)| {
            (
                e.task_id.to_string(),
                e.attempt,
                e.worker.as_ref().map(|w| w.to_string()),
            )
        })
        .collect();
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(
        results
            .iter()
            .all(|(_, a, w)| *a == 2 && w.as_deref() == Some("w2")),
        "{results:?}"
    );
}

// ----- 6. streaming and artifacts -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_logs_and_result_stream_in_order_and_200_mb_of_output_stays_bounded() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let script = r#"for i in 1 2 3 4 5; do echo "line $i"; echo "{\"step\": $i}" >> "$GPUFLEET_EVENTS"; sleep 0.05; done; echo oops >&2; echo '{"done": true}' > "$GPUFLEET_RESULT""#;
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["sh", "-c", script], "resources": {"cpus": 0.5}}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let evs = fleet.events(&id).await;
    let progress: Vec<(usize, &Value)> = evs
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.body {
            EventBody::Progress { data } => Some((i, data)),
            _ => None,
        })
        .collect();
    let steps: Vec<&Value> = progress.iter().map(|(_, d)| *d).collect();
    let want: Vec<Value> = (1..=5).map(|i| json!({"step": i})).collect();
    assert_eq!(steps, want.iter().collect::<Vec<_>>());
    let outs = outcomes(&evs);
    assert_eq!(outs.len(), 1);
    let (result_at, _, outcome) = outs[0];
    assert_eq!(outcome.result, Some(json!({"done": true})));
    let mut stdout = String::new();
    let mut stderr = String::new();
    for (i, e) in evs.iter().enumerate() {
        if let EventBody::Log { stream, text, .. } = &e.body {
            assert!(i < result_at, "a log event after the result");
            match stream {
                LogStream::Stdout => stdout.push_str(text),
                LogStream::Stderr => stderr.push_str(text),
            }
        }
    }
    assert!(progress.iter().all(|(i, _)| *i < result_at));
    assert_eq!(stdout, "line 1\nline 2\nline 3\nline 4\nline 5\n");
    assert_eq!(stderr, "oops\n");

    // 200 MB of output: it completes, the worker's memory stays bounded,
    // and the log events carry every byte, all before the result.
    const TOTAL: u64 = 200_000_000;
    let worker_pid = fleet.worker("w1").pid();
    let before = pids::peak_resident_bytes(worker_pid);
    let started = Instant::now();
    let id = fleet.submit(&print_a_lot(TOTAL)).await;
    let status = fleet.wait_finished(&id, Duration::from_secs(150)).await;
    let took = started.elapsed();
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    assert_eq!(status["tasks"][0]["result"], json!({"ok": 1}));
    let after = pids::peak_resident_bytes(worker_pid);
    let out = OutputSeen::of(&fleet.events(&id).await);
    eprintln!(
        "{} MB of output: {took:?}; {} log events carrying {} bytes, {} reported dropped; worker VmHWM {} MiB before, {} MiB after",
        TOTAL / 1_000_000,
        out.batches,
        out.shipped,
        out.dropped,
        before >> 20,
        after >> 20
    );
    assert_eq!(
        out.shipped + out.dropped,
        TOTAL,
        "every byte is shipped or counted"
    );
    assert!(
        out.logs_before_result,
        "every log event precedes the result"
    );
    // The bound is 4 MiB queued plus ~34 batches in flight per task; the
    // rest is allocator slack. Buffering the output would need 200 MB.
    assert!(
        after.saturating_sub(before) < 32 << 20,
        "the worker's peak memory grew by {} MiB for {} MB of output",
        (after - before) >> 20,
        TOTAL / 1_000_000
    );
}

/// A task that prints `total` bytes of lines, then writes a result.
fn print_a_lot(total: u64) -> Value {
    let script = format!(
        "yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz | head -c {total}; echo '{{\"ok\": 1}}' > \"$GPUFLEET_RESULT\""
    );
    json!({"tasks": [{"command": ["sh", "-c", script], "resources": {"cpus": 0.5}}]})
}

/// What a job's stdout log events add up to.
struct OutputSeen {
    shipped: u64,
    dropped: u64,
    batches: usize,
    logs_before_result: bool,
}

impl OutputSeen {
    fn of(evs: &[Event]) -> OutputSeen {
        let outs = outcomes(evs);
        assert_eq!(outs.len(), 1, "one result");
        let result_at = outs[0].0;
        let mut seen = OutputSeen {
            shipped: 0,
            dropped: 0,
            batches: 0,
            logs_before_result: true,
        };
        for (i, e) in evs.iter().enumerate() {
            if let EventBody::Log {
                stream,
                text,
                dropped_bytes,
            } = &e.body
            {
                assert_eq!(*stream, LogStream::Stdout);
                seen.shipped += text.len() as u64;
                seen.dropped += dropped_bytes;
                seen.batches += 1;
                seen.logs_before_result &= i < result_at;
            }
        }
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_max_log_size_is_dropped_and_counted_before_the_result() {
    let mut fleet = Fleet::start().await;
    let config = fleet.dir().join("capped.toml");
    std::fs::write(&config, "max_log_size = \"8MiB\"\n").unwrap();
    let mut spec = WorkerSpec::new("w1");
    spec.extra = vec!["--config".into(), config.display().to_string()];
    fleet.add_worker(spec).await;
    const TOTAL: u64 = 50_000_000;
    let id = fleet.submit(&print_a_lot(TOTAL)).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let out = OutputSeen::of(&fleet.events(&id).await);
    assert_eq!(out.shipped, 8 << 20, "exactly max_log_size is shipped");
    assert_eq!(out.shipped + out.dropped, TOTAL, "the rest is counted");
    assert!(out.logs_before_result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_big_for_one_nats_message_fails_the_task_instead_of_hanging() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    // A JSON string just under the worker's 1 MiB result limit: as an
    // event, with its envelope, it is over the server's 1 MiB max_payload.
    let n = (1 << 20) - 6;
    let script = format!(
        r#"{{ printf '"'; head -c {n} /dev/zero | tr '\000' x; printf '"'; }} > "$GPUFLEET_RESULT""#
    );
    let id = fleet
        .submit(&json!({"max_retries": 2, "tasks": [{"command": ["sh", "-c", script], "resources": {"cpus": 0.5}}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(
        status["status"], "FINISHED:EXECUTION_EXCEPTION",
        "{status:#}"
    );
    let t = &status["tasks"][0];
    assert_eq!(t["state"], "FAILED", "not retried: it would fail again");
    assert_eq!(t["exit_code"], 0);
    let reason = t["reason"].as_str().unwrap();
    assert!(reason.contains("max_payload"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_stored_under_job_task_attempt_with_matching_sizes_and_digests() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "artifacts");
    let script = r#"mkdir -p out/sub && head -c 300000 /dev/urandom > out/model.bin && echo notes > out/sub/notes.txt && echo skip > out/ignored.log && cp out/model.bin out/sub/notes.txt "$CTL/""#;
    let id = fleet
        .submit(&json!({"id": "art", "tasks": [{
            "command": ["sh", "-c", script], "env": {"CTL": ctl},
            "resources": {"cpus": 0.5},
            "artifacts": ["out/*.bin", "out/**/*.txt"]}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let evs = fleet.events(&id).await;
    let outs = outcomes(&evs);
    let mut listed = outs[0].2.artifacts.clone();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = listed.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, vec!["out/model.bin", "out/sub/notes.txt"]);

    let js = jetstream::new(fleet.client().await);
    let stored = artifacts::list(&js, &UserId::default_user(), &JobId::new("art").unwrap())
        .await
        .unwrap();
    let stored_names: Vec<&str> = stored.iter().map(|a| a.meta.name.as_str()).collect();
    assert_eq!(
        stored_names, names,
        "a file no glob matches is not uploaded"
    );
    for (a, s) in listed.iter().zip(&stored) {
        assert_eq!(a.object, format!("art/art-0/1/{}", a.name));
        assert_eq!(s.at.worker.as_str(), "w1", "stored under its uploader");
        let mut bytes = Vec::new();
        artifacts::download(&js, s, &mut bytes).await.unwrap();
        let file = Path::new(&a.name).file_name().unwrap();
        let original = std::fs::read(ctl.join(file)).unwrap();
        assert_eq!(bytes, original, "{} holds the task's bytes", a.object);
        assert_eq!(a.size.0, original.len() as u64);
        assert_eq!(a.sha256, hex(&Sha256::digest(&original)));
    }
    assert_eq!(listed[0].size.0, 300_000);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ----- 7. drain -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_running_task_finishes_and_the_worker_exits_0() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "drain");
    let script = format!(
        r#"{} {} echo '{{"drained": false}}' > "$GPUFLEET_RESULT""#,
        write_pid("pid"),
        wait_for("go")
    );
    let a = fleet
        .submit(
            &json!({"tasks": [{"command": ["sh", "-c", script], "env": {"CTL": ctl},
                                   "resources": {"cpus": 0.5}}]}),
        )
        .await;
    wait_pid(&ctl.join("pid")).await;
    let workers = bucket(&fleet, subjects::WORKERS_BUCKET).await;
    let mut watch = workers.watch("w1").await.unwrap();

    fleet.worker("w1").sigterm();
    let adv = next_advert(&mut watch, "a draining advert", |a| a.draining).await;
    assert_eq!(adv.running.len(), 1);
    // A reservation written straight to it is refused, saying why.
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    let late = rogue_lease(
        "w1",
        "late-0",
        grant(100, 0, &[], false),
        json!({"command": ["true"]}),
    );
    let answer = reserve_directly(&leases, "w1.late-0.1", &late).await;
    assert_eq!(answer.state, LeaseState::Rejected);
    assert_eq!(answer.reason.as_deref(), Some("the worker is draining"));
    // New work waits rather than going to the draining worker (once the
    // coordinator has seen the advert: it has no event for that).
    let client = fleet.client().await;
    eventually(T, "the coordinator to see w1 draining", || {
        let client = client.clone();
        async move {
            let list = gpufleet_testkit::api(&client, "gpufleet.api.workers.list", &json!({}))
                .await
                .ok()?;
            (list[0]["name"] == "w1" && list[0]["draining"] == true).then_some(())
        }
    })
    .await;
    let b = fleet
        .submit(&json!({"tasks": [{"command": ["true"], "resources": {"cpus": 0.5}}]}))
        .await;
    let waiting = fleet
        .wait_job(&b, T, "the new job to say why it waits", |s| {
            s["status"] == "QUEUED" && s["reason"].is_string()
        })
        .await;
    assert!(
        waiting["reason"].as_str().unwrap().contains("draining"),
        "{waiting:#}"
    );

    // The running task finishes; then the worker leaves and exits 0.
    touch(&ctl.join("go"));
    let status = fleet.wait_finished(&a, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let exit = wait_exit(&mut fleet, "w1");
    assert!(exit.success(), "the drained worker exits 0: {exit:?}");
    let gone = next_change(&mut watch, T, "the advert to be removed", |c| {
        c.op != KvOp::Put
    })
    .await;
    assert_eq!(gone.op, KvOp::Purge, "removed at exit, not left to expire");

    // The waiting job never went to w1, and runs once a worker comes.
    let evs = fleet.events(&b).await;
    assert!(
        !state_events(&evs)
            .iter()
            .any(|(_, s, _)| *s == TaskState::Reserved),
        "nothing was reserved for it on the draining worker"
    );
    fleet.add_worker(WorkerSpec::new("w2")).await;
    let status = fleet.wait_finished(&b, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    assert_eq!(status["tasks"][0]["worker"], "w2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_longer_than_the_drain_timeout_is_interrupted_and_retried_elsewhere() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "drain-timeout");
    let script = format!(
        r#"if [ "$GPUFLEET_ATTEMPT" -gt 1 ]; then echo '{{"attempt": 2}}' > "$GPUFLEET_RESULT"; exit 0; fi; {} exec sleep 600"#,
        write_pid("pid")
    );
    let id = fleet
        .submit(&json!({"id": "dt", "max_retries": 1, "tasks": [{
            "command": ["sh", "-c", script], "env": {"CTL": ctl}, "resources": {"cpus": 0.5}}]}))
        .await;
    let pid = wait_pid(&ctl.join("pid")).await;
    fleet.add_worker(WorkerSpec::new("w2")).await;

    let asked = Instant::now();
    fleet.worker("w1").sigterm();
    let exit = wait_exit(&mut fleet, "w1");
    let took = asked.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_secs(5),
        "the task had its drain timeout (5s) first: {took:?}"
    );
    assert!(pids::gone(pid), "the task was stopped");
    // Its INTERRUPTED result ended the lease; nobody writes it again, so
    // it expires (a worker no longer purges after a result).
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    if leases.get("w1.dt-0.1").await.unwrap().is_some() {
        let mut watch = leases.watch("w1.dt-0.1").await.unwrap();
        let gone = next_change(&mut watch, T, "the lease to expire", |c| c.op != KvOp::Put).await;
        assert_eq!(gone.op, KvOp::Expired, "left to expire, not renewed");
    }

    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let t = &status["tasks"][0];
    assert_eq!(t["attempt"], 2);
    assert_eq!(t["worker"], "w2");
    assert_eq!(t["result"], json!({"attempt": 2}));
    let states = state_events(&fleet.events(&id).await);
    let first = states
        .iter()
        .find(|(a, s, _)| *a == 1 && *s == TaskState::Interrupted)
        .unwrap_or_else(|| panic!("attempt 1 was interrupted: {states:?}"));
    assert!(
        first.2.as_deref().unwrap_or("").contains("draining"),
        "{states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_log_line_is_a_json_object_with_the_task_as_fields() {
    let mut fleet = Fleet::start().await;
    let mut spec = WorkerSpec::new("w1");
    spec.extra = vec!["--log-format".into(), "json".into()];
    fleet.add_worker(spec).await;
    let id = fleet
        .submit(&json!({"id": "jl", "tasks": [{"command": ["true"]}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");

    let log = fleet.worker("w1").output();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    for l in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(l.get(key).is_some(), "no {key} in {l}");
        }
    }
    let claimed = lines
        .iter()
        .find(|l| l["task_id"] == "jl-0")
        .unwrap_or_else(|| panic!("no line with the task as a field:\n{log}"));
    assert_eq!(claimed["attempt"], 1, "{claimed}");
}

// ----- 7. containment (issue 11) -----

/// A NATS user seed in the format `nsc` writes (prefix `SU`, CRC-16/XMODEM,
/// base32), so that a worker can load a credentials file; a server without
/// authorization lets its holder in.
fn user_seed(raw: [u8; 32]) -> String {
    let mut bytes = vec![(18 << 3) | (20 << 3 >> 5), ((20 << 3) & 31) << 3];
    bytes.extend_from_slice(&raw);
    let crc = bytes.iter().fold(0u16, |crc, &b| {
        let mut c = crc ^ ((b as u16) << 8);
        for _ in 0..8 {
            c = if c & 0x8000 != 0 {
                (c << 1) ^ 0x1021
            } else {
                c << 1
            };
        }
        c
    });
    bytes.extend_from_slice(&crc.to_le_bytes());
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut out, mut acc, mut bits) = (String::new(), 0u32, 0);
    for b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Writes a credentials file only its owner (root) may read.
fn write_creds(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVQSJ9.c2lnbmF0dXJl";
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user_seed([7; 32])
    );
    std::fs::write(path, creds).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_environment_and_reach_hold_no_secret_of_the_worker() {
    const TOKEN: &str = "s3cret-token-of-the-worker";
    let mut fleet = Fleet::start().await;
    let creds = fleet.dir().join("worker.creds");
    write_creds(&creds);
    let secrets = vec![
        ("GPUFLEET_NATS_TOKEN".to_string(), TOKEN.to_string()),
        (
            "GPUFLEET_NATS_CREDS".to_string(),
            creds.display().to_string(),
        ),
        (
            "SOME_CLOUD_SECRET".to_string(),
            "another-secret".to_string(),
        ),
    ];
    // As root (tasks as nobody), and as an unprivileged user (tasks as the
    // same user: only the worker being non-dumpable keeps them out of its
    // /proc/<pid>/environ). The creds file is root's, so only the first
    // gets it.
    fleet
        .add_worker(WorkerSpec::new("wroot").env(secrets.clone()))
        .await;
    fleet
        .add_worker(
            WorkerSpec::new("wuser")
                .as_user("nobody")
                .env(secrets[..1].iter().chain(&secrets[2..]).cloned()),
        )
        .await;
    let ctl = ctl(&fleet, "secrets");
    let script = r#"env > "$CTL/env-$W"; cat "/proc/$PPID/environ" > "$CTL/penv-$W" 2>&1; echo "status=$?" >> "$CTL/penv-$W"; (exec 3< "/proc/$PPID/mem") 2> "$CTL/mem-$W"; echo "status=$?" >> "$CTL/mem-$W"; cat "$CREDS" > "$CTL/creds-$W" 2>&1; echo "status=$?" >> "$CTL/creds-$W""#;
    let mut ids = Vec::new();
    for w in ["wroot", "wuser"] {
        ids.push(
            fleet
                .submit(&json!({"constraints": {"workers": [w]}, "tasks": [{
                    "command": ["sh", "-c", script],
                    "env": {"CTL": ctl, "W": w, "CREDS": creds}}]}))
                .await,
        );
    }
    for id in &ids {
        let status = fleet.wait_finished(id, T).await;
        assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    }
    for w in ["wroot", "wuser"] {
        let env = std::fs::read_to_string(ctl.join(format!("env-{w}"))).unwrap();
        // The job itself tells the task where the file is (CREDS).
        let not_the_jobs: Vec<&str> = env.lines().filter(|l| !l.starts_with("CREDS=")).collect();
        for secret in [TOKEN, "another-secret", "worker.creds", "GPUFLEET_NATS"] {
            assert!(
                !not_the_jobs.iter().any(|l| l.contains(secret)),
                "{w}: {secret} in the task's env:\n{env}"
            );
        }
        // What the contract gives a task is there.
        let vars = parse_env(&env);
        for k in ["PATH", "HOME", "GPUFLEET_TASK_ID", "GPUFLEET_RESULT", "W"] {
            assert!(vars.contains_key(k), "{w}: no {k} in\n{env}");
        }
        for what in ["penv", "mem", "creds"] {
            let got = std::fs::read_to_string(ctl.join(format!("{what}-{w}"))).unwrap();
            assert!(!got.contains(TOKEN), "{w}: the token leaked through {what}");
            assert!(
                !got.ends_with("status=0\n"),
                "{w}: {what} was readable:\n{got}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_loop_stops_at_the_process_limit_and_the_host_and_worker_go_on() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(
            WorkerSpec::new("w1").env([("GPUFLEET_MAX_TASK_PROCESSES".into(), "64".into())]),
        )
        .await;
    let ctl = ctl(&fleet, "forks");
    let bomb =
        r#"n=0; while [ $n -lt 5000 ]; do sleep 1000 & n=$((n+1)); echo $n > "$CTL/n"; done"#;
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["sh", "-c", bomb], "env": {"CTL": ctl}}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    let task = &status["tasks"][0];
    assert_eq!(task["state"], "FAILED", "{status:#}");
    let n: u32 = wait_file(&ctl.join("n")).await.trim().parse().unwrap();
    assert!(n < 64, "{n} processes started past a limit of 64");
    // Its 60-odd sleeps went with it.
    let nobody_sleeps = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c.starts_with(fleet.dir()))
                    && std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
            })
            .count()
    };
    eventually(T, "the task's processes to be gone", || async {
        (nobody_sleeps() == 0).then_some(())
    })
    .await;
    // The worker (and the host) go on.
    let started = Instant::now();
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["echo", "still here"]}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    eprintln!("a job after the fork loop took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setsid_child_is_gone_after_its_task_ends() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let ctl = ctl(&fleet, "setsid");
    // It leaves the task's session and group, and its environment.
    let script = r#"env -i setsid sh -c 'echo $$ > "$1"; exec sleep 1000' _ "$CTL/pid" > /dev/null 2>&1 &
while [ ! -s "$CTL/pid" ]; do sleep 0.05; done"#;
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["sh", "-c", script], "env": {"CTL": ctl}}]}))
        .await;
    let pid = wait_pid(&ctl.join("pid")).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    wait_gone(pid, "the setsid child to be killed at the task's end").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_flood_stops_at_the_byte_cap_with_the_output() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").env([("GPUFLEET_MAX_LOG_SIZE".into(), "64KiB".into())]))
        .await;
    // 20,000 progress lines of about 40 bytes: 800 kB, plus some output.
    let flood = r#"seq 1 1000; i=0; while [ $i -lt 20000 ]; do echo "{\"step\": $i, \"pad\": \"xxxxxxxxxxxxx\"}"; i=$((i+1)); done >> "$GPUFLEET_EVENTS""#;
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["sh", "-c", flood]}]}))
        .await;
    let status = fleet.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let evs = fleet.events(&id).await;
    let (mut progress, mut progress_bytes, mut log_bytes, mut notice) = (0, 0, 0, false);
    for e in &evs {
        match &e.body {
            EventBody::Progress { data } => {
                progress += 1;
                progress_bytes += data.to_string().len();
            }
            EventBody::Log { text, .. } => {
                log_bytes += text.len();
                notice |= text.contains("reached max_log_size");
            }
            _ => {}
        }
    }
    eprintln!("{progress} progress events ({progress_bytes} bytes), {log_bytes} bytes of logs");
    assert!(notice, "the task is told why its progress stopped");
    // The line's own size counts; the shipped JSON is a little shorter.
    assert!(
        progress_bytes + log_bytes <= (64 << 10) + 512,
        "{progress_bytes} + {log_bytes} bytes past a 64 KiB cap"
    );
    assert!(progress > 100, "progress within the cap still goes out");
    assert_eq!(
        evs.iter()
            .filter(|e| matches!(e.body, EventBody::Result(_)))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_too_long_for_the_clock_neither_panics_the_worker_nor_stops_the_task() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let leases = bucket(&fleet, subjects::LEASES_BUCKET).await;
    // Written directly: the coordinator refuses such a job.
    let lease = rogue_lease(
        "w1",
        "huge-0",
        grant(500, 0, &[], false),
        json!({"command": ["sh", "-c", "sleep 0.2; echo fine"], "timeout": u64::MAX}),
    );
    let mut watch = leases.watch("w1.huge-0.1").await.unwrap();
    let answer = reserve_directly(&leases, "w1.huge-0.1", &lease).await;
    assert_eq!(answer.state, LeaseState::Running);
    // Left to expire once the task ended and its result was stored.
    let released = next_change(&mut watch, T, "the lease to expire", |c| c.op != KvOp::Put).await;
    assert_eq!(released.op, KvOp::Expired);
    let evs = fleet.events("huge").await;
    let outs = outcomes(&evs);
    assert_eq!(outs.len(), 1, "{evs:?}");
    assert_eq!(outs[0].2.state, TaskState::Succeeded, "{:?}", outs[0].2);
    // And the worker is still there to take work.
    let id = fleet
        .submit(&json!({"tasks": [{"command": ["true"]}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
}

// ----- 8. a worker cut off from NATS (issue 13) -----

/// When process `pid` exits (woken by its pidfd), on the wall clock that
/// tasks write their times with.
async fn exit_time(pid: i32) -> SystemTime {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        fd >= 0,
        "pidfd_open {pid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: just opened, owned by nobody else, kept by the AsyncFd.
    let fd = unsafe {
        let fd = OwnedFd::from_raw_fd(fd as i32);
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).unwrap()
    };
    with_deadline(T, &format!("process {pid} to exit"), fd.readable())
        .await
        .unwrap()
        .retain_ready();
    SystemTime::now()
}

/// `start <attempt> <ns since the epoch>` lines a task wrote.
fn starts(log: &str) -> Vec<(u32, SystemTime)> {
    log.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "start").then_some(())?;
            let attempt = f.next()?.parse().ok()?;
            let ns: u64 = f.next()?.parse().ok()?;
            Some((attempt, SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_nats_stops_its_task_before_it_can_run_elsewhere() {
    // A partition: w1's connection stays open, nothing crosses it.
    cut_off(Proxy::partition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_connection_is_closed_stops_its_task_before_it_can_run_elsewhere() {
    // The server seems gone: the connection closes, reconnects fail.
    cut_off(Proxy::close).await;
}

/// A task runs on w1, whose connection goes through a proxy; `cut` cuts
/// it off. Its task must be gone before the coordinator may run it on w2,
/// and w1 must come back without reporting over the retry.
async fn cut_off(cut: fn(&Proxy)) {
    let mut fleet = Fleet::start().await;
    let proxy = Proxy::to_nats(&fleet.url()).await.unwrap();
    fleet
        .add_worker(WorkerSpec::new("w1").via(&proxy.url()))
        .await;
    let ctl = ctl(&fleet, "cutoff");
    let script = r#"echo "start $GPUFLEET_ATTEMPT $(date +%s%N)" >> "$CTL/log"
if [ "$GPUFLEET_ATTEMPT" = 1 ]; then
  echo $$ > "$CTL/pid1.tmp" && mv "$CTL/pid1.tmp" "$CTL/pid1"
  while :; do sleep 0.05; done
fi
echo "{\"attempt\": $GPUFLEET_ATTEMPT}" > "$GPUFLEET_RESULT""#;
    let id = fleet
        .submit(&json!({"id": "cut", "max_retries": 2, "tasks": [{
            "command": ["sh", "-c", script], "env": {"CTL": ctl}}]}))
        .await;
    let pid1 = wait_pid(&ctl.join("pid1")).await;
    let died = tokio::spawn(exit_time(pid1));
    fleet.add_worker(WorkerSpec::new("w2")).await;

    cut(&proxy);
    let cut = SystemTime::now();
    let died = died.await.unwrap();
    let took = died.duration_since(cut).unwrap_or_default();
    eprintln!("the cut-off worker's task was gone {took:?} after the cut");
    // Before its advert (2 s) or lease (3 s) could lapse, after which the
    // coordinator may run the task elsewhere.
    assert!(took < ADVERT_TTL, "the task ran {took:?} after the cut");

    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let task = &status["tasks"][0];
    assert_eq!(task["worker"], "w2", "{status:#}");
    let log = std::fs::read_to_string(ctl.join("log")).unwrap();
    let later: Vec<SystemTime> = starts(&log)
        .into_iter()
        .filter(|(a, _)| *a > 1)
        .map(|(_, t)| t)
        .collect();
    assert!(!later.is_empty(), "{log}");
    for t in later {
        assert!(died < t, "attempt 1 still ran when a retry started:\n{log}");
    }

    // Back in touch: w1 comes back, reports nothing for the attempt it
    // gave up, and takes work again.
    proxy.restore();
    fleet.wait_worker_listed("w1", true).await;
    let id2 = fleet
        .submit(&json!({"constraints": {"workers": ["w1"]}, "tasks": [{"command": ["true"]}]}))
        .await;
    let status = fleet.wait_finished(&id2, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let evs = fleet.events(&id).await;
    let results: Vec<(u32, Option<String>)> = outcomes(&evs)
        .into_iter()
        .map(|(_, e, _)| (e.attempt, e.worker.as_ref().map(|w| w.to_string())))
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].1.as_deref(), Some("w2"), "{results:?}");
}
