//! Gangs: a member that fails stops the others, the whole gang runs again
//! as one (as attempt + 1, within `max_retries`) and then ends; members
//! `min_tasks` leaves out are dropped from the run.

use super::*;

/// A gang of `n` one-GPU members.
fn gang(n: usize, extra: &str) -> String {
    let members = vec![r#"{"command": ["rank"], "resources": {"gpus": 1}}"#; n].join(", ");
    format!(r#"{{"gang": true, {extra} "tasks": [{members}]}}"#)
}

/// The reservations of one run, in task order, all claimed.
fn start_run(e: &mut Sim, placed: Vec<(String, Lease)>, rev: u64) -> Vec<(String, Lease)> {
    let mut run = placed;
    run.sort_by(|a, b| a.1.task_id.as_str().cmp(b.1.task_id.as_str()));
    for (k, l) in &run {
        claim(e, k, l, rev);
    }
    e.take_effects();
    run
}

fn states(e: &Sim, job: &JobId) -> Vec<(TaskState, u32)> {
    e.jobs[job]
        .tasks
        .iter()
        .map(|t| (t.state, t.attempt))
        .collect()
}

#[test]
fn a_failed_member_stops_the_gang_which_reruns_as_a_whole_then_ends() {
    let mut e = ready_engine(&[advert("w1", 16, 1), advert("w2", 16, 1)]);
    let (id, _) = submit(&mut e, &gang(2, r#""max_retries": 1,"#));
    let placed = e.take_effects().create_leases;
    assert!(placed
        .iter()
        .all(|(_, l)| l.rendezvous.as_ref().unwrap().world_size == 2));
    let run = start_run(&mut e, placed, 5);

    // Rank 0 fails: rank 1 is asked to stop, and the gang waits for it.
    finish(&mut e, &run[0].0, &run[0].1, TaskState::Failed, 1);
    let fx = e.take_effects();
    assert_eq!(fx.cancel_leases.len(), 1);
    let (key, lease, _) = &fx.cancel_leases[0];
    assert_eq!(key, &run[1].0);
    assert_eq!(lease.state, LeaseState::Cancelling);
    assert!(lease
        .reason
        .as_deref()
        .unwrap()
        .contains("another member of its gang failed"));
    assert_eq!(
        states(&e, &id),
        vec![(TaskState::Failed, 1), (TaskState::Running, 1)]
    );
    assert!(
        pass(&mut e).is_empty(),
        "the gang ran again while a member still ran"
    );

    // Rank 1 stops: the whole gang queues again, as attempt 2.
    finish(&mut e, &run[1].0, &run[1].1, TaskState::Cancelled, 2);
    assert_eq!(states(&e, &id), vec![(TaskState::Queued, 2); 2]);
    let reason = e.jobs[&id].tasks[1].reason.clone().unwrap();
    assert!(reason.starts_with("gang run 1 failed"), "{reason}");
    assert!(e.jobs[&id].tasks.iter().all(|t| t.started_at.is_none()));

    // The second run fails too: no retries are left, so the job ends.
    assert!(
        pass(&mut e).is_empty(),
        "a failed run pauses before the next"
    );
    after_pause(&mut e);
    let placed = pass(&mut e);
    let run = start_run(&mut e, placed, 9);
    assert!(run.iter().all(|(_, l)| l.attempt == 2));
    finish(&mut e, &run[1].0, &run[1].1, TaskState::Failed, 3);
    finish(&mut e, &run[0].0, &run[0].1, TaskState::Cancelled, 4);
    assert_eq!(
        states(&e, &id),
        vec![(TaskState::Cancelled, 2), (TaskState::Failed, 2)]
    );
    assert_eq!(e.jobs[&id].status, JobState::ExecutionException);
    assert!(pass(&mut e).is_empty());
}

#[test]
fn a_member_still_reserved_is_withdrawn_when_its_gang_breaks() {
    let mut e = ready_engine(&[advert("w1", 16, 1), advert("w2", 16, 1)]);
    let (id, _) = submit(&mut e, &gang(2, r#""max_retries": 1,"#));
    let mut placed = e.take_effects().create_leases;
    placed.sort_by(|a, b| a.1.task_id.as_str().cmp(b.1.task_id.as_str()));
    // Rank 0 starts and fails before rank 1 has claimed.
    claim(&mut e, &placed[0].0, &placed[0].1, 5);
    finish(&mut e, &placed[0].0, &placed[0].1, TaskState::Failed, 1);
    let fx = e.take_effects();
    assert!(
        fx.purge_leases.contains(&placed[1].0),
        "{:?}",
        fx.purge_leases
    );
    assert!(fx.events.iter().any(|(_, ev)| matches!(
        &ev.body,
        EventBody::State { state: TaskState::Queued, reason: Some(r), .. } if r.contains("its gang could not start")
    )));
    // Nothing of the gang runs any more: it queues again at once, and
    // runs again after the pause.
    assert_eq!(states(&e, &id), vec![(TaskState::Queued, 2); 2]);
    assert!(pass(&mut e).is_empty());
    after_pause(&mut e);
    assert_eq!(pass(&mut e).len(), 2);
}

#[test]
fn min_tasks_drops_the_members_that_do_not_fit_and_a_rerun_brings_them_back() {
    let mut e = ready_engine(&[advert("w1", 16, 2)]);
    let (id, _) = submit(&mut e, &gang(4, r#""min_tasks": 2, "max_retries": 1,"#));
    let fx = e.take_effects();
    assert_eq!(fx.create_leases.len(), 2);
    assert!(fx
        .create_leases
        .iter()
        .all(|(_, l)| l.rendezvous.as_ref().unwrap().world_size == 2));
    let dropped: Vec<&crate::state::TaskRecord> =
        e.jobs[&id].tasks.iter().filter(|t| t.dropped).collect();
    assert_eq!(dropped.len(), 2);
    for t in dropped {
        assert_eq!(t.state, TaskState::Cancelled);
        assert!(t
            .reason
            .as_deref()
            .unwrap()
            .contains("dropped from this run"));
    }

    // One of the two fails: the rerun is of all four again.
    let run = start_run(&mut e, fx.create_leases, 5);
    finish(&mut e, &run[0].0, &run[0].1, TaskState::Failed, 1);
    finish(&mut e, &run[1].0, &run[1].1, TaskState::Cancelled, 2);
    assert_eq!(states(&e, &id), vec![(TaskState::Queued, 2); 4]);
    assert!(e.jobs[&id].tasks.iter().all(|t| !t.dropped));

    // Two start again, two are dropped, and the two succeed.
    after_pause(&mut e);
    let placed = pass(&mut e);
    let run = start_run(&mut e, placed, 9);
    assert_eq!(run.len(), 2);
    for (i, (k, l)) in run.iter().enumerate() {
        finish(&mut e, k, l, TaskState::Succeeded, 10 + i as u64);
    }
    assert_eq!(e.jobs[&id].counts().succeeded, 2);
    assert_eq!(e.jobs[&id].status, JobState::Completed);
}
