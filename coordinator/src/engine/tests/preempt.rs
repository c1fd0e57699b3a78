//! Preemption through the engine: who may preempt whom, the victim's
//! stop and its return without spending a retry, the hold that keeps the
//! freed worker for the preemptor, gangs stopped whole.

use super::*;
use gpufleet_schema::policy::SchedPolicy;

/// Everyone (user `default`) may preempt up to priority `max`.
fn may_preempt(e: &mut Sim, max: i32) {
    let policy: SchedPolicy = Encoding::Json
        .decode(format!(r#"{{"users": {{"default": {{"preempt_priority": {max}}}}}}}"#).as_bytes())
        .unwrap();
    e.handle(Input::Policy(Some(Box::new(policy))));
}

fn one_gpu(priority: i32, preemptible: bool) -> String {
    format!(
        r#"{{"priority": {priority}, "preemptible": {preemptible}, "max_retries": 0,
            "tasks": [{{"command": ["train"], "resources": {{"gpus": 1}}}}]}}"#
    )
}

/// A job whose one task now runs; its lease.
fn running(e: &mut Sim, json: &str, rev: u64) -> (JobId, String, Lease) {
    let (id, _) = submit(e, json);
    let (key, lease) = e.take_effects().create_leases.remove(0);
    claim(e, &key, &lease, rev);
    e.take_effects();
    (id, key, lease)
}

#[test]
fn an_urgent_job_preempts_a_preemptible_one_which_comes_back_without_spending_a_retry() {
    let mut e = ready_engine(&[advert("w1", 8, 1)]);
    may_preempt(&mut e, 10);
    let (low, key, lease) = running(&mut e, &one_gpu(0, true), 10);

    let (urgent, _) = submit(&mut e, &one_gpu(5, false));
    let fx = e.take_effects();
    assert!(fx.create_leases.is_empty(), "the GPU is not free yet");
    assert_eq!(fx.cancel_leases.len(), 1, "the victim is asked to stop");
    let (k, l, rev) = &fx.cancel_leases[0];
    assert_eq!((k, l.state, *rev), (&key, LeaseState::Cancelling, 10));
    let p = l
        .preempt
        .as_ref()
        .expect("the stop says it is a preemption");
    assert_eq!((&p.by, p.grace), (&urgent, e.config().preempt_grace));
    let victim = &e.jobs[&low].tasks[0];
    assert_eq!(victim.state, TaskState::Running);
    assert!(
        victim
            .reason
            .as_deref()
            .unwrap()
            .contains(&format!("preempted by {urgent}")),
        "{:?}",
        victim.reason
    );
    let why = e.jobs[&urgent].tasks[0].reason.clone().unwrap();
    assert!(why.starts_with("waiting for preemption"), "{why}");
    assert!(why.contains(low.as_str()) && why.contains("w1"), "{why}");

    // A third job of a priority between them waits: the GPU is held.
    let (third, _) = submit(&mut e, &one_gpu(3, false));
    e.take_effects();
    // Another pass does not preempt again.
    tick_after(&mut e, 1);
    let fx = pass(&mut e);
    assert!(fx.is_empty());
    assert!(
        e.take_effects().cancel_leases.len() <= 1,
        "only the same stop asked again"
    );

    // The victim stops (whatever the worker calls it) and releases.
    finish(&mut e, &key, &lease, TaskState::Cancelled, 1);
    let t = &e.jobs[&low].tasks[0];
    assert_eq!((t.state, t.attempt, t.spared), (TaskState::Queued, 2, 1));
    assert!(
        t.reason
            .as_deref()
            .unwrap()
            .contains(&format!("INTERRUPTED: preempted by {urgent}")),
        "{:?}",
        t.reason
    );
    assert_eq!(e.jobs[&low].error_count, 0, "a preemption is no error");
    assert!(
        !e.jobs[&low].status.is_finished(),
        "max_retries 0, yet back in the queue"
    );
    // Listeners were told how the attempt ended.
    let told = e.take_effects().events.into_iter().any(|(_, ev)| {
        matches!(&ev.body, EventBody::State { state: TaskState::Interrupted, reason: Some(r), .. }
            if *r == format!("preempted by {urgent}"))
    });
    assert!(told, "an INTERRUPTED state event naming the preemptor");
    let placed = pass(&mut e);
    assert_eq!(placed.len(), 1);
    assert_eq!(
        placed[0].1.job_id, urgent,
        "the freed GPU goes to the preemptor"
    );
    assert_eq!(e.jobs[&third].tasks[0].state, TaskState::Queued);
    assert!(e.queue.preempting().is_empty(), "the hold ends once placed");
}

#[test]
fn nothing_is_preempted_that_did_not_opt_in_nor_by_anyone_the_policy_does_not_allow() {
    // Not preemptible: the urgent job waits.
    let mut e = ready_engine(&[advert("w1", 8, 1)]);
    may_preempt(&mut e, 10);
    running(&mut e, &one_gpu(0, false), 10);
    submit(&mut e, &one_gpu(5, false));
    assert!(e.take_effects().cancel_leases.is_empty());

    // Preemptible, but nobody may preempt: a priority says nothing.
    let mut e = ready_engine(&[advert("w1", 8, 1)]);
    running(&mut e, &one_gpu(0, true), 10);
    submit(&mut e, &one_gpu(1000, false));
    assert!(e.take_effects().cancel_leases.is_empty());

    // The policy caps the class: priority 1000 counts as 2, which does
    // not outrank a victim of priority 2.
    let mut e = ready_engine(&[advert("w1", 8, 1)]);
    may_preempt(&mut e, 2);
    running(&mut e, &one_gpu(2, true), 10);
    submit(&mut e, &one_gpu(1000, false));
    assert!(e.take_effects().cancel_leases.is_empty());
}

#[test]
fn a_lost_victim_still_comes_back_free_and_only_the_preemptor_may_use_what_it_frees() {
    let mut e = ready_engine(&[advert("w1", 8, 1)]);
    may_preempt(&mut e, 10);
    let (low, key, _) = running(&mut e, &one_gpu(0, true), 10);
    let (urgent, _) = submit(&mut e, &one_gpu(5, false));
    e.take_effects();
    // Its worker froze during the grace: the lease lapses (the worker has
    // fenced the task by then), and the victim is not charged for it.
    e.handle(Input::Lease(LeaseChange::Expired { key }));
    let t = &e.jobs[&low].tasks[0];
    assert_eq!((t.state, t.attempt, t.spared), (TaskState::Queued, 2, 1));
    let placed = pass(&mut e);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].1.job_id, urgent);
}

#[test]
fn a_gang_is_preempted_whole_and_reruns_without_spending_a_retry() {
    let mut e = ready_engine(&[advert("w1", 8, 1), advert("w2", 8, 1)]);
    may_preempt(&mut e, 10);
    let (gang, _) = submit(
        &mut e,
        r#"{"gang": true, "preemptible": true, "max_retries": 0, "tasks": [
            {"command": ["r0"], "resources": {"gpus": 1}},
            {"command": ["r1"], "resources": {"gpus": 1}}]}"#,
    );
    let members = e.take_effects().create_leases;
    assert_eq!(members.len(), 2);
    for (k, l) in &members {
        claim(&mut e, k, l, 10);
    }
    e.take_effects();
    let (urgent, _) = submit(&mut e, &one_gpu(5, false));
    let fx = e.take_effects();
    assert_eq!(fx.cancel_leases.len(), 2, "never one member alone");
    for (k, l) in &members {
        finish(&mut e, k, l, TaskState::Interrupted, 1);
    }
    for t in &e.jobs[&gang].tasks {
        assert_eq!((t.state, t.attempt), (TaskState::Queued, 2), "{t:?}");
        assert_eq!(t.counted_attempts(), 1);
    }
    let placed = pass(&mut e);
    assert_eq!(placed[0].1.job_id, urgent, "{placed:?}");
}

#[test]
fn a_preemptor_whose_hold_is_gone_waits_for_its_victims_rather_than_take_more() {
    let mut e = ready_engine(&[advert("w1", 8, 1), advert("w2", 8, 1)]);
    may_preempt(&mut e, 10);
    let (_, key, lease) = running(&mut e, &one_gpu(0, true), 10);
    let (other, _, _) = running(&mut e, &one_gpu(0, true), 11);
    let (urgent, _) = submit(&mut e, &one_gpu(5, false));
    assert_eq!(e.take_effects().cancel_leases.len(), 1);
    // The hold is in memory only: as after a coordinator took over.
    let victim_worker = lease.worker.clone();
    e.handle(Input::WorkerGone {
        name: victim_worker.clone(),
        expired: false,
    });
    e.handle(Input::Advert(Box::new(advert(
        victim_worker.as_str(),
        8,
        1,
    ))));
    assert!(e.queue.preempting().is_empty());
    tick_after(&mut e, 1);
    pass(&mut e);
    let fx = e.take_effects();
    assert!(
        fx.cancel_leases.iter().all(|(k, _, _)| *k == key),
        "the other job is not preempted as well"
    );
    assert_eq!(e.jobs[&other].tasks[0].stopping, None);
    let why = e.jobs[&urgent].tasks[0].reason.clone().unwrap();
    assert!(why.starts_with("waiting for preemption"), "{why}");
}

#[test]
fn what_a_preemption_frees_goes_to_the_preemptor_not_to_a_task_loaded_there() {
    let mut e = ready_engine(&[advert("w1", 8, 1)]);
    may_preempt(&mut e, 10);
    let (_low, vkey, victim) = running(&mut e, &one_gpu(0, true), 10);
    // A two-phase task loads on the same worker and waits for its GPU.
    let (loaded, _) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["train"], "resources": {"gpus": 1, "cpus": 2}, "load": {"cpus": 1}}]}"#,
    );
    let (lkey, lease) = e.take_effects().create_leases.remove(0);
    assert!(lease.grant.loading);
    claim(&mut e, &lkey, &lease, 20);
    let mut l = lease.clone();
    l.state = LeaseState::Running;
    l.instance = Some("inst".into());
    l.claim_rev = Some(20);
    l.ready = true;
    e.handle(Input::Lease(LeaseChange::Put {
        key: lkey.clone(),
        rev: 21,
        lease: Box::new(l),
    }));
    e.schedule_if_needed();
    assert!(e.take_effects().grant_leases.is_empty(), "the GPU is busy");

    let (urgent, _) = submit(&mut e, &one_gpu(5, false));
    assert_eq!(e.take_effects().cancel_leases.len(), 1);
    finish(&mut e, &vkey, &victim, TaskState::Cancelled, 1);
    e.schedule_if_needed();
    let fx = e.take_effects();
    assert!(fx.grant_leases.is_empty(), "the loaded task waits");
    assert_eq!(fx.create_leases.len(), 1);
    assert_eq!(fx.create_leases[0].1.job_id, urgent);
    let why = e.jobs[&loaded].tasks[0].reason.clone().unwrap();
    assert!(
        why.contains("held for job") && why.contains(urgent.as_str()),
        "{why}"
    );
}
