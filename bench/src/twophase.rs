//! Two-phase tasks against one GPU: `tasks` tasks that each load for
//! `load` (no GPU needed) and then train for `train` on the GPU, run by the
//! real coordinator and a worker with one simulated GPU and real processes;
//! once declaring the load phase (`load` in the spec: it overlaps other
//! tasks' training), once as plain GPU tasks that load while they hold the
//! GPU. Ideal makespans: `load + tasks * train` and `tasks * (load +
//! train)`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpufleet_schema::subjects::endpoint;
use gpufleet_worker::WorkerConfig;
use serde_json::{json, Value};

use crate::control::{self, Access};

pub struct Outcome {
    pub two_phase: Duration,
    pub plain: Duration,
}

fn task(load: Duration, train: Duration, two_phase: bool) -> Value {
    let (l, t) = (load.as_secs_f64(), train.as_secs_f64());
    if two_phase {
        json!({
            "command": ["sh", "-c", format!(
                r#"sleep {l}; echo ready >> "$GPUFLEET_CONTROL"
while ! grep -q cuda_visible_devices "$GPUFLEET_CONTROL"; do sleep 0.02; done
sleep {t}"#)],
            "resources": {"gpus": 1, "cpus": 1},
            "load": {"cpus": 1},
        })
    } else {
        json!({
            "command": ["sh", "-c", format!("sleep {l}; sleep {t}")],
            "resources": {"gpus": 1, "cpus": 1},
        })
    }
}

/// Submits one job of `tasks` tasks and waits for it to finish; how long
/// that took.
async fn makespan(access: &Access, tasks: Vec<Value>) -> anyhow::Result<Duration> {
    let client = access.client("bench").await?;
    let started = Instant::now();
    let reply = client
        .request(
            access.api(endpoint::JOBS_SUBMIT),
            serde_json::to_vec(&json!({ "tasks": tasks }))?.into(),
        )
        .await?;
    let submitted: Value = serde_json::from_slice(&reply.payload)?;
    let job = submitted["job_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("submit refused: {submitted}"))?
        .to_string();
    let get = access.api(endpoint::JOBS_GET);
    let deadline = started + Duration::from_secs(600);
    let mut pace = gpufleet_natsutil::Backoff::fixed(Duration::from_millis(50));
    loop {
        let r = client
            .request(
                get.clone(),
                serde_json::to_vec(&json!({ "job_id": job }))?.into(),
            )
            .await?;
        let status: Value = serde_json::from_slice(&r.payload)?;
        let state = status["status"].as_str().unwrap_or("");
        if state.starts_with("FINISHED") || state == "FAILED_TO_RUN" {
            anyhow::ensure!(
                state == "FINISHED:COMPLETED",
                "the job ended {state}: {status}"
            );
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            pace.wait_before(deadline.into()).await,
            "the job did not finish in time"
        );
    }
}

pub async fn run(
    url: &str,
    tasks: usize,
    load: Duration,
    train: Duration,
) -> anyhow::Result<Outcome> {
    let access = Access::open(url);
    let fleet = control::Fleet::start_with(
        &access,
        1,
        Arc::new(gpufleet_worker::launcher::Processes),
        |cfg| WorkerConfig {
            cpus: Some(8.0),
            simulate_gpus: Some("1x24GiB".into()),
            ..cfg
        },
    )
    .await?;
    let two_phase = makespan(&access, vec![task(load, train, true); tasks]).await?;
    let plain = makespan(&access, vec![task(load, train, false); tasks]).await?;
    fleet.stop().await;
    Ok(Outcome { two_phase, plain })
}
