//! An attempt's lease ends with its holder's result: the worker leaves the
//! key to expire, the engine frees what it held at once, and what the
//! watch shows of the key afterwards changes nothing.

use super::*;

/// Two one-CPU tasks on a one-CPU worker: only the first is placed.
fn one_slot() -> (Sim, JobId, (String, Lease)) {
    let mut e = ready_engine(&[advert("w1", 1, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["a"], "resources": {"cpus": 1}},
                      {"command": ["b"], "resources": {"cpus": 1}}]}"#,
    );
    let mut made = e.take_effects().create_leases;
    assert_eq!(made.len(), 1, "one CPU: one task at a time");
    (e, id, made.remove(0))
}

fn put(e: &mut Sim, key: &str, rev: u64, lease: &Lease, state: LeaseState) {
    let mut l = lease.clone();
    l.state = state;
    l.instance = Some("inst".into());
    e.handle(Input::Lease(LeaseChange::Put {
        key: key.into(),
        rev,
        lease: Box::new(l),
    }));
}

#[test]
fn a_result_frees_the_lease_at_once_and_its_later_expiry_does_nothing() {
    let (mut e, id, (key, lease)) = one_slot();
    claim(&mut e, &key, &lease, 5);
    e.handle(result(&e, &lease, TaskState::Succeeded, 7));
    assert_eq!(task_state(&e, &id, 0), (TaskState::Succeeded, 1));
    // No release came, yet the CPU is free for the next task now.
    let made = pass(&mut e);
    assert_eq!(made.len(), 1, "the second task is placed at once");
    let (key2, lease2) = made[0].clone();
    assert_eq!(lease2.task_id, e.jobs[&id].tasks[1].id);
    claim(&mut e, &key2, &lease2, 9);
    e.take_effects();

    // A renewal sent before the result, seen after it, and a restarted
    // worker's ABANDONED: neither is a live lease.
    put(&mut e, &key, 8, &lease, LeaseState::Running);
    put(&mut e, &key, 10, &lease, LeaseState::Abandoned);
    assert_eq!(e.book.finished_len(), 1);
    assert!(!e.book.contains(&subjects::parse_lease_key(&key).unwrap()));
    // Then the key expires on its own.
    e.handle(Input::Lease(LeaseChange::Expired { key: key.clone() }));
    e.handle(Input::Tick);
    let fx = e.take_effects();
    assert!(
        fx.cancel_leases.is_empty() && fx.purge_leases.is_empty() && fx.events.is_empty(),
        "nothing is written for an ended attempt's key: {:?} {:?} {}",
        fx.cancel_leases,
        fx.purge_leases,
        fx.events.len()
    );
    assert_eq!(e.book.finished_len(), 0, "forgotten once expired");
    assert_eq!(task_state(&e, &id, 0), (TaskState::Succeeded, 1));
    assert_eq!(task_state(&e, &id, 1), (TaskState::Running, 1));
    // The second task still holds the only CPU.
    let snap = e.book.snapshot();
    assert_eq!(snap[0].capacity.cpus_free_milli, 0);
}

#[test]
fn an_interrupted_attempt_frees_its_lease_for_its_own_retry() {
    let mut e = ready_engine(&[advert("w1", 1, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"max_retries": 1, "tasks": [{"command": ["a"], "resources": {"cpus": 1}}]}"#,
    );
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 5);
    e.handle(result(&e, &lease, TaskState::Interrupted, 7));
    after_pause(&mut e);
    let made = pass(&mut e);
    assert_eq!(
        made.len(),
        1,
        "attempt 2 fits where attempt 1 ran: {:?}",
        e.jobs[&id].tasks[0]
    );
    assert_eq!(made[0].1.attempt, 2);
    // Attempt 1's key expiring later does not touch attempt 2.
    e.handle(Input::Lease(LeaseChange::Expired { key }));
    assert_eq!(task_state(&e, &id, 0), (TaskState::Reserved, 2));
}

#[test]
fn a_refused_result_from_the_holder_still_frees_what_its_lease_held() {
    let (mut e, id, (key, lease)) = one_slot();
    claim(&mut e, &key, &lease, 5);
    // Cancelled while it ran; then the job's record moved on (the task
    // ended): a result for the attempt comes from its holder anyway.
    e.jobs
        .task_mut(&id, 0)
        .end(TaskState::Cancelled, None, Some("cancelled".into()), now());
    assert!(e.book.contains(&subjects::parse_lease_key(&key).unwrap()));
    e.handle(result(&e, &lease, TaskState::Succeeded, 7));
    assert_eq!(task_state(&e, &id, 0).0, TaskState::Cancelled, "refused");
    assert!(
        !e.book.contains(&subjects::parse_lease_key(&key).unwrap()),
        "its process is gone: the lease holds nothing"
    );
    // A result naming another token frees nothing.
    let (mut e, id, (key, lease)) = one_slot();
    claim(&mut e, &key, &lease, 5);
    e.jobs
        .task_mut(&id, 0)
        .end(TaskState::Cancelled, None, Some("cancelled".into()), now());
    let mut forged = result(&e, &lease, TaskState::Succeeded, 7);
    if let Input::Result { event, .. } = &mut forged {
        event.token = Some("not it".into());
    }
    e.handle(forged);
    assert!(e.book.contains(&subjects::parse_lease_key(&key).unwrap()));
}

/// A coordinator that takes over finds the keys of attempts that ended
/// with their result, not yet expired: they hold nothing, are not asked
/// to stop, and their expiry is no loss. Should one be renewed after all,
/// something runs that nothing wants: it is asked to stop.
#[test]
fn at_start_up_an_ended_attempts_lease_holds_nothing_and_costs_no_write() {
    let (mut old, id, (key, lease)) = one_slot();
    claim(&mut old, &key, &lease, 5);
    old.handle(result(&old, &lease, TaskState::Succeeded, 7));
    let record = old.jobs[&id].clone();

    let mut e = Sim::new(CoordinatorConfig::default());
    e.restore_job(record);
    put(&mut e, &key, 6, &lease, LeaseState::Running);
    e.handle(Input::Advert(Box::new(advert("w1", 1, 0))));
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    let fx = e.take_effects();
    assert!(
        fx.cancel_leases.is_empty() && fx.purge_leases.is_empty(),
        "{:?} {:?}",
        fx.cancel_leases,
        fx.purge_leases
    );
    assert_eq!(task_state(&e, &id, 0), (TaskState::Succeeded, 1));
    // Task 1 gets the CPU the ended attempt's key no longer holds.
    let made = pass(&mut e);
    assert_eq!(made.len(), 1, "{:?}", e.jobs[&id].tasks[1].reason);
    e.handle(Input::Lease(LeaseChange::Expired { key: key.clone() }));
    assert_eq!(task_state(&e, &id, 0), (TaskState::Succeeded, 1));
    assert!(e.take_effects().events.is_empty(), "no LOST, no event");

    // The same start, but the key is renewed later: it still runs.
    let mut e = Sim::new(CoordinatorConfig::default());
    e.restore_job(old.jobs[&id].clone());
    put(&mut e, &key, 6, &lease, LeaseState::Running);
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    e.take_effects();
    put(&mut e, &key, 11, &lease, LeaseState::Running);
    let fx = e.take_effects();
    assert_eq!(fx.cancel_leases.len(), 1, "asked to stop");
    assert_eq!(fx.cancel_leases[0].2, 11, "over the renewal");
}
