//! Cancelling a running task: its lease is asked to stop (CANCELLING),
//! and the task ends when its result comes or its lease expires, never
//! retried.

use super::*;

/// A job (with retries to spare) whose one task runs, under lease rev 10.
fn running(e: &mut Sim) -> (JobId, String, Lease) {
    let (id, _) = submit(
        e,
        r#"{"max_retries": 2, "tasks": [{"command": ["sleep"]}]}"#,
    );
    let (key, lease) = e.take_effects().create_leases.remove(0);
    claim(e, &key, &lease, 10);
    e.take_effects();
    (id, key, lease)
}

fn cancel(e: &mut Sim, id: &JobId) -> Effects {
    let (tx, _rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Cancel(id.clone()),
        Caller::everyone(),
        tx,
    ));
    e.take_effects()
}

#[test]
fn a_cancelled_running_task_is_asked_to_stop_and_ends_with_its_result() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, key, lease) = running(&mut e);
    let fx = cancel(&mut e, &id);
    assert_eq!(fx.cancel_leases.len(), 1);
    let (k, l, rev) = &fx.cancel_leases[0];
    assert_eq!((k, l.state, *rev), (&key, LeaseState::Cancelling, 10));
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    assert!(!e.jobs[&id].status.is_finished());

    // The worker renewed before our compare-and-set: the next tick asks
    // again, over the new revision.
    claim(&mut e, &key, &lease, 11);
    tick_after(&mut e, 1);
    let fx = e.take_effects();
    assert_eq!(fx.cancel_leases.len(), 1);
    assert_eq!(fx.cancel_leases[0].2, 11);

    // It stops and reports INTERRUPTED, which a live job would retry.
    finish(&mut e, &key, &lease, TaskState::Interrupted, 1);
    let t = &e.jobs[&id].tasks[0];
    assert_eq!((t.state, t.attempt), (TaskState::Cancelled, 1));
    assert_eq!(e.jobs[&id].status, JobState::Aborted);
    assert!(pass(&mut e).is_empty());
}

#[test]
fn a_cancelled_running_task_whose_lease_expires_ends_without_a_retry() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, key, _) = running(&mut e);
    cancel(&mut e, &id);
    // Its worker froze: the lease runs out instead of a result coming.
    e.handle(Input::Lease(LeaseChange::Expired { key }));
    let t = &e.jobs[&id].tasks[0];
    assert_eq!((t.state, t.attempt), (TaskState::Cancelled, 1));
    assert_eq!(e.jobs[&id].status, JobState::Aborted);
    assert!(pass(&mut e).is_empty());
}
