//! Fair share and quotas on the engine: who gets what a pass places when
//! several users wait, and what a quota holds back.

use super::owners::{submit_as, user};
use super::*;
use gpufleet_schema::policy::SchedPolicy;

/// A job of `n` tasks of one GPU each.
fn one_gpu_tasks(n: usize) -> String {
    let task = r#"{"command": ["train"], "resources": {"gpus": 1}}"#;
    format!(r#"{{"tasks": [{}]}}"#, vec![task; n].join(", "))
}

fn policy(json: &str) -> SchedPolicy {
    let p: SchedPolicy = Encoding::Json.decode(json.as_bytes()).unwrap();
    p.validate().unwrap();
    p
}

/// Claims every reservation made; returns them.
fn claim_all(e: &mut Sim, rev: &mut u64) -> Vec<(String, Lease)> {
    let made = pass(e);
    for (key, lease) in &made {
        *rev += 1;
        claim(e, key, lease, *rev);
    }
    made
}

/// GPUs held by each owner's running work.
fn held_by(e: &Sim, owner: &str) -> usize {
    e.jobs
        .iter()
        .filter(|(_, j)| j.owner.as_str() == owner)
        .flat_map(|(_, j)| &j.tasks)
        .filter(|t| t.holds_worker())
        .count()
}

#[test]
fn a_second_user_gets_its_share_as_the_first_users_tasks_end() {
    let mut e = ready_engine(&[advert("w1", 64, 8)]);
    let mut rev = 0;
    submit_as(&mut e, &user("alice"), &one_gpu_tasks(100));
    let mut running = claim_all(&mut e, &mut rev);
    assert_eq!(running.len(), 8, "alice fills the fleet");
    submit_as(&mut e, &user("bob"), &one_gpu_tasks(10));
    assert!(pass(&mut e).is_empty(), "nothing is free");
    // Alice's tasks end one by one; each freed GPU goes to whoever is
    // furthest below its share.
    let mut seq = 100;
    for _ in 0..8 {
        let (key, lease) = running.remove(0);
        seq += 1;
        finish(&mut e, &key, &lease, TaskState::Succeeded, seq);
        running.extend(claim_all(&mut e, &mut rev));
    }
    assert_eq!((held_by(&e, "alice"), held_by(&e, "bob")), (4, 4));
}

#[test]
fn weights_split_the_fleet() {
    let cfg = CoordinatorConfig {
        scheduling: policy(r#"{"users": {"alice": {"weight": 3}}}"#),
        ..Default::default()
    };
    let mut e = ready_with(cfg, &[advert("w1", 64, 8)]);
    let mut rev = 0;
    // Both wait before anything is placed: the first pass splits 6 to 2.
    let jobs = [("alice", one_gpu_tasks(20)), ("bob", one_gpu_tasks(20))];
    for (who, json) in &jobs {
        e.handle(Input::Api(
            ApiCall::Submit(Box::new(spec(json))),
            user(who),
            oneshot::channel().0,
        ));
    }
    let ids: Vec<JobId> = e.jobs.iter().map(|(id, _)| id.clone()).collect();
    for id in ids {
        e.handle(Input::Stored(id));
    }
    claim_all(&mut e, &mut rev);
    assert_eq!((held_by(&e, "alice"), held_by(&e, "bob")), (6, 2));
}

#[test]
fn a_quota_holds_work_back_with_its_reason_and_a_new_policy_lifts_it() {
    let cfg = CoordinatorConfig {
        scheduling: policy(
            r#"{"users": {"alice": {"quota": {"max_gpus": 2}}},
                "groups": {"lab": {"members": ["bob", "carol"], "quota": {"max_running": 3}}}}"#,
        ),
        ..Default::default()
    };
    let mut e = ready_with(cfg, &[advert("w1", 64, 16)]);
    let mut rev = 0;
    let a = submit_as(&mut e, &user("alice"), &one_gpu_tasks(4));
    submit_as(&mut e, &user("bob"), &one_gpu_tasks(2));
    submit_as(&mut e, &user("carol"), &one_gpu_tasks(2));
    claim_all(&mut e, &mut rev);
    assert_eq!(held_by(&e, "alice"), 2);
    assert_eq!(held_by(&e, "bob") + held_by(&e, "carol"), 3);
    assert_eq!(
        e.jobs[&a].reason.as_deref(),
        Some("over quota: user alice max_gpus 2 (holds 2, asks 1)")
    );
    // Of bob's and carol's four, the one left waits for their group.
    let lab_waits: Vec<String> = e
        .jobs
        .iter()
        .filter(|(id, _)| *id != &a)
        .flat_map(|(_, j)| &j.tasks)
        .filter(|t| t.state == TaskState::Queued)
        .filter_map(|t| t.reason.as_deref().map(String::from))
        .collect();
    assert_eq!(lab_waits.len(), 1);
    assert!(
        lab_waits[0].starts_with("over quota: group lab (of user "),
        "{lab_waits:?}"
    );
    // The admin writes a new policy: alice's quota goes, at once.
    e.handle(Input::Policy(Some(Box::new(policy(
        r#"{"users": {"alice": {"quota": {"max_gpus": 3}}}}"#,
    )))));
    claim_all(&mut e, &mut rev);
    assert_eq!(held_by(&e, "alice"), 3);
    assert_eq!(held_by(&e, "bob") + held_by(&e, "carol"), 4);
    // Removing the key goes back to the settings: nothing more starts.
    e.handle(Input::Policy(None));
    assert!(pass(&mut e).is_empty());
}

#[test]
fn one_user_keeps_priority_then_submission_order() {
    let mut e = ready_engine(&[advert("w1", 64, 1)]);
    let low = submit_as(&mut e, &user("alice"), &one_gpu_tasks(1));
    let mut rev = 0;
    let first = claim_all(&mut e, &mut rev);
    assert_eq!(first[0].1.job_id, low);
    let later = submit_as(&mut e, &user("alice"), &one_gpu_tasks(1));
    let urgent = submit_as(
        &mut e,
        &user("alice"),
        r#"{"priority": 5, "tasks": [{"command": ["x"], "resources": {"gpus": 1}}]}"#,
    );
    finish(&mut e, &first[0].0, &first[0].1, TaskState::Succeeded, 7);
    let next = claim_all(&mut e, &mut rev);
    assert_eq!(next[0].1.job_id, urgent);
    assert_eq!(e.jobs[&later].status, JobState::Queued);
}

#[test]
fn a_big_ask_is_not_starved_by_another_users_stream_of_small_ones() {
    let mut e = ready_engine(&[advert("w1", 64, 4)]);
    let mut rev = 0;
    let small = one_gpu_tasks(1);
    for _ in 0..4 {
        submit_as(&mut e, &user("alice"), &small);
    }
    let mut running = claim_all(&mut e, &mut rev);
    let big = submit_as(
        &mut e,
        &user("bob"),
        r#"{"tasks": [{"command": ["big"], "resources": {"gpus": 4}}]}"#,
    );
    // Alice's tasks end every 5 s and she submits more, faster than they
    // end: one GPU is free now and then, never four, unless held.
    let starvation = CoordinatorConfig::default().starvation_after.0.as_secs();
    let mut seq = 0;
    let mut steps = 0;
    while e.jobs[&big].status == JobState::Queued {
        steps += 1;
        assert!(
            steps * 5 <= starvation + 4 * 5 + 5,
            "bob's big task still waits after {} s: {:?}",
            steps * 5,
            e.jobs[&big].reason
        );
        submit_as(&mut e, &user("alice"), &small);
        submit_as(&mut e, &user("alice"), &small);
        let (key, lease) = running.remove(0);
        seq += 1;
        finish(&mut e, &key, &lease, TaskState::Succeeded, seq);
        tick_after(&mut e, 5);
        running.extend(claim_all(&mut e, &mut rev));
        running.retain(|(_, l)| l.job_id != big);
    }
    assert_eq!(e.jobs[&big].status, JobState::Running);
}
