//! One task cancelled while the rest run, and tasks run again by hand:
//! a retry restores the task's retries, and reopens a finished job.

use super::owners::{call, submit_as, user};
use super::*;

fn error_code(reply: &Reply) -> Option<u16> {
    match reply {
        Reply::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// A job of alice's with two tasks, `a` and `b`.
fn two_tasks(e: &mut Sim, max_retries: u32) -> (Caller, JobId) {
    let alice = user("alice");
    let json = format!(
        r#"{{"max_retries": {max_retries}, "tasks": [{{"name": "a", "command": ["x"]}}, {{"name": "b", "command": ["y"]}}]}}"#
    );
    let id = submit_as(e, &alice, &json);
    (alice, id)
}

/// Reserves and claims whatever the next pass places.
fn run_next(e: &mut Sim, rev: u64) -> Vec<(String, Lease)> {
    let placed = pass(e);
    for (key, lease) in &placed {
        claim(e, key, lease, rev);
    }
    e.take_effects();
    placed
}

#[test]
fn a_task_cancelled_alone_ends_cancelled_and_the_rest_runs_on() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (alice, id) = two_tasks(&mut e, 2);
    let placed = run_next(&mut e, 10);
    assert_eq!(placed.len(), 2);
    let cancel = |task: &str| ApiCall::CancelTask {
        job: id.clone(),
        task: task.into(),
    };
    // Nobody else's, and no task it does not have.
    assert_eq!(
        error_code(&call(&mut e, cancel("a"), &user("bob"))),
        Some(404)
    );
    assert_eq!(error_code(&call(&mut e, cancel("zz"), &alice)), Some(404));

    let (tx, _rx) = oneshot::channel();
    e.handle(Input::Api(cancel("a"), alice.clone(), tx));
    let fx = e.take_effects();
    assert_eq!(fx.cancel_leases.len(), 1, "only task a is asked to stop");
    assert_eq!(fx.cancel_leases[0].0, placed[0].0);
    assert_eq!(fx.cancel_leases[0].1.state, LeaseState::Cancelling);
    // The worker ends it as it ends any stop it was asked for; a live job
    // would retry an INTERRUPTED task, a cancelled task is not.
    let (key, lease) = &placed[0];
    finish(&mut e, key, lease, TaskState::Interrupted, 1);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Cancelled, 1));
    assert_eq!(task_state(&e, &id, 1), (TaskState::Running, 1));
    assert_eq!(e.jobs[&id].error_count, 0, "a cancel is no error");
    assert!(!e.jobs[&id].status.is_finished());
    let (key, lease) = &placed[1];
    finish(&mut e, key, lease, TaskState::Succeeded, 2);
    assert_eq!(e.jobs[&id].status, JobState::ExecutionException);
}

#[test]
fn a_queued_task_cancelled_alone_ends_at_once() {
    let mut e = ready_engine(&[]);
    let (alice, id) = two_tasks(&mut e, 1);
    let task = e.jobs[&id].tasks[1].id.to_string();
    let reply = call(
        &mut e,
        ApiCall::CancelTask {
            job: id.clone(),
            task,
        },
        &alice,
    );
    assert!(matches!(reply, Reply::Job(_)), "{reply:?}");
    let t = &e.jobs[&id].tasks[1];
    assert_eq!(t.state, TaskState::Cancelled);
    assert_eq!(t.reason.as_deref(), Some("cancelled by alice"));
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Queued);
}

#[test]
fn a_retry_by_hand_reopens_a_finished_job_and_restores_its_retries() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let alice = user("alice");
    let id = submit_as(
        &mut e,
        &alice,
        r#"{"max_retries": 1, "tasks": [{"name": "ok", "command": ["x"]}, {"name": "flaky", "command": ["y"]}]}"#,
    );
    let placed = run_next(&mut e, 10);
    finish(&mut e, &placed[0].0, &placed[0].1, TaskState::Succeeded, 1);
    // The flaky task is lost twice: its one retry is spent.
    for attempt in 1..=2 {
        let (key, lease) = if attempt == 1 {
            placed[1].clone()
        } else {
            after_pause(&mut e);
            run_next(&mut e, 20).remove(0)
        };
        assert_eq!(lease.attempt, attempt);
        e.handle(Input::Lease(LeaseChange::Expired { key }));
    }
    assert_eq!(task_state(&e, &id, 1), (TaskState::Lost, 2));
    assert_eq!(e.jobs[&id].status, JobState::ExecutionException);
    let retry = |task: Option<&str>| ApiCall::Retry {
        job: id.clone(),
        task: task.map(str::to_string),
    };
    // Until its done record is stored it is in between: try again.
    assert_eq!(error_code(&call(&mut e, retry(None), &alice)), Some(503));
    let record = e.jobs[&id].clone();
    e.handle(Input::Moved(id.clone()));
    // Then it is read from the store and comes back.
    let (tx, mut rx) = oneshot::channel();
    e.handle(Input::Api(retry(None), alice.clone(), tx));
    let fx = e.take_effects();
    let Some((_, caller, Fetch::Retry { task, tx })) = fx.fetches.into_iter().next() else {
        panic!("a retry of a job no longer held reads it");
    };
    e.handle(Input::Reopen {
        job: Box::new(record),
        task,
        caller,
        tx,
    });
    let fx = e.take_effects();
    assert_eq!(fx.reopened, vec![(id.clone(), 1)]);
    assert!(fx.put_jobs.contains(&id));
    for (tx, reply, depends) in fx.replies {
        assert_eq!(depends, Some(id.clone()), "answered once stored");
        let _ = tx.send(reply);
    }
    let Ok(Reply::Job(status)) = rx.try_recv() else {
        panic!("the job's status");
    };
    assert_eq!(status.status, JobState::Running);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Succeeded, 1));
    let t = &e.jobs[&id].tasks[1];
    assert_eq!((t.state, t.attempt), (TaskState::Queued, 3));
    assert_eq!(t.reason.as_deref(), Some("retried by alice"));

    // Attempt 3 is lost: its retry is whole again, so attempt 4 runs.
    let (key, lease) = run_next(&mut e, 30).remove(0);
    assert_eq!(lease.attempt, 3);
    e.handle(Input::Lease(LeaseChange::Expired { key }));
    assert_eq!(task_state(&e, &id, 1), (TaskState::Queued, 4));
    after_pause(&mut e);
    let (key, lease) = run_next(&mut e, 40).remove(0);
    finish(&mut e, &key, &lease, TaskState::Succeeded, 5);
    assert_eq!(e.jobs[&id].status, JobState::Completed);
}

#[test]
fn a_retry_says_why_it_cannot() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (alice, id) = two_tasks(&mut e, 0);
    let placed = run_next(&mut e, 10);
    let retry = |task: &str| ApiCall::Retry {
        job: id.clone(),
        task: Some(task.into()),
    };
    assert_eq!(
        error_code(&call(&mut e, retry("a"), &alice)),
        Some(409),
        "running"
    );
    // A task that failed while the job runs on is queued again at once.
    e.handle(result(&e, &placed[1].1, TaskState::Failed, 2));
    e.handle(Input::Lease(LeaseChange::Released {
        key: placed[1].0.clone(),
    }));
    assert_eq!(task_state(&e, &id, 1), (TaskState::Failed, 1));
    assert!(matches!(call(&mut e, retry("b"), &alice), Reply::Job(_)));
    assert_eq!(task_state(&e, &id, 1), (TaskState::Queued, 2));
    finish(&mut e, &placed[0].0, &placed[0].1, TaskState::Succeeded, 1);
    assert_eq!(
        error_code(&call(&mut e, retry("a"), &alice)),
        Some(409),
        "succeeded"
    );
    assert_eq!(error_code(&call(&mut e, retry("zz"), &alice)), Some(404));
    assert_eq!(
        error_code(&call(&mut e, retry("b"), &user("bob"))),
        Some(404)
    );
    let gang = submit_as(
        &mut e,
        &alice,
        r#"{"gang": true, "tasks": [{"name": "r0", "command": ["x"]}, {"name": "r1", "command": ["y"]}]}"#,
    );
    let reply = call(
        &mut e,
        ApiCall::Retry {
            job: gang.clone(),
            task: Some("r0".into()),
        },
        &alice,
    );
    assert_eq!(error_code(&reply), Some(400), "a gang runs again whole");
    let reply = call(
        &mut e,
        ApiCall::Retry {
            job: gang,
            task: None,
        },
        &alice,
    );
    assert_eq!(error_code(&reply), Some(409), "not before it has ended");
}
