//! Owners and trusted results: a user sees and acts on its own jobs (an
//! admin on all), and a result counts only from the worker holding the
//! live claim, with the claim's revision and the reservation's token.

use super::*;
use gpufleet_schema::TaskId;

pub(super) fn call(e: &mut Sim, call: ApiCall, caller: &Caller) -> Reply {
    let (tx, mut rx) = oneshot::channel();
    e.handle(Input::Api(call, caller.clone(), tx));
    for (tx, reply, _) in e.take_effects().replies {
        let _ = tx.send(reply);
    }
    rx.try_recv().expect("a reply")
}

pub(super) fn user(name: &str) -> Caller {
    Caller {
        user: UserId::new(name).unwrap(),
        admin: false,
    }
}

pub(super) fn submit_as(e: &mut Sim, caller: &Caller, json: &str) -> JobId {
    let id = match call(e, ApiCall::Submit(Box::new(spec(json))), caller) {
        Reply::Submit(r) => r.job_id,
        other => panic!("{other:?}"),
    };
    // The runtime says so once the record is written.
    e.handle(Input::Stored(id.clone()));
    id
}

#[test]
fn a_user_sees_and_cancels_its_own_jobs_and_an_admin_all() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (alice, bob) = (user("alice"), user("bob"));
    let root = Caller {
        admin: true,
        ..user("root")
    };
    let a = submit_as(&mut e, &alice, r#"{"tasks": [{"command": ["a"]}]}"#);
    let b = submit_as(&mut e, &bob, r#"{"tasks": [{"command": ["b"]}]}"#);
    assert_eq!(e.jobs[&a].owner.as_str(), "alice");

    let get = |id: &JobId| ApiCall::Get {
        job: id.clone(),
        offset: 0,
        limit: 10,
    };
    assert!(matches!(call(&mut e, get(&a), &alice), Reply::Job(s) if s.owner.as_str() == "alice"));
    // Bob's job does not exist for alice, whatever she asks.
    for c in [get(&b), ApiCall::Cancel(b.clone())] {
        assert!(matches!(
            call(&mut e, c, &alice),
            Reply::Error { code: 404, .. }
        ));
    }
    assert!(!e.jobs[&b].cancel_requested);
    let listed = |r: Reply| match r {
        Reply::Jobs(l) => l.into_iter().map(|s| s.job_id).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let list = || ApiCall::List {
        status: None,
        limit: 10,
    };
    assert_eq!(listed(call(&mut e, list(), &alice)), vec![a.clone()]);
    assert_eq!(listed(call(&mut e, list(), &root)).len(), 2);
    // Nor can she take over its id.
    let again = format!(r#"{{"id": "{b}", "tasks": [{{"command": ["b"]}}]}}"#);
    assert!(matches!(
        call(&mut e, ApiCall::Submit(Box::new(spec(&again))), &alice),
        Reply::Error { code: 409, .. }
    ));
    // An admin cancels bob's job.
    assert!(matches!(
        call(&mut e, ApiCall::Cancel(b.clone()), &root),
        Reply::Job(_)
    ));
    assert!(e.jobs[&b].cancel_requested);
}

#[test]
fn a_workers_running_tasks_and_gpu_holders_show_only_to_their_owners() {
    let mut e = ready_engine(&[advert("w1", 4, 2)]);
    let (alice, bob) = (user("alice"), user("bob"));
    let one_gpu = r#"{"tasks": [{"command": ["a"], "resources": {"gpus": 1}}]}"#;
    let a = submit_as(&mut e, &alice, one_gpu);
    let b = submit_as(&mut e, &bob, one_gpu);
    assert_eq!(pass(&mut e).len(), 2, "both placed on w1's two GPUs");
    let mut w = advert("w1", 4, 2);
    w.running = vec![TaskId::for_index(&a, 0), TaskId::for_index(&b, 0)];
    e.handle(Input::Advert(Box::new(w)));
    let workers = || ApiCall::Workers {
        after: None,
        limit: 10,
    };
    let Reply::Workers(ws) = call(&mut e, workers(), &alice) else {
        panic!("workers")
    };
    assert_eq!(ws[0].running, vec![TaskId::for_index(&a, 0)]);
    let held: Vec<TaskId> = ws[0].gpus.iter().flat_map(|g| g.held_by.clone()).collect();
    assert_eq!(held, vec![TaskId::for_index(&a, 0)]);
    let root = Caller {
        admin: true,
        ..user("root")
    };
    let Reply::Workers(ws) = call(&mut e, workers(), &root) else {
        panic!("workers")
    };
    let held = ws[0].gpus.iter().filter(|g| !g.held_by.is_empty()).count();
    assert_eq!((ws[0].running.len(), held), (2, 2));
}

#[test]
fn a_result_counts_only_from_the_holder_of_the_live_claim() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (id, _) = submit(&mut e, r#"{"tasks": [{"command": ["a"]}]}"#);
    let (key, lease) = pass(&mut e).remove(0);
    claim(&mut e, &key, &lease, 10);
    let good = result(&e, &lease, TaskState::Succeeded, 1);
    let Input::Result { event, sender, .. } = &good else {
        unreachable!()
    };
    let other = WorkerId::new(if lease.worker.as_str() == "w1" {
        "w2"
    } else {
        "w1"
    })
    .unwrap();
    let forgeries: Vec<(&str, Box<Event>, Sender)> = vec![
        ("another worker", event.clone(), Sender::Worker(other)),
        (
            "the coordinator's sender",
            event.clone(),
            Sender::Coordinator,
        ),
        (
            "another revision",
            Box::new(Event {
                lease_rev: Some(11),
                ..(**event).clone()
            }),
            sender.clone(),
        ),
        (
            "no token",
            Box::new(Event {
                token: None,
                ..(**event).clone()
            }),
            sender.clone(),
        ),
        (
            "another token",
            Box::new(Event {
                token: Some("guessed".into()),
                ..(**event).clone()
            }),
            sender.clone(),
        ),
    ];
    for (what, event, sender) in forgeries {
        e.handle(Input::Result {
            seq: 2,
            event,
            sender,
        });
        assert_eq!(
            e.jobs[&id].tasks[0].state,
            TaskState::Running,
            "a result from {what} counted"
        );
    }
    e.handle(good);
    assert_eq!(e.jobs[&id].tasks[0].state, TaskState::Succeeded);
}

#[test]
fn a_state_event_is_the_owners_and_names_the_holder() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let alice = user("alice");
    let id = submit_as(&mut e, &alice, r#"{"tasks": [{"command": ["a"]}]}"#);
    e.schedule_if_needed();
    let fx = e.take_effects();
    let (subject, event) = fx.events.last().unwrap().clone();
    assert_eq!(
        subject,
        format!("gpufleet.events.alice.{id}.{id}-0.state._c")
    );
    assert!(matches!(
        event.body,
        EventBody::State { state: TaskState::Reserved, holder: Some(w), .. } if w.as_str() == "w1"
    ));
    assert_eq!(fx.create_leases[0].1.owner.as_str(), "alice");
    assert!(!fx.create_leases[0].1.token.is_empty());
}
