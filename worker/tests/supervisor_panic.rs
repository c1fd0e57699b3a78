//! A worker whose supervisor panics while a task runs (issue 11): the
//! attempt ends FAILED with the reason, the task's processes are killed,
//! its resources are freed and the worker goes on. The worker runs in this
//! process, with a launcher that runs the real supervisor and panics when
//! the task asks it to; the coordinator and nats-server are real.

use std::sync::Arc;
use std::time::Duration;

use gpufleet_schema::Dur;
use gpufleet_testkit::{eventually, pids, Fleet};
use gpufleet_worker::launcher::{Launch, Launcher};
use gpufleet_worker::supervisor::{self, Output, StopReason, TaskRun};
use gpufleet_worker::WorkerConfig;
use serde_json::json;
use tokio::sync::{mpsc, watch};

const T: Duration = Duration::from_secs(60);

/// Real processes, but the supervisor breaks when the task prints
/// `PANIC-NOW`.
struct BreaksOnRequest;

impl Launcher for BreaksOnRequest {
    fn launch(
        &self,
        run: TaskRun,
        output: mpsc::Sender<Output>,
        stop: watch::Receiver<Option<StopReason>>,
    ) -> Launch {
        Box::pin(async move {
            let (tx, mut rx) = mpsc::channel(16);
            let supervised = supervisor::run(run, tx, stop);
            tokio::pin!(supervised);
            loop {
                tokio::select! {
                    finished = &mut supervised => return finished,
                    Some(out) = rx.recv() => {
                        if matches!(&out, Output::Log { text, .. } if text.contains("PANIC-NOW")) {
                            panic!("the supervisor broke on purpose");
                        }
                        let _ = output.send(out).await;
                    }
                }
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_panic_fails_the_attempt_kills_the_task_and_frees_its_resources() {
    let fleet = Fleet::start().await;
    let mut cfg = WorkerConfig::for_test(fleet.url(), "wp");
    cfg.work_dir = Some(fleet.dir().join("work-wp"));
    cfg.cpus = Some(1.0);
    cfg.kill_grace = Dur(Duration::from_millis(500));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(gpufleet_worker::run_with(
        cfg,
        async move {
            let _ = stop_rx.await;
        },
        Arc::new(BreaksOnRequest),
    ));
    fleet.wait_worker_listed("wp", true).await;

    let ctl = fleet.dir().join("ctl");
    std::fs::create_dir(&ctl).unwrap();
    gpufleet_testkit::open_to_tasks(&ctl);
    // All of the worker's one CPU: the next job runs only if it is freed.
    let script = r#"echo $$ > "$CTL/pid.tmp" && mv "$CTL/pid.tmp" "$CTL/pid"; echo PANIC-NOW; exec sleep 1000"#;
    let id = fleet
        .submit(&json!({"max_retries": 0, "tasks": [{
            "command": ["sh", "-c", script], "env": {"CTL": ctl},
            "resources": {"cpus": 1.0}}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    let task = &status["tasks"][0];
    assert_eq!(task["state"], "FAILED", "{status:#}");
    let reason = task["reason"].as_str().unwrap();
    assert!(
        reason.contains(
            "the worker failed while supervising the task (the supervisor broke on purpose)"
        ),
        "{reason}"
    );
    let pid: i32 = std::fs::read_to_string(ctl.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually(T, "the task's process to be killed", || async move {
        pids::gone(pid).then_some(())
    })
    .await;

    let id = fleet
        .submit(&json!({"tasks": [{"command": ["true"], "resources": {"cpus": 1.0}}]}))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");

    let _ = stop_tx.send(());
    tokio::time::timeout(T, worker)
        .await
        .expect("the worker stops when asked")
        .unwrap()
        .expect("and exits cleanly");
}
