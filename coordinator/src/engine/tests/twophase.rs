//! Two-phase tasks: a load phase without a GPU, then the GPU on the same
//! worker once the task has loaded (see `engine/twophase.rs`).

use super::*;
use gpufleet_schema::TaskId;

/// A two-phase task: 3 CPUs and 8 GiB in all with one GPU; its load phase
/// holds 1 CPU and 4 GiB.
const TWO_PHASE: &str = r#"{"command": ["train"], "resources": {"gpus": 1, "cpus": 3, "memory": "8GiB"}, "load": {"cpus": 1, "memory": "4GiB"}}"#;

fn job_of(tasks: &[&str], extra: &str) -> String {
    format!(r#"{{{extra}"tasks": [{}]}}"#, tasks.join(","))
}

/// The worker says the task has loaded: its lease, RUNNING, marked ready.
fn ready(e: &mut Sim, key: &str, lease: &Lease, rev: u64) {
    let mut l = lease.clone();
    l.state = LeaseState::Running;
    l.instance = Some("inst".into());
    l.claim_rev = Some(rev - 1);
    l.ready = true;
    e.handle(Input::Lease(LeaseChange::Put {
        key: key.into(),
        rev,
        lease: Box::new(l),
    }));
}

/// The GPU grants a pass made: (key, lease, expected revision).
fn grants(e: &mut Sim) -> Vec<(String, Lease, u64)> {
    e.schedule_if_needed();
    e.take_effects().grant_leases
}

/// Submits, reserves and claims a plain task pinned to `worker`; returns
/// its key and lease.
fn pinned_gpu_task(e: &mut Sim, worker: &str, cpus: u32) -> (String, Lease) {
    let (_, _) = submit(
        e,
        &job_of(
            &[&format!(
                r#"{{"command": ["p"], "resources": {{"gpus": 1, "cpus": {cpus}}}}}"#
            )],
            &format!(r#""constraints": {{"workers": ["{worker}"]}}, "#),
        ),
    );
    let (key, lease) = pass(e).pop().expect("the pinned task is placed");
    assert_eq!(lease.worker.as_str(), worker);
    claim(e, &key, &lease, 5);
    (key, lease)
}

#[test]
fn a_loaded_task_gets_its_gpu_on_its_own_worker_only() {
    let mut e = ready_engine(&[advert("w1", 4, 1), advert("w2", 4, 1)]);
    let (id, _rx) = submit(&mut e, &job_of(&[TWO_PHASE], ""));
    let (key, lease) = e.take_effects().create_leases.pop().unwrap();
    // The load phase: its own CPUs and memory, no GPU.
    assert!(lease.grant.loading && lease.grant.gpus.is_empty());
    assert_eq!(
        (lease.grant.cpus_milli, lease.grant.memory),
        (1000, ByteSize::gib(4))
    );
    claim(&mut e, &key, &lease, 10);
    // Its worker's GPU goes to other work while it loads.
    let w = lease.worker.as_str();
    let (pkey, plain) = pinned_gpu_task(&mut e, w, 1);

    ready(&mut e, &key, &lease, 11);
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Running);
    assert!(
        grants(&mut e).is_empty(),
        "not on the other worker's free GPU"
    );
    assert_eq!(
        e.jobs[&id].tasks[0].reason.as_deref(),
        Some(format!("loaded; waiting for a GPU on {w}: its GPU is busy").as_str())
    );

    finish(&mut e, &pkey, &plain, TaskState::Succeeded, 1);
    let g = grants(&mut e);
    assert_eq!(g.len(), 1);
    let (gkey, granted, rev) = g[0].clone();
    assert_eq!(
        (gkey.as_str(), rev),
        (key.as_str(), 11),
        "the same lease, over what the worker wrote"
    );
    let up = granted.gpu_grant.clone().unwrap();
    assert_eq!(up.grant.gpus[0].uuid.as_str(), format!("GPU-{w}-0"));
    assert_eq!(
        (up.grant.cpus_milli, up.grant.memory),
        (3000, ByteSize::gib(8))
    );
    assert!(!up.grant.loading && up.grant.exclusive);
    assert_eq!(
        granted.grant, lease.grant,
        "the reservation, as signed, is kept"
    );
    assert_eq!(e.jobs[&id].tasks[0].grant.as_deref(), Some(&up.grant));
    assert_eq!(e.jobs[&id].tasks[0].reason, None);

    // The worker's next renewal carries the grant: nothing more to do.
    let mut l = granted.clone();
    l.claim_rev = Some(10);
    e.handle(Input::Lease(LeaseChange::Put {
        key: key.clone(),
        rev: 12,
        lease: Box::new(l),
    }));
    assert!(grants(&mut e).is_empty());
    // Its GPU is held: a new GPU task on that worker waits.
    submit(
        &mut e,
        &job_of(
            &[r#"{"command": ["q"], "resources": {"gpus": 1}}"#],
            &format!(r#""constraints": {{"workers": ["{w}"]}}, "#),
        ),
    );
    assert!(pass(&mut e).is_empty());
}

#[test]
fn a_loaded_task_goes_before_new_work_on_its_worker() {
    let mut e = ready_engine(&[advert("w1", 4, 1)]);
    let (id, _rx) = submit(&mut e, &job_of(&[TWO_PHASE], ""));
    let (key, lease) = e.take_effects().create_leases.pop().unwrap();
    claim(&mut e, &key, &lease, 10);
    let (pkey, plain) = pinned_gpu_task(&mut e, "w1", 1);
    ready(&mut e, &key, &lease, 11);
    assert!(grants(&mut e).is_empty());
    // 2 CPUs of 4 are free, and the loaded task needs 2 more for its GPU
    // phase: a new load phase of 2 CPUs would take them, and waits.
    let (later, _rx) = submit(
        &mut e,
        &job_of(
            &[r#"{"command": ["t2"], "resources": {"gpus": 1, "cpus": 2}, "load": {"cpus": 2}}"#],
            "",
        ),
    );
    let fx = e.take_effects();
    assert!(fx.create_leases.is_empty() && fx.grant_leases.is_empty());
    assert!(e.jobs[&later].tasks[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("free CPUs"));
    // So does a new GPU task submitted after it.
    let (gpu_job, _rx) = submit(
        &mut e,
        &job_of(
            &[r#"{"command": ["g"], "resources": {"gpus": 1, "cpus": 1}}"#],
            "",
        ),
    );
    assert!(e.take_effects().create_leases.is_empty());

    finish(&mut e, &pkey, &plain, TaskState::Succeeded, 1);
    e.schedule_if_needed();
    let fx = e.take_effects();
    assert_eq!(fx.grant_leases.len(), 1, "the loaded task has the GPU");
    assert_eq!(fx.grant_leases[0].0, key);
    assert!(
        fx.create_leases.is_empty(),
        "no CPU left for the new load phase, no GPU for the GPU task"
    );
    assert_eq!(e.jobs[&later].tasks[0].state, TaskState::Queued);
    assert_eq!(e.jobs[&gpu_job].tasks[0].state, TaskState::Queued);
    assert!(e.jobs[&id].tasks[0].grant.as_deref().unwrap().exclusive);
}

#[test]
fn loaded_tasks_get_the_gpu_by_priority_then_by_when_they_loaded() {
    let mut e = ready_engine(&[advert("w1", 16, 1)]);
    // The lowest priority there is: ordering by it must not overflow.
    let (low, _rx) = submit(
        &mut e,
        &job_of(&[TWO_PHASE, TWO_PHASE], r#""priority": -2147483648, "#),
    );
    let (high, _rx) = submit(&mut e, &job_of(&[TWO_PHASE], r#""priority": 5, "#));
    let leases = e.take_effects().create_leases;
    assert_eq!(leases.len(), 3, "all three load at once");
    let (pkey, plain) = pinned_gpu_task(&mut e, "w1", 1);
    let key_of = |job: &JobId, i: usize| {
        leases
            .iter()
            .find(|(_, l)| l.task_id == TaskId::for_index(job, i))
            .unwrap()
            .clone()
    };
    let order = [(low.clone(), 1), (low.clone(), 0), (high.clone(), 0)];
    for (n, (job, i)) in order.iter().enumerate() {
        let (k, l) = key_of(job, *i);
        claim(&mut e, &k, &l, 10 + 2 * n as u64);
        e.advance(std::time::Duration::from_secs(1));
        ready(&mut e, &k, &l, 11 + 2 * n as u64);
    }
    assert!(grants(&mut e).is_empty());
    finish(&mut e, &pkey, &plain, TaskState::Succeeded, 1);
    // The GPU goes to the higher priority first, then to the task of the
    // other job that loaded first.
    let mut got = Vec::new();
    for seq in 2..5 {
        let g = grants(&mut e);
        assert_eq!(g.len(), 1, "one GPU, one task at a time");
        let (k, l, _) = g[0].clone();
        got.push(l.task_id.clone());
        finish(&mut e, &k, &l, TaskState::Succeeded, seq);
    }
    assert_eq!(
        got,
        vec![
            e.jobs[&high].tasks[0].id.clone(),
            e.jobs[&low].tasks[1].id.clone(),
            e.jobs[&low].tasks[0].id.clone(),
        ]
    );
    assert_eq!(e.jobs[&low].status, JobState::Completed);
}

#[test]
fn load_phases_stay_under_the_workers_load_memory_cap() {
    let mut w = advert("w1", 16, 1);
    w.load_memory_cap = Some(ByteSize::gib(10));
    let mut e = ready_engine(&[w]);
    let (id, _rx) = submit(&mut e, &job_of(&[TWO_PHASE, TWO_PHASE, TWO_PHASE], ""));
    let leases = e.take_effects().create_leases;
    assert_eq!(leases.len(), 2, "4 GiB each under a 10 GiB cap");
    let waiting = e.jobs[&id]
        .tasks
        .iter()
        .find(|t| t.state == TaskState::Queued);
    assert!(
        waiting
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .contains("load-phase memory cap"),
        "{:?}",
        waiting.unwrap().reason
    );
    // A GPU task still fits beside them: the cap left the memory for it.
    let (other, _rx) = submit(
        &mut e,
        &job_of(
            &[r#"{"command": ["g"], "resources": {"gpus": 1, "memory": "50GiB"}}"#],
            "",
        ),
    );
    assert_eq!(pass(&mut e).len(), 1);
    assert_eq!(e.jobs[&other].tasks[0].state, TaskState::Reserved);
}

#[test]
fn a_grant_that_lost_its_race_is_made_again_and_none_once_the_lease_lapsed() {
    let mut e = ready_engine(&[advert("w1", 4, 1)]);
    let (id, _rx) = submit(&mut e, &job_of(&[TWO_PHASE], r#""max_retries": 0, "#));
    let (key, lease) = e.take_effects().create_leases.pop().unwrap();
    claim(&mut e, &key, &lease, 10);
    ready(&mut e, &key, &lease, 11);
    let g = grants(&mut e);
    assert_eq!(g[0].2, 11);
    // The worker renewed first: its value, ready and without the grant.
    ready(&mut e, &key, &lease, 12);
    assert_eq!(
        e.jobs[&id].tasks[0].grant.as_deref(),
        Some(&lease.grant),
        "back to the load phase's grant"
    );
    let g = grants(&mut e);
    assert_eq!(g.len(), 1, "granted again");
    assert_eq!(g[0].2, 12, "over the newer revision");
    // The worker froze; its lease lapsed before the grant landed.
    ready(&mut e, &key, &lease, 13);
    e.handle(Input::Lease(LeaseChange::Expired { key: key.clone() }));
    assert!(grants(&mut e).is_empty(), "no GPU for a lapsed attempt");
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Lost);
}

#[test]
fn a_restarted_coordinator_finds_the_wait_in_the_lease() {
    let mut e = ready_engine(&[advert("w1", 4, 1)]);
    let (id, _rx) = submit(&mut e, &job_of(&[TWO_PHASE], ""));
    let (key, lease) = e.take_effects().create_leases.pop().unwrap();
    let record = e.jobs[&id].clone();
    // The coordinator stops before it sees the claim; a new one starts
    // from the record (RESERVED) and the live lease, ready.
    let mut e = Sim::new(CoordinatorConfig::default());
    e.restore_job(record);
    e.handle(Input::Advert(Box::new(advert("w1", 4, 1))));
    ready(&mut e, &key, &lease, 11);
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Running);
    let g = grants(&mut e);
    assert_eq!(g.len(), 1);
    assert_eq!((g[0].0.as_str(), g[0].2), (key.as_str(), 11));

    // And one that restarts after the grant landed knows it holds its GPU.
    let (_, granted, _) = g[0].clone();
    let record = e.jobs[&id].clone();
    let mut e = Sim::new(CoordinatorConfig::default());
    let mut stale = record;
    stale.tasks[0].grant = Some(Box::new(lease.grant.clone()));
    e.restore_job(stale);
    e.handle(Input::Advert(Box::new(advert("w1", 4, 1))));
    e.handle(Input::Lease(LeaseChange::Put {
        key: key.clone(),
        rev: 12,
        lease: Box::new(granted.clone()),
    }));
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    assert!(grants(&mut e).is_empty());
    assert_eq!(
        e.jobs[&id].tasks[0].grant.as_deref(),
        granted.gpu_grant.as_ref().map(|u| &u.grant)
    );
}

#[test]
fn a_task_that_never_says_ready_ends_like_any_task() {
    let mut e = ready_engine(&[advert("w1", 4, 1)]);
    let (id, _rx) = submit(&mut e, &job_of(&[TWO_PHASE], ""));
    let (key, lease) = e.take_effects().create_leases.pop().unwrap();
    claim(&mut e, &key, &lease, 10);
    assert!(grants(&mut e).is_empty());
    finish(&mut e, &key, &lease, TaskState::Succeeded, 1);
    assert_eq!(e.jobs[&id].status, JobState::Completed);
    assert!(e.jobs[&id].tasks[0]
        .grant
        .as_deref()
        .unwrap()
        .gpus
        .is_empty());
}
