//! Dependencies: `after_ok` waits for completion and ends with a failed
//! dependency; `after_any` waits for any end.

use super::owners::call;
use super::*;

fn after(kind: &str, deps: &[&JobId]) -> String {
    let ids: Vec<String> = deps.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        r#"{{"{kind}": [{}], "max_retries": 0, "tasks": [{{"command": ["x"]}}]}}"#,
        ids.join(", ")
    )
}

const ONE: &str = r#"{"max_retries": 0, "tasks": [{"command": ["x"]}]}"#;

/// Runs the one reservation a pass makes to the end, as `state`.
fn run_next(e: &mut Sim, state: TaskState, seq: u64) -> JobId {
    let made = pass(e);
    assert_eq!(made.len(), 1, "{made:?}");
    let (key, lease) = made[0].clone();
    claim(e, &key, &lease, seq);
    finish(e, &key, &lease, state, seq);
    lease.job_id
}

#[test]
fn a_chain_of_three_runs_in_order() {
    let mut e = ready_engine(&[advert("w1", 16, 0)]);
    let (a, _) = submit(&mut e, ONE);
    let (b, _) = submit(&mut e, &after("after_ok", &[&a]));
    let (c, _) = submit(&mut e, &after("after_ok", &[&b]));
    assert_eq!(
        e.jobs[&b].reason.as_deref(),
        Some(format!("waits for job {a} to complete (after_ok)").as_str())
    );
    assert_eq!(run_next(&mut e, TaskState::Succeeded, 1), a);
    assert_eq!(e.jobs[&c].status, JobState::Queued);
    assert_eq!(run_next(&mut e, TaskState::Succeeded, 2), b);
    assert_eq!(run_next(&mut e, TaskState::Succeeded, 3), c);
    assert_eq!(e.jobs[&c].status, JobState::Completed);
}

#[test]
fn a_failed_dependency_ends_the_chain_and_after_any_runs_anyway() {
    let mut e = ready_engine(&[advert("w1", 16, 0)]);
    let (a, _) = submit(&mut e, ONE);
    let (b, _) = submit(&mut e, &after("after_ok", &[&a]));
    let (c, _) = submit(&mut e, &after("after_ok", &[&b]));
    let (d, _) = submit(&mut e, &after("after_any", &[&a]));
    assert_eq!(run_next(&mut e, TaskState::Failed, 1), a);
    // The pass that finds it ends b; the next, c (b is ended by then).
    assert_eq!(run_next(&mut e, TaskState::Succeeded, 2), d);
    e.handle(Input::Tick);
    pass(&mut e);
    assert_eq!(e.jobs[&b].status, JobState::FailedToRun);
    let why = e.jobs[&b].reason.clone().unwrap();
    assert!(
        why.contains(&format!(
            "dependency {a} ended FINISHED:EXECUTION_EXCEPTION (after_ok)"
        )),
        "{why}"
    );
    assert_eq!(e.jobs[&c].status, JobState::FailedToRun);
    assert!(e.jobs[&c]
        .reason
        .as_deref()
        .unwrap()
        .contains(&format!("dependency {b} ended")));
}

#[test]
fn a_dependency_must_exist_for_the_submitter() {
    let mut e = ready_engine(&[advert("w1", 16, 0)]);
    let ghost = JobId::new("ghost").unwrap();
    let waits = spec(&after("after_ok", &[&ghost]));
    match call(
        &mut e,
        ApiCall::Submit(Box::new(waits)),
        &Caller::everyone(),
    ) {
        Reply::Error { code: 400, message } => assert!(
            message.starts_with("after_ok: job ghost not found"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
}
