//! A coordinator taking over a fleet with a long history: many finished
//! jobs and many waiting ones. How long until it serves again, and how
//! much memory it holds: only unfinished jobs are read at start, so both
//! should depend on the waiting jobs, not on the finished ones.

use std::time::{Duration, Instant};

use gpufleet_schema::subjects::endpoint;
use serde_json::json;

use crate::control::{self, submit_many};
use crate::scale::{coordinator_stats, proc_stat};

pub struct HistoryResult {
    pub finished: usize,
    pub waiting: usize,
    /// From the old coordinator's stop to the new one answering.
    pub takeover: Duration,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    /// Jobs the new coordinator holds in memory.
    pub held: u64,
}

/// Runs `finished` single-task jobs to the end and queues `waiting` that
/// cannot be placed, then stops the coordinator and starts another.
pub async fn run(url: &str, finished: usize, waiting: usize) -> anyhow::Result<HistoryResult> {
    let access = control::Access::open(url);
    let mut fleet = control::Fleet::start(
        &access,
        20,
        8.0,
        std::sync::Arc::new(gpufleet_worker::launcher::Instant),
    )
    .await?;
    control::throughput(&access, finished, 1, 1.0).await?;
    let client = async_nats::connect(url).await?;
    // No worker has this label: they wait for ever.
    let stuck =
        json!({"constraints": {"labels": {"pool": "none"}}, "tasks": [{"command": ["true"]}]});
    submit_many(&client, &access.api(endpoint::JOBS_SUBMIT), waiting, &stuck).await?;
    // Finished jobs leave memory once their done record is stored.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held = coordinator_stats(&client).await?["held_jobs"]
            .as_u64()
            .unwrap_or(0);
        if held <= waiting as u64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{held} jobs still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before =
        proc_stat(fleet.coordinator_pid()).ok_or_else(|| anyhow::anyhow!("coordinator gone"))?;

    let killed = Instant::now();
    fleet.restart_coordinator(&access)?;
    // Serving again: it answers the API only once it has restored.
    let deadline = killed + Duration::from_secs(300);
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            client.request(access.api(endpoint::JOBS_LIST), "{}".into()),
        )
        .await;
        let answered = matches!(r, Ok(Ok(ref m)) if m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .is_none());
        if answered {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new coordinator never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let takeover = killed.elapsed();
    let held = coordinator_stats(&client).await?["held_jobs"]
        .as_u64()
        .unwrap_or(0);
    let after =
        proc_stat(fleet.coordinator_pid()).ok_or_else(|| anyhow::anyhow!("coordinator gone"))?;
    fleet.stop().await;
    Ok(HistoryResult {
        finished,
        waiting,
        takeover,
        rss_before_mib: before.1,
        rss_after_mib: after.1,
        held,
    })
}
