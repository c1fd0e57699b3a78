//! Failures: a worker that dies is noticed by its advert's expiry (not
//! when its leases run out), unless JetStream itself was out; retries pause
//! (exponential, with jitter, capped) and prefer another worker.

use super::*;
use std::time::Duration;

const S: Duration = Duration::from_secs(1);

/// A one-task job running on `w1` (of `w1` and `w2`); its lease.
fn running_on_w1(e: &mut Sim) -> (JobId, String, Lease) {
    let (id, _rx) = submit(
        e,
        r#"{"tasks": [{"command": ["true"], "resources": {"cpus": 4}}]}"#,
    );
    let (key, lease) = e.take_effects().create_leases[0].clone();
    assert_eq!(lease.worker.as_str(), "w1");
    claim(e, &key, &lease, 3);
    e.take_effects();
    (id, key, lease)
}

/// What an earlier leader may have promised a worker with the default
/// settings (`leader_ttl` 10 s, the advert's TTL 10 s): no advert's expiry
/// is a death within this of an engine's start (see `alive.rs`).
const INHERITED: Duration = Duration::from_secs(20);

fn two_workers() -> Sim {
    let mut e = two_workers_at_start();
    e.advance(INHERITED);
    // Their heartbeats go on meanwhile.
    for a in e.book.workers().cloned().collect::<Vec<_>>() {
        e.handle(Input::Advert(Box::new(a)));
    }
    e
}

fn two_workers_at_start() -> Sim {
    // w2 is busier, so that placement picks w1 first.
    let mut w2 = advert("w2", 8, 0);
    w2.cpus_milli = 8000;
    ready_engine(&[advert("w1", 4, 0), w2])
}

fn heard(e: &mut Sim, name: &str) {
    e.handle(Input::Alive {
        worker: WorkerId::new(name).unwrap(),
        heard: e.now.mono,
        ttl: 10 * S,
    });
}

fn lost_for_heartbeats(e: &mut Sim) -> bool {
    e.take_effects().events.iter().any(|(_, ev)| matches!(
        &ev.body,
        EventBody::State { state: TaskState::Lost, reason: Some(r), .. } if r.contains("stopped heartbeating")
    ))
}

#[test]
fn a_worker_heard_alive_dies_only_once_the_promise_lapses_without_an_advert() {
    let mut e = two_workers();
    let (id, key, _) = running_on_w1(&mut e);
    // Its adverts cannot be stored (a stream election); it asks to be
    // heard alive, and is, 5 s after its last advert.
    e.advance(5 * S);
    heard(&mut e, "w1");
    e.advance(5 * S);
    gone(&mut e, "w1", true);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    tick_after(&mut e, 4);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    // Heard no more: dead when the promise lapses (15 s after its last
    // advert), its lease removed and its task lost.
    tick_after(&mut e, 1);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Queued, 2));
    let fx = e.take_effects();
    assert!(fx.purge_leases.contains(&key), "its lease is removed");

    // Heard, then back: alive.
    let mut e = two_workers();
    let (id, _, _) = running_on_w1(&mut e);
    e.advance(5 * S);
    heard(&mut e, "w1");
    e.advance(5 * S);
    gone(&mut e, "w1", true);
    e.advance(2 * S);
    e.handle(Input::Advert(Box::new(advert("w1", 4, 0))));
    tick_after(&mut e, 20);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    assert!(!lost_for_heartbeats(&mut e));
}

#[test]
fn a_new_leader_keeps_what_an_earlier_one_may_have_promised() {
    // Just started: an earlier leader may have heard w1 alive up to 10 s
    // (`promise_reach`) past our start, and promised it 10 s more.
    let mut e = two_workers_at_start();
    let (id, _, _) = running_on_w1(&mut e);
    e.advance(10 * S);
    gone(&mut e, "w1", true);
    tick_after(&mut e, 9);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    // 20 s from our start, and no advert: dead.
    tick_after(&mut e, 1);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Queued, 2));
    assert!(lost_for_heartbeats(&mut e));
}

fn gone(e: &mut Sim, name: &str, expired: bool) {
    e.handle(Input::WorkerGone {
        name: WorkerId::new(name).unwrap(),
        expired,
    });
}

#[test]
fn a_worker_whose_advert_expires_on_time_has_its_tasks_lost_at_once() {
    let mut e = two_workers();
    let (id, key, _) = running_on_w1(&mut e);
    // The advert's TTL (10 s) runs out on time.
    e.advance(10 * S);
    gone(&mut e, "w1", true);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Queued, 2));
    let fx = e.take_effects();
    assert!(fx.purge_leases.contains(&key), "its lease is removed");
    assert!(fx.events.iter().any(|(_, ev)| matches!(
        &ev.body,
        EventBody::State { state: TaskState::Lost, reason: Some(r), .. } if r.contains("stopped heartbeating")
    )));
    after_pause(&mut e);
    let placed = pass(&mut e);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].1.worker.as_str(), "w2");
}

#[test]
fn an_advert_removed_or_expiring_late_or_while_draining_leaves_the_lease_to_its_ttl() {
    // Removed: a clean exit (the worker released its leases first).
    let mut e = two_workers();
    let (id, _, _) = running_on_w1(&mut e);
    gone(&mut e, "w1", false);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));

    // Expired long after its TTL: the servers could not take heartbeats.
    let mut e = two_workers();
    let (id, _, _) = running_on_w1(&mut e);
    e.advance(30 * S);
    gone(&mut e, "w1", true);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));

    // Draining: its tasks are finishing, and it says so.
    let mut e = two_workers();
    let (id, _, _) = running_on_w1(&mut e);
    let mut draining = advert("w1", 4, 0);
    draining.draining = true;
    e.handle(Input::Advert(Box::new(draining)));
    e.advance(10 * S);
    gone(&mut e, "w1", true);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
}

#[test]
fn nothing_is_declared_lost_while_a_feed_is_down_or_just_after() {
    let mut e = two_workers();
    let (id, _, _) = running_on_w1(&mut e);
    e.handle(Input::FeedDown(Feed::Workers));
    e.advance(10 * S);
    gone(&mut e, "w1", true);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));

    let mut e = two_workers();
    let (id, _, _) = running_on_w1(&mut e);
    e.handle(Input::FeedDown(Feed::Leases));
    e.advance(5 * S);
    e.handle(Input::FeedUp(Feed::Leases));
    // On time for the advert, but within the outage's grace (5 s).
    e.handle(Input::Advert(Box::new(advert("w1", 4, 0))));
    e.advance(4 * S);
    gone(&mut e, "w1", true);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
}

#[test]
fn a_released_lease_waits_for_its_result_while_results_cannot_arrive() {
    let mut e = Sim::new(CoordinatorConfig {
        result_grace: Dur(5 * S),
        ..Default::default()
    });
    e.handle(Input::Advert(Box::new(advert("w1", 4, 0))));
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 3);
    e.handle(Input::Lease(LeaseChange::Released { key }));
    e.handle(Input::FeedDown(Feed::Events));
    tick_after(&mut e, 20);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    e.handle(Input::FeedUp(Feed::Events));
    tick_after(&mut e, 4);
    assert_eq!(
        task_state(&e, &id, 0),
        (TaskState::Running, 1),
        "the grace starts again when results flow"
    );
    e.handle(result(&e, &lease, TaskState::Succeeded, 9));
    assert_eq!(e.jobs[&id].status, JobState::Completed);
}

#[test]
fn a_released_lease_waits_for_its_result_while_the_follower_lags() {
    // A restarted coordinator replaying a backlog of results under load:
    // the lease watch may see a release long before the follower reaches
    // the result, which the worker stored before it released.
    let mut e = Sim::new(CoordinatorConfig {
        result_grace: Dur(5 * S),
        ..Default::default()
    });
    e.handle(Input::Advert(Box::new(advert("w1", 4, 0))));
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        e.handle(Input::Synced(f));
    }
    let (id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["true"]}, {"command": ["true"]}]}"#,
    );
    let leases = e.take_effects().create_leases;
    for (key, lease) in &leases {
        claim(&mut e, key, lease, 3);
    }
    for (key, _) in &leases {
        e.handle(Input::Lease(LeaseChange::Released { key: key.clone() }));
    }
    e.handle(Input::ResultsBehind(true));
    tick_after(&mut e, 20);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Running, 1));
    // The backlog's last result, then the follower is caught up.
    e.handle(result(&e, &leases[0].1, TaskState::Succeeded, 9));
    e.handle(Input::ResultsBehind(false));
    assert_eq!(task_state(&e, &id, 0).0, TaskState::Succeeded);
    // The other result never came: once caught up, it is overdue (lost,
    // and queued again as attempt 2).
    tick_after(&mut e, 1);
    assert_eq!(
        task_state(&e, &id, 1),
        (TaskState::Queued, 2),
        "caught up, a result that is not there is lost"
    );
}

#[test]
fn a_reservation_the_store_refused_is_made_again_after_a_pause_not_at_once() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let (key, _) = e.take_effects().create_leases[0].clone();
    e.handle(Input::LeaseCreateFailed {
        key,
        error: "no responders".into(),
    });
    assert_eq!(task_state(&e, &id, 0), (TaskState::Queued, 1));
    e.schedule_if_needed();
    assert!(
        e.take_effects().create_leases.is_empty(),
        "reserved again at once"
    );
    let pause = e.config().retry_backoff.0;
    e.advance(pause);
    e.handle(Input::Tick);
    e.schedule_if_needed();
    assert_eq!(
        e.take_effects().create_leases.len(),
        1,
        "not after the pause"
    );
    assert_eq!(task_state(&e, &id, 0), (TaskState::Reserved, 1));
}

#[test]
fn retry_pauses_double_with_jitter_up_to_the_cap() {
    let mut e = ready_engine(&[]);
    let cfg = e.config().clone();
    let (first, max) = (cfg.retry_backoff.0, cfg.retry_backoff_max.0);
    for failed in 1..=12u32 {
        let full = first.saturating_mul(1 << (failed - 1)).min(max);
        let seen: Vec<Duration> = (0..50).map(|_| e.retry_delay(failed)).collect();
        assert!(
            seen.iter().all(|d| *d >= full / 2 && *d <= full),
            "attempt {failed}: {seen:?} not within [{:?}, {full:?}]",
            full / 2
        );
        assert!(
            seen.iter().any(|d| *d != seen[0]),
            "attempt {failed}: no jitter"
        );
    }
    assert!(e.retry_delay(u32::MAX) <= max, "no overflow, capped");
}
