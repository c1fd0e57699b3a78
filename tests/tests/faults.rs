//! The fault suite (issue 13 item 7): each fault against a real fleet (a
//! real nats-server or cluster, the real binaries, simulated GPUs), with
//! the invariants of `gpufleet_testkit::invariants` checked at the end:
//! every job ended, every task has exactly one accepted result, never two
//! attempts of a task running at once, no GPU held twice. Each test also
//! measures how long the fleet took to recover (printed as `RECOVERY:`
//! lines; the README's table of faults quotes them).
//!
//! The tasks are the ledger's probes: they record their own start, a tick
//! every 100 ms and their stop in one shared file, so that the check sees
//! what really ran, not only what the fleet says ran.

use std::time::{Duration, Instant};

use async_nats::Client;
use gpufleet_schema::{EventBody, TaskState};
use gpufleet_testkit::invariants::{self, LeaseWatch, Ledger, Report};
use gpufleet_testkit::{api, submit_job, with_deadline, Fleet, Proc, WorkerSpec};
use serde_json::{json, Value};
use time::OffsetDateTime;

const T: Duration = Duration::from_secs(120);

/// How long one API call may take before it counts as failed, as a client
/// that retries would see it.
const CALL: Duration = Duration::from_millis(800);

/// A fleet under a fault, with its witnesses.
struct Trial {
    fleet: Fleet,
    ledger: Ledger,
    leases: LeaseWatch,
    /// One connection for the whole test: it reconnects on its own across
    /// a server restart.
    client: Client,
    jobs: Vec<String>,
    name: &'static str,
}

impl Trial {
    /// A fleet with a coordinator and `workers`, each with two GPUs.
    async fn start(name: &'static str, workers: &[&str]) -> Trial {
        let mut fleet = Fleet::start().await;
        let ledger = Ledger::create(&fleet.dir().join("ledger"));
        let leases = LeaseWatch::start(&fleet.url()).await;
        for w in workers {
            fleet
                .add_worker(WorkerSpec::new(w).gpus("2x24GiB:L4").cpus(4.0))
                .await;
        }
        let client = fleet.client().await;
        Trial {
            fleet,
            ledger,
            leases,
            client,
            jobs: vec![],
            name,
        }
    }

    /// A job of `n` probe tasks of one GPU each, running `run` each.
    fn probe_job(&self, id: &str, n: usize, run: Duration) -> Value {
        let tasks: Vec<Value> = (0..n)
            .map(|i| self.ledger.task(&format!("p{i}"), run, 1))
            .collect();
        json!({"id": id, "max_retries": 5, "tasks": tasks})
    }

    /// Submits `job` (which names its id, so that a retry is idempotent),
    /// trying again until the fleet accepts it.
    async fn submit(&mut self, job: Value) -> String {
        let id = submit_until_accepted(&self.client, &job).await;
        self.jobs.push(id.clone());
        id
    }

    /// Waits until `n` tasks of `job` run: the fleet says so, and their
    /// processes have recorded their start (a worker reports RUNNING as it
    /// starts the process, before the program is up).
    async fn wait_running(&self, job: &str, n: usize) {
        self.fleet
            .wait_job(job, T, &format!("{n} tasks of {job} to run"), |s| {
                s["counts"]["running"].as_u64() >= Some(n as u64)
            })
            .await;
        let prefix = format!("{job}-");
        gpufleet_testkit::eventually(T, "the tasks to record their start", || {
            let started = self.ledger.started(1);
            let n_started = started.iter().filter(|t| t.starts_with(&prefix)).count();
            async move { (n_started >= n).then_some(()) }
        })
        .await;
    }

    /// The tasks of `job` that `worker` runs now.
    async fn tasks_on(&self, job: &str, worker: &str) -> Vec<String> {
        let s = self.fleet.get(job).await;
        s["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["worker"] == worker && t["state"] == "RUNNING")
            .map(|t| t["task_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits until each of `tasks` of `job` runs as a later attempt than
    /// the first, and returns how long after `fault` the last of them
    /// started (by the RUNNING events' own times).
    async fn running_again(&self, job: &str, tasks: &[String], fault: OffsetDateTime) -> Duration {
        let mut latest = Duration::ZERO;
        for task in tasks {
            let ev = self
                .fleet
                .wait_event(job, T, &format!("{task} to run again"), |e| {
                    e.task_id.as_str() == task
                        && e.attempt > 1
                        && matches!(
                            e.body,
                            EventBody::State {
                                state: TaskState::Running,
                                ..
                            }
                        )
                })
                .await;
            latest = latest.max(since(fault, ev.at));
        }
        latest
    }

    /// Submits a one-task probe job and returns how long after `fault` its
    /// task started: the time until the fleet places new work again.
    async fn new_work_runs(&mut self, id: &str, fault: OffsetDateTime) -> Duration {
        let job = self.probe_job(id, 1, Duration::from_millis(300));
        let job = self.submit(job).await;
        let ev = self
            .fleet
            .wait_event(&job, T, "a new task to run", |e| {
                matches!(
                    e.body,
                    EventBody::State {
                        state: TaskState::Running,
                        ..
                    }
                )
            })
            .await;
        since(fault, ev.at)
    }

    /// Every job ended and the invariants hold.
    async fn check(self) -> Report {
        let report =
            invariants::check(&self.fleet, &self.jobs, &self.ledger, Some(&self.leases), T).await;
        eprintln!("{}: {}", self.name, report.summary());
        if std::env::var_os("FAULTS_DUMP").is_some() {
            eprintln!("{}", std::fs::read_to_string(self.ledger.path()).unwrap());
        }
        report.assert_holds();
        report
    }
}

/// The time from `from` to `to`, zero if `to` is earlier (another clock's
/// reading of the same moment).
fn since(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    (to - from).try_into().unwrap_or_default()
}

fn recovery(fault: &str, what: &str, took: Duration) {
    eprintln!(
        "RECOVERY: {fault}: {what} after {:.1} s",
        took.as_secs_f64()
    );
}

/// Submits until the fleet accepts: through a failover the API may not
/// answer for a while, and a submit that timed out may have been accepted
/// (the job names its id, so the retry finds it).
async fn submit_until_accepted(client: &Client, job: &Value) -> String {
    with_deadline(T, "a submit to be accepted", async {
        loop {
            match tokio::time::timeout(CALL * 4, submit_job(client, job)).await {
                Ok(Ok(id)) => return id,
                Ok(Err(e)) => eprintln!("submit: {e}"),
                Err(_) => eprintln!("submit: no answer in {:?}", CALL * 4),
            }
            // Not a wait for something: the pace of a client's retries.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Whether one call of the API is answered within [`CALL`].
async fn api_answers(client: &Client) -> bool {
    let body = json!({"limit": 1});
    let call = api(client, gpufleet_schema::subjects::WORKERS_LIST, &body);
    matches!(tokio::time::timeout(CALL, call).await, Ok(Ok(_)))
}

/// Calls the API until it has answered `streak` calls in a row, and
/// returns how long after `fault` the first of those was made: until then,
/// some call failed.
async fn api_back(client: &Client, fault: Instant, streak: usize) -> Duration {
    with_deadline(T, "the API to answer again", async {
        let mut first_ok: Option<Duration> = None;
        let mut in_a_row = 0;
        loop {
            let at = fault.elapsed();
            if api_answers(client).await {
                first_ok.get_or_insert(at);
                in_a_row += 1;
                if in_a_row == streak {
                    return first_ok.unwrap();
                }
            } else {
                first_ok = None;
                in_a_row = 0;
            }
            // The pace of a client's calls, not a wait for something.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// A second coordinator on the fleet, waited for until it stands by.
async fn standby(fleet: &Fleet) -> Proc {
    let p = Proc::spawn("gpufleet-coordinator", &fleet.coordinator_args(), &[]);
    gpufleet_testkit::eventually(T, "the second coordinator to stand by", || async {
        p.output().contains("standing by").then_some(())
    })
    .await;
    p
}

// ----- coordinators -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_then_resumed() {
    let mut t = Trial::start("leader SIGSTOP", &["w1", "w2"]).await;
    let standby = standby(&t.fleet).await;
    let job = t.probe_job("busy", 4, Duration::from_secs(6));
    let busy = t.submit(job).await;
    t.wait_running(&busy, 4).await;

    let leader = t.fleet.coordinator.as_ref().unwrap();
    leader.sigstop();
    let (at, wall) = (Instant::now(), OffsetDateTime::now_utc());
    let api = api_back(&t.client, at, 20).await;
    recovery("leader SIGSTOP", "API answering (20 calls in a row)", api);
    let placed = t.new_work_runs("after-freeze", wall).await;
    recovery("leader SIGSTOP", "a new task RUNNING", placed);

    // Thawed, it finds itself replaced and stops without writing.
    let old = t.fleet.coordinator.as_mut().unwrap();
    old.sigcont();
    let exit = old.wait_exit(T).expect("the thawed leader to stop");
    assert!(!exit.success(), "{}", old.output());
    let report = t.check().await;
    // Nothing ran on the coordinator: no task needed a second attempt.
    assert_eq!(report.retried, 0, "{}", report.summary());
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed() {
    let mut t = Trial::start("leader kill -9", &["w1", "w2"]).await;
    let standby = standby(&t.fleet).await;
    let job = t.probe_job("busy", 4, Duration::from_secs(6));
    let busy = t.submit(job).await;
    t.wait_running(&busy, 4).await;

    t.fleet.coordinator.as_mut().unwrap().kill9();
    let (at, wall) = (Instant::now(), OffsetDateTime::now_utc());
    let api = api_back(&t.client, at, 20).await;
    recovery("leader kill -9", "API answering", api);
    let placed = t.new_work_runs("after-kill", wall).await;
    recovery("leader kill -9", "a new task RUNNING", placed);
    let report = t.check().await;
    assert_eq!(report.retried, 0, "{}", report.summary());
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_coordinators_restarted() {
    let mut t = Trial::start("both coordinators restarted", &["w1", "w2"]).await;
    let mut second = standby(&t.fleet).await;
    let job = t.probe_job("busy", 4, Duration::from_secs(6));
    let busy = t.submit(job).await;
    t.wait_running(&busy, 4).await;
    // Queued behind the running ones: placed by whichever leads next.
    let job = t.probe_job("queued", 4, Duration::from_secs(1));
    t.submit(job).await;

    t.fleet.coordinator.as_mut().unwrap().kill9();
    second.kill9();
    let (at, wall) = (Instant::now(), OffsetDateTime::now_utc());
    t.fleet.start_coordinator().await;
    let second = standby(&t.fleet).await;
    let api = api_back(&t.client, at, 20).await;
    recovery("both coordinators restarted", "API answering", api);
    let placed = t.new_work_runs("after-restart", wall).await;
    recovery("both coordinators restarted", "a new task RUNNING", placed);
    let report = t.check().await;
    assert_eq!(report.retried, 0, "{}", report.summary());
    drop(second);
}

// ----- workers -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_then_resumed() {
    let mut t = Trial::start("worker SIGSTOP", &["w1", "w2"]).await;
    // Long enough that the frozen worker's tasks still run when they are
    // placed again.
    let job = t.probe_job("busy", 4, Duration::from_secs(10));
    let busy = t.submit(job).await;
    t.wait_running(&busy, 4).await;
    let frozen = t.tasks_on(&busy, "w1").await;
    assert!(!frozen.is_empty(), "w1 runs none of the tasks");
    t.fleet
        .add_worker(WorkerSpec::new("w3").gpus("2x24GiB:L4").cpus(4.0))
        .await;

    t.fleet.worker("w1").sigstop();
    let wall = OffsetDateTime::now_utc();
    let again = t.running_again(&busy, &frozen, wall).await;
    recovery("worker SIGSTOP", "its tasks RUNNING elsewhere", again);
    t.fleet.worker("w1").sigcont();
    t.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed() {
    let mut t = Trial::start("worker kill -9", &["w1", "w2"]).await;
    let job = t.probe_job("busy", 4, Duration::from_secs(6));
    let busy = t.submit(job).await;
    t.wait_running(&busy, 4).await;
    let lost = t.tasks_on(&busy, "w1").await;
    assert!(!lost.is_empty(), "w1 runs none of the tasks");
    t.fleet
        .add_worker(WorkerSpec::new("w3").gpus("2x24GiB:L4").cpus(4.0))
        .await;

    t.fleet.worker("w1").kill9();
    let wall = OffsetDateTime::now_utc();
    let again = t.running_again(&busy, &lost, wall).await;
    recovery("worker kill -9", "its tasks RUNNING elsewhere", again);
    t.check().await;
}

// ----- NATS -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_server_killed_and_restarted_on_its_store() {
    let mut t = Trial::start("nats-server kill -9 and restart", &["w1", "w2"]).await;
    let job = t.probe_job("busy", 4, Duration::from_secs(6));
    let busy = t.submit(job).await;
    t.wait_running(&busy, 4).await;
    let job = t.probe_job("queued", 4, Duration::from_secs(1));
    t.submit(job).await;

    let (at, wall) = (Instant::now(), OffsetDateTime::now_utc());
    t.fleet.server.restart();
    let api = api_back(&t.client, at, 20).await;
    recovery("nats-server kill -9 and restart", "API answering", api);
    let placed = t.new_work_runs("after-restart", wall).await;
    recovery(
        "nats-server kill -9 and restart",
        "a new task RUNNING",
        placed,
    );
    t.check().await;
}
