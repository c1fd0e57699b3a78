//! The engine without NATS: inputs in, effects out. The clock is the
//! test's own ([`Sim`]): hours of queue policy pass in microseconds.
//!
//! Shared helpers and the basic paths are here; each module below covers
//! one concern of the policy.

use super::*;
use gpufleet_schema::{ByteSize, Dur, GpuAdvert, LeaseState, TaskId, TaskOutcome};
use std::ops::{Deref, DerefMut};
use time::OffsetDateTime;
use tokio::sync::oneshot;

mod alike;
mod arrays;
mod budget;
mod cancel;
mod deps;
mod failures;
mod fairshare;
mod gangs;
mod holds;
mod observe;
mod owners;
mod preempt;
mod refusals;
mod retry;
mod settle;
mod talk;
mod twophase;
mod unschedulable;

/// An engine with its own clock, which moves only when a test says so.
struct Sim {
    engine: Engine,
    now: Now,
}

impl Sim {
    fn new(cfg: CoordinatorConfig) -> Sim {
        let now = Now {
            mono: std::time::Instant::now(),
            wall: now(),
        };
        Sim {
            engine: Engine::new(cfg, now, 1),
            now,
        }
    }

    fn handle(&mut self, input: Input) {
        self.engine.handle(input, self.now);
    }

    fn schedule_if_needed(&mut self) {
        self.engine.schedule_if_needed(self.now);
    }

    fn advance(&mut self, d: std::time::Duration) {
        self.now = self.now.after(d);
    }
}

impl Deref for Sim {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

/// The wall time every test starts at.
fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
}

fn advert(name: &str, cpus: u64, gpus: u32) -> WorkerAdvert {
    WorkerAdvert {
        name: WorkerId::new(name).unwrap(),
        instance: format!("i-{name}"),
        version: "test".into(),
        labels: Default::default(),
        addr: Some("127.0.0.1".into()),
        cpus_milli: cpus * 1000,
        memory_total: ByteSize::gib(64),
        memory_available: ByteSize::gib(64),
        load_memory_cap: None,
        load_avg: None,
        driver_version: None,
        gpus: (0..gpus)
            .map(|i| GpuAdvert {
                index: i,
                uuid: format!("GPU-{name}-{i}").into(),
                model: "T".into(),
                memory_total: ByteSize::gib(24),
                memory_used: ByteSize(0),
                memory_free: ByteSize::gib(24),
                memory_unmanaged: ByteSize(0),
                utilization: None,
                temperature: None,
                simulated: true,
                held_by: vec![],
            })
            .collect(),
        running: vec![],
        rendezvous_ports: Some((29500, 29510)),
        draining: false,
        held: false,
        usage: Default::default(),
        metrics_addr: None,
        ttl: Dur::secs(10),
        started_at: now(),
        sent_at: now(),
    }
}

fn ready_engine(workers: &[WorkerAdvert]) -> Sim {
    ready_with(CoordinatorConfig::default(), workers)
}

/// An engine past start-up, with `workers` online.
fn ready_with(cfg: CoordinatorConfig, workers: &[WorkerAdvert]) -> Sim {
    let mut e = Sim::new(cfg);
    for w in workers {
        e.handle(Input::Advert(Box::new(w.clone())));
    }
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    e
}

fn spec(json: &str) -> JobSpec {
    Encoding::Json.decode(json.as_bytes()).unwrap()
}

fn submit(e: &mut Sim, json: &str) -> (JobId, oneshot::Receiver<Reply>) {
    let (tx, rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(json))),
        Caller::everyone(),
        tx,
    ));
    e.schedule_if_needed();
    let id = e.jobs.iter().max_by_key(|(_, j)| j.seq).unwrap().0.clone();
    // The runtime says so once the record is written.
    e.handle(Input::Stored(id.clone()));
    (id, rx)
}

/// Lets the pause before a retry pass (at most `retry_backoff_max`).
fn after_pause(e: &mut Sim) {
    let pause = e.config().retry_backoff_max.0;
    e.advance(pause);
    e.handle(Input::Wake);
}

fn claim(e: &mut Sim, key: &str, lease: &Lease, rev: u64) {
    let mut l = lease.clone();
    l.state = LeaseState::Running;
    l.instance = Some("inst".into());
    e.handle(Input::Lease(LeaseChange::Put {
        key: key.into(),
        rev,
        lease: Box::new(l),
    }));
}

/// Runs a pass (if one is due) and returns the reservations it made.
fn pass(e: &mut Sim) -> Vec<(String, Lease)> {
    e.schedule_if_needed();
    e.take_effects().create_leases
}

/// The worker answers a reservation with REJECTED.
fn refuse(e: &mut Sim, key: &str, lease: &Lease, rev: u64, why: &str) {
    let mut l = lease.clone();
    l.state = LeaseState::Rejected;
    l.reason = Some(why.into());
    e.handle(Input::Lease(LeaseChange::Put {
        key: key.into(),
        rev,
        lease: Box::new(l),
    }));
}

/// A claimed attempt ends as a worker ends it: with its result alone; the
/// worker leaves the lease under `_key` to expire (see `settle.rs`).
fn finish(e: &mut Sim, _key: &str, lease: &Lease, state: TaskState, seq: u64) {
    e.handle(result(e, lease, state, seq));
}

/// Moves the clock on by `secs` and lets a tick happen.
fn tick_after(e: &mut Sim, secs: u64) {
    e.advance(std::time::Duration::from_secs(secs));
    e.handle(Input::Tick);
}

fn task_state(e: &Sim, job: &JobId, i: usize) -> (TaskState, u32) {
    let t = &e.jobs[job].tasks[i];
    (t.state, t.attempt)
}

/// The result a worker sends for `lease`: from that worker, naming the
/// claim the engine saw, carrying the reservation's token.
fn result(e: &Sim, lease: &Lease, state: TaskState, seq: u64) -> Input {
    let claim_rev = e
        .jobs
        .find_task(&lease.task_id)
        .and_then(|(job, i)| e.jobs[&job].tasks[i].claim_rev);
    Input::Result {
        seq,
        sender: Sender::Worker(lease.worker.clone()),
        event: Box::new(Event {
            job_id: lease.job_id.clone(),
            task_id: lease.task_id.clone(),
            attempt: lease.attempt,
            worker: Some(lease.worker.clone()),
            lease_rev: claim_rev,
            token: Some(lease.token.clone()),
            at: now(),
            body: EventBody::Result(TaskOutcome {
                state,
                exit_code: Some(if state == TaskState::Succeeded { 0 } else { 1 }),
                signal: None,
                result: Some(serde_json::json!({"seq": seq})),
                error: None,
                artifacts: vec![],
                started_at: Some(now()),
                finished_at: now(),
                usage: None,
            }),
        }),
    }
}

#[test]
fn a_task_goes_from_submit_to_completed() {
    let mut e = ready_engine(&[advert("w1", 4, 1)]);
    let (id, mut rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["true"], "resources": {"gpus": 1}}]}"#,
    );
    let fx = e.take_effects();
    assert!(fx.put_jobs.contains(&id));
    assert_eq!(fx.create_leases.len(), 1);
    let (key, lease) = fx.create_leases[0].clone();
    assert_eq!(key, format!("w1.{id}-0.1"));
    assert_eq!(lease.grant.gpus.len(), 1);
    // The submit reply waits for the record to be written.
    let (tx, reply, depends) = fx.replies.into_iter().next().unwrap();
    assert_eq!(depends, Some(id.clone()));
    tx.send(reply).unwrap();
    assert!(matches!(rx.try_recv(), Ok(Reply::Submit(r)) if r.created));

    claim(&mut e, &key, &lease, 10);
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Running);
    assert_eq!(e.jobs[&id].status, JobState::Running);
    // A claim costs no record write.
    assert!(!e.take_effects().put_jobs.contains(&id));

    e.handle(result(&e, &lease, TaskState::Succeeded, 42));
    assert_eq!(e.jobs[&id].status, JobState::Completed);
    assert_eq!(
        e.jobs[&id].tasks[0].result.as_deref(),
        Some(&serde_json::json!({"seq": 42}))
    );
    let fx = e.take_effects();
    assert!(fx.put_jobs.contains(&id));
    // No SUCCEEDED state event: the holder's result, which readers take
    // as the task's end, said it; the record says SUCCEEDED.
    assert!(fx.events.is_empty(), "{:?}", fx.events);
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Succeeded);

    // The same result again (a replay after restart) changes nothing.
    e.handle(result(&e, &lease, TaskState::Succeeded, 42));
    let fx = e.take_effects();
    assert!(fx.put_jobs.is_empty() && fx.events.is_empty());
}

#[test]
fn every_end_but_a_success_has_its_state_event() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["true"]}, {"command": ["false"]}]}"#,
    );
    let leases = e.take_effects().create_leases;
    for (i, (key, lease)) in leases.iter().enumerate() {
        claim(&mut e, key, lease, 10 + i as u64);
    }
    e.take_effects();
    e.handle(result(&e, &leases[0].1, TaskState::Succeeded, 20));
    e.handle(result(&e, &leases[1].1, TaskState::Failed, 21));
    let ends: Vec<(TaskId, TaskState)> = e
        .take_effects()
        .events
        .iter()
        .filter_map(|(_, ev)| match &ev.body {
            EventBody::State { state, .. } => Some((ev.task_id.clone(), *state)),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [(TaskId::for_index(&id, 1), TaskState::Failed)]);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Succeeded, 1));
    assert_eq!(task_state(&e, &id, 1), (TaskState::Failed, 1));
}

#[test]
fn a_superseded_attempt_is_fenced_off() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"max_retries": 1, "tasks": [{"command": ["true"]}]}"#,
    );
    let (key1, lease1) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key1, &lease1, 5);
    // The worker froze: its lease ran out.
    e.handle(Input::Lease(LeaseChange::Expired { key: key1.clone() }));
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Queued);
    assert_eq!(e.jobs[&id].tasks[0].attempt, 2);
    e.take_effects();
    e.handle(Input::Tick);
    e.schedule_if_needed();
    assert!(
        e.take_effects().create_leases.is_empty(),
        "a retry waits out its pause"
    );
    after_pause(&mut e);
    e.schedule_if_needed();
    let fx = e.take_effects();
    let (key2, lease2) = fx.create_leases[0].clone();
    assert_eq!(
        lease2.worker.as_str(),
        "w2",
        "a retry goes to another worker when one fits"
    );
    assert_eq!(lease2.attempt, 2);
    claim(&mut e, &key2, &lease2, 9);
    // The frozen worker comes back and reports attempt 1: refused.
    e.handle(result(&e, &lease1, TaskState::Succeeded, 50));
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Running);
    assert_eq!(e.jobs[&id].tasks[0].result, None);
    e.handle(result(&e, &lease2, TaskState::Succeeded, 51));
    assert_eq!(e.jobs[&id].status, JobState::Completed);
    assert_eq!(
        e.jobs[&id].tasks[0].result.as_deref(),
        Some(&serde_json::json!({"seq": 51}))
    );
}

#[test]
fn a_release_whose_claim_was_never_seen_waits_for_the_result() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let (key, lease) = e.take_effects().create_leases[0].clone();
    // The worker claimed, ran, reported and released; the release's rollup
    // removed the claim before the lease watch delivered it.
    e.handle(Input::Lease(LeaseChange::Released { key }));
    e.handle(Input::Tick);
    e.schedule_if_needed();
    let fx = e.take_effects();
    assert!(
        fx.create_leases.is_empty(),
        "the same attempt was placed again: {:?}",
        fx.create_leases
    );
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Reserved);
    e.handle(result(&e, &lease, TaskState::Succeeded, 7));
    assert_eq!(e.jobs[&id].status, JobState::Completed);
}

#[test]
fn a_release_with_no_result_is_lost_after_the_grace_and_retried() {
    let mut e = Sim::new(CoordinatorConfig {
        result_grace: Dur(std::time::Duration::ZERO),
        ..Default::default()
    });
    e.handle(Input::Advert(Box::new(advert("w1", 4, 0))));
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    let (id, _rx) = submit(
        &mut e,
        r#"{"max_retries": 1, "tasks": [{"command": ["true"]}]}"#,
    );
    let (key, _) = e.take_effects().create_leases[0].clone();
    e.handle(Input::Lease(LeaseChange::Released { key }));
    e.advance(std::time::Duration::from_millis(1));
    e.handle(Input::Tick);
    let t = &e.jobs[&id].tasks[0];
    assert_eq!(t.attempt, 2, "{t:?}");
    assert_eq!(t.state, TaskState::Queued);
    after_pause(&mut e);
    e.schedule_if_needed();
    let fx = e.take_effects();
    assert_eq!(fx.create_leases.len(), 1);
    assert_eq!(
        fx.create_leases[0].1.attempt, 2,
        "the only worker there is, for lack of another"
    );
}

#[test]
fn retries_stop_at_max_retries() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"max_retries": 1, "tasks": [{"command": ["true"]}]}"#,
    );
    for attempt in 1..=2 {
        after_pause(&mut e);
        e.schedule_if_needed();
        let (key, lease) = e.take_effects().create_leases[0].clone();
        assert_eq!(lease.attempt, attempt);
        claim(&mut e, &key, &lease, attempt as u64 * 10);
        e.handle(result(&e, &lease, TaskState::Interrupted, attempt as u64));
        e.handle(Input::Lease(LeaseChange::Released { key }));
    }
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Interrupted);
    assert_eq!(e.jobs[&id].status, JobState::ExecutionException);
}

#[test]
fn start_up_adopts_unrecorded_leases_and_requeues_lapsed_reservations() {
    let mut e = Sim::new(CoordinatorConfig::default());
    let s = spec(r#"{"id": "j", "tasks": [{"command": ["a"]}, {"command": ["b"]}]}"#);
    let mut job = JobRecord::new(JobId::new("j").unwrap(), 1, s, now());
    // Task 0 was reserved on w1 before the crash, but its lease is gone.
    job.tasks[0].state = TaskState::Reserved;
    job.tasks[0].worker = Some(WorkerId::new("w1").unwrap());
    e.restore_job(job.clone());
    // Task 1's reservation was made and claimed, but never recorded.
    let lease = Lease {
        job_id: job.id.clone(),
        task_id: job.tasks[1].id.clone(),
        attempt: 1,
        worker: WorkerId::new("w1").unwrap(),
        state: LeaseState::Running,
        reason: None,
        task: gpufleet_schema::TaskSpec::clone(&job.specs[1]),
        grant: gpufleet_schema::Grant {
            cpus_milli: 1000,
            ..Default::default()
        },
        rendezvous: None,
        lease_ttl: Dur::secs(30),
        instance: Some("x".into()),
        reserved_at: now(),
        owner: job.owner.clone(),
        token: "t".into(),
        signer: None,
        signature: None,
        claim_rev: None,
        ready: false,
        gpu_grant: None,
        preempt: None,
    };
    e.handle(Input::Lease(LeaseChange::Put {
        key: "w1.j-1.1".into(),
        rev: 3,
        lease: Box::new(lease),
    }));
    e.handle(Input::Advert(Box::new(advert("w1", 1, 0))));
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    let j = &e.jobs[&JobId::new("j").unwrap()];
    assert_eq!(j.tasks[1].state, TaskState::Running);
    assert_eq!(j.tasks[0].state, TaskState::Queued);
    // w1 has one CPU and task 1 holds it: task 0 must wait.
    e.schedule_if_needed();
    assert!(e.take_effects().create_leases.is_empty());
    let j = &e.jobs[&JobId::new("j").unwrap()];
    assert!(
        j.tasks[0].reason.as_deref().unwrap().contains("free CPUs"),
        "{:?}",
        j.tasks[0].reason
    );
}

/// Only the coordinator writes lease keys, so a key that does not parse
/// names no attempt: its value holds nothing placement counts.
#[test]
fn a_lease_under_a_malformed_key_holds_nothing() {
    let task = r#"{"tasks": [{"command": ["true"], "resources": {"cpus": 1}}]}"#;
    let mut other = ready_engine(&[advert("w1", 1, 0)]);
    submit(&mut other, task);
    let (_, mut lease) = other.take_effects().create_leases.remove(0);
    lease.state = LeaseState::Running;

    let mut e = ready_engine(&[advert("w1", 1, 0)]);
    e.handle(Input::Lease(LeaseChange::Put {
        key: "w1.not a task.1".into(),
        rev: 4,
        lease: Box::new(lease),
    }));
    submit(&mut e, task);
    assert_eq!(e.take_effects().create_leases.len(), 1, "the CPU is free");
}

#[test]
fn submit_validates_and_is_idempotent() {
    let mut e = ready_engine(&[]);
    let (tx, mut rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(r#"{"tasks": []}"#))),
        Caller::everyone(),
        tx,
    ));
    for (tx, r, _) in e.take_effects().replies {
        tx.send(r).unwrap();
    }
    assert!(
        matches!(rx.try_recv(), Ok(Reply::Error { code: 400, message }) if message.starts_with("tasks"))
    );

    let job = r#"{"id": "same", "tasks": [{"command": ["true"]}]}"#;
    submit(&mut e, job);
    e.take_effects();
    let (tx, mut rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(job))),
        Caller::everyone(),
        tx,
    ));
    for (tx, r, _) in e.take_effects().replies {
        tx.send(r).unwrap();
    }
    assert!(matches!(rx.try_recv(), Ok(Reply::Submit(r)) if !r.created));
    let (tx, mut rx) = oneshot::channel();
    let other = r#"{"id": "same", "tasks": [{"command": ["false"]}]}"#;
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(other))),
        Caller::everyone(),
        tx,
    ));
    for (tx, r, _) in e.take_effects().replies {
        tx.send(r).unwrap();
    }
    assert!(matches!(rx.try_recv(), Ok(Reply::Error { code: 409, .. })));
}

#[test]
fn a_client_id_is_verified_by_the_first_write_and_a_taken_one_never_runs() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (tx, _rx) = oneshot::channel();
    let job = r#"{"id": "old", "tasks": [{"command": ["true"], "resources": {"cpus": 4}}]}"#;
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(job))),
        Caller::everyone(),
        tx,
    ));
    e.schedule_if_needed();
    let id = JobId::new("old").unwrap();
    assert!(e.jobs[&id].verify && !e.jobs[&id].stored);
    let fx = e.take_effects();
    assert_eq!(
        fx.create_leases.len(),
        1,
        "placed; created only once the id is known to be new"
    );
    // The first write found a finished job of that id.
    e.handle(Input::Duplicate(id.clone()));
    assert!(e.jobs.get(&id).is_none());
    // Its capacity is free again, and an id the engine makes needs no check.
    let (other, _) = submit(&mut e, job.replace(r#""id": "old", "#, "").as_str());
    assert!(!e.jobs[&other].verify);
    assert_eq!(e.take_effects().create_leases.len(), 1);
}

#[test]
fn a_job_whose_record_is_not_stored_never_runs_and_is_forgotten() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (tx, _rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(r#"{"tasks": [{"command": ["true"]}]}"#))),
        Caller::everyone(),
        tx,
    ));
    e.schedule_if_needed();
    let fx = e.take_effects();
    let id = fx.put_jobs.iter().next().unwrap().clone();
    // Reserved in the same batch: the runtime creates the reservation only
    // once the record is stored.
    assert_eq!(fx.create_leases.len(), 1);
    assert!(!e.jobs[&id].stored);
    e.handle(Input::NotStored(id.clone()));
    assert!(e.jobs.get(&id).is_none());
    e.handle(Input::Tick);
    let fx = e.take_effects();
    assert!(fx.create_leases.is_empty() && fx.put_jobs.is_empty());
    // Its capacity is free again.
    let (_, _) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["true"], "resources": {"cpus": 4}}]}"#,
    );
    assert_eq!(e.take_effects().create_leases.len(), 1);
}

#[test]
fn a_job_too_large_to_store_is_refused_with_413() {
    let mut e = ready_engine(&[]);
    let big = "x".repeat(100_000);
    let json = format!(
        r#"{{"tasks": [{{"command": ["true"], "env": {{"A": "{big}", "B": "{big}", "C": "{big}"}}}}]}}"#
    );
    let (tx, mut rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Submit(Box::new(spec(&json))),
        Caller::everyone(),
        tx,
    ));
    let fx = e.take_effects();
    assert!(fx.put_jobs.is_empty());
    for (tx, r, _) in fx.replies {
        tx.send(r).unwrap();
    }
    let Ok(Reply::Error { code: 413, message }) = rx.try_recv() else {
        panic!("not refused with 413");
    };
    assert!(
        message.contains("task 0") && message.contains("max_payload"),
        "{message}"
    );
}

#[test]
fn finished_jobs_leave_memory_once_stored_and_stay_listed_in_the_window() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 3);
    e.handle(result(&e, &lease, TaskState::Succeeded, 4));
    assert!(e.take_effects().put_jobs.contains(&id));
    e.handle(Input::Moved(id.clone()));
    assert!(e.jobs.get(&id).is_none());
    assert_eq!(e.jobs_in_memory(), 0);
    let listed = list(&mut e);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, JobState::Completed);
    // A get is answered from the bucket.
    let (tx, _rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Get {
            job: id.clone(),
            offset: 0,
            limit: 10,
        },
        Caller::everyone(),
        tx,
    ));
    let fx = e.take_effects();
    assert!(matches!(fx.fetches.as_slice(), [(j, _, Fetch::Get { .. })] if *j == id));
    // Past the retention it leaves the window too.
    e.advance(e.config().job_retention.0 + std::time::Duration::from_secs(1));
    e.handle(Input::Tick);
    assert!(list(&mut e).is_empty());
}

/// What `jobs.list` answers now.
fn list(e: &mut Sim) -> Vec<JobStatus> {
    let all = ApiCall::List {
        status: None,
        limit: 10,
    };
    match owners::call(e, all, &Caller::everyone()) {
        Reply::Jobs(list) => list,
        other => panic!("not a list: {other:?}"),
    }
}

#[test]
fn cancelling_a_waiting_job_aborts_it_at_once() {
    let mut e = ready_engine(&[]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["true"]}, {"command": ["true"]}]}"#,
    );
    assert_eq!(e.jobs[&id].reason.as_deref(), Some("no workers are online"));
    let (tx, _rx2) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Cancel(id.clone()),
        Caller::everyone(),
        tx,
    ));
    assert_eq!(e.jobs[&id].status, JobState::Aborted);
    let fx = e.take_effects();
    let cancelled = fx
        .events
        .iter()
        .filter(|(_, ev)| {
            matches!(
                ev.body,
                EventBody::State {
                    state: TaskState::Cancelled,
                    ..
                }
            )
        })
        .count();
    assert_eq!(cancelled, 2);
}

#[test]
fn heartbeats_that_change_nothing_do_not_schedule() {
    let mut e = ready_engine(&[advert("w1", 1, 0)]);
    e.schedule_if_needed();
    e.handle(Input::Advert(Box::new(advert("w1", 1, 0))));
    assert!(!e.wants_schedule);
    let mut busier = advert("w1", 2, 0);
    busier.sent_at = now();
    e.handle(Input::Advert(Box::new(busier)));
    assert!(e.wants_schedule);
}
