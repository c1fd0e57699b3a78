//! The one place the worker puts events on the stream: an attempt's
//! RUNNING state, its output and its result, through
//! [`gpufleet_natsutil::events`] (msgpack content type on every event; a
//! result also carries a message id, so that the stream keeps one copy
//! however often it is sent).

use async_nats::jetstream::{self, context::PublishAckFuture};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use gpufleet_natsutil::events;
use gpufleet_schema::{
    codec, subjects, Event, EventBody, EventKind, JobId, Lease, Sender, TaskId, UserId, WorkerId,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::metrics::{WorkerMetrics, Write};
use crate::supervisor::Output;

/// Output events published and not yet acknowledged, per task.
const OUTPUT_IN_FLIGHT: usize = 64;

/// Whose events an attempt sends.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    owner: UserId,
    job_id: JobId,
    task_id: TaskId,
    attempt: u32,
    worker: WorkerId,
    /// The reservation's token, which only the result carries: the owner
    /// reads the output while the attempt runs and must not learn what
    /// would let it forge the result.
    token: String,
}

impl Source {
    pub fn new(lease: &Lease, worker: &WorkerId) -> Source {
        Source {
            owner: lease.owner.clone(),
            job_id: lease.job_id.clone(),
            task_id: lease.task_id.clone(),
            attempt: lease.attempt,
            worker: worker.clone(),
            token: lease.token.clone(),
        }
    }

    /// The event and its subject; `lease_rev` is the claim's revision, the
    /// fencing token the coordinator checks.
    pub fn event(&self, body: EventBody, lease_rev: u64) -> (String, Event) {
        let kind = body.kind();
        (
            subjects::events(
                &self.owner,
                &self.job_id,
                &self.task_id,
                kind,
                &Sender::Worker(self.worker.clone()),
            ),
            Event {
                job_id: self.job_id.clone(),
                task_id: self.task_id.clone(),
                attempt: self.attempt,
                worker: Some(self.worker.clone()),
                lease_rev: Some(lease_rev),
                at: OffsetDateTime::now_utc(),
                body,
                token: (kind == EventKind::Result).then(|| self.token.clone()),
            },
        )
    }
}

/// Ships a task's output as events; waits for every ack before returning,
/// so that the result published after it follows the last line.
pub(crate) async fn ship_output(
    js: jetstream::Context,
    metrics: WorkerMetrics,
    mut rx: mpsc::Receiver<Output>,
    source: Source,
    lease_rev: u64,
) {
    let mut acks = FuturesUnordered::new();
    while let Some(out) = rx.recv().await {
        // Drops are counted once, from the attempt's total at its end.
        if let Output::Log { text, .. } = &out {
            metrics.log(text.len() as u64, 0);
        }
        let body = match out {
            Output::Log {
                stream,
                text,
                dropped_bytes,
            } => EventBody::Log {
                stream,
                text,
                dropped_bytes,
            },
            Output::Progress(data) => EventBody::Progress { data },
            // From the task (by its id; the coordinator names it), to
            // whoever it says: the coordinator routes it.
            Output::Message(m) => EventBody::Message {
                from: source.task_id.to_string(),
                to: m.to,
                topic: m.topic,
                data: m.data,
                signal: m.signal,
            },
        };
        let (subject, ev) = source.event(body, lease_rev);
        if let Some(ack) = send_event(&js, &metrics, subject, &ev).await {
            acks.push(std::future::IntoFuture::into_future(ack));
        }
        // Bound what is in flight; the supervisor counts what it must drop
        // while we wait.
        while acks.len() >= OUTPUT_IN_FLIGHT {
            if let Some(Err(e)) = acks.next().await {
                tracing::warn!(error = %e, "task output was not stored");
            }
        }
    }
    while let Some(r) = acks.next().await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "task output was not stored");
        }
    }
}

/// Sends one event without waiting for the stream's ack; the ack comes
/// back as a future.
pub(crate) async fn send_event(
    js: &jetstream::Context,
    metrics: &WorkerMetrics,
    subject: String,
    ev: &Event,
) -> Option<PublishAckFuture> {
    let bytes = codec::encode(ev).ok()?;
    metrics.wrote(Write::Event);
    match events::send(js, subject, bytes.into(), None).await {
        Ok(ack) => Some(ack),
        Err(e) => {
            tracing::warn!(error = %e, "could not publish an event");
            None
        }
    }
}

/// Publishes one event and waits for the stream's ack; true once stored.
pub(crate) async fn publish(
    js: &jetstream::Context,
    subject: String,
    ev: &Event,
    msg_id: Option<&str>,
) -> bool {
    let Ok(bytes) = codec::encode(ev) else {
        return false;
    };
    match events::publish(js, subject, bytes.into(), msg_id).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "event not stored");
            false
        }
    }
}
