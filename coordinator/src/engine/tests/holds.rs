//! The starvation hold: work that waited `starvation_after` gets the
//! workers it needs held, until it fits there or a held worker goes.

use super::*;
use crate::engine::queue::Hold;

const SMALL: &str = r#"{"tasks": [{"command": ["small"], "resources": {"gpus": 1}}]}"#;

fn small_on(worker: &str) -> String {
    format!(
        r#"{{"constraints": {{"workers": ["{worker}"]}}, "tasks": [{{"command": ["small"], "resources": {{"gpus": 1}}}}]}}"#
    )
}

/// Submits one small task and claims its reservation.
fn run_small(e: &mut Sim, json: &str, rev: u64) -> (String, Lease) {
    submit(e, json);
    let (key, lease) = e.take_effects().create_leases.remove(0);
    claim(e, &key, &lease, rev);
    (key, lease)
}

fn w(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

/// One tick after `starvation_after` has passed since the big work queued.
fn starve(e: &mut Sim) {
    let secs = CoordinatorConfig::default().starvation_after.0.as_secs();
    tick_after(e, secs + 1);
    e.schedule_if_needed();
}

#[test]
fn a_starving_task_gets_its_worker_held_until_it_fits_then_lets_go() {
    let mut e = ready_engine(&[advert("w1", 16, 3)]);
    let (k1, l1) = run_small(&mut e, SMALL, 1);
    let (k2, l2) = run_small(&mut e, SMALL, 2);
    let (big, _) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["big"], "resources": {"gpus": 2}}]}"#,
    );
    assert!(e.take_effects().create_leases.is_empty());
    // Before the big task has waited long, small work backfills past it.
    let (k3, l3) = run_small(&mut e, SMALL, 3);

    starve(&mut e);
    let held = Hold {
        job: big.clone(),
        task: Some(0),
        workers: vec![w("w1")],
    };
    assert_eq!(e.queue.hold(), Some(&held));
    let (s4, _) = submit(&mut e, SMALL);
    assert!(
        e.jobs[&big]
            .reason
            .as_deref()
            .unwrap()
            .contains("a worker is held for it"),
        "{:?}",
        e.jobs[&big].reason
    );
    // One GPU comes free: enough for the small task, not for the big one,
    // and the small one may not take it.
    finish(&mut e, &k1, &l1, TaskState::Succeeded, 1);
    assert!(pass(&mut e).is_empty(), "a held worker took other work");
    assert_eq!(task_state(&e, &s4, 0), (TaskState::Queued, 1));

    // Two free: the big task fits, and the hold ends with it.
    finish(&mut e, &k2, &l2, TaskState::Succeeded, 2);
    let placed = pass(&mut e);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].1.job_id, big);
    assert_eq!(e.queue.hold(), None);
    finish(&mut e, &k3, &l3, TaskState::Succeeded, 3);
    let placed = pass(&mut e);
    assert_eq!(placed.len(), 1, "the worker is still held");
    assert_eq!(placed[0].1.job_id, s4);
}

#[test]
fn a_hold_ends_when_its_worker_goes_and_moves_to_another() {
    let mut e = ready_engine(&[advert("w1", 16, 2), advert("w2", 16, 2)]);
    run_small(&mut e, &small_on("w1"), 1);
    run_small(&mut e, &small_on("w2"), 2);
    let (big, _) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["big"], "resources": {"gpus": 2}}]}"#,
    );
    starve(&mut e);
    assert_eq!(
        e.queue.hold().map(|h| h.workers.clone()),
        Some(vec![w("w1")])
    );

    e.handle(Input::WorkerGone {
        name: w("w1"),
        expired: false,
    });
    assert_eq!(e.queue.hold(), None);
    assert!(pass(&mut e).is_empty());
    let held = Hold {
        job: big,
        task: Some(0),
        workers: vec![w("w2")],
    };
    assert_eq!(e.queue.hold(), Some(&held));
    // w2 has a free GPU, but it is held for the big task now.
    submit(&mut e, SMALL);
    assert!(e.take_effects().create_leases.is_empty());
}

#[test]
fn a_starving_gang_gets_its_workers_held_until_it_fits() {
    let mut e = ready_engine(&[advert("w1", 16, 1), advert("w2", 16, 1)]);
    let (k1, l1) = run_small(&mut e, &small_on("w1"), 1);
    let (gang, _) = submit(
        &mut e,
        r#"{"gang": true, "tasks": [
            {"command": ["a"], "resources": {"gpus": 1}},
            {"command": ["b"], "resources": {"gpus": 1}}]}"#,
    );
    assert!(e.take_effects().create_leases.is_empty());
    // w2 is free: a small task backfills it while the gang is young.
    let (k2, l2) = run_small(&mut e, SMALL, 2);

    starve(&mut e);
    let held = Hold {
        job: gang.clone(),
        task: None,
        workers: vec![w("w1"), w("w2")],
    };
    assert_eq!(e.queue.hold(), Some(&held));
    e.handle(Input::Tick);
    e.schedule_if_needed();
    assert!(
        e.jobs[&gang]
            .reason
            .as_deref()
            .unwrap()
            .contains("workers are held for it"),
        "{:?}",
        e.jobs[&gang].reason
    );
    let (small, _) = submit(&mut e, SMALL);
    finish(&mut e, &k1, &l1, TaskState::Succeeded, 1);
    assert!(
        pass(&mut e).is_empty(),
        "a worker held for the gang took other work"
    );
    assert_eq!(task_state(&e, &small, 0), (TaskState::Queued, 1));

    finish(&mut e, &k2, &l2, TaskState::Succeeded, 2);
    let placed = pass(&mut e);
    assert_eq!(placed.len(), 2);
    assert!(placed.iter().all(|(_, l)| l.job_id == gang));
    assert_eq!(e.queue.hold(), None);
}
