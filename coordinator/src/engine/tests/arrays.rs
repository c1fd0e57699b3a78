//! Job arrays: a template becomes its tasks at submit, and `max_parallel`
//! caps how many hold a worker at once.

use super::owners::call;
use super::*;
use gpufleet_schema::array::ARRAY_INDEX_ENV;

#[test]
fn an_array_runs_as_its_tasks_at_most_max_parallel_at_once() {
    let mut e = ready_engine(&[advert("w1", 64, 0)]);
    let (id, _rx) = submit(
        &mut e,
        r#"{"max_parallel": 2, "tasks": [{"command": ["train", "--lr", "{lr}"],
            "array": {"lr": [0.1, 0.01], "seed": [1, 2, 3]}}]}"#,
    );
    let job = &e.jobs[&id];
    assert_eq!(job.tasks.len(), 6);
    assert!(job.specs.iter().all(|t| t.array.is_none()));
    let made = pass(&mut e);
    assert_eq!(made.len(), 2, "max_parallel 2");
    let first = &made[0].1.task;
    assert_eq!(first.command, ["train", "--lr", "0.1"]);
    assert_eq!(first.env[ARRAY_INDEX_ENV], "0");
    assert_eq!(first.env["seed"], "1");
    let waiting = e.jobs[&id].tasks[2].reason.clone().unwrap();
    assert_eq!(waiting, "max_parallel: 2 of the job's tasks run at once");
    assert_eq!(e.jobs[&id].reason.as_deref(), Some(waiting.as_str()));

    // One ends: the next one takes its place, and only one.
    let (key, lease) = made[0].clone();
    claim(&mut e, &key, &lease, 1);
    finish(&mut e, &key, &lease, TaskState::Succeeded, 10);
    let next = pass(&mut e);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1.task.env[ARRAY_INDEX_ENV], "2");
    assert_eq!(next[0].1.task.command, ["train", "--lr", "0.1"]);
    assert_eq!(next[0].1.task.env["seed"], "3");
}

#[test]
fn a_bad_array_is_refused_naming_the_field() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let bad = spec(r#"{"tasks": [{"command": ["x"], "array": {"lr": []}}]}"#);
    match call(&mut e, ApiCall::Submit(Box::new(bad)), &Caller::everyone()) {
        Reply::Error { code: 400, message } => {
            assert!(message.starts_with("tasks[0].array:"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
