//! What the engine tells Prometheus and `jobs.get` about use: counters as
//! things happen, state-derived gauges when asked, and each task's usage.

use super::*;
use gpufleet_schema::TaskUsage;

/// The coordinator's metrics as Prometheus would read them.
fn scrape(e: &Sim) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &e.metrics().registry()).unwrap();
    text
}

fn has(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

fn usage(mib: u64) -> TaskUsage {
    TaskUsage {
        peak_rss: ByteSize::mib(mib),
        cpu_seconds: 1.5,
        samples: 4,
        ..Default::default()
    }
}

#[test]
fn a_running_tasks_usage_comes_from_its_advert_and_an_ended_ones_from_its_result() {
    let mut e = ready_engine(&[advert("w1", 4, 0)]);
    let (id, _rx) = submit(&mut e, r#"{"tasks": [{"command": ["true"]}]}"#);
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 3);
    let get = |e: &mut Sim| {
        let job = ApiCall::Get {
            job: id.clone(),
            offset: 0,
            limit: 10,
        };
        match super::owners::call(e, job, &Caller::everyone()) {
            Reply::Job(s) => s.tasks[0].usage.clone(),
            _ => panic!("no job status"),
        }
    };
    assert_eq!(get(&mut e), None, "nothing measured yet");
    let mut a = advert("w1", 4, 0);
    a.running = vec![lease.task_id.clone()];
    a.usage.insert(lease.task_id.clone(), usage(100));
    e.handle(Input::Advert(Box::new(a)));
    assert_eq!(get(&mut e), Some(usage(100)));

    let Input::Result {
        seq,
        mut event,
        sender,
    } = result(&e, &lease, TaskState::Succeeded, 9)
    else {
        unreachable!()
    };
    if let EventBody::Result(o) = &mut event.body {
        o.usage = Some(usage(250));
    }
    e.handle(Input::Result { seq, event, sender });
    assert_eq!(get(&mut e), Some(usage(250)), "the result's figures stay");
    assert_eq!(e.jobs[&id].tasks[0].usage.as_deref(), Some(&usage(250)));
}

#[test]
fn counters_follow_reservations_ends_and_retries() {
    let mut e = ready_engine(&[advert("w1", 4, 0), advert("w2", 4, 0)]);
    let (_id, _rx) = submit(
        &mut e,
        r#"{"max_retries": 1, "tasks": [{"command": ["true"]}, {"command": ["true"]}]}"#,
    );
    let leases = e.take_effects().create_leases;
    assert_eq!(leases.len(), 2);
    let (k1, l1) = leases[0].clone();
    let (k2, l2) = leases[1].clone();
    // One is refused, the other runs, is lost and is retried.
    refuse(&mut e, &k1, &l1, 2, "busy");
    claim(&mut e, &k2, &l2, 3);
    e.handle(Input::Lease(LeaseChange::Expired { key: k2 }));
    let text = scrape(&e);
    for line in [
        r#"gpufleet_reservations_total{outcome="made"} 2"#,
        r#"gpufleet_reservations_total{outcome="refused"} 1"#,
        r#"gpufleet_tasks_ended_total{state="LOST"} 1"#,
        r#"gpufleet_tasks_ended_total{state="SUCCEEDED"} 0"#,
        "gpufleet_task_retries_total 1",
        "gpufleet_leases_lost_total 1",
    ] {
        assert!(has(&text, line), "{line} missing from\n{text}");
    }
    assert!(
        text.contains("gpufleet_queue_wait_seconds_count 2"),
        "{text}"
    );
}

#[test]
fn gauges_are_taken_from_the_state_when_asked() {
    let cfg = CoordinatorConfig::default();
    let mut e = ready_with(cfg, &[advert("w1", 1, 0)]);
    let mut draining = advert("w2", 1, 0);
    draining.draining = true;
    e.handle(Input::Advert(Box::new(draining)));
    // One task runs on the only CPU; two wait behind it.
    let (_id, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["a"]}, {"command": ["b"]}, {"command": ["c"]}]}"#,
    );
    let (key, lease) = e.take_effects().create_leases[0].clone();
    claim(&mut e, &key, &lease, 3);
    e.advance(std::time::Duration::from_secs(90));
    let (done, mut said) = oneshot::channel();
    e.handle(Input::Observe(done));
    assert!(said.try_recv().is_ok(), "the scrape is answered");
    let o = e.observe();
    assert_eq!(o.queue_length, 2);
    assert_eq!(o.oldest_wait, std::time::Duration::from_secs(90));
    assert_eq!(o.tasks[task_state_index(TaskState::Running)], 1);
    assert_eq!(o.jobs[job_state_index(JobState::Running)], 1);
    assert_eq!((o.workers_ready, o.workers_draining), (1, 1));
    let text = scrape(&e);
    for line in [
        "gpufleet_queue_length 2",
        "gpufleet_queue_oldest_wait_seconds 90.0",
        r#"gpufleet_tasks{state="QUEUED"} 2"#,
        r#"gpufleet_jobs{status="RUNNING"} 1"#,
        r#"gpufleet_workers{state="draining"} 1"#,
    ] {
        assert!(has(&text, line), "{line} missing from\n{text}");
    }
}

#[test]
fn a_held_worker_is_marked_in_workers_list_and_counted() {
    let mut e = ready_engine(&[advert("w1", 16, 2)]);
    let small = r#"{"tasks": [{"command": ["small"], "resources": {"gpus": 1}}]}"#;
    let (_s, _rx) = submit(&mut e, small);
    let (key, lease) = e.take_effects().create_leases.remove(0);
    claim(&mut e, &key, &lease, 1);
    let (_big, _rx) = submit(
        &mut e,
        r#"{"tasks": [{"command": ["big"], "resources": {"gpus": 2}}]}"#,
    );
    let secs = CoordinatorConfig::default().starvation_after.0.as_secs();
    tick_after(&mut e, secs + 1);
    e.schedule_if_needed();
    assert!(e.queue.hold().is_some(), "the big task starves");
    let workers = ApiCall::Workers {
        after: None,
        limit: 10,
    };
    let Reply::Workers(list) = super::owners::call(&mut e, workers, &Caller::everyone()) else {
        panic!("no workers reply");
    };
    assert!(list[0].held, "{:?}", list[0]);
    assert_eq!(e.observe().workers_held, 1);
}
