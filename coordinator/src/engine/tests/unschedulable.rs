//! Unschedulable work keeps its reason, and with `unschedulable_after`
//! ends `FAILED_TO_RUN` once it has fitted no worker that long.

use super::*;

const TOO_BIG: &str =
    r#"{"unschedulable_after": "30s", "tasks": [{"command": ["x"], "resources": {"gpus": 4}}]}"#;

#[test]
fn work_no_worker_fits_ends_after_unschedulable_after() {
    let mut e = ready_engine(&[advert("w1", 16, 2)]);
    let (id, _) = submit(&mut e, TOO_BIG);
    let (plain, _) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["x"], "resources": {"gpus": 4}}]}"#,
    );
    let why = e.jobs[&id].reason.clone().unwrap();
    assert!(why.contains("4 GPUs"), "{why}");
    tick_after(&mut e, 20);
    e.schedule_if_needed();
    assert_eq!(e.jobs[&id].status, JobState::Queued);
    tick_after(&mut e, 11);
    e.schedule_if_needed();
    assert_eq!(e.jobs[&id].status, JobState::FailedToRun);
    let ended = e.jobs[&id].reason.clone().unwrap();
    assert!(
        ended.contains(&format!(
            "unschedulable for 30s (unschedulable_after): {why}"
        )),
        "{ended}"
    );
    // Without the setting, it keeps waiting with its reason.
    assert_eq!(e.jobs[&plain].status, JobState::Queued);
    assert_eq!(e.jobs[&plain].reason.as_deref(), Some(why.as_str()));
}

#[test]
fn the_clock_stops_when_a_worker_that_fits_joins() {
    let mut e = ready_engine(&[advert("w1", 16, 2)]);
    let (id, _) = submit(&mut e, TOO_BIG);
    tick_after(&mut e, 20);
    e.schedule_if_needed();
    // A big worker joins, busy with something else: the job could fit
    // it, so it only waits.
    e.handle(Input::Advert(Box::new(advert("big", 16, 4))));
    let (_, _) = submit(
        &mut e,
        r#"{"priority": 9, "tasks": [{"command": ["y"], "resources": {"gpus": 4}}]}"#,
    );
    e.take_effects();
    tick_after(&mut e, 20);
    e.schedule_if_needed();
    assert_eq!(e.jobs[&id].status, JobState::Queued);
    // It goes: the clock starts again from nothing.
    e.handle(Input::WorkerGone {
        name: WorkerId::new("big").unwrap(),
        expired: false,
    });
    e.handle(Input::Tick);
    e.schedule_if_needed();
    tick_after(&mut e, 20);
    e.schedule_if_needed();
    assert_eq!(e.jobs[&id].status, JobState::Queued);
    tick_after(&mut e, 11);
    e.schedule_if_needed();
    assert_eq!(e.jobs[&id].status, JobState::FailedToRun);
}
