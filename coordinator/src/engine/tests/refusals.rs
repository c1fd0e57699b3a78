//! Reservations not taken up: a refusal, an unclaimed reservation and a
//! failed write all requeue the same attempt, and the avoid window keeps
//! the task away from the worker that refused it for a while.

use super::*;

const ONE: &str = r#"{"tasks": [{"command": ["true"]}]}"#;

#[test]
fn a_refused_task_keeps_away_from_that_worker_for_the_avoid_window() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _) = submit(&mut e, ONE);
    let (key, lease) = e.take_effects().create_leases.remove(0);
    refuse(&mut e, &key, &lease, 2, "not enough CPUs");
    assert_eq!(task_state(&e, &id, 0), (TaskState::Queued, 1));
    assert!(
        pass(&mut e).is_empty(),
        "offered again to the worker that refused it"
    );

    tick_after(&mut e, AVOID_FOR.as_secs() - 1);
    assert!(pass(&mut e).is_empty(), "the avoid window ended early");
    tick_after(&mut e, 2);
    let again = pass(&mut e);
    assert_eq!(again.len(), 1, "the avoid window never ended");
    assert_eq!((again[0].0.as_str(), again[0].1.attempt), (key.as_str(), 1));
}

#[test]
fn a_fresh_advert_from_the_refusing_worker_ends_the_avoid_window() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    submit(&mut e, ONE);
    let (key, lease) = e.take_effects().create_leases.remove(0);
    refuse(
        &mut e,
        &key,
        &lease,
        2,
        "a task that just ended still held it",
    );
    assert!(pass(&mut e).is_empty());
    // The same advert as before: only the refusal it ends makes a pass.
    e.handle(Input::Advert(Box::new(advert("w1", 4, 0))));
    let again = pass(&mut e);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1.attempt, 1);
}

#[test]
fn refusal_expiry_and_a_failed_write_requeue_the_same_attempt() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    // No retries: an attempt spent on any of these would end the task.
    let (id, _) = submit(
        &mut e,
        r#"{"max_retries": 0, "tasks": [{"command": ["true"]}]}"#,
    );
    let (key, lease) = e.take_effects().create_leases.remove(0);

    refuse(&mut e, &key, &lease, 2, "not enough CPUs");
    let fx = e.take_effects();
    assert_eq!(fx.purge_leases, vec![key.clone()]);
    let t = &e.jobs[&id].tasks[0];
    assert_eq!(
        (t.state, t.attempt, t.worker.as_ref()),
        (TaskState::Queued, 1, None)
    );
    assert!(t
        .reason
        .as_deref()
        .unwrap()
        .contains("refused it: not enough CPUs"));

    // The other worker gets the same attempt, and does not claim it.
    let (key2, lease2) = pass(&mut e).remove(0);
    assert_ne!(lease2.worker, lease.worker);
    assert_eq!(lease2.attempt, 1);
    e.handle(Input::Lease(LeaseChange::Expired { key: key2 }));
    let t = &e.jobs[&id].tasks[0];
    assert_eq!((t.state, t.attempt), (TaskState::Queued, 1));
    assert!(t
        .reason
        .as_deref()
        .unwrap()
        .contains("did not claim its reservation"));
    // Both workers are avoided now.
    assert!(pass(&mut e).is_empty());

    tick_after(&mut e, AVOID_FOR.as_secs() + 1);
    let (key3, lease3) = pass(&mut e).remove(0);
    assert_eq!(lease3.attempt, 1);
    e.handle(Input::LeaseCreateFailed {
        key: key3,
        error: "timed out".into(),
    });
    let t = &e.jobs[&id].tasks[0];
    assert_eq!((t.state, t.attempt), (TaskState::Queued, 1));
    assert_eq!(t.reason.as_deref(), Some("reservation failed: timed out"));

    // The first real run (after the pause a failed write waits) is still
    // attempt 1, and may succeed.
    let pause = e.config().retry_backoff.0;
    e.advance(pause);
    e.handle(Input::Tick);
    let (key4, lease4) = pass(&mut e).remove(0);
    assert_eq!(lease4.attempt, 1);
    claim(&mut e, &key4, &lease4, 9);
    finish(&mut e, &key4, &lease4, TaskState::Succeeded, 1);
    assert_eq!(e.jobs[&id].status, JobState::Completed);
}
