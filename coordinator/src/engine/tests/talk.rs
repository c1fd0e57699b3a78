//! Talking to a job: its errors, listed and reset.

use super::*;

fn errors(e: &mut Sim, id: &JobId, reset: bool, caller: Caller) -> (Reply, Option<JobId>) {
    let (tx, _rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Errors {
            job: id.clone(),
            reset,
        },
        caller,
        tx,
    ));
    let fx = e.take_effects();
    let (_, reply, depends) = fx.replies.into_iter().next().expect("a reply");
    (reply, depends)
}

#[test]
fn every_bad_attempt_is_an_error_until_reset_and_a_cancel_is_none() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"max_retries": 2, "tasks": [{"name": "t", "command": ["true"]}]}"#,
    );
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 3);
    finish(&mut e, &key, &lease, TaskState::Interrupted, 10);
    assert_eq!(task_state(&e, &id, 0), (TaskState::Queued, 2));
    after_pause(&mut e);
    let (key, lease) = pass(&mut e)[0].clone();
    claim(&mut e, &key, &lease, 7);
    // The second attempt's worker vanishes: LOST.
    e.handle(Input::Lease(LeaseChange::Expired { key: key.clone() }));
    after_pause(&mut e);
    let (key, lease) = pass(&mut e)[0].clone();
    claim(&mut e, &key, &lease, 9);
    finish(&mut e, &key, &lease, TaskState::Succeeded, 11);
    assert_eq!(e.jobs[&id].status, JobState::Completed);

    let (reply, depends) = errors(&mut e, &id, false, Caller::everyone());
    assert_eq!(depends, None, "a listing waits for nothing");
    let Reply::Errors(r) = reply else {
        panic!("{reply:?}")
    };
    let got: Vec<(u32, TaskState, Option<&str>)> = r
        .errors
        .iter()
        .map(|x| (x.attempt, x.state, x.worker.as_ref().map(|w| w.as_str())))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, TaskState::Interrupted, Some("w1")),
            (2, TaskState::Lost, Some("w1")),
        ]
    );
    assert_eq!(r.errors[0].exit_code, Some(1));
    assert_eq!(r.errors[0].task, "t");
    assert_eq!(r.error_count, 2);
    assert!(!r.reset);
    // jobs.get shows them too; a list summary does not.
    assert_eq!(e.jobs[&id].page(0, 10).errors.len(), 2);
    assert!(e.jobs[&id].status(false).errors.is_empty());

    // Another user's job is not found.
    let bob = Caller {
        user: UserId::new("bob").unwrap(),
        admin: false,
    };
    let (reply, _) = errors(&mut e, &id, true, bob);
    assert!(matches!(reply, Reply::Error { code: 404, .. }), "{reply:?}");
    assert_eq!(e.jobs[&id].error_count, 2);

    // A reset answers with what it cleared, once the record is stored.
    let (reply, depends) = errors(&mut e, &id, true, Caller::everyone());
    assert_eq!(depends, Some(id.clone()));
    assert!(matches!(&reply, Reply::Errors(r) if r.reset && r.error_count == 2));
    let (reply, _) = errors(&mut e, &id, false, Caller::everyone());
    assert!(matches!(&reply, Reply::Errors(r) if r.errors.is_empty() && r.error_count == 0));

    // What a cancel stops is no error.
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 20);
    let (tx, _rx) = oneshot::channel();
    e.handle(Input::Api(
        ApiCall::Cancel(id.clone()),
        Caller::everyone(),
        tx,
    ));
    finish(&mut e, &key, &lease, TaskState::Interrupted, 21);
    assert_eq!(e.jobs[&id].status, JobState::Aborted);
    assert_eq!(e.jobs[&id].error_count, 0);
}

#[test]
fn a_job_keeps_its_newest_errors_and_counts_them_all() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let j = e.jobs.job_mut(&id);
    let max = gpufleet_schema::status::MAX_JOB_ERRORS;
    for n in 0..max + 5 {
        j.tasks[0].attempt = n as u32 + 1;
        j.note_end(0, TaskState::Failed, Some(1), &"x".repeat(10_000), now());
    }
    assert_eq!(j.errors.len(), max);
    assert_eq!(j.error_count as usize, max + 5);
    assert_eq!(j.errors[0].attempt, 6, "the oldest went first");
    assert!(j.errors[0].reason.len() <= crate::state::MAX_ERROR_REASON_BYTES);
    // Neither success nor a cancel is an error.
    j.note_end(0, TaskState::Succeeded, Some(0), "", now());
    j.note_end(0, TaskState::Cancelled, None, "", now());
    assert_eq!(j.error_count as usize, max + 5);
}

fn send(
    e: &mut Sim,
    json: serde_json::Value,
    caller: Caller,
) -> (Vec<Post>, Vec<(String, Event)>, Option<Reply>) {
    let (tx, mut rx) = oneshot::channel();
    let req = serde_json::from_value(json).unwrap();
    e.handle(Input::Api(ApiCall::Send(Box::new(req)), caller, tx));
    let fx = e.take_effects();
    for (tx, reply, _) in fx.replies {
        let _ = tx.send(reply);
    }
    (fx.posts, fx.events, rx.try_recv().ok())
}

#[test]
fn a_message_goes_to_the_running_tasks_only_and_is_kept_for_each_addressed_one() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"name": "a", "command": ["true"]}, {"name": "b", "command": ["true"]},
                      {"name": "c", "command": ["true"], "resources": {"cpus": 64}}]}"#,
    );
    let leases = e.take_effects().create_leases;
    assert_eq!(leases.len(), 2, "c fits nowhere and waits");
    for (n, (key, lease)) in leases.iter().enumerate() {
        claim(&mut e, key, lease, 3 + n as u64);
    }
    let (key_b, lease_b) = leases
        .iter()
        .find(|(_, l)| l.task_id.as_str().ends_with("-1"))
        .unwrap()
        .clone();
    finish(&mut e, &key_b, &lease_b, TaskState::Succeeded, 9);
    e.take_effects();

    // To the job: task a alone runs.
    let (posts, events, reply) = send(
        &mut e,
        serde_json::json!({"job_id": id, "topic": "t", "data": {"x": 1}, "signal": true}),
        Caller::everyone(),
    );
    assert!(reply.is_none(), "answered once delivered");
    assert_eq!(posts.len(), 1);
    let parcels = &posts[0].parcels;
    assert_eq!(parcels.len(), 1);
    let (worker, d) = &parcels[0];
    assert_eq!(d.task_id.as_str(), format!("{id}-0"));
    assert_eq!(Some(worker), e.jobs[&id].tasks[0].worker.as_ref());
    assert_eq!((d.attempt, d.signal), (1, true));
    assert_eq!(d.message.from, "user:default");
    assert_eq!(d.message.data, serde_json::json!({"x": 1}));
    assert_eq!(events.len(), 1);
    assert!(
        events[0].0.ends_with(&format!("{id}-0.message._c")),
        "{}",
        events[0].0
    );
    assert!(matches!(&events[0].1.body, EventBody::Message { to, .. } if to == "*"));

    // To a task by name that does not run: kept, delivered to nobody.
    let (posts, events, _) = send(
        &mut e,
        serde_json::json!({"job_id": id, "task": "c", "topic": "t"}),
        Caller::everyone(),
    );
    assert!(posts[0].parcels.is_empty());
    assert_eq!(events.len(), 1);

    // An unknown task, and someone else's job, are not found.
    let (posts, _, reply) = send(
        &mut e,
        serde_json::json!({"job_id": id, "task": "zz", "topic": "t"}),
        Caller::everyone(),
    );
    assert!(posts.is_empty());
    assert!(
        matches!(reply, Some(Reply::Error { code: 404, message }) if message.contains("no task zz"))
    );
    let bob = Caller {
        user: UserId::new("bob").unwrap(),
        admin: false,
    };
    let (posts, events, reply) = send(&mut e, serde_json::json!({"job_id": id, "topic": "t"}), bob);
    assert!(posts.is_empty() && events.is_empty());
    assert!(matches!(reply, Some(Reply::Error { code: 404, .. })));
}

/// A task's outbox message as its worker publishes it.
fn outbox(lease: &Lease, rev: Option<u64>, to: &str) -> Input {
    Input::Message {
        sender: Sender::Worker(lease.worker.clone()),
        event: Box::new(Event {
            job_id: lease.job_id.clone(),
            task_id: lease.task_id.clone(),
            attempt: lease.attempt,
            worker: Some(lease.worker.clone()),
            lease_rev: rev,
            at: now(),
            body: EventBody::Message {
                from: lease.task_id.to_string(),
                to: to.into(),
                topic: "t".into(),
                data: serde_json::json!(7),
                signal: false,
            },
            token: None,
        }),
    }
}

#[test]
fn a_task_s_message_reaches_its_own_job_s_running_tasks_and_the_rest_bounces() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"name": "a", "command": ["true"]}, {"name": "b", "command": ["true"]},
                      {"name": "c", "command": ["true"], "resources": {"cpus": 64}}]}"#,
    );
    let (other, _rx) = submit(&mut e, r#"{"tasks": [{"name": "x", "command": ["true"]}]}"#);
    let mut leases = e.take_effects().create_leases;
    leases.sort_by(|a, b| a.1.task_id.cmp(&b.1.task_id));
    for (n, (key, lease)) in leases.iter().enumerate() {
        claim(&mut e, key, lease, 10 + n as u64);
    }
    e.take_effects();
    let a = leases
        .iter()
        .find(|(_, l)| l.task_id.as_str() == format!("{id}-0"))
        .unwrap()
        .1
        .clone();
    let rev = e.jobs[&id].tasks[0].claim_rev;
    let route = |e: &mut Sim, input: Input| {
        e.handle(input);
        e.take_effects().posts
    };

    // By name: to b, from "a" by name.
    let posts = route(&mut e, outbox(&a, rev, "b"));
    let AfterPost::Bounce { refused, .. } = &posts[0].then else {
        panic!()
    };
    assert!(refused.is_empty());
    assert_eq!(posts[0].parcels.len(), 1);
    let d = &posts[0].parcels[0].1;
    assert_eq!(
        (d.task_id.as_str(), d.message.from.as_str()),
        (format!("{id}-1").as_str(), "a")
    );

    // To all: every other running task of its job, not itself, not c
    // (waiting), not the other job's.
    let posts = route(&mut e, outbox(&a, rev, "*"));
    let to: Vec<&str> = posts[0]
        .parcels
        .iter()
        .map(|(_, d)| d.task_id.as_str())
        .collect();
    assert_eq!(to, [format!("{id}-1")]);

    // A task that is not running, and one of another job, bounce.
    for (target, why) in [
        ("c", "not running (QUEUED)"),
        (&format!("{other}-0")[..], "has no task"),
    ] {
        let posts = route(&mut e, outbox(&a, rev, target));
        assert!(posts[0].parcels.is_empty(), "{target}");
        let AfterPost::Bounce {
            sender,
            refused,
            to,
        } = &posts[0].then
        else {
            panic!()
        };
        assert_eq!(to, target);
        assert!(refused[0].1.contains(why), "{refused:?}");
        assert_eq!(sender.1.task_id, a.task_id, "reported to the sender");
        let notice = undeliverable(&sender.1, to, &refused[0].0, &refused[0].1);
        assert_eq!(notice.message.topic, "gpufleet.undeliverable");
        assert_eq!(notice.message.data["topic"], "t");
    }

    // Not from the claim: another worker, an old revision, another attempt.
    let mut forged = a.clone();
    forged.worker = WorkerId::new("w9").unwrap();
    assert!(route(&mut e, outbox(&forged, rev, "b")).is_empty());
    assert!(route(&mut e, outbox(&a, Some(999), "b")).is_empty());
    let mut old = a.clone();
    old.attempt = 7;
    assert!(route(&mut e, outbox(&old, rev, "b")).is_empty());
}
