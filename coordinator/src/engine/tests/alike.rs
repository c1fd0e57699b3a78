//! A pass lets the rest of a job's tasks alike wait as soon as one of
//! them did not fit, and places through its index of workers
//! (`shortcuts`, see `schedule.rs`): that must reserve exactly what
//! asking the plain scan for each task does, and leave each task the
//! same reason.

use super::*;
use gpufleet_schema::{Grant, TaskId};
use proptest::prelude::*;

/// A fleet: (CPUs, GPUs, labelled) per worker.
fn fleet(workers: &[(u64, u32, bool)]) -> Vec<WorkerAdvert> {
    workers
        .iter()
        .enumerate()
        .map(|(i, &(cpus, gpus, labelled))| {
            let mut a = advert(&format!("w{i}"), cpus, gpus);
            if labelled {
                a.labels.insert("zone".into(), "a".into());
            }
            a
        })
        .collect()
}

/// A job of tasks (CPUs, GPUs), with the label constraint or not.
fn job(tasks: &[(u32, u32)], labelled: bool, max_parallel: Option<u32>) -> String {
    let tasks: Vec<serde_json::Value> = tasks
        .iter()
        .map(|&(cpus, gpus)| {
            serde_json::json!({"command": ["true"], "resources": {"cpus": cpus, "gpus": gpus}})
        })
        .collect();
    let mut j = serde_json::json!({ "tasks": tasks });
    if labelled {
        j["constraints"] = serde_json::json!({"labels": {"zone": "a"}});
    }
    if let Some(m) = max_parallel {
        j["max_parallel"] = m.into();
    }
    j.to_string()
}

/// What a pass decided, without the random tokens: each reservation's
/// key and grant, and every task's state, attempt and reason.
type Outcome = (
    Vec<(String, Grant)>,
    Vec<(TaskId, TaskState, u32, Option<String>)>,
);

fn outcome(e: &mut Sim, made: Vec<(String, Lease)>) -> Outcome {
    let reserved = made.into_iter().map(|(k, l)| (k, l.grant)).collect();
    let mut tasks: Vec<_> = e
        .jobs
        .iter()
        .flat_map(|(_, j)| &j.tasks)
        .map(|t| {
            let why = t.reason.as_ref().map(|r| r.to_string());
            (t.id.clone(), t.state, t.attempt, why)
        })
        .collect();
    tasks.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    (reserved, tasks)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_shortcuts_place_as_trying_each_task_on_every_worker(
        workers in proptest::collection::vec((1u64..=8, 0u32..=2, any::<bool>()), 1..6),
        jobs in proptest::collection::vec(
            (
                proptest::collection::vec((1u32..=3, 0u32..=1), 1..12),
                any::<bool>(),
                proptest::option::of(1u32..=3),
            ),
            1..6,
        ),
        refusals in proptest::collection::vec(any::<bool>(), 8),
    ) {
        let fleet = fleet(&workers);
        let mut skip = ready_engine(&fleet);
        let mut each = ready_engine(&fleet);
        each.shortcuts = false;
        for (tasks, labelled, max_parallel) in &jobs {
            let spec = job(tasks, *labelled, *max_parallel);
            let mut made = Vec::new();
            for e in [&mut skip, &mut each] {
                let _ = submit(e, &spec);
                let m = pass(e);
                made.push(outcome(e, m));
            }
            prop_assert_eq!(&made[0], &made[1]);
        }
        // Some reservations are refused: those tasks keep away from their
        // worker, a state of their own that alike tasks do not share.
        let mut made = Vec::new();
        for e in [&mut skip, &mut each] {
            let mut leases: Vec<(String, Lease)> = e
                .book
                .iter()
                .map(|(k, live)| (k.to_string(), live.lease.clone()))
                .collect();
            leases.sort_by(|a, b| a.0.cmp(&b.0));
            for (n, (key, lease)) in leases.iter().enumerate() {
                if refusals[n % refusals.len()] {
                    refuse(e, key, lease, 100 + n as u64, "busy");
                }
            }
            let m = pass(e);
            made.push(outcome(e, m));
        }
        prop_assert_eq!(&made[0], &made[1]);
    }
}
